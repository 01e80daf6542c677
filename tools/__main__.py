"""``python -m partitioner.tools`` is the ``partitioner`` command (when its script is not on PATH)."""

import sys

from partitioner.tools.cli import main

sys.exit(main())

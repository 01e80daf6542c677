"""``python -m tools`` is ``partitioner`` before the package is installed."""

import sys

from tools.cli import main

sys.exit(main())

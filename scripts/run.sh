#!/usr/bin/env bash
# The main job: partition the bundled GPT example into 4 stages, print the per-stage
# table, write plan.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/partitioner plan partitioner.examples:quickstart --gpus 4 --output plan.json "$@"

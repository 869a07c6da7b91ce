#!/usr/bin/env bash
# The project's test command: lint, types, then the test suite (slow stress
# runs excluded by pyproject's addopts; run them with `pytest -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy gpopd
python3 -m pytest "$@"

#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): lint, then unit and integration tiers.
# Integration tests start a real `ray start --head`, submit real jobs and use real HTTP.
#   bash scripts/test.sh [extra pytest args]
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
python -m pytest -m "not slow" "$@"

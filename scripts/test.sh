#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): lint, then unit and integration tiers.
# Integration tests start a real `ray start --head`, submit real jobs and use real HTTP.
#   bash scripts/test.sh [extra pytest args]
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
python -m pytest -m "not slow" "$@"
# The HTTP tests again on Serve's throughput-optimized ingress (HAProxy in front of the replicas,
# serve_app/ingress.py): the same requests, answers and errors in both modes.
SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider \
  tests/integration/test_serving.py tests/integration/test_compact_body.py "$@"

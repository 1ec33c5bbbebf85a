#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): lint, then unit and integration tiers.
# Integration tests start a real `ray start --head`, submit real jobs and use real HTTP.
#   bash scripts/test.sh [extra pytest args]
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
# Data, checkpoints and skew check are made once for both pytest sessions (tests/integration/conftest.py).
SKEWLESS_TEST_ARTIFACTS=$(mktemp -d -t skewless-tests-XXXXXX)
export SKEWLESS_TEST_ARTIFACTS
trap 'rm -rf "$SKEWLESS_TEST_ARTIFACTS"' EXIT
python -m pytest -m "not slow" "$@"
# The HTTP tests again on Serve's throughput-optimized ingress (HAProxy in front of the replicas,
# serve_app/ingress.py): the same requests, answers and errors in both modes. Canary routing and the
# state gauges are decided inside the replica, the same code behind either ingress, so they run once
# (above): that keeps the whole command under CI's 20-minute budget.
SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider -k "not canary and not state_gauges" \
  tests/integration/test_serving.py tests/integration/test_compact_body.py "$@"

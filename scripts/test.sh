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
# The request path again on Serve's throughput-optimized ingress (HAProxy in front of the replicas,
# serve_app/ingress.py): the same requests, answers, 4xx/429 errors and compact bodies in both modes.
# Swaps under load, canary routing, gauges and metrics are decided inside the replica, the same code
# behind either ingress, so they run once (above): that keeps the whole command under 30 minutes.
SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider \
  -k "compact_body or score_and_retrieve or broadcast_equals or bad_input or nested or refuses or fuzzed or cap_reject" \
  tests/integration/test_serving.py tests/integration/test_compact_body.py "$@"

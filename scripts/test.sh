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
python -m pytest -m "not slow" --durations=20 "$@"
# The request path again on Serve's throughput-optimized ingress (HAProxy in front of the replicas,
# serve_app/ingress.py): JSON and Arrow bodies, answers and a bad body failing alone in a shared batch.
# Everything else of serving (4xx/429 details, swaps, canary, gauges) is decided inside the replica,
# the same code behind either ingress, so it runs once (above): the whole command stays under 30 min.
SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider tests/integration/test_compact_body.py "$@"

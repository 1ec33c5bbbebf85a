#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): lint, then unit and integration tiers.
# Integration tests start a real `ray start --head`, submit real jobs and use real HTTP.
#   bash scripts/test.sh [extra pytest args]   (with args: one pytest run of what they select)
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
# Data, checkpoints and skew check are made once for both pytest sessions (tests/integration/conftest.py).
SKEWLESS_TEST_ARTIFACTS=$(mktemp -d -t skewless-tests-XXXXXX)
export SKEWLESS_TEST_ARTIFACTS
UNIT_DIR=$(mktemp -d -t skewless-unit-XXXXXX)
trap 'rm -rf "$SKEWLESS_TEST_ARTIFACTS" "$UNIT_DIR"' EXIT
if [ "$#" -gt 0 ]; then
  python -m pytest -m "not slow" --durations=20 "$@"
  exit
fi
# The unit tier runs beside the integration tier at the lowest CPU priority: it takes the cores the
# integration tests leave idle while they wait on Ray, Serve and HTTP (about two thirds of the time
# on 2 cores), and yields them whenever an integration test computes.
nice -n 19 python -m pytest -m "not slow" -p no:cacheprovider --basetemp="$UNIT_DIR/tmp" tests/unit \
  >"$UNIT_DIR/log" 2>&1 &
unit=$!
status=0
python -m pytest -m "not slow" --durations=20 tests/integration || status=$?
wait "$unit" || status=$?
echo "---- unit tier (ran beside the integration tier) ----"
cat "$UNIT_DIR/log"
# The request path again on Serve's throughput-optimized ingress (HAProxy in front of the replicas,
# serve_app/ingress.py): JSON and Arrow bodies, answers and a bad body failing alone in a shared batch.
# Everything else of serving (4xx/429 details, swaps, canary, gauges) is decided inside the replica,
# the same code behind either ingress, so it runs once (above): the whole command stays under 30 min.
SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider tests/integration/test_compact_body.py \
  || status=$?
exit "$status"

#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): lint, then unit and integration tiers.
# Integration tests start a real `ray start --head`, submit real jobs and use real HTTP.
#   bash scripts/test.sh [extra pytest args]   (with args: one pytest run of what they select)
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
# Data, model packages, skew check and first build are made once per command, for every pytest session
# that needs them (tests/integration/conftest.py: made_once).
SKEWLESS_TEST_ARTIFACTS=$(mktemp -d -t skewless-tests-XXXXXX)
export SKEWLESS_TEST_ARTIFACTS
RUNS=$(mktemp -d -t skewless-runs-XXXXXX)
trap 'rm -rf "$SKEWLESS_TEST_ARTIFACTS" "$RUNS"' EXIT
if [ "$#" -gt 0 ]; then
  python -m pytest -m "not slow" --durations=20 "$@"
  exit
fi
# Three streams at once, so that the cores one leaves idle while it waits on Ray, Serve and HTTP (a
# quarter of the time alone on 2 cores) do the others' work: the integration tier in two pytest sessions,
# each with its own Ray head and S3 server (the data, model packages and first build are made once, by
# whichever needs them first: tests/integration/conftest.py), and the unit tier.
#   serving:  the HTTP modules (and two of the rebuild modules, to even the two out), whose latency bounds (a sidecar write served within a second) must not
#             wait on the other streams: their Ray workers (the Serve replicas) run at the drivers' nice 0,
#             not at Ray's default 15, which would put them behind every process of the other streams.
#             Then the request path again on Serve's throughput-optimized ingress (HAProxy,
#             serve_app/ingress.py): JSON and Arrow bodies, a bad body failing alone in a shared batch.
#             Everything else of serving is decided inside the replica, the same code behind either
#             ingress, so it runs once.
#   rebuilds: the rebuild-heavy modules, starting with those that need none of the shared artifacts.
#             Not niced: a Ray cluster starved of CPU can miss its own start-up deadlines.
#   unit:     the lowest CPU priority (plain pytest, no deadlines).
SERVING=(test_compact_body test_serving test_sidecar test_s3_end_to_end test_shop_model test_skew test_rebuild_job)
REBUILDS=(test_embed_faults test_object_store test_cluster_yaml test_rebuild_failures test_cutover test_sharded_serving)
# every integration module is in one of the two lists
listed=$(printf '%s\n' "${SERVING[@]}" "${REBUILDS[@]}" | sort)
present=$(cd tests/integration && ls test_*.py | sed 's/\.py$//' | sort)
if [ "$listed" != "$present" ]; then
  echo "scripts/test.sh: the integration modules and its two lists differ:"
  diff <(echo "$listed") <(echo "$present") || true
  exit 1
fi
files() { for m in "$@"; do printf 'tests/integration/%s.py ' "$m"; done; }
mkdir -p "$RUNS/rebuilds" "$RUNS/fast"
nice -n 19 python -m pytest -m "not slow" -p no:cacheprovider --basetemp="$RUNS/tmp" tests/unit \
  >"$RUNS/log" 2>&1 &
unit=$!
# shellcheck disable=SC2046 # the module list splits into paths on purpose
(
  rc=0
  python -m pytest -m "not slow" -p no:cacheprovider --durations=20 --basetemp="$RUNS/rebuilds/tmp" \
    $(files "${REBUILDS[@]}") || rc=$?
  exit "$rc"
) >"$RUNS/rebuilds/log" 2>&1 &
rebuilds=$!
status=0
# shellcheck disable=SC2046
RAY_worker_niceness=0 python -m pytest -m "not slow" --durations=20 $(files "${SERVING[@]}") || status=$?
RAY_worker_niceness=0 SKEWLESS_INGRESS=fast python -m pytest -m "not slow" -p no:cacheprovider \
  --basetemp="$RUNS/fast/tmp" tests/integration/test_compact_body.py || status=$?
wait "$rebuilds" || status=$?
echo "---- rebuild modules (ran beside the serving modules and the fast ingress) ----"
cat "$RUNS/rebuilds/log"
wait "$unit" || status=$?
echo "---- unit tier (ran beside the integration tier) ----"
cat "$RUNS/log"
exit "$status"

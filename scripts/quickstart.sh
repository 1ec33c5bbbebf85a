#!/usr/bin/env bash
# One command on a fresh clone: set up .venv, prepare MovieLens, train a checkpoint, and run the main
# job (rebuild + validate + publish the index on a local Ray). Re-running publishes a new build.
#   bash scripts/quickstart.sh [--movielens PATH]
source "$(dirname "$0")/env.sh"
ML_ARGS=("$@")
echo "[skewless] 1/3 preparing MovieLens -> data/movielens"
python -m jobs.prepare_data movielens "${ML_ARGS[@]}"
echo "[skewless] 2/3 training a two-tower checkpoint -> checkpoints/"
CKPT=$(python -m jobs.train | tee /dev/stderr | sed -n 's/^checkpoint: //p')
echo "[skewless] 3/3 rebuilding the index with $CKPT on a local Ray -> registry/"
python -m jobs.rebuild_index --checkpoint "$CKPT" --catalog data/movielens/catalog --users data/movielens/users --registry registry
echo
echo "[skewless] done."
echo "  data:        $PWD/data/movielens"
echo "  checkpoint:  $PWD/$CKPT"
echo "  live build:  $(python -m jobs.registry --registry registry current | sed -n 's/.*"build_id": "\(.*\)".*/\1/p')  ($PWD/registry)"

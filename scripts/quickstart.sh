#!/usr/bin/env bash
# One command on a fresh clone: set up .venv, prepare MovieLens, train a checkpoint (and its next
# version), pass the family's skew check, and run the main job (rebuild + validate + publish the index
# on a local Ray). Re-running publishes a new build.
#   bash scripts/quickstart.sh [--movielens PATH]
source "$(dirname "$0")/env.sh"
ML_ARGS=("$@")
echo "[skewless] 1/4 preparing MovieLens -> data/movielens"
python -m jobs.prepare_data movielens "${ML_ARGS[@]}"
echo "[skewless] 2/4 training a two-tower checkpoint, and its next version warm-started from it -> checkpoints/"
CKPT=$(python -m jobs.train --seed 0 | tee /dev/stderr | sed -n 's/^checkpoint: //p')
NEXT=$(python -m jobs.train --seed 1 --epochs 2 --lr 5e-4 --init-from "$CKPT" | tee /dev/stderr | sed -n 's/^checkpoint: //p')
echo "[skewless] 3/4 version-skew check of the family ($CKPT vs $NEXT) -> registry/skew/"
python -m jobs.skew_check --checkpoints "$CKPT" "$NEXT" --registry registry
# --address local: a new local Ray even if this machine runs (or once ran) a `ray start` cluster, whose
# leftover /tmp/ray/ray_current_cluster would otherwise be picked up by ray.init()
echo "[skewless] 4/4 rebuilding the index with $CKPT on a local Ray -> registry/"
python -m jobs.rebuild_index --checkpoint "$CKPT" --catalog data/movielens/catalog --users data/movielens/users --registry registry --address local
echo
echo "[skewless] done."
echo "  data:        $PWD/data/movielens"
echo "  checkpoints: $PWD/$CKPT (live), $PWD/$NEXT"
echo "  skew check:  $(ls -t registry/skew/*/*.json | head -1)"
echo "  live build:  $(python -m jobs.registry --registry registry current | sed -n 's/.*"build_id": "\(.*\)".*/\1/p')  ($PWD/registry)"

#!/usr/bin/env bash
# One command on a fresh clone: set up .venv, prepare MovieLens, train the example model (and its next
# version) and export each as a model package, pass the family's skew check, and run the main job
# (rebuild + validate + publish the index on a local Ray). Re-running publishes a new build.
#   bash scripts/quickstart.sh [--movielens PATH]
source "$(dirname "$0")/env.sh"
ML_ARGS=("$@")
echo "[skewless] 1/4 preparing MovieLens -> data/movielens"
python -m examples.movielens.prepare movielens "${ML_ARGS[@]}"
echo "[skewless] 2/4 training the two-tower example, and its next version warm-started from it -> checkpoints/, packages/"
PKG=$(python -m examples.movielens.train --seed 0 | tee /dev/stderr | sed -n 's/^package: //p')
NEXT=$(python -m examples.movielens.train --seed 1 --epochs 2 --lr 5e-4 --init-from "$PKG" | tee /dev/stderr | sed -n 's/^package: //p')
echo "[skewless] 3/4 version-skew check of the family ($PKG vs $NEXT) -> registry/skew/"
python -m jobs.skew_check --packages "$PKG" "$NEXT" --data data/movielens --registry registry
# --address local: a new local Ray even if this machine runs (or once ran) a `ray start` cluster, whose
# leftover /tmp/ray/ray_current_cluster would otherwise be picked up by ray.init()
echo "[skewless] 4/4 rebuilding the index with $PKG on a local Ray -> registry/"
python -m jobs.rebuild_index --package "$PKG" --catalog data/movielens/catalog --users data/movielens/users --registry registry --address local
echo
echo "[skewless] done."
echo "  data:        $PWD/data/movielens"
echo "  packages:    $PWD/$PKG (live), $PWD/$NEXT"
echo "  skew check:  $(ls -t registry/skew/*/*.json | head -1)"
echo "  live build:  $(python -m jobs.registry --registry registry current | sed -n 's/.*"build_id": "\(.*\)".*/\1/p')  ($PWD/registry)"

# Sourced by quickstart.sh and test.sh: create .venv (once) and install the project into it.
# torch is installed first and pinned to 2.13.0: a looser spec lets pip pick a newer CUDA build (GBs).
# Set SKEWLESS_TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only torch on a GPU-less box.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[skewless] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import core, torch, ray, faiss" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[skewless] installing torch==2.13.0 and the project (ray[data,serve], faiss-cpu, numpy; dev extras)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0 ${SKEWLESS_TORCH_INDEX:+--index-url "$SKEWLESS_TORCH_INDEX"}
  .venv/bin/python -m pip install -q -e '.[dev,bench]'
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0

# Sourced by the MaxText peer scripts: a Python >= 3.12 virtual environment holding
# maxtext[tpu]==0.2.5 (jax 0.12 with libtpu, so its own ahead-of-time compile runs on a CPU
# host), created on first use outside the repository (about 3 GB, 2 minutes).
MAXTEXT_VENV=${MAXTEXT_VENV:-$HOME/.cache/cla-peers/maxtext-venv}
if [ ! -x "$MAXTEXT_VENV/bin/python" ] || ! "$MAXTEXT_VENV/bin/python" -c 'import maxtext' 2>/dev/null; then
  py312=${PY312:-}
  for candidate in python3.13 python3.12; do
    [ -n "$py312" ] && break
    found=$(command -v "$candidate" 2>/dev/null) && "$found" -c '' 2>/dev/null && py312=$found
  done
  [ -n "$py312" ] || py312=$(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python 2>/dev/null | tail -1)
  [ -x "$py312" ] || { echo "maxtext needs Python >= 3.12: set PY312=/path/to/python3.12" >&2; exit 1; }
  "$py312" -m venv "$MAXTEXT_VENV" && "$MAXTEXT_VENV/bin/pip" install -q --upgrade pip &&
    "$MAXTEXT_VENV/bin/pip" install -q "maxtext[tpu]==0.2.5" || { echo "maxtext install failed" >&2; exit 1; }
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

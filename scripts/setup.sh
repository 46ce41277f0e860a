#!/usr/bin/env bash
# Create .venv and install orch with its pinned stack, in the one order that
# works on a CPU-only machine:
#   1. torch first, pinned: an unpinned torch pulls several GB of CUDA wheels;
#   2. deepspeed without build isolation and without prebuilt ops (it is sdist
#      only, and its build needs the torch from step 1);
#   3. orch itself (editable) with the dev extras.
# Idempotent: a stamp records the pyproject.toml it installed; rerunning with
# an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.orch-installed"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setup: creating $VENV and installing the pinned stack (about 2 minutes on first run)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" "torch==2.13.0"
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed==0.19.8"
"${pip[@]}" -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)'))" >&2

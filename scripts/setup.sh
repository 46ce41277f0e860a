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
# The stack must import before the stamp says it is installed. The import's own output
# (DeepSpeed's accelerator probe warns on a machine without a GPU) stays out of the summary.
check='import torch, transformers, peft, bitsandbytes, deepspeed'
if ! "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "setup: the installed packages do not import:" >&2
  "$VENV/bin/python" -c "$check" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")))'))" >&2

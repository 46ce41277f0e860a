#!/usr/bin/env bash
# Build/download the wheels the device image lacks into .whl/ (git-ignored).
# deepspeed is sdist-only on PyPI: build a pure-Python wheel (ops JIT-compile on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .whl

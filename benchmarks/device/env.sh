# Sourced at the start of every device-tool run (see benchmarks/device/README.md).
# The device image has torch/transformers/peft but no deepspeed, bitsandbytes,
# datasets or pydantic: they travel as wheels in .whl/ (git-ignored; make them
# with benchmarks/device/make-wheels.sh) and install into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
# The image's default arch list (9.0a) breaks DeepSpeed's op builder.
export TORCH_CUDA_ARCH_LIST=9.0
# NVLink multicast can take the shared host's GPUs down: keep it off everywhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext

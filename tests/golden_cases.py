"""The golden cases: (case name, job file, overrides). Shared by tests/test_generation.py
and scripts/regen-golden.py. Paths are relative to the repo root, which is the
working directory both use; outputs are compiled in portable mode."""

from __future__ import annotations

CASES: list[tuple[str, str, list[str]]] = [
    # 1 node, 1 GPU, no ZeRO, fp32 (the CPU demo)
    ("tiny_1node_single_gpu", "jobs/tiny.yaml", ["strategy=single_gpu"]),
    # multi-node ZeRO-2, 2 nodes x 2 GPUs, gradient accumulation 2
    ("tiny_2node_zero2", "jobs/tiny.yaml",
     ["strategy=zero2", "hardware.nodes=2", "hardware.gpus_per_node=2", "training.global_batch_size=32"]),
    # 1 node ZeRO-3, bf16
    ("llama8b_1node_zero3", "jobs/llama8b_full_2x80.yaml", ["strategy=zero3"]),
    # multi-node ZeRO-3 with setup lines, partition, wandb project, epochs-based schedule
    ("llama70b_2node_zero3", "jobs/llama70b.yaml", ["strategy=zero3"]),
    # CPU offload: optimizer only, then optimizer + params (2 nodes, account, qos, extra options)
    ("llama13b_1node_offload_opt_cpu", "jobs/llama13b_full_offload.yaml", ["strategy=zero3_offload_optimizer"]),
    ("llama13b_2node_offload_all_cpu", "jobs/llama13b_full_offload.yaml",
     ["strategy=zero3_offload_all", "hardware.nodes=2", "slurm.account=proj-42", "slurm.qos=high",
      "slurm.extra_sbatch=[--exclusive, --constraint=a100&ib]"]),
    # NVMe offload: optimizer only, then optimizer + params on 2 nodes
    ("llama13b_1node_offload_opt_nvme", "jobs/llama13b_full_offload.yaml", ["strategy=zero3_offload_optimizer_nvme"]),
    ("llama13b_2node_offload_all_nvme", "jobs/llama13b_full_offload.yaml",
     ["strategy=zero3_offload_all_nvme", "hardware.nodes=2"]),
    # fp16 (loss scaling block), QLoRA on one consumer GPU
    ("llama8b_qlora_fp16_single_gpu", "jobs/llama8b_qlora_24gb.yaml", ["strategy=single_gpu", "model.dtype=fp16"]),
]

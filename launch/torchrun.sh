#!/usr/bin/env bash
# Single node, N GPUs: launch/torchrun.sh [NPROC] script.py [args...]
# NPROC defaults to every visible GPU. The NVLink-multicast guards are always set.
set -euo pipefail
# forced, never inherited: NVLink multicast can take a shared host's GPUs down
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then
  nproc="$1"; shift
else
  nproc="$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
exec torchrun --standalone --nproc-per-node "$nproc" "$@"

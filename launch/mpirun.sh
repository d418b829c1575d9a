#!/usr/bin/env bash
# Open MPI: launch/mpirun.sh NPROC script.py [args...]
# Each MPI rank maps its rank/size/local rank to torch.distributed's environment (launch/mpi_bootstrap.py)
# and then runs the script. The NVLink-multicast guards are set and exported to every rank.
set -euo pipefail
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
nproc="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
extra=()
if [[ "$(id -u)" == "0" ]]; then extra+=(--allow-run-as-root); fi
exec mpirun "${extra[@]}" -np "$nproc" --bind-to none \
  -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PATH -x PYTHONPATH \
  ${MPIRUN_ARGS:-} python3 "$here/mpi_bootstrap.py" "$@"

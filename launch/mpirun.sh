#!/usr/bin/env bash
# Open MPI: launch/mpirun.sh NPROC script.py [args...]
# Each MPI rank maps its rank/size/local rank to torch.distributed's environment (launch/mpi_bootstrap.py)
# and then runs the script. The NVLink-multicast guards are set and exported to every rank.
set -euo pipefail
# forced, never inherited: NVLink multicast can take a shared host's GPUs down
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: launch/mpirun.sh NPROC script.py [args...]" >&2; exit 2
fi
nproc="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
extra=()
if [[ "$(id -u)" == "0" ]]; then extra+=(--allow-run-as-root); fi
# Open MPI forwards no environment to remote nodes unless told: every turbo_dist / NCCL / NVSHMEM setting
# and the library paths go with -x, so all nodes pick the same transports and backends.
fwd=(-x PATH -x PYTHONPATH)
while IFS='=' read -r name _; do
  case "$name" in
    TURBO_DIST_*|NCCL_*|NVSHMEM_*|TORCH_SYMM_MEM_*|LD_LIBRARY_PATH) fwd+=(-x "$name") ;;
  esac
done < <(env)
exec mpirun "${extra[@]}" -np "$nproc" --bind-to none "${fwd[@]}" \
  ${MPIRUN_ARGS:-} python3 "$here/mpi_bootstrap.py" "$@"

"""Run a torch.distributed script under mpirun: map MPI rank/size/local rank to the torchrun environment.

    mpirun -np 4 python3 launch/mpi_bootstrap.py script.py [args...]

Rank 0's hostname and a free port are broadcast over MPI and become MASTER_ADDR/MASTER_PORT.
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE are set from MPI's view (Open MPI's node-local
communicator), then the script runs as __main__ with the NVLink-multicast guards set.
"""
import os
import runpy
import socket
import sys

SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def torch_env_from_mpi(comm=None):
    """Return the torchrun-style environment for this MPI rank (also used by tests)."""
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    addr, port = None, None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        if os.environ.get("MASTER_PORT"):
            port = int(os.environ["MASTER_PORT"])
        else:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
    addr, port = comm.bcast((addr, port), root=0)
    env = {
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "RANK": str(comm.Get_rank()),
        "WORLD_SIZE": str(comm.Get_size()),
        "LOCAL_RANK": str(local.Get_rank()),
        "LOCAL_WORLD_SIZE": str(local.Get_size()),
    }
    local.Free()
    return env


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: mpirun -np N python3 launch/mpi_bootstrap.py script.py [args...]")
    os.environ.update(SAFETY_ENV)  # forced, whatever mpirun forwarded
    os.environ.update(torch_env_from_mpi())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

"""turbo_dist.shmem: the NVSHMEM/rocSHMEM binding (turbo_dist._shmem) and the runtime's `nvshmem` backend.

CPU: the Python layer without the native module (clear errors, unique-id broadcast over gloo).
GPU: init over torch.distributed (and over mpirun + mpi4py), symmetric alloc, peer pointers,
put/get from a Triton kernel, barrier, teams, the runtime's symmetric buffers on NVSHMEM.

Run as a script (`--mpi-child`), this file is the rank body of the mpirun test.
"""
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from turbo_dist import shmem
from turbo_dist.runtime.config import SAFETY_ENV
from turbo_dist.testing import run_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _gpu_world_sizes(*sizes):
    # Every GPU test here is multi-process (NCCL, one GPU per rank); world size 1 still runs the
    # whole SHMEM path (a PE talking to itself) on a one-GPU machine.
    return [pytest.param(n, marks=[pytest.mark.dist, pytest.mark.gpu(min_gpus=n)]) for n in sizes]


def _native_on_this_machine():
    return shmem.is_available() and torch.cuda.is_available()


# The GPU tests that initialise SHMEM share ranks of their own (SHMEM stays up in a pooled rank),
# and the runtime there picks the nvshmem backend.
_SHMEM_POOL_ENV = {"TURBO_DIST_SHMEM": "nvshmem"}

needs_native = pytest.mark.skipif(not shmem.is_available(), reason="turbo_dist._shmem is not built (no NVSHMEM)")


# ------------------------------------------------------------------------------------------- CPU


def test_error_when_native_missing():
    if shmem.is_available():
        pytest.skip("turbo_dist._shmem is built here")
    with pytest.raises(ImportError, match="TURBO_DIST_SHMEM=torch") as info:
        shmem.backend()
    assert "nvidia-nvshmem-cu13" in str(info.value) and "not built" in str(info.value)
    assert shmem.is_initialized() is False


def test_uninitialised_calls_raise():
    if shmem.is_initialized():
        pytest.skip("SHMEM is initialised in this process")
    for call in (shmem.my_pe, shmem.n_pes, shmem.barrier_all, lambda: shmem.malloc(64)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()


def test_safety_env_forced():
    old = os.environ.get("NVSHMEM_DISABLE_NVLS")
    os.environ["NVSHMEM_DISABLE_NVLS"] = "0"
    try:
        shmem._apply_env()
        assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    finally:
        if old is None:
            os.environ.pop("NVSHMEM_DISABLE_NVLS", None)
        else:
            os.environ["NVSHMEM_DISABLE_NVLS"] = old


def test_empty_validates_before_allocating():
    with pytest.raises(ValueError, match="negative dimension"):
        shmem.empty((4, -1), torch.float32)
    with pytest.raises(TypeError, match="torch.dtype"):
        shmem.empty((4,), "float32")


def _cpu_bootstrap(rank, world_size):
    # The unique id is rank 0's bytes on every rank, whatever the others would have generated.
    uid = shmem._broadcast_unique_id(dist.group.WORLD, torch.device("cpu"), lambda: os.urandom(128), 128)
    errors = []
    try:
        shmem.init()
    except (ImportError, RuntimeError) as exc:
        errors.append(str(exc))
    from turbo_dist.runtime import symm

    try:
        symm.allocate("nvshmem", "t", 4096, dist.group.WORLD, torch.device("cpu"), rank, world_size)
    except (ImportError, RuntimeError) as exc:
        errors.append(str(exc))
    return uid, errors


@pytest.mark.dist
def test_bootstrap_and_errors_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) test")
    results = run_distributed(_cpu_bootstrap, 2)
    uids = [uid for uid, _ in results]
    assert len(uids[0]) == 128 and uids[0] == uids[1]
    for _, errors in results:
        assert len(errors) == 2, errors  # SHMEM never initialises on a CPU machine
        assert all("TURBO_DIST_SHMEM=torch" in e for e in errors), errors


def _cpu_failed_id(rank, world_size):
    # rank 0 failing to create an id must reach every rank (None), not leave them waiting in the broadcast
    return shmem._broadcast_unique_id(dist.group.WORLD, torch.device("cpu"), lambda: None, 128)


@pytest.mark.dist
def test_unique_id_failure_reaches_every_rank():
    if torch.cuda.is_available():
        pytest.skip("CPU (gloo) test")
    assert run_distributed(_cpu_failed_id, 2) == [None, None]


class _FailingNative:
    """Stands in for turbo_dist._shmem where the library refuses to come up."""

    BACKEND = "nvshmem"

    def get_unique_id(self):
        raise RuntimeError("nvshmem get_uniqueid failed: NVSHMEMX_ERROR_INTERNAL (status 7)")

    def init(self, uid, rank, nranks):
        raise RuntimeError("nvshmem initialisation failed: NVSHMEMX_ERROR_INTERNAL (status 7)")


def test_init_failure_says_why_and_how_to_fall_back():
    native = _FailingNative()
    with pytest.raises(RuntimeError) as info:
        shmem._init_native(native, b"\0" * 128, 1, 2, torch.device("cpu"), "MPI")
    msg = str(info.value)
    for part in ("NVSHMEMX_ERROR_INTERNAL", "rank 1 of 2", "via MPI", "NVSHMEM_DEBUG=INFO", "TURBO_DIST_SHMEM=torch"):
        assert part in msg, (part, msg)
    assert not shmem.is_initialized()
    uid, err = shmem._make_unique_id(native, 0, 2, torch.device("cpu"))
    assert uid is None and "creating the unique id" in str(err) and "TURBO_DIST_SHMEM=torch" in str(err)


def _run_setup_py(monkeypatch, env):
    """Execute setup.py with setuptools.setup captured: (setup kwargs, setup.py's globals)."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    for key in ("NVSHMEM_HOME", "CUDA_HOME", "CUDA_PATH", "ROCSHMEM_HOME", "TURBO_DIST_SKIP_NATIVE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    g = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="turbo_dist_setup_under_test")
    return captured, g


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_setup_skip_native(monkeypatch):
    kw, g = _run_setup_py(monkeypatch, {"TURBO_DIST_SKIP_NATIVE": "1"})
    assert kw["ext_modules"] == []
    assert kw["cmdclass"]["build_ext"] is g["OptionalBuildExt"]


def test_setup_builds_module_when_nvshmem_found(monkeypatch, tmp_path):
    nv, cuda = tmp_path / "nvshmem", tmp_path / "cuda"
    _touch(str(nv / "include" / "nvshmem_host.h"))
    _touch(str(nv / "lib" / "libnvshmem_host.so.3"))
    for header in ("cuda.h", "cuda_runtime.h"):
        _touch(str(cuda / "include" / header))
    os.makedirs(cuda / "include" / "cccl")
    kw, g = _run_setup_py(monkeypatch, {"NVSHMEM_HOME": str(nv), "CUDA_HOME": str(cuda)})
    if g["_pybind11_include"]() is None:
        pytest.skip("no pybind11 headers here")
    # where cuBLASLt is found too (the GPU image) turbo_dist._cublaslt is listed beside it
    (ext,) = [e for e in kw["ext_modules"] if e.name != "turbo_dist._cublaslt"]
    assert ext.name == "turbo_dist._shmem" and ext.sources == [os.path.join("csrc", "shmem", "shmem.cpp")]
    assert ("TURBO_DIST_NVSHMEM", "1") in ext.define_macros
    for inc in (nv / "include", cuda / "include", cuda / "include" / "cccl"):
        assert str(inc) in ext.include_dirs
    assert ext.extra_link_args == [str(nv / "lib" / "libnvshmem_host.so.3")]
    assert ext.runtime_library_dirs == [str(nv / "lib")]
    assert "-std=c++17" in ext.extra_compile_args


def test_setup_without_nvshmem_builds_nothing(monkeypatch, tmp_path):
    kw, g = _run_setup_py(monkeypatch, {"NVSHMEM_HOME": str(tmp_path / "absent")})
    if g["_find_nvshmem"]() is not None or os.environ.get("ROCSHMEM_HOME"):
        pytest.skip("NVSHMEM is installed here")
    assert kw["ext_modules"] == []


def test_setup_build_failure_is_not_fatal(monkeypatch, capsys):
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    _, g = _run_setup_py(monkeypatch, {"TURBO_DIST_SKIP_NATIVE": "1"})

    def broken(self, ext):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(build_ext, "build_extension", broken)
    cmd = g["OptionalBuildExt"](Distribution())
    cmd.ensure_finalized()
    cmd.build_extension(Extension("turbo_dist._shmem", ["x.cpp"]))  # must not raise
    assert "could not build turbo_dist._shmem (compiler exploded)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- GPU


@triton.jit
def _put_kernel(peer_ptrs, pe, src, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dst = tl.load(peer_ptrs + pe).to(tl.pointer_type(tl.float32))
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _get_kernel(peer_ptrs, pe, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = tl.load(peer_ptrs + pe).to(tl.pointer_type(tl.float32))
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _payload(rank, n, device):
    return torch.arange(n, dtype=torch.float32, device=device) + 1000.0 * (rank + 1)


def _put_get_roundtrip(rank, world_size, n):
    shmem.init()
    dev = shmem.device()
    assert (shmem.my_pe(), shmem.n_pes()) == (rank, world_size)
    x = shmem.empty((n,), torch.float32)
    x.fill_(-1.0)
    shmem.barrier_all()

    ptrs = [shmem.ptr(x, pe) for pe in range(world_size)]
    assert ptrs[rank] == x.data_ptr()
    assert all(p is not None for p in ptrs), "all PEs of one node must be P2P-reachable"
    peer_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=dev)

    # put: our payload into the next PE's x
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    mine = _payload(rank, n, dev)
    grid = (triton.cdiv(n, 256),)
    _put_kernel[grid](peer_ptrs, nxt, mine, n, BLOCK=256)
    shmem.barrier_all()
    put_ok = torch.equal(x, _payload(prv, n, dev))

    # get: the next PE's x holds what we put there
    got = torch.zeros(n, dtype=torch.float32, device=dev)
    _get_kernel[grid](peer_ptrs, nxt, got, n, BLOCK=256)
    torch.cuda.synchronize()
    get_ok = torch.equal(got, mine)
    view_ok = torch.equal(shmem.peer_tensor(x, nxt), mine)  # torch copy through the peer mapping

    # stream-ordered barrier and quiet do not throw and keep ordering
    x.fill_(float(rank))
    shmem.barrier_all_on_stream()
    shmem.quiet(torch.cuda.current_stream())
    torch.cuda.synchronize()
    shmem.barrier_all()
    prev_ok = torch.equal(shmem.peer_tensor(x, prv), torch.full((n,), float(prv), device=dev))

    # teams: one node, so the shared team is everyone; a forced 1 rank per node splits into singletons
    shared = shmem.team_shared()
    team_ok = shared is not None and shmem.team_n_pes(shared) == world_size and shmem.team_my_pe(shared) == rank
    for k in range(1, world_size + 1):  # k ranks per "node": PEs [n*k, (n+1)*k)
        if world_size % k:
            continue
        team = shmem.node_team(k)
        team_ok = team_ok and team is not None and shmem.team_n_pes(team) == k
        team_ok = team_ok and shmem.team_my_pe(team) == rank % k
        team_ok = team_ok and shmem.team_translate_pe(team, 0, shmem.team_world()) == rank - rank % k

    shmem.free(x)
    shmem.barrier_all()
    with pytest.raises(ValueError, match="not inside a live symmetric allocation"):
        shmem.peer_tensor(x, nxt)
    return put_ok, get_ok, view_ok, prev_ok, team_ok, shmem.backend(), shmem.version()


@needs_native
@pytest.mark.parametrize("world_size", _gpu_world_sizes(1, 2, 4))
def test_put_get_barrier(world_size):
    results = run_distributed(_put_get_roundtrip, world_size, args=(10_000,), env=_SHMEM_POOL_ENV)
    for rank, (put_ok, get_ok, view_ok, prev_ok, team_ok, backend, version) in enumerate(results):
        assert backend in ("nvshmem", "rocshmem")
        assert (put_ok, get_ok, view_ok, prev_ok, team_ok) == (True,) * 5, (rank, results[rank])


def _runtime_on_nvshmem(rank, world_size):
    import turbo_dist

    rt = turbo_dist.get_runtime()
    assert rt.shmem_backend == "nvshmem"
    buf = rt.symm_buffer("shmem_test", 3000)
    assert buf.has_peer_access and buf.nbytes >= 3000
    local = buf.local(torch.int32, (256,))
    zero_ok = bool((local == 0).all())  # the runtime hands out zeroed buffers
    ptrs = buf.peer_ptrs.tolist()
    ptr_ok = ptrs[rank] == local.data_ptr() and all(p != 0 for p in ptrs)
    nxt = (rank + 1) % world_size
    buf.peer(nxt, torch.int32, (256,)).fill_(rank + 7)
    torch.cuda.synchronize()
    rt.barrier()
    filled_ok = torch.equal(local.cpu(), torch.full((256,), (rank - 1) % world_size + 7, dtype=torch.int32))
    bigger = rt.symm_buffer("shmem_test", 1 << 20)  # growth: a new collective allocation
    grow_ok = bigger.nbytes >= (1 << 20) and bool((bigger.local() == 0).all())
    return zero_ok, ptr_ok, filled_ok, grow_ok


@needs_native
@pytest.mark.parametrize("world_size", _gpu_world_sizes(1, 2, 4))
def test_runtime_symm_buffer_on_nvshmem(world_size):
    results = run_distributed(_runtime_on_nvshmem, world_size, env=_SHMEM_POOL_ENV)
    assert results == [(True, True, True, True)] * world_size


def _finalize(rank, world_size):
    shmem.init()
    x = shmem.malloc(1 << 16)
    x.zero_()
    shmem.barrier_all()
    shmem.finalize()
    after = shmem.is_initialized()
    try:
        shmem.my_pe()
        raised = False
    except RuntimeError:
        raised = True
    return after, raised


@needs_native
@pytest.mark.parametrize("world_size", _gpu_world_sizes(1))
def test_finalize(world_size):
    # A pool of its own (env), since SHMEM cannot come back in a finalized process.
    results = run_distributed(_finalize, world_size, env={"TURBO_DIST_TEST_SHMEM_POOL": "finalize"})
    assert results == [(False, True)] * world_size


@needs_native
@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_init_over_mpirun():
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed")
    nproc = min(torch.cuda.device_count(), 2)
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=60)
    open_mpi = "open mpi" in (version.stdout + version.stderr).lower()
    cmd = ["mpirun", "-np", str(nproc)]
    if open_mpi:
        cmd += ["--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        for key, value in SAFETY_ENV.items():  # also for ranks on other hosts
            cmd += ["-x", f"{key}={value}"]
    else:  # MPICH / Intel MPI (hydra)
        for key, value in SAFETY_ENV.items():
            cmd += ["-genv", key, value]
    cmd += [sys.executable, os.path.join(ROOT, "launch", "mpi_bootstrap.py"), os.path.abspath(__file__), "--mpi-child"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("SHMEM_MPI_OK") == nproc, out[-4000:]


_FAILING_INIT = """
import os, torch.distributed as dist
from turbo_dist import shmem
from turbo_dist.testing import free_port
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
try:
    shmem.init()
    print("UNEXPECTED_INIT_OK")
except RuntimeError as exc:
    print("INIT_ERROR:", exc)
"""


@needs_native
@pytest.mark.dist
@pytest.mark.gpu(min_gpus=1)
def test_init_failure_on_gpu_says_how_to_fall_back():
    # A bootstrap interface that does not exist makes NVSHMEM fail for real (cleanly: a missing bootstrap
    # plugin aborts NVSHMEM 3.4 with a double free); the error must say why and name the fallback.
    env = dict(os.environ, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="td_no_such_if0",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _FAILING_INIT], env=env, capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert "INIT_ERROR:" in out and "TURBO_DIST_SHMEM=torch" in out, out[-4000:]
    assert "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME" in out, out[-4000:]


def _mpi_child():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    shmem.init_mpi()
    rank, size = comm.Get_rank(), comm.Get_size()
    assert (shmem.my_pe(), shmem.n_pes()) == (rank, size)
    x = shmem.empty((1024,), torch.float32)
    x.fill_(-1.0)
    shmem.barrier_all()
    nxt = (rank + 1) % size
    shmem.peer_tensor(x, nxt).copy_(_payload(rank, 1024, shmem.device()))
    shmem.barrier_all()
    assert torch.equal(x, _payload((rank - 1) % size, 1024, shmem.device()))
    shmem.free(x)
    shmem.finalize()
    print(f"SHMEM_MPI_OK rank {rank}", flush=True)


if __name__ == "__main__" and "--mpi-child" in sys.argv:
    _mpi_child()


def test_nvshmem_backend_refuses_a_group_of_other_processes(monkeypatch):
    """The same PE index and count are not enough: a group of other processes (ranks [0, 2] after SHMEM came up
    over [0, 1]) would map process 1's memory as its peer. Refused before anything is allocated."""
    import torch.distributed as dist

    from turbo_dist import shmem as shmem_mod
    from turbo_dist.runtime import shmem_backend

    monkeypatch.setattr(shmem_mod, "is_initialized", lambda: True)
    monkeypatch.setattr(shmem_mod, "my_pe", lambda: 0)
    monkeypatch.setattr(shmem_mod, "n_pes", lambda: 2)
    monkeypatch.setattr(shmem_mod, "members", lambda: (0, 1))
    monkeypatch.setattr(shmem_mod, "malloc", lambda n: pytest.fail("allocated for the wrong group"))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 2])
    with pytest.raises(NotImplementedError, match="serves only the group SHMEM was initialised on"):
        shmem_backend.symmetric_buffer(64, object(), "cpu")


def test_ptr_refuses_addresses_outside_the_heap(monkeypatch):
    """nvshmem_ptr of a non-symmetric address is undefined behaviour: refused before the native call."""
    from turbo_dist import shmem as shmem_mod

    native = type("Native", (), {"ptr": staticmethod(lambda addr, pe: pytest.fail("native ptr reached"))})
    monkeypatch.setattr(shmem_mod, "is_initialized", lambda: True)
    monkeypatch.setattr(shmem_mod, "_native", native)
    monkeypatch.setitem(shmem_mod._STATE, "nranks", 2)
    with pytest.raises(ValueError, match="not inside a live symmetric allocation"):
        shmem_mod.ptr(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="not inside a live symmetric allocation"):
        shmem_mod.ptr(0x1000, 1)

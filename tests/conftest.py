"""pytest options and markers: `--dist-only` runs only the multi-rank tests (marker `dist`);
tests marked `gpu` skip cleanly where CUDA is missing.

Shared-GPU test mode (TURBO_DIST_TEST_SHARE_GPU=1, see turbo_dist.testing): on a machine with fewer
GPUs than a test's ranks, the multi-rank tests of SHARE_GPU_MODULES run their ranks over gloo on
shared GPUs instead of skipping. Everywhere else the variable has no effect.
"""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from turbo_dist.runtime.config import SHARE_GPU_VAR, apply_safety_env, share_gpu_mode  # noqa: E402

apply_safety_env()  # every process this test session spawns inherits the NVLink-multicast guards

# Modules whose multi-rank GPU tests run on shared GPUs (gloo control plane, CUDA tensors, torch symmetric
# memory over CUDA IPC; collectives gloo cannot run on CUDA tensors are staged through host memory). Not
# test_shmem (NVSHMEM wants one PE per GPU). test_moe_low_latency (its triton path needs only peer pointers and
# barriers), test_cp and test_varlen_attention (cp/_comm stages its collectives and ring shifts through host
# memory) ran in this mode on one H200 on 2026-12-02 (third session); test_moe and test_moe_internode since
# (tests/GPU_RUNS.md).
SHARE_GPU_MODULES = ("test_runtime", "test_moe_nvlink", "test_moe_low_latency", "test_tp", "test_share_gpu",
                     "test_cp", "test_cp_ring_flash_attn", "test_varlen_attention", "test_moe", "test_moe_internode")


def _sharing():
    return torch.cuda.is_available() and share_gpu_mode()


def pytest_addoption(parser):
    parser.addoption("--dist-only", action="store_true", default=False,
                     help="run only the multi-rank tests (marker 'dist'), on GPUs with NCCL when present")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_gpu: a world size with more ranks than GPUs (shared-GPU test mode)")


def _module(item):
    return os.path.splitext(os.path.basename(str(getattr(item, "path", None) or item.fspath)))[0]


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if has_cuda else 0
    sharing = _sharing()
    dist_only = config.getoption("--dist-only")
    selected, deselected = [], []
    for item in items:
        if dist_only and item.get_closest_marker("dist") is None:
            deselected.append(item)
            continue
        may_share = sharing and item.get_closest_marker("dist") is not None and _module(item) in SHARE_GPU_MODULES
        shared = item.get_closest_marker("shared_gpu")
        if shared is not None and not may_share:
            need = shared.kwargs.get("world_size", "more")
            item.add_marker(pytest.mark.skip(reason=f"needs {need} GPUs, found {n_gpus} ({SHARE_GPU_VAR}=1 "
                                                    "covers only conftest.SHARE_GPU_MODULES)"))
        gpu = item.get_closest_marker("gpu")
        if gpu is not None:
            need = gpu.kwargs.get("min_gpus", 1)
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
            elif n_gpus < need and not may_share:
                item.add_marker(pytest.mark.skip(reason=f"needs {need} GPUs, found {n_gpus}"))
        selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(autouse=True)
def _share_gpu_only_where_supported(request, monkeypatch):
    # Outside SHARE_GPU_MODULES the variable must change nothing: run_distributed then never shares.
    if _sharing() and _module(request.node) not in SHARE_GPU_MODULES:
        monkeypatch.setenv(SHARE_GPU_VAR, "0")
    yield


def world_sizes_for_device(*sizes):
    """World sizes a dist test can run here: all on CPU (gloo); those with a GPU per rank on CUDA.

    With TURBO_DIST_TEST_SHARE_GPU=1 on CUDA, the sizes without a GPU per rank are returned too, marked
    `shared_gpu`: they run on shared GPUs in SHARE_GPU_MODULES and skip elsewhere.
    """
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if _sharing():
            return [s if s <= n else pytest.param(s, marks=pytest.mark.shared_gpu(world_size=s)) for s in sizes]
        # sizes past the GPU count are reported as skipped (with the reason), not dropped from the count
        return [s if s <= n else pytest.param(s, marks=pytest.mark.skip(reason=f"needs {s} GPUs, found {n}"))
                for s in sizes]
    return list(sizes)

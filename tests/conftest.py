"""pytest options and markers: `--dist-only` runs only the multi-rank tests (marker `dist`);
tests marked `gpu` skip cleanly where CUDA is missing."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from turbo_dist.runtime.config import apply_safety_env  # noqa: E402

apply_safety_env()  # every process this test session spawns inherits the NVLink-multicast guards


def pytest_addoption(parser):
    parser.addoption("--dist-only", action="store_true", default=False,
                     help="run only the multi-rank tests (marker 'dist'), on GPUs with NCCL when present")


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if has_cuda else 0
    dist_only = config.getoption("--dist-only")
    selected, deselected = [], []
    for item in items:
        if dist_only and item.get_closest_marker("dist") is None:
            deselected.append(item)
            continue
        gpu = item.get_closest_marker("gpu")
        if gpu is not None:
            need = gpu.kwargs.get("min_gpus", 1)
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
            elif n_gpus < need:
                item.add_marker(pytest.mark.skip(reason=f"needs {need} GPUs, found {n_gpus}"))
        selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def world_sizes_for_device(*sizes):
    """World sizes a dist test can run here: all on CPU (gloo); those with a GPU per rank on CUDA."""
    import torch

    if torch.cuda.is_available():
        return [s for s in sizes if s <= torch.cuda.device_count()] or [pytest.param(sizes[0], marks=pytest.mark.skip(
            reason=f"needs {sizes[0]} GPUs"))]
    return list(sizes)

"""Helpers shared by the multi-rank tests (importable from rank processes: tests/ is on sys.path)."""
import os

import torch
import torch.distributed as dist

from turbo_dist.runtime.config import share_gpu_mode


def rank_device():
    """The device a rank computes on: its GPU under NCCL or in the shared-GPU test mode (gloo with
    TURBO_DIST_TEST_SHARE_GPU=1, set by run_distributed), the CPU under plain gloo. Matches Runtime.device."""
    if dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        if "nccl" in backend or ("gloo" in backend and share_gpu_mode()):
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_gpu():
    return rank_device().type == "cuda"


def seeded(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g

"""Helpers shared by the multi-rank tests (importable from rank processes: tests/ is on sys.path)."""
import os

import torch
import torch.distributed as dist


def rank_device():
    """The device a rank computes on: its GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_gpu():
    return rank_device().type == "cuda"


def seeded(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g

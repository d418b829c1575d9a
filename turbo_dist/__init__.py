"""turbo_dist: overlap communication with computation in distributed (MoE) training.

Submodules: `runtime` (per-group resources), `ops` (GEMM, grouped GEMM, FP8, attention),
`moe` (DeepEP-compatible dispatch/combine), `tp` (async tensor parallelism),
`cp` (context-parallel attention), `testing` (multi-process test harness).
"""
import importlib

from .runtime import EventOverlap, Runtime, destroy_all, get_runtime

__version__ = "0.1.0"
__all__ = ["get_runtime", "destroy_all", "Runtime", "EventOverlap", "ops", "moe", "tp", "cp", "testing"]

_SUBMODULES = {"ops", "moe", "tp", "cp", "testing", "kernels", "integrations"}


def __getattr__(name):
    # Feature modules import lazily so `import turbo_dist` stays light.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'turbo_dist' has no attribute {name!r}")

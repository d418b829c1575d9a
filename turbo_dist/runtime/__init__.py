"""Process-group runtime: symmetric buffers, communication streams, events, topology."""
from .config import SAFETY_ENV, apply_safety_env
from .events import EventOverlap
from .runtime import Runtime, destroy_all, get_runtime
from .symm import SymmBuffer

__all__ = ["Runtime", "get_runtime", "destroy_all", "EventOverlap", "SymmBuffer", "SAFETY_ENV", "apply_safety_env"]

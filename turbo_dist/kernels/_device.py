"""Small pieces every Triton kernel module shares: whether kernels run in the interpreter, and the
GPU's nanosecond clock (for bounded peer waits)."""
import triton
import triton.language as tl

from ..runtime.config import getenv


def interpreting():
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return getenv("TRITON_INTERPRET") == "1"


@triton.jit
def globaltimer_ns():
    """%globaltimer in ns (compiled GPU kernels only: the interpreter has no clock)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)

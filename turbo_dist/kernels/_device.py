"""Small pieces every Triton kernel module shares: whether kernels run in the interpreter, and the
GPU's nanosecond clock (for bounded peer waits)."""
import os

import triton
import triton.language as tl


def interpreting():
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def globaltimer_ns():
    """%globaltimer in ns (compiled GPU kernels only: the interpreter has no clock)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)

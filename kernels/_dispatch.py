"""When to use the Triton kernels: on CUDA tensors, when triton imports, unless switched off.

Kept apart from the kernel modules so that both can share one switch (`set_enabled`) without
import cycles. Nothing here needs triton: the package imports, and runs its PyTorch references,
where triton is not installed (macOS, CPU-only environments).
"""
import os

try:
    import triton  # noqa: F401  (only its presence matters here)
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton picks its CPU interpreter when a kernel is defined, from this variable; tests set it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_enabled = True


def set_enabled(flag: bool) -> None:
    """Global switch: set_enabled(False) makes every public op run its plain-PyTorch reference
    (the training scripts' --kernels=0). Call it before torch.compile traces the model: compiled
    graphs are guarded on this flag and recompile if it changes."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


def use_triton(t, allow_interpreter: bool = False) -> bool:
    """True when the public ops would run Triton kernels on tensor `t`: enabled, triton importable,
    and `t` on CUDA. CPU tensors take the reference path, unless the caller passes
    allow_interpreter=True while TRITON_INTERPRET=1 is set (tests and the CPU bench do)."""
    if not (_enabled and HAS_TRITON):
        return False
    return t.is_cuda or (allow_interpreter and INTERPRET and t.device.type == "cpu")

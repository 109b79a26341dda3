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

# Off until switched on: the one default is the training scripts' --kernels flag (0), which main() applies.
_enabled = False
# Triton's autotuner may pick different tile configs in different processes; each config sums in its
# own order, so DDP replicas whose Muon updates ran through different configs would slowly drift apart.
_pinned = False


def set_enabled(flag: bool) -> None:
    """Global switch: set_enabled(True) makes the public ops run Triton (the training scripts'
    --kernels=1); off, they run their plain-PyTorch reference. Call it before torch.compile traces
    the model: compiled graphs are guarded on this flag and recompile if it changes."""
    global _enabled
    _enabled = bool(flag)


def pin_configs(flag: bool) -> None:
    """pin_configs(True): every autotuned kernel uses one fixed config instead of autotuning, so
    every process computes bit-identical results (the training scripts set it with several ranks)."""
    global _pinned
    _pinned = bool(flag)


def configs_pinned() -> bool:
    return _pinned


def is_enabled() -> bool:
    return _enabled


def use_triton(t, allow_interpreter: bool = True) -> bool:
    """True when the public ops would run Triton kernels on tensor `t`: enabled, triton importable,
    and `t` on CUDA, or on CPU under TRITON_INTERPRET=1 (Triton's interpreter stands in for the GPU:
    that is how the tests run the kernels end to end). allow_interpreter=False keeps CPU tensors on
    the reference even then."""
    if not (_enabled and HAS_TRITON):
        return False
    return t.is_cuda or (allow_interpreter and INTERPRET and t.device.type == "cpu")

"""Shared Triton kernels for the GPT-2 speedrun scripts, each with a plain-PyTorch reference.

Public ops dispatch to Triton on CUDA tensors (when triton imports and set_enabled(True); off by
default, as the scripts' --kernels) and to the reference otherwise; see README.md in this folder.
"""
from ._dispatch import HAS_TRITON, configs_pinned, is_enabled, pin_configs, set_enabled, use_triton
from .cross_entropy import (
    linear_softcap_cross_entropy,
    linear_softcap_cross_entropy_reference,
    linear_softcap_cross_entropy_triton,
    softcap_cross_entropy,
    softcap_cross_entropy_reference,
    softcap_cross_entropy_triton,
)
from .newton_schulz import xxt, xxt_reference, xxt_triton

__all__ = [
    "HAS_TRITON", "configs_pinned", "is_enabled", "pin_configs", "set_enabled", "use_triton",
    "linear_softcap_cross_entropy", "linear_softcap_cross_entropy_reference",
    "linear_softcap_cross_entropy_triton",
    "softcap_cross_entropy", "softcap_cross_entropy_reference", "softcap_cross_entropy_triton",
    "xxt", "xxt_reference", "xxt_triton",
]

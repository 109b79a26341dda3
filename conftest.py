"""pytest set-up shared by test_causality.py and tests/: runs before any test module imports torch or kernels."""
import os
from pathlib import Path

# Without a GPU, the Triton kernels run in Triton's CPU interpreter under test; it is chosen when a kernel is
# defined, so it must be set before kernels/ is imported. With one, they run compiled (pytest -m gpu).
import torch  # noqa: E402  (importing torch is fine; kernels/ must not be imported yet)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared/data holds the GPT-2 BPE files, so tiktoken works offline (see README, "Tests").
_TIKTOKEN_CACHE = Path(__file__).resolve().parent.parent / "shared" / "data" / "tiktoken_cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))

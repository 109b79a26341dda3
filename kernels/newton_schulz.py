"""xxt(X) = X @ X.mT for Muon's Newton-Schulz iteration.

Each Newton-Schulz step forms A = X @ X.mT and A @ A (= xxt(A), A being symmetric). Both products
are symmetric, so the Triton kernel computes only the output tiles on or above the diagonal
(tile row i <= tile column j) and writes each of them twice, at (i, j) and transposed at (j, i):
about half the FLOPs of a full matmul. Every element below the diagonal is a copy of its mirror,
so the output is exactly symmetric. Inputs bf16 (what Muon uses) or fp16/fp32; fp32 accumulation.
"""
import torch
from torch import Tensor

from ._dispatch import HAS_TRITON, INTERPRET, configs_pinned, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def xxt_reference(x: Tensor) -> Tensor:
    return x @ x.mT


if HAS_TRITON:

    @triton.jit
    def _xxt_kernel(
        x_ptr, out_ptr, M, K,
        stride_xb, stride_xm, stride_xk, stride_ob, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST_OPERANDS: tl.constexpr,
    ):
        tile_i = tl.program_id(0)
        tile_j = tl.program_id(1)
        if tile_i > tile_j:  # below the diagonal: written, transposed, by program (j, i)
            return
        batch = tl.program_id(2).to(tl.int64)
        x_ptr += batch * stride_xb
        out_ptr += batch * stride_ob
        rows_i = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = tile_j * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        # a: X[rows_i, k-block] (BLOCK_M, BLOCK_K); b: X[rows_j, k-block] read as its transpose.
        a_ptrs = x_ptr + rows_i[:, None] * stride_xm + offs_k[None, :] * stride_xk
        b_ptrs = x_ptr + offs_k[:, None] * stride_xk + rows_j[None, :] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_left = K - k
            a = tl.load(a_ptrs, mask=(rows_i[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (rows_j[None, :] < M), other=0.0)
            if UPCAST_OPERANDS:  # same result: bf16/fp16 products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_xk
        tile = acc.to(out_ptr.dtype.element_ty)
        in_bounds = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        # Upper part (row <= col) at (i, j); the strictly lower part gets the same values mirrored.
        # On the diagonal tile this splits it by element, so no location is written twice.
        tl.store(out_ptr + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on, tile,
                 mask=in_bounds & (rows_i[:, None] <= rows_j[None, :]))
        tl.store(out_ptr + rows_j[None, :] * stride_om + rows_i[:, None] * stride_on, tile,
                 mask=in_bounds & (rows_i[:, None] < rows_j[None, :]))

    # On a GPU the tile shape is autotuned per (M, K, dtype); the interpreter uses one small tile.
    # the first autotune candidate, used as it is when configs are pinned (kernels.pin_configs)
    PINNED_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4)
    _xxt_kernel_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 4),
                                 (64, 32, 4, 5), (128, 128, 8, 3)]
        ],
        key=["M", "K"],
    )(_xxt_kernel)


@torch.library.custom_op("kernels::xxt", mutates_args=())
def _xxt_op(x: Tensor) -> Tensor:
    """x (B, M, K) -> (B, M, M) = x @ x.mT, computed upper-triangle tiles only."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use xxt_reference")
    n_batch, m, k = x.shape
    out = torch.empty(n_batch, m, m, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # fp32 inputs multiply in TF32 only where torch would (torch.backends.cuda.matmul.allow_tf32).
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = (x, out, m, k, *x.stride(), *out.stride())
    if INTERPRET or not x.is_cuda:
        # Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits, so
        # they go in as fp32 there.
        block_m = 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(m, block_m), n_batch)
        _xxt_kernel[grid](*args, BLOCK_M=block_m, BLOCK_K=32, INPUT_PRECISION=precision,
                          UPCAST_OPERANDS=True)
    elif configs_pinned():  # several ranks: one fixed tile config, so every rank's update is identical
        grid = (triton.cdiv(m, PINNED_CONFIG["BLOCK_M"]), triton.cdiv(m, PINNED_CONFIG["BLOCK_M"]), n_batch)
        _xxt_kernel[grid](*args, INPUT_PRECISION=precision, UPCAST_OPERANDS=False, **PINNED_CONFIG)
    else:
        def grid(meta):
            tiles = triton.cdiv(m, meta["BLOCK_M"])
            return (tiles, tiles, n_batch)
        _xxt_kernel_autotuned[grid](*args, INPUT_PRECISION=precision, UPCAST_OPERANDS=False)
    return out


@_xxt_op.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[1])


def _xxt_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _xxt_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return (grad_out + grad_out.mT) @ x  # d/dX <G, X X^T> = (G + G^T) X


_xxt_op.register_autograd(_xxt_backward, setup_context=_xxt_setup_context)


def xxt_triton(x: Tensor) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"xxt needs a (..., m, n) tensor, got shape {tuple(x.shape)}")
    m, k = x.shape[-2:]
    out = _xxt_op(x.reshape(-1, m, k))
    return out.view(*x.shape[:-2], m, m)


def xxt(x: Tensor) -> Tensor:
    """X @ X.mT for X of shape (m, n) or (b, m, n): symmetric (..., m, m), in X's dtype."""
    if use_triton(x):
        return xxt_triton(x)
    return xxt_reference(x)

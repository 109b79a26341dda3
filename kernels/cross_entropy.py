"""Softcapped cross-entropy: loss = CE(cap * tanh((logits + offset) / width), targets), as used by
the GPT-2 head.

offset defaults to 0 and width to cap: the classic softcap, cap * tanh(logits / cap). The
modded-nanogpt 2025-12-26 record's 23 * sigmoid((logits + 5) / 7.5) is cap=11.5, offset=5, width=15:
23 * sigmoid(u / 7.5) = 11.5 * tanh(u / 15) + 11.5, and a constant added to every logit changes
neither the cross-entropy nor its gradient.

Two entry points:
- softcap_cross_entropy(logits, ...): logits given (bf16/fp16/fp32). The forward kernel makes one
  pass over each row, block by block, with an online logsumexp in fp32 (Milakov & Gimelshein 2018,
  "Online normalizer calculation for softmax"), so no fp32 copy of the (N, V) logits is ever made;
  the backward kernel makes one more pass, using the saved logsumexp, and writes the gradient into
  one new buffer of the logits' dtype.
- linear_softcap_cross_entropy(x, weight, ...): the head matmul fused in, following Liger-Kernel's
  "fused linear cross-entropy" (Hsu et al. 2024): tokens go through in chunks; per chunk, logits =
  x @ W.T, the kernel overwrites those logits with d(loss)/d(logits), and the chunk's grad_x and
  grad_W are taken right away, all during the forward. The full (N, V) logits never exist; backward
  only scales the stored grads by grad_output.

Reductions: "mean" over non-ignored targets (0.0, with zero grads, when every target is ignored,
where F.cross_entropy would give nan), "sum", "none" (per-token losses shaped like targets, 0.0 at
ignored positions). Losses are always fp32. softcap None or <= 0 means no capping (offset and width
are then unused: the logits go in as they are).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_REDUCTIONS = ("mean", "sum", "none")
# Bound on the (chunk, V) logits buffer of the fused linear CE: 2560 tokens at V=50304 in bf16.
_LOGITS_CHUNK_BYTES = 256 * 2**20
# Widest vocab block one program handles per loop step; bigger V loops (online logsumexp).
_MAX_BLOCK_V = 8192


def _transform(softcap, offset=0.0, width=None) -> tuple[float, float, float]:
    """(cap, offset, width) of z -> cap * tanh((z + offset) / width), as the kernels take them.
    width None means width = cap. No cap (softcap None or <= 0): (0.0, 0.0, 1.0), no transform."""
    if softcap is None or not softcap > 0:
        return 0.0, 0.0, 1.0
    cap = float(softcap)
    width = cap if width is None else float(width)
    if not width > 0:  # also catches nan
        raise ValueError(f"width must be > 0 (or None for width = softcap), got {width!r}")
    return cap, float(offset), width


def _reduce(losses: Tensor, targets: Tensor, ignore_index: int, reduction: str, shape) -> Tensor:
    """Per-token fp32 losses (0 at ignored positions) -> the requested reduction."""
    if reduction == "none":
        return losses.view(shape)
    if reduction == "sum":
        return losses.sum()
    n_valid = (targets != ignore_index).sum()
    return losses.sum() / n_valid.clamp(min=1)  # all ignored -> 0/1 = 0, not nan


def _check(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, the same math, materializing fp32 logits. Used on CPU, with
# kernels disabled, and by the tests.
# ---------------------------------------------------------------------------------------------
def softcap_cross_entropy_reference(logits, targets, softcap, ignore_index=-1, reduction="mean", *,
                                    offset=0.0, width=None):
    _check(reduction)
    z = logits.float()
    cap, offset, width = _transform(softcap, offset, width)
    if cap:
        z = cap * torch.tanh((z + offset) / width)
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(z.reshape(-1, z.shape[-1]), flat_targets, ignore_index=ignore_index,
                             reduction="none")
    return _reduce(losses, flat_targets, ignore_index, reduction, targets.shape)


def linear_softcap_cross_entropy_reference(x, weight, targets, softcap, ignore_index=-1,
                                           reduction="mean", *, offset=0.0, width=None):
    # F.linear follows autocast exactly as the model's nn.Linear head would.
    return softcap_cross_entropy_reference(F.linear(x, weight), targets, softcap, ignore_index,
                                           reduction, offset=offset, width=width)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row (token), looping over the vocab in BLOCK_V blocks.
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tanh(u):
        # tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: never overflows.
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _softcap_ce_kernel(
        logits_ptr, logits_row_stride,
        grad_ptr, grad_row_stride,  # may alias logits_ptr: the fused linear CE overwrites in place
        targets_ptr, losses_ptr, lse_ptr,
        grad_scale_ptr, grad_scale_stride,  # d(total)/d(row loss): one scalar (stride 0) or per row
        n_vocab, ignore_index, softcap, offset, width,  # z -> softcap * tanh((z + offset) / width)
        HAS_SOFTCAP: tl.constexpr, COMPUTE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * logits_row_stride
        target = tl.load(targets_ptr + row)
        is_valid = target != ignore_index

        if COMPUTE_LOSS:
            # Pass 1: online logsumexp of the capped logits, in fp32: rescale the running sum
            # whenever the running max grows, so exp() never overflows.
            running_max = float("-inf")
            running_sum = 0.0
            for start in range(0, n_vocab, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                in_vocab = offs < n_vocab
                z = tl.load(logits_ptr + offs, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh((z + offset) / width)
                z = tl.where(in_vocab, z, float("-inf"))  # masked tail adds exp(-inf) = 0
                new_max = tl.maximum(running_max, tl.max(z, axis=0))
                running_sum = running_sum * tl.exp(running_max - new_max) + \
                    tl.sum(tl.exp(z - new_max), axis=0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            z_target = tl.load(logits_ptr + target, mask=is_valid, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z_target = softcap * _tanh((z_target + offset) / width)
            tl.store(losses_ptr + row, tl.where(is_valid, lse - z_target, 0.0))
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)  # saved by the forward

        if COMPUTE_GRAD:
            # Pass 2: d(loss)/d(z) = softmax(z) - onehot(target); through the cap,
            # dz/d(logit) = (softcap / width) * (1 - tanh^2). Ignored rows get a zero gradient.
            scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
            scale = tl.where(is_valid, scale, 0.0)
            slope = softcap / width  # exactly 1.0 for the classic softcap (width = softcap)
            grad_ptr += row * grad_row_stride
            for start in range(0, n_vocab, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                in_vocab = offs < n_vocab
                z = tl.load(logits_ptr + offs, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh((z + offset) / width)
                    z = softcap * t
                grad = tl.exp(z - lse)
                grad = tl.where(offs == target, grad - 1.0, grad) * scale
                if HAS_SOFTCAP:
                    grad = grad * (slope * (1.0 - t * t))
                tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _launch_ce(logits, targets, losses, lse, transform, ignore_index, grad=None, grad_scale=None,
               compute_loss=True):
    """Run the kernel over the rows of a (N, V) logits view with unit column stride. transform is
    (cap, offset, width) as _transform gives it (cap 0.0: none)."""
    n_rows, n_vocab = logits.shape
    if n_rows == 0:
        return
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the *_reference functions")
    block_v = min(triton.next_power_of_2(n_vocab), _MAX_BLOCK_V)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    softcap, offset, width = transform
    compute_grad = grad is not None
    if compute_grad:
        scale_stride = 0 if grad_scale.numel() == 1 else grad_scale.stride(0)
    _softcap_ce_kernel[(n_rows,)](
        logits, logits.stride(0),
        grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
        targets, losses, lse,
        grad_scale if compute_grad else lse, scale_stride if compute_grad else 0,
        n_vocab, ignore_index, softcap if softcap else 1.0, offset, width,
        HAS_SOFTCAP=bool(softcap), COMPUTE_LOSS=compute_loss, COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v, num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# softcap_cross_entropy as custom ops: opaque to torch.compile (no graph break), with fake
# (shape-only) implementations for tracing and an autograd formula.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("kernels::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd(logits: Tensor, targets: Tensor, softcap: float, offset: float, width: float,
                    ignore_index: int) -> tuple[Tensor, Tensor]:
    """(N, V) logits -> per-row losses and logsumexp (fp32), for the backward."""
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(losses)
    _launch_ce(logits, targets, losses, lse, (softcap, offset, width), ignore_index)
    return losses, lse


@_softcap_ce_fwd.register_fake
def _(logits, targets, softcap, offset, width, ignore_index):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("kernels::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor,
                    softcap: float, offset: float, width: float, ignore_index: int) -> Tensor:
    """Gradient wrt the logits, in their dtype, in one pass (the logsumexp is known)."""
    grad = torch.empty_like(logits)
    _launch_ce(logits, targets, grad_losses, lse, (softcap, offset, width), ignore_index,
               grad=grad, grad_scale=grad_losses, compute_loss=False)  # losses_ptr is unused
    return grad


@_softcap_ce_bwd.register_fake
def _(logits, targets, lse, grad_losses, softcap, offset, width, ignore_index):
    return torch.empty_like(logits)


def _softcap_ce_setup_context(ctx, inputs, output):
    logits, targets, *args = inputs  # args: softcap, offset, width, ignore_index
    ctx.save_for_backward(logits, targets, output[1])
    ctx.args = args


def _softcap_ce_backward(ctx, grad_losses, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    grad = _softcap_ce_bwd(logits, targets, lse, grad_losses.float(), *ctx.args)
    return grad, None, None, None, None, None


_softcap_ce_fwd.register_autograd(_softcap_ce_backward, setup_context=_softcap_ce_setup_context)


def softcap_cross_entropy_triton(logits, targets, softcap, ignore_index=-1, reduction="mean", *,
                                 offset=0.0, width=None):
    _check(reduction)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_targets = targets.reshape(-1).contiguous()
    losses, _ = _softcap_ce_fwd(flat_logits, flat_targets, *_transform(softcap, offset, width),
                                ignore_index)
    return _reduce(losses, flat_targets, ignore_index, reduction, targets.shape)


def softcap_cross_entropy(logits, targets, softcap, ignore_index=-1, reduction="mean", *,
                          offset=0.0, width=None):
    """CE(softcap * tanh((logits + offset) / width), targets), fp32 loss. logits (..., V),
    targets (...). width None means width = softcap: classic softcap * tanh(logits / softcap)."""
    fn = softcap_cross_entropy_triton if use_triton(logits) else softcap_cross_entropy_reference
    return fn(logits, targets, softcap, ignore_index, reduction, offset=offset, width=width)


# ---------------------------------------------------------------------------------------------
# Fused linear + softcapped CE (Liger-Kernel's chunked scheme), as custom ops.
# ---------------------------------------------------------------------------------------------
def _chunk_rows(n_rows, n_vocab, dtype, chunk_size):
    if chunk_size > 0:
        return max(1, min(chunk_size, n_rows))
    rows = _LOGITS_CHUNK_BYTES // (n_vocab * dtype.itemsize)
    rows = max(128, rows // 128 * 128)  # multiples of 128 keep the matmuls tile-aligned
    return max(1, min(rows, n_rows))


def _linear_ce_chunks(x, weight, targets, row_weights, transform, ignore_index, compute_dtype,
                      chunk_size):
    """Losses of all rows of x (N, C), and, if row_weights is given (one scalar, or a weight per
    row), fp32 grads wrt x and weight of sum(row_weights * losses). transform: (cap, offset,
    width). Memory beyond the inputs: one (chunk, V) buffer in compute_dtype and the fp32 grads."""
    n_rows, n_vocab = x.shape[0], weight.shape[0]
    want_grad = row_weights is not None
    # The caller resolved autocast into compute_dtype; matmul dtypes are explicit from here on.
    with torch.autocast(x.device.type, enabled=False):
        w = weight.to(compute_dtype)
        losses = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(losses)
        # Grads accumulate and stay in fp32 until grad_output is applied: fp16 would underflow.
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_grad \
            else None
        rows = _chunk_rows(n_rows, n_vocab, compute_dtype, chunk_size)
        logits_buf = torch.empty(rows, n_vocab, dtype=compute_dtype, device=x.device)
        for start in range(0, n_rows, rows):
            end = min(start + rows, n_rows)
            x_chunk = x[start:end].to(compute_dtype)
            logits = logits_buf[: end - start]
            torch.mm(x_chunk, w.t(), out=logits)
            chunk_weights = None
            if want_grad:
                chunk_weights = row_weights if row_weights.numel() == 1 else row_weights[start:end]
            # In place: the chunk's logits become d(loss)/d(logits).
            _launch_ce(logits, targets[start:end], losses[start:end], lse[start:end], transform,
                       ignore_index, grad=logits if want_grad else None, grad_scale=chunk_weights)
            if want_grad:
                grad_x[start:end] = logits @ w
                if compute_dtype == torch.float32:
                    grad_w.addmm_(logits.t(), x_chunk)
                else:
                    grad_w += logits.t() @ x_chunk
    return losses, grad_x, grad_w


@torch.library.custom_op("kernels::linear_softcap_ce_fused", mutates_args=())
def _linear_ce_fused(x: Tensor, weight: Tensor, targets: Tensor, softcap: float, offset: float,
                     width: float, ignore_index: int, compute_dtype: torch.dtype, chunk_size: int,
                     mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Mean or sum loss, plus its fp32 grads wrt x and weight (computed now, scaled in backward).
    The kernel sees unit row weights, so the (chunk, V) gradient stays O(1) even in fp16."""
    ones = torch.ones(1, dtype=torch.float32, device=x.device)
    losses, grad_x, grad_w = _linear_ce_chunks(x, weight, targets, ones, (softcap, offset, width),
                                               ignore_index, compute_dtype, chunk_size)
    if mean:  # 1 / (number of non-ignored targets), kept on device: no host sync
        scale = 1.0 / (targets != ignore_index).sum().clamp(min=1).float()
        return losses.sum() * scale, grad_x.mul_(scale), grad_w.mul_(scale)
    return losses.sum(), grad_x, grad_w


@_linear_ce_fused.register_fake
def _(x, weight, targets, softcap, offset, width, ignore_index, compute_dtype, chunk_size, mean):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape, dtype=torch.float32),
            weight.new_empty(weight.shape, dtype=torch.float32))


def _linear_ce_fused_setup_context(ctx, inputs, output):
    _, grad_x, grad_w = output
    ctx.save_for_backward(grad_x, grad_w)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _linear_ce_fused_backward(ctx, grad_loss, _grad_grad_x, _grad_grad_w):
    grad_x, grad_w = ctx.saved_tensors
    x_dtype, w_dtype = ctx.dtypes
    return ((grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype),
            None, None, None, None, None, None, None, None)


_linear_ce_fused.register_autograd(_linear_ce_fused_backward,
                                   setup_context=_linear_ce_fused_setup_context)


@torch.library.custom_op("kernels::linear_softcap_ce_losses", mutates_args=())
def _linear_ce_losses(x: Tensor, weight: Tensor, targets: Tensor, softcap: float, offset: float,
                      width: float, ignore_index: int, compute_dtype: torch.dtype,
                      chunk_size: int) -> Tensor:
    """Per-row losses only: no-grad evaluation, and reduction="none" (whose backward recomputes)."""
    return _linear_ce_chunks(x, weight, targets, None, (softcap, offset, width), ignore_index,
                             compute_dtype, chunk_size)[0]


@_linear_ce_losses.register_fake
def _(x, weight, targets, softcap, offset, width, ignore_index, compute_dtype, chunk_size):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("kernels::linear_softcap_ce_grads", mutates_args=())
def _linear_ce_grads(x: Tensor, weight: Tensor, targets: Tensor, grad_losses: Tensor,
                     softcap: float, offset: float, width: float, ignore_index: int,
                     compute_dtype: torch.dtype, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Grads of sum(grad_losses * losses): per-row weights do not factor out of grad_weight, so
    reduction="none" recomputes the chunks in backward (one extra head matmul)."""
    _, grad_x, grad_w = _linear_ce_chunks(x, weight, targets, grad_losses.float(),
                                          (softcap, offset, width), ignore_index, compute_dtype,
                                          chunk_size)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


@_linear_ce_grads.register_fake
def _(x, weight, targets, grad_losses, softcap, offset, width, ignore_index, compute_dtype,
      chunk_size):
    return torch.empty_like(x), torch.empty_like(weight)


def _linear_ce_losses_setup_context(ctx, inputs, output):
    x, weight, targets, *args = inputs  # args: softcap, offset, width, ignore_index, dtype, chunk
    ctx.save_for_backward(x, weight, targets)
    ctx.args = args


def _linear_ce_losses_backward(ctx, grad_losses):
    x, weight, targets = ctx.saved_tensors
    grad_x, grad_w = _linear_ce_grads(x, weight, targets, grad_losses, *ctx.args)
    return grad_x, grad_w, None, None, None, None, None, None, None


_linear_ce_losses.register_autograd(_linear_ce_losses_backward,
                                    setup_context=_linear_ce_losses_setup_context)


def _matmul_dtype(x, weight):
    """The dtype F.linear would multiply in: the autocast dtype inside an autocast region."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def linear_softcap_cross_entropy_triton(x, weight, targets, softcap, ignore_index=-1,
                                        reduction="mean", chunk_size=None, *, offset=0.0,
                                        width=None):
    _check(reduction)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_targets = targets.reshape(-1).contiguous()
    args = (*_transform(softcap, offset, width), ignore_index, _matmul_dtype(x, weight),
            int(chunk_size or 0))
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and reduction != "none":
        loss, _, _ = _linear_ce_fused(flat_x, weight, flat_targets, *args, reduction == "mean")
        return loss
    losses = _linear_ce_losses(flat_x, weight, flat_targets, *args)
    return _reduce(losses, flat_targets, ignore_index, reduction, targets.shape)


def linear_softcap_cross_entropy(x, weight, targets, softcap, ignore_index=-1, reduction="mean",
                                 *, chunk_size=None, offset=0.0, width=None):
    """CE(softcap * tanh((x @ weight.T + offset) / width), targets) without materializing (N, V)
    logits on the Triton path. x (..., C), weight (V, C), targets (...). width None means
    width = softcap: the classic softcap * tanh(logits / softcap). chunk_size: tokens per chunk
    (default: a (chunk, V) buffer of about 256 MiB)."""
    if use_triton(x):
        return linear_softcap_cross_entropy_triton(x, weight, targets, softcap, ignore_index,
                                                   reduction, chunk_size, offset=offset,
                                                   width=width)
    return linear_softcap_cross_entropy_reference(x, weight, targets, softcap, ignore_index,
                                                  reduction, offset=offset, width=width)

"""GPT-2 speedrun baseline + a DeepSeekMoE Mixture-of-Experts MLP (DeepSeek-V3 section 2.1.2): shared experts
plus top-k of fine-grained routed experts, sigmoid gates, auxiliary-loss-free load balancing; compute-matched
to the MLP, in each of the 11 layers (the attention-free layer 6 too).

    torchrun --nproc_per_node=1 train_gpt2_moe.py   124M on FineWeb (python data/fineweb.py --shards 8)
    python train_gpt2_moe.py --preset=tiny          a CPU-sized run on the bundled sample in data/sample/
    python train_gpt2_moe.py --help                 every flag with its default

What is in this baseline: the recipe of modded-nanogpt's 2026-01 records (each piece names its record where it
is defined; docs/baseline.md lists them):
- the record's 11 layers at GPT-2 small's width, 6 heads of 128: layer 6 has no attention, layers 3 and 10
  have long windows with the partial key offset, XSA in 1, 3, 4, 7, one gated skip (3 -> 6), backout of
  layer 7;
- QK-norm, half-truncated rotary with YaRN at each window change, attention scale 0.1, sparse attention gates,
  5 gated value-embedding tables, smear, a bigram hash embedding, ReLU², RMSNorm without gains, residual
  lambdas 1.1, the record's inits, an untied head under the logit transform 23 sigmoid((z + 5) / 7.5);
- FlexAttention over packed, BOS-aligned token streams: nothing sees across documents, not even one token
  back; windows grow over training, and the final validation widens them;
- the 2026-01-26 record's optimizer: NorMuon (Muon with Polar Express, a second moment, cautious weight
  decay) for hidden matrices, Adam every other step for embeddings, head, gates and scalars;
- batch, LR and window schedules by thirds (131,072 -> 262,144 -> 393,216 tokens a step), a linear cool-down;
- regional torch.compile, a step loop that never waits for the GPU, any number of GPUs through torchrun.

The file reads top to bottom: the ML first (kernels, muon, model, data, hyperparameters, train), then the
harness, which a reader can skip (flags, checkpoints, logs, set-up). Sections open with `# ---- <name> ----`;
every section but `model` is byte-identical across train_gpt2*.py (tests/test_scripts_in_sync.py), so `diff
train_gpt2.py train_gpt2_<idea>.py` shows exactly one idea. Importing this file has no side effects:
everything runs from main()."""
# ---- imports ----
import contextlib
import ctypes
import dataclasses
import datetime
import fnmatch
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

try:  # shared Triton kernels (kernels/), switched on by --kernels=1; their PyTorch reference otherwise
    import kernels
except ImportError:  # a script copied out of the repo still runs, in plain PyTorch
    kernels = None


# ---- kernels ----
def linear_logit_cross_entropy(x, weight, targets, cap, offset=0.0, width=None):
    """Mean cross-entropy of the logits cap * tanh((x @ weight.T + offset) / width) (width None: cap) against
    targets (-1 = ignore)."""
    if kernels is not None:  # with --kernels=1, chunked: the full (tokens x vocab) logits never exist at once
        return kernels.linear_softcap_cross_entropy(x, weight, targets, cap, offset=offset, width=width)
    logits = cap * torch.tanh((F.linear(x, weight).float() + offset) / (width or cap))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def xxt(X):
    """X @ X.mT, the symmetric Gram matrix in Newton–Schulz; the kernel computes only one triangle."""
    return kernels.xxt(X) if kernels is not None else X @ X.mT


# ---- muon ----
# The optimizers of the modded-nanogpt 2026-01-26 record's NorMuonAndAdam, written out: r0126:N below is line
# N of that record's log (its train_gpt.py). NorMuon for the hidden matrices, Adam for the rest; which
# parameter goes where, with what settings, is PARAM_GROUPS in the train section.

# Polar Express (Amsel et al. 2025; modded-nanogpt record 2025-09-29, -10 steps): one (a, b, c) per
# Newton–Schulz step, each the best odd quintic for the singular values that can remain after the steps before
# it, so five steps land every singular value nearer 1 than Muon's one fixed quintic (3.4445, -4.7750, 2.0315)
# does.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise each matrix of G (..., m, n): its singular values go to ~1."""
    # bf16 is stable here and fast on GPU; CPU bf16 matmuls are slow
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation so the Gram matrix X X^T is the small one
        X = X.mT
    # spectral norm < 1, with Polar Express's margin
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = xxt(X)
        B = b * A + c * xxt(A)  # A is symmetric, so A @ A = A @ A^T
        X = a * X + B @ X
    return X.mT if transposed else X


def normuon_normalise(V, second_moment, beta2):
    """NorMuon (Li et al. 2025, arXiv:2510.05491; modded-nanogpt 2025-10-24, -15 steps), as r0126:764-775
    computes it: every row of the orthogonalised update V (..., r, c) when r >= c, every column when r < c
    (one statistic per entry of the longer side, its mean square over the shorter), is divided by the root of
    that statistic's running mean (second_moment, updated in place: an EMA with beta2, no bias correction,
    floored at 1e-10), and then the whole matrix is scaled back to V's own Frobenius norm."""
    dim = -1 if V.size(-2) >= V.size(-1) else -2  # r0126:716
    n = V.size(dim)
    mean_square = V.square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    # ||V|| and ||V * scale||, from the statistics: the sums over the shorter side are already taken
    norm = (mean_square.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    scaled_norm = (mean_square * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return V * (scale * (norm / scaled_norm.clamp_min(1e-10)))


def cautious_update_(p, update, decay, mask):
    """p -= update + decay * p where mask holds, in place: cautious weight decay (modded-nanogpt 2025-11-10,
    "improves the final training 40 steps") decays a weight only where its update already pulls it towards
    zero (the update and the weight agree in sign)."""
    update.addcmul_(p, mask, value=decay)
    p.sub_(update)


class NorMuon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton–Schulz, Jordan et al. 2024) with NorMuon's second moment and
    cautious weight decay, for the hidden weight matrices, as r0126:699-758 steps them. For each matrix W
    with gradient G (averaged across ranks by DDP), r, c its rows and columns, lr the group's scheduled LR:
        buf = m * buf + (1 - m) * G;  U = (1 - m) * G + m * buf       Nesterov momentum, fp32 (r0126:705-706)
        V = normuon_normalise(polar_express(U))                       (r0126:713-718)
        lr_W = lr * lr_mul * max(1, r / c) ** 0.5                     same RMS update tall or wide (r0126:355)
        W -= lr_W * V + lr * lr_W * weight_decay * W * [V * W >= 0]   (r0126:757-758)
    so the decay per step is lr * lr_W * weight_decay: it follows the LR schedule twice, as the record's
    (r0126:708-709: its lr_factor is lr_W and its wd_factor weight_decay * lr). A group with transposed=True
    is treated as W^T, the record's layout for the MLP output projections ((in, out), r0126:1127-1134): its
    shape multiplier and its second moment's rows are the record's. Same-shape matrices (as treated) are
    stacked, so one batched Newton–Schulz call serves them all; a 3-D weight (MoE's experts, AFNO's blocks)
    is a stack of matrices, each orthogonalised and normalised on its own. With several processes, each
    rank orthogonalises its share of every stack and the updates are all-gathered (as modded-nanogpt's Muon
    splits its work), so 8 GPUs do 1/8 of the Newton–Schulz work each; momentum stays whole on every rank."""

    def __init__(self, params, lr=0.023, momentum=0.95, beta2=0.95, weight_decay=1.2, lr_mul=1.0,
                 transposed=False, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                                      lr_mul=lr_mul, transposed=transposed, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        stacks = {}  # the matrices of each shape (as treated): one batched Newton–Schulz call each
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    shape = tuple(as_treated(p, group).shape)
                    key = (shape, group["momentum"], group["beta2"], group["ns_steps"])
                    stacks.setdefault(key, []).append((p, group))
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        gathers = []
        for (shape, momentum, beta2, ns_steps), members in stacks.items():
            updates, moments = [], []
            for p, group in members:
                state = self.state[p]
                if not state:  # allocated once, not zero-filled every step
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    wide = shape[-2] < shape[-1]  # one statistic per row (tall, square) or per column (wide)
                    reduced = (*shape[:-2], 1, shape[-1]) if wide else (*shape[:-1], 1)
                    state["second_moment"] = torch.zeros(reduced, dtype=torch.float32, device=p.device)
                grad, buf = as_treated(p.grad, group).float(), as_treated(state["momentum_buffer"], group)
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum))
                moments.append(state["second_moment"])
            # this rank's share: matrices [rank * share, (rank + 1) * share), zero matrices padding the last
            share = -(-len(members) // world)
            mine = slice(rank * share, (rank + 1) * share)
            U = padded_stack(updates[mine], share, updates[0])
            second_moment = padded_stack(moments[mine], share, moments[0])
            V = normuon_normalise(zeropower_via_newtonschulz5(U, ns_steps).float(), second_moment, beta2)
            gathers.append((shape, members, moments, all_gathered((V, second_moment), world)))
        for shape, members, moments, wait in gathers:  # the collectives overlap the Newton–Schulz work
            V, second_moment = wait()  # every member's, in order (and the padding, which zip leaves out)
            shape_mult = max(1.0, shape[-2] / shape[-1]) ** 0.5
            for (p, group), moment, new_moment, v in zip(members, moments, second_moment, V):
                moment.copy_(new_moment)
                lr = group["lr"] * group["lr_mul"] * shape_mult
                v = as_treated(v, group)  # back to W's own layout (a transpose is its own inverse)
                decay = group["lr"] * lr * group["weight_decay"]
                cautious_update_(p, (v * lr).to(p.dtype), decay, v * p >= 0)


def padded_stack(tensors, n, like):
    """torch.stack of tensors, with zeros shaped like `like` up to n (a zero update stays zero through
    Newton–Schulz and NorMuon's normalisation, and its moment is never read)."""
    return torch.stack([*tensors, *(torch.zeros_like(like) for _ in range(n - len(tensors)))])


def as_treated(t, group):
    """A weight (or its gradient, its momentum) as NorMuon treats it: transposed for a transposed group."""
    return t.mT if group["transposed"] else t


class CautiousAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction and cautious weight decay, for the embeddings, the head,
    the gates and the scalars, as r0126:655-691 steps them. For each parameter p with gradient g, lr the
    group's scheduled LR, lr_p = lr * lr_mul (r0126:657), t the updates so far:
        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g^2
        u = lr_p * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)      (r0126:670-671, 687)
        p -= u + lr_p^2 * weight_decay * wd_mul * p * [u * p > 0]         (r0126:672, 689-691)
    so the decay per step is lr_p**2 * weight_decay * wd_mul.

    Every other step (r0126:1655-1657: Adam steps on odd steps only), the optimizer is called with hold=True:
    it then keeps the step's gradient in its state ("held_grad", saved in checkpoints, so a run resumed
    between the two steps continues exactly) and changes nothing; the next step adds it to its own gradient.
    The record does the same by not clearing the Adam gradients on even steps (r0126:647-650), so the second
    backward pass adds into them: Adam steps on the sum of two steps' gradients, not their mean, at the LR of
    the step it takes."""

    def __init__(self, params, lr=0.008, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.005, lr_mul=1.0,
                 wd_mul=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_mul=lr_mul,
                                      wd_mul=wd_mul))

    @torch.no_grad()
    def step(self, hold=False):
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"] * group["lr_mul"]
            decay = lr * lr * group["weight_decay"] * group["wd_mul"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                held = state.pop("held_grad", None)
                # the sum of every gradient since the last update
                grad = p.grad.float() if held is None else held.add_(p.grad)
                if hold:  # a copy: p.grad is zeroed after the step
                    state["held_grad"] = grad.clone() if held is None else grad
                    continue
                if "step" not in state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
                update = exp_avg.div(exp_avg_sq.sqrt().add_(group["eps"])).mul_(step_size).to(p.dtype)
                cautious_update_(p, update, decay, update * p > 0)


# ---- model ----
EOT = 50256  # <|endoftext|>: every document starts with it (the shard format)
BLOCK = 128  # FlexAttention's block size; attention windows come in whole blocks


@dataclass
class IdeaFlags:
    """An idea script's own flags, declared once: GPTConfig and Hyperparameters both inherit these fields, so
    each is a --name=value flag and a model setting. MoE's (DeepSeek-V3 2.1.2; 124M values in brackets)."""
    n_routed_experts: int = 16  # MoE: fine-grained routed experts per MoE layer [16]
    n_shared_experts: int = 2  # MoE: always-on experts, run as one MLP n_shared times as wide [2]
    moe_top_k: int = 2  # MoE: routed experts per token, by sigmoid affinity + balancing bias [2]
    moe_expert_hidden: int = 0  # MoE: each expert's ReLU² width (0: 4 * n_embd / (shared + top_k)) [768]
    moe_every: int = 1  # MoE: layers i with (i + 1) % moe_every == 0 are MoE, the others MLPs [all 11]
    moe_bias_rate: float = 0.001  # MoE: gamma, the per-step change of the balancing bias (DeepSeek-V3: 0.001)
    moe_balance_alpha: float = 0.0  # MoE: alpha of the sequence-wise balance loss (eq. 17-20); 0: off

    def check(self):
        """Stop with a one-line error naming the first bad flag, its value and what is allowed (the shared
        flags' limits are LIMITS, in the harness). Runs for the flags given and for a checkpoint's saved
        config."""
        E, finite = self.n_routed_experts, lambda v: 0 <= v < math.inf  # noqa: E731
        hidden = self.moe_expert_hidden or 4 * self.n_embd // max(1, self.n_shared_experts + self.moe_top_k)
        for flag, ok, expected in (
                ("n_routed_experts", E >= 1, "an integer >= 1"),
                ("moe_top_k", 1 <= self.moe_top_k <= E, f"an integer in [1, --n_routed_experts={E}]"),
                ("n_shared_experts", self.n_shared_experts >= 0, "an integer >= 0"),
                ("moe_expert_hidden", self.moe_expert_hidden >= 0 and hidden >= 1,
                 "an integer >= 1 (0: auto, 4 * n_embd / (shared + top_k), which must come to >= 1)"),
                ("moe_every", 1 <= self.moe_every <= self.n_layer,
                 f"an integer in [1, --n_layer={self.n_layer}]"),
                ("moe_bias_rate", finite(self.moe_bias_rate), "a number >= 0"),
                ("moe_balance_alpha", finite(self.moe_balance_alpha), "a number >= 0 (0: off)")):
            if not ok:
                raise SystemExit(f"error: --{flag}={getattr(self, flag)}: expected {expected}")


@dataclass
class GPTConfig(IdeaFlags):
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 for fast matmuls (nanoGPT)
    seq_len: int = 16384  # the longest stream it trains on (sample.py's context); sdpa: the causal row length
    n_layer: int = 11  # the record's 11 layers (2025-12-14): 10 attend (not the 7th), all have an MLP
    n_head: int = 6  # head_dim 128 (modded-nanogpt 2024-10-14)
    n_embd: int = 768
    value_embeds: int = 5  # gated value-embedding tables, first 2 and last 3 attention layers (2026-01-26)
    bigram_vocab: int = 251520  # rows of the bigram hash embedding, 5 x 50304 (2026-01-19; 0: none)
    window_blocks: tuple = (3, 7, 11)  # long attention window per stage of training, in blocks (2025-11-29)
    final_window_blocks: tuple = (20, 6)  # (long, short) windows of the final validation (2025-09-21 record)
    attention: str = "flex"  # flex: document-masked windowed attention over packed streams; sdpa: causal rows
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self):
        self.check()
        # the auto width, resolved here so that GPTConfig(**saved_config) resolves the same
        self.moe_expert_hidden = self.moe_expert_hidden or 4 * self.n_embd // (self.n_shared_experts
                                                                               + self.moe_top_k)

    @classmethod
    def from_args(cls, args):
        """The model's settings from the run's flags: every field of the same name, an idea's included. A
        stream is a micro-batch long on FlexAttention (until --device_batch_tokens=auto is probed: --seq_len)
        and a --seq_len row on SDPA."""
        settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in vars(args)}
        streams = args.attention == "flex" and args.device_batch_tokens != "auto"
        blocks = lambda text: tuple(int(w) for w in text.split(","))  # noqa: E731
        settings.update(seq_len=args.device_batch_tokens if streams else args.seq_len,
                        window_blocks=blocks(args.window_blocks),
                        final_window_blocks=blocks(args.final_window_blocks))
        return cls(**settings)


@dataclass(frozen=True)
class Layout:
    """What each layer has, placed as in the record's 11-layer model and counted from the top, so a deeper or
    shallower model keeps the top's pattern: no attention in layer L-5 (2024-12-17, "drop an attn layer"),
    long windows with the partial key offset in L-8 and L-1 (2025-12-14), XSA in L-10, L-8, L-7, L-4
    (2026-04-29), the one skip L-8 -> L-5 (2025-11-18) and the backout of layer L-4 (2025-10-04), those three
    from 8 layers up; value embeddings in the first and the last attention layers (2026-01-26)."""
    attends: tuple  # per layer: has attention
    long: tuple  # per layer: long window (and the key offset)
    xsa: tuple  # per layer: exclusive self-attention
    ve: tuple  # per layer: its value-embedding table, or None
    skip: tuple | None  # (from, to): layer `to` adds the gated output of layer `from`
    backout: int | None  # the layer whose output is subtracted before the head

    @classmethod
    def of(cls, n_layer, value_embeds):
        L, deep = n_layer, n_layer >= 8
        top = lambda *depths: {L - d for d in depths if d <= L}  # noqa: E731
        attends = tuple(not (deep and i == L - 5) for i in range(L))
        layers = [i for i in range(L) if attends[i]]
        n = min(value_embeds, len(layers))
        with_ve = layers[:n // 2] + layers[len(layers) - (n - n // 2):]
        return cls(attends=attends, long=tuple(i in top(8, 1) for i in range(L)),
                   xsa=tuple(i in top(10, 8, 7, 4) and attends[i] for i in range(L)),
                   ve=tuple(with_ve.index(i) if i in with_ve else None for i in range(L)),
                   skip=(L - 8, L - 5) if deep else None, backout=L - 4 if deep else None)


def max_value_embeds(n_layer):
    """The most value-embedding tables a model of n_layer layers can use: one per attention layer."""
    return sum(Layout.of(n_layer, 0).attends)


def norm(x):
    """RMSNorm without a learned gain (Zhang & Sennrich 2019); gains add nothing here (modded-nanogpt)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_frequencies(head_dim):
    """Half-truncated rotary (modded-nanogpt 2024-12-17): half of the channel pairs turn at frequencies from
    1 down to 1/1024 per token, the other half not at all, so part of each head matches on content alone."""
    turning = (1 / 1024) ** torch.linspace(0, 1, head_dim // 4)
    return torch.cat((turning, turning.new_zeros(head_dim // 2 - head_dim // 4)))


def yarn(freqs, old_window, new_window, alpha=1, beta=32):
    """YaRN (Peng et al. 2023) at a window change (2025-09-10 record): a frequency that turns fewer than alpha
    times over the old window is slowed by old/new, one turning more than beta times is kept, in between a
    blend; the attention scale grows by 1 + 0.2 ln(new/old). Returns (frequencies, scale factor)."""
    turns = old_window * freqs / (2 * math.pi)
    keep = torch.clamp((turns - alpha) / (beta - alpha), 0, 1)
    ratio = old_window / new_window
    return freqs * (ratio + keep * (1 - ratio)), 0.2 * math.log(new_window / old_window) + 1


def rotate(x, freqs, pos=0):
    """Rotary position embedding (Su et al. 2021, RoFormer) of x (B, T, heads, head_dim) whose first token is
    at position pos; channel j turns with channel j + head_dim/2 at freqs[j]."""
    positions = torch.arange(pos, pos + x.size(1), device=x.device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # per call (cheap, fused by compile): no table to size
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


def document_mask(docs, window, past=0, build=create_block_mask):
    """Which keys each query may see: not later, in the same document, and fewer than `window` tokens back.
    docs (B, S): every token's document number; the queries are the last S - past tokens. A FlexAttention
    block mask on GPU (and on CPU without gradients; FlexAttention has no CPU backward), else a dense (B, 1,
    T, S) mask. build: create_block_mask, or its compiled version (GPT.compile_regions)."""
    if past == 0 and (docs.is_cuda or not torch.is_grad_enabled()):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (docs[b, q] == docs[b, kv]) & (q - kv < window)
        if docs.size(1) % BLOCK == 0:
            return document_block_mask(docs, window, mask_mod)
        return build(mask_mod, docs.size(0), None, docs.size(1), docs.size(1), device=docs.device)
    q = torch.arange(past, docs.size(1), device=docs.device)[:, None]
    kv = torch.arange(docs.size(1), device=docs.device)[None, :]
    same_doc = docs[:, past:, None] == docs[:, None, :]
    return ((q >= kv) & (q - kv < window) & same_doc)[:, None]


def document_block_mask(docs, window, mask_mod):
    """document_mask's BlockMask from block arithmetic, not from mask_mod at every (query, key) pair (0.27G
    pairs in a 16K-token stream): each 128-token block's first and last document number and the window say
    which key blocks a query block sees in full, in part or not at all (as modded-nanogpt's 2024-11 records
    built theirs); mask_mod decides only inside the partial blocks. docs (B, T): non-decreasing, T a multiple
    of BLOCK. Exact: the nearest pair of a key block before a query block, its last token and their first,
    shares a document whenever any pair does, since document numbers only grow."""
    B, n = docs.size(0), docs.size(1) // BLOCK
    first, last = docs[:, ::BLOCK], docs[:, BLOCK - 1::BLOCK]  # (B, n): each block's first and last document
    gap = torch.arange(n, device=docs.device)[:, None] - torch.arange(n, device=docs.device)  # query - key block
    nearest, farthest = (gap * BLOCK - (BLOCK - 1)).clamp(min=0), gap * BLOCK + (BLOCK - 1)  # token distances
    seen = (gap >= 0) & (nearest < window) & (last[:, None, :] >= first[:, :, None])  # (B, query, key)
    full = (gap > 0) & (farthest < window) & (first[:, None, :] == last[:, :, None])

    def ordered(blocks):  # (B, n, n) -> per query block, how many key blocks and which (those first)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], indices.to(torch.int32)[:, None]
    return BlockMask.from_kv_blocks(*ordered(seen & ~full), *ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod)


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows: a BlockMask (FlexAttention), a boolean tensor,
    or None for plain causal attention (--attention=sdpa: flash kernels)."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def look_back(x, has_prev, last=None):
    """x (B, T, ...) shifted one token later: each position gets its predecessor's value, zero where it has
    none (a document's first token, the stream's start); last: the value before x[:, 0] (decoding)."""
    before = torch.zeros_like(x[:, :1]) if last is None else last
    prev = torch.cat((before, x[:, :-1]), dim=1)
    return prev * has_prev.view(*has_prev.shape, *[1] * (x.dim() - 2)).type_as(x)


def uniform_(weight, std):
    """The record's init (2025-01-16, "improved init"): uniform with this standard deviation."""
    bound = 3 ** 0.5 * std
    return nn.init.uniform_(weight, -bound, bound)


class CausalSelfAttention(nn.Module):
    GATE_INPUTS = 12  # the gates read the first 12 channels of the block's input (2025-08-23 record)

    def __init__(self, config, long, xsa, ve):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.key_offset, self.xsa, self.ve = long, xsa, ve
        # separate q, k, v matrices so Muon orthogonalises each on its own; uniform, std n_embd^-0.5 (record)
        self.c_q, self.c_k, self.c_v = (nn.Linear(config.n_embd, config.n_embd, bias=False) for _ in range(3))
        for lin in (self.c_q, self.c_k, self.c_v):
            uniform_(lin.weight, config.n_embd ** -0.5)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        nn.init.zeros_(self.c_proj.weight)  # zero-init output projection: each block starts as identity
        # y_h *= sigmoid(W_h x[:12]): a head can switch itself off per token (sparse attention gate,
        # 2025-08-23)
        self.attn_gate = nn.Linear(self.GATE_INPUTS, self.n_head, bias=False)
        nn.init.zeros_(self.attn_gate.weight)
        if ve:  # v += 2 sigmoid(W_h x[:12]) ve per head (value-embedding gates, 2025-12-29): 1 at init
            self.ve_gate = nn.Linear(self.GATE_INPUTS, self.n_head, bias=False)
            nn.init.zeros_(self.ve_gate.weight)
        if xsa:  # y -= tanh(a_h) (y.v / |v|^2) v: exclusive self-attention (arXiv:2603.09078; 2026-04-29)
            self.xsa_alpha = nn.Parameter(torch.zeros(self.n_head))
        # v scaled by l0 and the output by l1 (the record's lambdas on the qkv and o weights, 2025-12-26)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 1.0]))

    def forward(self, x, ve, mask, freqs, scale, has_prev, cache=None):  # cache: this layer's past (decoding)
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim) for lin in (self.c_q, self.c_k, self.c_v))
        v = self.lambdas[0] * v
        if ve is not None:
            v = v + 2 * torch.sigmoid(self.ve_gate(x[..., :self.GATE_INPUTS]))[..., None] * ve.view_as(v)
        q, k = norm(q), norm(k)  # QK-norm (Dehghani et al. 2023): bounded attention logits at high LR
        pos = cache["k"].size(2) if cache and "k" in cache else 0
        # the attention scale (0.1 at head_dim 128, YaRN-grown) as a factor on q: attend() divides by sqrt(d)
        q, k = rotate(q, freqs, pos) * (scale * self.head_dim ** 0.5).type_as(q), rotate(k, freqs, pos)
        if self.key_offset:  # a key's still channels come from the token before it: 1-layer induction
            k = self.offset_keys(k, has_prev, cache)  # (2025-12-14 record), never across documents
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if cache is not None:  # decoding: new queries see the cached keys too (mask covers them)
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        y = attend(q, k, v, mask)[:, :, -T:].transpose(1, 2)  # (B, T, heads, head_dim)
        if self.xsa:
            v_own = v[:, :, -T:].transpose(1, 2)
            along = (y * v_own).sum(-1, keepdim=True) / v_own.square().sum(-1, keepdim=True).clamp_min(1e-8)
            y = y - torch.tanh(self.xsa_alpha).type_as(y)[:, None] * along * v_own
        y = y * torch.sigmoid(self.attn_gate(x[..., :self.GATE_INPUTS]))[..., None]
        return self.lambdas[1] * self.c_proj(y.reshape(B, T, C))

    def offset_keys(self, k, has_prev, cache):
        """k with its still channels (the second quarter of each half) taken from the previous token's key,
        where there is one in the same document; the cache keeps the last unshifted key for the next call."""
        d = self.head_dim // 2
        still = torch.cat((k[..., d // 2:d], k[..., d + d // 2:]), dim=-1)
        prev = look_back(still, has_prev, cache.get("still") if cache is not None else None)
        prev = torch.where(has_prev[..., None, None], prev, still)  # no predecessor: its own channels
        if cache is not None:
            cache["still"] = still[:, -1:]
        half = d // 2
        return torch.cat((k[..., :half], prev[..., :half], k[..., d:d + half], prev[..., half:]), dim=-1)


class MLP(nn.Module):
    def __init__(self, config, hidden=0):  # hidden width, 0: 4 * n_embd (MoE's shared experts: their total)
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, hidden or 4 * config.n_embd, bias=False)
        uniform_(self.c_fc.weight, 0.5 * config.n_embd ** -0.5)  # half the attention's std (record)
        self.c_proj = nn.Linear(hidden or 4 * config.n_embd, config.n_embd, bias=False)
        nn.init.zeros_(self.c_proj.weight)  # zero-init output projection (modded-nanogpt)

    def forward(self, x):  # ReLU² (So et al. 2021, Primer): ~1-2% lower loss than GELU in modded-nanogpt
        return self.c_proj(F.relu(self.c_fc(x)).square())


def routed_dense(x, gate_matrix, fc, proj):
    """sum_e gate_matrix[:, e] * FFN_e(x) over every expert, the gates zero off each token's top-k: fixed
    shapes that compile anywhere (the CPU path), at E / top_k times the routed FLOPs (at the tiny preset a few
    % of the model's)."""
    E, H, C = fc.shape
    h = F.relu(F.linear(x, fc.reshape(E * H, C))).square().view(-1, E, H) * gate_matrix[:, :, None]
    return torch.einsum("neh,ech->nc", h, proj)  # one (N, E * H) @ (E * H, C) matmul


def routed_grouped(x, top, gates, offsets, fc, proj, dtype):
    """The same sum over each token's top-k only: the (token, expert) pairs sorted by expert, so each expert's
    rows are contiguous (offsets: where each ends), and two grouped GEMMs run every expert at once. N * top_k
    rows whatever the routing, so torch.compile sees fixed shapes. torch._grouped_mm: CUDA bf16 (and CPU
    eager, for the tests)."""
    experts, order = top.flatten().sort(stable=True)
    rows = x[order // top.size(1)].to(dtype)
    h = F.relu(torch._grouped_mm(rows, fc.to(dtype).mT, offs=offsets)).square()
    y = torch._grouped_mm(h, proj.to(dtype).mT, offs=offsets)[order.argsort()]  # (token, choice) order
    return (y.view(*top.shape, -1) * gates[:, :, None]).sum(1)


class MoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024) as in DeepSeek-V3 (section 2.1.2, eq. 12-16), with the baseline's ReLU²
    experts: out = shared(x) + sum over the top-k routed experts of g_i FFN_i(x), affinities s_i = sigmoid(x .
    e_i) (eq. 15), gates g_i = s_i / (sum of the chosen s_j) (eq. 13). Auxiliary-loss-free balancing (section
    2.1.2): the top-k is chosen by s_i + b_i, the gates use s_i alone; b is a buffer that only GPT.schedule()
    changes, between optimizer steps (b_i += gamma * sign(mean load - load_i)), from the choices that training
    forwards count in `expert_load`. Token-choice, no capacity and no dropping: a token's output depends on
    its own x and the weights alone. Optional sequence-wise balance loss (eq. 17-20), in training only."""

    def __init__(self, config):
        super().__init__()
        E, C, H = config.n_routed_experts, config.n_embd, config.moe_expert_hidden
        self.top_k, self.rate, self.alpha = config.moe_top_k, config.moe_bias_rate, config.moe_balance_alpha
        self.shared = MLP(config, config.n_shared_experts * H) if config.n_shared_experts else None
        # a matrix: (Nor)Muon, as Moonlight's MoE (Adam's per-element step moves a logit ~lr |x|_1 a step)
        self.router = nn.Linear(C, E, bias=False)
        # experts stacked (E, out, in) like nn.Linear weights: (Nor)Muon orthogonalises each slice on its own
        self.fc = nn.Parameter(uniform_(torch.empty(E, H, C), 0.5 * C ** -0.5))  # as the MLP's c_fc (record)
        self.proj = nn.Parameter(torch.zeros(E, C, H))  # zero-init output projections, as the MLP's
        self.register_buffer("expert_bias", torch.zeros(E))  # b_i; persistent: checkpoints resume it
        self.register_buffer("expert_load", torch.zeros(E))  # tokens each expert got since the last update
        self.grouped = hasattr(torch, "_grouped_mm") and C % 8 == 0 and H % 8 == 0  # 16-byte bf16 rows

    def route(self, flat):  # (N, C) -> affinities s (N, E), each token's top-k experts (N, k), gates (N, k)
        scores = torch.sigmoid(self.router(flat).float())  # s_i (eq. 15), fp32 for the top-k and the gates
        top = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # picks, never weighs (eq. 16)
        gates = scores.gather(1, top)
        return scores, top, gates / gates.sum(-1, keepdim=True)  # (eq. 13)

    def forward(self, x):  # x (B, T, C), normed -> (output, balance loss)
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        scores, top, gates = self.route(flat)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)  # (B * T, E)
        counts = chosen.sum(0)
        # read between steps only, never by a forward (activation checkpointing's recompute may count each
        # token twice: sign(mean - load) and max / mean stay the same)
        if self.training:
            self.expert_load += counts
        bf16 = (x.is_cuda and torch.is_autocast_enabled("cuda")
                and torch.get_autocast_dtype("cuda") == torch.bfloat16)
        if self.grouped and bf16:  # the GPU path; else the dense one (CPU, fp16/fp32 GPUs)
            out = routed_grouped(flat, top, gates, counts.cumsum(0).int(), self.fc, self.proj, torch.bfloat16)
        else:
            out = routed_dense(flat, torch.zeros_like(scores).scatter_(1, top, gates), self.fc, self.proj)
        out = out.view(B, T, C) + (self.shared(x) if self.shared is not None else 0)
        balance = 0.0
        if self.training and self.alpha > 0:  # eq. 17-20, each packed stream (batch row) as the sequence
            p = (scores / scores.sum(-1, keepdim=True)).view(B, T, -1).mean(1)  # P_i (eq. 19-20)
            f = chosen.view(B, T, -1).float().mean(1) * (scores.size(1) / self.top_k)  # f_i (eq. 18)
            balance = self.alpha * (f * p).sum(-1).mean()  # (eq. 17)
        return out, balance

    @torch.no_grad()
    def update_bias(self, apply=True):
        """b_i += gamma * sign(mean load - load_i) from the last step's counts, summed over ranks so that
        every rank keeps the same bias (DDP does not broadcast buffers here); then the count restarts."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.expert_load)
        if apply:
            self.expert_bias += self.rate * torch.sign(self.expert_load.mean() - self.expert_load)
        self.expert_load.zero_()


class Block(nn.Module):
    def __init__(self, config, layout, layer):
        super().__init__()
        self.long_window = layout.long[layer]
        has_ve = layout.ve[layer] is not None
        self.attn = (CausalSelfAttention(config, layout.long[layer], layout.xsa[layer], has_ve)
                     if layout.attends[layer] else None)
        # DeepSeek-V3 keeps its first layers dense; so do layers before the first multiple of moe_every
        self.mlp = MoE(config) if (layer + 1) % config.moe_every == 0 else MLP(config)
        # x = resid * x + x0_lambda * x0 + bigram_lambda * bigram before each block (2025-11-18: 1.1;
        # 2026-01-19: 0.1)
        self.resid_lambda = nn.Parameter(torch.tensor(1.1))
        self.x0_lambda = nn.Parameter(torch.tensor(0.0))
        self.bigram_lambda = nn.Parameter(torch.tensor(0.1))

    def forward(self, x, x0, bigram, ve, mask, freqs, scale, has_prev, cache=None):  # pre-norm residual block
        # mask: this block's own (long or short window): a compiled block need not know which it is
        x = self.resid_lambda * x + self.x0_lambda * x0
        if bigram is not None:
            x = x + self.bigram_lambda * bigram
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask, freqs, scale, has_prev, cache)
        y, balance = self.mlp(norm(x)) if isinstance(self.mlp, MoE) else (self.mlp(norm(x)), 0.0)
        return x + y, balance  # and the MoE's balance loss (0 when off)


def bigram_hash(idx, has_prev, rows, last=None):
    """Each token's row in the bigram table: a hash of (previous token, token) (2026-01-19 record: 36313 and
    27191, XOR, mod rows - 1); the last row for a token with no predecessor in its document (the record lets
    a document's first token hash the previous document's last: ours sees nothing across documents)."""
    prev = look_back(idx, has_prev, last)
    hashed = torch.bitwise_xor(36313 * idx, 27191 * prev) % (rows - 1)
    return torch.where(has_prev, hashed, rows - 1)


def logit_transform(z):
    """23 sigmoid((z + 5) / 7.5) (2025-12-26 record, -40 steps) less its constant: 11.5 tanh((z + 5) / 15)."""
    return LOGIT_CAP * torch.tanh((z + LOGIT_OFFSET) / LOGIT_WIDTH)


LOGIT_CAP, LOGIT_OFFSET, LOGIT_WIDTH = 11.5, 5.0, 15.0


class GPT(nn.Module):
    # what an idea may change (tests read them): a mixer that sees across documents on purpose (AFNO) says so,
    # and test_causality.py allows an FFT's rounding
    crosses_documents = False
    causality_tolerance = 0.0

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layout = layout = Layout.of(config.n_layer, config.value_embeds)
        C = config.n_embd
        # head N(0, 0.005) and the embedding a copy of it, untied (2025-12-19 / 2025-12-22 records' init)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.005)
        self.wte = nn.Embedding(config.vocab_size, C)
        with torch.no_grad():
            self.wte.weight.copy_(self.lm_head.weight)
        # smear (2025-09-18): x_t += lambda sigmoid(W x_t[:12]) x_{t-1} on the embedding; lambda 0 and W 0
        self.smear_gate = nn.Linear(CausalSelfAttention.GATE_INPUTS, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)
        self.smear_lambda = nn.Parameter(torch.tensor(0.0))
        self.value_embeds = nn.ModuleList([nn.Embedding(config.vocab_size, C)
                                           for _ in range(sum(t is not None for t in layout.ve))])
        for table in self.value_embeds:
            nn.init.zeros_(table.weight)  # zero at init, as the 2026-01-26 record
        if config.bigram_vocab:  # zero at init: learns what a token pair adds (2026-01-19)
            self.bigram_embed = nn.Embedding(config.bigram_vocab, C)
            nn.init.zeros_(self.bigram_embed.weight)
        self.blocks = nn.ModuleList([Block(config, layout, i) for i in range(config.n_layer)])
        if layout.skip:  # x += sigmoid(skip_lambda) 2 sigmoid(W x0[:12]) h_from (2025-11-18, gate 2025-12-29)
            self.skip_gate = nn.Linear(CausalSelfAttention.GATE_INPUTS, 1, bias=False)
            nn.init.zeros_(self.skip_gate.weight)
            self.skip_lambda = nn.Parameter(torch.tensor(-1.5))
        if layout.backout is not None:  # x -= backout_lambda h_backout before the head (2025-10-04)
            self.backout_lambda = nn.Parameter(torch.tensor(0.5))
        # every stage's windows (tokens), rotary frequencies and attention scale, and the final validation's
        # (the last row), tables on the model's device: schedule() copies a row in place, so compiled graphs
        # never change and no copy from the CPU waits for the GPU. A fresh model is in its final state.
        windows, freqs, scales = self.stage_tables()
        self.register_buffer("window_table", windows, persistent=False)
        self.register_buffer("freq_table", freqs, persistent=False)
        self.register_buffer("scale_table", scales, persistent=False)
        self.register_buffer("windows", windows[-1].clone())
        self.register_buffer("freqs", freqs[-1].clone())
        self.register_buffer("attn_scale", scales[-1].clone())
        self.build_block_mask = create_block_mask  # compile_regions() compiles it

    def stage_tables(self):
        """(windows (S + 1, 2), frequencies (S + 1, head_dim / 2), scales (S + 1)) of each of the S stages and
        the final validation: long windows by window_blocks, short half as long (at least one block); YaRN at
        each change of the long window; the final validation at final_window_blocks with the last stage's
        frequencies and scale (the record widens its windows there without YaRN)."""
        config = self.config
        head_dim = config.n_embd // config.n_head
        freqs, scale = rotary_frequencies(head_dim), 0.1 * (128 / head_dim) ** 0.5  # 0.1 at head_dim 128
        rows, old = [], config.window_blocks[0]
        for long in config.window_blocks:
            if long != old:
                freqs, grow = yarn(freqs, old * BLOCK, long * BLOCK)
                scale, old = scale * grow, long
            rows.append(([long * BLOCK, max(1, long // 2) * BLOCK], freqs, scale))
        final = config.final_window_blocks
        rows.append(([final[0] * BLOCK, final[1] * BLOCK], freqs, scale))
        return (torch.tensor([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                torch.tensor([r[2] for r in rows]))

    def schedule(self, progress):
        """Called by the training loop before every optimizer step with the run's progress in [0, 1): that
        stage's windows, frequencies and scale; 1 (the final validation): the final ones."""
        stages = len(self.config.window_blocks)
        row = stages if progress >= 1 else min(int(progress * stages), stages - 1)
        self.windows.copy_(self.window_table[row])
        self.freqs.copy_(self.freq_table[row])
        self.attn_scale.copy_(self.scale_table[row])
        # the bias update, from the step just taken: none before the first, and none for the final validation,
        # which measures the model as trained
        for moe in self.moe_layers():
            moe.update_bias(apply=0 < progress < 1)

    def moe_layers(self):
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def compile_regions(self, **options):
        """Regional compilation (PyTorch's recipe): each block is compiled on its own and blocks of one kind
        share the compiled code (training or evaluation), so compiling costs a few blocks, not a graph of
        every block unrolled. The head's loss and the block masks are compiled too; the embeddings, smear,
        skip and backout between the blocks run eagerly (a few elementwise ops). fullgraph: a graph break is
        an error."""
        for block in [m for m in self.modules() if isinstance(m, Block)]:
            block.compile(fullgraph=True, **options)
        self.__dict__.pop("head_loss", None)  # an earlier call's compiled version (the micro-batch probe's)
        self.head_loss = torch.compile(self.head_loss, fullgraph=True, **options)
        self.build_block_mask = torch.compile(create_block_mask, fullgraph=True, **options)

    def masks(self, idx, past_docs=None):
        """({long window?: mask}, document numbers) for idx (B, T), whose documents begin at each EOT
        (past_docs: those of the tokens before it, when decoding), at the windows schedule() set."""
        if self.config.attention == "sdpa":
            return {True: None, False: None}, None
        past = 0 if past_docs is None else past_docs.size(1)
        docs = (idx == EOT).cumsum(1)
        if past:  # decoding: new tokens continue the cached tokens' last document
            docs = torch.cat((past_docs, past_docs[:, -1:] + docs), dim=1)
        used = {block.long_window for block in self.blocks if block.attn is not None}
        masks = {long: document_mask(docs, self.windows[0 if long else 1], past, self.build_block_mask)
                 for long in used}
        return masks, docs

    def has_prev(self, idx, last=None):
        """(B, T): the token has a predecessor in its document (not an EOT, not the stream's first unless
        decoding continues after `last`)."""
        first = torch.zeros_like(idx[:, :1], dtype=torch.bool) if last is None else torch.ones_like(
            idx[:, :1], dtype=torch.bool)
        return (idx != EOT) & torch.cat((first, torch.ones_like(idx[:, 1:], dtype=torch.bool)), dim=1)

    def embed(self, idx, has_prev, last=None):
        """(x0, bigram): the normed, smeared token embedding and the bigram embedding (or None)."""
        x = self.wte(idx)
        prev = look_back(x, has_prev, self.wte(last) if last is not None else None)
        gate = torch.sigmoid(self.smear_gate(x[..., :self.smear_gate.in_features]))
        x = x + self.smear_lambda * gate * prev
        if not self.config.bigram_vocab:
            return norm(x), None
        return norm(x), self.bigram_embed(bigram_hash(idx, has_prev, self.config.bigram_vocab, last))

    def hidden(self, idx, masks, caches=None, last=None):  # -> (final states, the MoE layers' balance loss)
        layout, has_prev = self.layout, self.has_prev(idx, last)
        x0, bigram = self.embed(idx, has_prev, last)
        x = x0.clone()  # a tensor of its own: one tensor as both x and x0 would compile a third kind of block
        tables = [table(idx) for table in self.value_embeds]
        skipped = backout = None
        balance = 0.0
        for i, block in enumerate(self.blocks):
            if layout.skip and i == layout.skip[1]:
                gate = 2 * torch.sigmoid(self.skip_gate(x0[..., :self.skip_gate.in_features]))
                x = x + torch.sigmoid(self.skip_lambda) * gate * skipped
            ve = tables[layout.ve[i]] if layout.ve[i] is not None else None
            inputs = (x, x0, bigram, ve, masks[block.long_window], self.freqs, self.attn_scale, has_prev)
            if caches is not None:
                x, layer_balance = block(*inputs, caches[i])
            elif self.config.activation_checkpointing and self.training:
                x, layer_balance = checkpoint(block, *inputs, use_reentrant=False)
            else:
                x, layer_balance = block(*inputs)
            balance = balance + layer_balance
            if layout.skip and i == layout.skip[0]:
                skipped = x
            if i == layout.backout:
                backout = x
        if backout is not None:
            x = x - self.backout_lambda * backout
        return norm(x), balance

    def logits(self, x):
        return logit_transform(self.lm_head(x).float())

    def head_loss(self, x, targets):
        """The mean next-token loss of the final states x (B, T, C) against targets (B, T; -1: none)."""
        return linear_logit_cross_entropy(x, self.lm_head.weight, targets, LOGIT_CAP, LOGIT_OFFSET,
                                          LOGIT_WIDTH)

    def forward(self, idx, targets=None):
        """idx (B, T) token streams -> logits (B, T, vocab); with targets (B, T) the mean loss instead."""
        if self.config.attention == "sdpa" and idx.size(1) > self.config.seq_len:  # causal rows
            idx = idx.reshape(-1, self.config.seq_len)
            targets = targets.reshape(-1, self.config.seq_len) if targets is not None else None
        x, balance = self.hidden(idx, self.masks(idx)[0])  # balance: 0 unless training with the balance loss
        if targets is None:
            return self.logits(x)
        return self.head_loss(x, targets) + balance

    @torch.no_grad()
    def forward_cached(self, idx, cache=None):
        """Decode with a KV cache: idx (B, T) continues the tokens held in cache (None starts one), with the
        same document masking and the windows schedule() set (a fresh or loaded model: the final ones).
        Returns (logits of the new tokens, cache); positions must stay below config.seq_len."""
        cache = cache or dict(docs=None, last=None, layers=[{} for _ in self.blocks])
        if self.config.attention == "sdpa":
            past = cache["layers"][0]["k"].size(2) if "k" in cache["layers"][0] else 0
            causal = torch.ones(idx.size(1), past + idx.size(1), dtype=torch.bool, device=idx.device)
            causal = causal.tril(past)
            masks = {True: causal, False: causal}
        else:
            masks, cache["docs"] = self.masks(idx, cache["docs"])
        x = self.hidden(idx, masks, cache["layers"], cache["last"])[0]
        cache["last"] = idx[:, -1:]
        return self.logits(x), cache

    def causal_outputs(self, idx):
        """Every output as name -> (tensor with time on dim 1, lookahead): position t may depend on tokens
        <= t + lookahead only. test_causality.py checks each of them."""
        return {"logits": (self(idx), 0)}

    def describe(self):
        """A line about the idea for the run log at start-up (its extra FLOPs, its cache size); "": none."""
        c, total = self.config, sum(p.numel() for p in self.parameters())
        return (f"MoE: {len(self.moe_layers())} of {c.n_layer} layers, {c.n_shared_experts} shared + "
                f"top-{c.moe_top_k} of {c.n_routed_experts} routed experts of width {c.moe_expert_hidden} "
                f"(active width {(c.n_shared_experts + c.moe_top_k) * c.moe_expert_hidden}, the MLP's "
                f"{4 * c.n_embd}), "
                f"sigmoid gates; params {total / 1e6:.2f}M, {self.num_active_params() / 1e6:.2f}M active "
                f"(embedding tables excluded); bias rate {c.moe_bias_rate}, balance loss alpha "
                f"{c.moe_balance_alpha}")

    def log_stats(self):
        """Load balance of the step just taken, for its log line: max / mean expert load, averaged over the
        MoE layers and the worst layer's (1.00 = perfectly even). Tensors, unread: the loop reads them when it
        logs the step."""
        loads = torch.stack([m.expert_load for m in self.moe_layers()])
        ratio = loads.amax(1) / loads.mean(1).clamp_min(1e-9)
        return {"moe_load_max/mean": ratio.mean(), "worst": ratio.max()}

    def num_active_params(self):
        """Parameters one token uses (bench.py): all but the embedding tables and the routed experts it skips.
        """
        tables = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        skipped = sum((m.fc.numel() + m.proj.numel()) // m.fc.size(0) * (m.fc.size(0) - m.top_k)
                      for m in self.moe_layers())
        return sum(p.numel() for p in self.parameters()) - tables - skipped


# ---- data ----
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c / modded-nanogpt token shard format
SHARD_FIX = ("re-download it (python data/fineweb.py) or re-tokenize it "
             "(python data/fineweb.py --from-text ...)")


def read_shard(path, vocab_size=None):
    """A shard's tokens as a read-only uint16 memmap, after checking its header against the file size and,
    given vocab_size, that every token id fits the model (one pass over the file: cheap next to training)."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise SystemExit(f"error: {path}: {size} bytes is shorter than the {HEADER_INTS * 4}-byte header; "
                         f"{SHARD_FIX}")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise SystemExit(f"error: {path}: header magic/version {header[0]}/{header[1]}, expected "
                         f"{SHARD_MAGIC}/{SHARD_VERSION}: not a GPT-2 token shard; {SHARD_FIX}")
    n_tokens = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n_tokens:
        expected = HEADER_INTS * 4 + 2 * n_tokens
        raise SystemExit(f"error: {path}: header says {n_tokens} tokens ({expected} bytes) but the file has "
                         f"{size} bytes (truncated?); {SHARD_FIX}")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, path)
    return tokens


def check_token_ids(tokens, vocab_size, path):
    top = int(tokens.max()) if len(tokens) else -1
    if top >= vocab_size:  # would be an IndexError deep in the embedding, long after start-up
        raise SystemExit(f"error: {path}: token id {top} >= --vocab_size={vocab_size}; the shard holds "
                         f"another tokenizer's ids or is corrupt: {SHARD_FIX}, or raise --vocab_size")


def file_problem(path):
    """What stops this process reading the file at path, or None."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a dangling symlink (to {os.readlink(path)})"
    if os.path.isdir(path):
        return "is a folder"
    try:
        open(path, "rb").close()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def find_shards(pattern, flag):
    """Sorted files matching a glob (relative globs also tried beside this script), each readable, or a
    clear error."""
    if not pattern:  # a glob of "" would match this script's folder
        raise SystemExit(f"error: --{flag}= is empty: give a glob of token shards, e.g. --{flag}="
                         f"{getattr(Hyperparameters, flag)}")
    files = sorted(glob.glob(pattern))
    if not files and not os.path.isabs(pattern):
        files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), pattern)))
    for f in files:
        if problem := file_problem(f):
            hint = f"; give a glob of the shards in it, e.g. --{flag}={f}/*.bin" if os.path.isdir(f) else ""
            raise SystemExit(f"error: --{flag}={pattern}: {f} {problem}{hint}")
    if not files:
        raise SystemExit(f"error: no files match --{flag}={pattern}\n"
                         "  FineWeb: python data/fineweb.py --shards 8 (the val shard and 8 x 100M train "
                         "tokens into data/fineweb10B/)\n"
                         "  your own text: python data/fineweb.py --from-text FILE... --out DIR, then "
                         "--train_files/--val_files=DIR/...\n"
                         "  or try the bundled sample: python train_gpt2.py --preset=tiny")
    return files


def check_train_is_not_val(train_pattern, val_pattern):
    """Training on the validation set is a silent leak: refuse globs that share a file."""
    real = lambda pattern, flag: {os.path.realpath(f) for f in find_shards(pattern, flag)}  # noqa: E731
    shared = sorted(real(train_pattern, "train_files") & real(val_pattern, "val_files"))
    if shared:
        raise SystemExit(f"error: --train_files={train_pattern} and --val_files={val_pattern} both match "
                         f"{shared[0]}{f' (and {len(shared) - 1} more)' if len(shared) > 1 else ''}: "
                         "training on "
                         "validation data; point the two flags at different shards")


class DistributedDataLoader:
    """Micro-batches as rows that start at a document's first token (2025-07-12_BosAlign record: "learning
    from mid-sample context is more challenging", and a row without its <|endoftext|> may lose the attention
    sink that token gives). A row is T + 1 tokens (inputs the first T, targets the last T) of the shards'
    documents in order, each cut to its first doc_cap tokens (2025-09-03 record; 0: uncut): from a document
    start it takes whole documents until it is full; the last one is cut at the row's end and the rest of it
    dropped, and the next row starts at the next document. A document longer than a row fills one alone. Rows
    are full (no padding) and never span shards: a shard's last documents, too few to fill a row, are dropped,
    as is a shard shorter than a row (an empty one too); after the last shard, the first again (a new epoch).
    Every document starts with EOT, but shards are cut at a fixed size (FineWeb's, data/fineweb.py's), so one
    may begin inside a document: its tokens before its first EOT are taken as a document (a shard with no EOT
    is one), and a shard's first row is the only kind that may start without EOT. Micro-step m gives rank r
    row m * world + r, so a step's data is the same for any split into ranks x accumulation steps. The next
    row's position (shard, document) is saved in checkpoints: a resumed run sees the rows an uninterrupted one
    would. Every shard's header and token ids are checked up front: a bad shard is an error before the first
    step, not hours in (one pass over memmaps: docs/data.md gives the time)."""

    def __init__(self, pattern, T, rank, world, device, vocab_size=None, doc_cap=0):
        self.files = find_shards(pattern, "train_files")
        self.T, self.rank, self.world, self.device = T, rank, world, device
        self.doc_cap = doc_cap
        if sum(len(read_shard(f, vocab_size)) for f in self.files) == 0:
            raise SystemExit(f"error: the shards of --train_files={pattern} hold no tokens")
        self.shard = None
        self.load_state_dict({"shard": 0, "doc": 0})
        if not self.row_left():  # settle() went round every shard
            raise SystemExit(f"error: every shard of --train_files={pattern} holds fewer than {T + 1} tokens "
                             f"of documents (cut to --doc_cap={doc_cap}), too few for one row of "
                             f"--device_batch_tokens={T} + 1: lower --device_batch_tokens or give larger "
                             "shards")

    def state_dict(self):
        return {"shard": self.shard, "doc": self.doc}

    def load_state_dict(self, state):
        """Go to the row that starts at document state["doc"] of shard state["shard"], or the next row after
        it. (A checkpoint of the older unaligned stream also holds an offset into that document: not used.)"""
        self.open(state["shard"])
        self.doc = state["doc"]
        self.settle()

    def row_left(self):
        return self.filled[-1] - self.filled[self.doc] >= self.T + 1

    def settle(self):
        """On to the next shard's first document if this one has too few tokens left for a row (and past every
        shard too short for one, going round them at most once)."""
        for _ in range(len(self.files)):
            if self.row_left():
                return
            self.open((self.shard + 1) % len(self.files))
            self.doc = 0

    def open(self, shard):
        """Make shard the current one: its tokens, its documents as (start, end after the cut) spans, and
        filled[i], the tokens of its documents before document i."""
        if shard != self.shard:
            self.tokens = read_shard(self.files[shard])
            starts = np.flatnonzero(self.tokens == EOT)
            if len(self.tokens) and (len(starts) == 0 or starts[0] != 0):  # a shard begun inside a document
                starts = np.concatenate(([0], starts))
            ends = np.append(starts, len(self.tokens))[1:]
            cut = np.minimum(ends, starts + self.doc_cap) if self.doc_cap else ends
            self.spans = np.stack((starts, cut), 1)
            self.filled = np.concatenate(([0], np.cumsum(cut - starts)))
        self.shard = shard

    def next_batch(self):
        """(inputs, targets), each (1, T): this rank's row of the next micro-step's world rows."""
        for r in range(self.world):
            first, need = self.doc, self.filled[self.doc] + self.T + 1
            self.doc = int(np.searchsorted(self.filled, need))  # the row's documents: first .. doc - 1
            if r == self.rank:
                spans = self.spans[first:self.doc].copy()
                spans[-1, 1] -= self.filled[self.doc] - need  # the last one cut at the row's end
                row = np.concatenate([self.tokens[start:end] for start, end in spans])
            self.settle()
        buf = torch.from_numpy(row.astype(np.int64))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[None, :-1], buf[None, 1:]


def load_val_tokens(pattern, n_tokens, vocab_size=None):
    """The first n_tokens + 1 tokens of the validation shards (inputs and their next-token targets)."""
    parts, have = [], 0
    for f in find_shards(pattern, "val_files"):
        parts.append(np.asarray(read_shard(f)[:n_tokens + 1 - have]))
        if vocab_size is not None:
            check_token_ids(parts[-1], vocab_size, f)
        have += len(parts[-1])
        if have == n_tokens + 1:
            return np.concatenate(parts).astype(np.int64)
    raise SystemExit(f"error: the validation shards {pattern} hold {have} tokens, fewer than "
                     f"--val_tokens={n_tokens} + 1; lower --val_tokens or add validation data (the benchmark "
                     "rules need 1048576)")


# ---- hyperparameters ----
@dataclass
class Hyperparameters(IdeaFlags):
    """Every flag: --name=value sets the field of that name (python train_gpt2.py --help lists them), after
    the preset's settings. An idea's own flags come from IdeaFlags, in the model section."""
    preset: str = "gpt2_124m"  # named settings applied before the other flags (PRESETS below)
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards; their first val_tokens
    # model
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128
    n_layer: int = 11  # transformer blocks (the record's layout: Layout, in the model section)
    n_head: int = 6  # attention heads; head_dim = n_embd / n_head (128, modded-nanogpt 2024-10-14)
    n_embd: int = 768  # model width
    value_embeds: int = 5  # gated value-embedding tables: first 2, last 3 attention layers (2026-01-26)
    bigram_vocab: int = 251520  # rows of the bigram hash embedding (2026-01-19: 5 x 50304; 0: none)
    attention: str = "flex"  # flex: packed streams, document masks, sliding windows; sdpa: plain causal rows
    seq_len: int = 1024  # --attention=sdpa only: tokens per causal row (flex: streams of device_batch_tokens)
    window_blocks: str = "3,7,11"  # long attention window per stage of training, in 128-token blocks
    final_window_blocks: str = "20,6"  # long,short windows of the final validation, in blocks (2025-09-21)
    doc_cap: int = 2048  # training documents are cut to their first this many tokens (2025-09-03; 0: uncut)
    # optimisation
    num_iterations: int = 1870  # optimizer steps, 490M tokens (README: why); the schedules span them
    batch_tokens: int = 393216  # tokens per step over all ranks, in the last batch stage (2025-01-26)
    batch_stages: int = 3  # stage s of these parts trains on s/batch_stages of batch_tokens (2025-11-29)
    device_batch_tokens: int | str = 16384  # tokens per micro-step per rank (a BOS-aligned row), or auto
    warmup_steps: int = 0  # linear LR warm-up steps (the record has none)
    stage_lr_mults: str = "auto"  # LR multiplier per batch stage, comma-separated; auto: 1, 1.52, 1.73 for 3
    cooldown_frac: float = 0.55  # the last fraction of the steps: LR decays linearly to lr_floor (2025-11-29)
    lr_floor: float = 0.1  # the LR multiplier the cool-down ends at, whatever the stage's (2025-01-13 record)
    muon_lr: float = 0.023  # NorMuon, hidden matrices: times the LR multiplier (2025-11-29 record)
    muon_momentum: float = 0.95  # NorMuon's Nesterov momentum between its warm-up and its cool-down
    muon_momentum_warmup_steps: int = 300  # momentum rises linearly from 0.85 over these first steps
    muon_momentum_cooldown_steps: int = 50  # and falls back to 0.85 over these last ones (2025-09-30 record)
    muon_beta2: float = 0.95  # NorMuon's second-moment EMA (2025-11-29 record)
    muon_weight_decay: float = 1.2  # NorMuon's cautious weight decay, times lr and the matrix's lr (2025-11-10)
    adam_lr: float = 0.008  # Adam: embeddings, head, gates, scalars, times each group's lr_mul (PARAM_GROUPS)
    adam_eps: float = 1e-10  # Adam's epsilon (2025-01-16 record)
    adam_weight_decay: float = 0.005  # Adam's cautious weight decay, times lr_p**2 and wd_mul (2025-12-18)
    # evaluation
    val_every: int = 125  # validate every this many steps (0: only at the end)
    val_dense_from: int = 1350  # from this step on, validate every val_dense_every steps too (0: off), where
    val_dense_every: int = 25  # 124M's crossing of 3.3821 is expected (README), so a stop there costs little
    val_tokens: int = 1048576  # validation tokens, fixed by the benchmark rules (0: none, for benchmarks)
    target_val_loss: float = 3.3821  # the run has reached the target when val_loss <= this
    stop_at_target: bool = False  # stop at the first validation that reaches the target
    time_budget_s: float = 0.0  # end after this training time, LR cooled down by then (0: off; for races)
    diverge_steps: int = 20  # stop when this many steps running are 2 over the best loss or ~uniform (0: off)
    # system
    compile: int | str = "auto"  # torch.compile the model's blocks: 1, 0, or auto (on for CUDA, off for CPU)
    compile_cache: str = ""  # a folder: load compiled code from it before compiling, save it there after
    dtype: str = "auto"  # autocast: bf16, fp16 (+ GradScaler), fp32, or auto (bf16/fp16 on CUDA, fp32 on CPU)
    activation_checkpointing: bool = False  # recompute each block in the backward pass to save memory
    kernels: bool = False  # Triton kernels/ on CUDA (opt-in until measured on a GPU; same math as without)
    seed: int = 0  # weight initialisation (the data order is fixed by the shards)
    log_dir: str = "logs"  # logs/<run_id>.txt and checkpoints in logs/<run_id>/
    save_every: int = 0  # checkpoint every this many steps and at the end (0: never)
    resume: str = ""  # checkpoint to continue from: its settings, then --preset if given, then the flags
    # experiment tracking
    wandb_project: str = ""  # log to this Weights & Biases project from rank 0 (needs pip install wandb)
    wandb_run_name: str = ""  # the W&B run's name (default: the run id)


PRESETS = {
    "gpt2_124m": {},  # the defaults above: the record's model, optimizer and schedules, BottleCap's target
    # BottleCap 1-GPU rule
    "bottlecap": dict(target_val_loss=3.3821, val_tokens=1048576, stop_at_target=True),
    # modded-nanogpt's rule; 600M tokens: the ~480-520M a 3.28 run of this recipe needs by the ladder, +15%
    "modded": dict(target_val_loss=3.28, val_tokens=10485760, num_iterations=2290, val_dense_from=1900),
    # trains on CPU in seconds on the bundled sample (data/sample/): for smoke tests and first contact; the
    # momentum's warm-up and cool-down (300 and 50 of 1870 steps) shortened for its 50 steps
    "tiny": dict(train_files="data/sample/sample_train_*.bin", val_files="data/sample/sample_val_*.bin",
                 n_layer=2, n_head=2, n_embd=64, window_blocks="1,2,4", batch_tokens=512, batch_stages=1,
                 device_batch_tokens=512, num_iterations=50, val_every=25, val_dense_from=0, val_tokens=8192,
                 muon_momentum_warmup_steps=10, muon_momentum_cooldown_steps=2, target_val_loss=7.5),
}


# ---- train ----
@dataclass
class Run:
    """What a run carries from setup() (in the harness) through the loop to finish(). Set once by setup(),
    except the last three, which the loop sets when it stops early."""
    args: Hyperparameters  # the settings in force: the preset, then a checkpoint's, then the flags given
    ckpt: dict | None = None  # the checkpoint resumed from (--resume), or None
    rank: int = 0  # this process among `world` (torchrun's RANK); rank 0 writes the log and the checkpoints
    world: int = 1  # processes (torchrun's WORLD_SIZE)
    master: bool = True  # rank == 0
    device: torch.device | None = None  # this process's GPU (torchrun's LOCAL_RANK), or the CPU
    amp_dtype: torch.dtype | None = None  # autocast's dtype: bf16 or fp16; None for fp32
    amp_ctx: typing.Any = None  # the autocast context every forward runs in (a null context for fp32)
    scaler: torch.amp.GradScaler | None = None  # loss scaling, enabled for fp16 only
    use_compile: bool = False  # GPT.compile_regions() was applied
    raw_model: GPT | None = None  # the model itself: its schedules, hooks and state dict
    model: nn.Module | None = None  # what the loop calls: raw_model, or DDP around it on several processes
    optimizers: list = dataclasses.field(default_factory=list)  # [CautiousAdam, NorMuon]
    train_loader: DistributedDataLoader | None = None
    val_inputs: torch.Tensor | None = None  # this rank's validation streams (n, 1, T) on the CPU (n may be 0)
    val_targets: torch.Tensor | None = None  # their next tokens
    # checkpointed: train_time, val_time, best_val_loss, final_val_loss, time_to_target, tokens_seen,
    # checkpoints ([step, path] pairs), compile_warmup (seconds)
    state: dict = dataclasses.field(default_factory=dict)
    start_step: int = 0  # optimizer steps taken before this process started (a resumed run's)
    script_path: str = ""  # this file, whose source the log holds
    script_sha: str = ""  # its sha256, in the summary
    run_id: str = ""  # <script>_<date>-<time>_<random>: names the log and the checkpoint folder
    log: "RunLog | None" = None  # logs/<run_id>.txt, written by rank 0 only
    tracker: typing.Any = None  # the Weights & Biases run (--wandb_project), or None
    clock_group: typing.Any = None  # a CPU process group for rank 0's clock (several ranks, a time budget)
    clock: tuple | None = None  # the last clock broadcast, (tensor, work): see agreed_elapsed()
    cache_file: str | None = None  # --compile_cache's file for this script, device, torch and Triton
    cache_note: str | None = None  # what loading it found, for the log
    cache_loaded: int = 0  # entries loaded from it
    notes: list = dataclasses.field(default_factory=list)  # start-up facts for the log (a clamp, a preset)
    stopped: str | None = None  # why the loop ended early
    error: str | None = None  # the error line that stopped it (a diverged loss, a failed write): exit 1
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped it
    bad_steps: int = 0  # steps running whose loss looked diverged (see diverged())


def run_progress(step, args, elapsed=0.0):
    """How far the run is, in [0, 1]: step / num_iterations or, with a time budget, elapsed / budget when that
    is further along (so schedules end when the budget does)."""
    progress = step / args.num_iterations
    if args.time_budget_s > 0:
        progress = max(progress, elapsed / args.time_budget_s)
    return min(1.0, progress)


def stage_batches(args):
    """The batch of every stage, in tokens: stage s = 1..batch_stages trains on s/batch_stages of
    batch_tokens."""
    return [args.batch_tokens * s // args.batch_stages for s in range(1, args.batch_stages + 1)]


def stage_lr_mults(args):
    """The LR multiplier of each batch stage: --stage_lr_mults, or auto: stage s (s times the first stage's
    batch) at s**0.6 up to s = 2 and s**0.5 beyond, to 2 decimals as the record writes them: 1, 1.52, 1.73
    for three stages (r0126:1524-1527: "(16/8)**0.6", "(24/8)**0.5"), 1 for one."""
    if args.stage_lr_mults == "auto":
        return [round(s ** (0.6 if s <= 2 else 0.5), 2) for s in range(1, args.batch_stages + 1)]
    return [float(m) for m in args.stage_lr_mults.split(",")]


def batch_stage(progress, args):
    """(tokens in this step's batch, its LR multiplier). The record switches its multiplier at progress > 1/3
    and > 2/3 (r0126:1524-1527) and its batch at >= (r0126:1505); here both switch together, with the batch:
    they differ only on a step that lands exactly on a third (step 720 of 2160)."""
    stage = min(int(progress * args.batch_stages), args.batch_stages - 1)
    return stage_batches(args)[stage], stage_lr_mults(args)[stage]


def lr_factor(step, progress, args):
    """The LR multiplier of NorMuon and Adam alike (r0126:1692): a linear warm-up over warmup_steps, then the
    batch stage's multiplier m, cooled down linearly over the last cooldown_frac to the absolute floor
    lr_floor: m * w + (1 - w) * lr_floor with w = (1 - progress) / cooldown_frac (r0126:1528-1531)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    mult = batch_stage(progress, args)[1]
    if args.cooldown_frac == 0 or progress < 1 - args.cooldown_frac:
        return mult
    w = (1 - progress) / args.cooldown_frac
    return mult * w + (1 - w) * args.lr_floor


def muon_momentum(step, args):
    """NorMuon's momentum: 0.85 rising linearly to --muon_momentum over the first muon_momentum_warmup_steps,
    back down to 0.85 over the last muon_momentum_cooldown_steps (r0126:1534-1547)."""
    low, high = 0.85, args.muon_momentum
    cooldown_start = args.num_iterations - args.muon_momentum_cooldown_steps
    if step < args.muon_momentum_warmup_steps:
        return low + step / args.muon_momentum_warmup_steps * (high - low)
    if step > cooldown_start:
        return high - (step - cooldown_start) / args.muon_momentum_cooldown_steps * (high - low)
    return high


def adam_steps_at(step):
    """Adam updates on odd steps only, on the gradients of that step and the one before (r0126:1655-1657)."""
    return step % 2 == 1


# Which optimizer each parameter gets, and its settings: the first row that matches the parameter's name
# (fnmatch: `*` matches dots too) wins; EMBEDDING matches the weight of any nn.Embedding, MATRIX any parameter
# with 2 or more dimensions. A row that matches nothing in a model is harmless. The rows and values are the
# record's param_table (r0126:1577-1592); a name from neither the baseline nor the record (an idea's) falls
# through to the last three rows by its kind: a table, a matrix, or a vector/scalar.
EMBEDDING, MATRIX = "<an nn.Embedding's weight>", "<ndim >= 2>"


@dataclass(frozen=True)
class ParamGroup:
    name: str
    optimizer: str  # adam or normuon
    match: tuple  # name patterns, EMBEDDING or MATRIX
    betas: tuple = (0.9, 0.99)  # Adam's
    lr_mul: float = 1.0  # times --adam_lr or --muon_lr
    wd_mul: float = 1.0  # Adam: times --adam_weight_decay (NorMuon: all 1)
    transposed: bool = False  # NorMuon: the record stores these (in, out) (see NorMuon)


PARAM_GROUPS = (
    # gates: LightRNN's column gate (named lm_head_*, but a gate: no 150x decay on it)
    ParamGroup("gates", "adam", ("*.attn_gate.weight", "*.ve_gate.weight", "lm_head_col_gate"),
               (0.9, 0.99), 1.0, 1.0),
    ParamGroup("xsa", "adam", ("*.xsa_alpha",), (0.9, 0.95), 1.0, 0.0),  # XSA's strengths (2026-04-29 record)
    ParamGroup("lm_head", "adam", ("lm_head*",), (0.5, 0.95), wd_mul=150.0),  # LightRNN's factors too
    ParamGroup("value_embeds", "adam", ("value_embeds.*", "bigram_embed.weight"), (0.75, 0.95), 75.0, 5.0),
    ParamGroup("smear_gate", "adam", ("smear_gate.weight",), (0.9, 0.99), 0.01, 0.0),
    ParamGroup("skip_gate", "adam", ("skip_gate.weight",), (0.9, 0.99), 0.05, 0.0),
    ParamGroup("x0_lambdas", "adam", ("*x0_lambda*",), (0.65, 0.95), 5.0, 0.0),
    ParamGroup("embed", "adam", ("wte.weight", EMBEDDING), (0.5, 0.95), wd_mul=150.0),  # LightRNN's tables too
    # MLP output projections: 2x the LR (r0126:358-367), and the record's (in, out) layout gives them the
    # shape multiplier (3072/768)**0.5 = 2 (r0126:1134, 355) where ours, (out, in), gives 1: so transposed.
    # Net: attention 1x, c_fc 2x, c_proj 4x, as the record's.
    ParamGroup("mlp_out", "normuon", ("*mlp.c_proj.weight", "*mlp.proj", "*mlp.shared.c_proj.weight"),
               lr_mul=2.0, transposed=True),
    ParamGroup("hidden", "normuon", (MATRIX,)),  # attention, c_fc, and an idea's own matrices
    ParamGroup("scalars", "adam", ("*",), (0.9, 0.99), 5.0, 0.0),  # every other vector and scalar
)


def param_group(name, p, embeddings):
    """The row of PARAM_GROUPS that parameter `name` falls in (embeddings: the ids of nn.Embedding weights)."""
    def matches(pattern):
        if pattern == EMBEDDING:
            return id(p) in embeddings
        return p.ndim >= 2 if pattern == MATRIX else fnmatch.fnmatchcase(name, pattern)
    return next(row for row in PARAM_GROUPS if any(matches(pattern) for pattern in row.match))


def build_optimizers(model, args):
    """[CautiousAdam, NorMuon] over the model's parameters, a group per row of PARAM_GROUPS that has any, each
    parameter in exactly one. Each group's base_lr is what lr_factor multiplies."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    members = {row: [] for row in PARAM_GROUPS}
    for name, p in model.named_parameters():
        members[param_group(name, p, embeddings)].append(p)
    adam_groups = [dict(params=ps, name=row.name, betas=row.betas, lr_mul=row.lr_mul, wd_mul=row.wd_mul)
                   for row, ps in members.items() if ps and row.optimizer == "adam"]
    normuon_groups = [dict(params=ps, name=row.name, lr_mul=row.lr_mul, transposed=row.transposed)
                      for row, ps in members.items() if ps and row.optimizer == "normuon"]
    adam = CautiousAdam(adam_groups, lr=args.adam_lr, eps=args.adam_eps, weight_decay=args.adam_weight_decay)
    normuon = NorMuon(normuon_groups, lr=args.muon_lr, momentum=args.muon_momentum, beta2=args.muon_beta2,
                      weight_decay=args.muon_weight_decay)
    for opt in (adam, normuon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [adam, normuon]


def train_step(run, step, elapsed=0.0):
    """One optimizer step over accum micro-batches; returns the mean training loss over every rank as a tensor
    on the device, unread: reading it (.item()) would make the host wait for the GPU to finish the step."""
    args, model = run.args, run.model
    progress = run_progress(step, args, elapsed)
    # the model's own schedules: windows (an idea's aux-loss weight, router biases)
    run.raw_model.schedule(progress)
    batch, _ = batch_stage(progress, args)
    accum = batch // (args.device_batch_tokens * run.world)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, progress, args)
    for group in run.optimizers[1].param_groups:
        group["momentum"] = muon_momentum(step, args)
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = run.train_loader.next_batch()
        no_sync = model.no_sync() if run.world > 1 and micro < accum - 1 else contextlib.nullcontext()
        with no_sync:  # DDP averages gradients across ranks once, on the last micro-step
            with run.amp_ctx:
                loss = model(x, y)
            run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float()
    adam, normuon = run.optimizers
    for opt in run.optimizers:
        run.scaler.unscale_(opt)
    run.scaler.step(adam, hold=not adam_steps_at(step))  # hold: keep this step's gradients for the next
    run.scaler.step(normuon)
    run.scaler.update()
    model.zero_grad(set_to_none=True)
    if run.world > 1:
        dist.all_reduce(loss_sum)
    run.state["tokens_seen"] += batch
    return loss_sum / (accum * run.world)


def evaluate(run):
    """Mean next-token loss over exactly val_tokens tokens; each rank takes every world-th sequence."""
    model, device, n_streams = run.model, run.device, len(run.val_inputs)
    model.eval()
    total = torch.zeros((), device=device)
    t_start = t_shown = time.perf_counter()
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(run.val_inputs, run.val_targets)):  # the training micro-batch's shape
            with run.amp_ctx:
                total += model(x.to(device, non_blocking=True), y.to(device, non_blocking=True)).float()
            if run.master and time.perf_counter() - t_shown > 10:  # a long validation (a CPU) shows progress
                t_shown = time.perf_counter()
                print(f"  validation: {i + 1}/{n_streams} streams, {t_shown - t_start:.0f}s", file=sys.stderr,
                      flush=True)
    if run.world > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / (n_streams * run.world)


def train_loop(run):
    """The steps, validation every val_every, checkpoints every save_every, and the training clock, which
    stops for both and at the end. Sets run.stopped (why the run ended early) and returns the number of steps
    taken. A step's line is written once the next step is queued, so the host never waits for the GPU between
    steps. Ctrl-C and SIGTERM arrive as KeyboardInterrupt (signals_interrupt(), around main())."""
    args, state, log = run.args, run.state, run.log
    done, t0 = run.start_step, time.perf_counter()  # done: optimizer steps taken, whenever an interrupt lands
    pending = None  # the StepRecord of the last step, not yet logged
    if run.stopped:  # interrupted in the compile warm-up
        return done
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        for step in range(run.start_step, args.num_iterations + 1):
            elapsed = agreed_elapsed(run, state["train_time"] + time.perf_counter() - t0)
            last = step == args.num_iterations or 0 < args.time_budget_s <= elapsed
            every = args.val_every > 0 and step % args.val_every == 0 or (
                0 < args.val_dense_from <= step and step % args.val_dense_every == 0)
            validate = args.val_tokens > 0 and (last or every)
            save = args.save_every > 0 and step > 0 and (last or step % args.save_every == 0)
            # the step line first: a NaN there must stop a save
            if pending and (validate or save or last):
                pending = log_step(run, pending, t0)
                if run.error:
                    break
            if (validate or save or last) and (step > run.start_step or run.ckpt is None):
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
                # the clock stops for validation and checkpoints, and at the end
                if step > run.start_step:
                    state["train_time"] += time.perf_counter() - t0
                t0 = None
                if validate:
                    if last:  # the final validation's wider windows (2025-09-21 record)
                        run.raw_model.schedule(1.0)
                    validation(run, step)
                if run.master and (save or run.stopped and args.save_every > 0):
                    save_checkpoint(run, step)
                t0 = time.perf_counter()
            if last or run.stopped:
                break
            loss = train_step(run, step, elapsed)
            done = step + 1
            if pending:
                pending = log_step(run, pending, t0)
                if run.error:
                    break
            pending = StepRecord(run, done, loss)
        if run.error:  # the clock stops here too
            state["train_time"] += time.perf_counter() - t0
    except KeyboardInterrupt as e:
        if t0 is not None:
            state["train_time"] += time.perf_counter() - t0
        if pending:  # the clock has stopped: its line reads train_time
            log_step(run, pending, None)
        note_interrupt(run, e, f"at step {done}")
    except WriteError as e:  # a full disk, a lost mount: the log or a checkpoint could not be written
        if t0 is not None:
            state["train_time"] += time.perf_counter() - t0
        run.stopped = f"{e} at step {done}"
        run.error = f"error: stopped: {run.stopped}; last checkpoint: {last_checkpoint(run)}"
        with contextlib.suppress(WriteError):  # the log itself may be what cannot be written
            log.write(run.error, echo=False)
    if run.clock is not None:  # the last broadcast must end before the process group does
        run.clock[1].wait()
    return done


def note_interrupt(run, interrupt, when):
    """Ctrl-C or SIGTERM after the log opened: the interrupted line (then finish() writes the summary)."""
    run.interrupted = getattr(interrupt, "signum", signal.SIGINT)  # a bare KeyboardInterrupt: Ctrl-C
    run.stopped = f"interrupted ({signal.Signals(run.interrupted).name}) {when}"
    run.log.write(f"{run.stopped}; last checkpoint: {last_checkpoint(run)}")


def validation(run, step):
    """Evaluate, log it, and note the first time the target is reached."""
    args, state = run.args, run.state
    t_val = time.perf_counter()
    val_loss = evaluate(run)
    state["best_val_loss"] = min(state["best_val_loss"], val_loss)
    state["final_val_loss"] = val_loss
    if val_loss <= args.target_val_loss and state["time_to_target"] is None:
        state["time_to_target"] = state["train_time"]
        if args.stop_at_target:
            run.stopped = f"target {args.target_val_loss} reached at step {step}"
    run.log.write(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} "
                  f"train_time:{state['train_time'] * 1000:.0f}ms")
    track(run, step, dict(val_loss=val_loss))
    state["val_time"] += time.perf_counter() - t_val


def main(argv=None):
    """Set-up, the training loop, the summary."""
    with errors_from_rank_zero(), signals_interrupt():
        run = setup(sys.argv[1:] if argv is None else list(argv))
        steps = train_loop(run)
        return finish(run, steps)


# ---- harness ----
def all_gathered(shares, world):
    """NorMuon's all-gather (the muon section): a function that waits for every rank's shares (tensors
    (share, ...)) and returns them concatenated in rank order along dim 0; one collective for all, started now."""
    if world == 1:
        return lambda: shares
    flat = torch.cat([t.flatten(1) for t in shares], dim=1)
    parts = [torch.empty_like(flat) for _ in range(world)]
    work = dist.all_gather(parts, flat, async_op=True)

    def wait():
        work.wait()
        columns = torch.cat(parts).split([t[0].numel() for t in shares], dim=1)
        return [c.reshape(-1, *t.shape[1:]) for c, t in zip(columns, shares)]
    return wait


class StepRecord:
    """A step taken, logged once the next step is queued: its loss (and an idea's log_stats) are copied to the
    host now, behind the work that makes them, so reading them then waits for this step only, never for the
    next."""

    def __init__(self, run, step, loss):
        self.step, self.tokens_seen = step, run.state["tokens_seen"]
        self.values = {"train_loss": loss, **run.raw_model.log_stats()}  # an idea's, e.g. MoE's expert load
        # on a CPU the step is done when train_step returns
        self.ready, self.done_at = None, time.perf_counter()
        if run.device.type == "cuda":
            self.values = {k: v.detach().to("cpu", non_blocking=True) for k, v in self.values.items()}
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read(self):
        """The values, once the step is done; done_at becomes the time it was (near enough: the host is
        ahead)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.done_at = time.perf_counter()
        return {k: float(v) for k, v in self.values.items()}


def log_step(run, record, t0):
    """The step line of a step taken, its clock read when the step was done (t0: when the clock last started;
    None when it has stopped), or the stop on a non-finite or diverged loss."""
    args, state = run.args, run.state
    values = record.read()
    train_loss, step = values.pop("train_loss"), record.step
    finite = math.isfinite(train_loss)
    if not finite or diverged(run, train_loss, step):
        first_bad = step - run.bad_steps + 1 if finite else step
        # the weights after first_bad - 1 updates gave a bad loss: a checkpoint of them is bad too
        state["checkpoints"] = [c for c in state["checkpoints"] if c[0] < first_bad - 1]
        run.stopped = (f"train_loss is {train_loss} at step {step}" if not finite else
                       f"train_loss diverged at step {first_bad} ({train_loss:.4f} at step {step}, "
                       f"{run.bad_steps} steps running 2 over its best or no better than uniform)")
        good = last_checkpoint(run)
        again = f"resume from {good}" if good else "no good checkpoint was saved: start again"
        run.error = f"error: stopped: {run.stopped}; {again} with {lower_lr_flags(args)}"
        run.log.write(run.error)
        return
    now = state["train_time"] + (record.done_at - t0 if t0 is not None else 0.0)
    step_ms, kilo_tok_per_s = 1000 * now / step, record.tokens_seen / now / 1000
    eta = (args.num_iterations - step) * step_ms / 1000
    eta = min(eta, args.time_budget_s - now) if args.time_budget_s > 0 else eta
    idea_stats = "".join(f" {name}:{value:.2f}" for name, value in values.items())
    track(run, step, dict(train_loss=train_loss, train_time_ms=now * 1000, step_avg_ms=step_ms,
                          tokens_per_s=record.tokens_seen / now, **values))
    run.log.write(f"step:{step}/{args.num_iterations} train_loss:{train_loss:.4f} "
                  f"train_time:{now * 1000:.0f}ms step_avg:{step_ms:.1f}ms "
                  f"tok/s:{kilo_tok_per_s:.{0 if kilo_tok_per_s >= 100 else 1}f}k "
                  f"eta:{format_seconds(max(0.0, eta))}{idea_stats}")


def diverged(run, loss, step):
    """Has the loss diverged? A step's loss is bad when it is no better than guessing uniformly (above
    ln(vocab_size) - 0.1: where a blown-up model sits, the logit cap keeping its loss finite) or 2 nats over the
    best so far; diverge_steps bad steps running, after the LR warm-up, are a divergence. A healthy run is
    below both within a few steps and never 2 over its best for long."""
    args, state = run.args, run.state
    state["best_train_loss"] = min(state["best_train_loss"], loss)
    bad = loss > min(math.log(args.vocab_size) - 0.1, state["best_train_loss"] + 2.0)
    run.bad_steps = run.bad_steps + 1 if bad and step > args.warmup_steps else 0
    return 0 < args.diverge_steps <= run.bad_steps


def lower_lr_flags(args):
    """What to lower after a divergence: the learning rates set above their defaults, or all of them."""
    flags = ["muon_lr", "adam_lr"]
    raised = [f for f in flags if getattr(args, f) > getattr(Hyperparameters, f)] or flags
    return "lower " + ", ".join(f"--{f}={getattr(args, f):g} (default {getattr(Hyperparameters, f):g})"
                                for f in raised)


def at_least(low):
    return lambda v: low <= v < math.inf


def in_range(low, high, high_included=True):
    return lambda v: low <= v <= high if high_included else low <= v < high


NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"  # a plain non-negative decimal number: 1, 1.52, .5, 2e-3

# Every flag's allowed values, in one place, checked after the preset and the flags (and a resumed
# checkpoint's settings): flag -> (test, what is allowed). An idea's own flags are checked by
# IdeaFlags.check().
LIMITS = {
    "vocab_size": (at_least(1), "an integer >= 1"),
    "n_layer": (at_least(1), "an integer >= 1"),
    "n_head": (at_least(1), "an integer >= 1"),
    "n_embd": (at_least(4), "an integer >= 4"),
    "bigram_vocab": (lambda v: v == 0 or 2 <= v < math.inf, "0 (none) or an integer >= 2"),
    "value_embeds": (at_least(0), "an integer >= 0"),
    "attention": (lambda v: v in ("flex", "sdpa"), "flex or sdpa"),
    "seq_len": (at_least(1), "an integer >= 1"),
    "window_blocks": (lambda v: re.fullmatch(r"[1-9][0-9]*(,[1-9][0-9]*)*", v),
                      "whole numbers >= 1, comma-separated"),
    "final_window_blocks": (lambda v: re.fullmatch(r"[1-9][0-9]*,[1-9][0-9]*", v),
                            "two whole numbers >= 1, long,short"),
    "doc_cap": (at_least(0), "an integer >= 0 (0: uncut)"),
    "num_iterations": (at_least(1), "an integer >= 1"),
    "batch_tokens": (at_least(1), "an integer >= 1"),
    "batch_stages": (at_least(1), "an integer >= 1"),
    "device_batch_tokens": (lambda v: v == "auto" or v >= 1, "an integer >= 1, or auto"),
    "warmup_steps": (at_least(0), "an integer >= 0"),
    "stage_lr_mults": (lambda v: v == "auto" or re.fullmatch(rf"{NUMBER}(,{NUMBER})*", v),
                       "auto or numbers >= 0, comma-separated, one per batch stage"),
    "cooldown_frac": (in_range(0, 1), "a number in [0, 1]"),
    "lr_floor": (in_range(0, 1), "a number in [0, 1]"),
    "muon_lr": (at_least(0), "a number >= 0"),
    "muon_momentum": (in_range(0, 1, high_included=False), "a number in [0, 1)"),
    "muon_momentum_warmup_steps": (at_least(0), "an integer >= 0"),
    "muon_momentum_cooldown_steps": (at_least(0), "an integer >= 0"),
    "muon_beta2": (in_range(0, 1, high_included=False), "a number in [0, 1)"),
    "muon_weight_decay": (at_least(0), "a number >= 0"),
    "adam_lr": (at_least(0), "a number >= 0"),
    "adam_eps": (lambda v: 0 < v < math.inf, "a number > 0"),
    "adam_weight_decay": (at_least(0), "a number >= 0"),
    "val_every": (at_least(0), "an integer >= 0 (0: only at the end)"),
    "val_dense_from": (at_least(0), "an integer >= 0 (0: off)"),
    "val_dense_every": (at_least(1), "an integer >= 1"),
    "val_tokens": (at_least(0), "an integer >= 0 (0: no validation)"),
    "target_val_loss": (math.isfinite, "a finite number"),
    "time_budget_s": (at_least(0), "a number of seconds >= 0 (0: off)"),
    "diverge_steps": (at_least(0), "an integer >= 0 (0: never stop on a diverged loss)"),
    "compile": (lambda v: v in (0, 1, "auto"), "0, 1 or auto"),
    "dtype": (lambda v: v in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
    "save_every": (at_least(0), "an integer >= 0 (0: never)"),
}


def check_args(args):
    """A clear error for the first flag outside its allowed values, naming the flag, the value and the range.
    """
    for name, (allowed, what) in LIMITS.items():
        value = getattr(args, name)
        if not allowed(value):
            raise SystemExit(f"error: --{name}={value}: expected {what}")
    # rotary: turning and still channel pairs
    mults = args.stage_lr_mults.split(",")
    if args.stage_lr_mults != "auto" and len(mults) != args.batch_stages:
        raise SystemExit(f"error: --stage_lr_mults={args.stage_lr_mults}: expected {args.batch_stages} "
                         f"multipliers, one per batch stage (--batch_stages={args.batch_stages}), or auto")
    if args.n_embd % 4:
        raise SystemExit(f"error: --n_embd={args.n_embd}: expected a multiple of 4 (heads of a multiple of 4 "
                         f"channels, for rotary), e.g. --n_embd={args.n_embd // 4 * 4 or 4}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 4:
        divisors = [h for h in range(1, args.n_embd + 1)
                    if args.n_embd % h == 0 and (args.n_embd // h) % 4 == 0]
        more = " ..." if len(divisors) > 12 else ""
        raise SystemExit(f"error: --n_head={args.n_head}: must divide --n_embd={args.n_embd} into a head "
                         f"size that is a multiple of 4; choose one of "
                         f"{', '.join(map(str, divisors[:12]))}{more}")
    args.check()  # the idea's own flags
    return args


def parse_value(name, text, kind):
    try:
        if kind is bool and text.lower() in ("1", "true", "0", "false"):
            return text.lower() in ("1", "true")
        if kind == (int | str):
            return text if text == "auto" else int(text)
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        pass
    expected = {bool: "0 or 1", int: "an integer", float: "a number"}.get(kind, "an integer or auto")
    raise SystemExit(f"error: --{name}={text}: expected {expected}")


def usage():
    """--help: every flag with its default and its comment in Hyperparameters (an idea's own flags last, from
    IdeaFlags), then what each preset sets."""
    source = inspect.getsource(Hyperparameters) + inspect.getsource(IdeaFlags)
    helps = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.*)$", source, re.M))
    idea = {f.name for f in dataclasses.fields(IdeaFlags)}
    # stable: idea flags last
    fields = sorted(dataclasses.fields(Hyperparameters), key=lambda f: f.name in idea)
    lines = [f"usage: {os.path.basename(__file__)} [--name=value ...]", ""]
    for f in fields:
        default = int(f.default) if isinstance(f.default, bool) else f.default
        lines.append(f"  --{f.name}={default}".ljust(56) + helps.get(f.name, ""))
    lines.append("\npresets (--preset=NAME; applied first, then the flags):")
    for name, settings in PRESETS.items():
        shown = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in settings.items())
        lines.append(f"  {name}: {shown or 'the defaults above'}")
    return "\n".join(lines)


def parse_args(argv):
    """--name=value flags -> (Hyperparameters, the flags given). The preset applies first, then the flags."""
    kinds = typing.get_type_hints(Hyperparameters)
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        name, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in kinds or not eq:
            raise SystemExit(f"error: unknown flag {arg!r}: flags are --name=value with name one of:\n  "
                             + " ".join(kinds) + "\n(--help shows their defaults)")
        given[name] = parse_value(name, text, kinds[name])
    preset = given.get("preset", Hyperparameters.preset)
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset={preset}: unknown preset; choose one of {', '.join(PRESETS)}")
    return check_args(Hyperparameters(**{**PRESETS[preset], **given})), given


def setup(argv):
    """Everything before the first step, in order. Every bad input is an error here, before anything is
    written. An interrupt before the log is whole leaves nothing; one in the compile warm-up, the interrupted
    line and (from finish()) the summary."""
    try:
        args, ckpt, notes = resolve_flags(argv)
        run = Run(args=args, ckpt=ckpt, notes=notes)
        start_processes(run)
        val_tokens = check_inputs(run)
        build_model(run)
        build_data(run, val_tokens)
        restore_state(run)
        open_log(run, argv)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: interrupted ({signal.Signals(signum).name}) during start-up; nothing was written",
                  file=sys.stderr)
        raise SystemExit(128 + signum) from None
    if run.use_compile:
        try:
            compile_warmup(run)
        except KeyboardInterrupt as e:
            note_interrupt(run, e, "in the compile warm-up")
    return run


def resolve_flags(argv):
    """(settings, checkpoint or None, start-up notes): the preset, then the flags given; when resuming, the
    checkpoint's settings, then the preset if one is given, then the flags given."""
    args, given = parse_args(argv)
    ckpt, notes = None, []
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        preset = PRESETS[given["preset"]] if "preset" in given else {}
        args = check_args(Hyperparameters(**{**ckpt["args"], **preset, **given}))
        if preset:
            notes.append(f"--preset={given['preset']} applied over the checkpoint's settings, then the flags "
                         "given")
    room = max_value_embeds(args.n_layer)  # one table per attention layer at most
    if args.value_embeds > room:
        if "value_embeds" in given:
            raise SystemExit(f"error: --value_embeds={args.value_embeds}: at most {room} for --n_layer="
                             f"{args.n_layer} (one table per attention layer)")
        notes.append(f"value_embeds {args.value_embeds} -> {room}: --n_layer={args.n_layer} has room for "
                     f"{room}")
        args.value_embeds = room
    return args, ckpt, notes


def start_processes(run):
    """Processes and devices: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (plain `python` is one process);
    the dtype, loss scaling, compile, the kernels switch and the process groups."""
    args = run.args
    run.rank, run.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run.master, local_rank = run.rank == 0, int(os.environ.get("LOCAL_RANK", 0))
    run.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if run.device.type == "cuda":
        torch.cuda.set_device(run.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
        # CPU validation runs FlexAttention eagerly (correct, just unfused); no need to say so at every run
        warnings.filterwarnings("ignore", message=r".*flex_attention called without torch\.compile")
    run.amp_dtype = autocast_dtype(args.dtype, run.device)
    run.amp_ctx = (torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype
                   else contextlib.nullcontext())
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    run.use_compile = run.device.type == "cuda" if args.compile == "auto" else bool(args.compile)
    if kernels is not None:
        kernels.set_enabled(args.kernels)
        kernels.pin_configs(run.world > 1)  # identical Muon updates on every rank
    if run.world > 1:
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
        if args.time_budget_s > 0:
            run.clock_group = dist.new_group(backend="gloo")


def folder_problem(path):
    """What stops this process writing into the folder at path (made if missing), or None. Found without
    leaving anything behind: a probe folder, made and removed, in the folder or its nearest existing parent.
    """
    if not path:
        return "is empty"
    folder = os.path.abspath(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if os.path.islink(folder) and not os.path.exists(folder):
        return f"is or lies under a dangling symlink ({folder} -> {os.readlink(folder)})"
    if not os.path.isdir(folder):
        return "is a file" if folder == os.path.abspath(path) else f"cannot be made: {folder} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError as e:
        if folder == os.path.abspath(path):
            return f"cannot be written ({e.strerror})"
        return f"cannot be made in {folder} ({e.strerror})"
    return None


def autocast_dtype(flag, device):
    """--dtype's autocast dtype (None: fp32). auto: bf16 from Ampere on, fp16 (with loss scaling) on older
    GPUs (V100, RTX 20xx), fp32 on a CPU."""
    if flag != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[flag]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def check_inputs(run):
    """The batch geometry, the data and the tracking flags, checked before anything is built; returns the
    validation tokens (None with --val_tokens=0)."""
    args = run.args
    # a stage's batch = world x accumulation x device_batch_tokens; every stage a multiple of the first
    if args.batch_tokens % (args.batch_stages * run.world):
        raise SystemExit(f"error: --batch_tokens={args.batch_tokens} does not split into --batch_stages="
                         f"{args.batch_stages} stages x {run.world} processes")
    per_rank = args.batch_tokens // (args.batch_stages * run.world)  # the first stage's tokens per rank
    row = args.seq_len if args.attention == "sdpa" else 1  # sdpa: micro-batches hold whole rows
    T = args.device_batch_tokens
    if T != "auto" and (per_rank % T or T % row):
        rows = f" and be a multiple of --seq_len={row}" if row > 1 else ""
        raise SystemExit(f"error: --device_batch_tokens={T} must divide the first batch stage's {per_rank} "
                         f"tokens per process{rows}")
    if args.val_tokens == 0 and args.stop_at_target:
        raise SystemExit("error: --stop_at_target=1 needs validation: give --val_tokens > 0 "
                         "(the benchmark's: 1048576)")
    folders = ("log_dir", "compile_cache") if run.use_compile and args.compile_cache else ("log_dir",)
    for flag in folders:
        if problem := folder_problem(getattr(args, flag)):
            raise SystemExit(f"error: --{flag}={getattr(args, flag)} {problem}; give a folder this process "
                             "can write to (it is made if missing)")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise SystemExit(f"error: --wandb_project={args.wandb_project} needs Weights & Biases: "
                         "pip install wandb")
    run.cache_file = compile_cache_file(args, run.device) if run.use_compile and args.compile_cache else None
    if args.val_tokens == 0:
        return None
    check_train_is_not_val(args.train_files, args.val_files)
    return load_val_tokens(args.val_files, args.val_tokens, args.vocab_size)


def build_model(run):
    """The model (a checkpoint's weights when resuming), the micro-batch when it is auto, the optimizers,
    compile and DDP."""
    args, device = run.args, run.device
    torch.manual_seed(args.seed)
    run.raw_model = GPT(GPTConfig.from_args(args)).to(device)
    if run.ckpt is not None:
        try:
            run.raw_model.load_state_dict(run.ckpt["model"])
        except RuntimeError as e:
            lines = str(e).splitlines()
            why = lines[1].strip() if len(lines) > 1 else e
            raise SystemExit(f"error: --resume={args.resume}: its weights do not fit this model ({why}); "
                             "resume without changing the model's shape flags") from None
    # compiled code saved by an earlier run (--compile_cache), loaded before anything compiles
    run.cache_note, run.cache_loaded = load_compile_cache(run.cache_file) if run.cache_file else (None, 0)
    if args.device_batch_tokens == "auto":
        args.device_batch_tokens = auto_device_batch_tokens(run)
        if args.attention == "flex":
            run.raw_model.config.seq_len = args.device_batch_tokens
    run.optimizers = build_optimizers(run.raw_model, args)
    if run.use_compile:  # compiled lazily, at the warm-up's first step
        # each kind of block (value embeddings or not, an idea's own), in training and in evaluation, is an
        # entry of Block.forward's one compile cache: room for 16, not Dynamo's default 8 (AFNO's two kinds
        # fill 8)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        run.raw_model.compile_regions()
    run.model = run.raw_model
    if run.world > 1:  # the rotary tables are built, not learned: no buffers to broadcast
        device_ids = [device.index] if device.type == "cuda" else None
        run.model = DDP(run.raw_model, device_ids=device_ids, broadcast_buffers=False)


def build_data(run, val_tokens):
    """The training loader, and the validation tokens as streams of one micro-batch, each token counted once;
    rank r takes every world-th stream."""
    args, T = run.args, run.args.device_batch_tokens
    if args.val_tokens % (T * run.world):  # (0 is a multiple: no validation)
        raise SystemExit(f"error: --val_tokens={args.val_tokens} is not a multiple of --device_batch_tokens="
                         f"{T} x {run.world} processes (validation streams are micro-batch sized)")
    run.train_loader = DistributedDataLoader(args.train_files, T, run.rank, run.world, run.device,
                                             args.vocab_size, args.doc_cap)
    # no validation: no streams
    val_tokens = np.zeros(1, dtype=np.int64) if val_tokens is None else val_tokens
    run.val_inputs = torch.from_numpy(val_tokens[:-1]).view(-1, 1, T)[run.rank::run.world]
    run.val_targets = torch.from_numpy(val_tokens[1:]).view(-1, 1, T)[run.rank::run.world]


def restore_state(run):
    """The run's counters, and when resuming, the optimizers, loss scaling, data position, RNG and counters.
    """
    run.state = dict(train_time=0.0, val_time=0.0, best_val_loss=math.inf, final_val_loss=None,
                     time_to_target=None, tokens_seen=0, checkpoints=[], best_train_loss=math.inf)
    ckpt = run.ckpt
    if ckpt is None:
        return
    restore_optimizers(run.optimizers, ckpt["optimizers"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.train_loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    run.state.update(ckpt["state"])
    run.start_step = ckpt["step"]
    if ckpt["step"] not in [step for step, _ in run.state["checkpoints"]]:  # saved before its own path was
        run.state["checkpoints"].append([ckpt["step"], run.args.resume])
    if run.master:  # a run killed while saving leaves a temp file beside its checkpoints
        for stale in glob.glob(os.path.join(os.path.dirname(os.path.abspath(run.args.resume)), "*.pt.tmp")):
            os.remove(stale)


def open_log(run, argv):
    """The run log: code, environment, settings, then the start-up lines; the step lines and the summary
    follow. And the experiment tracker, with --wandb_project. A log that fails or is interrupted part-way is
    removed."""
    args, device, T = run.args, run.device, run.args.device_batch_tokens
    run.script_path = os.path.abspath(__file__)
    script = os.path.splitext(os.path.basename(run.script_path))[0]
    run.run_id = f"{script}_{datetime.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:6]}"
    try:
        run.log = log = RunLog(os.path.join(args.log_dir, f"{run.run_id}.txt") if run.master else None)
        log.write(f"# run {run.run_id}: {' '.join([os.path.basename(run.script_path)] + list(argv))}",
                  echo=False)
        run.script_sha = log.source(run.script_path)
        for name in sorted(n for n in sys.modules if n == "kernels" or n.startswith("kernels.")):
            if getattr(sys.modules[name], "__file__", None):
                log.source(sys.modules[name].__file__)
        log.write(f"==== environment ====\n{environment_report(device, run.world)}", echo=False)
        log.write(f"==== hyperparameters ====\n{json.dumps(dataclasses.asdict(args))}", echo=False)
        log.write("==== training ====", echo=False)
        n_params = sum(p.numel() for p in run.raw_model.parameters())
        accumulation = ", ".join(str(s // (T * run.world)) for s in stage_batches(args))
        log.write(f"# {device_name(device)} x{run.world}  params {n_params / 1e6:.2f}M  dtype "
                  f"{run.amp_dtype or torch.float32}  compile {run.use_compile}  kernels "
                  f"{kernels_in_use(args, device)}  micro-batch {T} tokens x accumulation {accumulation} "
                  f"(batch stages {', '.join(map(str, stage_batches(args)))} tokens)  "
                  f"attention {args.attention}  log {log.path}")
        if idea := run.raw_model.describe():  # an idea's own start-up facts (its extra FLOPs, its cache size)
            log.write(f"# {idea}")
        if run.ckpt is not None:
            log.write(f"# resumed from {args.resume} at step {run.start_step}")
        for note in run.notes + ([run.cache_note] if run.cache_note else []):
            log.write(f"# {note}")
        if args.wandb_project and run.master:
            run.tracker = start_tracking(run)
    except BaseException as e:
        if run.log is not None:
            run.log.remove()
        if isinstance(e, WriteError):
            raise SystemExit(f"error: {e}; nothing was kept: free some space or give another "
                             "--log_dir") from None
        raise


def kernels_in_use(args, device):
    """What --kernels makes run, for the start-up line: Triton needs the flag, Triton itself and a GPU (or,
    on a CPU, Triton's interpreter)."""
    if not args.kernels:
        return "off"
    if kernels is None:
        return "off (--kernels=1, but kernels/ is not beside this script: PyTorch ops)"
    if not kernels.use_triton(torch.empty(0, device=device)):
        why = "Triton is not installed" if not kernels.HAS_TRITON else "there is no GPU"
        return f"off (--kernels=1, but {why}: PyTorch ops)"
    return "triton" if device.type == "cuda" else "triton (interpreter)"


def cpu_copy(tree):
    """A copy of every tensor in a state dict (nested dicts and lists), in CPU memory."""
    copy = lambda t: t.detach().to("cpu", copy=True) if torch.is_tensor(t) else t  # noqa: E731
    return torch.utils._pytree.tree_map(copy, tree)


def compile_warmup(run):
    """Compile outside the timed run: one real step (every training graph, and the optimizers' first step),
    one evaluation forward (the evaluation graphs), then the weights, optimizers, data position and token
    count put back as they were. The copies wait in CPU memory, not on the GPU (~1.1 GB at 124M), and are gone
    once restored."""
    from torch._dynamo.utils import counters
    t_compile, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
    saved = dict(model=cpu_copy(run.raw_model.state_dict()), scaler=run.scaler.state_dict(),
                 optimizers=cpu_copy([o.state_dict() for o in run.optimizers]),
                 loader=run.train_loader.state_dict(), tokens=run.state["tokens_seen"])
    loss = float(train_step(run, run.start_step))  # float(): waits for the step, so its compiling is done
    if len(run.val_inputs):  # --val_tokens=0 never evaluates
        run.model.eval()
        with torch.no_grad(), run.amp_ctx:
            float(run.model(run.val_inputs[0].to(run.device), run.val_targets[0].to(run.device)))
        run.model.train()
    run.raw_model.load_state_dict(saved["model"])
    for opt, state in zip(run.optimizers, saved["optimizers"]):
        opt.load_state_dict(state)
    run.scaler.load_state_dict(saved["scaler"])
    run.train_loader.load_state_dict(saved["loader"])
    run.state["tokens_seen"] = saved["tokens"]
    del saved
    run.state["compile_warmup"] = time.perf_counter() - t_compile
    graphs = counters["stats"]["unique_graphs"] - graphs
    evaluation = " and an evaluation forward" if len(run.val_inputs) else ""
    run.log.write(f"# compile warm-up: a step (loss {loss:.4f}){evaluation} in "
                  f"{run.state['compile_warmup']:.1f}s ({graphs} graphs compiled), excluded from train_time; "
                  "weights, optimizers and data put back")
    if run.cache_file and run.master:
        run.log.write(f"# {save_compile_cache(run.cache_file, run.cache_loaded)}")


def compile_cache_file(args, device):
    """--compile_cache=DIR: DIR/<script>-<device>-torch<version>-triton<version>.bin. Compiled code serves
    only the same GPU model (or CPU architecture), torch and Triton, so those name the file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    script = os.path.splitext(os.path.basename(__file__))[0]
    key = f"{script}-{device_name(device)}-torch{torch.__version__}-triton{triton_version}"
    return os.path.join(args.compile_cache, re.sub(r"[^A-Za-z0-9.+_-]+", "_", key) + ".bin")


def load_compile_cache(path):
    """Load compiled code saved by an earlier run, if there is any for this machine: a warm start. A file that
    does not load is a warning (the run compiles as usual), never an error. Returns (the note for the log,
    entries)."""
    if not os.path.exists(path):
        others = sorted(glob.glob(os.path.join(os.path.dirname(path), "*.bin")))
        held = ""
        if others:
            held = f" (it holds {len(others)} other file(s), e.g. {os.path.basename(others[0])})"
        return (f"compile cache: nothing in {os.path.dirname(path) or '.'} for this script, device, torch "
                f"and Triton{held}; compiling, then saving to {path}"), 0
    try:  # torch returns None for a file it cannot read (a truncated one, another torch's format), saying why
        with open(path, "rb") as f:
            info = torch.compiler.load_cache_artifacts(f.read())
    except Exception as e:
        info = e
    if info is None or isinstance(info, Exception):  # compiling from scratch is always correct
        why = f" ({type(info).__name__}: {info})" if isinstance(info, Exception) else ""
        warnings.warn(f"--compile_cache: {path} did not load{why}; compiling from scratch")
        return f"compile cache: {path} did not load; compiling, then saving over it", 0
    entries = sum(len(v) for v in info.artifacts.values())
    return f"compile cache: loaded {entries} entries from {path}", entries


def save_compile_cache(path, loaded):
    """Save everything this process compiled (and loaded) to path, whole or not at all (a temp file, renamed).
    """
    from torch._dynamo.utils import counters
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return f"compile cache: nothing to save to {path}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(artifacts[0])
        os.replace(path + ".tmp", path)
    except OSError as e:  # the cache only saves time: the run goes on without it
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        return f"compile cache: could not save to {path} ({e.strerror}); the next run compiles again"
    if loaded and misses:  # the file held code for another version of the script, or other settings
        warnings.warn(f"--compile_cache: {misses} of {hits + misses} graphs were not in {path} (the script "
                      "or its shape flags differ from the run that saved it); they compiled from scratch, "
                      "and the file now holds them too")
    return (f"compile cache: {hits} graphs found compiled, {misses} compiled anew; saved "
            f"{len(artifacts[0]) / 1e6:.1f} MB to {path}")


def load_checkpoint(path):
    """A checkpoint written by this script, or a clear error that says what the file is and what to do."""
    script = os.path.basename(__file__)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "ckpt_step*.pt")))
        hint = f", e.g. --resume={found[-1]}" if found else " (ckpt_step*.pt, written by --save_every)"
        raise SystemExit(f"error: --resume={path} is a folder; pass a checkpoint file{hint}")
    if not os.path.lexists(path):
        raise SystemExit(f"error: --resume={path}: no such checkpoint file")
    if problem := file_problem(path):
        raise SystemExit(f"error: --resume={path} {problem}; pass a checkpoint file this process can read")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors all mean the same here: not a whole checkpoint
        raise SystemExit(f"error: --resume={path} is not a readable checkpoint ({type(e).__name__}); it is "
                         "truncated or corrupt: resume from an earlier ckpt_step*.pt") from None
    if not isinstance(ckpt, dict) or not {"script", "args", "model", "optimizers", "step"} <= set(ckpt):
        raise SystemExit(f"error: --resume={path} is not a train_gpt2*.py checkpoint (those come from "
                         "--save_every)")
    if ckpt["script"] != script:
        raise SystemExit(f"error: --resume={path} was written by {ckpt['script']}, not {script}: resume it "
                         f"with python {ckpt['script']} --resume={path}")
    unknown = sorted(set(ckpt["args"]) - {f.name for f in dataclasses.fields(Hyperparameters)})
    if unknown:
        raise SystemExit(f"error: --resume={path} has settings this version of {script} does not know "
                         f"({', '.join(unknown)}); resume it with the version of the script that wrote it "
                         "(its run log holds the source)")
    return ckpt


def save_checkpoint(run, step):
    """logs/<run_id>/ckpt_step<step>.pt: everything a resume needs. Written to a temp file and renamed, so it
    is whole or absent, even if the run is killed while saving."""
    path = os.path.join(run.args.log_dir, run.run_id, f"ckpt_step{step:06d}.pt")
    if os.path.exists(path):
        raise SystemExit(f"error: {path} exists; checkpoints are never overwritten")
    cuda = run.device.type == "cuda"
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if cuda else None)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(dict(script=os.path.basename(run.script_path), step=step, rng=rng, state=run.state,
                        model_config=dataclasses.asdict(run.raw_model.config),
                        args=dataclasses.asdict(run.args),
                        model=run.raw_model.state_dict(), optimizers=[o.state_dict() for o in run.optimizers],
                        scaler=run.scaler.state_dict(), loader=run.train_loader.state_dict()), path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        if not isinstance(e, Exception):  # Ctrl-C: the loop's interrupt
            raise
        # torch.save reports a full disk as a RuntimeError without the cause: the free space tells
        free = shutil.disk_usage(os.path.dirname(path) if os.path.isdir(os.path.dirname(path)) else ".").free
        why = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0][:100]
        raise WriteError(f"writing {path} failed ({why}; {free / 1e6:.0f} MB free there)") from None
    run.state["checkpoints"].append([step, path])


def restore_optimizers(optimizers, states):
    """Load the optimizers' saved states (momenta, step counts), keeping the hyperparameters they have now: on
    resume the flags given win over the checkpoint's lr, betas and weight decay."""
    for opt, state in zip(optimizers, states):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        opt.load_state_dict(state)
        for group, now in zip(opt.param_groups, settings):
            group.update(now)


def last_checkpoint(run):
    return run.state["checkpoints"][-1][1] if run.state["checkpoints"] else None


def pick_device_batch_tokens(per_rank, fits):
    """The largest divisor of the per-rank tokens of the first batch stage for which fits(size) holds."""
    for size in (b for b in range(per_rank, 0, -1) if per_rank % b == 0):
        if fits(size):
            return size
    raise SystemExit("error: not even a tiny micro-batch fits in GPU memory; try "
                     "--activation_checkpointing=1")


def memory_stats(device):
    """(peak bytes allocated since the last reset, the device's total bytes)."""
    return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory


def probe_fits(model, args, device, amp_ctx, size):
    """Does a micro-batch of `size` tokens fit? One real forward+backward of the model that will train (the
    compiled one when compile is on: its fused graph needs far less memory than eager's fp32 logits), plus
    room for the optimizer states (at most three fp32 copies of the weights: Adam's two moments and its held
    gradient), within 90% of the device's memory."""
    idx = torch.randint(0, args.vocab_size, (1, size), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with amp_ctx:
            model(idx, idx).backward()
        peak, total = memory_stats(device)
    except torch.OutOfMemoryError:
        peak, total = math.inf, 0
    model.zero_grad(set_to_none=True)
    optimizer_bytes = 12 * sum(p.numel() for p in model.parameters())
    return peak + optimizer_bytes <= 0.9 * total


def auto_device_batch_tokens(run):
    """--device_batch_tokens=auto: the largest micro-batch that fits, agreed on by every rank (the smallest
    rank's answer: ranks that ran different numbers of micro-steps would wait on each other forever)."""
    args, model = run.args, run.raw_model
    per_rank = args.batch_tokens // (args.batch_stages * run.world)  # the first stage's tokens per rank
    row = args.seq_len if args.attention == "sdpa" else 1  # sdpa: whole rows
    if run.device.type == "cuda" and run.use_compile:
        model.compile_regions(dynamic=True)  # dynamic shapes: one compile serves every probed size

    def fits(size):  # a CPU has no memory limit to probe: the largest
        if run.device.type != "cuda":
            return size % row == 0
        return size % row == 0 and probe_fits(model, args, run.device, run.amp_ctx, size)
    size = pick_device_batch_tokens(per_rank, fits)
    if run.device.type == "cuda" and run.use_compile:
        torch._dynamo.reset()
    if run.world > 1:
        agreed = torch.tensor(size, device=run.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # divisors of the same number: the minimum is one too
        size = int(agreed.item())
    return size


def agreed_elapsed(run, elapsed):
    """The training time the schedules and the time budget act on. On several processes every rank must take
    the same LR and stop on the same step, so all act on rank 0's clock, broadcast on a CPU (gloo) group
    without waiting: each step uses the value sent at the step before (one step old, the same on every rank).
    """
    if run.clock_group is None:
        return elapsed
    sent = torch.tensor([elapsed], dtype=torch.float64)
    previous, run.clock = run.clock, (sent, dist.broadcast(sent, src=0, group=run.clock_group, async_op=True))
    value, work = previous or run.clock  # the first step waits for its own value
    work.wait()
    return float(value)


class Interrupt(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as an exception that knows which."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """Ctrl-C and SIGTERM (a scheduler's kill) both raise Interrupt, from start-up to the summary, so either
    ends a run the same way: a log line, a summary, no half file (or, before the log, nothing at all)."""
    def interrupt(signum, frame):
        raise Interrupt(signum)
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in (previous or {}).items():
            signal.signal(s, handler)


@contextlib.contextmanager
def errors_from_rank_zero():
    """Under torchrun every rank hits the same bad input: rank 0 prints the message, the others exit quietly
    with the same code (a SystemExit with a number prints nothing)."""
    try:
        yield
    except SystemExit as e:
        if int(os.environ.get("RANK", 0)) != 0 and not isinstance(e.code, int | None):
            raise SystemExit(1) from None
        raise


class WriteError(Exception):
    """Writing the log or a checkpoint failed (a full disk, a lost mount): the run stops with one error
    line."""


class RunLog:
    """logs/<run_id>.txt (opened with 'x', so never overwritten) and stdout, on rank 0 only. After a failed
    write the log is closed and the rest goes to stdout only."""

    def __init__(self, path):
        self.path, self.file, self.made = path, None, []
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            while not os.path.exists(folder):  # the folders it makes, removed with a log that failed
                self.made.append(folder)
                folder = os.path.dirname(folder)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self.file = open(path, "x", encoding="utf-8", newline="", buffering=1)
            except OSError as e:
                raise WriteError(f"creating {path} failed ({e.strerror})") from None

    def write(self, text, echo=True):
        if self.path and echo:
            print(text.rstrip("\n"), flush=True)
        if self.file is not None:
            try:
                self.file.write(text if text.endswith("\n") else text + "\n")
            except OSError as e:
                with contextlib.suppress(OSError):
                    self.file.close()
                self.file = None
                raise WriteError(f"writing {self.path} failed ({e.strerror})") from None

    def remove(self):
        """Delete a log that never got past its header: a start-up that failed leaves no half file."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        self.file = None
        with contextlib.suppress(OSError):
            if self.path:
                os.remove(self.path)
            for folder in self.made:  # deepest first; a folder something else has written into stays
                os.rmdir(folder)

    def source(self, path):  # the exact text, framed by its length and hash so records/ can verify it
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(__file__)))
        self.write(f"==== source {rel} sha256={sha} chars={len(text)} ====\n{text}\n", echo=False)
        return sha


def environment_report(device, world):
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}",
             f"device {device_name(device)}  world_size {world}  platform {platform.platform()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    return "\n".join(lines)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def format_seconds(s):
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory():
    """On a Linux CPU, glibc hands every freed buffer over 32 MB back to the OS and page-faults it in again at
    the next allocation, and CPU training frees ~100 MB of logits per op. Keeping freed memory for reuse makes
    CPU runs several times faster, with the same numbers."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        never = 2**31 - 1  # bytes: no buffer is ever mmap-ed apart, nor trimmed away
        for param, value in ((M_MMAP_THRESHOLD, never), (M_TRIM_THRESHOLD, never), (M_TOP_PAD, 512 * 2**20)):
            libc.mallopt(param, value)


def start_tracking(run):
    """--wandb_project: a Weights & Biases run of rank 0 holding the settings; track() then logs every step
    line's numbers and every validation, and finish() the summary. wandb is imported here only: without the
    flag nothing is imported or contacted. With WANDB_MODE=offline it writes a local run folder
    (wandb/offline-run-*), which `wandb sync` uploads later."""
    import wandb
    return wandb.init(project=run.args.wandb_project, name=run.args.wandb_run_name or run.run_id,
                      config=dataclasses.asdict(run.args), dir=run.args.log_dir)


def track(run, step, values):
    """Log values (a step line's numbers, a validation) to the tracker at this step, if there is one."""
    if run.tracker is not None:
        run.tracker.log(values, step=step)


def finish(run, steps):
    """The summary line (also on an early stop or an interrupt), then an error exit if the run did not end
    well."""
    args, state = run.args, run.state
    finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731  (JSON has no Infinity)
    peak_gb = (torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9  # CPU: peak RSS
    summary = dict(script=os.path.basename(run.script_path), script_sha256=run.script_sha,
                   target_val_loss=args.target_val_loss, val_tokens=args.val_tokens,
                   best_val_loss=finite(state["best_val_loss"]),
                   final_val_loss=finite(state["final_val_loss"]),
                   reached=state["time_to_target"] is not None, time_to_target_s=state["time_to_target"],
                   train_time_s=state["train_time"], tokens_seen=state["tokens_seen"], steps=steps,
                   peak_mem_gb=round(peak_gb, 3), device=device_name(run.device), world_size=run.world,
                   run_id=run.run_id, compile_warmup_s=state.get("compile_warmup"),
                   val_time_s=state["val_time"], stopped=run.stopped, last_checkpoint=last_checkpoint(run))
    try:
        run.log.write(json.dumps({"summary": summary}, allow_nan=False))
    except WriteError as e:  # printed, but not in the log
        run.error = run.error or f"error: {e}; the summary above is not in the log"
    if run.tracker is not None:
        run.tracker.summary.update(summary)
        run.tracker.finish(exit_code=1 if run.error or run.interrupted else 0)
    if run.world > 1 and not run.interrupted:
        dist.barrier()  # every rank done with the group before one tears it down (gloo may abort a rank)
        dist.destroy_process_group()
    if run.error:
        raise SystemExit(run.error)
    if run.interrupted:
        raise SystemExit(128 + run.interrupted)  # the shell's convention for a process ended by a signal
    return summary


if __name__ == "__main__":
    main()

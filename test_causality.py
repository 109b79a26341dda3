"""Causality of every train script's model and every output it computes (DESIGN.md, "Tests").

A model lists its outputs in `GPT.causal_outputs(idx)` as name -> (tensor with time on dim 1, lookahead): the value
at position p may depend on tokens <= p + lookahead only (0 for next-token logits; d for a depth-d multi-token
head). Two checks, in fp32 on CPU with randomised weights (the zero-initialised projections would hide leaks):
  1. changing every token after position t leaves each output at positions <= t - lookahead unchanged;
  2. the gradient of output position p with respect to the embedding outputs at positions > p + lookahead is 0.
Attention models must match exactly; a model may set `GPT.causality_tolerance` (relative to the outputs' scale)
when its arithmetic reorders with the sequence (an FFT mixer, ~1e-5), far below any real leak. Each check is
shown to fail on a deliberately leaky variant.
"""
import math

import pytest
import torch

from tests.helpers import SCRIPTS, load_script, random_model

VOCAB, T = 512, 24


def build(module):
    return random_model(module, f"--vocab_size={VOCAB}")


def embedding_outputs(model):
    """Capture every embedding lookup's output (B, T, C) during a forward, so gradients can be read from it."""
    captured, hooks = [], []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            hooks.append(m.register_forward_hook(keep, prepend=True))  # before any other hook
    return captured, hooks


def find_leaks(model):
    """Every violation of the two properties, as readable strings; empty when the model is causal."""
    tolerance = model.causality_tolerance
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        base = model.causal_outputs(idx)
    leaks = []
    for t in (0, 1, T // 2, T - 2):  # change every token after position t
        changed = idx.clone()
        changed[:, t + 1:] = (idx[:, t + 1:] + torch.randint(1, VOCAB, (2, T - t - 1))) % VOCAB
        with torch.no_grad():
            other = model.causal_outputs(changed)
        for name, (out, lookahead) in base.items():
            last = t - lookahead
            if last < 0:
                continue
            a, b = out[:, :last + 1].float(), other[name][0][:, :last + 1].float()
            # equal infinities (a masked-out logit) are unchanged; a NaN or an infinity that moved is a leak
            err = (a - b).abs().masked_fill(a == b, 0).nan_to_num(nan=math.inf).max().item()
            finite = out.float()[out.float().isfinite()]
            if err > tolerance * (finite.abs().max().item() if finite.numel() else 1.0):
                leaks.append(f"{name}: changing tokens after {t} moved positions <= {last} by {err:.3g}")

    captured, hooks = embedding_outputs(model)
    try:
        outputs = model.causal_outputs(idx)
        embedded = [e for e in captured if e.ndim == 3 and e.shape[1] == T]
        assert embedded, "the model looked up no (B, T, C) embedding of idx"
        for name, (out, lookahead) in outputs.items():
            for p in (0, T // 2, T - 1):
                if p >= out.shape[1]:
                    continue
                for e in embedded:
                    e.grad = None
                out[:, p].float().sum().backward(retain_graph=True)
                for e in embedded:
                    later = e.grad[:, p + lookahead + 1:] if e.grad is not None else torch.zeros(0)
                    scale = max(e.grad.abs().max().item(), 1e-30) if e.grad is not None else 1.0
                    if later.numel() and not later.abs().max().item() <= tolerance * scale:  # NaN: a leak too
                        leaks.append(f"{name}: position {p} has a gradient from positions > {p + lookahead}")
    finally:
        for h in hooks:
            h.remove()
    return leaks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_output_is_causal(script):
    model = build(load_script(script))
    assert "logits" in model.causal_outputs(torch.zeros(1, T, dtype=torch.long))
    assert find_leaks(model) == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_leaky_variant_is_caught(script):
    """Add the next position's embedding to each position: both checks must report it."""
    model = build(load_script(script))
    leak = lambda module, inputs, output: output + output.roll(-1, dims=1)  # noqa: E731
    hooks = [m.register_forward_hook(leak) for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    leaks = find_leaks(model)
    for h in hooks:
        h.remove()
    assert any("changing tokens" in s for s in leaks) and any("gradient" in s for s in leaks), leaks


def test_a_leak_into_masked_out_logits_is_caught():
    """-inf logits (a masked vocabulary, as LightRNN's empty cells) must not blind the check: -inf - -inf is NaN, and
    NaN > tolerance is False. A future token that unmasks an earlier logit, or makes it NaN, is a leak."""
    class Masked(torch.nn.Module):
        causality_tolerance = 0.0

        def __init__(self, poison):
            super().__init__()
            self.wte, self.poison = torch.nn.Embedding(VOCAB, 4), poison

        def causal_outputs(self, idx):
            x = self.wte(idx)
            out = torch.cat((x, torch.full_like(x[..., :1], -math.inf)), -1)  # one logit masked out everywhere
            last = idx[:, -1:, None].float()  # the last token reaches back: into the masked logit, or as NaN
            out = out.clone()
            out[:, :1, -1:] = self.poison(last)
            return {"logits": (out, 0)}

    assert find_leaks(Masked(lambda last: torch.full_like(last, -math.inf))) == []  # stays masked: no leak
    for poison in (lambda last: last, lambda last: last * math.nan):
        assert any("changing tokens" in s for s in find_leaks(Masked(poison)))

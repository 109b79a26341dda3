"""Causal AFNO token mixing (train_gpt2_afno.py): what the idea promises, as tests.

Guibas et al. 2021's AFNO mixes tokens through the FFT of the whole sequence, which sees the future; here the mixing is a
causal convolution applied by a zero-padded FFT, in the layout's attention layers that --attn_layers leaves to AFNO
(124M: 4, 5, 7-10 of v3's 11; layer 6 has no attention to replace). The generic tests (test_causality.py,
tests/test_model.py, ...) cover the script too; these check: causality when any one token changes, the last included
(the original leak), for all-AFNO, hybrid and 11-layer models; that this check catches a circular FFT (no padding);
the FFT convolution against a direct O(T^2) sum; the document choice (AFNO layers see across documents, attention
layers do not); cached decoding = the full forward; the layer selection, what a mixer layer keeps of v3's attention
pieces (its value embedding, gated; none of the rest) and flag errors; torch.compile without graph breaks; the FFT in
fp32 under bf16 autocast; parameters, FLOPs, cache and optimizer groups at 124M.
"""
import copy
import re

import pytest
import torch

from tests.helpers import (ROOT, assert_reordering_only, decode_in_pieces, load_script, random_model, tokens,
                           ulp_nudged)

afno = load_script(ROOT / "train_gpt2_afno.py")
EOT, VOCAB = 50256, 50304
DEEP = ["--n_layer=11", "--n_embd=64", "--n_head=2", "--value_embeds=5", "--bigram_vocab=1000"]  # v3's layout


def mixers(model):
    return [b.afno for b in model.blocks if b.afno is not None]


def build(*flags):
    """A tiny fp32 model with random weights (zero-initialised projections would hide a leak), in eval mode."""
    return random_model(afno, f"--vocab_size={VOCAB}", *flags)


def causality_violations(model, idx, positions):
    """Change the one token at each position s: logits at t < s must not move (beyond the FFT's rounding, relative to
    the logits' scale), and those at s must (else the check would be blind). Returns the violations, as strings."""
    tolerance = type(model).causality_tolerance
    with torch.no_grad():
        base = model(idx)
        found = []
        for s in positions:
            changed = idx.clone()
            changed[:, s] = (idx[:, s] + 1 + s) % 50000
            moved = (model(changed) - base).abs().amax(dim=(0, 2))  # per position
            if moved[:s].numel() and moved[:s].max() > tolerance * base.abs().max():
                found.append(f"token {s} moved position {int(moved[:s].argmax())} by {moved[:s].max():.3g}")
            if moved[s] < 1e-3:
                found.append(f"token {s} did not move its own position's logits: the check is blind")
    return found


T = 40
POSITIONS = (1, 7, T // 2, T - 2, T - 1)  # the last: a circular convolution leaks from there into position 0


@pytest.mark.parametrize("flags", [["--attn_layers=none"], ["--attn_layers=0", "--n_layer=3"], ["--n_layer=4"],
                                   ["--attn_layers=none", "--afno_kernel_len=5"], DEEP],
                         ids=["all-afno", "attention-then-afno", "auto-hybrid", "short-kernel", "11-layers"])
def test_changing_any_token_moves_no_earlier_output(flags):
    model = build(*flags)
    assert mixers(model)
    assert causality_violations(model, tokens(2, T), POSITIONS) == []


def circular_fft_conv(u, kernel):
    """The original leak: the FFT of length T (no zero padding) is a circular convolution, so position t also sums
    kernel[tau] * u[t - tau + T] for tau > t, from the end of the sequence."""
    T = u.size(1)
    spectrum = torch.fft.rfft(kernel[:, :T].float(), n=T)
    u_hat = torch.fft.rfft(u.float(), n=T, dim=1)
    z = torch.fft.irfft(u_hat.unflatten(-1, (kernel.size(0), -1)) * spectrum.T[:, :, None], n=T, dim=1)
    return z.flatten(-2).type_as(u)


@pytest.mark.parametrize("flags", [["--attn_layers=none"], ["--attn_layers=0"]], ids=["all-afno", "hybrid"])
def test_the_causality_check_catches_a_circular_convolution(flags, monkeypatch):
    model = build(*flags)
    monkeypatch.setattr(afno, "causal_fft_conv", circular_fft_conv)
    found = causality_violations(model, tokens(2, T), POSITIONS)
    assert any(f.startswith(f"token {T - 1} moved") for f in found), found  # the last token reaches position 0


def direct_conv_reference(u, kernel):
    """z[b, t, c] = sum over tau = 0..min(t, K - 1) of kernel[c's block, tau] * u[b, t - tau, c], term by term."""
    B, T, C = u.shape
    n, K = kernel.shape
    z = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        for tau in range(min(t + 1, K)):
            z[:, t] += kernel[:, tau].double().repeat_interleave(C // n) * u[:, t - tau].double()
    return z


@pytest.mark.parametrize("T,K", [(37, 9), (32, 32), (20, 50)])
def test_fft_convolution_equals_the_direct_causal_sum(T, K):
    torch.manual_seed(0)
    u, kernel = torch.randn(2, T, 12), torch.randn(3, K)
    reference = direct_conv_reference(u, kernel)
    torch.testing.assert_close(afno.causal_fft_conv(u, kernel).double(), reference, atol=1e-5, rtol=1e-5)
    for past in (0, T // 2, T - 1):  # decoding's direct sum over the cache, for the positions after `past`
        torch.testing.assert_close(afno.causal_direct_conv(u, kernel, past).double(), reference[:, past:],
                                   atol=1e-5, rtol=1e-5)
    assert (circular_fft_conv(u, kernel).double() - reference).abs().max() > 0.1  # the reference sees the difference


def test_fft_runs_in_fp32_under_bf16_autocast():
    """bf16 in, bf16 out, but the transforms in fp32: the result is the fp32 convolution of the same bf16 input,
    rounded once to bf16 (a bf16 FFT would be off by ~1e-2 relative)."""
    torch.manual_seed(0)
    u, kernel = torch.randn(1, 256, 16).bfloat16(), torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = afno.causal_fft_conv(u, kernel)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, afno.causal_fft_conv(u.float(), kernel).bfloat16(), atol=0, rtol=0)


def document_effect(model):
    """Change every token of the first document (0..11): how far the later documents' logits (12..) move."""
    idx = tokens(2, 40, eots=(0, 12))
    changed = idx.clone()
    changed[:, 1:12] = (idx[:, 1:12] + 7) % 50000
    with torch.no_grad():
        return (model(idx)[:, 12:] - model(changed)[:, 12:]).abs().max().item()


def test_afno_layers_see_across_documents_and_attention_layers_do_not():
    """The choice (AFNOMixer's docstring): one FFT over the packed stream, so AFNO layers see earlier documents, as a
    plain causal LM over packed text; the val loss then uses context the baseline's attention does not. The same
    model with every layer attention keeps v2's isolation exactly."""
    assert document_effect(build("--n_layer=4", "--attn_layers=all")) == 0.0
    for flags in (["--attn_layers=none"], ["--n_layer=4"]):
        assert document_effect(build(*flags)) > 1e-3


@pytest.mark.parametrize("flags,idx,pieces", [
    (["--n_layer=4", "--window_blocks=1"], tokens(2, 170, eots=(0, 150)), [140, 5] + [1] * 25),
    (["--attn_layers=none", "--afno_kernel_len=16"], tokens(2, 40, eots=(0, 21)), [9, 1, 20] + [1] * 10),
    (["--n_layer=4", "--attention=sdpa", "--seq_len=20"], tokens(2, 20), [7, 5] + [1] * 8),
    (["--attn_layers=none", "--attention=sdpa", "--seq_len=20"], tokens(2, 20), [7, 5] + [1] * 8),
    (DEEP + ["--window_blocks=1"], tokens(2, 40, eots=(0, 9, 21)), [9, 1, 20] + [1] * 10),
], ids=["hybrid-flex", "all-afno-short-kernel", "hybrid-sdpa", "all-afno-sdpa", "11-layers"])
def test_cached_decoding_matches_the_full_forward(flags, idx, pieces):
    """A prefill, a block, single tokens: AFNO layers cache u (value embeddings included: every layer of the 4-layer
    models has one, and layers 8-10 of the 11) and sum the kernel over it directly; this equals the full forward's FFT
    convolution. all-afno-sdpa: no layer caches keys, so the position comes from the cache's own count; 11 layers:
    smear, the bigram hash and the key offset decode alongside the mixers."""
    model = build(*flags)
    with torch.no_grad():
        full = model(idx)
        cached, cache = decode_in_pieces(model, idx, pieces)
    torch.testing.assert_close(cached, full, atol=2e-4, rtol=2e-4)
    afno_layers = [layer for layer, block in zip(cache["layers"], model.blocks) if block.afno is not None]
    assert afno_layers and all(layer["u"].shape == (2, idx.size(1), 64) for layer in afno_layers)


def test_sdpa_rows_are_mixed_on_their_own():
    """--attention=sdpa: GPT.forward cuts the stream into causal rows of seq_len, and the FFT runs per row."""
    model = build("--attn_layers=none", "--attention=sdpa", "--seq_len=16")
    idx = tokens(1, 32)
    changed = idx.clone()
    changed[:, :16] = (idx[:, :16] + 7) % 50000
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, VOCAB) and torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


@pytest.mark.parametrize("spec,n_layer,expected", [("auto", 11, {0, 1, 2, 3}), ("auto", 2, {0}), ("auto", 1, {0}),
                                                   ("all", 3, {0, 1, 2}), ("all", 11, set(range(11)) - {6}),
                                                   ("none", 11, set()), ("1,5", 11, {1, 5})])
def test_attn_layers_selects_the_attention_layers(spec, n_layer, expected):
    """The layers listed keep attention; the layout's other attention layers mix by AFNO; the record's layer 6 of 11,
    without attention, gets neither."""
    args, _ = afno.parse_args(["--preset=tiny", f"--n_layer={n_layer}", f"--attn_layers={spec}"])
    with torch.device("meta"):
        model = afno.GPT(afno.GPTConfig.from_args(args))
    assert {i for i, b in enumerate(model.blocks) if b.attn is not None} == expected
    without = {6} if n_layer == 11 else set()
    assert {i for i, b in enumerate(model.blocks) if b.afno is not None} == set(range(n_layer)) - expected - without
    assert all(isinstance(b.afno, afno.AFNOMixer) for b in model.blocks if b.afno is not None)
    assert not any(b.attn is not None and b.afno is not None for b in model.blocks)


def test_mixer_layers_keep_their_value_embeddings_and_none_of_the_other_attention_pieces():
    """v3's 11 layers under auto: the mixers at 4, 5, 7-10 have no attention scale, rotary, window, key offset (10), XSA
    (4, 7) or sparse attention gate; 8-10 keep their value-embedding tables, gated per block as attention gates them per
    head. Skip 3 -> 6 and the backout of 7 keep their layers. No parameter is dead: from random weights, every one has
    a gradient."""
    model = build(*DEEP).train()
    layout = model.layout
    assert [i for i, b in enumerate(model.blocks) if b.afno is not None] == [4, 5, 7, 8, 9, 10]
    assert (layout.skip, layout.backout) == ((3, 6), 7) and len(model.value_embeds) == 5
    for i in (4, 5, 7, 8, 9, 10):
        names = {n for n, _ in model.blocks[i].afno.named_parameters()}
        assert names == {"w_in", "w_hidden", "w_out", "kernel", "lambdas"} | ({"ve_gate.weight"} if i >= 8 else set())
    idx = tokens(2, 40, eots=(0, 21)) % 1000
    model(idx, tokens(2, 40, seed=2) % 1000).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().max() > 0] == []


@pytest.mark.parametrize("flags,message", [
    ("--attn_layers=2", "--attn_layers=2: expected auto, all, none or distinct layers among 0,1 (those with"),
    ("--attn_layers=0,0", "distinct layers among"), ("--attn_layers=first", "distinct layers among"),
    ("--attn_layers=-1", "distinct layers among"), ("--n_layer=11 --attn_layers=3,6", "among 0,1,2,3,4,5,7,8,9,10 ("),
    ("--afno_blocks=3", "--afno_blocks=3: expected a divisor of --n_embd=64"),
    ("--afno_blocks=0", "expected a divisor"), ("--afno_kernel_len=0", "expected an integer >= 1"),
    ("--afno_shrink=-0.1", "a number >= 0"), ("--afno_shrink=inf", "a number >= 0")])
def test_bad_afno_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)) as error:  # when the flags are parsed
        afno.parse_args(["--preset=tiny", *flags.split()])
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)


def test_soft_shrinkage_zeroes_the_small_kernel_taps():
    """k = softshrink(w, lambda) * envelope: taps with |w| <= lambda contribute nothing, the others shrink by lambda."""
    model = build("--attn_layers=none", "--afno_shrink=0.3", "--afno_kernel_len=8")
    mixer = model.blocks[0].afno
    with torch.no_grad():
        mixer.kernel.copy_(torch.linspace(-1, 1, mixer.kernel.numel()))
    seen = []
    original = afno.causal_fft_conv
    afno.causal_fft_conv = lambda u, kernel: seen.append(kernel) or original(u, kernel)
    try:
        with torch.no_grad():
            model(tokens(1, 8))
    finally:
        afno.causal_fft_conv = original
    w = mixer.kernel.view(8, 8)
    expected = torch.where(w.abs() > 0.3, w - 0.3 * w.sign(), 0.0) * mixer.envelope
    torch.testing.assert_close(seen[0], expected)
    assert (seen[0] == 0).sum() > 10


def test_compile_matches_eager_without_graph_breaks():
    """fullgraph=True fails on any graph break: the FFTs, the complex product and the block-diagonal einsums compile
    (Inductor, CPU); the loss and the kernel's gradient are eager's up to fp32 reordering (tests/helpers.py)."""
    model = build("--n_layer=2", "--attn_layers=0").train()
    idx, targets = tokens(1, 64), tokens(1, 64, seed=2)
    losses, grads = [], []
    for m in (torch.compile(model, fullgraph=True), copy.deepcopy(model).double(),
              model, ulp_nudged(model, 1), ulp_nudged(model, 2)):  # the last three: eager's yardstick (tests/helpers.py)
        m.zero_grad()
        loss = m(idx, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(mixers(m)[0].kernel.grad.clone())
    compiled, reference, eager = 0, 1, slice(2, None)
    assert_reordering_only(losses[compiled], losses[eager], losses[reference], "loss")
    assert_reordering_only(grads[compiled], grads[eager], grads[reference], "the kernel's gradient")
    assert grads[2].abs().max() > 0


def test_124m_parameters_flops_cache_and_optimizer_groups():
    """v3's 11 layers, 10 with attention; auto keeps it in 0-3 and trades it in 4, 5, 7-10 for AFNO. Parameters: an
    attention layer has q, k, v, o (4 x 768^2 = 2,359,296), its sparse gate (6 x 12) and 2 lambdas, 2,359,370; 8-10
    add a value-embedding gate (6 x 12), 4 and 7 XSA (6). A mixer has 3 x 8 x 96 x 96 = 221,184 block weights, 8 x
    1408 kernel taps and 2 lambdas, 232,450; 8-10 add their value-embedding gate (8 blocks x 12). Every table stays
    (8-10's value embeddings feed their mixers): 539,100,320 (tests/test_model.py) - 6 x 2,359,370 - 3 x 72 - 2 x 6
    + 6 x 232,450 + 3 x 96 = 526,338,860.
    Training FLOPs per token, counted as tests/test_model.py counts the baseline's (SDPA over a causal row of 1408
    tokens): 6 per weight that multiplies (4 attention layers' 4 x 768^2, 11 MLPs, 6 mixers' block weights, the head,
    the gates: 4 x 72 attention, 2 x 72 and 3 x 96 value-embedding, 12 skip, 12 smear) plus attention's 12 x 768 x
    1408 in 4 layers: 659,722,608, 19.0% under the baseline's 814,553,568. FlopCounterMode counts no FFT: about
    (2 x 2.5 x 2T log2(2T) + 6 (T + 1)) / T per channel and pass, ~0.3% more at T = 16,384 (the training stream).
    Decoding cache: attention's k and v, 2 x 768 numbers per token, in 4 layers; a mixer's u, 768, in 6: 10,752 per
    token against the baseline's 15,360 (-30%). The kernels are 1-D, so Adam's scalar group takes them; the
    (8, 96, 96) block weights go to Muon, orthogonalised block by block."""
    from torch.utils.flop_counter import FlopCounterMode
    args, _ = afno.parse_args(["--attention=sdpa", "--seq_len=1408"])
    with torch.device("meta"):
        model = afno.GPT(afno.GPTConfig.from_args(args))
    assert [i for i, b in enumerate(model.blocks) if b.attn is not None] == [0, 1, 2, 3]
    assert [i for i, b in enumerate(model.blocks) if b.afno is not None] == [4, 5, 7, 8, 9, 10]
    mixer = model.blocks[4].afno
    assert sum(p.numel() for p in mixer.parameters()) == 3 * 8 * 96 * 96 + 8 * 1408 + 2 == 232_450
    assert sum(p.numel() for p in model.blocks[8].afno.parameters()) == 232_450 + 8 * 12
    assert sum(p.numel() for p in model.parameters()) == (539_100_320 - 6 * 2_359_370 - 3 * 72 - 2 * 6
                                                          + 6 * 232_450 + 3 * 96) == 526_338_860
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        idx = torch.zeros(1, 1408, dtype=torch.long)
        model(idx, idx).backward()
    weights = (4 * 4 * 768 ** 2 + 11 * 2 * 768 * 3072 + 6 * 3 * 8 * 96 * 96 + 50304 * 768
               + 4 * 72 + 2 * 72 + 3 * 96 + 12 + 12)
    assert counter.get_total_flops() / 1408 == 6 * weights + 12 * 4 * 768 * 1408 == 659_722_608
    assert 4 * 2 * 768 + 6 * 768 == 10_752 and 10 * 2 * 768 == 15_360
    adam, muon = afno.build_optimizers(model, args)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    scalar_group = next(g for g in adam.param_groups if g["name"] == "scalars")
    assert scalar_group["lr"] * scalar_group["lr_mul"] == pytest.approx(0.04) and scalar_group["wd_mul"] == 0
    assert id(mixer.kernel) in {id(p) for p in scalar_group["params"]}
    assert {id(mixer.w_in), id(mixer.w_hidden), id(mixer.w_out)} <= muon_ids
    assert not any(p.is_complex() for p in mixer.parameters())

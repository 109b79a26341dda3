"""Multi-head Latent Attention (train_gpt2_mla.py): what the idea promises, as tests.

DeepSeek-V2 section 2.1: keys and values are up-projected from a small per-token latent c_kv, position enters through a
decoupled rotary key shared by the heads, and decoding caches only (c_kv, rotary key), attending in latent space with
W_uk absorbed into the query and W_uv applied after attention. The generic tests (test_causality.py,
tests/test_model.py, tests/test_attention.py, ...) cover the script too; these check the MLA specifics and how it meets
the v3 baseline: absorbed decoding = the training path under the document masks and windows, from position 0, with
the key offset, XSA, gated value embeddings, smear and the bigram hash in play; what the cache holds; YaRN and the
attention scale on the rotary part; the key offset on the latent; QK-norm of each head's whole key; equal q/k/v widths
wherever SDPA runs (so its flash kernels can), v unpadded for FlexAttention; parameters and FLOPs at 124M against the
baseline; low-rank queries; a 4096-token stream.
"""
import contextlib
import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import ROOT, decode_in_pieces, load_script, read_log, small_args, tokens

mla = load_script(ROOT / "train_gpt2_mla.py")
baseline = load_script(ROOT / "train_gpt2.py")
EOT, VOCAB = 50256, 50304  # documents need the real <|endoftext|> id
# the record's 11-layer layout at width 64: no attention in layer 6, the key offset in the long layers 3 and 10, XSA
# in 1, 3, 4, 7, gated value embeddings in 0, 1, 8, 9, 10, the skip 3 -> 6 and the backout of layer 7
DEEP = ["--n_layer=11", "--value_embeds=5", "--bigram_vocab=1000"]


def build(*flags, randomise=True, **named):
    """A tiny fp32 model (n_embd 64, 2 heads: latent 32, rotary 16), in eval mode; random weights by default (lambdas
    and gates included), since the zero-initialised projections, gates and head would hide cache bugs."""
    argv = ["--preset=tiny", f"--vocab_size={VOCAB}", *flags] + [f"--{k}={v}" for k, v in named.items()]
    args, _ = mla.parse_args(argv)
    torch.manual_seed(0)
    model = mla.GPT(mla.GPTConfig.from_args(args)).float().eval()
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
    return model


def build_124m(module, *flags):
    args, _ = module.parse_args(list(flags))
    with torch.device("meta"):
        return module.GPT(module.GPTConfig.from_args(args))


def attention_layers(model):
    return [block.attn for block in model.blocks if block.attn is not None]


def documents_from_0_and_1():
    """Two rows of 20 tokens: documents at 0 and 9 in one; at 0, 1 and 15 in the other (a one-token document)."""
    idx = tokens(2, 20)
    idx[0, [0, 9]] = EOT
    idx[1, [0, 1, 15]] = EOT
    return idx


# flex: documents start at 0 and 150; the 128-token short window cuts into the first for queries 128..149, which
# decoding reaches (prefill 140), and the second document begins while decoding; the second window stage, so the
# rotary frequencies are YaRN-stretched and the scale grown. "from the first token": single tokens at positions 0
# and 1, windows of 6 and 3 tokens. sdpa: plain causal rows of seq_len. All with the 11-layer layout (DEEP).
DECODING = {
    "flex": (["--window_blocks=1,2"], tokens(2, 170, eots=(0, 150)), [140, 5] + [1] * 25),
    "flex, from the first token": ([], documents_from_0_and_1(), [1, 1, 5, 5] + [1] * 8),
    "flex, low-rank q, wide latent": (["--window_blocks=1,2", "--q_lora_rank=24", "--kv_lora_rank=40",
                                       "--rope_head_dim=8"], tokens(2, 170, eots=(0, 150)), [140, 5] + [1] * 25),
    "sdpa": (["--attention=sdpa", "--seq_len=20"], documents_from_0_and_1(), [7, 5] + [1] * 8),
}


def decoding_model(case):
    model = build(*DEEP, *DECODING[case][0])
    if case == "flex, from the first token":
        model.windows.copy_(torch.tensor([6, 3]))  # windows shorter than the sequence
    elif case != "sdpa":
        model.schedule(0.99)  # the second stage: windows 256 / 128, YaRN-stretched frequencies, a grown scale
        assert not torch.equal(model.freqs, model.freq_table[0])
    return model


@pytest.mark.parametrize("case", DECODING)
def test_absorbed_cached_decoding_matches_the_full_forward(case):
    """A prefill (or single tokens from position 0), a block of 5 after a non-empty cache, then single tokens: the
    absorbed latent-space attention gives the logits of the training path (FlexAttention or SDPA over per-head [nope |
    rope] keys and gated value-embedded values), in fp32, under the same document masks and windows, with the key
    offset, XSA, smear, the bigram hash, the skip and the backout in play. The wide-latent case has a latent (40) wider
    than the no-position head width (32): a softmax scale taken from the absorbed query's width would differ there, so
    only the shared explicit scale passes."""
    _, idx, pieces = DECODING[case]
    model = decoding_model(case)
    layers = attention_layers(model)
    assert len(layers) == 10 and [sum(getattr(a, kind) for a in layers) for kind in ("key_offset", "xsa", "ve")] == [
        2, 4, 5]
    with torch.no_grad():
        full = model(idx)
        cached, cache = decode_in_pieces(model, idx, pieces)
    assert full.abs().max() > 1.0  # random weights: logits far from the zero-init's uniform ones
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert all(layer["c_kv"].size(1) == idx.size(1) for layer in cache["layers"] if layer)
    assert torch.equal(cache["idx"], idx)
    if case in ("flex", "flex, low-rank q, wide latent"):  # the window and the documents were in force
        model.windows.copy_(torch.tensor([256, 256]))  # short windows of 256: queries 140..149 see the document start
        with torch.no_grad():
            wider = model(idx)
        assert (wider[:, 140:150] - full[:, 140:150]).abs().max() > 1e-3
        assert torch.equal(wider[:, 150:], full[:, 150:])  # the second document sees nothing before it


def test_the_decoding_check_catches_absorbed_steps_without_the_key_offset():
    """The check above has teeth on the key offset: with it switched off after the prefill (so the absorbed steps shift
    neither the new keys' latents nor the logits against cached latents) the decoded logits leave the full forward's."""
    model = decoding_model("flex, from the first token")
    idx = documents_from_0_and_1()
    with torch.no_grad():
        full = model(idx)
        _, cache = model.forward_cached(idx[:, :12])
        for attn in attention_layers(model):
            attn.key_offset = False
        decoded = torch.cat([model.forward_cached(idx[:, t:t + 1], cache)[0] for t in range(12, 20)], dim=1)
    assert (decoded - full[:, 12:]).abs().max() > 1e-3


def test_value_embeddings_and_their_gates_for_cached_tokens():
    """v = l0 W_uv c_kv + 2 sigmoid(W x[:12]) ve, per head: the absorbed path weights every cached token's gated value
    embedding by its attention probability, its row read from the table by the cached token id and its gate from the
    cache: with the same cache, changing a cached token's row, or its cached gate, moves the next decoded logits."""
    model = build()
    idx = tokens(1, 11)
    idx[0, 3] = 7  # a token that appears once, in the cache
    with torch.no_grad():
        _, cache = model.forward_cached(idx[:, :10])
        before = model.forward_cached(idx[:, 10:], copy.deepcopy(cache))[0]
        regated = copy.deepcopy(cache)
        regated["layers"][0]["ve_gate"][0, 3] += 1.0
        gate_moved = model.forward_cached(idx[:, 10:], regated)[0]
        model.value_embeds[0].weight[7] += 1.0
        row_moved = model.forward_cached(idx[:, 10:], cache)[0]
    assert (row_moved - before).abs().max() > 1e-3 and (gate_moved - before).abs().max() > 1e-3


def test_decoding_never_rebuilds_cached_keys_or_values():
    """The prefill runs the training path (per-head keys and values of its own tokens: compute-bound, as in serving
    systems); after it, W_uk runs on each new token's latent once, for its key's scale, and W_uv only in the XSA layers,
    for the new token's own value; never on the cached latents: in attention W_uv is applied to the attention-weighted
    latent as a weight."""
    model = build(*DEEP)
    calls = []
    for i, attn in enumerate(attention_layers(model)):
        for name in ("k_up", "v_up"):
            getattr(attn, name).register_forward_hook(lambda m, x, o, c=(i, name): calls.append((*c, x[0].size(1))))
    with torch.no_grad():
        decode_in_pieces(model, tokens(1, 10), [6, 1, 3])
    xsa = [a.xsa for a in attention_layers(model)]
    assert calls == ([(i, name, 6) for i in range(10) for name in ("k_up", "v_up")]
                     + [(i, name, n) for n in (1, 3) for i in range(10) for name in ("k_up", "v_up")
                        if name == "k_up" or xsa[i]])


def layer_inputs(model, run):
    """Run run(), recording each attention layer's input x and has_prev, in layer order."""
    inputs, hooks = [], []
    for attn in attention_layers(model):
        hooks.append(attn.register_forward_hook(lambda m, i, o: inputs.append((i[0], i[5]))))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return inputs


def expected_key(model, attn, x, has_prev):
    """From a layer's input x (B, T, C): (c_kv, the rotated shared rotary key, each head's [W_uk^h c | k_rope] before
    QK-norm), where c is the token's own latent, or in the long layers (the key offset) the previous token's in its
    document; a document's first token keeps its own."""
    B, T, _ = x.shape
    c_kv = mla.norm(attn.kv_down(x))
    before = torch.cat((c_kv[:, :1], c_kv[:, :-1]), dim=1)
    c_key = torch.where(has_prev[..., None], before, c_kv) if attn.key_offset else c_kv
    k_rope = mla.rotate(attn.k_rope(x)[:, :, None], model.freqs)
    return c_kv, k_rope[:, :, 0], torch.cat((attn.k_up(c_key).view(B, T, attn.n_head, -1),
                                             k_rope.expand(-1, -1, attn.n_head, -1)), dim=-1)


def test_the_cache_holds_the_latent_the_rotary_key_each_heads_key_scale_and_value_embedding_gate():
    """Per layer: c_kv = RMSNorm(W_dkv x) (B, S, kv_lora_rank), the rotated shared key (B, S, rope_head_dim), 1 / rms
    of each head's whole key [W_uk^h c | k_rope] (B, S, n_head; in the long layer, c is the previous token's latent) and
    where there are value embeddings each head's gate 2 sigmoid(W x[:12]) (B, S, n_head); nothing else. For the whole
    model: the document numbers (as the baseline) and the token ids, one each per token, and the last token."""
    model = build()  # the tiny preset's 2 layers: value embeddings in both, the key offset in the second
    idx = tokens(2, 9, eots=(0, 5))
    with torch.no_grad():
        _, cache = decode_in_pieces(model, idx, [4, 5])
        inputs = layer_inputs(model, lambda: model(idx))  # the training path: every layer's input, all 9 positions
    cfg = model.config
    assert (cfg.kv_lora_rank, cfg.rope_head_dim) == (32, 16)  # tiny's auto values: min(4 * 32, 64 / 2), 32 / 2
    assert [a.key_offset for a in attention_layers(model)] == [False, True]
    assert set(cache) == {"docs", "last", "idx", "layers"} and cache["docs"].shape == cache["idx"].shape == (2, 9)
    assert torch.equal(cache["last"], idx[:, -1:])
    for layer, (x, has_prev), attn in zip(cache["layers"], inputs, attention_layers(model)):
        assert set(layer) == {"c_kv", "k_rope", "k_inv_rms", "ve_gate"}
        assert layer["c_kv"].shape == (2, 9, cfg.kv_lora_rank) and layer["k_rope"].shape == (2, 9, cfg.rope_head_dim)
        assert layer["k_inv_rms"].shape == layer["ve_gate"].shape == (2, 9, cfg.n_head)
        assert sum(t[0, 0].numel() for t in layer.values()) == cfg.kv_lora_rank + cfg.rope_head_dim + 2 * cfg.n_head
        with torch.no_grad():
            c_kv, k_rope, k = expected_key(model, attn, x, has_prev)
            gate = 2 * torch.sigmoid(attn.ve_gate(x[..., :12]))
        torch.testing.assert_close(layer["c_kv"], c_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer["k_rope"], k_rope, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer["k_inv_rms"], k.square().mean(-1).rsqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer["ve_gate"], gate, atol=1e-6, rtol=1e-6)


def attention_calls(model, monkeypatch, idx, backward=False):
    """Run the training path on idx, recording every call of the model's attend(): (q, k, v, mask, output)."""
    calls, attend = [], mla.attend

    def recording(q, k, v, mask):
        y = attend(q, k, v, mask)
        calls.append((q.detach(), k.detach(), v.detach(), mask, y.detach()))
        return y

    with monkeypatch.context() as patch:
        patch.setattr(mla, "attend", recording)
        if backward:
            model(idx, idx).backward()
        else:
            with torch.no_grad():
                model(idx)
    return calls


@pytest.mark.parametrize("path", ["flex", "dense", "sdpa"])
def test_q_k_v_widths_equal_wherever_sdpa_runs_so_flash_can(path, monkeypatch):
    """SDPA's flash kernels (CUDA and CPU alike) need q, k and v of one head width: wherever attention goes to SDPA
    (--attention=sdpa; the dense-mask path that CPU training takes) v is zero-padded from 32 to the q/k width 32 + 16,
    and the padded output columns are dropped. FlexAttention takes a narrower v (torch >= 2.6; DeepSeek-V2's own
    192/128 split), so there v stays unpadded. With --attention=sdpa the training step also runs with SDPA restricted
    to its flash kernel (torch's CPU one has the same rule: the unpadded 48/32 widths raise there)."""
    model = build(*(["--attention=sdpa", "--seq_len=16"] if path == "sdpa" else []))
    cfg = model.config
    D, R = cfg.n_embd // cfg.n_head, cfg.rope_head_dim
    idx = tokens(2, 16, eots=(0, 9))
    if path == "flex":  # CPU without gradients: FlexAttention with a block mask
        calls = attention_calls(model, monkeypatch, idx)
    else:
        model.train()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if path == "sdpa" else contextlib.nullcontext():
            calls = attention_calls(model, monkeypatch, idx, backward=True)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(calls) == cfg.n_layer
    for q, k, v, mask, y in calls:
        assert isinstance(mask, mla.BlockMask) == (path == "flex") and (mask is None) == (path == "sdpa")
        assert q.shape == k.shape == (2, cfg.n_head, 16, D + R)
        if path == "flex":
            assert v.shape == y.shape == (2, cfg.n_head, 16, D)
            continue
        assert v.shape == y.shape == q.shape
        assert (v[..., D:] == 0).all() and (y[..., D:] == 0).all()  # the padding is wasted work, never output
        unpadded = torch.nn.functional.scaled_dot_product_attention(q, k, v[..., :D], attn_mask=mask,
                                                                    is_causal=mask is None)
        torch.testing.assert_close(y[..., :D], unpadded, atol=1e-5, rtol=1e-5)


def test_qk_norm_covers_each_heads_whole_key_and_the_long_layers_key_has_the_previous_tokens_latent(monkeypatch):
    """As in the baseline, every per-head key seen by attention has RMS 1 over all D + R channels, and is a positive
    multiple of [W_uk^h c | rotated W_kr x]: one norm over the whole key, not one per half (which would give RMS 1 too,
    but halves of RMS 1 each). In the long layer c is the previous token's latent in the document (the key offset on
    MLA's content key), never one from an earlier document, and the token's own at a document's start: its own
    latent everywhere would not match. Queries have the scale folded in: RMS scale * sqrt(D + R), since attend()
    divides by sqrt(D + R)."""
    model = build()
    cfg = model.config
    D, R = cfg.n_embd // cfg.n_head, cfg.rope_head_dim
    idx = tokens(2, 16, eots=(0, 9))
    calls = []
    inputs = layer_inputs(model, lambda: calls.extend(attention_calls(model, monkeypatch, idx)))
    ones = torch.ones(2, cfg.n_head, 16)
    for (q, k, _, _, _), (x, has_prev), attn in zip(calls, inputs, attention_layers(model)):
        torch.testing.assert_close(q.square().mean(-1), ones * model.attn_scale ** 2 * (D + R), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k.square().mean(-1), ones, atol=1e-4, rtol=1e-4)
        assert (k[..., :D].square().mean(-1) - 1).abs().max() > 0.1  # the no-position part alone is not normalised
        with torch.no_grad():
            raw = expected_key(model, attn, x, has_prev)[2].transpose(1, 2)
            attn.key_offset = not attn.key_offset
            other = expected_key(model, attn, x, has_prev)[2].transpose(1, 2)
            attn.key_offset = not attn.key_offset
        cosine = torch.nn.functional.cosine_similarity
        torch.testing.assert_close(cosine(k, raw, dim=-1), ones, atol=1e-5, rtol=1e-5)
        if attn.key_offset:
            assert not has_prev[:, [0, 9]].any() and has_prev[:, 10:].all()
            assert (cosine(k, other, dim=-1)[:, :, 10:] - 1).abs().min() > 1e-3  # not its own latent there


def test_yarn_and_the_attention_scale_act_on_the_decoupled_rotary_part():
    """The rotary buffers are rope_head_dim / 2 wide: the baseline's half-truncated frequencies of rope_head_dim, YaRN-
    stretched at each change of the long window as the baseline's; the scale is the baseline's 0.1 * sqrt(128 / width)
    at the q.k width D + R, grown by 1 + 0.2 ln(new / old) at each change; the final validation keeps the last stage's
    frequencies and scale."""
    model = build("--window_blocks=1,2,4", randomise=False)
    D, R = 32, 16
    freqs, scale = mla.rotary_frequencies(R), 0.1 * (128 / (D + R)) ** 0.5
    assert freqs.shape == (R // 2,) and (freqs[:R // 4] > 0).all() and (freqs[R // 4:] == 0).all()
    for progress, (old, new) in ((0.0, (1, 1)), (0.5, (1, 2)), (0.9, (2, 4))):
        if old != new:
            freqs, grown = mla.yarn(freqs, old * 128, new * 128)
            assert grown == pytest.approx(1 + 0.2 * math.log(new / old))
            scale *= grown
        model.schedule(progress)
        torch.testing.assert_close(model.freqs, freqs, rtol=1e-6, atol=0)
        assert model.attn_scale.item() == pytest.approx(scale, rel=1e-6)
    model.schedule(1.0)
    torch.testing.assert_close(model.freqs, freqs, rtol=1e-6, atol=0)
    assert model.attn_scale.item() == pytest.approx(scale, rel=1e-6)
    assert build_124m(mla).stage_tables()[2][0].item() == pytest.approx(0.1 * (128 / 192) ** 0.5)  # 0.0816 at 124M


def cache_per_token(model):
    """Numbers each layer's cache holds per token: 9 cached tokens less 5 (the baseline keeps one token's still
    channels per long layer besides, for its key offset: not per token)."""
    sizes = []
    for n in (5, 9):
        with torch.device("meta"):
            _, cache = model.forward_cached(torch.zeros(1, n, dtype=torch.long))
        sizes.append([sum(t.numel() for t in layer.values()) for layer in cache["layers"]])
    return [(b - a) // 4 for a, b in zip(*sizes)]


def test_124m_cache_is_4570_numbers_per_token_vs_the_baseline_15360():
    """What each layer caches per token (on the meta device, where only SDPA runs; the cache is the same under flex):
    latent + rotary key + a key scale per head, and a value-embedding gate per head in the layers 0, 1, 8, 9, 10;
    layer 6 has no attention and caches nothing, in both. 3.4x smaller in all."""
    mla_sizes = cache_per_token(build_124m(mla, "--attention=sdpa"))
    base_sizes = cache_per_token(build_124m(baseline, "--attention=sdpa"))
    per_layer = 384 + 64 + 6
    assert mla_sizes == [per_layer + 6] * 2 + [per_layer] * 4 + [0] + [per_layer] + [per_layer + 6] * 3
    assert base_sizes == [2 * 768] * 6 + [0] + [2 * 768] * 4
    assert (sum(mla_sizes), sum(base_sizes)) == (4570, 15360)
    assert ("384 + 64 + 6 = 454 numbers per token per attention layer (latent, rotary key, key scale per head), + 6"
            " value-embedding gates in 5 of them: 4570 over 10 layers (standard attention: 10 x 2 x 768 = 15360)"
            ) in build_124m(mla).describe()


def test_124m_defaults_and_parameter_count_vs_the_baseline():
    model, base = build_124m(mla), build_124m(baseline)
    cfg = model.config
    # DeepSeek-V2: d_c = 4 d_h = 512, capped here at n_embd / 2 = 384; d_h^R = d_h / 2 = 64
    assert (cfg.n_embd // cfg.n_head, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.rope_head_dim) == (128, 384, 0, 64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tables = 7 * 50304 * 768 + 251520 * 768  # wte, lm_head, 5 value embeddings and the bigram table, as the baseline
    attention = 768 * 6 * (128 + 64) + 3 * 384 * 768 + 64 * 768 + 768 * 768  # c_q, kv_down/k_up/v_up, k_rope, c_proj
    assert attention == 2_408_448  # the baseline's 4 x 768 x 768 = 2,359,296
    # 10 attention layers, 11 MLPs; gates of 12 x 6 (attention in 10 layers, value embeddings in 5); scalars: 3 per
    # block (resid, x0, bigram), 2 lambdas per attention, 6 XSA alphas in 4 layers
    gates, scalars = 15 * 12 * 6, 11 * 3 + 10 * 2 + 4 * 6
    assert count(model.blocks) == 10 * attention + 11 * 2 * 768 * 3072 + gates + scalars == 75_990_149
    # outside the blocks: smear and skip gates (12 each), smear, skip and backout lambdas
    assert count(model) == tables + 75_990_149 + 27 == 539_591_840  # the numbers the script's docstring states
    assert count(base) == tables + 75_498_629 + 27 == 539_100_320
    # explicit flags override the auto values; q_lora_rank adds a (q_lora_rank x n_embd) down-projection
    lora = build_124m(mla, "--kv_lora_rank=128", "--q_lora_rank=384", "--rope_head_dim=32")
    attn = lora.blocks[0].attn
    assert (attn.kv_down.weight.shape, attn.k_rope.weight.shape) == ((128, 768), (32, 768))
    assert (attn.q_down.weight.shape, attn.c_q.weight.shape) == ((384, 768), (6 * (128 + 32), 384))


def test_mla_matrices_get_the_records_init():
    """Uniform with std fan-in^-0.5 (the record's n_embd^-0.5 on x), so every input, the RMS-normed latents included,
    gives outputs of RMS ~1; the output projection and the gates zero, as the baseline."""
    model = build(*DEEP, q_lora_rank=24, randomise=False)
    for attn in attention_layers(model):
        for lin in (attn.q_down, attn.c_q, attn.kv_down, attn.k_rope, attn.k_up, attn.v_up):
            bound = 3 ** 0.5 * lin.in_features ** -0.5
            assert bound * 0.95 < lin.weight.abs().max() <= bound
        assert attn.c_proj.weight.abs().max() == 0 and attn.attn_gate.weight.abs().max() == 0
        assert not attn.ve or attn.ve_gate.weight.abs().max() == 0


def training_flops_per_token(model, T=1024):
    """Forward + backward FLOPs per token of everything but the head (its 6 x 768 x 50304 taken off), as torch's
    FlopCounterMode counts them on the meta device: matmuls and the full T x T attention matrix (PaLM's MFU
    convention, as bench.py)."""
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        idx = torch.zeros(1, T, dtype=torch.long)
        model(idx, idx).backward()
    return counter.get_total_flops() / T - 6 * 768 * 50304


def test_124m_training_flops_vs_the_baseline(monkeypatch):
    """6 x the blocks' matrix parameters (the gates' included) + 6 x 24 for the smear and skip gates + 6 x attention
    layers x T x heads x (qk width + v width). MLA's qk width is 128 + 64; its v is 128 under FlexAttention and 192
    (padded) under SDPA, which the meta device runs; the FlexAttention count comes from letting the meta device's dense
    masks through unpadded, as block masks are."""
    attention = lambda qk, v: 6 * 10 * 1024 * 6 * (qk + v)  # noqa: E731
    matrices = lambda m: sum(p.numel() for p in m.blocks.parameters() if p.ndim == 2)  # noqa: E731
    assert (matrices(build_124m(baseline)), matrices(build_124m(mla))) == (75_498_552, 75_990_072)
    base = training_flops_per_token(build_124m(baseline))
    padded = training_flops_per_token(build_124m(mla))
    with monkeypatch.context() as patch:
        patch.setattr(mla, "BlockMask", torch.Tensor)
        patch.setattr(mla, "attend", lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask))
        flex = training_flops_per_token(build_124m(mla))
    assert base == 6 * 75_498_552 + 6 * 24 + attention(128, 128) == 547_363_296
    assert flex == 6 * 75_990_072 + 6 * 24 + attention(192, 128) == 573_905_376  # +4.8%
    assert padded == 6 * 75_990_072 + 6 * 24 + attention(192, 192) == 597_498_336  # +9.2%


MLA_MATRICES = {"q_down.weight": (24, 64), "c_q.weight": (2 * (32 + 16), 24), "kv_down.weight": (32, 64),
                "k_rope.weight": (16, 64), "k_up.weight": (64, 32), "v_up.weight": (64, 32), "c_proj.weight": (64, 64)}


def test_muon_orthogonalises_each_mla_matrix_on_its_own():
    """The latent and the rotary key have separate down-projections (not one fused [c_kv | k_rope] matrix), and
    every attention matrix goes to Muon whole; see the comment in CausalSelfAttention. (The gates are the baseline's:
    their optimizer is the shared section's choice.)"""
    model = build(randomise=False, q_lora_rank=24)
    args, _ = mla.parse_args(["--preset=tiny"])
    _, muon = mla.build_optimizers(model, args)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    attn = model.blocks[0].attn
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters() if id(p) in in_muon and "gate" not in name}
    assert shapes == MLA_MATRICES


def test_a_4096_token_stream_trains_and_decodes_at_the_far_end():
    """Rotary angles are computed per call, with no table to outgrow: a 4096-token stream trains, every weight
    getting a gradient, and decoding the last tokens after a 4090-token prefill matches the full forward there (the
    one layer is a long one: the key offset and a value embedding in play)."""
    model = build("--n_layer=1", "--n_embd=32", "--device_batch_tokens=4096").train()
    assert model.blocks[0].attn.key_offset and model.blocks[0].attn.ve
    idx = tokens(1, 4096, eots=(0, 2000))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                                        for p in model.parameters() if p.numel())  # 1 layer: no skip or backout
    model.eval()
    with torch.no_grad():
        full = model(idx)[:, 4090:]
        cached, cache = decode_in_pieces(model, idx, [4090] + [1] * 6)
    torch.testing.assert_close(cached[:, 4090:], full, atol=1e-4, rtol=1e-4)
    assert cache["layers"][0]["c_kv"].shape == (1, 4096, 16)


@pytest.mark.parametrize("flag", ["--rope_head_dim=7", "--kv_lora_rank=-1", "--q_lora_rank=-2"])
def test_bad_mla_flags_are_clear_errors(flag):
    name = flag[2:].split("=")[0]
    expected = {"--rope_head_dim=7": "an even integer >= 0", "--kv_lora_rank=-1": r"an integer >= 0 \(0: auto\)",
                "--q_lora_rank=-2": r"an integer >= 0 \(0: full-rank queries\)"}[flag]
    with pytest.raises(SystemExit, match=rf"^error: --{name}=-?\d+: expected {expected}"):
        mla.parse_args(["--preset=tiny", flag])  # IdeaFlags.check(), when the flags are parsed


def test_tiny_run_with_low_rank_queries_trains(shards, tmp_path):
    """The training loop with the MLA flags set explicitly (low-rank queries, a wider latent): loss falls and the
    flags reach the model (the log's hyperparameters and parameter count)."""
    summary = mla.main(small_args(*shards, tmp_path, num_iterations=24, val_every=12, q_lora_rank=32,
                                  kv_lora_rank=48, rope_head_dim=8))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert val[24] < val[0] - 1.0, val
    text = (tmp_path / f"{summary['run_id']}.txt").read_text(encoding="utf-8")
    assert '"q_lora_rank": 32' in text and '"kv_lora_rank": 48' in text and '"rope_head_dim": 8' in text
    # per layer: q_down 32x64 + c_q 80x32 + kv_down 48x64 + k_rope 8x64 + k_up, v_up 64x48 + c_proj + the attention and
    # value-embedding gates (12 x 2 each) + 2 lambdas + MLP + 3 block scalars; then wte, lm_head and 2 value
    # embeddings of 256x64, the bigram table (5 x 50304 rows of 64), the smear gate (12) and its lambda
    attn = 32 * 64 + 2 * (32 + 8) * 32 + 48 * 64 + 8 * 64 + 2 * 64 * 48 + 64 * 64 + 2 * 12 * 2 + 2
    assert f"params {(2 * (attn + 2 * 64 * 256 + 3) + 4 * 256 * 64 + 251520 * 64 + 13) / 1e6:.2f}M" in text


def test_cache_size_is_logged_at_start_up(shards, tmp_path):
    summary = mla.main(small_args(*shards, tmp_path, num_iterations=1))
    assert ("\n# MLA: the decoding cache holds 32 + 16 + 2 = 50 numbers per token per attention layer (latent, rotary"
            " key, key scale per head), + 2 value-embedding gates in 2 of them: 104 over 2 layers (standard attention:"
            " 2 x 2 x 64 = 256)") in (tmp_path / f"{summary['run_id']}.txt").read_text()

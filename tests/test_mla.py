"""Multi-head Latent Attention (train_gpt2_mla.py): what the idea promises, as tests.

DeepSeek-V2 section 2.1: keys and values are up-projected from a small per-token latent c_kv, position enters through a
decoupled rotary key shared by the heads, and decoding caches only (c_kv, rotary key), attending in latent space with
W_uk absorbed into the query and W_uv applied after attention. The generic tests (test_causality.py,
tests/test_model.py, tests/test_attention.py, ...) cover the script too; these check the MLA specifics: absorbed
decoding = the training path under v2's document masks and windows, value embeddings included; what the cache holds;
QK-norm of each head's whole key; equal q/k/v widths wherever SDPA runs (so its flash kernels can), v unpadded for
FlexAttention; parameters and FLOPs at 124M against the baseline; low-rank queries; a 4096-token stream.
"""
import contextlib
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import ROOT, decode_in_pieces, load_script, read_log, small_args, tokens

mla = load_script(ROOT / "train_gpt2_mla.py")
baseline = load_script(ROOT / "train_gpt2.py")
EOT, VOCAB = 50256, 50304  # documents need the real <|endoftext|> id


def build(*flags, randomise=True, **named):
    """A tiny fp32 model (n_embd 64, 2 heads: latent 32, rotary 16), in eval mode; random weights by default (lambdas
    included), since the zero-initialised projections and head would hide cache bugs."""
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


# Documents start at 0 and 150; the 128-token window cuts into the first for queries 128..149, which decoding reaches
# (prefill 140), and the second document begins while decoding. 4 layers: long and short windows, every layer with a
# value embedding. sdpa: plain causal rows of seq_len.
DECODING = {
    "flex": (["--n_layer=4", "--window_blocks=1"], tokens(2, 170, eots=(0, 150)), [140, 5] + [1] * 25),
    "flex, low-rank q, wide latent": (["--n_layer=4", "--window_blocks=1", "--q_lora_rank=24", "--kv_lora_rank=40",
                                       "--rope_head_dim=8"], tokens(2, 170, eots=(0, 150)), [140, 5] + [1] * 25),
    "sdpa": (["--attention=sdpa", "--seq_len=20"], tokens(2, 20), [7, 5] + [1] * 8),
}


@pytest.mark.parametrize("case", DECODING)
def test_absorbed_cached_decoding_matches_the_full_forward(case):
    """A prefill, a block of 5 after a non-empty cache, then single tokens: the absorbed latent-space attention gives
    the logits of the training path (FlexAttention or SDPA over per-head [nope | rope] keys and value-embedded values),
    in fp32, under the same document masks and windows. The wide-latent case has a latent (40) wider than the
    no-position head width (32): a softmax scale taken from the absorbed query's width would differ there, so only the
    shared explicit scale passes."""
    flags, idx, pieces = DECODING[case]
    model = build(*flags)
    assert all(t is not None for t in model.ve_table) and all(b.attn.lambdas[1] != 0 for b in model.blocks)
    with torch.no_grad():
        full = model(idx)
        cached, cache = decode_in_pieces(model, idx, pieces)
    assert full.abs().max() > 1.0  # random weights: logits far from the zero-init's uniform ones
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert all(layer["c_kv"].size(1) == idx.size(1) for layer in cache["layers"]) and torch.equal(cache["idx"], idx)
    if case.startswith("flex"):  # the window and the documents were in force where decoding ran
        model.config.window_blocks = (2,)  # long windows of 256: queries 140..149 would see the document's start
        model.final_windows.copy_(model.windows_at(1.0))  # evaluation's windows, a buffer set at construction
        with torch.no_grad():
            wider = model(idx)
        assert (wider[:, 140:150] - full[:, 140:150]).abs().max() > 1e-3
        assert torch.equal(wider[:, 150:], full[:, 150:])  # the second document sees nothing before it


def test_value_embeddings_of_cached_tokens_are_read_from_the_table():
    """v = l0 * W_uv c_kv + l1 * ve: the absorbed path weights every cached token's value embedding by its attention
    probability, and takes those rows from the table by the cached token ids (nothing of them is cached): with the
    same cache, changing a cached token's row moves the next decoded logits."""
    model = build()
    idx = tokens(1, 11)
    idx[0, 3] = 7  # a token that appears once, in the cache
    with torch.no_grad():
        _, cache = model.forward_cached(idx[:, :10])
        before = model.forward_cached(idx[:, 10:], copy.deepcopy(cache))[0]
        model.value_embeds[0].weight[7] += 1.0
        after = model.forward_cached(idx[:, 10:], cache)[0]
    assert (after - before).abs().max() > 1e-3


def test_decoding_never_rebuilds_cached_keys_or_values():
    """The prefill runs the training path (per-head keys and values of its own tokens: compute-bound, as in serving
    systems); after it, W_uk runs on each new token's latent once, for its per-head key scale, never on the cached
    latents, and W_uv never runs: it is applied to the attention-weighted latent as a weight."""
    model = build()
    calls = []
    for block in model.blocks:
        for name in ("k_up", "v_up"):
            getattr(block.attn, name).register_forward_hook(lambda m, i, o, n=name: calls.append((n, i[0].size(1))))
    idx = tokens(1, 10)
    with torch.no_grad():
        decode_in_pieces(model, idx, [6, 1, 3])
    prefill = [(n, 6) for _ in model.blocks for n in ("k_up", "v_up")]
    assert calls == prefill + [("k_up", n) for n in (1, 3) for _ in model.blocks]


def test_the_cache_holds_only_the_latent_the_rotary_key_and_each_heads_key_scale():
    """Per layer: c_kv = RMSNorm(W_dkv x) (B, S, kv_lora_rank), the rotated shared key (B, S, rope_head_dim) and
    1 / rms of each head's whole key [W_uk^h c_kv | k_rope] (B, S, n_head); nothing else. For the whole model: the
    document numbers (as the baseline) and the token ids, one each per token."""
    model = build()
    attn_inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: attn_inputs.append(i[0])) for b in model.blocks]
    idx = tokens(2, 9, eots=(0, 5))
    with torch.no_grad():
        _, cache = decode_in_pieces(model, idx, [4, 5])
        attn_inputs.clear()
        model(idx)  # the training path: the input of every attention layer over all 9 positions
    for h in hooks:
        h.remove()
    cfg = model.config
    assert (cfg.kv_lora_rank, cfg.rope_head_dim) == (32, 16)  # tiny's auto values: min(4 * 32, 64 / 2), 32 / 2
    assert set(cache) == {"docs", "idx", "layers"} and cache["docs"].shape == cache["idx"].shape == (2, 9)
    for layer, x, block in zip(cache["layers"], attn_inputs, model.blocks):
        attn = block.attn
        assert set(layer) == {"c_kv", "k_rope", "k_inv_rms"}
        assert layer["c_kv"].shape == (2, 9, cfg.kv_lora_rank) and layer["k_rope"].shape == (2, 9, cfg.rope_head_dim)
        assert layer["k_inv_rms"].shape == (2, 9, cfg.n_head)
        assert sum(t[0, 0].numel() for t in layer.values()) == cfg.kv_lora_rank + cfg.rope_head_dim + cfg.n_head
        with torch.no_grad():
            c_kv = mla.norm(attn.kv_down(x))
            k_rope = attn.rotary(attn.k_rope(x)[:, :, None])[:, :, 0]
            k = torch.cat((attn.k_up(c_kv).view(2, 9, cfg.n_head, -1),
                           k_rope[:, :, None].expand(-1, -1, cfg.n_head, -1)), dim=-1)
        torch.testing.assert_close(layer["c_kv"], c_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer["k_rope"], k_rope, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer["k_inv_rms"], k.square().mean(-1).rsqrt(), atol=1e-5, rtol=1e-5)


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


def test_qk_norm_covers_each_heads_whole_key(monkeypatch):
    """As in the baseline, every per-head query and key seen by attention has RMS 1 over all D + R channels, and the
    key is a positive multiple of [W_uk^h c_kv | rotated W_kr x]: one norm over the whole key, not one per half
    (which would give RMS 1 too, but halves of RMS 1 each)."""
    model = build()
    cfg = model.config
    D = cfg.n_embd // cfg.n_head
    attn_inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: attn_inputs.append(i[0])) for b in model.blocks]
    calls = attention_calls(model, monkeypatch, tokens(2, 16, eots=(0, 9)))
    for h in hooks:
        h.remove()
    for (q, k, _, _, _), x, block in zip(calls, attn_inputs, model.blocks):
        ones = torch.ones(q.shape[:-1])
        torch.testing.assert_close(q.square().mean(-1), ones, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k.square().mean(-1), ones, atol=1e-4, rtol=1e-4)
        assert (k[..., :D].square().mean(-1) - 1).abs().max() > 0.1  # the no-position part alone is not normalised
        attn = block.attn
        with torch.no_grad():
            k_rope = attn.rotary(attn.k_rope(x)[:, :, None]).expand(-1, -1, cfg.n_head, -1)
            raw = torch.cat((attn.k_up(mla.norm(attn.kv_down(x))).view(2, 16, cfg.n_head, D), k_rope), dim=-1)
        cosine = torch.nn.functional.cosine_similarity(k, raw.transpose(1, 2), dim=-1)
        torch.testing.assert_close(cosine, ones, atol=1e-5, rtol=1e-5)


def test_124m_cache_is_454_numbers_per_token_per_layer_vs_the_baseline_1536():
    """What each layer caches per token (on the meta device, where only SDPA runs; the cache is the same under flex)."""
    sizes = {}
    for name, module in (("mla", mla), ("baseline", baseline)):
        model = build_124m(module, "--attention=sdpa")
        with torch.device("meta"):
            _, cache = model.forward_cached(torch.zeros(1, 5, dtype=torch.long))
        assert len(cache["layers"]) == 12
        sizes[name] = sum(t.numel() for t in cache["layers"][0].values()) // 5
    assert sizes == {"mla": 384 + 64 + 6, "baseline": 2 * 768}  # latent + rotary key + a key scale per head: 3.4x
    assert "384 + 64 + 6 = 454 numbers per token per layer" in build_124m(mla).describe()


def test_124m_defaults_and_parameter_count_vs_the_baseline():
    model, base = build_124m(mla), build_124m(baseline)
    cfg = model.config
    # DeepSeek-V2: d_c = 4 d_h = 512, capped here at n_embd / 2 = 384; d_h^R = d_h / 2 = 64
    assert (cfg.n_embd // cfg.n_head, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.rope_head_dim) == (128, 384, 0, 64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tables = 5 * 50304 * 768  # wte, lm_head and 3 value embeddings, as the baseline
    attention = 768 * 6 * (128 + 64) + 3 * 384 * 768 + 64 * 768 + 768 * 768  # c_q, kv_down/k_up/v_up, k_rope, c_proj
    assert attention == 2_408_448  # the baseline's 4 x 768 x 768 = 2,359,296
    assert count(model.blocks) == 12 * (attention + 2 * 768 * 3072 + 4) == 85_524_528  # + 4 lambdas per block
    assert count(model) == tables + 85_524_480 + 54 == 278_691_894  # the numbers the script's comment states
    assert count(base) == tables + 84_934_656 + 54 == 278_102_070
    # explicit flags override the auto values; q_lora_rank adds a (q_lora_rank x n_embd) down-projection
    lora = build_124m(mla, "--kv_lora_rank=128", "--q_lora_rank=384", "--rope_head_dim=32")
    attn = lora.blocks[0].attn
    assert (attn.kv_down.weight.shape, attn.k_rope.weight.shape) == ((128, 768), (32, 768))
    assert (attn.q_down.weight.shape, attn.c_q.weight.shape) == ((384, 768), (6 * (128 + 32), 384))


def training_flops_per_token(model, T=1024):
    """Forward + backward FLOPs per token of the blocks (the head's 6 x 768 x 50304 taken off), as torch's
    FlopCounterMode counts them on the meta device: matmuls and the full T x T attention matrix (PaLM's MFU
    convention, as bench.py)."""
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        idx = torch.zeros(1, T, dtype=torch.long)
        model(idx, idx).backward()
    return counter.get_total_flops() / T - 6 * 768 * 50304


def test_124m_training_flops_vs_the_baseline(monkeypatch):
    """6 x block params + 6 x layers x T x heads x (qk width + v width). MLA's qk width is 128 + 64; its v is 128
    under FlexAttention and 192 (padded) under SDPA, which the meta device runs; the FlexAttention count comes from
    letting the meta device's dense masks through unpadded, as block masks are."""
    attention = lambda qk, v: 6 * 12 * 1024 * 6 * (qk + v)  # noqa: E731
    base = training_flops_per_token(build_124m(baseline))
    padded = training_flops_per_token(build_124m(mla))
    with monkeypatch.context() as patch:
        patch.setattr(mla, "BlockMask", torch.Tensor)
        patch.setattr(mla, "attend", lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask))
        flex = training_flops_per_token(build_124m(mla))
    assert base == 6 * 84_934_656 + attention(128, 128) == 622_854_144
    assert flex == 6 * 85_524_480 + attention(192, 128) == 654_704_640  # +5.1%
    assert padded == 6 * 85_524_480 + attention(192, 192) == 683_016_192  # +9.7%


def test_muon_orthogonalises_each_mla_matrix_on_its_own():
    """The latent and the rotary key have separate down-projections (not one fused [c_kv | k_rope] matrix), and
    every attention matrix goes to Muon whole; see the comment in CausalSelfAttention."""
    model = build(randomise=False, q_lora_rank=24)
    args, _ = mla.parse_args(["--preset=tiny"])
    adam, muon = mla.build_optimizers(model, args)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    attn = model.blocks[0].attn
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters() if id(p) in in_muon}
    assert shapes == {"q_down.weight": (24, 64), "c_q.weight": (2 * (32 + 16), 24), "kv_down.weight": (32, 64),
                      "k_rope.weight": (16, 64), "k_up.weight": (64, 32), "v_up.weight": (64, 32),
                      "c_proj.weight": (64, 64)}


def test_a_4096_token_stream_trains_and_decodes_at_the_far_end():
    """Rotary angles are computed per call, with no table to outgrow: a 4096-token stream trains, every weight
    getting a gradient, and decoding the last tokens after a 4090-token prefill matches the full forward there."""
    model = build("--n_layer=1", "--n_embd=32", "--device_batch_tokens=4096").train()
    idx = tokens(1, 4096, eots=(0, 2000))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                                        for p in model.parameters() if p.numel())  # 1 layer: no U-net skip weights
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
    # per layer: q_down 32x64 + c_q 80x32 + kv_down 48x64 + k_rope 8x64 + k_up, v_up 64x48 + c_proj + MLP + 4 lambdas;
    # then wte, lm_head and one value embedding of 256x64, and one U-net skip weight
    attn = 32 * 64 + 2 * (32 + 8) * 32 + 48 * 64 + 8 * 64 + 2 * 64 * 48 + 64 * 64
    assert f"params {(2 * (attn + 2 * 64 * 256 + 4) + 3 * 256 * 64 + 1) / 1e6:.2f}M" in text


def test_cache_size_is_logged_at_start_up(shards, tmp_path):
    summary = mla.main(small_args(*shards, tmp_path, num_iterations=1))
    assert ("\n# MLA: the decoding cache holds 32 + 16 + 2 = 50 numbers per token per layer (latent, rotary key, key"
            " scale per head; standard attention: 2 x 64 = 128)") in (tmp_path / f"{summary['run_id']}.txt").read_text()

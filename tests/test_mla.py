"""Multi-head Latent Attention (train_gpt2_mla.py): what the idea promises, as tests.

DeepSeek-V2 section 2.1: keys and values are up-projected from a small per-token latent c_kv, position enters through a
decoupled rotary key shared by the heads, and decoding caches only (c_kv, rotary key), attending in latent space with
W_uk absorbed into the query and W_uv applied after attention. The generic tests (test_causality.py, tests/test_model.py,
test_train.py, ...) cover the script too; these check the MLA specifics: absorbed decoding = the training path, what
the cache holds, QK-norm of each head's whole key, equal q/k/v widths for SDPA's flash backend, parameters and FLOPs
at 124M against the baseline, low-rank queries, a 4096-token context.
"""
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import ROOT, load_script, read_log, small_args

mla = load_script(ROOT / "train_gpt2_mla.py")
baseline = load_script(ROOT / "train_gpt2.py")
VOCAB = 512


def build(randomise=True, **flags):
    """A tiny fp32 model (n_embd 64, 2 heads: latent 32, rotary 16); random weights by default, since the
    zero-initialised projections and head would hide cache bugs."""
    argv = ["--preset=tiny", f"--vocab_size={VOCAB}", "--seq_len=32"] + [f"--{k}={v}" for k, v in flags.items()]
    args, _ = mla.parse_args(argv)
    torch.manual_seed(0)
    model = mla.GPT(mla.GPTConfig.from_args(args)).float().eval()
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def decode_in_pieces(model, idx, pieces):
    """forward_cached over consecutive slices of idx (a prefill, blocks, single tokens): (logits, caches)."""
    caches, out, t = None, [], 0
    for n in pieces:
        logits, caches = model.forward_cached(idx[:, t:t + n], caches)
        out.append(logits)
        t += n
    return torch.cat(out, dim=1), caches


def build_124m(module, **flags):
    args, _ = module.parse_args([f"--{k}={v}" for k, v in flags.items()])
    with torch.device("meta"):
        return module.GPT(module.GPTConfig.from_args(args))


@pytest.mark.parametrize("flags", [dict(), dict(q_lora_rank=24, kv_lora_rank=40, rope_head_dim=8)], ids=str)
def test_absorbed_cached_decoding_matches_the_full_forward(flags):
    """Prefill 7, a block of 5 after a non-empty cache, then 8 single tokens: the absorbed latent-space attention
    gives the logits of the training path (SDPA over rebuilt per-head [nope | rope] keys), in fp32. The second case
    has a latent (40) wider than the no-position head width (32): SDPA's default softmax scale would differ between
    the two paths there (1/sqrt(48) vs 1/sqrt(40)), so only the shared explicit scale passes."""
    q_lora_rank = flags.get("q_lora_rank", 0)
    model = build(**flags)
    assert (model.blocks[0].attn.q_down is not None) == (q_lora_rank > 0)
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cached, caches = decode_in_pieces(model, idx, [7, 5] + [1] * 8)
    assert full.abs().max() > 1.0  # random weights: logits far from the zero-init's uniform ones
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert all(c["c_kv"].size(1) == 20 for c in caches)


def test_decoding_never_rebuilds_cached_keys_or_values():
    """The absorbed path uses W_uk and W_uv as weights folded into the query and applied after attention. W_uk runs
    on each new token's latent once, for its per-head key scale; never on the cached latents, and W_uv never runs
    (the training path calls both on every position, every layer)."""
    model = build()
    calls = []
    for block in model.blocks:
        for name in ("k_up", "v_up"):
            getattr(block.attn, name).register_forward_hook(lambda m, i, o, n=name: calls.append((n, i[0].size(1))))
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        decode_in_pieces(model, idx, [6, 1, 3])
        assert calls == [("k_up", n) for n in (6, 1, 3) for _ in model.blocks]
        calls.clear()
        model(idx)
    assert calls == [(n, 10) for _ in model.blocks for n in ("k_up", "v_up")]


def test_the_cache_holds_only_the_latent_the_rotary_key_and_each_heads_key_scale():
    """Per layer: c_kv = RMSNorm(W_dkv x) (B, S, kv_lora_rank), the rotated shared key (B, S, rope_head_dim) and
    1 / rms of each head's whole key [W_uk^h c_kv | k_rope] (B, S, n_head); nothing else."""
    model = build()
    attn_inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: attn_inputs.append(i[0])) for b in model.blocks]
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        _, caches = decode_in_pieces(model, idx, [4, 5])
        attn_inputs.clear()
        model(idx)  # the training path: the input of every attention layer over all 9 positions
    for h in hooks:
        h.remove()
    cfg = model.config
    assert (cfg.kv_lora_rank, cfg.rope_head_dim) == (32, 16)  # tiny's auto values: min(4 * 32, 64 / 2), 32 / 2
    for cache, x, block in zip(caches, attn_inputs, model.blocks):
        attn = block.attn
        assert set(cache) == {"c_kv", "k_rope", "k_inv_rms"}
        assert cache["c_kv"].shape == (2, 9, cfg.kv_lora_rank) and cache["k_rope"].shape == (2, 9, cfg.rope_head_dim)
        assert cache["k_inv_rms"].shape == (2, 9, cfg.n_head)
        assert sum(t[0, 0].numel() for t in cache.values()) == cfg.kv_lora_rank + cfg.rope_head_dim + cfg.n_head
        with torch.no_grad():
            c_kv = mla.norm(attn.kv_down(x))
            k_rope = attn.rotary(attn.k_rope(x)[:, :, None])[:, :, 0]
            k = torch.cat((attn.k_up(c_kv).view(2, 9, cfg.n_head, -1), k_rope[:, :, None].expand(-1, -1, cfg.n_head, -1)),
                          dim=-1)
        torch.testing.assert_close(cache["c_kv"], c_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache["k_rope"], k_rope, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache["k_inv_rms"], k.square().mean(-1).rsqrt(), atol=1e-5, rtol=1e-5)


def attention_calls(model, monkeypatch, idx, backward=False):
    """Run the training path on idx, recording every call of F.scaled_dot_product_attention: (q, k, v, output)."""
    calls, sdpa = [], mla.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        y = sdpa(q, k, v, **kwargs)
        calls.append((q.detach(), k.detach(), v.detach(), y.detach()))
        return y

    with monkeypatch.context() as patch:
        patch.setattr(mla.F, "scaled_dot_product_attention", recording)  # mla.F is torch.nn.functional itself
        if backward:
            model(idx, idx).backward()
        else:
            with torch.no_grad():
                model(idx)
    return calls


def test_training_attention_has_equal_qkv_widths_so_flash_can_run(monkeypatch):
    """SDPA's flash backend (CUDA and CPU alike) needs q, k and v of one head width: v is zero-padded from 32 to
    the q/k width 32 + 16, and the padded output columns are dropped. On CPU, torch's own flash kernel has the same
    rule, so the training step also runs with SDPA restricted to it (the unpadded 48/32 widths raised there)."""
    model = build().train()
    cfg = model.config
    idx = torch.randint(0, VOCAB, (2, 16))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        calls = attention_calls(model, monkeypatch, idx, backward=True)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    D, R = cfg.n_embd // cfg.n_head, cfg.rope_head_dim
    assert len(calls) == cfg.n_layer
    for q, k, v, y in calls:
        assert q.shape == k.shape == v.shape == (2, cfg.n_head, 16, D + R)
        assert (v[..., D:] == 0).all() and (y[..., D:] == 0).all()  # the padding is wasted work, never output
        unpadded = torch.nn.functional.scaled_dot_product_attention(q, k, v[..., :D], is_causal=True,
                                                                    scale=(D + R) ** -0.5)
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
    idx = torch.randint(0, VOCAB, (2, 16))
    calls = attention_calls(model, monkeypatch, idx)
    for h in hooks:
        h.remove()
    for (q, k, _, _), x, block in zip(calls, attn_inputs, model.blocks):
        ones = torch.ones(q.shape[:-1])
        torch.testing.assert_close(q.square().mean(-1), ones, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k.square().mean(-1), ones, atol=1e-4, rtol=1e-4)
        assert (k[..., :D].square().mean(-1) - 1).abs().max() > 0.1  # the no-position half alone is not normalised
        attn = block.attn
        with torch.no_grad():
            k_rope = attn.rotary(attn.k_rope(x)[:, :, None]).expand(-1, -1, cfg.n_head, -1)
            raw = torch.cat((attn.k_up(mla.norm(attn.kv_down(x))).view(2, 16, cfg.n_head, D), k_rope), dim=-1)
        cosine = torch.nn.functional.cosine_similarity(k, raw.transpose(1, 2), dim=-1)
        torch.testing.assert_close(cosine, ones, atol=1e-5, rtol=1e-5)


def test_124m_cache_is_300_numbers_per_token_per_layer_vs_the_baseline_1536():
    sizes = {}
    for name, module in (("mla", mla), ("baseline", baseline)):
        model = build_124m(module)
        with torch.device("meta"):
            _, caches = model.forward_cached(torch.zeros(1, 5, dtype=torch.long))
        assert len(caches) == 12
        sizes[name] = sum(t.numel() for t in caches[0].values()) // 5
    assert sizes == {"mla": 256 + 32 + 12, "baseline": 2 * 768}  # latent + rotary key + a key scale per head


def test_124m_defaults_and_parameter_count_vs_the_baseline():
    model, base = build_124m(mla), build_124m(baseline)
    cfg = model.config
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.rope_head_dim) == (256, 0, 32)  # DeepSeek-V2: d_c = 4 d_h, d_h/2
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(model), count(model.blocks)) == (158_957_568, 81_690_624)  # the numbers the script's comment states
    assert (count(base), count(base.blocks)) == (162_201_600, 84_934_656)
    assert abs(count(model) / count(base) - 1) < 0.10 and abs(count(model.blocks) / count(base.blocks) - 1) < 0.10
    # explicit flags override the auto values; q_lora_rank adds a (q_lora_rank x n_embd) down-projection
    lora = build_124m(mla, kv_lora_rank=128, q_lora_rank=384, rope_head_dim=16)
    attn = lora.blocks[0].attn
    assert (attn.kv_down.weight.shape, attn.k_rope.weight.shape) == ((128, 768), (16, 768))
    assert (attn.q_down.weight.shape, attn.c_q.weight.shape) == ((384, 768), (12 * (64 + 16), 384))


def training_flops_per_token(model, seq_len=1024):
    """Forward + backward FLOPs per token (matmuls and attention, as torch's FlopCounterMode counts them, causal
    attention counted in full as in the 6N + 12LHQT convention), on the meta device: (blocks, whole model)."""
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        idx = torch.zeros(1, seq_len, dtype=torch.long)
        model(idx, idx).backward()
    blocks = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                 if re.fullmatch(r"GPT\.blocks\.\d+", name))
    return blocks / seq_len, counter.get_total_flops() / seq_len


def test_124m_training_flops_within_10_percent_of_the_baseline():
    mla_blocks, mla_total = training_flops_per_token(build_124m(mla))
    base_blocks, base_total = training_flops_per_token(build_124m(baseline))
    # the analytic numbers in the script's comment: 6 x block params + 6 x L x T x H x (qk width + v width); MLA's
    # v is counted at the padded width 96 (what SDPA computes), 28.3M over the 631.7M the unpadded 64 would need
    assert base_blocks == 6 * 84_934_656 + 6 * 12 * 1024 * 12 * (64 + 64)  # 622.9M
    assert mla_blocks == 6 * 81_690_624 + 6 * 12 * 1024 * 12 * (96 + 96)  # 660.0M (+6.0%)
    assert abs(mla_blocks / base_blocks - 1) < 0.10 and abs(mla_total / base_total - 1) < 0.10


def test_muon_orthogonalises_each_mla_matrix_on_its_own():
    """The latent and the rotary key have separate down-projections (not one fused [c_kv | k_rope] matrix), and
    every attention matrix goes to Muon whole; see the comment in CausalSelfAttention."""
    model = build(randomise=False, q_lora_rank=24)
    args, _ = mla.parse_args(["--preset=tiny"])
    adam, muon = mla.build_optimizers(model, args, torch.device("cpu"))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    attn = model.blocks[0].attn
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters() if id(p) in in_muon}
    assert shapes == {"q_down.weight": (24, 64), "c_q.weight": (2 * (32 + 16), 24), "kv_down.weight": (32, 64),
                      "k_rope.weight": (16, 64), "k_up.weight": (64, 32), "v_up.weight": (64, 32),
                      "c_proj.weight": (64, 64)}


def test_seq_len_4096_trains_and_decodes_at_the_far_end():
    """The rotary tables cover 4096 positions: a full 4096-token forward/backward, and decoding the last tokens
    after a 4090-token prefill matches the full forward there (positions 4090..4095)."""
    args, _ = mla.parse_args(["--preset=tiny", "--vocab_size=256", "--seq_len=4096", "--n_layer=1", "--n_embd=32"])
    torch.manual_seed(0)
    model = mla.GPT(mla.GPTConfig.from_args(args))
    assert model.blocks[0].attn.rotary.cos.shape == (4096, 8 // 2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    idx = torch.randint(0, 256, (1, 4096))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                                        for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(idx)[:, 4090:]
        _, caches = model.forward_cached(idx[:, :4090])
        steps = [model.forward_cached(idx[:, t:t + 1], caches)[0] for t in range(4090, 4096)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert caches[0]["c_kv"].shape == (1, 4096, 16)


def test_tiny_run_with_low_rank_queries_trains(shards, tmp_path):
    """The training loop with the MLA flags set explicitly (low-rank queries, a wider latent): loss falls and the
    flags reach the model (the log's hyperparameters and parameter count)."""
    summary = mla.main(small_args(*shards, tmp_path, num_iterations=24, val_every=12, q_lora_rank=32,
                                  kv_lora_rank=48, rope_head_dim=8))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert val[24] < val[0] - 1.0, val
    text = (tmp_path / f"{summary['run_id']}.txt").read_text(encoding="utf-8")
    assert '"q_lora_rank": 32' in text and '"kv_lora_rank": 48' in text and '"rope_head_dim": 8' in text
    # 2 layers x (q_down 32x64 + c_q 80x32 + kv_down 48x64 + k_rope 8x64 + k_up, v_up 64x48 + c_proj + MLP) + 2 x 256x64
    attn = 32 * 64 + 2 * (32 + 8) * 32 + 48 * 64 + 8 * 64 + 2 * 64 * 48 + 64 * 64
    assert f"params {(2 * (attn + 2 * 64 * 256) + 2 * 256 * 64) / 1e6:.2f}M" in text


def test_cache_size_is_logged_at_start_up(shards, tmp_path):
    summary = mla.main(small_args(*shards, tmp_path, num_iterations=1))
    assert ("\n# MLA: the decoding cache holds 32 + 16 + 2 = 50 numbers per token per layer (latent, rotary key, key"
            " scale per head; standard attention: 2 x 64 = 128)") in (tmp_path / f"{summary['run_id']}.txt").read_text()

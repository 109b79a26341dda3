"""Attention, for every script: documents are isolated, keys beyond a layer's window have no effect, and
FlexAttention's block mask computes exactly what a dense mask does. Each check is shown to catch a model that
breaks its promise."""
import math

import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, load_script, random_model

EOT = 50256


def outputs(model, idx, grad):
    """Every output (name -> tensor with time on dim 1), on FlexAttention's path (no grad, CPU) or the dense one."""
    with torch.set_grad_enabled(grad):
        return {name: out.detach() for name, (out, _) in model.causal_outputs(idx).items()}


def document_leaks(model, grad, T=40):
    """Change every token of the first document: a later document's outputs (its tokens from position 12 on) must not
    move. Returns how far they moved, per output. T = 256: block masks from block arithmetic (two whole blocks)."""
    torch.manual_seed(1)
    idx = torch.randint(0, 50000, (2, T))
    idx[:, 0] = idx[:, 12] = EOT
    idx[1, 30] = EOT  # a third document in row 1
    changed = idx.clone()
    changed[:, 1:12] = (idx[:, 1:12] + 7) % 50000
    a, b = outputs(model, idx, grad), outputs(model, changed, grad)
    later = {name: (a[name][:, 12:], b[name][:, 12:]) for name in a}
    # equal infinities (masked-out logits) did not move; NaN or an infinity that moved counts as moving
    return {name: (x - y).abs().masked_fill(x == y, 0).nan_to_num(nan=math.inf).max().item()
            for name, (x, y) in later.items()}


@pytest.mark.parametrize("grad,T", [(False, 40), (False, 256), (True, 40)], ids=["flex", "flex-blocks", "dense"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_an_earlier_document_never_changes_a_later_one(script, grad, T):
    module = load_script(script)
    model = random_model(module, "--n_layer=4")
    moved = document_leaks(model, grad, T)
    if module.GPT.crosses_documents:  # a mixer that sees across documents by design (AFNO's FFT
        assert any(m > 1e-4 for m in moved.values()), moved  # over the stream): the declaration must be true
    else:
        assert all(m == 0.0 for m in moved.values()), moved


def test_the_document_check_catches_a_model_without_document_masks(monkeypatch):
    module = load_script(ROOT / "train_gpt2.py")
    model = random_model(module, "--n_layer=4")
    mask = module.document_mask
    monkeypatch.setattr(module, "document_mask", lambda docs, *a, **k: mask(torch.zeros_like(docs), *a, **k))
    assert all(moved > 1e-3 for moved in document_leaks(model, grad=False).values())


def window_effects(model, grad, window=128):
    """In a one-layer model with a 128-token window (its first stage's), change tokens 0..49: positions >= 50 + 129
    cannot see them (no effect), position 150 can (an effect). Two tokens more than the window: a key carries the
    still channels of the token before it (the key offset), and that token's input looks one token further back
    (smear and the bigram hash)."""
    model.schedule(0.0)
    torch.manual_seed(2)
    idx = torch.randint(0, 50000, (1, 260))
    changed = idx.clone()
    changed[:, :50] = (idx[:, :50] + 7) % 50000
    a, b = outputs(model, idx, grad)["logits"], outputs(model, changed, grad)["logits"]
    return (a[:, 50 + window + 1:] - b[:, 50 + window + 1:]).abs().max().item(), (a[:, 150] - b[:, 150]).abs().max().item()


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_keys_beyond_the_window_have_no_effect(script, grad):
    model = random_model(load_script(script), "--n_layer=1", "--window_blocks=1", "--device_batch_tokens=260")
    beyond, within = window_effects(model, grad)
    assert beyond == 0.0 and within > 1e-4  # within: far above fp32 rounding of logits of ~10 (~1e-6)


def test_the_window_check_catches_a_wider_window():
    model = random_model(load_script(ROOT / "train_gpt2.py"), "--n_layer=1", "--window_blocks=2",
                         "--device_batch_tokens=260")  # 256 tokens: position 179 still sees token 0
    assert window_effects(model, grad=False)[0] > 1e-3


def test_windows_follow_the_schedule_in_place():
    """Long windows of 3, 7, 11 blocks over thirds of training, short ones half as long; the final validation's 20
    and 6 blocks (a fresh model's)."""
    module = load_script(ROOT / "train_gpt2.py")
    args, _ = module.parse_args(["--preset=tiny", "--window_blocks=3,7,11"])
    model = module.GPT(module.GPTConfig.from_args(args))
    buffer = model.windows
    seen = [model.windows.tolist()]
    for progress in (0.0, 0.3, 0.34, 0.66, 0.67, 0.99, 1.0):
        model.schedule(progress)
        seen.append(model.windows.tolist())
    assert model.windows is buffer  # changed in place: a compiled graph keeps reading the same tensor
    assert seen == [[2560, 768], [384, 128], [384, 128], [896, 384], [896, 384], [1408, 640], [1408, 640],
                    [2560, 768]]


@pytest.mark.parametrize("T", [300, 384], ids=["create_block_mask", "block arithmetic"])
@pytest.mark.parametrize("window", [128, 256, 37])
def test_flex_attention_equals_a_dense_masked_reference(window, T):
    """document_mask's FlexAttention block mask and its dense mask both equal a mask written out by hand (T = 384:
    three whole blocks, the mask from block arithmetic)."""
    module = load_script(ROOT / "train_gpt2.py")
    torch.manual_seed(3)
    idx = torch.randint(0, 50000, (2, T))
    idx[0, [0, 40, 41, 200]] = EOT
    idx[1, [100]] = EOT
    docs = (idx == EOT).cumsum(1)
    q, k, v = (torch.randn(2, 3, T, 16) for _ in range(3))
    w = torch.tensor(window)
    with torch.no_grad():
        block_mask = module.document_mask(docs, w)
        flex = module.attend(q, k, v, block_mask)
    with torch.enable_grad():
        dense_mask = module.document_mask(docs, w)
    by_hand = torch.zeros(2, 1, T, T, dtype=torch.bool)
    for b in range(2):
        for i in range(T):
            for j in range(max(0, i - window + 1), i + 1):
                by_hand[b, 0, i, j] = bool(docs[b, i] == docs[b, j])
    assert isinstance(block_mask, module.BlockMask) and torch.equal(dense_mask, by_hand)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=by_hand)
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.attend(q, k, v, dense_mask), reference, atol=1e-6, rtol=1e-6)


def test_sdpa_attention_is_causal_rows_and_decodes_with_its_cache(shards, tmp_path):
    """--attention=sdpa: a stream is cut into rows of seq_len, each causal on its own (no document masks, no windows);
    the cache decodes as the full forward does; and it trains."""
    from tests.helpers import small_args
    module = load_script(ROOT / "train_gpt2.py")
    model = random_model(module, "--attention=sdpa", "--seq_len=16", "--n_layer=2")
    idx = torch.randint(0, 50000, (1, 32))
    changed = idx.clone()
    changed[:, 16:] = (idx[:, 16:] + 7) % 50000
    with torch.no_grad():
        a, b = model(idx), model(changed)
        assert a.shape == (2, 16, 50304) and torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
        row = idx[:, :16]
        logits, cache = model.forward_cached(row[:, :5])
        parts = [logits] + [model.forward_cached(row[:, t:t + 1], cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), model(row), atol=1e-4, rtol=1e-4)
    summary = module.main(small_args(*shards, tmp_path, attention="sdpa", seq_len=32, num_iterations=12))
    assert summary["final_val_loss"] < 5.0  # from ln(256) = 5.55


def block_mask_facts(mask):
    """A BlockMask as comparable facts: per query block, its counts of partial and full key blocks (and the transposed
    counts FlexAttention's backward uses) and its sets of partial and of full key blocks; and the dense block picture."""
    def sets(counts, indices):
        return [sorted(row[:c].tolist()) for c, row in zip(counts.flatten().tolist(), indices.flatten(0, -2))]
    return dict(kv_num_blocks=mask.kv_num_blocks.tolist(), full_kv_num_blocks=mask.full_kv_num_blocks.tolist(),
                q_num_blocks=mask.q_num_blocks.tolist(), full_q_num_blocks=mask.full_q_num_blocks.tolist(),
                partial=sets(mask.kv_num_blocks, mask.kv_indices), full=sets(mask.full_kv_num_blocks, mask.full_kv_indices),
                dense=mask.to_dense().tolist())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_block_masks_from_block_arithmetic_equal_create_block_mask(script):
    """document_block_mask (no pass over every query-key pair) gives the very BlockMask create_block_mask finds by
    evaluating mask_mod everywhere: for documents shorter than, as long as and longer than a 128-token block, one that
    begins at a block's edge, a stream with no EOT at its start (each row is its own stream), and windows of 1 token,
    just under, at and just over one and two blocks (an off-by-one in the arithmetic shows there), and wider than the
    stream."""
    module = load_script(script)
    from torch.nn.attention.flex_attention import create_block_mask
    T, lengths = 640, [[5, 1, 122, 128, 129, 255, 1000], [300, 128, 1, 1, 126, 1000], [1000]]
    idx = torch.randint(0, 50000, (len(lengths), T), generator=torch.Generator().manual_seed(5))
    for row, doc_lengths in enumerate(lengths):
        starts = torch.tensor(doc_lengths).cumsum(0)[:-1]
        idx[row, starts[starts < T]] = EOT  # row 0's first document and row 2's only one have no EOT at the start
    docs = (idx == EOT).cumsum(1)
    for window in (1, 127, 128, 129, 255, 256, 257, 640, 5000):
        w = torch.tensor(window)

        def mask_mod(b, h, q, kv):
            return (q >= kv) & (docs[b, q] == docs[b, kv]) & (q - kv < w)
        expected = block_mask_facts(create_block_mask(mask_mod, docs.size(0), None, T, T, device="cpu"))
        got = block_mask_facts(module.document_block_mask(docs, w, mask_mod))
        assert got == expected, (window, [key for key in got if got[key] != expected[key]])
        assert any(got["full"]) or window < 256, window  # full blocks are compared too (a block back: 255 apart)

"""The baseline's v3 pieces, each against what the record's code implies: the layer layout, the init values, the
bigram hash, YaRN's frequencies and scale per stage, the logit transform, KV-cache decoding with the key offset,
smear and the bigram path in play, and no look-back across documents. An 11-layer model of width 64 has every piece
(the tiny preset's 2 layers have no skip, backout or XSA)."""
import math

import pytest
import torch

from test_causality import find_leaks
from tests.helpers import ROOT, load_script, random_model
from tests.test_attention import document_leaks

BASE = load_script(ROOT / "train_gpt2.py")
EOT = 50256
DEEP = ["--n_layer=11", "--n_embd=64", "--n_head=2", "--value_embeds=5", "--bigram_vocab=1000"]


def fresh_model(*flags):
    args, _ = BASE.parse_args(["--preset=tiny", *flags])
    torch.manual_seed(0)
    return BASE.GPT(BASE.GPTConfig.from_args(args))


def test_the_layout_of_11_layers_is_the_records():
    layout = BASE.Layout.of(11, 5)
    assert [i for i in range(11) if not layout.attends[i]] == [6]  # "Attention is skipped in layer 6"
    assert [i for i in range(11) if layout.long[i]] == [3, 10]  # bm_sizes: long at 3 and 10
    assert [i for i in range(11) if layout.xsa[i]] == [1, 3, 4, 7]  # xsa_layers = [1, 3, 4, 7]
    assert layout.ve == (0, 1, None, None, None, None, None, None, 2, 3, 4)  # [ve0, ve1, None * 6, ve2, ve3, ve4]
    assert (layout.skip, layout.backout) == ((3, 6), 7)  # skip_in [3], skip_out [6]; backout_layer 7
    shallow = BASE.Layout.of(2, 5)
    assert shallow.attends == (True, True) and shallow.long == (False, True) and not any(shallow.xsa)
    assert shallow.ve == (0, 1) and shallow.skip is None and shallow.backout is None
    assert BASE.max_value_embeds(11) == 10 and BASE.max_value_embeds(2) == 2


def test_the_model_at_init_is_what_the_records_init_implies():
    model = fresh_model(*DEEP)
    C = 64
    for block in model.blocks:
        assert (block.resid_lambda.item(), block.x0_lambda.item()) == (pytest.approx(1.1), 0.0)
        assert block.bigram_lambda.item() == pytest.approx(0.1)
        assert block.mlp.c_proj.weight.abs().max() == 0
        bound = 3 ** 0.5 * 0.5 * C ** -0.5  # c_fc: uniform, half the attention's std
        assert bound * 0.95 < block.mlp.c_fc.weight.abs().max() <= bound
        if block.attn is None:
            continue
        attn = block.attn
        assert attn.lambdas.tolist() == [0.5, 1.0] and attn.c_proj.weight.abs().max() == 0
        assert attn.attn_gate.weight.abs().max() == 0  # sigmoid(0) = 0.5: every head half open
        for lin in (attn.c_q, attn.c_k, attn.c_v):
            bound = 3 ** 0.5 * C ** -0.5
            assert bound * 0.95 < lin.weight.abs().max() <= bound
        if attn.ve:
            assert attn.ve_gate.weight.abs().max() == 0  # 2 sigmoid(0) = 1: the value embedding added whole
        if attn.xsa:
            assert attn.xsa_alpha.abs().max() == 0  # tanh(0) = 0: XSA off at init
    assert model.skip_lambda.item() == -1.5 and model.skip_gate.weight.abs().max() == 0
    assert model.backout_lambda.item() == 0.5
    assert model.smear_lambda.item() == 0.0 and model.smear_gate.weight.abs().max() == 0
    assert model.bigram_embed.weight.abs().max() == 0 and all(t.weight.abs().max() == 0 for t in model.value_embeds)
    head = model.lm_head.weight
    assert head.std().item() == pytest.approx(0.005, rel=0.02) and torch.equal(model.wte.weight, head)


def test_the_bigram_hash_and_its_table_size():
    idx = torch.tensor([[EOT, 17, 40000, EOT, 5], [3, 4, 5, 6, 7]])
    model = fresh_model()
    rows = BASE.Hyperparameters.bigram_vocab
    assert rows == 50304 * 5 == model.config.bigram_vocab and model.bigram_embed.weight.shape[0] == rows
    hashed = BASE.bigram_hash(idx, model.has_prev(idx), rows)
    mod = rows - 1

    def h(prev, cur):
        return ((36313 * cur) ^ (27191 * prev)) % mod

    assert hashed.tolist() == [[mod, h(EOT, 17), h(17, 40000), mod, h(EOT, 5)],
                               [mod, h(3, 4), h(4, 5), h(5, 6), h(6, 7)]]
    # decoding on: the first new token hashes with the last cached one
    assert BASE.bigram_hash(idx[1:, 1:], model.has_prev(idx[1:, 1:], idx[1:, :1]), rows, idx[1:, :1])[0, 0] == h(3, 4)


def test_yarn_frequencies_and_scale_after_each_window_change_and_in_the_checkpoint():
    model = fresh_model("--window_blocks=3,7,11", "--n_embd=256", "--n_head=2")  # head_dim 128
    base = (1 / 1024) ** torch.linspace(0, 1, 32)
    expected, freqs, scale = [], torch.cat((base, torch.zeros(32))), 0.1
    for old, new in ((None, 3), (3, 7), (7, 11)):
        if old is not None:
            turns = old * 128 * freqs / (2 * math.pi)
            blend = ((turns - 1) / 31).clamp(0, 1)
            freqs = freqs * (old / new + blend * (1 - old / new))
            scale *= 1 + 0.2 * math.log(new / old)
        expected.append((freqs, scale))
    for progress, stage in ((0.0, 0), (0.33, 0), (0.34, 1), (0.7, 2), (0.99, 2)):
        model.schedule(progress)
        torch.testing.assert_close(model.freqs, expected[stage][0], rtol=1e-6, atol=0)
        assert model.attn_scale.item() == pytest.approx(expected[stage][1], rel=1e-6)
        assert model.windows.tolist() == [[3, 7, 11][stage] * 128, [1, 3, 5][stage] * 128]
    model.schedule(1.0)  # the final validation: wider windows, the last stage's frequencies (no YaRN there)
    assert model.windows.tolist() == [20 * 128, 6 * 128]
    torch.testing.assert_close(model.freqs, expected[2][0], rtol=1e-6, atol=0)
    model.schedule(0.5)
    state = model.state_dict()
    assert {"windows", "freqs", "attn_scale"} <= set(state)  # in the checkpoint
    again = fresh_model("--window_blocks=3,7,11", "--n_embd=256", "--n_head=2")
    assert again.windows.tolist() == [2560, 768]  # a fresh model is in its final state (sample.py, evaluation)
    again.load_state_dict(state)
    assert again.windows.tolist() == [896, 384] and torch.equal(again.freqs, model.freqs)


def test_the_logit_transform_is_the_records_up_to_a_constant():
    z = torch.linspace(-40, 40, 2001, dtype=torch.float64)
    torch.testing.assert_close(BASE.logit_transform(z) + 11.5, 23 * torch.sigmoid((z + 5) / 7.5), rtol=0, atol=1e-12)
    x, w = torch.randn(6, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets = torch.tensor([1, 2, -1, 4, 49, 0])
    loss = BASE.linear_logit_cross_entropy(x, w, targets, BASE.LOGIT_CAP, BASE.LOGIT_OFFSET, BASE.LOGIT_WIDTH)
    keep = targets >= 0
    reference = torch.nn.functional.cross_entropy(23 * torch.sigmoid((x @ w.T + 5) / 7.5)[keep], targets[keep])
    # the script computes the logits in fp32: a few roundings of 2^-24 each, far below a wrong offset's ~1e-2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def random_deep_model(*flags):
    return random_model(BASE, *DEEP, *flags)


def test_kv_cache_decoding_equals_the_full_forward_with_key_offset_smear_and_bigram():
    model = random_deep_model("--vocab_size=50304")
    model.windows.copy_(torch.tensor([6, 3]))  # windows shorter than the sequence
    idx = torch.randint(0, 50000, (2, 20))
    idx[0, 0] = idx[0, 9] = idx[1, 1] = idx[1, 15] = EOT  # a document at position 0, one at position 1
    with torch.no_grad():
        full = model(idx)
        parts, cache = [], None
        for a, b in ((0, 1), (1, 2), (2, 7), (7, 12)) + tuple((t, t + 1) for t in range(12, 20)):
            logits, cache = model.forward_cached(idx[:, a:b], cache)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True], ids=["flex", "dense"])
def test_no_look_back_across_documents_through_smear_bigram_or_key_offset(grad):
    model = random_deep_model()
    assert all(moved == 0.0 for moved in document_leaks(model, grad).values())


def test_the_document_check_catches_the_records_one_token_look_back(monkeypatch):
    """The record lets a document's first token look back at the previous document's last through smear, the
    bigram hash and the key offset; a model that does so fails the check."""
    model = random_deep_model()
    monkeypatch.setattr(model, "has_prev", lambda idx, last=None: torch.ones_like(idx, dtype=torch.bool))
    assert all(moved > 1e-4 for moved in document_leaks(model, grad=False).values())


def test_the_deep_model_is_causal():
    assert find_leaks(random_deep_model("--vocab_size=512")) == []

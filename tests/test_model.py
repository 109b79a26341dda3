"""Model shapes and sizes, the first loss, and KV-cache decoding, for every train script."""
import math

import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, load_script


def tiny_model(module, **overrides):
    args, _ = module.parse_args(["--preset=tiny", "--vocab_size=512", "--seq_len=32"] +
                                [f"--{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return module.GPT(module.GPTConfig.from_args(args)).eval(), args


def test_124m_preset_parameter_count_and_flops_on_meta_device():
    """539.1M parameters, 463.6M of them in four kinds of table looked up or multiplied once per token: the token
    embedding and the untied head (50304 x 768 each), 5 value-embedding tables (50304 x 768 each) and the bigram
    hash table (251,520 x 768). 75.5M in the blocks: 10 attention layers (q, k, v, proj; the record's layer 6 has
    none) and 11 4x MLPs. 1,184 gate weights and scalars: attention gates 10 x 6 x 12, value-embedding gates 5 x 6
    x 12, XSA 4 x 6, attention lambdas 10 x 2, block lambdas 11 x 3, skip gate 12 + 1, smear gate 12 + 1,
    backout 1. Training FLOPs per token: 6 per weight that multiplies (blocks, head and the 12-input gates;
    embedding lookups are free) plus attention over a causal row of the last stage's long window (1408 tokens)
    as SDPA counts it: 12 * attention layers * width * keys."""
    from torch.utils.flop_counter import FlopCounterMode
    module = load_script(ROOT / "train_gpt2.py")
    args, _ = module.parse_args(["--attention=sdpa", "--seq_len=1408"])
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
    n_params = sum(p.numel() for p in model.parameters())
    table = 50304 * 768
    tables = 7 * table + 251_520 * 768
    blocks = 10 * 4 * 768 * 768 + 11 * 2 * 768 * 3072
    gates = 10 * 6 * 12 + 5 * 6 * 12 + 12 + 12  # the matrices among the small parameters (they multiply)
    scalars = 4 * 6 + 10 * 2 + 11 * 3 + 1 + 1 + 1
    assert (tables, blocks) == (463_601_664, 75_497_472)
    assert n_params == tables + blocks + gates + scalars == 539_100_320
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        idx = torch.zeros(1, 1408, dtype=torch.long)
        model(idx, idx).backward()
    flops_per_token = counter.get_total_flops() / 1408
    assert flops_per_token == 6 * (blocks + table + gates) + 12 * 10 * 768 * 1408 == 814_553_568


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_124m_preset_builds_on_meta_device(script):
    module = load_script(script)
    args, _ = module.parse_args([])
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 1e9


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shapes_and_first_loss(script):
    module = load_script(script)
    model, args = tiny_model(module)
    idx = torch.randint(0, 512, (3, 32))
    assert model(idx).shape == (3, 32, 512)
    loss = model(idx, torch.randint(0, 512, (3, 32)))
    assert loss.ndim == 0 and loss.item() == pytest.approx(math.log(512), abs=0.02)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if hasattr(load_script(s).GPT, "forward_cached")],
                         ids=lambda p: p.name)
def test_kv_cache_decoding_matches_the_full_forward(script):
    """Decoding with the cache = the full forward, across document boundaries (EOT tokens) and past the windows
    (whole 128-token blocks would hide nothing in 20 tokens: this model's long and short windows are 6 and 3)."""
    module = load_script(script)
    model, _ = tiny_model(module, vocab_size=50304, n_layer=4)  # layers: short, short, short, long window
    for p in model.parameters():  # zero-initialised projections would hide cache bugs
        torch.nn.init.normal_(p, std=0.05)
    model.windows.copy_(torch.tensor([6, 3]))  # the windows schedule() sets (a buffer)
    idx = torch.randint(0, 50000, (2, 20))
    idx[0, 9] = idx[1, 3] = idx[1, 15] = 50256  # documents begin mid-sequence
    with torch.no_grad():
        full = model(idx)
        logits, cache = model.forward_cached(idx[:, :7])  # prefill, then a block of 5, then one at a time
        parts = [logits]
        logits, cache = model.forward_cached(idx[:, 7:12], cache)
        parts.append(logits)
        for t in range(12, 20):
            logits, cache = model.forward_cached(idx[:, t:t + 1], cache)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)

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


def test_124m_preset_parameter_count_on_meta_device():
    module = load_script(ROOT / "train_gpt2.py")
    args, _ = module.parse_args([])
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
    n_params = sum(p.numel() for p in model.parameters())
    embedding = 50304 * 768  # the input embedding and the untied head each
    blocks = 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # attention q, k, v, proj + the 4x MLP
    assert n_params == 2 * embedding + blocks == 162_201_600
    assert blocks == 84_934_656  # GPT-2 small's 85M non-embedding parameters ("124M" counts a tied head)


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
    module = load_script(script)
    model, _ = tiny_model(module)
    for p in model.parameters():  # zero-initialised projections would hide cache bugs
        torch.nn.init.normal_(p, std=0.05)
    idx = torch.randint(0, 512, (2, 20))
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

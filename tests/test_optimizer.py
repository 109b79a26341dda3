"""Muon's Newton–Schulz orthogonalisation, the parameter groups, and the LR / momentum schedules."""
import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, load_script

train = load_script(ROOT / "train_gpt2.py")


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (5, 32, 16)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    spectrum = torch.logspace(-1.3, 0, U.shape[-1]) * 7.0  # singular values spread over 20x (a random square
    G = U @ torch.diag_embed(spectrum) @ Vh  # Gaussian has a ~0 one, which 5 steps deliberately leave small)
    X = train.zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape
    singular = torch.linalg.svdvals(X)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Muon's quintic maps them into ~[0.7, 1.2]
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor: NS must point the same way
    cosine = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cosine.min() > 0.95


def test_muon_step_is_the_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16))
    start = w.detach().clone()
    grad = torch.randn(32, 16)
    w.grad = grad.clone()
    opt = train.Muon([w], lr=0.1, momentum=0.9)
    opt.step()
    buf = 0.1 * grad  # lerp from zero
    expected = start - 0.1 * (32 / 16) ** 0.5 * train.zeropower_via_newtonschulz5(grad.lerp(buf, 0.9))
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_parameter_is_in_exactly_one_group(script):
    module = load_script(script)
    args, _ = module.parse_args(["--preset=tiny"])
    model = module.GPT(module.GPTConfig.from_args(args))
    adam, muon = module.build_optimizers(model, args, torch.device("cpu"))
    grouped = [p for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for g in muon.param_groups for p in g["params"])
    assert {id(p) for p in model.lm_head.parameters()} <= {id(p) for g in adam.param_groups for p in g["params"]}
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(id(m.weight) not in {id(p) for p in muon.param_groups[0]["params"]} for m in embeddings)
    assert adam.defaults["betas"] == (0.8, 0.95)


def test_lr_schedule_warmup_constant_cooldown():
    args, _ = train.parse_args(["--num_iterations=100", "--cooldown_frac=0.4", "--warmup_steps=10", "--lr_floor=0",
                                "--batch_stages=1"])
    factors = [train.lr_factor(step, train.run_progress(step, args), args) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(f == 1.0 for f in factors[10:61])
    assert factors[80] == pytest.approx(0.5) and factors[100] == 0.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_batch_stages_and_their_lr_multipliers():
    """2025-11-29: a third of the batch, two thirds, all of it, at 1, 2**0.6 and 3**0.6 times the LR; the cool-down
    (the last 45%) ends at lr_floor = 0.1 of the stage's LR."""
    args, _ = train.parse_args(["--num_iterations=300"])
    assert train.stage_batches(args) == [131072, 262144, 393216]
    stages = [train.batch_stage(train.run_progress(step, args), args) for step in (0, 99, 100, 199, 200, 299)]
    assert [s[0] for s in stages] == [131072, 131072, 262144, 262144, 393216, 393216]
    assert [s[1] for s in stages] == pytest.approx([1, 1, 2 ** 0.6, 2 ** 0.6, 3 ** 0.6, 3 ** 0.6])
    assert train.lr_factor(150, 0.5, args) == pytest.approx(2 ** 0.6)  # the cool-down starts at 0.55
    left = 0.2 / 0.45
    assert train.lr_factor(240, 0.8, args) == pytest.approx(3 ** 0.6 * (left + (1 - left) * 0.1))
    assert train.lr_factor(300, 1.0, args) == pytest.approx(3 ** 0.6 * 0.1)


def test_with_a_time_budget_the_cooldown_follows_the_clock():
    args, _ = train.parse_args(["--num_iterations=1000000", "--cooldown_frac=0.5", "--time_budget_s=60",
                                "--lr_floor=0", "--batch_stages=1"])
    assert train.run_progress(10, args, elapsed=45.0) == pytest.approx(0.75)
    assert train.run_progress(10, args, elapsed=75.0) == 1.0
    assert train.run_progress(900000, args, elapsed=1.0) == pytest.approx(0.9)  # steps can be further along
    assert train.lr_factor(10, train.run_progress(10, args, 20.0), args) == 1.0
    assert train.lr_factor(10, train.run_progress(10, args, 45.0), args) == pytest.approx(0.5)
    assert train.lr_factor(10, train.run_progress(10, args, 75.0), args) == 0.0


def test_muon_momentum_warms_up_from_085():
    args, _ = train.parse_args(["--muon_momentum_warmup_steps=300"])
    assert train.muon_momentum(0, args) == pytest.approx(0.85)
    assert train.muon_momentum(150, args) == pytest.approx(0.90)
    assert train.muon_momentum(300, args) == train.muon_momentum(5000, args) == pytest.approx(0.95)


def test_muon_stacks_same_shape_matrices_and_keeps_mixed_shapes_apart():
    """One Muon step over several same-shape matrices (one batched Newton–Schulz) and other shapes equals a Muon step
    on each matrix alone."""
    torch.manual_seed(0)
    shapes = [(32, 16), (32, 16), (32, 16), (16, 48), (8, 8), (16, 48)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    together = train.Muon(params, lr=0.1, momentum=0.9)
    alone = [train.Muon([p], lr=0.1, momentum=0.9) for p in singles]
    for _ in range(2):  # twice, so the momentum buffers matter
        for p, q, g in zip(params, singles, grads):
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for opt in alone:
            opt.step()
    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_muon_allocates_its_momentum_buffers_once(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(3)]
    opt = train.Muon(params)
    allocations = []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: allocations.append(1) or zeros_like(*a, **k))
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(allocations) == 3

"""The optimizers and their schedules, as the modded-nanogpt 2026-01-26 record has them (r0126:N: line N of its log):
NorMuon (Polar Express, the second moment, cautious weight decay), Adam every other step, the parameter table of every
script's model, and the LR / momentum schedules at hand-computed steps."""
import fnmatch
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, load_script, read_log, small_args

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


# ---- NorMuon, computed here from its formula (r0126:699-775), in float64 ----

POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def polar_express(G):
    """Five Polar Express steps on the wide orientation, after scaling G's Frobenius norm to 1/1.02."""
    X = G.mT if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.shape[0] > G.shape[1] else X


class ReferenceNorMuon:
    """One matrix's NorMuon, step by step: Nesterov momentum, Polar Express, each row (tall or square) or column (wide)
    divided by the root of its mean square's EMA, the Frobenius norm restored, then the update with cautious decay."""

    def __init__(self, W, lr, momentum, beta2, weight_decay, lr_mul=1.0, transposed=False):
        self.W, self.transposed = W.double().clone(), transposed
        self.lr, self.momentum, self.beta2, self.weight_decay, self.lr_mul = lr, momentum, beta2, weight_decay, lr_mul
        self.buf, self.second = torch.zeros_like(self.W), None

    def step(self, G):
        G = G.double()
        self.buf = self.momentum * self.buf + (1 - self.momentum) * G
        U = (1 - self.momentum) * G + self.momentum * self.buf
        if self.transposed:  # the record's (in, out) layout
            U = U.T
        V = polar_express(U)
        rows, cols = V.shape
        mean_square = (V ** 2).mean(dim=1, keepdim=True) if rows >= cols else (V ** 2).mean(dim=0, keepdim=True)
        self.second = (1 - self.beta2) * mean_square if self.second is None else (
            self.beta2 * self.second + (1 - self.beta2) * mean_square)
        normalised = V / self.second.sqrt()
        V = normalised * (V.norm() / normalised.norm())
        lr_W = self.lr * self.lr_mul * max(1.0, rows / cols) ** 0.5
        if self.transposed:
            V = V.T
        agree = (V * self.W >= 0).double()
        self.W = self.W - lr_W * V - self.lr * lr_W * self.weight_decay * self.W * agree
        return self.W


@pytest.mark.parametrize("shape, transposed", [((32, 16), False), ((16, 48), False), ((24, 24), False),
                                               ((16, 48), True)], ids=["tall", "wide", "square", "transposed"])
def test_normuon_steps_match_the_formula(shape, transposed):
    """Three steps (the momentum and the second moment carry over) with weight decay, against the formula."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape) * 0.5)
    start = w.detach().clone()
    settings = dict(lr=0.05, momentum=0.9, beta2=0.95, weight_decay=1.2, lr_mul=2.0, transposed=transposed)
    opt = train.NorMuon([w], **settings)
    reference = ReferenceNorMuon(w.detach(), **settings)
    for _ in range(3):
        grad = torch.randn(shape)
        w.grad = grad.clone()
        opt.step()
        want = reference.step(grad)
        torch.testing.assert_close(w.detach().double(), want, rtol=0, atol=2e-6)
    assert (w.detach() - start).abs().max() > 0.05  # it moved


def test_normuon_second_moment_reduces_the_shorter_side():
    """One statistic per row of a tall or square matrix, per column of a wide one, per matrix of a 3-D stack
    (r0126:410-415); a transposed group's are those of W^T."""
    shapes = [(32, 16), (16, 48), (8, 8), (5, 16, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    flipped = torch.nn.Parameter(torch.randn(16, 48))
    opt = train.NorMuon([dict(params=params), dict(params=[flipped], transposed=True)])
    for p in [*params, flipped]:
        p.grad = torch.randn_like(p)
    opt.step()
    moments = [tuple(opt.state[p]["second_moment"].shape) for p in [*params, flipped]]
    assert moments == [(32, 1), (1, 48), (8, 1), (5, 1, 32), (48, 1)]


def test_normuon_stacks_same_shape_matrices_and_keeps_mixed_shapes_apart():
    """One step over several same-shape matrices (one batched Newton–Schulz), a transposed one stacked with them as
    W^T, and other shapes equals a step on each matrix alone."""
    torch.manual_seed(0)
    shapes = [(32, 16), (32, 16), (16, 32), (16, 48), (8, 8), (16, 48)]
    transposed = [False, False, True, False, False, False]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    together = train.NorMuon([dict(params=[p], transposed=t) for p, t in zip(params, transposed)], lr=0.1)
    alone = [train.NorMuon([q], lr=0.1, transposed=t) for q, t in zip(singles, transposed)]
    for _ in range(2):  # twice, so the momentum and second-moment buffers matter
        for p, q, g in zip(params, singles, grads):
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for opt in alone:
            opt.step()
    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_normuon_allocates_its_buffers_once(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(3)]
    opt = train.NorMuon(params)
    allocations = []
    for name in ("zeros_like", "zeros"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, **k: allocations.append(1) or _f(*a, **k))
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(allocations) == 3 * 2  # a momentum and a second moment per matrix, at its first step


SHARDED_SHAPES = [(32, 16)] * 5 + [(16, 48), (48, 16), (3, 8, 8)]  # 5 in a stack: 3 + 2 and a padding matrix
SHARDED_TRANSPOSED = [False] * 6 + [True, False]  # (48, 16) transposed joins (16, 48): a stack of 2, one each


def sharded_normuon_run(world=1, rank=0):
    """Three NorMuon steps over SHARDED_SHAPES with the same gradients on every rank (what DDP hands it): the
    weights and the optimizer state afterwards."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHARDED_SHAPES]
    opt = train.NorMuon([dict(params=[p], transposed=t) for p, t in zip(params, SHARDED_TRANSPOSED)], lr=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return dict(weights=[p.detach() for p in params],
                state=[(opt.state[p]["momentum_buffer"], opt.state[p]["second_moment"]) for p in params])


def _sharded_normuon_worker(rank, store_path, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    calls = []
    original = train.zeropower_via_newtonschulz5
    train.zeropower_via_newtonschulz5 = lambda G, steps=5: calls.append(G.size(0)) or original(G, steps)
    try:
        result = sharded_normuon_run()
    finally:
        train.zeropower_via_newtonschulz5 = original
    torch.save(dict(result, calls=calls), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_normuon_split_across_two_processes_equals_one_process(tmp_path):
    """With 2 gloo processes each rank orthogonalises its share of every stack (5 same-shape matrices: 3 and
    2 plus a zero padding one; a stack of 2: one each; a lone 3-D weight: rank 1 gets only padding) and the
    updates are all-gathered: after three steps both ranks' weights, momenta and second moments equal a single
    process's bit for bit (fp32 on a CPU: each matrix's Newton–Schulz and normalisation do not depend on what
    else is in its batch)."""
    torch.multiprocessing.spawn(_sharded_normuon_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    single = sharded_normuon_run()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["calls"] == [3, 1, 1] * 3, got["calls"]  # each step's per-rank Newton–Schulz batches (1 process: 5, 2, 1)
        for name, want, have in zip(SHARDED_SHAPES, single["weights"], got["weights"]):
            assert torch.equal(want, have), (rank, name)
        for (m, v), (m2, v2) in zip(single["state"], got["state"]):
            assert torch.equal(m, m2) and torch.equal(v, v2), rank


# ---- cautious weight decay: only where the update and the weight agree in sign ----

def decayed_part(opt_class, p0, grad, **settings):
    """(the update without decay, what the decay took): one step with and one without weight decay, from p0."""
    steps = []
    for wd in (0.0, settings.pop("weight_decay")):
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        opt_class([p], weight_decay=wd, **settings).step()
        steps.append(p.detach())
    plain, decayed = steps
    return p0 - plain, plain - decayed


def test_normuon_decays_where_update_and_weight_agree_by_lr_times_the_matrix_lr():
    """r0126:757-758: mask (update * W) >= 0 and decay lr * lr_W * weight_decay per step, lr_W = lr * lr_mul * shape
    multiplier: here (32, 16), lr_mul 2, so lr_W = 0.04 * 2 * 2**0.5."""
    torch.manual_seed(1)
    p0, grad = torch.randn(32, 16), torch.randn(32, 16)
    update, decay = decayed_part(train.NorMuon, p0, grad, lr=0.04, lr_mul=2.0, weight_decay=1.2)
    lr_W = 0.04 * 2.0 * 2 ** 0.5
    agree = update * p0 >= 0
    assert 0.3 < agree.float().mean() < 0.7  # both kinds present
    torch.testing.assert_close(decay, 0.04 * lr_W * 1.2 * p0 * agree, rtol=1e-4, atol=1e-6)
    assert (decay[~agree] == 0).all() and (decay[agree].abs() > 0).all()


def test_adam_decays_where_update_and_weight_agree_by_lr_squared():
    """r0126:672, 689-691: mask (update * p) > 0, decay (lr * lr_mul)**2 * weight_decay * wd_mul. The first Adam step
    moves each weight by lr_p * sign(gradient): a weight whose sign its update shares decays, one whose it does not
    does not."""
    p0 = torch.tensor([1.0, 1.0, -1.0, -1.0])
    grad = torch.tensor([0.3, -2.0, -0.01, 5.0])  # updates +, -, -, +: agree, disagree, agree, disagree
    update, decay = decayed_part(train.CautiousAdam, p0, grad, lr=0.1, lr_mul=3.0, wd_mul=2.0, weight_decay=0.05)
    lr_p = 0.1 * 3.0
    torch.testing.assert_close(update, lr_p * grad.sign())
    torch.testing.assert_close(decay, lr_p ** 2 * 0.05 * 2.0 * p0 * torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_adam_matches_the_formula_over_steps():
    """Bias-corrected Adam with eps added to sqrt(v) (r0126:670-671, 685-687), three updates."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(20))
    opt = train.CautiousAdam([p], lr=0.01, betas=(0.75, 0.95), eps=1e-8, weight_decay=0.0)
    want, m, v = p.detach().double().clone(), 0.0, 0.0
    for t in range(1, 4):
        g = torch.randn(20)
        p.grad = g.clone()
        opt.step()
        m, v = 0.75 * m + 0.25 * g.double(), 0.95 * v + 0.05 * g.double() ** 2
        want = want - 0.01 * (1 - 0.95 ** t) ** 0.5 / (1 - 0.75 ** t) * m / (v.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)


# ---- Adam every other step, on the sum of both steps' gradients ----

def test_adam_holds_on_even_steps_and_steps_on_the_sum_of_both_gradients(shards, tmp_path, monkeypatch):
    """Through train_step: after step 0 the Adam parameters are unchanged (NorMuon's moved) and their gradients are
    held in the optimizer's state; step 1 updates them from the sum of both steps' gradients (r0126:647-650: the
    record never clears them in between, so the second backward adds into them)."""
    run = train.setup(small_args(*shards, tmp_path, num_iterations=4, val_tokens=0))
    with torch.no_grad():  # random weights: the zero-initialised head would stop every gradient but its own
        for p in run.raw_model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
    adam, normuon = run.optimizers
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    before = {id(p): p.detach().clone() for p in run.raw_model.parameters()}
    seen = []
    step = adam.step
    monkeypatch.setattr(adam, "step", lambda hold=False: seen.append(
        {id(p): p.grad.clone() for p in adam_params if p.grad is not None}) or step(hold=hold))
    train.train_step(run, 0)
    assert all(torch.equal(p, before[id(p)]) for p in adam_params)
    assert all(not torch.equal(p, before[id(p)]) for g in normuon.param_groups for p in g["params"])
    held = {id(p): adam.state[p]["held_grad"].clone() for p in adam_params if id(p) in seen[0]}
    assert held and all(torch.equal(held[k], seen[0][k]) for k in held)
    assert not any("exp_avg" in adam.state[p] for p in adam_params)
    train.train_step(run, 1)
    assert all(not torch.equal(p, before[id(p)]) for p in adam_params)
    for p in adam_params:
        if id(p) in held:
            beta1 = next(g["betas"][0] for g in adam.param_groups if any(q is p for q in g["params"]))
            torch.testing.assert_close(adam.state[p]["exp_avg"], (1 - beta1) * (held[id(p)] + seen[1][id(p)]),
                                       rtol=1e-6, atol=0)
            assert "held_grad" not in adam.state[p] and adam.state[p]["step"] == 1


def test_a_run_resumed_after_an_even_step_continues_bit_for_bit(shards, tmp_path):
    """Checkpoint 3 is taken after step 2, an even step: the Adam gradients it held are in the checkpoint, and the
    resumed run's every loss and final weight are the uninterrupted run's, exactly (CPU, fp32). Without the held
    gradients the resumed run would differ from its second step on."""
    full = train.main(small_args(*shards, tmp_path / "a", num_iterations=7, save_every=3, val_every=0))
    run_dir = tmp_path / "a" / full["run_id"]
    ckpt = torch.load(run_dir / "ckpt_step000003.pt", weights_only=False)
    held = [s for s in ckpt["optimizers"][0]["state"].values() if "held_grad" in s]
    assert sum(bool(s["held_grad"].abs().max() > 0) for s in held) > len(held) / 2  # a few vectors get none yet
    resumed = train.main([f"--resume={run_dir / 'ckpt_step000003.pt'}", f"--log_dir={tmp_path / 'b'}"])
    train_a, _, _ = read_log(tmp_path / "a" / f"{full['run_id']}.txt")
    train_b, _, _ = read_log(tmp_path / "b" / f"{resumed['run_id']}.txt")
    assert sorted(train_b) == [4, 5, 6, 7] and all(train_b[s] == train_a[s] for s in train_b)
    end_a = torch.load(run_dir / "ckpt_step000007.pt", weights_only=False)
    end_b = torch.load(resumed["last_checkpoint"], weights_only=False)
    for name, tensor in end_a["model"].items():
        assert torch.equal(end_b["model"][name], tensor), name
    for s in ckpt["optimizers"][0]["state"].values():  # the same checkpoint without its held gradients
        s.pop("held_grad", None)
    torch.save(ckpt, tmp_path / "dropped.pt")
    dropped = train.main([f"--resume={tmp_path / 'dropped.pt'}", f"--log_dir={tmp_path / 'c'}"])
    train_c, _, _ = read_log(tmp_path / "c" / f"{dropped['run_id']}.txt")
    assert train_c[4] == train_a[4] and train_c[5] != train_a[5]


# ---- the schedules (r0126:1519-1547), at steps computed by hand ----

@pytest.mark.parametrize("stages, want", [(1, [1.0]), (2, [1.0, 1.52]), (3, [1.0, 1.52, 1.73]),
                                          (4, [1.0, 1.52, 1.73, 2.0])])
def test_auto_stage_lr_multipliers(stages, want):
    """(16/8)**0.6 = 1.52 and (24/8)**0.5 = 1.73 as the record writes them (r0126:1525-1527), 4**0.5 beyond."""
    args, _ = train.parse_args([f"--batch_stages={stages}"])
    assert train.stage_lr_mults(args) == want


def test_explicit_stage_lr_multipliers():
    args, _ = train.parse_args(["--stage_lr_mults=1,2.5,.5"])
    assert train.stage_lr_mults(args) == [1.0, 2.5, 0.5]
    assert train.batch_stage(train.run_progress(1500, args), args) == (393216, 0.5)


def lr_at(step, args):
    return train.lr_factor(step, train.run_progress(step, args), args)


def test_lr_schedule_of_a_2160_step_run():
    """2160 steps (the 124M defaults but the length), three stages switching with the batch at steps 720 and 1440,
    cool-down over the last 55% (from step 972) to the absolute floor 0.1: m * w + (1 - w) * 0.1, w = (1 - step /
    2160) / 0.55."""
    args, _ = train.parse_args(["--num_iterations=2160"])
    w = lambda step: (1 - step / 2160) / 0.55  # noqa: E731
    assert lr_at(0, args) == lr_at(719, args) == 1.0
    assert lr_at(720, args) == lr_at(971, args) == 1.52  # the batch doubles: (16/8)**0.6
    assert lr_at(972, args) == pytest.approx(1.52)  # w = 1: the cool-down starts
    assert lr_at(1439, args) == pytest.approx(1.52 * w(1439) + (1 - w(1439)) * 0.1)  # 0.96180
    assert lr_at(1440, args) == pytest.approx(1.73 * w(1440) + (1 - w(1440)) * 0.1)  # 1.08788: (24/8)**0.5
    assert lr_at(1440, args) == pytest.approx(1.087879, abs=1e-6)
    assert lr_at(2159, args) == pytest.approx(0.101372, abs=1e-6)
    assert lr_at(2160, args) == pytest.approx(0.1)  # the floor, not 0.1 of the stage's 1.73
    assert train.batch_stage(train.run_progress(719, args), args)[0] == 131072
    assert train.batch_stage(train.run_progress(720, args), args)[0] == 262144


def test_lr_switch_points_of_the_record():
    """The record's 1535 scheduled steps (r0126:1733): 1.52 from step 512 (512/1535 > 1/3), 1.73 from 1024."""
    args, _ = train.parse_args(["--num_iterations=1535", "--cooldown_frac=0"])
    assert [lr_at(s, args) for s in (511, 512, 1023, 1024)] == [1.0, 1.52, 1.52, 1.73]


def test_lr_warmup_and_cooldown_without_a_floor():
    args, _ = train.parse_args(["--num_iterations=100", "--cooldown_frac=0.4", "--warmup_steps=10", "--lr_floor=0",
                                "--batch_stages=1"])
    factors = [lr_at(step, args) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(f == 1.0 for f in factors[10:61])
    assert factors[80] == pytest.approx(0.5) and factors[100] == 0.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_batch_stages():
    args, _ = train.parse_args(["--num_iterations=300"])
    assert train.stage_batches(args) == [131072, 262144, 393216]
    stages = [train.batch_stage(train.run_progress(step, args), args) for step in (0, 99, 100, 199, 200, 299)]
    assert stages == [(131072, 1.0), (131072, 1.0), (262144, 1.52), (262144, 1.52), (393216, 1.73), (393216, 1.73)]


def test_with_a_time_budget_the_cooldown_follows_the_clock():
    args, _ = train.parse_args(["--num_iterations=1000000", "--cooldown_frac=0.5", "--time_budget_s=60",
                                "--lr_floor=0", "--batch_stages=1"])
    assert train.run_progress(10, args, elapsed=45.0) == pytest.approx(0.75)
    assert train.run_progress(10, args, elapsed=75.0) == 1.0
    assert train.run_progress(900000, args, elapsed=1.0) == pytest.approx(0.9)  # steps can be further along
    assert train.lr_factor(10, train.run_progress(10, args, 20.0), args) == 1.0
    assert train.lr_factor(10, train.run_progress(10, args, 45.0), args) == pytest.approx(0.5)
    assert train.lr_factor(10, train.run_progress(10, args, 75.0), args) == 0.0


def test_muon_momentum_warms_up_and_cools_down():
    """0.85 -> 0.95 over the first 300 steps, back to 0.85 over the last 50 (r0126:1534-1547): of 2160 steps, the
    cool-down starts after step 2110 and the last step, 2159, has 0.95 - 49/50 * 0.1."""
    args, _ = train.parse_args(["--num_iterations=2160"])
    momentum = [train.muon_momentum(step, args) for step in (0, 150, 299, 300, 2110, 2111, 2135, 2159)]
    assert momentum == pytest.approx([0.85, 0.90, 0.85 + 299 / 3000, 0.95, 0.95, 0.948, 0.90, 0.852])
    off, _ = train.parse_args(["--muon_momentum_warmup_steps=0", "--muon_momentum_cooldown_steps=0",
                               "--num_iterations=2160"])
    assert train.muon_momentum(0, off) == train.muon_momentum(2159, off) == 0.95


def test_adam_steps_on_odd_steps():
    assert [train.adam_steps_at(s) for s in range(5)] == [False, True, False, True, False]


# ---- which parameter goes where: the record's param_table (r0126:1577-1592), for every script ----

ADAM_LR, MUON_LR = 0.008, 0.023


def record_settings(name, p, is_embedding):
    """(optimizer, Adam betas, LR, weight-decay multiplier) the record gives a parameter of this name, written out
    from r0126:1577-1614 independently of PARAM_GROUPS; NorMuon's LR is the net one, with the shape multiplier."""
    def adam(betas, lr_mul, wd_mul):
        return "adam", betas, ADAM_LR * lr_mul, wd_mul
    last = name.rsplit(".", 2)
    if name.endswith(".xsa_alpha"):  # the 2026-04-29 record's xsa_alphas row
        return adam((0.9, 0.95), 1.0, 0.0)
    if name == "lm_head_col_gate":  # LightRNN's column gate: a gate, as the attention gates
        return adam((0.9, 0.99), 1.0, 1.0)
    if name.startswith("lm_head"):  # LightRNN's row/column heads
        return adam((0.5, 0.95), 1.0, 150.0)
    if name.startswith("value_embeds.") or name == "bigram_embed.weight":
        return adam((0.75, 0.95), 75.0, 5.0)
    if name == "smear_gate.weight":
        return adam((0.9, 0.99), 0.01, 0.0)
    if name == "skip_gate.weight":
        return adam((0.9, 0.99), 0.05, 0.0)
    if name.endswith((".attn_gate.weight", ".ve_gate.weight")):
        return adam((0.9, 0.99), 1.0, 1.0)
    if "x0_lambda" in last[-1]:
        return adam((0.65, 0.95), 5.0, 0.0)
    if name == "wte.weight" or is_embedding:  # LightRNN's wte_row, wte_col
        return adam((0.5, 0.95), 1.0, 150.0)
    if p.ndim < 2:
        return adam((0.9, 0.99), 5.0, 0.0)
    out, into = p.shape[-2:]
    if fnmatch.fnmatch(name, "*mlp*proj*"):  # an MLP's output projection: 2x, and the shape rule on (in, out)
        return "normuon", None, MUON_LR * 2.0 * max(1.0, into / out) ** 0.5, 1.0
    return "normuon", None, MUON_LR * max(1.0, out / into) ** 0.5, 1.0


def optimizer_settings(module, model):
    """{parameter name: (optimizer, betas, net LR, wd_mul)} as build_optimizers sets them, each parameter once."""
    args, _ = module.parse_args([])
    adam, normuon = module.build_optimizers(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for kind, opt in (("adam", adam), ("normuon", normuon)):
        for group in opt.param_groups:
            for p in group["params"]:
                assert names[id(p)] not in got, f"{names[id(p)]} in two groups"
                if kind == "adam":
                    got[names[id(p)]] = "adam", group["betas"], group["lr"] * group["lr_mul"], group["wd_mul"]
                else:
                    rows, cols = p.shape[-2:][::-1] if group["transposed"] else p.shape[-2:]
                    net = group["lr"] * group["lr_mul"] * max(1.0, rows / cols) ** 0.5
                    got[names[id(p)]] = "normuon", None, net, 1.0
    assert adam.defaults["eps"] == 1e-10 and adam.defaults["weight_decay"] == 0.005
    assert (normuon.defaults["beta2"], normuon.defaults["weight_decay"], normuon.defaults["momentum"]) == (0.95, 1.2,
                                                                                                       0.95)
    return got


@pytest.mark.parametrize("preset", ["tiny", "gpt2_124m"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_parameter_is_in_exactly_one_group_with_the_records_settings(script, preset):
    module = load_script(script)
    args, _ = module.parse_args([f"--preset={preset}"])
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
    got = optimizer_settings(module, model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = dict(model.named_parameters())
    assert set(got) == set(params)
    for name, p in params.items():
        want = record_settings(name, p, id(p) in embeddings)
        assert got[name][:2] == want[:2] and got[name][2:] == pytest.approx(want[2:]), name


def test_the_baseline_matrices_get_the_records_net_lr():
    """Net of the shape multiplier: attention 1x, c_fc 2x, c_proj 4x (r0126:355, 367, 1134: the record's c_proj is
    stored (3072, 768)), the input embedding 0.008 and the value embeddings 0.6."""
    args, _ = train.parse_args([])
    with torch.device("meta"):
        model = train.GPT(train.GPTConfig.from_args(args))
    got = optimizer_settings(train, model)
    nets = {k: got[f"blocks.0.{k}.weight"][2] / MUON_LR for k in ("attn.c_q", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert nets == pytest.approx({"attn.c_q": 1.0, "attn.c_proj": 1.0, "mlp.c_fc": 2.0, "mlp.c_proj": 4.0})
    assert got["wte.weight"][2] == pytest.approx(0.008) and got["value_embeds.0.weight"][2] == pytest.approx(0.6)


class V3Names(torch.nn.Module):
    """The record-style baseline's parameter names (being written in parallel): the table must place each."""

    def __init__(self, n_head=6, dim=32):
        super().__init__()
        P = lambda *shape: torch.nn.Parameter(torch.zeros(shape))  # noqa: E731
        self.wte, self.lm_head = torch.nn.Embedding(64, dim), torch.nn.Linear(dim, 64, bias=False)
        self.value_embeds = torch.nn.ModuleList([torch.nn.Embedding(64, dim) for _ in range(2)])
        self.bigram_embed = torch.nn.Embedding(96, dim)
        self.smear_gate, self.skip_gate = torch.nn.Linear(12, 1, bias=False), torch.nn.Linear(12, 1, bias=False)
        self.smear_lambda, self.skip_lambda, self.backout_lambda = P(1), P(1), P(1)
        block = torch.nn.Module()
        block.attn = torch.nn.Module()
        for k in ("c_q", "c_k", "c_v", "c_proj"):
            setattr(block.attn, k, torch.nn.Linear(dim, dim, bias=False))
        block.attn.attn_gate, block.attn.ve_gate = (torch.nn.Linear(12, n_head, bias=False) for _ in range(2))
        block.attn.lambdas, block.attn.xsa_alpha = P(2), P(1)
        block.mlp = torch.nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(dim, 4 * dim, bias=False), torch.nn.Linear(4 * dim, dim)
        block.resid_lambda, block.x0_lambda, block.bigram_lambda = P(1), P(1), P(1)
        self.blocks = torch.nn.ModuleList([block])


def test_the_record_style_names_land_in_the_records_groups():
    model = V3Names()
    got = optimizer_settings(train, model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups = {}
    for name, p in model.named_parameters():
        want = record_settings(name, p, id(p) in embeddings)
        assert got[name][:2] == want[:2] and got[name][2:] == pytest.approx(want[2:]), name
        groups[name] = got[name]
    assert groups["blocks.0.attn.attn_gate.weight"] == ("adam", (0.9, 0.99), pytest.approx(0.008), 1.0)
    assert groups["blocks.0.x0_lambda"] == ("adam", (0.65, 0.95), pytest.approx(0.04), 0.0)
    assert groups["bigram_embed.weight"] == ("adam", (0.75, 0.95), pytest.approx(0.6), 5.0)
    assert groups["smear_gate.weight"][2] == pytest.approx(0.00008)
    assert groups["skip_gate.weight"][2] == pytest.approx(0.0004)
    assert groups["blocks.0.mlp.c_proj.weight"][:2] == ("normuon", None)
    assert groups["blocks.0.mlp.c_proj.bias"] == ("adam", (0.9, 0.99), pytest.approx(0.04), 0.0)  # a vector


def test_param_groups_rows_are_the_records_table():
    """PARAM_GROUPS itself, row by row (r0126:1577-1592; XSA's from the 2026-04-29 record)."""
    rows = {row.name: (row.optimizer, row.betas if row.optimizer == "adam" else None, row.lr_mul, row.wd_mul)
            for row in train.PARAM_GROUPS}
    assert rows == {"xsa": ("adam", (0.9, 0.95), 1.0, 0.0), "lm_head": ("adam", (0.5, 0.95), 1.0, 150.0), "value_embeds": ("adam", (0.75, 0.95), 75.0, 5.0),
                    "smear_gate": ("adam", (0.9, 0.99), 0.01, 0.0), "skip_gate": ("adam", (0.9, 0.99), 0.05, 0.0),
                    "gates": ("adam", (0.9, 0.99), 1.0, 1.0), "x0_lambdas": ("adam", (0.65, 0.95), 5.0, 0.0),
                    "embed": ("adam", (0.5, 0.95), 1.0, 150.0), "mlp_out": ("normuon", None, 2.0, 1.0),
                    "hidden": ("normuon", None, 1.0, 1.0), "scalars": ("adam", (0.9, 0.99), 5.0, 0.0)}
    assert math.isclose(train.Hyperparameters.muon_lr, MUON_LR) and train.Hyperparameters.adam_lr == ADAM_LR

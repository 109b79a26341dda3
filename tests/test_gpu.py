"""What only a CUDA GPU can show: the Triton kernels compiled for it (bf16, values and gradients), the fused CE's
memory, which SDPA backend each script's attention takes, the optimizers, the fp16 path and the compile warm-up.

    python bench.py --gpu-check tests                                  every GPU test, in a time budget, with a report
    TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu.py -rA   the same tests by hand

Every test is marked `gpu` and skips without CUDA. Figures (errors, memory, backends) go to record_property, so the
gpu-check report carries them, and to stdout, which -rA shows. Errors are ||got - want|| / ||want|| against a
higher-precision reference (fp32 or fp64 on the same bf16 inputs), fresh random inputs per test; NaN never passes.
"""
import math
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import cross_entropy as ce, newton_schulz as ns
from kernels._dispatch import INTERPRET
from tests.helpers import ROOT, SCRIPTS, load_script, read_log, replay, small_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False); on one: python bench.py --gpu-check tests")]

N_TOKENS, VOCAB, DIM = 4096, 50304, 768  # a quarter of the 124M micro-batch (16 x 1024 tokens) at the 124M head
BASELINE = ROOT / "train_gpt2.py"


@pytest.fixture
def record(record_property, request):
    """record(name, value): a figure for the gpu-check report (junit xml) and for -rA's output."""
    def rec(name, value):
        record_property(name, value)
        print(f"{request.node.name}: {name} = {value}")
    return rec


@pytest.fixture
def compiled_triton():
    """Triton as training runs it: compiled for the GPU, not interpreted. conftest.py sets TRITON_INTERPRET=1 for
    the CPU tests, and with it Triton (and Inductor's generated kernels) would run in the interpreter."""
    if INTERPRET:
        pytest.fail("TRITON_INTERPRET=1 is set, so Triton would run its CPU interpreter, not the GPU: run "
                    "TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu.py (bench.py --gpu-check does)")
    if not kernels.HAS_TRITON:
        pytest.fail("triton is not importable on this CUDA machine")


@pytest.fixture
def kernels_on(compiled_triton):
    """The kernels switched on, whatever a script's main() (--kernels=0) left behind."""
    before = kernels.is_enabled()
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(before)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_close(record, what, got, want, tol):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = rel_err(got, want)
    record(f"{what} rel err", f"{err:.2e}")
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"  # False for NaN too


def with_grads(fn, inputs, grad_output=None):
    """fn(*inputs) and the grads of its output (weighted by grad_output) with respect to each input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), grads


def random_targets(n, vocab, gen):
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    targets[1::7] = -1  # ignored positions (the scripts' ignore_index)
    targets[0] = vocab - 1  # the last vocab entry, in the masked tail of the last block
    return targets


def generator(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


# ---- (a) each Triton kernel against its reference, bf16, at training shapes ----

@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_softcap_cross_entropy_kernel(kernels_on, record, softcap, reduction):
    g = generator(1)
    logits = (torch.randn(N_TOKENS, VOCAB, device="cuda", generator=g) * 4).bfloat16()
    targets = random_targets(N_TOKENS, VOCAB, g)
    grad_output = torch.randn(N_TOKENS, device="cuda", generator=g) if reduction == "none" else None
    got, (grad,) = with_grads(lambda z: ce.softcap_cross_entropy_triton(z, targets, softcap, reduction=reduction),
                              [logits], grad_output)
    # The reference on the same values in fp32, so its grads are not rounded to bf16 as the kernel's are.
    want, (want_grad,) = with_grads(
        lambda z: ce.softcap_cross_entropy_reference(z, targets, softcap, reduction=reduction), [logits.float()],
        grad_output)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    check_close(record, "loss", got, want, 1e-4)
    check_close(record, "grad", grad, want_grad, 1e-2)
    assert (grad[1::7] == 0).all(), "ignored rows must get zero gradient"


def test_linear_softcap_cross_entropy_kernel(kernels_on, record):
    g = generator(2)
    x = torch.randn(N_TOKENS, DIM, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(VOCAB, DIM, device="cuda", generator=g) * 2 * DIM ** -0.5).bfloat16()  # logits ~ N(0, 4)
    targets = random_targets(N_TOKENS, VOCAB, g)
    got, (grad_x, grad_w) = with_grads(
        lambda a, w: ce.linear_softcap_cross_entropy_triton(a, w, targets, 30.0), [x, weight])
    # Higher precision on the same values: an fp64 head matmul and grads (the reference's CE itself runs in fp32).
    want, (want_x, want_w) = with_grads(lambda a, w: ce.linear_softcap_cross_entropy_reference(a, w, targets, 30.0),
                                        [x.double(), weight.double()])
    assert grad_x.dtype == grad_w.dtype == torch.bfloat16
    check_close(record, "loss", got, want.float(), 1e-3)
    check_close(record, "grad_x", grad_x, want_x, 2e-2)
    check_close(record, "grad_w", grad_w, want_w, 2e-2)
    # For scale: the plain bf16 reference's own error against the same fp64 head.
    _, (_, ref_w) = with_grads(lambda a, w: ce.linear_softcap_cross_entropy_reference(a, w, targets, 30.0), [x, weight])
    record("bf16 reference grad_w rel err", f"{rel_err(ref_w, want_w):.2e}")


# Muon's batched Newton-Schulz inputs at 124M: 48 attention matrices (768 x 768), 24 MLP ones (768 x 3072 wide)
@pytest.mark.parametrize("shape", [(48, 768, 768), (24, 768, 3072)], ids=lambda s: "x".join(map(str, s)))
def test_xxt_kernel(kernels_on, record, shape):
    g = generator(3)
    x = torch.randn(shape, device="cuda", generator=g)
    x = (x / x.norm(dim=(-2, -1), keepdim=True)).bfloat16()  # as Muon normalises before iterating
    got = ns.xxt_triton(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, got.mT), "xxt must be exactly symmetric"
    check_close(record, "value", got, x.double() @ x.double().mT, 1e-2)
    grad_output = torch.randn(got.shape, device="cuda", generator=g).bfloat16()
    _, (grad,) = with_grads(ns.xxt_triton, [x], grad_output)
    _, (want,) = with_grads(lambda a: a @ a.mT, [x.double()], grad_output.double())
    check_close(record, "grad", grad, want, 1e-2)


def test_newton_schulz_with_xxt_kernel(compiled_triton, record):
    """Muon's whole orthogonalisation with the kernel on and off: bf16 rounding may compound over 5 steps, a wrong
    kernel would not stay this close."""
    module = load_script(BASELINE)
    g = generator(4)
    grads = torch.randn(12, 3072, 768, device="cuda", generator=g)  # the MLP's c_fc gradients: tall, transposed inside
    before = kernels.is_enabled()
    try:
        kernels.set_enabled(True)
        fast = module.zeropower_via_newtonschulz5(grads)
        kernels.set_enabled(False)
        plain = module.zeropower_via_newtonschulz5(grads)
    finally:
        kernels.set_enabled(before)
    check_close(record, "orthogonalised update", fast, plain, 5e-2)


def test_pinned_xxt_config_is_deterministic(kernels_on, record):
    """With several ranks the scripts pin xxt's tile config (kernels.pin_configs), so every rank's Muon update is
    bit-identical; the pinned kernel must agree with the autotuned one to rounding."""
    x = torch.randn(12, 768, 3072, device="cuda", generator=generator(5)).bfloat16()
    autotuned = ns.xxt_triton(x)
    kernels.pin_configs(True)
    try:
        first, second = ns.xxt_triton(x), ns.xxt_triton(x)
    finally:
        kernels.pin_configs(False)
    assert torch.equal(first, second)
    check_close(record, "pinned vs autotuned", first, autotuned, 1e-2)


# ---- (b) the fused linear CE's memory ----

def peak_bytes(fn):
    """Peak memory fn allocates beyond what is allocated when it starts."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_fused_linear_cross_entropy_memory(kernels_on, record):
    """At the head of a 124M micro-batch (half of 16 x 1024 tokens), as the model runs it: fp32 weights under bf16
    autocast, loss and backward. The reference's (N, V) logits and their fp32 copies are gigabytes; the fused op
    holds one (chunk, V) buffer and fp32 grads."""
    g = generator(5)
    n = 8192
    x = torch.randn(n, DIM, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, device="cuda", generator=g) * DIM ** -0.5).requires_grad_()
    targets = random_targets(n, VOCAB, g)
    losses = {}

    def run(name, fn):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(x, weight, targets, 30.0)
            loss.backward()
            losses[name] = loss.item()
        peak = peak_bytes(step)
        x.grad = weight.grad = None
        return peak

    fused = run("fused", ce.linear_softcap_cross_entropy_triton)
    reference = run("reference", ce.linear_softcap_cross_entropy_reference)
    record("fused peak MiB", f"{fused / 2**20:.0f}")
    record("reference peak MiB", f"{reference / 2**20:.0f}")
    record("fused / reference", f"{fused / reference:.3f}")
    assert abs(losses["fused"] - losses["reference"]) <= 1e-3 * abs(losses["reference"])
    assert fused <= 0.25 * reference, f"fused CE peak {fused / 2**20:.0f} MiB vs reference {reference / 2**20:.0f} MiB"


# ---- (c) which SDPA backend each script's attention takes ----

SDPA_OPS = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "math": "math"}


def sdpa_ops_used(step):
    """The aten scaled-dot-product kernels step() ran (their names say the backend)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.key for e in prof.key_averages() if "_scaled_dot_product" in e.key})


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sdpa_backend(script, record):
    """--attention=sdpa (the fixed-length causal path for platforms without FlexAttention), a training forward+backward
    at 124M widths (768 wide, head_dim 128, rows of 1024; 2 layers, batch 2, bf16): which backend the default
    dispatch picks, and whether the flash backend alone can run it. The baseline must run on flash; an idea script
    that cannot is recorded, not failed."""
    module = load_script(script)
    args, _ = module.parse_args(["--n_layer=2", "--attention=sdpa", "--seq_len=1024"])
    before = kernels.is_enabled()
    kernels.set_enabled(False)  # attention is the subject; the head's CE takes its plain path
    try:
        torch.manual_seed(0)
        model = module.GPT(module.GPTConfig.from_args(args)).cuda()
        idx = torch.randint(0, args.vocab_size, (2, args.seq_len), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx, idx)
            loss.backward()
            model.zero_grad(set_to_none=True)

        ops = sdpa_ops_used(step)
        backends = sorted({name for op in ops for key, name in SDPA_OPS.items() if key in op})
        record("default backend", ",".join(backends) or "none found")
        record("default ops", ",".join(ops))
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            warnings.simplefilter("always")
            try:
                step()
                flash = "runs"
            except RuntimeError as e:  # "No available kernel"; the warnings say why
                reasons = [str(w.message) for w in caught if "flash" in str(w.message).lower()] or [str(e)]
                flash = "cannot run: " + " / ".join(r.strip().replace("\n", " ") for r in reasons)[:300]
        record("flash only", flash)
    finally:
        kernels.set_enabled(before)
    if script.name == BASELINE.name:
        assert flash == "runs", f"the baseline's attention must run on the flash backend: {flash}"


def test_flex_attention_on_the_gpu_matches_a_dense_mask(record):
    """FlexAttention compiled for the GPU, forward and backward in bf16 at head_dim 128, with documents and a window:
    the same as SDPA with the dense mask of the same keys."""
    module = load_script(BASELINE)
    g = generator(7)
    T = 4096
    idx = torch.randint(0, 50000, (1, T), device="cuda", generator=g)
    idx[0, torch.randint(0, T, (12,), device="cuda", generator=g)] = 50256
    docs = (idx == 50256).cumsum(1)
    window = torch.tensor(896, device="cuda")
    q, k, v = (torch.randn(1, 6, T, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    flex = torch.compile(module.attend)
    got, got_grads = with_grads(lambda a, b, c: flex(a, b, c, module.document_mask(docs, window)), [q, k, v])
    with torch.no_grad():
        pos = torch.arange(T, device="cuda")
        dense = ((pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] < 896) & (docs[0][:, None] == docs[0][None]))
    want, want_grads = with_grads(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a.float(), b.float(), c.float(), attn_mask=dense), [q, k, v])
    check_close(record, "output", got, want, 2e-2)
    for name, a, b in zip("qkv", got_grads, want_grads):
        check_close(record, f"grad {name}", a, b, 3e-2)


# ---- (d) the optimizers on CUDA ----

def test_the_optimizers_take_the_cpus_steps_on_cuda(record):
    """The scripts' CautiousAdam and NorMuon (built by build_optimizers, Adam every other step) on CUDA against the
    same four steps on the CPU in fp32: Adam's arithmetic is the same on both; NorMuon orthogonalises in bf16 on
    CUDA (fp32 on the CPU), so each weight's movement is compared relative to its size."""
    import copy
    module = load_script(BASELINE)
    args, _ = module.parse_args(["--n_layer=2", "--n_embd=128", "--n_head=2", "--vocab_size=1024"])
    torch.manual_seed(0)
    cpu_model = module.GPT(module.GPTConfig.from_args(args))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    optimizers = module.build_optimizers(cpu_model, args), module.build_optimizers(gpu_model, args)
    start = [p.detach().clone() for p in cpu_model.parameters()]
    g = torch.Generator().manual_seed(6)
    for step in range(4):
        for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.cuda()
        for adam, normuon in optimizers:
            adam.step(hold=not module.adam_steps_at(step))
            normuon.step()
    adam_ids = {id(p) for group in optimizers[0][0].param_groups for p in group["params"]}
    worst = {"adam": 0.0, "normuon": 0.0}
    for p, q, p0 in zip(cpu_model.parameters(), gpu_model.parameters(), start):
        moved = (p.detach() - p0).norm()
        assert moved > 0, "the optimizer did not move the weights"
        kind = "adam" if id(p) in adam_ids else "normuon"
        worst[kind] = max(worst[kind], ((q.detach().cpu() - p.detach()).norm() / moved).item())
    record("Adam: max |cuda - cpu| / |update|", f"{worst['adam']:.2e}")
    record("NorMuon: max |cuda - cpu| / |update|", f"{worst['normuon']:.2e}")
    assert worst["adam"] < 1e-4 and worst["normuon"] < 5e-2


# ---- (e) the fp16 path ----

@pytest.mark.parametrize("use_kernels", [0, 1], ids=["kernels0", "kernels1"])
def test_fp16_trains_with_grad_scaler(shards, tmp_path, monkeypatch, record, request, use_kernels):
    """--dtype=fp16 (GPUs without bf16): autocast fp16 with a GradScaler whose scale multiplies every loss; the
    loss stays finite and falls."""
    if use_kernels:
        request.getfixturevalue("compiled_triton")
    scalers = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scaled = 0
            scalers.append(self)

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    module = load_script(BASELINE)
    summary = module.main(small_args(*shards, tmp_path, dtype="fp16", compile=0, kernels=use_kernels,
                                     num_iterations=24, val_every=12))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    (scaler,) = scalers
    record("final scale", scaler.get_scale())
    record("val loss", f"{val[0]:.4f} -> {val[24]:.4f}")
    assert scaler.is_enabled() and scaler.scaled >= 24, "every micro-step's loss goes through the scaler"
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(math.isfinite(v) for v in [*train.values(), *val.values()])
    assert val[24] < val[0] - 0.3 and sum(list(train.values())[-4:]) < sum(list(train.values())[:4])


# ---- (f) the compile warm-up ----

def dynamo_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("script,use_kernels", [(s, 0) for s in SCRIPTS] + [(BASELINE, 1)],
                         ids=[s.name for s in SCRIPTS] + [f"{BASELINE.name}-kernels1"])
def test_compile_warmup(script, use_kernels, compiled_triton, shards, tmp_path, monkeypatch, record):
    """--compile=1 in bf16: the warm-up compiles every graph (nothing is compiled after it: that would be a compile
    inside the timed run), and every step's loss and every validation equal eager bf16's from the same weights and
    data (tests/helpers.py: replay) within 2e-2 relative: bf16 rounds to 2**-9 = 0.2%, and two orders of the same bf16
    sums land a few of those apart; 2e-2 is ten. A wrong graph is off by far more."""
    module = load_script(script)
    graphs = {}
    warmup, finish = module.compile_warmup, module.finish

    def counted_warmup(run):
        graphs["before"] = dynamo_graphs()
        warmup(run)
        graphs["after"] = dynamo_graphs()

    def counted_finish(run, steps):  # the end of the compiled run (the eager replay's FlexAttention compiles too)
        graphs.setdefault("end", dynamo_graphs())
        return finish(run, steps)

    monkeypatch.setattr(module, "compile_warmup", counted_warmup)
    monkeypatch.setattr(module, "finish", counted_finish)
    flags = small_args(*shards, tmp_path, num_iterations=12, val_every=4, kernels=use_kernels, dtype="bf16")
    results, compiled = replay(module, [*flags, "--compile=1"], [*flags, "--compile=0"], tmp_path, reference=False)
    log_text = next((tmp_path / "recorded").glob("*.txt")).read_text()
    record("compile warm-up s", f"{compiled['compile_warmup_s']:.1f}")
    record("graphs", f"{graphs['after'] - graphs['before']} in the warm-up, {graphs['end'] - graphs['after']} after")
    assert "# compile warm-up: a step" in log_text and compiled["compile_warmup_s"] is not None
    assert graphs["after"] > graphs["before"], "torch.compile compiled nothing (or the dynamo counter moved)"
    assert graphs["end"] == graphs["after"], f"{graphs['end'] - graphs['after']} graph(s) compiled after the warm-up"
    worst = max(abs(c - e) / abs(e) for _, c, e, _ in results)
    record("max relative loss difference, compiled vs eager at the same weights", f"{worst:.2e}")
    assert worst <= 2e-2, f"compiled and eager losses differ by {worst:.3g} (relative)"


def test_compile_warmup_snapshot_leaves_no_gpu_memory_behind(compiled_triton, shards, tmp_path, monkeypatch, record):
    """The warm-up's snapshot of the initial weights waits on the CPU and is freed: after the warm-up, the GPU holds
    what training holds, not an extra copy of the model."""
    module = load_script(BASELINE)
    allocated = {}
    warmup = module.compile_warmup

    def measured(run):
        allocated["before"] = torch.cuda.memory_allocated()
        warmup(run)
        allocated["after"] = torch.cuda.memory_allocated()
        allocated["weights"] = sum(p.numel() * p.element_size() for p in run.raw_model.parameters())

    monkeypatch.setattr(module, "compile_warmup", measured)
    module.main(small_args(*shards, tmp_path, compile=1, num_iterations=2, n_embd=256, n_head=4, n_layer=4))
    grown = allocated["after"] - allocated["before"]
    record("GPU memory added by the warm-up", f"{grown / 2**20:.1f} MiB (weights: {allocated['weights'] / 2**20:.1f} MiB)")
    # what may remain: optimizer states (momenta; Adam's 2 moments) are reset to empty, so only caches and grads' None
    assert grown < allocated["weights"], "the warm-up left a copy of the weights (or more) on the GPU"

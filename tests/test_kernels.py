"""kernels/: each Triton kernel against its plain-PyTorch reference, values and gradients, on CPU
through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before anything imports)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import bench, cross_entropy as ce, newton_schulz as ns  # noqa: E402
from kernels._dispatch import INTERPRET  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(
    not (kernels.HAS_TRITON and INTERPRET),
    reason="Triton kernels run on CPU only through triton's interpreter: needs triton installed "
           "and TRITON_INTERPRET=1 set before kernels/ is imported (conftest.py does it)")


def assert_close(actual, expected, rel, what=""):
    """Max abs error within rel * max|expected| (plus a hair, for all-zero expectations)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale + 1e-6, f"{what}: max err {err:.3g} vs max |expected| {scale:.3g}"


def make_targets(shape, vocab, ignore_index=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, shape, generator=g)
    flat = targets.view(-1)
    flat[1::4] = ignore_index  # every 4th position, from the second, is ignored
    flat[0] = vocab - 1  # the last vocab entry, in the masked tail of the last block
    return targets


def loss_and_grads(fn, inputs, grad_output=None):
    """Run fn(*inputs), backprop grad_output (random for "none"), return loss and input grads."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*inputs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, inputs, grad_output)
    return loss.detach(), grads


# ---- softcap_cross_entropy ----

@needs_triton
@pytest.mark.parametrize("n_rows,vocab", [(7, 100), (5, 1000), (4, 50257), (3, 50304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_softcap_ce_kernel_matches_reference(n_rows, vocab, dtype, softcap):
    torch.manual_seed(n_rows)
    logits = (torch.randn(n_rows, vocab) * 4).to(dtype)
    targets = make_targets((n_rows,), vocab)
    grad_output = torch.randn(n_rows)  # per-token weights exercise the per-row gradient scale
    got, (grad,) = loss_and_grads(
        lambda z: ce.softcap_cross_entropy_triton(z, targets, softcap, reduction="none"),
        [logits], grad_output)
    want, (want_grad,) = loss_and_grads(
        lambda z: ce.softcap_cross_entropy_reference(z, targets, softcap, reduction="none"),
        [logits], grad_output)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    assert (got[1::4] == 0).all() and (grad[1::4] == 0).all()  # ignored rows
    assert_close(got, want, 1e-5, "loss")
    assert_close(grad, want_grad, 1e-5 if dtype == torch.float32 else 1e-2, "grad")


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 0.0, 30.0])
def test_softcap_ce_reductions(reduction, softcap):
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 77) * 3  # (B, T, V): leading dims are flattened and restored
    targets = make_targets((2, 9), 77, ignore_index=-100)
    fn = lambda z, f: f(z, targets, softcap, ignore_index=-100, reduction=reduction)  # noqa: E731
    grad_output = torch.randn(2, 9) if reduction == "none" else None
    got, (grad,) = loss_and_grads(lambda z: fn(z, ce.softcap_cross_entropy_triton), [logits],
                                  grad_output)
    want, (want_grad,) = loss_and_grads(lambda z: fn(z, ce.softcap_cross_entropy_reference),
                                        [logits], grad_output)
    assert got.shape == ((2, 9) if reduction == "none" else ())
    assert_close(got, want, 1e-5, "loss")
    assert_close(grad, want_grad, 1e-5, "grad")
    # And against torch's own cross-entropy directly (independent of our _reduce).
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    torch_loss = F.cross_entropy(capped.view(-1, 77), targets.view(-1), ignore_index=-100,
                                 reduction=reduction)
    assert_close(got.view(-1) if reduction == "none" else got, torch_loss, 1e-5, "vs F.cross_entropy")


@needs_triton
def test_softcap_ce_all_ignored_gives_zero_not_nan():
    logits = torch.randn(4, 50, requires_grad=True)
    targets = torch.full((4,), -1)
    for fn in (ce.softcap_cross_entropy_triton, ce.softcap_cross_entropy_reference):
        loss = fn(logits, targets, 15.0)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and (grad == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_softcap_ce_large_logits(dtype, softcap):
    torch.manual_seed(2)
    logits = (torch.randn(6, 3000) * 1e4).to(dtype)  # exp() of these overflows without the max
    targets = make_targets((6,), 3000)
    got, (grad,) = loss_and_grads(
        lambda z: ce.softcap_cross_entropy_triton(z, targets, softcap, reduction="sum"), [logits])
    want, (want_grad,) = loss_and_grads(
        lambda z: ce.softcap_cross_entropy_reference(z, targets, softcap, reduction="sum"),
        [logits])
    assert torch.isfinite(got).all() and torch.isfinite(grad.float()).all()
    assert_close(got, want, 1e-5, "loss")
    assert_close(grad, want_grad, 1e-5 if dtype == torch.float32 else 1e-2, "grad")


@needs_triton
def test_softcap_ce_strided_logits():
    """A row stride larger than V (a slice of a wider buffer) is read without a copy."""
    torch.manual_seed(3)
    wide = torch.randn(5, 130)
    logits = wide[:, :100]
    targets = make_targets((5,), 100)
    got = ce.softcap_cross_entropy_triton(logits, targets, 10.0, reduction="none")
    want = ce.softcap_cross_entropy_reference(logits, targets, 10.0, reduction="none")
    assert_close(got, want, 1e-5)


# ---- linear_softcap_cross_entropy ----

@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_matches_reference_for_chunk_sizes(reduction, dtype):
    torch.manual_seed(4)
    n, c, v = 37, 16, 1000
    x = torch.randn(n, c).to(dtype)
    weight = (torch.randn(v, c) * 0.5).to(dtype)
    targets = make_targets((n,), v)
    grad_output = torch.randn(n) if reduction == "none" else None
    want, want_grads = loss_and_grads(
        lambda a, w: ce.linear_softcap_cross_entropy_reference(a, w, targets, 15.0,
                                                               reduction=reduction),
        [x, weight], grad_output)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for chunk_size in [None, 5, 16, n]:  # 5 and 16 do not divide 37
        got, grads = loss_and_grads(
            lambda a, w: ce.linear_softcap_cross_entropy_triton(
                a, w, targets, 15.0, reduction=reduction, chunk_size=chunk_size),
            [x, weight], grad_output)
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2, f"loss {chunk_size}")
        for name, g, wg in zip(("grad_x", "grad_weight"), grads, want_grads):
            assert g.dtype == dtype
            assert_close(g, wg, rel, f"{name} chunk_size={chunk_size}")


@needs_triton
@pytest.mark.parametrize("vocab", [50257, 50304])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_vocab_sized(vocab, dtype):
    torch.manual_seed(5)
    n, c = 6, 8
    x, weight = torch.randn(n, c).to(dtype), torch.randn(vocab, c).to(dtype)
    targets = make_targets((n,), vocab)
    got, grads = loss_and_grads(
        lambda a, w: ce.linear_softcap_cross_entropy_triton(a, w, targets, 15.0, chunk_size=4),
        [x, weight])
    want, want_grads = loss_and_grads(
        lambda a, w: ce.linear_softcap_cross_entropy_reference(a, w, targets, 15.0), [x, weight])
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(got, want, rel, "loss")
    assert_close(grads[0], want_grads[0], rel, "grad_x")
    assert_close(grads[1], want_grads[1], rel, "grad_weight")


@needs_triton
def test_linear_ce_autocast_matches_f_linear():
    """Under autocast the head matmul runs in bf16, as F.linear does; grads come back fp32."""
    torch.manual_seed(6)
    x, weight = torch.randn(2, 5, 16), torch.randn(300, 16) * 0.3  # (B, T, C) input
    targets = make_targets((2, 5), 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = loss_and_grads(
            lambda a, w: ce.linear_softcap_cross_entropy_triton(a, w, targets, 30.0, chunk_size=3),
            [x, weight])
        want, want_grads = loss_and_grads(
            lambda a, w: ce.linear_softcap_cross_entropy_reference(a, w, targets, 30.0),
            [x, weight])
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    assert_close(got, want, 1e-4, "loss")
    assert_close(grads[0], want_grads[0], 1e-2, "grad_x")
    assert_close(grads[1], want_grads[1], 1e-2, "grad_weight")
    # The bf16 product really happened: it differs from the fp32 loss.
    fp32_loss = ce.linear_softcap_cross_entropy_triton(x, weight, targets, 30.0)
    assert got.item() != fp32_loss.item()


@needs_triton
def test_linear_ce_no_grad_and_shapes():
    torch.manual_seed(7)
    x, weight = torch.randn(3, 4, 8), torch.randn(90, 8)
    targets = make_targets((3, 4), 90)
    with torch.no_grad():  # evaluation: losses only, no grads computed
        got = ce.linear_softcap_cross_entropy_triton(x, weight, targets, None, reduction="none",
                                                     chunk_size=5)
    want = ce.linear_softcap_cross_entropy_reference(x, weight, targets, None, reduction="none")
    assert got.shape == (3, 4) and (got.view(-1)[1::4] == 0).all()
    assert_close(got, want, 1e-5)


def test_default_chunk_bounds_logits_memory():
    rows = ce._chunk_rows(16 * 1024, 50304, torch.bfloat16, 0)
    assert rows % 128 == 0 and rows * 50304 * 2 <= ce._LOGITS_CHUNK_BYTES
    assert ce._chunk_rows(10, 50304, torch.float32, 0) == 10
    assert ce._chunk_rows(10, 50304, torch.float32, 4) == 4


# ---- the logit transform cap * tanh((z + offset) / width): the 2025-12-26 record's sigmoid ----

# 23 * sigmoid(u / 7.5) = 11.5 * tanh(u / 15) + 11.5, and a constant added to every logit changes
# neither the cross-entropy nor its gradient: the record's head is softcap=11.5, offset=5, width=15.
SIGMOID_HEAD = {"offset": 5.0, "width": 15.0}
# Each CE path as (x, weight, targets, softcap, **kwargs) -> loss, so that all are checked on the
# same head: the plain CE ones on F.linear's fp32 logits, whose grads reach x and weight through
# autograd.
CE_PATHS = {
    "softcap_ce_triton": lambda a, w, *args, **kw: ce.softcap_cross_entropy_triton(
        F.linear(a, w), *args, **kw),
    "softcap_ce_reference": lambda a, w, *args, **kw: ce.softcap_cross_entropy_reference(
        F.linear(a, w), *args, **kw),
    "linear_ce_triton": lambda *args, **kw: ce.linear_softcap_cross_entropy_triton(
        *args, chunk_size=5, **kw),  # 5 divides neither 37 nor 6: a short last chunk
    "linear_ce_reference": ce.linear_softcap_cross_entropy_reference,
}


def sigmoid_head_results(path, reduction, n, c, v, **transform):
    """(name, got, want) for the loss and its grads wrt x and weight: `path` run in fp32 with
    softcap 11.5 and `transform`, against float64 F.cross_entropy of
    23 * sigmoid((x @ W.T + 5) / 7.5), written without tanh: no formula shared with the kernels."""
    torch.manual_seed(15)
    x, weight = torch.randn(n, c), torch.randn(v, c) * 0.5  # logits ~ N(0, c / 4)
    targets = make_targets((n,), v)  # every 4th row ignored (-1), one target in the masked tail
    grad_output = torch.randn(n) if reduction == "none" else None
    got, grads = loss_and_grads(
        lambda a, w: CE_PATHS[path](a, w, targets, 11.5, reduction=reduction, **transform),
        [x, weight], grad_output)

    def record_head(a, w):
        return F.cross_entropy(23 * torch.sigmoid((F.linear(a, w) + 5) / 7.5), targets,
                               ignore_index=-1, reduction=reduction)

    want, want_grads = loss_and_grads(record_head, [x.double(), weight.double()],
                                      None if grad_output is None else grad_output.double())
    return [("loss", got, want), ("grad_x", grads[0], want_grads[0]),
            ("grad_weight", grads[1], want_grads[1])]


# rel 1e-5, the other fp32 tests' tolerance. Against float64, the fp32 paths err by rounding only
# (u = 2**-24). Loss: each logit, a C-term dot product, is off by <= C*u*sum|x_i w_i| <= 1.2e-5 here
# (max sum|x_i w_i| = 12.6 at C = 16); the transform scales that by cap / width = 0.77, the loss
# (logsumexp minus the target's logit) moves by at most twice that, 1.8e-5, and the logsumexp's own
# blocked and tree sums add O(log2(V) * u): under 3e-6 of max|loss| (>= 7.4), a worst-case bound.
# Grads: each d(loss)/d(logit) is a few roundings off (exp, tanh, products, and the logits' error
# through softmax). grad_weight then sums N <= 37 rows: worst case N*u*sum|terms|/max|grad| =
# 2.2e-6. grad_x sums V, where the worst case, V*u (7e-5 at V = 1000), is loose: independent
# roundings grow like sqrt(V)*u*sum|terms|/max|grad|, 2.4e-6 at V = 1000 and 1.5e-5 at V = 50304
# for one serial chain, which blocked matmuls split into far shorter ones (measured on every path
# here: <= 7e-7). A wrong transform moves every check far more: offset 4.9 or width 14.9 by
# >= 4.9e-4 relative.
SIGMOID_HEAD_REL = 1e-5


@needs_triton
@pytest.mark.parametrize("n,c,v", [(37, 16, 1000), (6, 8, 50304)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", list(CE_PATHS))
def test_sigmoid_head_matches_float64(path, reduction, n, c, v):
    """softcap=11.5, offset=5, width=15 is the record's 23 * sigmoid((z + 5) / 7.5), on every path;
    width != softcap, so the backward's factor cap / width is checked too (it is not 1 here)."""
    for name, got, want in sigmoid_head_results(path, reduction, n, c, v, **SIGMOID_HEAD):
        assert got.dtype == torch.float32
        assert_close(got, want.float(), SIGMOID_HEAD_REL, f"{path} {name}")


@needs_triton
@pytest.mark.parametrize("wrong", [{"offset": 4.9, "width": 15.0}, {"offset": 5.0, "width": 14.9}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["softcap_ce_triton", "linear_ce_triton"])
def test_sigmoid_head_comparison_detects_a_wrong_transform(path, reduction, wrong):
    """The comparison above can fail: a slightly wrong offset or width fails each of its checks."""
    for name, got, want in sigmoid_head_results(path, reduction, 37, 16, 1000, **wrong):
        with pytest.raises(AssertionError):
            assert_close(got, want.float(), SIGMOID_HEAD_REL, f"{path} {name} {wrong}")


@needs_triton
@pytest.mark.parametrize("path", list(CE_PATHS))
def test_transform_defaults_and_bad_width(path):
    """width=None is width=softcap and offset 0.0 the plain softcap, bit for bit; with no softcap
    offset and width are unused; a width <= 0 (or nan) is refused."""
    torch.manual_seed(16)
    x, weight = torch.randn(9, 8), torch.randn(70, 8)
    targets = make_targets((9,), 70)
    fn = CE_PATHS[path]
    assert torch.equal(fn(x, weight, targets, 15.0),
                       fn(x, weight, targets, 15.0, offset=0.0, width=15.0))
    assert torch.equal(fn(x, weight, targets, None),
                       fn(x, weight, targets, None, offset=3.0, width=2.0))
    assert not torch.equal(fn(x, weight, targets, 15.0),
                           fn(x, weight, targets, 15.0, offset=1.0))
    for width in (0.0, -15.0, float("nan")):
        with pytest.raises(ValueError, match="width"):
            fn(x, weight, targets, 15.0, width=width)


# ---- xxt ----

@needs_triton
@pytest.mark.parametrize("shape", [(70, 45), (32, 32), (3, 33, 100), (2, 100, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xxt_matches_reference_and_is_symmetric(shape, dtype):
    torch.manual_seed(8)
    x = torch.randn(shape).to(dtype)
    got = ns.xxt_triton(x)
    want = x.double() @ x.double().mT  # independent of either dtype's matmul
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-2])
    assert torch.equal(got, got.mT), "output must be exactly symmetric"
    assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton
def test_xxt_of_transposed_view():
    """Muon passes X.mT (a non-contiguous view) for tall matrices; strides are honoured."""
    torch.manual_seed(8)
    x = torch.randn(2, 45, 70).mT
    got = ns.xxt_triton(x)
    assert torch.equal(got, got.mT)
    assert_close(got, x.double() @ x.double().mT, 1e-5)


@needs_triton
def test_xxt_of_symmetric_is_square():
    torch.manual_seed(9)
    a = torch.randn(40, 40)
    a = a + a.mT
    assert_close(ns.xxt_triton(a), a @ a, 1e-5)


@needs_triton
def test_xxt_gradient():
    torch.manual_seed(10)
    x = torch.randn(2, 20, 36)
    grad_output = torch.randn(2, 20, 20)
    _, (grad,) = loss_and_grads(ns.xxt_triton, [x], grad_output)
    _, (want,) = loss_and_grads(lambda a: a @ a.mT, [x], grad_output)
    assert_close(grad, want, 1e-5)


# ---- dispatch ----

def test_public_functions_dispatch_on_cpu():
    """Off: the reference, exactly. On: Triton in its interpreter under TRITON_INTERPRET=1 (how the tests run the
    kernels end to end), the same numbers to rounding; allow_interpreter=False keeps CPU tensors on the reference."""
    torch.manual_seed(11)
    logits, x, weight = torch.randn(6, 40), torch.randn(6, 8), torch.randn(40, 8)
    targets = make_targets((6,), 40)
    want = (kernels.softcap_cross_entropy_reference(logits, targets, 15.0),
            kernels.linear_softcap_cross_entropy_reference(x, weight, targets, 15.0), x @ x.mT,
            # offset and width are handed to whichever path runs
            kernels.softcap_cross_entropy_reference(logits, targets, 11.5, **SIGMOID_HEAD),
            kernels.linear_softcap_cross_entropy_reference(x, weight, targets, 11.5,
                                                           **SIGMOID_HEAD))

    def public():
        return (kernels.softcap_cross_entropy(logits, targets, 15.0),
                kernels.linear_softcap_cross_entropy(x, weight, targets, 15.0), kernels.xxt(x),
                kernels.softcap_cross_entropy(logits, targets, 11.5, **SIGMOID_HEAD),
                kernels.linear_softcap_cross_entropy(x, weight, targets, 11.5, chunk_size=4,
                                                     **SIGMOID_HEAD))

    kernels.set_enabled(False)
    assert not kernels.use_triton(logits)
    assert all(torch.equal(got, w) for got, w in zip(public(), want))
    kernels.set_enabled(True)
    assert kernels.use_triton(logits) == (kernels.HAS_TRITON and INTERPRET)
    assert not kernels.use_triton(logits, allow_interpreter=False)
    for got, w in zip(public(), want):
        assert_close(got, w, 1e-5)


def test_kernels_are_off_until_switched_on():
    """One default, the training scripts' --kernels=0: importing the package does not switch the kernels on."""
    result = subprocess.run([sys.executable, "-c", "import kernels; assert not kernels.is_enabled()"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(autouse=True)
def kernels_enabled():
    """Each test starts with the switch on, whatever a train script's main() (--kernels=0) left behind."""
    before = kernels.is_enabled()
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(before)


def test_set_enabled_forces_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(ce, "use_triton", lambda t: kernels.use_triton(t, allow_interpreter=True))
    monkeypatch.setattr(ce, "softcap_cross_entropy_triton", lambda *a, **k: calls.append(a) or 0)
    logits, targets = torch.randn(3, 10), torch.tensor([1, 2, -1])
    try:
        if kernels.HAS_TRITON and INTERPRET:  # the switch on: the Triton entry is called
            assert kernels.use_triton(logits, allow_interpreter=True)
            ce.softcap_cross_entropy(logits, targets, 15.0)
            assert len(calls) == 1
        kernels.set_enabled(False)
        assert not kernels.use_triton(logits, allow_interpreter=True)
        loss = ce.softcap_cross_entropy(logits, targets, 15.0)
        assert len(calls) == (1 if kernels.HAS_TRITON and INTERPRET else 0)
        assert torch.equal(loss, ce.softcap_cross_entropy_reference(logits, targets, 15.0))
    finally:
        kernels.set_enabled(True)
    assert kernels.is_enabled()


def test_import_without_triton():
    """kernels/ imports and runs its references where triton is not installed (macOS, CPU)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "logits = torch.randn(4, 30); targets = torch.tensor([1, 2, 3, -1])\n"
        "loss = kernels.softcap_cross_entropy(logits, targets, 15.0)\n"
        "assert torch.isfinite(loss) and torch.equal(kernels.xxt(logits), logits @ logits.mT)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---- torch.compile ----

def test_public_functions_compile_fullgraph():
    torch.manual_seed(12)
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = make_targets((6,), 40)

    def step(x, weight, targets):
        logits = x @ weight.T
        return (kernels.linear_softcap_cross_entropy(x, weight, targets, 15.0)
                + kernels.softcap_cross_entropy(logits, targets, 15.0) + kernels.xxt(x).sum())

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x, weight, targets)
    assert_close(loss, step(x, weight, targets), 1e-6)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_ops_compile_fullgraph_with_autocast(reduction):
    """The custom-op boundary the GPU path uses traces without graph breaks, autocast included."""
    torch.manual_seed(13)
    x, weight = torch.randn(10, 16), torch.randn(120, 16) * 0.3
    targets = make_targets((10,), 120)
    grad_output = torch.randn(10) if reduction == "none" else None

    def loss_fn(fn):
        def run(a, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = F.linear(a, w)
                return (fn(a, w, targets, 15.0, reduction=reduction)
                        + ce.softcap_cross_entropy_triton(z, targets, 15.0, reduction=reduction)
                        + ns.xxt_triton(a).sum())
        return run

    compiled = torch.compile(loss_fn(ce.linear_softcap_cross_entropy_triton), backend="aot_eager",
                             fullgraph=True)
    got, grads = loss_and_grads(compiled, [x, weight], grad_output)
    want, want_grads = loss_and_grads(loss_fn(ce.linear_softcap_cross_entropy_reference),
                                      [x, weight], grad_output)
    assert_close(got, want, 1e-3, "loss")
    assert_close(grads[0], want_grads[0], 2e-2, "grad_x")
    assert_close(grads[1], want_grads[1], 2e-2, "grad_weight")


@needs_triton
def test_custom_ops_opcheck():
    torch.manual_seed(14)
    logits = torch.randn(4, 70, requires_grad=True)
    targets = make_targets((4,), 70)
    x, weight = torch.randn(6, 8, requires_grad=True), torch.randn(70, 8, requires_grad=True)
    targets6 = make_targets((6,), 70)
    cases = [
        (torch.ops.kernels.softcap_ce_fwd.default, (logits, targets, 15.0, 0.0, 15.0, -1)),
        (torch.ops.kernels.linear_softcap_ce_fused.default,
         (x, weight, targets6, 15.0, 0.0, 15.0, -1, torch.float32, 4, True)),
        (torch.ops.kernels.linear_softcap_ce_losses.default,
         (x, weight, targets6, 0.0, 0.0, 1.0, -1, torch.float32, 4)),
        (torch.ops.kernels.xxt.default, (torch.randn(2, 40, 20, requires_grad=True),)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # schema, fake tensor, autograd registration, AOT dispatch


# ---- bench ----

@pytest.mark.parametrize("head", [[], ["--softcap", "11.5", "--offset", "5", "--width", "15"]])
def test_bench_runs_on_cpu(capsys, head):
    rows = bench.main(["--device", "cpu", "--tokens", "16", "--vocab", "64", "--dim", "32",
                       "--xxt-shapes", "40x24,2x40x24", "--no-compile", "--warmup", "1",
                       "--reps", "1", *head])
    out = capsys.readouterr().out
    assert "linear+softcap CE" in out and "xxt 2x40x24" in out
    assert len(rows) == 4 * 3
    ran = {(r[0].split()[0], r[1]) for r in rows if not r[2].startswith("skipped")}
    assert ("xxt", "reference") in ran
    if kernels.HAS_TRITON and INTERPRET:
        assert ("xxt", "triton") in ran

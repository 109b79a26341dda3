"""torch.compile against eager PyTorch, for every script, on Inductor's CPU backend: compiling is regional (each
Block on its own, the head's loss and the mask builder; GPT.compile_regions), so these check the pieces and their
joins. Every comparison is between values computed from the same weights, each judged against a float64 evaluation
(tests/helpers.py, "comparing two fp32 computations"): a training trajectory compared step by step would not be a
fair test, since its first optimizer steps amplify fp32 rounding by orders of magnitude (see helpers.replay)."""
import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from tests.helpers import (SCRIPTS, assert_reordering_only, load_script, random_model, replay, small_args, tokens,
                           ulp_nudged)


def loss_and_gradients(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_compiled_model_matches_eager_at_a_random_point(script):
    """One training forward and backward (on a CPU: the dense-mask attention path), compiled vs eager, from random
    weights (zero-initialised projections and head would hide a wrong block): the loss and every parameter's gradient.
    Evaluation's graphs (on a CPU: FlexAttention) are compared in the training run below."""
    module = load_script(script)
    model = random_model(module, "--vocab_size=512", "--n_layer=4", "--value_embeds=1").train()
    idx = tokens(1, 256, eots=(0, 70, 190)) % 512
    targets = tokens(1, 256, seed=2) % 512
    reference, compiled = copy.deepcopy(model).double(), copy.deepcopy(model)
    compiled.compile_regions()
    (loss_c, grads_c), (loss_r, grads_r) = (loss_and_gradients(m, idx, targets) for m in (compiled, reference))
    eager = [loss_and_gradients(m, idx, targets) for m in (model, ulp_nudged(model, 1), ulp_nudged(model, 2))]
    assert all(grads.keys() == grads_c.keys() == grads_r.keys() for _, grads in eager)
    assert_reordering_only(loss_c, [loss for loss, _ in eager], loss_r, "training loss")
    for name in grads_c:
        assert_reordering_only(grads_c[name], [grads[name] for _, grads in eager], grads_r[name], f"gradient of {name}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_compiled_training_run_replays_eagerly_and_never_recompiles(script, shards, tmp_path, monkeypatch):
    """--compile=1: the warm-up (one step and an evaluation forward), then 6 steps with 4 validations, the batch
    doubling and the window growing from 1 to 2 blocks halfway. Every step's loss and every validation equal what
    eager PyTorch computes from the same weights and data, and no graph is compiled after the warm-up: not for the
    batch, window, LR and momentum schedules, the validations, nor the warm-up's restore. 4 layers, one value
    embedding table: blocks with and without one, long and short windows."""
    module = load_script(script)
    graphs = {}
    warmup, finish = module.compile_warmup, module.finish

    def counted_warmup(run):
        graphs["before"] = counters["stats"]["unique_graphs"]
        warmup(run)
        graphs["after warm-up"] = counters["stats"]["unique_graphs"]

    def counted_finish(run, steps):  # the end of the compiled run (the eager replays' FlexAttention compiles too)
        graphs.setdefault("at the end", counters["stats"]["unique_graphs"])
        return finish(run, steps)

    monkeypatch.setattr(module, "compile_warmup", counted_warmup)
    monkeypatch.setattr(module, "finish", counted_finish)
    flags = small_args(*shards, tmp_path, num_iterations=6, val_every=2, batch_tokens=512, batch_stages=2,
                       window_blocks="1,2", n_layer=4, value_embeds=1)
    results, summary = replay(module, [*flags, "--compile=1"], [*flags, "--compile=0"], tmp_path)
    assert summary["compile_warmup_s"] > 0 and summary["steps"] == 6
    assert [what for what, *_ in results] == ["step 1", "validation", "step 1", "step 2", "validation", "step 3",
                                              "step 4", "validation", "step 5", "step 6", "validation"]
    for what, compiled, eager, reference in results:
        assert_reordering_only(compiled, eager, reference, what)
    assert graphs["at the end"] == graphs["after warm-up"] > graphs["before"], graphs
    log = next((tmp_path / "recorded").glob("*.txt")).read_text()
    assert "accumulation 1, 2 (batch stages 256, 512 tokens)" in log
    assert f"({graphs['after warm-up'] - graphs['before']} graphs compiled)" in log


def test_the_yardstick_sees_a_sum_that_cancels():
    """ulp_nudged moves every weight by at most one ulp (about two thirds of them by one), and so a dot product whose
    4096 terms cancel to under 1e-5 of their norm by about u * |terms| (u = 2**-24): far more than u * |result|, the
    size of the error eager fp32 may happen to make, so the yardstick of tests/helpers.py sees the cancellation."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4096, 1, bias=False)
    x = torch.randn(4096)
    with torch.no_grad():
        layer.weight[0, -1] -= float(layer(x).double()) / float(x[-1]) - 1e-4 * float(layer.weight[0, -1])
        terms = (layer.weight.double() * x.double())[0]
        assert abs(float(terms.sum())) < 1e-5 * float(terms.norm())
        moved = [abs(float(ulp_nudged(layer, seed)(x)) - float(layer(x))) for seed in (1, 2)]
    w, v = layer.weight.detach(), ulp_nudged(layer, 1).weight.detach()
    ulp = torch.nextafter(w.abs(), torch.tensor(math.inf)) - w.abs()
    assert ((v - w).abs() <= ulp).all() and 0.6 < float((v != w).float().mean()) < 0.73
    assert min(moved) > 0.1 * 2.0 ** -24 * float(terms.norm()) > 1e3 * 2.0 ** -24 * abs(float(terms.sum()))


@pytest.mark.parametrize("bug", ["logit offset 4.9 in the compiled loss", "the long window in every compiled block"])
def test_a_wrong_compiled_graph_is_caught(bug):
    """The comparison above is not blind: a compiled head with the logit transform's offset off by 2% (4.9 for 5),
    or every block given the long window's mask (256 tokens where the short window is 128, in a 190-token
    document), fails it."""
    module = load_script(SCRIPTS[0])
    model = random_model(module, "--vocab_size=512", "--n_layer=4", "--value_embeds=1", "--window_blocks=2").train()
    model.schedule(0.0)  # training's windows: 256 and 128 tokens (a fresh model has the final validation's)
    idx, targets = tokens(1, 256, eots=(0, 190)) % 512, tokens(1, 256, seed=2) % 512
    reference, compiled = copy.deepcopy(model).double(), copy.deepcopy(model)
    compiled.compile_regions()
    if bug.startswith("logit offset"):
        compiled.head_loss = torch.compile(lambda x, y: module.linear_logit_cross_entropy(
            x, compiled.lm_head.weight, y, module.LOGIT_CAP, 4.9, module.LOGIT_WIDTH))
    else:
        masks = compiled.masks

        def long_everywhere(idx, past_docs=None):
            found, docs = masks(idx, past_docs)
            return {True: found[True], False: found[True]}, docs
        compiled.masks = long_everywhere
    (loss_c, grads_c), (loss_r, grads_r) = (loss_and_gradients(m, idx, targets) for m in (compiled, reference))
    eager = [loss_and_gradients(m, idx, targets) for m in (model, ulp_nudged(model, 1), ulp_nudged(model, 2))]
    with pytest.raises(AssertionError, match="relative from the float64 reference"):
        assert_reordering_only(loss_c, [loss for loss, _ in eager], loss_r, "training loss")
        for name in grads_c:
            assert_reordering_only(grads_c[name], [grads[name] for _, grads in eager], grads_r[name],
                                   f"gradient of {name}")


def test_compile_cache_moves_a_warm_start_to_a_machine_that_compiled_nothing(shards, tmp_path):
    """--compile_cache=DIR: the first run compiles and saves its artifacts to a file named by the script, device,
    torch and Triton; a second run with an empty Inductor cache (another machine, in effect) loads them and finds
    every graph compiled; a third, with another width, loads the file, compiles its new graphs anew and warns that
    they were not in it. Subprocesses: Inductor's in-memory caches would hide all of this in one process."""
    import os
    import subprocess
    import sys
    from tests.helpers import ROOT
    flags = small_args(*shards, tmp_path / "logs", num_iterations=1, val_tokens=0, compile=1,
                       compile_cache=tmp_path / "cache")

    def run(inductor_dir, *extra):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / inductor_dir))
        done = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), *flags, *extra], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, done.stderr

    first, _ = run("machine_a")
    (saved,) = (tmp_path / "cache").iterdir()
    assert saved.name.startswith("train_gpt2-cpu") and f"-torch{torch.__version__}-" in saved.name
    assert "compile cache: nothing in" in first and "saved" in first and " 0 graphs found compiled" in first
    second, warned = run("machine_b")
    assert "compile cache: loaded " in second and " 0 compiled anew" in second and "not in" not in warned
    third, warned = run("machine_b", "--n_embd=32", "--n_head=2")
    assert "compile cache: loaded " in third and "were not in" in warned and "compiled from scratch" in warned


def test_a_compile_cache_that_does_not_load_is_a_warning_and_a_file_is_an_error(shards, tmp_path):
    module = load_script(SCRIPTS[0])
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="did not load"):
        note, entries = module.load_compile_cache(str(broken))
    assert entries == 0 and "compiling, then saving over it" in note
    flags = small_args(*shards, tmp_path / "logs", compile=1, compile_cache=broken)
    with pytest.raises(SystemExit, match=r"--compile_cache=.*broken\.bin is a file; give a folder"):
        module.main(flags)  # before anything is written
    assert not (tmp_path / "logs").exists()

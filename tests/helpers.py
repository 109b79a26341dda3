"""Shared by the tests: find and import the train scripts, build token shards, run a script, read its log."""
import copy
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # offline proxy data (see README); tests skip without it
SCRIPTS = sorted(ROOT.glob("train_gpt2*.py"))  # every idea script is covered as soon as it exists
SECTION_RE = re.compile(r"^# ---- (\w+) ----$", re.M)
SECTION_ORDER = ["imports", "kernels", "muon", "model", "data", "hyperparameters", "train", "harness"]

sys.path.insert(0, str(ROOT / "data"))
import fineweb  # noqa: E402  (data/fineweb.py: the shard writer the tests use)
from sample import import_script  # noqa: E402  (the one loader of train scripts: sample.py's)


def load_script(path):
    """Import a train script (or a tool) as a module of its own name; importing never trains."""
    return import_script(path)


def sections(text):
    """{section name: its text} of a train script, split at the `# ---- name ----` lines."""
    names = SECTION_RE.findall(text)
    bodies = SECTION_RE.split(text)[2::2]
    return dict(zip(names, bodies))


def shared_view(text):
    """The parts of a script that must be identical across scripts: every section but `model` (where an idea's own
    flags are declared too, in IdeaFlags)."""
    parts = sections(text)
    parts.pop("model", None)
    return parts


def markov_tokens(n, vocab=256, branching=3, seed=0):
    """A token stream a small model can learn: each token is followed by one of `branching` fixed successors,
    documents start with <|endoftext|>-like token 0."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, branching))
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    choice = rng.integers(0, branching, size=n)
    for i in range(1, n):
        out[i] = 0 if i % 500 == 0 else successors[out[i - 1], choice[i]]
    return out


def make_shards(directory, n_train=60_000, n_val=8_192, shards=2, vocab=256, seed=0):
    """Synthetic train shards (train_000001.bin ...) and one val shard in the real format; returns the globs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = markov_tokens(n_train + n_val, vocab=vocab, seed=seed)
    fineweb.write_shard(str(directory / "syn_val_000000.bin"), tokens[:n_val])
    for i, part in enumerate(np.array_split(tokens[n_val:], shards), 1):
        fineweb.write_shard(str(directory / f"syn_train_{i:06d}.bin"), part)
    return str(directory / "syn_train_*.bin"), str(directory / "syn_val_*.bin")


def small_args(train_glob, val_glob, log_dir, **overrides):
    """Flags for a fast CPU run on synthetic shards (vocab 256): a few seconds for a dozen steps. Adam's LR is
    raised from the record's 0.008 (tuned for 1,870 steps) to 0.05, so a dozen steps learn the Markov chain
    (val 5.55 -> 3.13 in 12 steps; 4.75 at 0.008)."""
    flags = dict(preset="tiny", train_files=train_glob, val_files=val_glob, log_dir=log_dir, vocab_size=256,
                 n_layer=2, n_head=2, n_embd=64, batch_tokens=256, batch_stages=1, device_batch_tokens=256,
                 window_blocks="1", num_iterations=12, val_every=6, val_tokens=2048, adam_lr=0.05)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def random_model(module, *flags):
    """A script's model (--preset=tiny plus flags) in fp32 eval mode with random weights: zero-initialised projections
    and a zero head would hide a leak, every output being the same."""
    args, _ = module.parse_args(["--preset=tiny", *flags])
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig.from_args(args)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
    return model


def read_log(path):
    """(train losses by step, val losses by step, summary dict) from a run log's step lines and last line."""
    train, val, summary = {}, {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"step:(\d+)/\d+ (train|val)_loss:(\S+) ", line)
        if m:
            (train if m[2] == "train" else val)[int(m[1])] = float(m[3])
        elif line.startswith('{"summary"'):
            summary = json.loads(line)["summary"]
    return train, val, summary


def tokens(B, T, eots=(), seed=1):
    """Random ids (B, T) with <|endoftext|> (a document start) at the positions eots."""
    torch.manual_seed(seed)
    idx = torch.randint(0, 50000, (B, T))
    idx[:, list(eots)] = 50256
    return idx


def decode_in_pieces(model, idx, pieces):
    """forward_cached over consecutive slices of idx (a prefill, blocks, single tokens): (logits, cache)."""
    cache, out, t = None, [], 0
    for n in pieces:
        logits, cache = model.forward_cached(idx[:, t:t + n], cache)
        out.append(logits)
        t += n
    assert t == idx.size(1)
    return torch.cat(out, dim=1), cache


# ---- comparing two fp32 computations that differ only in the order of their operations ----
# A compiled graph (or a Triton kernel) computes what eager PyTorch computes, with its sums and products in another
# order, so their fp32 results differ by rounding; how much depends on the CPU's vector width and the shapes. Neither
# is the exact value, so each is compared with a float64 evaluation of the same function (the reference: the model in
# float64 except where it pins fp32 itself, the rotary angles and the logits), and the reordered one may be at most
# REORDER_FACTOR times as far from it as eager fp32 is. Eager's distance alone is not a yardstick where a result is a
# sum whose terms nearly cancel (a scalar gain's gradient sums g*y over every token): its rounding error is of order
# u * sum|terms|, not u * |sum|, and one order of the sum may land near the exact value by luck (MLA's
# blocks.1.bigram_lambda gradient on an AVX2 CPU: eager 5.9e-7 from float64, a correct compiled graph 5.1e-5). So
# eager is also evaluated with its weights moved by one ulp each, at random (ulp_nudged): that is the size of a
# rounding, each term moves by about u * |term|, and the result by what this computation's rounding can move it,
# cancellation included; the yardstick is the farthest of those evaluations. Measured at the random point of
# tests/test_compile.py, every script, every gradient, AVX-512 Xeon: a compiled graph at most 2.1x the yardstick; 16x
# leaves room for shapes and CPUs not measured. FLOOR: an fp32 result is at best within half an ulp (2**-24 relative)
# of the exact value, and two orders of the same sums may land a few ulps apart where every eager evaluation happens
# to hit the reference; 32 ulps is 1.9e-6 relative. A real bug (a wrong mask or window, a dropped term, a stale
# buffer) is off by 1e-3 or more, far outside both (tests/test_compile.py shows two such bugs caught).
REORDER_FACTOR, FLOOR = 16.0, 32 * 2.0 ** -24


def relative_error(value, reference):
    value, reference = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def ulp_nudged(model, seed):
    """A copy of an fp32 model with every parameter element moved one ulp up, one down or kept, at random."""
    nudged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in nudged.parameters():
            direction = torch.randint(-1, 2, p.shape, generator=generator)
            moved = torch.nextafter(p, torch.where(direction > 0, math.inf, -math.inf).to(p.dtype))
            p.copy_(torch.where(direction == 0, p, moved))
    return nudged


def assert_reordering_only(reordered, eager, reference, what=""):
    """reordered (compiled, kernels) is as close to the float64 reference as eager fp32 is, up to REORDER_FACTOR;
    eager: one evaluation, or a list of them (the model's own weights and ulp_nudged copies), the farthest counting."""
    eager = eager if isinstance(eager, (list, tuple)) else [eager]
    yardstick = max(relative_error(e, reference) for e in eager)
    allowed = max(REORDER_FACTOR * yardstick, FLOOR)
    got = relative_error(reordered, reference)
    assert got <= allowed, (f"{what}: {got:.3g} relative from the float64 reference, eager fp32 {yardstick:.3g}"
                            f" (allowed: {allowed:.3g})")


def replay(module, flags, replay_flags, log_dir, reference=True):
    """Train with flags (compile=1, say), recording the model and the data position before every step (the compile
    warm-up's too) and before every validation; then recompute each recorded loss from the same weights and data with
    replay_flags, and (reference) in float64. Returns [(what, recorded, replay, float64 replay or None)] and the
    summary.
    Each comparison starts from the same weights, so it is as exact as one forward: a whole trajectory would not be,
    since the first optimizer steps amplify rounding (at step 2 the x0 mixing and skip weights have a gradient that
    is zero in exact arithmetic, RMSNorm's Jacobian being orthogonal to its input, so its computed value is rounding,
    and Adam's first steps move each weight by about lr * sign(gradient), whatever its size)."""
    train_step, evaluate, records = module.train_step, module.evaluate, []

    def snapshot(run, what):
        return dict(what=what, model=copy.deepcopy(run.raw_model.state_dict()), loader=run.train_loader.state_dict())

    def recorded_step(run, step, elapsed=0.0):
        records.append(dict(snapshot(run, f"step {step + 1}"), step=step, elapsed=elapsed))
        loss = train_step(run, step, elapsed)
        records[-1]["loss"] = float(loss)
        return loss

    def recorded_evaluation(run):
        records.append(snapshot(run, "validation"))
        records[-1]["loss"] = evaluate(run)
        return records[-1]["loss"]

    module.train_step, module.evaluate = recorded_step, recorded_evaluation
    try:
        summary = module.main([*flags, f"--log_dir={Path(log_dir) / 'recorded'}"])
    finally:
        module.train_step, module.evaluate = train_step, evaluate
    replays = []
    for name, dtype in (("replay", None), ("fp64", torch.float64))[:2 if reference else 1]:
        run = module.setup([*replay_flags, f"--log_dir={Path(log_dir) / name}"])
        if dtype is not None:
            run.raw_model.to(dtype)
        losses = []
        for r in records:
            run.raw_model.load_state_dict(r["model"])
            run.train_loader.load_state_dict(r["loader"])
            losses.append(float(train_step(run, r["step"], r["elapsed"])) if "step" in r else evaluate(run))
        replays.append(losses)
    replays += [[None] * len(records)] * (2 - len(replays))
    return [(r["what"], r["loss"], a, b) for r, a, b in zip(records, *replays)], summary


def without_file_permission_bypass(cmd):
    """cmd, run so that file modes apply to it. Root reads a mode-000 file anyway (CAP_DAC_OVERRIDE): as root,
    the command runs under setpriv with the two capabilities that bypass file modes dropped from its bounding
    set (it stays uid 0, so it can still use the test's own files)."""
    if os.geteuid() != 0:
        return list(cmd)
    if shutil.which("setpriv") is None:
        import pytest
        pytest.skip("running as root without setpriv (util-linux): cannot drop the capability that ignores file "
                    "modes")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]

"""End-to-end runs of every train script on CPU: loss falls, logs, checkpoints, resume, NaN, errors, DDP."""
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, SCRIPTS, assert_reordering_only, load_script, read_log, replay, small_args


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_loss_falls_on_synthetic_data(script, shards, tmp_path):
    summary = load_script(script).main(small_args(*shards, tmp_path, num_iterations=24, val_every=12))
    train, val, logged = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert logged == summary
    assert val[0] == pytest.approx(math.log(256), abs=0.05)  # zero-init head: uniform prediction
    assert val[24] < val[0] - 1.0, val
    assert summary["steps"] == 24 and summary["tokens_seen"] == 24 * 256


def test_tiny_preset_on_bundled_sample(tmp_path):
    """The newcomer's first command: `python train_gpt2.py --preset=tiny` on data/sample/, loss falling."""
    summary = load_script(ROOT / "train_gpt2.py").main(["--preset=tiny", f"--log_dir={tmp_path}",
                                                        "--num_iterations=20", "--val_every=10"])
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    # the record's head init, N(0, 0.005) with the embedding a copy of it: logits within ~0.03 of each other, so the
    # first loss is within 0.01 of uniform guessing
    assert val[0] == pytest.approx(math.log(50304), abs=0.01)
    assert val[20] < val[0] - 1.5 and train[20] < train[1] - 1.5


def test_log_format(shards, tmp_path):
    """DESIGN.md's run log: sources (verifiable by hash), environment, settings, step lines, summary."""
    module = load_script(ROOT / "train_gpt2.py")
    summary = module.main(small_args(*shards, tmp_path, num_iterations=4, val_every=2, target_val_loss=100))
    text = (tmp_path / f"{summary['run_id']}.txt").read_text(encoding="utf-8")
    header = "==== source train_gpt2.py sha256="
    start = text.index(header)
    sha, chars = text[start + len(header):].split(" ====\n", 1)[0].split(" chars=")
    body_start = text.index("\n", start) + 1
    embedded = text[body_start:body_start + int(chars)]
    assert embedded == (ROOT / "train_gpt2.py").read_text(encoding="utf-8")
    assert hashlib.sha256(embedded.encode()).hexdigest() == sha == summary["script_sha256"]
    for heading in ("==== environment ====", "==== hyperparameters ====", "==== training ===="):
        assert heading in text
    hyper = json.loads(text.split("==== hyperparameters ====\n", 1)[1].split("\n", 1)[0])
    assert hyper["num_iterations"] == 4 and hyper["vocab_size"] == 256
    assert "step:2/4 val_loss:" in text and "step:3/4 train_loss:" in text and " tok/s:" in text and " eta:" in text
    required = {"script", "script_sha256", "target_val_loss", "val_tokens", "best_val_loss", "final_val_loss",
                "reached", "time_to_target_s", "train_time_s", "tokens_seen", "steps", "peak_mem_gb", "device",
                "world_size"}
    assert required <= set(summary)
    assert summary["reached"] and summary["time_to_target_s"] == 0.0  # target 100 is met by the step-0 validation
    assert text.rstrip().endswith(json.dumps({"summary": summary}))


def test_logs_are_never_overwritten(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    first = module.main(small_args(*shards, tmp_path, num_iterations=1))
    second = module.main(small_args(*shards, tmp_path, num_iterations=1))
    assert first["run_id"] != second["run_id"]
    assert len(list(tmp_path.glob("*.txt"))) == 2


def test_resume_mid_schedule_continues_the_same_curve(shards, tmp_path):
    """Three batch and window stages over 9 steps (256, 512, 768 tokens a step; windows of 1, 2, 3 blocks): resumed
    at step 4, in the second stage, the run crosses into the third exactly as the uninterrupted one did."""
    module = load_script(ROOT / "train_gpt2.py")
    schedules = dict(batch_tokens=768, batch_stages=3, window_blocks="1,2,3")
    full = module.main(small_args(*shards, tmp_path / "a", num_iterations=9, save_every=4, val_every=4, **schedules))
    ckpt = tmp_path / "a" / full["run_id"] / "ckpt_step000004.pt"
    assert ckpt.exists() and (tmp_path / "a" / full["run_id"] / "ckpt_step000009.pt").exists()
    resumed = module.main([f"--resume={ckpt}", f"--log_dir={tmp_path / 'b'}"])
    train_a, val_a, _ = read_log(tmp_path / "a" / f"{full['run_id']}.txt")
    train_b, val_b, _ = read_log(tmp_path / "b" / f"{resumed['run_id']}.txt")
    assert sorted(train_b) == [5, 6, 7, 8, 9] and full["tokens_seen"] == 3 * (256 + 512 + 768)
    for step in train_b:
        assert train_b[step] == pytest.approx(train_a[step], abs=1e-6)
    assert val_b[9] == pytest.approx(val_a[9], abs=1e-6)
    assert resumed["tokens_seen"] == full["tokens_seen"]


def test_nan_loss_stops_and_names_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    """A NaN learning rate from the 6th update on: step 7's loss is NaN, and the checkpoint of step 6 already
    holds NaN weights, so the last good one is step 4's."""
    module = load_script(ROOT / "train_gpt2.py")
    monkeypatch.setattr(module, "lr_factor", lambda step, progress, args: float("nan") if step >= 5 else 1.0)
    with pytest.raises(SystemExit, match=r"stopped: train_loss is nan at step 7; resume from .*ckpt_step000004\.pt with lower --"):
        module.main(small_args(*shards, tmp_path, num_iterations=10, save_every=2, val_every=0))
    log = next(tmp_path.glob("*.txt")).read_text()
    assert "error: stopped: train_loss is nan at step 7; resume from " in log
    assert '"stopped": "train_loss is nan at step 7"' in log


def test_a_nan_read_a_step_late_still_stops_at_its_step(shards, tmp_path, monkeypatch):
    """The loss is read once the next step is queued (no host sync between steps): a NaN loss produced by step 5
    (from the weights after 4 updates) is seen while step 6 runs, and the run still stops naming step 5, logs no line
    for it or later, and names step 2's checkpoint as the last good one (step 4's holds the weights that gave NaN)."""
    module = load_script(ROOT / "train_gpt2.py")
    train_step = module.train_step
    monkeypatch.setattr(module, "train_step", lambda run, step, elapsed=0.0: (
        train_step(run, step, elapsed) * (float("nan") if step == 4 else 1.0)))
    with pytest.raises(SystemExit, match=r"stopped: train_loss is nan at step 5; resume from .*ckpt_step000002\.pt with lower"):
        module.main(small_args(*shards, tmp_path, num_iterations=10, save_every=2, val_every=0))
    log = next(tmp_path.glob("*.txt")).read_text()
    train, _, summary = read_log(next(tmp_path.glob("*.txt")))
    assert sorted(train) == [1, 2, 3, 4] and "error: stopped: train_loss is nan at step 5; " in log
    assert summary["stopped"] == "train_loss is nan at step 5" and summary["steps"] == 6  # step 6 was queued


def test_stop_at_target(shards, tmp_path):
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path, num_iterations=30, val_every=3, target_val_loss=4.5, stop_at_target=1))
    assert summary["reached"] and summary["steps"] < 30
    assert summary["time_to_target_s"] <= summary["train_time_s"]
    assert summary["stopped"].startswith("target 4.5 reached")


def test_time_budget_ends_the_run_with_a_validation(shards, tmp_path):
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path, num_iterations=100000, val_every=0, time_budget_s=2))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert 2.0 <= summary["train_time_s"] < 8.0 and 0 < summary["steps"] < 100000  # the budget and the last step
    assert sorted(val) == [summary["steps"]] and max(train) == summary["steps"]  # val_every=0: only the last


def test_without_validation_the_clock_still_counts_every_step(shards, tmp_path):
    """--val_tokens=0 (benchmarks): no validation, no val files read, and the training clock still stops at the end."""
    summary = load_script(ROOT / "train_gpt2.py").main(small_args(*shards, tmp_path, num_iterations=5, val_tokens=0,
                                                                  val_files="/nonexistent/*.bin"))
    train, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert sorted(train) == [1, 2, 3, 4, 5] and val == {} and summary["final_val_loss"] is None
    assert summary["train_time_s"] > 0 and summary["steps"] == 5


def test_model_schedule_hook_sees_the_progress_before_every_step(shards, tmp_path, monkeypatch):
    module = load_script(ROOT / "train_gpt2.py")
    seen = []
    monkeypatch.setattr(module.GPT, "schedule", lambda self, progress: seen.append(progress), raising=False)
    module.main(small_args(*shards, tmp_path, num_iterations=4))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0]  # and 1.0 before the final validation (its wider windows)


def test_auto_device_batch_tokens_on_cpu(shards, tmp_path):
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path, num_iterations=1, device_batch_tokens="auto", batch_tokens=512, batch_stages=2))
    assert "micro-batch 256 tokens x accumulation 1, 2 (batch stages 256, 512 tokens)" in (
        tmp_path / f"{summary['run_id']}.txt").read_text()


def test_pick_device_batch_tokens_takes_the_largest_divisor_that_fits():
    module = load_script(ROOT / "train_gpt2.py")
    assert module.pick_device_batch_tokens(64, lambda b: b <= 20) == 16
    assert module.pick_device_batch_tokens(12, lambda b: b <= 5) == 4
    with pytest.raises(SystemExit, match="activation_checkpointing"):
        module.pick_device_batch_tokens(8, lambda b: False)


def test_activation_checkpointing_and_accumulation_keep_the_numbers(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    base = module.main(small_args(*shards, tmp_path / "a", num_iterations=3))
    other = module.main(small_args(*shards, tmp_path / "b", num_iterations=3, activation_checkpointing=1,
                                   device_batch_tokens=256))
    train_a, _, _ = read_log(tmp_path / "a" / f"{base['run_id']}.txt")
    train_b, _, _ = read_log(tmp_path / "b" / f"{other['run_id']}.txt")
    for step in (1, 2, 3):
        assert train_b[step] == pytest.approx(train_a[step], rel=1e-5)


def test_torchrun_two_processes_match_one_process_with_accumulation(shards, tmp_path):
    """2 CPU processes (gloo, DDP) x 128 tokens == 1 process x 2 accumulation steps x 128 tokens."""
    args = small_args(*shards, tmp_path / "ddp", num_iterations=4, val_every=4, device_batch_tokens=128)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_log = next((tmp_path / "ddp").glob("*.txt"))
    single = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path / "one", num_iterations=4, val_every=4, device_batch_tokens=128))
    train_ddp, val_ddp, summary_ddp = read_log(ddp_log)
    train_one, val_one, _ = read_log(tmp_path / "one" / f"{single['run_id']}.txt")
    assert summary_ddp["world_size"] == 2 and "accumulation 1" in ddp_log.read_text()
    for step in (1, 2, 3, 4):
        assert train_ddp[step] == pytest.approx(train_one[step], rel=1e-4)
    assert val_ddp[4] == pytest.approx(val_one[4], rel=1e-4)


CLOCK_PROBE = """
import os, sys, time
sys.path.insert(0, {root!r})
from sample import import_script
module = import_script({script!r})
rank, seen, run_progress = int(os.environ["RANK"]), [], module.run_progress
def recorded_progress(step, args, elapsed=0.0):  # the progress (so the LR and windows) every step acts on
    seen.append(run_progress(step, args, elapsed))
    return seen[-1]
module.run_progress = recorded_progress
setup = module.setup
def late_setup(argv):  # rank 1 starts its clock 0.5 s after rank 0's: left alone, the two clocks disagree
    run = setup(argv)
    time.sleep(0.5 * rank)
    return run
module.setup = late_setup
summary = module.main(sys.argv[1:])
with open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w") as f:  # a file each: the two ranks' stdout interleave
    f.write(f"steps {{summary['steps']}} progress {{seen}}")
"""


def test_a_time_budget_on_two_processes_stops_every_rank_on_the_same_step(shards, tmp_path):
    """With --time_budget_s on several processes every rank must take the same LR at every step and stop on the same
    step (a rank that took one more step would wait forever in DDP's all-reduce). Rank 1 here starts its clock 0.5 s
    late; both act on rank 0's clock, sent each step without waiting and used a step later."""
    probe = tmp_path / "probe.py"
    probe.write_text(CLOCK_PROBE.format(root=str(ROOT), script=str(ROOT / "train_gpt2.py"), out=str(tmp_path)))
    args = small_args(*shards, tmp_path / "logs", num_iterations=100000, val_every=0, device_batch_tokens=128,
                      time_budget_s=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(probe), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    steps = int(re.match(r"steps (\d+)", ranks[0])[1])
    summary = read_log(next((tmp_path / "logs").glob("*.txt")))[2]
    assert summary["steps"] == steps > 1 and 3.0 <= summary["train_time_s"] < 10.0


@pytest.mark.parametrize("flag, message", [
    ("--train_files=/nonexistent/x_*.bin", r"(?s)no files match --train_files=/nonexistent/x_\*\.bin.*fineweb\.py --shards"),
    ("--val_tokens=1000000", r"hold 8192 tokens, fewer than --val_tokens=1000000"),
    ("--device_batch_tokens=96", r"--device_batch_tokens=96 must divide the first batch stage's 256 tokens"),
    ("--batch_stages=3", r"--batch_tokens=256 does not split into --batch_stages=3 stages x 1 processes"),
    ("--val_tokens=2000", r"--val_tokens=2000 is not a multiple of --device_batch_tokens=256 x 1 processes"),
    ("--attention=sdpa", r"--device_batch_tokens=256 must divide .* and be a multiple of --seq_len=1024"),
    ("--resume=/nonexistent.pt", r"no such checkpoint"),
])
def test_bad_input_is_a_clear_error(shards, tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        load_script(ROOT / "train_gpt2.py").main(small_args(*shards, tmp_path) + [flag])


@pytest.mark.skipif((ROOT / "data" / "fineweb10B").exists(), reason="FineWeb is downloaded here")
def test_default_preset_without_fineweb_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        load_script(ROOT / "train_gpt2.py").main(["--n_layer=1", "--n_embd=64", "--n_head=1", f"--log_dir={tmp_path}"])
    assert "python data/fineweb.py --shards 8" in str(err.value) and "--preset=tiny" in str(err.value)


def test_kernels_flag_runs_the_triton_kernels_with_the_same_numbers(shards, tmp_path, monkeypatch):
    """--kernels=1 against 0, end to end: under TRITON_INTERPRET=1 (conftest.py) the kernels run on CPU in Triton's
    interpreter, so one side really is the Triton path (counted), the other the PyTorch reference. Every step's loss
    and the validations of the kernels' run equal the reference's from the same weights, up to fp32 reordering
    (tests/helpers.py: replay); Muon's X X^T kernel against its reference is tests/test_kernels.py's."""
    kernels = pytest.importorskip("kernels")
    if not (kernels.HAS_TRITON and kernels._dispatch.INTERPRET):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    calls = {"ce": 0, "xxt": 0}
    for module, name, key in ((kernels.cross_entropy, "linear_softcap_cross_entropy_triton", "ce"),
                              (kernels.newton_schulz, "xxt_triton", "xxt")):
        def counted(*args, _original=getattr(module, name), _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    module = load_script(ROOT / "train_gpt2.py")
    flags = small_args(*shards, tmp_path, num_iterations=3)
    off = module.main([*flags, f"--log_dir={tmp_path / 'off'}", "--kernels=0"])
    assert calls == {"ce": 0, "xxt": 0}
    results, on = replay(module, [*flags, "--kernels=1"], [*flags, "--kernels=0"], tmp_path / "on")
    assert calls["ce"] >= 3 and calls["xxt"] >= 3 * 5 * 2  # every step: the loss, and Muon's 5 NS iterations
    for what, with_kernels, reference_fp32, reference_fp64 in results:
        assert_reordering_only(with_kernels, reference_fp32, reference_fp64, what)
    assert on["steps"] == off["steps"] == 3 and math.isfinite(on["final_val_loss"])
    text = next((tmp_path / "on" / "recorded").glob("*.txt")).read_text(encoding="utf-8")
    for name in ("__init__", "_dispatch", "cross_entropy", "newton_schulz"):
        assert f"==== source {os.path.join('kernels', name)}.py sha256=" in text


def test_resume_applies_the_flags_given_now(shards, tmp_path):
    """Resuming with all learning rates 0 must freeze the weights (the cautious weight decay goes with the LR): the
    optimizers' saved lr must not win, nor their saved eps."""
    module = load_script(ROOT / "train_gpt2.py")
    full = module.main(small_args(*shards, tmp_path / "a", num_iterations=8, save_every=4, val_every=0))
    ckpt = tmp_path / "a" / full["run_id"] / "ckpt_step000004.pt"
    frozen = module.main([f"--resume={ckpt}", f"--log_dir={tmp_path / 'b'}", "--muon_lr=0", "--adam_lr=0",
                          "--adam_eps=1e-6"])
    before = torch.load(ckpt, weights_only=False)
    after = torch.load(frozen["last_checkpoint"], weights_only=False)
    assert after["step"] == 8 and after["args"]["muon_lr"] == 0
    scheduled = {"windows", "freqs", "attn_scale"}  # buffers schedule() sets: the final validation's at the end
    for name, tensor in before["model"].items():
        assert name in scheduled or torch.equal(after["model"][name], tensor), name
    assert all(g["lr"] == 0 and g["eps"] == 1e-6 for g in after["optimizers"][0]["param_groups"])
    assert all(g["lr"] == 0 for g in after["optimizers"][1]["param_groups"])


@pytest.fixture(scope="module")
def mla_checkpoint(shards, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("mla")
    summary = load_script(ROOT / "train_gpt2_mla.py").main(small_args(*shards, log_dir, num_iterations=2, save_every=2))
    return summary["last_checkpoint"]


@pytest.mark.parametrize("make, message", [
    (lambda d, ckpt: d, r"--resume=.* is a folder; pass a checkpoint file, e\.g\. --resume=.*ckpt_step000002\.pt"),
    (lambda d, ckpt: ckpt, r"was written by train_gpt2_mla\.py, not train_gpt2\.py: resume it with "
                           r"python train_gpt2_mla\.py --resume="),
    (lambda d, ckpt: _write(d / "cut.pt", open(ckpt, "rb").read()[:5000]),
     r"is not a readable checkpoint \(\w+\); it is truncated or corrupt: resume from an earlier ckpt_step\*\.pt"),
    (lambda d, ckpt: _write(d / "junk.pt", b"not a checkpoint at all"), r"is not a readable checkpoint"),
    (lambda d, ckpt: _save(d / "dict.pt", {"model": {}}), r"is not a train_gpt2\*\.py checkpoint"),
])
def test_bad_checkpoints_are_clear_errors(shards, tmp_path, mla_checkpoint, make, message):
    import shutil
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(mla_checkpoint, folder / "ckpt_step000002.pt")
    path = make(folder, folder / "ckpt_step000002.pt")
    with pytest.raises(SystemExit, match=message):
        load_script(ROOT / "train_gpt2.py").main([f"--resume={path}", f"--log_dir={tmp_path / 'logs'}"])
    assert not (tmp_path / "logs").exists()  # nothing written


def _write(path, data):
    path.write_bytes(data)
    return path


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_resume_with_another_model_shape_is_a_clear_error(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    summary = module.main(small_args(*shards, tmp_path, num_iterations=2, save_every=2))
    with pytest.raises(SystemExit, match=r"its weights do not fit this model .*; resume without changing the model"):
        module.main([f"--resume={summary['last_checkpoint']}", "--n_layer=3", f"--log_dir={tmp_path}"])


def test_stale_temp_checkpoints_are_removed_on_resume(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    summary = module.main(small_args(*shards, tmp_path / "a", num_iterations=2, save_every=2))
    stale = tmp_path / "a" / summary["run_id"] / "ckpt_step000004.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    module.main([f"--resume={summary['last_checkpoint']}", "--num_iterations=3", f"--log_dir={tmp_path / 'b'}"])
    assert not stale.exists()


def test_token_ids_beyond_the_vocabulary_are_caught_when_a_shard_is_opened(tmp_path):
    from tests.helpers import fineweb, make_shards
    train_glob, val_glob = make_shards(tmp_path / "s")
    bad = tmp_path / "s" / "syn_train_000001.bin"
    tokens = np.array(module_read(bad))
    tokens[123] = 300  # vocab is 256
    fineweb.write_shard(str(bad), tokens)
    with pytest.raises(SystemExit, match=r"syn_train_000001\.bin: token id 300 >= --vocab_size=256"):
        load_script(ROOT / "train_gpt2.py").main(small_args(train_glob, val_glob, tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()
    bad_val = tmp_path / "v" / "bad_val_000000.bin"
    bad_val.parent.mkdir()
    fineweb.write_shard(str(bad_val), tokens)
    with pytest.raises(SystemExit, match=r"bad_val_000000\.bin: token id 300 >= --vocab_size=256"):
        load_script(ROOT / "train_gpt2.py").main(small_args(str(tmp_path / "s" / "syn_train_000002.bin"),
                                                            str(bad_val), tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


def module_read(path):
    return load_script(ROOT / "train_gpt2.py").read_shard(str(path))


def test_training_on_the_validation_files_is_refused(shards, tmp_path):
    with pytest.raises(SystemExit, match=r"both match .*syn_val_000000\.bin: training on validation data"):
        load_script(ROOT / "train_gpt2.py").main(small_args(shards[1], shards[1], tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


def test_summary_is_valid_json_when_no_validation_ran(shards, tmp_path, monkeypatch):
    """Interrupted before the first validation: best_val_loss is null, not Infinity (which JSON does not have)."""
    module = load_script(ROOT / "train_gpt2.py")
    monkeypatch.setattr(module, "evaluate", lambda run: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as exit_info:
        module.main(small_args(*shards, tmp_path, num_iterations=4))
    assert exit_info.value.code == 130
    text = next(tmp_path.glob("*.txt")).read_text()
    summary = json.loads(text.rstrip().splitlines()[-1])["summary"]
    assert summary["best_val_loss"] is None and summary["stopped"] == "interrupted (SIGINT) at step 0"


def test_an_interrupt_while_saving_leaves_no_temp_file(shards, tmp_path, monkeypatch):
    module = load_script(ROOT / "train_gpt2.py")
    real_save = torch.save

    def save_then_interrupt(obj, path, *args, **kwargs):  # half a file on disk, then Ctrl-C
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        module.main(small_args(*shards, tmp_path, num_iterations=4, save_every=2))
    assert exit_info.value.code == 130
    assert list(tmp_path.rglob("*.tmp")) == [] and list(tmp_path.rglob("*.pt")) == []
    summary = read_log(next(tmp_path.glob("*.txt")))[2]
    assert summary["stopped"] == "interrupted (SIGINT) at step 2" and summary["last_checkpoint"] is None


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_leave_a_summary_and_exit_non_zero(shards, tmp_path, sig, code):
    args = small_args(*shards, tmp_path, num_iterations=100000, val_every=0, save_every=5)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until it trains, past its first checkpoint
        if line.startswith("step:7/"):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    log = next(tmp_path.glob("*.txt")).read_text()
    stopped = re.search(r"^interrupted \((SIG\w+)\) at step (\d+); last checkpoint: (.*ckpt_step000005\.pt)$", log, re.M)
    assert stopped and stopped[1] == sig.name, log[-1500:]
    summary = read_log(next(tmp_path.glob("*.txt")))[2]
    assert summary["stopped"] == f"interrupted ({sig.name}) at step {stopped[2]}"
    assert summary["steps"] == int(stopped[2]) >= 7 and summary["last_checkpoint"].endswith("ckpt_step000005.pt")
    assert list(tmp_path.rglob("*.tmp")) == [] and "Traceback" not in err


def test_torchrun_prints_an_error_once(shards, tmp_path):
    """Every rank hits the same bad input; only rank 0 says so (torchrun then adds its own failure report)."""
    args = small_args(*shards, tmp_path, val_tokens=1000000, device_batch_tokens=128)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("fewer than --val_tokens=1000000") == 1


def test_probe_fits_runs_a_real_step_against_a_memory_budget(monkeypatch):
    """probe_fits itself, with a fake device memory: 1 MB per token of activations, and an out-of-memory error
    from 8 tokens on; the optimizer states (12 bytes a weight: Adam's two moments and its held gradient) count
    against the budget too."""
    module = load_script(ROOT / "train_gpt2.py")
    args, _ = module.parse_args(["--preset=tiny", "--vocab_size=256"])
    model = module.GPT(module.GPTConfig.from_args(args))
    seen = []

    def record(_, inputs):
        seen.append(inputs[0].numel())
        if seen[-1] >= 8:
            raise torch.OutOfMemoryError("fake: out of memory")

    model.register_forward_pre_hook(record)
    optimizer_bytes = 12 * sum(p.numel() for p in model.parameters())
    budget = (5.5e6 + optimizer_bytes) / 0.9  # 5 tokens fit, 6 do not
    monkeypatch.setattr(module, "memory_stats", lambda device: (1e6 * seen[-1], budget))
    fits = lambda b: module.probe_fits(model, args, torch.device("cpu"), contextlib.nullcontext(), b)  # noqa: E731
    assert module.pick_device_batch_tokens(16, fits) == 4 and seen == [16, 8, 4]
    assert fits(5) and not fits(6) and not fits(12)
    assert all(p.grad is None for p in model.parameters())  # a probe leaves no gradients behind


def _agree_worker(rank, store_path, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    module = load_script(ROOT / "train_gpt2.py")
    module.pick_device_batch_tokens = lambda per_rank, fits: [8, 2][rank]  # each rank's own probe disagrees
    args, _ = module.parse_args([])
    run = module.Run(args=args, device=torch.device("cpu"), use_compile=False, world=2)
    size = module.auto_device_batch_tokens(run)
    (Path(out_dir) / f"rank{rank}").write_text(str(size))
    dist.destroy_process_group()


def test_auto_device_batch_tokens_is_agreed_on_by_every_rank(tmp_path):
    torch.multiprocessing.spawn(_agree_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]


def test_validation_is_dense_near_the_expected_crossing(shards, tmp_path):
    """--val_every=4 and, from step 6, every 2 steps too: validations at 0, 4, 6, 8, 10, 12 (the last)."""
    summary = load_script(ROOT / "train_gpt2.py").main(small_args(*shards, tmp_path, val_every=4, val_dense_from=6,
                                                                   val_dense_every=2))
    _, val, _ = read_log(tmp_path / f"{summary['run_id']}.txt")
    assert sorted(val) == [0, 4, 6, 8, 10, 12]


def test_the_124m_schedule_crosses_its_expected_window_densely():
    """README's arithmetic: 1870 steps of 131,072 / 262,144 / 393,216 tokens by thirds are 490,078,208 tokens; the
    pessimistic crossing (370M x 1.15 = 425M tokens) falls at step 1705, the optimistic one (310M) at 1413: both
    inside the dense validations from step 1350."""
    module = load_script(ROOT / "train_gpt2.py")
    args, _ = module.parse_args([])
    batches = [module.batch_stage(module.run_progress(step, args), args)[0] for step in range(args.num_iterations)]
    assert sum(batches) == 490_078_208
    seen = list(itertools.accumulate(batches))
    crossing = next(step + 1 for step, tokens in enumerate(seen) if tokens >= 425e6)
    optimistic = next(step + 1 for step, tokens in enumerate(seen) if tokens >= 310e6)
    assert (optimistic, crossing) == (1413, 1705) and args.val_dense_from < optimistic < crossing < len(batches)

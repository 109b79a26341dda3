"""End-to-end runs of every train script on CPU: loss falls, logs, checkpoints, resume, NaN, errors, DDP."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SCRIPTS, load_script, read_log, small_args


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
    assert val[0] == pytest.approx(math.log(50304), abs=1e-3)
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


def test_resume_continues_the_same_curve(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    full = module.main(small_args(*shards, tmp_path / "a", num_iterations=8, save_every=4, val_every=4))
    ckpt = tmp_path / "a" / full["run_id"] / "ckpt_step000004.pt"
    assert ckpt.exists() and (tmp_path / "a" / full["run_id"] / "ckpt_step000008.pt").exists()
    resumed = module.main([f"--resume={ckpt}", f"--log_dir={tmp_path / 'b'}"])
    train_a, val_a, _ = read_log(tmp_path / "a" / f"{full['run_id']}.txt")
    train_b, val_b, _ = read_log(tmp_path / "b" / f"{resumed['run_id']}.txt")
    assert sorted(train_b) == [5, 6, 7, 8]
    for step in train_b:
        assert train_b[step] == pytest.approx(train_a[step], abs=1e-6)
    assert val_b[8] == pytest.approx(val_a[8], abs=1e-6)
    assert resumed["tokens_seen"] == full["tokens_seen"]


def test_nan_loss_stops_and_names_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    """A NaN learning rate from the 6th update on: step 7's loss is NaN, and the checkpoint of step 6 already
    holds NaN weights, so the last good one is step 4's."""
    module = load_script(ROOT / "train_gpt2.py")
    monkeypatch.setattr(module, "lr_factor", lambda step, progress, args: float("nan") if step >= 5 else 1.0)
    with pytest.raises(SystemExit, match=r"train_loss is nan at step 7; last good checkpoint: .*ckpt_step000004\.pt"):
        module.main(small_args(*shards, tmp_path, num_iterations=10, save_every=2, val_every=0))
    log = next(tmp_path.glob("*.txt")).read_text()
    assert "error: train_loss is nan at step 7; stopping. Last good checkpoint: " in log
    assert '"stopped": "train_loss is nan at step 7"' in log


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
    assert 2.0 <= summary["train_time_s"] < 4.0 and 0 < summary["steps"] < 100000
    assert sorted(val) == [summary["steps"]] and max(train) == summary["steps"]  # val_every=0: only the last


def test_model_schedule_hook_sees_the_progress_before_every_step(shards, tmp_path, monkeypatch):
    module = load_script(ROOT / "train_gpt2.py")
    seen = []
    monkeypatch.setattr(module.GPT, "schedule", lambda self, progress: seen.append(progress), raising=False)
    module.main(small_args(*shards, tmp_path, num_iterations=4))
    assert seen == [0.0, 0.25, 0.5, 0.75]


def test_auto_device_batch_size_on_cpu(shards, tmp_path):
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path, num_iterations=1, device_batch_size="auto"))
    assert "micro-batch 8 x 32 x accumulation 1" in (tmp_path / f"{summary['run_id']}.txt").read_text()


def test_pick_device_batch_size_takes_the_largest_divisor_that_fits():
    module = load_script(ROOT / "train_gpt2.py")
    assert module.pick_device_batch_size(64, lambda b: b <= 20) == 16
    assert module.pick_device_batch_size(12, lambda b: b <= 5) == 4
    with pytest.raises(SystemExit, match="activation_checkpointing"):
        module.pick_device_batch_size(8, lambda b: False)


def test_activation_checkpointing_and_accumulation_keep_the_numbers(shards, tmp_path):
    module = load_script(ROOT / "train_gpt2.py")
    base = module.main(small_args(*shards, tmp_path / "a", num_iterations=3))
    other = module.main(small_args(*shards, tmp_path / "b", num_iterations=3, activation_checkpointing=1,
                                   device_batch_size=2))
    train_a, _, _ = read_log(tmp_path / "a" / f"{base['run_id']}.txt")
    train_b, _, _ = read_log(tmp_path / "b" / f"{other['run_id']}.txt")
    for step in (1, 2, 3):
        assert train_b[step] == pytest.approx(train_a[step], rel=1e-5)


def test_torchrun_two_processes_match_one_process_with_accumulation(shards, tmp_path):
    """2 CPU processes (gloo, DDP) x 4 sequences == 1 process x 2 accumulation steps x 4 sequences."""
    args = small_args(*shards, tmp_path / "ddp", num_iterations=4, val_every=4, device_batch_size=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_log = next((tmp_path / "ddp").glob("*.txt"))
    single = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, tmp_path / "one", num_iterations=4, val_every=4, device_batch_size=4))
    train_ddp, val_ddp, summary_ddp = read_log(ddp_log)
    train_one, val_one, _ = read_log(tmp_path / "one" / f"{single['run_id']}.txt")
    assert summary_ddp["world_size"] == 2 and "accumulation 1" in ddp_log.read_text()
    for step in (1, 2, 3, 4):
        assert train_ddp[step] == pytest.approx(train_one[step], rel=1e-4)
    assert val_ddp[4] == pytest.approx(val_one[4], rel=1e-4)


@pytest.mark.parametrize("flag, message", [
    ("--train_files=/nonexistent/x_*.bin", r"(?s)no files match --train_files=/nonexistent/x_\*\.bin.*fineweb\.py --shards"),
    ("--val_tokens=1000000", r"hold 8192 tokens, fewer than --val_tokens=1000000"),
    ("--device_batch_size=3", r"--device_batch_size=3 does not divide the 8 sequences"),
    ("--batch_tokens=100", r"--batch_tokens=100 is not a multiple of --seq_len=32"),
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


def test_kernels_flag_keeps_the_numbers_and_logs_their_source(shards, tmp_path):
    pytest.importorskip("kernels")
    module = load_script(ROOT / "train_gpt2.py")
    off = module.main(small_args(*shards, tmp_path / "off", num_iterations=3, kernels=0))
    on = module.main(small_args(*shards, tmp_path / "on", num_iterations=3, kernels=1))
    train_off, _, _ = read_log(tmp_path / "off" / f"{off['run_id']}.txt")
    log_on = tmp_path / "on" / f"{on['run_id']}.txt"
    assert read_log(log_on)[0] == train_off  # on CPU both run the reference: the same numbers, exactly
    text = log_on.read_text(encoding="utf-8")
    for name in ("__init__", "_dispatch", "cross_entropy", "newton_schulz"):
        assert f"==== source {os.path.join('kernels', name)}.py sha256=" in text

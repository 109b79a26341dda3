"""The GPU code paths a CPU can run: bf16 and fp16 autocast (with the GradScaler), and DDP around a compiled model on
2 gloo processes (torch.compile itself: tests/test_compile.py). What only a GPU can run is in test_gpu.py."""
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, load_script, read_log, small_args


def train(module, shards, log_dir, **flags):
    """(train losses, val losses, summary) of a small CPU run."""
    summary = module.main(small_args(*shards, log_dir, **flags))
    return read_log(log_dir / f"{summary['run_id']}.txt")


@pytest.mark.parametrize("dtype, scaled", [("bf16", False), ("fp16", True)])
def test_autocast_trains_on_cpu(shards, tmp_path, monkeypatch, dtype, scaled):
    """bf16 and fp16 autocast (fp16 with the GradScaler: its scale multiplies the loss before backward) train, and
    track the fp32 run's losses."""
    module = load_script(ROOT / "train_gpt2.py")
    scales = []
    step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **k: (
        scales.append(self.get_scale() if self.is_enabled() else None), step(self, opt, *a, **k))[1])
    fp32 = train(module, shards, tmp_path / "fp32", num_iterations=12, val_every=12)
    half = train(module, shards, tmp_path / dtype, num_iterations=12, val_every=12, dtype=dtype)
    log = next((tmp_path / dtype).glob("*.txt")).read_text()
    assert f"dtype torch.{'bfloat16' if dtype == 'bf16' else 'float16'}" in log
    assert half[1][12] < half[1][0] - 1.0 and half[1][12] == pytest.approx(fp32[1][12], abs=0.1)
    half_scales = scales[len(scales) // 2:]  # the second run's
    assert all(s == 65536.0 for s in half_scales) if scaled else all(s is None for s in half_scales)


def test_ddp_around_a_compiled_model_on_two_gloo_processes(shards, tmp_path):
    """DDP around a compiled model, 2 CPU processes x 128 tokens == 1 eager process x 2 accumulation steps: the first
    two steps' losses and the validations before and after the first step. Those are near-exact: they come from the
    initial weights and one update (Adam moving only the zero-initialised head, by ~lr * sign of gradients far above
    rounding), so two fp32 orders of the same sums agree to ~1e-7 relative; 1e-5 leaves 100x. Later losses are not
    compared: from the second update on, rounding-level differences are amplified (tests/helpers.py, replay)."""
    args = small_args(*shards, tmp_path / "ddp", num_iterations=2, val_every=1, device_batch_tokens=128, compile=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_log = next((tmp_path / "ddp").glob("*.txt"))
    train_ddp, val_ddp, summary = read_log(ddp_log)
    assert summary["world_size"] == 2 and "compile True" in ddp_log.read_text()
    train_one, val_one, _ = train(load_script(ROOT / "train_gpt2.py"), shards, tmp_path / "one", num_iterations=2,
                                  val_every=1, device_batch_tokens=128)
    for step in (1, 2):
        assert train_ddp[step] == pytest.approx(train_one[step], rel=1e-5)
    for step in (0, 1):
        assert val_ddp[step] == pytest.approx(val_one[step], rel=1e-5)

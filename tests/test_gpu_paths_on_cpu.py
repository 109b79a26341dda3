"""The GPU code paths a CPU can run: torch.compile (Inductor's CPU backend), bf16 and fp16 autocast (with the
GradScaler), and DDP around a compiled model on 2 gloo processes. What only a GPU can run is in test_gpu.py."""
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


def test_compile_matches_eager_and_never_recompiles_after_the_first_evaluation(shards, tmp_path, monkeypatch):
    """--compile=1 on CPU (Inductor): the compile warm-up, then 6 steps with 4 validations, the batch doubling and the
    window growing from 1 to 2 blocks halfway. The losses equal the eager run's, and the graph count after the first
    validation (which compiles the eval graph) never grows: not for the batch, window, LR and momentum schedules, the
    later validations, nor the warm-up's weight reset."""
    from torch._dynamo.utils import counters
    module = load_script(ROOT / "train_gpt2.py")
    graphs_after_evaluation = []
    evaluate = module.evaluate

    def counted(run):
        loss = evaluate(run)
        graphs_after_evaluation.append(counters["stats"]["unique_graphs"])
        return loss

    monkeypatch.setattr(module, "evaluate", counted)
    schedules = dict(num_iterations=6, val_every=2, batch_tokens=512, batch_stages=2, window_blocks="1,2")
    eager = train(module, shards, tmp_path / "eager", compile=0, **schedules)
    graphs_after_evaluation.clear()
    compiled = train(module, shards, tmp_path / "compiled", compile=1, **schedules)
    assert "accumulation 1, 2 (batch stages 256, 512 tokens)" in next((tmp_path / "compiled").glob("*.txt")).read_text()
    assert compiled[2]["compile_warmup_s"] > 0
    for step, loss in eager[0].items():  # train losses
        assert compiled[0][step] == pytest.approx(loss, abs=2e-4)
    for step, loss in eager[1].items():  # val losses
        assert compiled[1][step] == pytest.approx(loss, abs=2e-4)
    assert len(graphs_after_evaluation) == 4 and len(set(graphs_after_evaluation)) == 1, graphs_after_evaluation


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
    """torch.compile(DDP(model)) with 2 CPU processes x 128 tokens == 1 eager process x 2 accumulation steps."""
    args = small_args(*shards, tmp_path / "ddp", num_iterations=3, val_every=3, device_batch_tokens=128, compile=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_log = next((tmp_path / "ddp").glob("*.txt"))
    train_ddp, val_ddp, summary = read_log(ddp_log)
    assert summary["world_size"] == 2 and "compile True" in ddp_log.read_text()
    train_one, val_one, _ = train(load_script(ROOT / "train_gpt2.py"), shards, tmp_path / "one", num_iterations=3,
                                  val_every=3, device_batch_tokens=128)
    for step in (1, 2, 3):
        assert train_ddp[step] == pytest.approx(train_one[step], abs=2e-4)
    assert val_ddp[3] == pytest.approx(val_one[3], abs=2e-4)

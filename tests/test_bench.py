"""bench.py on CPU: one row per script, FLOPs that match the analytic count, the GPU peak table."""
import json

import pytest

from tests.helpers import ROOT, load_script

bench = load_script(ROOT / "bench.py")


def test_tiny_preset_table_on_cpu(capsys):
    rows = bench.main(["--preset", "tiny", "--steps", "2", "--scripts", str(ROOT / "train_gpt2.py"), "--json"])
    (row,) = rows
    assert json.loads(capsys.readouterr().out.strip()) == row  # stdout holds only the JSON
    L, C, T, V = 2, 64, 64, 50304  # the tiny preset
    blocks = L * 12 * C * C
    assert row["params_m"] * 1e6 == 2 * V * C + blocks and row["active_params_m"] * 1e6 == V * C + blocks
    # 6 FLOPs per multiply-add weight per token (forward + backward), plus QK^T and AV over the full T x T matrix
    assert row["gflops_per_token"] * 1e9 == pytest.approx(6 * (blocks + V * C) + 12 * L * C * T)
    assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and row["mfu"] is None  # no peak known for a CPU
    assert row["batch_tokens"] == 512 and row["compile_s"] is None


def test_peak_table_prefers_the_specific_name():
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert bench.peak_tflops("cpu (x86_64)") is None


def test_table_format():
    row = dict(script="train_gpt2.py", params_m=162.2, active_params_m=123.6, tokens_per_s=1.5e6, ms_per_step=350.0,
               gflops_per_token=0.855, mfu=0.41, peak_mem_gb=20.5, compile_s=61.0)
    table = bench.format_table([row])
    assert "| train_gpt2.py | 162.2M / 123.6M | 1,500,000 | 350.0 | 0.855 | 41.0% | 20.50 GB | 61 s |" in table


def test_race_writes_a_checkable_proxy_record(shards, tmp_path):
    scripts = [str(ROOT / "train_gpt2.py")]
    small = ["vocab_size=256", "n_layer=2", "n_head=2", "n_embd=64", "seq_len=32", "batch_tokens=256",
             "device_batch_size=8"]
    bench.main(["--race", "--minutes", "0.05", "--preset", "tiny", "--scripts", *scripts, "--train_files", shards[0],
                "--val_files", shards[1], "--val_every", "5", "--val_tokens", "2048", "--name", "Smoke",
                "--records", str(tmp_path), "--set", *small])
    (folder,) = (tmp_path / "proxy").iterdir()
    assert folder.name.endswith("_Smoke")
    (log,) = folder.glob("*.txt")
    summary = bench.leaderboard.parse_log(log).summary
    assert 3.0 <= summary["train_time_s"] < 5.0 and summary["steps"] > 1  # 0.05 minutes of training
    readme = (folder / "README.md").read_text()
    assert "| train_gpt2.py |" in readme and "never a FineWeb result" in readme
    assert bench.leaderboard.check_record(folder, "proxy") == []
    assert "_Smoke" in (tmp_path / "README.md").read_text()  # the records table was refreshed
    with pytest.raises(SystemExit, match="never overwritten"):
        bench.race([], [], 0.01, folder.name.split("_", 1)[1], tmp_path, "")

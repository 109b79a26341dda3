"""bench.py on CPU: one row per script, FLOPs that match the analytic count, the GPU peak table, and the
plumbing of --gpu-check (stages, budgets, the report's files) with an injected runner in place of the GPU."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from tests.helpers import (ROOT, SCRIPTS, load_script, markov_tokens, read_log,
                           without_file_permission_bypass)

bench = load_script(ROOT / "bench.py")


def test_tiny_preset_table_on_cpu(capsys, tmp_path):
    rows = bench.main(["--preset", "tiny", "--steps", "2", "--scripts", str(ROOT / "train_gpt2.py"), "--json",
                       "--log_dir", str(tmp_path)])
    (row,) = rows
    assert json.loads(capsys.readouterr().out.strip()) == row  # stdout holds only the JSON
    (log,) = tmp_path.glob("train_gpt2_*.txt")  # --log_dir keeps the run log
    assert bench.leaderboard.parse_log(log).summary["steps"] == 2
    train, val, summary = read_log(log)
    assert val == {} and summary["final_val_loss"] is None and summary["val_tokens"] == 0  # never validates
    last_step_ms = bench.leaderboard.parse_log(log).train_points[-1][2]  # the time at the last step's end
    assert row["ms_per_step"] == pytest.approx(1000 * summary["train_time_s"] / 2) and len(train) == 2
    assert 1000 * summary["train_time_s"] >= last_step_ms - 1 > 0  # the clock stops at the end (log: whole ms)
    L, C, W, V = 2, 64, 512, 50304  # the tiny preset; its last long window is 4 blocks of 128 tokens
    blocks = L * 12 * C * C
    gates = 2 * 2 * 12 + 2 * 2 * 12 + 12  # attention and value-embedding gates (2 heads x 12 inputs), smear's
    scalars = 2 * 2 + 2 * 3 + 1  # attention lambdas, block lambdas (resid, x0, bigram), smear's lambda
    # embedding tables, looked up, not multiplied: the token embedding, 2 value embeddings (one per attention
    # layer) and the 251,520-row bigram table
    tables = 3 * V * C + 251_520 * C
    assert row["params_m"] * 1e6 == tables + V * C + blocks + gates + scalars
    assert row["active_params_m"] * 1e6 == V * C + blocks + gates + scalars
    # 6 FLOPs per multiply-add weight per token (forward + backward), plus QK^T and AV over a row of the
    # window
    assert row["gflops_per_token"] * 1e9 == pytest.approx(6 * (blocks + V * C + gates) + 12 * L * C * W)
    assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and row["mfu"] is None  # no peak for a CPU
    assert row["batch_tokens"] == 512 and row["compile_s"] is None


def test_peak_table_prefers_the_specific_name():
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert bench.peak_tflops("cpu (x86_64)") is None


def test_table_format():
    row = dict(script="train_gpt2.py", params_m=162.2, active_params_m=123.6, tokens_per_s=1.5e6,
               ms_per_step=350.0, gflops_per_token=0.855, mfu=0.41, peak_mem_gb=20.5, compile_s=61.0)
    table = bench.format_table([row])
    assert "| train_gpt2.py | 162.2M / 123.6M | 1,500,000 | 350.0 | 0.855 | 41.0% | 20.50 GB | 61 s |" \
        in table


def test_race_writes_a_checkable_proxy_record(shards, tmp_path):
    scripts = [str(ROOT / "train_gpt2.py")]
    small = ["vocab_size=256", "n_layer=2", "n_head=2", "n_embd=64", "batch_tokens=256",
             "device_batch_tokens=256", "window_blocks=1"]
    bench.main(["--race", "--minutes", "0.05", "--preset", "tiny", "--scripts", *scripts, "--train_files",
                shards[0], "--val_files", shards[1], "--val_every", "5", "--val_tokens", "2048", "--name",
                "Smoke", "--records", str(tmp_path), "--set", *small])
    (folder,) = (tmp_path / "proxy").iterdir()
    assert folder.name.endswith("_Smoke")
    (log,) = folder.glob("*.txt")
    summary = bench.leaderboard.parse_log(log).summary
    assert 3.0 <= summary["train_time_s"] < 10.0 and summary["steps"] > 1  # 0.05 minutes and the last step
    readme = (folder / "README.md").read_text()
    assert "| train_gpt2.py |" in readme and "never a FineWeb result" in readme
    assert bench.leaderboard.check_record(folder, "proxy") == []
    assert "_Smoke" in (tmp_path / "README.md").read_text()  # the records table was refreshed
    with pytest.raises(SystemExit, match="never overwritten"):
        bench.race([], [], 0.01, folder.name.split("_", 1)[1], tmp_path, "")


# ---- --gpu-check: the plumbing, on CPU ----

TINY = ["--preset=tiny", "--vocab_size=256", "--n_layer=2", "--n_head=2", "--n_embd=64", "--window_blocks=1",
        "--batch_tokens=256", "--device_batch_tokens=256", "--compile=0"]  # later flags win over the stage's


def make_proxy(directory, n_val=4096):
    """The race's proxy layout (enwiki_train_*, owt_val_*), as small learnable synthetic shards: 40 train
    shards of 1,000 tokens, since with no <|endoftext|> in 256 ids a shard is one document, so one row."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = markov_tokens(40_000 + n_val)
    bench.fineweb.write_shard(str(directory / "owt_val_000000.bin"), tokens[:n_val])
    for i, part in enumerate(np.array_split(tokens[n_val:], 40), 1):
        bench.fineweb.write_shard(str(directory / f"enwiki_train_{i:06d}.bin"), part)
    return directory


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_sdpa_backend[train_gpt2.py]" time="1.5"><properties>
<property name="flash only" value="runs"/>
<property name="default backend" value="flash"/></properties></testcase>
<testcase classname="tests.test_gpu" name="test_xxt_kernel[48x768x768]" time="2.0">
<failure message="AssertionError: value: relative error 0.5 &gt; 0.01">trace</failure></testcase>
<testcase classname="tests.test_gpu" name="test_fp16_trains_with_grad_scaler[kernels1]" time="0.0">
<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>"""


class FakeRunner:
    """Stands in for run_logged: leaves behind what each kind of command would (pytest's xml, bench's JSON
    row) and advances a fake clock by `seconds` per command; race commands run for real (tiny, on CPU) when
    real_race."""

    def __init__(self, seconds=10.0, real_race=False):
        self.seconds, self.real_race, self.now, self.calls = seconds, real_race, 0.0, []

    def clock(self):
        return self.now

    def __call__(self, cmd, log_path, timeout_s, env):
        cmd = [str(c) for c in cmd]
        self.calls.append(dict(cmd=cmd, timeout_s=timeout_s, env=env))
        if cmd[1:3] == ["-m", "pytest"]:
            junit = next(c for c in cmd if c.startswith("--junitxml=")).split("=", 1)[1]
            open(junit, "w").write(JUNIT)
            log_path.write_text("tests/test_gpu.py::test_sdpa_backend[train_gpt2.py] PASSED\n")
        elif cmd[1].endswith("bench.py"):
            script = cmd[cmd.index("--scripts") + 1].rsplit("/", 1)[-1]
            faster = 1.1 if "kernels=1" in cmd else 1.0
            row = dict(script=script, params_m=162.2, active_params_m=123.6, tokens_per_s=1e6 * faster,
                       ms_per_step=524.3 / faster, gflops_per_token=0.855, mfu=0.4 * faster,
                       peak_mem_gb=20.0 / faster, compile_s=50.0, device="NVIDIA H100 80GB HBM3",
                       world_size=1, batch_tokens=524288, micro_batch=16384)
            log_path.write_text("step:1/10 train_loss:10.8 ...\n" + json.dumps(row) + "\n")
        elif self.real_race:
            return bench.run_logged(cmd, log_path, timeout_s, env)
        self.now += self.seconds
        return 0, self.seconds, False


def test_gpu_check_writes_every_stage_into_one_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BENCH_RUN_S", 75.0)  # tiny runs: every planned command fits one stage
    monkeypatch.setattr(bench, "RACE_OVERHEAD_S", 100.0)
    out, runner = tmp_path / "out", FakeRunner(real_race=True)
    o = bench.CheckOptions(scripts=[ROOT / "train_gpt2.py", ROOT / "train_gpt2_mla.py"], flags=TINY,
                           minutes=0.05, val_every=5, val_tokens=2048,
                           proxy_dir=make_proxy(tmp_path / "proxy"))
    results = bench.gpu_check("all", out, o, runner=runner, clock=runner.clock)
    files = {p.name for p in out.iterdir()}
    assert {p for p in files if not p.startswith("race_plot")} == {
        "environment.txt", *(f"{s}{ext}" for s in bench.STAGES for ext in (".json", ".md", "_logs.tar.gz"))}
    assert all(p.is_file() for p in out.iterdir())  # the raw logs are packed: a stage leaves at most 5 files
    assert "torch " + torch.__version__ in (out / "environment.txt").read_text()

    tests = json.loads((out / "tests.json").read_text())
    assert tests == json.loads(json.dumps(results["tests"]))
    assert tests["counts"] == dict(passed=1, failed=1, error=0, skipped=1)
    assert tests["tests"][0]["figures"] == {"flash only": "runs", "default backend": "flash"}
    assert tests["problems"][:2] == ["test test_xxt_kernel[48x768x768] failed",
                                     "1 test(s) skipped on the GPU machine"]
    md = (out / "tests.md").read_text()
    row = "| test_sdpa_backend[train_gpt2.py] | passed | 1.5 | flash only = runs; default backend = flash |"
    assert row in md
    assert "relative error 0.5 > 0.01" in md
    pytest_call = runner.calls[0]
    assert pytest_call["cmd"][3:7] == ["-m", "gpu", "tests", "-v"] and \
        pytest_call["env"]["TRITON_INTERPRET"] == "0"
    with tarfile.open(out / "tests_logs.tar.gz") as tar:
        assert {"tests_logs/junit.xml", "tests_logs/pytest.txt"} <= set(tar.getnames())

    bench_result = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in bench_result["runs"]] == [
        "train_gpt2.py --kernels=0", "train_gpt2_mla.py --kernels=0",
        "train_gpt2.py --kernels=1", "train_gpt2_mla.py --kernels=1"]  # the plain table first
    assert all(r["status"] == "ok" and r["row"]["tokens_per_s"] > 0 for r in bench_result["runs"])
    assert bench_result["problems"] == [] and "= 300 s <= 530 s" in bench_result["plan"]
    md = (out / "bench.md").read_text()
    assert "| train_gpt2_mla.py --kernels=1 | 162.2M / 123.6M | 1,100,000 |" in md
    assert "- train_gpt2.py: tokens/s x1.100, peak memory 20.00 -> 18.18 GB" in md
    bench_cmd = runner.calls[1]["cmd"]
    assert bench_cmd[bench_cmd.index("--set") + 1:][:2] == ["compile=1", "kernels=0"]

    race = json.loads((out / "race.json").read_text())
    assert race["minutes"] == 0.05
    assert race["problems"] == [] and all(r["status"] == "ok" for r in race["runs"])
    assert all(r["summary"]["steps"] > 1 and r["summary"]["final_val_loss"] < 5.5 for r in race["runs"])
    md = (out / "race.md").read_text()
    assert "| train_gpt2.py |" in md and "| train_gpt2_mla.py |" in md and "never a FineWeb result" in md
    with tarfile.open(out / "race_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "race_logs/train_gpt2.console.txt" in names
    assert any(n.startswith("race_logs/train_gpt2_mla/train_gpt2_mla_") and n.endswith(".txt") for n in names)
    with pytest.raises(SystemExit, match="never overwritten"):  # a second run into the same folder
        bench.gpu_check("bench", out, o, runner=runner, clock=runner.clock)


def test_a_stage_runs_only_what_fits_its_budget(tmp_path, monkeypatch):
    """Each command gets what is left of the budget as its time limit; one that no longer fits is skipped, so
    the stage ends inside its budget whatever the machine's speed."""
    monkeypatch.setattr(bench, "BENCH_RUN_S", 75.0)
    runner = FakeRunner(seconds=100.0)
    o = bench.CheckOptions(scripts=SCRIPTS[:3], budget_s=250.0)
    result = bench.gpu_check("bench", tmp_path, o, runner=runner, clock=runner.clock)["bench"]
    statuses = [r["status"] for r in result["runs"]]
    assert statuses[:2] == ["ok", "ok"] and all(s.startswith("skipped: 20 s left") for s in statuses[2:])
    assert [c["timeout_s"] for c in runner.calls] == [250 - bench.STOP_GRACE_S, 150 - bench.STOP_GRACE_S]
    assert result["wall_s"] == 200.0 <= o.budget_s and len(result["problems"]) == len(statuses) - 2
    assert "Not measured:" in (tmp_path / "bench.md").read_text()


def test_time_budget_arithmetic():
    # A stage's commands share its budget less the grace a stopped command gets: 560 s - 30 s = 530 s, so the
    # whole command stays inside 10 minutes with 40 s to pack the logs.
    usable = bench.STAGE_BUDGET_S - bench.STOP_GRACE_S
    assert (usable, bench.STAGE_BUDGET_S) == (530, 560) and bench.STAGE_BUDGET_S <= 600 - 40
    # race at 124M (measured on an H100: 363 s compile warm-up, 81 s first validation): one script per command
    assert bench.race_minutes(1) == 1.0 and 60 + bench.RACE_OVERHEAD_S <= usable
    assert bench.race_minutes(1, budget_s=600) == 1.5  # quarter minutes, rounded down: 100 s
    with pytest.raises(SystemExit, match="one script per command"):
        bench.race_minutes(2)
    # bench: one script, --kernels=0, fits; the --kernels=1 run of the same script does not
    assert bench.BENCH_RUN_S <= usable < 2 * bench.BENCH_RUN_S
    _, note, _ = bench.plan_bench(ROOT, bench.CheckOptions(scripts=SCRIPTS[:1] * 4))
    assert note.endswith("= 3120 s > 530 s: the last runs will be skipped; split them with --scripts")
    # quick: its phases get its budget less the grace and the packing; the command stays inside 10 minutes
    assert bench.QUICK_BUDGET_S - bench.STOP_GRACE_S - bench.QUICK_PACK_S == 500
    assert bench.QUICK_BUDGET_S <= 600 - 60


def test_race_without_proxy_shards_gives_the_recipe(tmp_path, capsys):
    o = bench.CheckOptions(scripts=SCRIPTS, proxy_dir=tmp_path / "proxy")
    with pytest.raises(SystemExit) as e:
        bench.gpu_check("all", tmp_path / "out", o, runner=FakeRunner())
    message = str(e.value)
    assert "enwiki_train_*.bin and owt_val_*.bin; found 0 and 0" in message and "every clone" in message
    assert "--prefix enwiki" in message and "--max-tokens 20000000" in message and "--prefix owt" in message
    assert not (tmp_path / "out").exists()  # nothing ran: the error comes before any GPU time
    # every flag of the recipe is one data/fineweb.py takes
    with pytest.raises(SystemExit):
        bench.fineweb.main(["--help"])
    usage = capsys.readouterr().out
    for flag in {w for w in bench.PROXY_RECIPE.split() if w.startswith("--")}:
        assert flag in usage, flag
    make_proxy(tmp_path / "small", n_val=1000)  # a val set smaller than --val_tokens
    with pytest.raises(SystemExit, match="holds 1,000 tokens, fewer than --val_tokens=1048576"):
        bench.proxy_shards(tmp_path / "small")


@pytest.mark.parametrize("stage", ["quick", "tests"])
def test_gpu_check_without_cuda_is_one_clear_error(monkeypatch, tmp_path, stage):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--gpu-check", stage, "--out", str(tmp_path / "out")])
    assert str(e.value).startswith("error: --gpu-check needs a CUDA GPU") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_run_logged_stops_a_command_at_its_time_limit(tmp_path):
    hello = [sys.executable, "-c", "print('hello')"]
    rc, seconds, timed_out = bench.run_logged(hello, tmp_path / "a.txt", 60)
    assert (rc, timed_out) == (0, False) and (tmp_path / "a.txt").read_text().endswith("hello\n")
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    rc, seconds, timed_out = bench.run_logged(sleeper, tmp_path / "b.txt", 3, grace_s=5)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 20  # SIGINT ended it, well before its minute
    assert (tmp_path / "b.txt").read_text().startswith("$ ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the GPU tests run rather than skip")
def test_gpu_tests_are_collected_and_skip_on_cpu(tmp_path):
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                                "tests/test_gpu.py", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "PytestUnknownMarkWarning" not in collected.stdout + collected.stderr  # pytest.ini registers `gpu`
    names = [line for line in collected.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]
    for kind in ("softcap_cross_entropy_kernel", "linear_softcap_cross_entropy_kernel", "xxt_kernel",
                 "fused_linear_cross_entropy_memory", "optimizers_take_the_cpus_steps", "fp16", "compile_warmup"):
        assert any(kind in name for name in names), kind
    assert sum("sdpa_backend" in name for name in names) == len(SCRIPTS)  # every script's attention
    # The tests stage's own pytest command, for real: on CPU every test is a skip, not an error, and the
    # report is read from pytest's xml.
    o = bench.CheckOptions(scripts=SCRIPTS)
    tests = bench.gpu_check("tests", tmp_path, o, runner=bench.run_logged)["tests"]
    assert tests["commands"][0]["status"] == "ok", (tmp_path / "tests.md").read_text()
    grouped = "test_grouped_gemm_path_on_the_gpu_matches_the_dense_path"
    ideas = [t["name"] for t in tests["tests"] if t["name"] == grouped]
    assert ideas, "the stage runs the ideas' own CUDA tests too (tests/test_moe.py)"
    n = tests["counts"]["skipped"]
    assert tests["counts"] == dict(passed=0, failed=0, error=0, skipped=n) and n == len(names) + len(ideas)
    assert tests["problems"] == [f"{n} test(s) skipped on the GPU machine"]
    assert "needs a CUDA GPU" in tests["tests"][0]["message"]


# ---- bad input: one error naming the flag the user typed, before anything runs or is written ----
TINY_SET = ["--set", *(f.removeprefix("--") for f in TINY)]  # bench.py --set takes NAME=VALUE


def bench_error(*flags):
    """The one `error:` line of `python bench.py FLAGS` (run as a user would, from the repo root): it fails,
    without a traceback."""
    cmd = without_file_permission_bypass([sys.executable, "bench.py", *map(str, flags)])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    return errors[0]


@pytest.mark.parametrize("flags, error", [
    (["--steps", "0"], "--steps=0: expected an integer >= 1"),
    (["--steps", "-3"], "--steps=-3: expected an integer >= 1"),
    (["--batch_tokens", "0"], "--batch_tokens=0: expected an integer >= 1"),
    (["--device_batch_tokens", "0"], "--device_batch_tokens=0: expected an integer >= 1, or auto"),
    (["--device_batch_tokens", "many"], "--device_batch_tokens=many: expected an integer >= 1, or auto"),
    (["--minutes", "0"], "--minutes=0.0: expected a number of minutes > 0"),
    (["--minutes", "nan"], "--minutes=nan: expected a number of minutes > 0"),
    (["--minutes", "inf"], "--minutes=inf: expected a number of minutes > 0"),
    (["--val_every", "-1"], r"--val_every=-1: expected an integer >= 0 \(0: only at the end\)"),
    (["--val_tokens", "-1"], r"--val_tokens=-1: expected an integer >= 0 \(0: no validation\)"),
    (["--budget_s", "-5"], "--budget_s=-5.0: expected a number of seconds > 0"),
    (["--budget_s", "nan"], "--budget_s=nan: expected a number of seconds > 0"),
    (["--race", "--train_files", "x"], "--race needs --train_files and --val_files"),
    (["--race", "--train_files", "x", "--val_files", "y", "--name", "a/b"], "--name=a/b: expected letters"),
    (["--race", "--train_files", "x", "--val_files", "y", "--name", ""], "--name=: expected letters")])
def test_every_number_of_bench_is_checked_by_its_own_name(flags, error, tmp_path):
    with pytest.raises(SystemExit, match=f"^error: {error}"):
        bench.main(["--scripts", str(ROOT / "train_gpt2.py"), "--records", str(tmp_path / "records"), *flags])
    assert not (tmp_path / "records").exists()


def test_steps_and_minutes_are_named_as_typed_not_as_the_train_script_calls_them(tmp_path):
    # bench passes them on as --num_iterations and --time_budget_s: the user typed --steps and --minutes
    assert bench_error("--preset", "tiny", "--steps", "0") == "error: --steps=0: expected an integer >= 1"
    records = tmp_path / "records"
    assert bench_error("--race", "--minutes", "-1", "--train_files", "x", "--val_files", "y", "--records",
                       records) == "error: --minutes=-1.0: expected a number of minutes > 0"
    assert not records.exists()


def test_scripts_must_be_train_scripts(tmp_path):
    marker, tool = tmp_path / "ran", tmp_path / "tool.py"
    tool.write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert bench_error("--scripts", ROOT / "train_gpt2.py", tool) == \
        f"error: --scripts={tool}: not a train script: it defines no Hyperparameters, GPTConfig, GPT, " \
        "parse_args, main (a train_gpt2*.py defines Hyperparameters, GPTConfig, GPT, parse_args, main)"
    assert not marker.exists()  # it was never executed
    os.symlink(tmp_path / "gone.py", tmp_path / "dangling.py")
    for script, problem in [(tmp_path / "missing.py", "no such file"), (tmp_path, "is a folder, not a file"),
                            ("", "is empty: give a file"),
                            (ROOT / "README.md", r"is not a Python file \(\.py\)"),
                            (tmp_path / "dangling.py", r"is a dangling symlink \(to .*gone\.py\)")]:
        with pytest.raises(SystemExit, match=rf"^error: --scripts={script}: {problem}$"):
            bench.main(["--scripts", str(script)])
    with pytest.raises(SystemExit, match=r"^error: --race_script=.*README.md: is not a Python file"):
        bench.main(["--gpu-check", "quick", "--race_script", str(ROOT / "README.md")])


def test_output_folders_must_be_writable_folders(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for flag in ("--log_dir", "--records", "--out"):
        for folder, problem in [(a_file, "is a file, not a folder"), ("", "is empty: give a folder"),
                                (a_file / "sub", f"cannot be made: {a_file} is a file, not a folder")]:
            with pytest.raises(SystemExit, match=rf"^error: {flag}={folder}: {problem}$"):
                bench.main(["--race", "--train_files", "x", "--val_files", "y", flag, str(folder)])
    with pytest.raises(SystemExit, match=r"^error: --log_dir=/proc/x: cannot be made in /proc \(.*\)$"):
        bench.main(["--log_dir", "/proc/x"])  # /proc takes no folders, whatever its modes say
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert bench_error("--log_dir", locked / "logs") == \
        f"error: --log_dir={locked / 'logs'}: cannot be made in {locked} (Permission denied)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"] and not any(locked.iterdir())


def test_a_race_that_fails_leaves_no_folder_behind(shards, tmp_path):
    records = tmp_path / "records"
    race = ["--race", "--minutes", "0.05", "--scripts", str(ROOT / "train_gpt2.py"), "--val_tokens", "2048",
            "--records", str(records), *TINY_SET]
    with pytest.raises(SystemExit, match=r"^error: no files match --train_files=.*nothing_\*\.bin"):
        bench.main([*race, "--train_files", str(tmp_path / "nothing_*.bin"), "--val_files", shards[1]])
    with pytest.raises(SystemExit, match=r"^error: --n_layer=0: expected an integer >= 1"):
        bench.main([*race, "n_layer=0", "--train_files", shards[0], "--val_files", shards[1]])  # a --set
    assert not records.exists()  # both checked before the record folder is made
    short = tmp_path / "short_val_000000.bin"  # fewer tokens than --val_tokens: the train script's own check
    bench.fineweb.write_shard(str(short), markov_tokens(1000))
    too_few = r"^error: the validation shards .*short_val.* fewer than --val_tokens=2048"
    with pytest.raises(SystemExit, match=too_few):
        bench.main([*race, "--train_files", shards[0], "--val_files", str(short)])
    assert not records.exists()  # the train script ran in it, so it was made; then removed: no blocked retry


def test_sigterm_outside_a_training_loop_removes_the_shards(tmp_path, monkeypatch):
    made = []

    def write_then_get_killed(directory, *args, **kwargs):
        made.append(directory)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once, in this frame
    monkeypatch.setattr(bench, "write_synthetic_shards", write_then_get_killed)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as e:
        bench.main(["--preset", "tiny", "--steps", "2", "--scripts", str(ROOT / "train_gpt2.py")])
    assert e.value.args == (signal.SIGTERM,) and made and not made[0].parent.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # bench's handler is gone with it


def stop_bench_at_step_1(flags, sig, tmp_path):
    """Run bench.py FLAGS, send `sig` once a train script logs step 1 (on stdout in a race, on stderr in the
    table); returns (exit code, stderr after the signal)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "bench.py", *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stream = proc.stdout if "--race" in flags else proc.stderr
    try:
        for line in stream:
            if line.startswith("step:1/"):
                break
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, (out if "--race" in flags else "") + err


def test_sigterm_during_a_race_exits_143_and_removes_its_folder(shards, tmp_path):
    records = tmp_path / "records"
    rc, after = stop_bench_at_step_1(
        ["--race", "--minutes", "5", "--scripts", str(ROOT / "train_gpt2.py"), "--train_files", shards[0],
         "--val_files", shards[1], "--val_tokens", "2048", "--records", str(records), *TINY_SET],
        signal.SIGTERM, tmp_path)
    assert rc == 143 and "Traceback" not in after and after.splitlines()[-1] == "interrupted (SIGTERM)", after
    assert "interrupted (SIGTERM) at step" in after  # the train script's own line, and its summary
    assert not records.exists()


def test_ctrl_c_during_the_table_exits_130_and_removes_the_shards(tmp_path):
    table = ["--steps", "100000", "--scripts", str(ROOT / "train_gpt2.py"), *TINY_SET]
    rc, after = stop_bench_at_step_1(table, signal.SIGINT, tmp_path)
    assert rc == 130 and "Traceback" not in after and after.splitlines()[-1] == "interrupted (SIGINT)", after
    assert not list((tmp_path / "tmp").glob("bench_*"))  # the shards' temporary folder is gone

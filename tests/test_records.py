"""records/leaderboard.py: a real log verifies, every kind of tampering is caught, the track rules hold, the t-test
matches hand-computed p-values, speed-ups compare runs on the same device only, and the README is regenerated
deterministically."""
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from tests.helpers import ROOT, load_script, small_args, without_file_permission_bypass

spec = importlib.util.spec_from_file_location("leaderboard", ROOT / "records" / "leaderboard.py")
lb = importlib.util.module_from_spec(spec)
sys.modules["leaderboard"] = lb
spec.loader.exec_module(lb)

TARGET = 5.0  # the synthetic run starts at ln(256) = 5.55 and is at ~4.0 by step 4: reached at the 2nd validation


@pytest.fixture(scope="module")
def real_log(shards, tmp_path_factory):
    """A real baseline log: 8 steps, validation at 0, 4 and 8, the target reached at step 4."""
    log_dir = tmp_path_factory.mktemp("real_log")
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, log_dir, num_iterations=8, val_every=4, target_val_loss=TARGET))
    assert summary["reached"] and summary["time_to_target_s"] > 0, summary  # the tests below rely on it
    return log_dir / f"{summary['run_id']}.txt"


def make_record(root, track, name, logs, readme="# test record\n"):
    """records/<track>/<name>/ with a README and copies of the given logs (paths or (file name, text) pairs)."""
    folder = root / track / name
    folder.mkdir(parents=True)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    for log in logs:
        if isinstance(log, tuple):
            (folder / log[0]).write_text(log[1], encoding="utf-8", newline="")
        else:
            shutil.copy(log, folder / log.name)
    return folder


def make_log(code="print('a speedrun')\n", script="train_gpt2.py", target=3.3821, val_tokens=1048576,
             device="NVIDIA H100 80GB HBM3", world_size=1, batch_tokens=524288, seed=0, run_id="run_a",
             val=((0, 10.8258, 0), (1000, 3.5000, 1_800_000), (2000, 3.3800, 3_600_000)),
             val_files="data/fineweb10B/fineweb_val_*.bin", comments=()):
    """A consistent log in train_gpt2.py's exact format (RunLog, main) with chosen numbers: what a GPU run on
    FineWeb would write. The val losses have 4 decimals, so the summary's floats print the same."""
    sha = hashlib.sha256(code.encode()).hexdigest()
    hyper = dict(preset="bottlecap", train_files="data/fineweb10B/fineweb_train_*.bin", val_files=val_files,
                 num_iterations=val[-1][0], batch_tokens=batch_tokens, val_tokens=val_tokens, target_val_loss=target,
                 seed=seed, log_dir="logs")
    cuda = "None" if device.startswith("cpu") else "12.8"
    lines = [f"# run {run_id}: {script} --preset=bottlecap",
             f"==== source {script} sha256={sha} chars={len(code)} ====\n{code}",
             "==== environment ====", f"python 3.11.7  torch 2.13.0  cuda {cuda}",
             f"device {device}  world_size {world_size}  platform Linux", "triton 3.9.0",
             "==== hyperparameters ====", json.dumps(hyper), "==== training ====", f"# {device} x{world_size}",
             *comments]
    n = val[-1][0]
    for step, loss, ms in val:
        if step:
            lines.append(f"step:{step}/{n} train_loss:{loss + 0.1:.4f} train_time:{ms}ms step_avg:1.0ms tok/s:1k "
                         "eta:0m00s")
        lines.append(f"step:{step}/{n} val_loss:{loss:.4f} train_time:{ms}ms")
    first = next((p for p in val if p[1] <= target), None)
    summary = dict(script=script, script_sha256=sha, target_val_loss=target, val_tokens=val_tokens,
                   best_val_loss=min(p[1] for p in val), final_val_loss=val[-1][1], reached=first is not None,
                   time_to_target_s=first[2] / 1000 if first else None, train_time_s=val[-1][2] / 1000,
                   tokens_seen=n * batch_tokens, steps=n, peak_mem_gb=20.0, device=device, world_size=world_size,
                   run_id=run_id, compile_warmup_s=30.0, val_time_s=10.0, stopped=None, last_checkpoint=None)
    lines.append(json.dumps({"summary": summary}))
    return "\n".join(lines) + "\n"


def edit_summary(text, **changes):
    head, last = text.rstrip("\n").rsplit("\n", 1)
    summary = json.loads(last)["summary"]
    summary.update(changes)
    return head + "\n" + json.dumps({"summary": summary}) + "\n"


def run_cli(*args, root):
    return subprocess.run([sys.executable, str(ROOT / "records" / "leaderboard.py"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


# ---- a real log ----
def test_a_real_log_parses_and_verifies(real_log, tmp_path):
    log = lb.parse_log(real_log)
    assert log.parse_errors == [] and log.errors == []
    assert list(log.sources)[0] == "train_gpt2.py"
    assert log.sources["train_gpt2.py"] == (ROOT / "train_gpt2.py").read_text(encoding="utf-8")
    assert all(rel.startswith("kernels/") for rel in list(log.sources)[1:])
    assert [p[0] for p in log.val_points] == [0, 4, 8] and [p[0] for p in log.train_points] == list(range(1, 9))
    assert log.hyperparameters["target_val_loss"] == TARGET and "cpu" in log.environment
    assert log.summary["steps"] == 8
    assert lb.check_log(real_log) == [] and lb.check_log(real_log, "proxy") == []
    folder = make_record(tmp_path / "records", "proxy", "2025-01-01_Baseline", [real_log])
    assert lb.check_record(folder) == []
    (row,) = lb.record_rows(folder)  # the claim: time, loss and tokens at the first val line <= target (step 4)
    assert row.ranked and row.tokens == 4 * 256 and row.device == log.summary["device"]
    assert row.time_s == log.summary["time_to_target_s"] and row.val_loss == log.val_points[1][1]


def test_cli_check_passes_a_valid_tree_and_fails_a_tampered_log(real_log, tmp_path):
    root = tmp_path / "records"
    make_record(root, "proxy", "2025-01-01_Baseline", [real_log])
    ok = run_cli("check", root=root)
    assert ok.returncode == 0 and "ok   " in ok.stdout and "1 ok, 0 failing" in ok.stdout, ok.stdout + ok.stderr
    text = real_log.read_text(encoding="utf-8")
    tampered = text.replace("\nstep:8/8 val_loss:", "\nstep:8/8 val_loss:1")  # 3.0 -> 13.0
    make_record(root, "proxy", "2025-01-02_Tampered", [(real_log.name, tampered)])
    bad = run_cli("check", root=root)
    assert bad.returncode == 1, bad.stdout
    assert "FAIL" in bad.stdout and "2025-01-02_Tampered" in bad.stdout and "1 ok, 1 failing" in bad.stdout
    assert "edited val loss" in bad.stdout  # it says what fails and why
    single = run_cli("check", str(root / "proxy" / "2025-01-01_Baseline" / real_log.name), root=root)
    assert single.returncode == 0, single.stdout


# ---- tampering ----
def _set_val_loss(text, step, value):
    line = next(line for line in text.splitlines() if line.startswith(f"step:{step}/8 val_loss:"))
    return text.replace(line, re.sub(r"val_loss:\S+", f"val_loss:{value:.4f}", line))


TAMPERING = {
    # name: (edit of the log text, what check must say)
    "final val loss edited in its step line": (lambda t: _set_val_loss(t, 8, 2.5), "final_val_loss"),
    "earlier val loss edited below the target": (lambda t: _set_val_loss(t, 0, TARGET - 0.5), "already had val_loss"),
    "code edited, same length": (
        lambda t: t.replace("import torch\n", "import tarch\n", 1), "hashes to"),
    "code edited, other length": (
        lambda t: t.replace("import torch\n", "import torch  # faster\n", 1), "edited code"),
    "code and its header hash edited": (
        lambda t: _rehash_script(t.replace("import torch\n", "import tarch\n", 1)), "script_sha256"),
    "time to target edited": (
        lambda t: edit_summary(t, time_to_target_s=json.loads(t.rstrip().rsplit("\n", 1)[1])["summary"]
                               ["time_to_target_s"] - 0.01), "no val line at that train_time"),
    "summary claims a target never reached": (
        lambda t: edit_summary(t, target_val_loss=1.0), "never reached the target"),
    "val_tokens edited in the summary": (
        lambda t: edit_summary(t, val_tokens=4096), "val_tokens: the hyperparameters say 2048"),
    "summary missing (the run did not finish)": (
        lambda t: t.rstrip("\n").rsplit("\n", 1)[0] + "\n", "did not finish"),
    "tokens edited": (
        lambda t: edit_summary(t, tokens_seen=10**9), "tokens_seen"),
    "a summary value of the wrong type": (lambda t: edit_summary(t, final_val_loss="low"), "malformed value"),
    "device edited in the summary": (
        lambda t: edit_summary(t, device="NVIDIA H100 80GB HBM3"), "the environment says device"),
    "target's val line and time to target both moved earlier": (lambda t: _move_target_earlier(t), "out of order"),
}


def _move_target_earlier(text):
    """Claim the target two steps early: the step-4 val line's train_time and the summary's time_to_target_s
    both set to just before step 2's train line, consistently; only the order of the lines gives it away."""
    line = next(line for line in text.splitlines() if line.startswith("step:4/8 val_loss:"))
    step2 = next(line for line in text.splitlines() if line.startswith("step:2/8 train_loss:"))
    ms = max(int(re.search(r"train_time:(\d+)ms", step2)[1]) - 1, 0)
    text = text.replace(line, re.sub(r"train_time:\d+ms", f"train_time:{ms}ms", line))
    return edit_summary(text, time_to_target_s=ms / 1000)


def _rehash_script(text):
    """Make the source header agree with edited code (the summary still has the original hash)."""
    header, rest = text.split("\n", 2)[1], text.split("\n", 2)[2]
    chars = int(header.rsplit("chars=", 1)[1].split()[0])
    new = hashlib.sha256(rest[:chars].encode()).hexdigest()
    return text.replace(header, header.split("sha256=")[0] + f"sha256={new} chars={chars} ====", 1)


@pytest.mark.parametrize("name", TAMPERING)
def test_tampering_is_detected(real_log, tmp_path, name):
    edit, message = TAMPERING[name]
    text = real_log.read_text(encoding="utf-8")
    edited = edit(text)
    assert edited != text
    path = tmp_path / real_log.name
    path.write_text(edited, encoding="utf-8", newline="")
    problems = lb.check_log(path, "proxy")
    assert problems and any(message in p for p in problems), problems


# ---- track rules, on constructed GPU logs ----
def test_a_constructed_gpu_log_passes_the_fineweb_tracks(tmp_path):
    root = tmp_path / "records"
    folder = make_record(root, "bottlecap_1gpu", "2025-01-01_Baseline", [("run_a.txt", make_log())])
    assert lb.check_record(folder) == []
    (row,) = lb.record_rows(folder)
    assert (row.time_s, row.val_loss, row.tokens) == (3600.0, 3.38, 2000 * 524288)
    modded = make_record(root, "modded", "2025-01-01_Eight", [(
        "run_a.txt", make_log(target=3.28, val_tokens=10485760, world_size=8,
                              val=((0, 10.8, 0), (500, 3.2799, 180_000))))])
    assert lb.check_record(modded) == []  # any number of GPUs


@pytest.mark.parametrize("track, log, message", [
    ("bottlecap_1gpu", dict(val_tokens=10485760), "val_tokens is 10485760"),
    ("bottlecap_1gpu", dict(target=3.5), "target_val_loss is 3.5"),
    ("bottlecap_1gpu", dict(device="cpu (x86_64)"), "needs a CUDA GPU"),
    ("modded", dict(device="cpu (x86_64)", target=3.28, val_tokens=10485760), "needs a CUDA GPU"),
    ("bottlecap_1gpu", dict(world_size=2), "allows 1"),
    ("bottlecap_1gpu", dict(val=((0, 10.8, 0), (1000, 3.4000, 100_000))), "never reached the target"),
    ("bottlecap_1gpu", dict(val_files="data/proxy/owt_val_*.bin"), "fineweb_val"),
    ("modded", dict(), "target_val_loss is 3.3821, the modded track's is 3.28"),
    ("bottlecap_1gpu", dict(comments=["# resumed from logs/x/ckpt_step000500.pt at step 500"]), "a resumed run"),
    ("nonsense", dict(), "unknown track"),
])
def test_track_rules(tmp_path, track, log, message):
    folder = make_record(tmp_path / "records", track, "2025-01-01_Run", [("run_a.txt", make_log(**log))])
    problems = lb.check_record(folder)
    assert any(message in p for p in problems), problems


def test_a_real_cpu_log_is_no_fineweb_record(real_log, tmp_path):
    folder = make_record(tmp_path / "records", "bottlecap_1gpu", "2025-01-01_Cpu", [real_log])
    problems = "\n".join(lb.check_record(folder))
    for message in ("needs a CUDA GPU", "val_tokens is 2048", f"target_val_loss is {TARGET}", "fineweb_val"):
        assert message in problems


def test_record_folder_rules(tmp_path):
    root = tmp_path / "records"
    assert any("no README.md" in p for p in lb.check_record(
        make_record(root, "proxy", "2025-01-01_NoReadme", [("a.txt", make_log())], readme=None)))
    assert any("not <YYYY-MM-DD>_<ShortName>" in p for p in lb.check_record(
        make_record(root, "proxy", "my_run", [("a.txt", make_log())])))
    assert any("no run log" in p for p in lb.check_record(make_record(root, "proxy", "2025-01-01_Empty", [])))
    two_codes = make_record(root, "bottlecap_1gpu", "2025-01-01_Mixed",
                            [("a.txt", make_log()), ("b.txt", make_log(code="print('other')\n", run_id="b"))])
    assert any("different codes" in p for p in lb.check_record(two_codes))
    dup = make_record(root, "proxy", "2025-01-01_Dup", [("a.txt", make_log()), ("b.txt", make_log())])
    assert any("duplicate run_id" in p for p in lb.check_record(dup))


# ---- the t-test ----
def test_t_test_against_hand_computed_p_values():
    """p-values computed by hand from closed forms of Student's t CDF: a wrong `alternative` gives 1 - p (or 2p)."""
    target = 3.28
    # two runs at target - a +- a: SE = a, t = -1 with 1 dof (Cauchy): p = 1/2 + atan(-1)/pi = 0.25
    a = 0.002
    result = lb.t_test_below([target - 2 * a, target], target)
    assert result.n == 2 and result.sem == pytest.approx(a) and result.p == pytest.approx(0.25, abs=1e-12)
    # three runs at target - 2a/sqrt(3) + (-a, 0, a): s = a, SE = a/sqrt(3), t = -2 with 2 dof:
    # p = 1/2 + t / (2 sqrt(2 + t^2)) = 1/2 - 1/sqrt(6) = 0.0918, not significant at 0.01
    mean = target - 2 * a / math.sqrt(3)
    result = lb.t_test_below([mean - a, mean, mean + a], target)
    assert result.n == 3 and result.mean == pytest.approx(mean, abs=1e-12)
    assert result.sem == pytest.approx(a / math.sqrt(3))
    assert result.p == pytest.approx(0.5 - 1 / math.sqrt(6), abs=1e-9)
    # five runs clearly below: mean 3.275, s = 0.0015811, t = -7.07 with 4 dof:
    # p = 1/2 + 3/8 u (1 - u^2/12), u = t / sqrt(1 + t^2/4): 1.05e-3
    result = lb.t_test_below([3.273, 3.274, 3.275, 3.276, 3.277], target)
    t = -0.005 / (0.0015811388 / math.sqrt(5))
    u = t / math.sqrt(1 + t * t / 4)
    assert result.p == pytest.approx(0.5 + 3 / 8 * u * (1 - u * u / 12), rel=1e-6) and result.p < 0.01
    # the mirror image above the target: p = 1 - the above
    result = lb.t_test_below([3.283, 3.284, 3.285, 3.286, 3.287], target)
    assert result.p == pytest.approx(0.5 - 3 / 8 * u * (1 - u * u / 12), rel=1e-6) and result.p > 0.99


def test_t_test_degenerate_samples_follow_the_documented_rule():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cleanly: no scipy warning about a zero or noisy variance
        one = lb.t_test_below([3.2], 3.28)
        assert one.n == 1 and one.p is None and one.mean == 3.2  # one run: no test
        assert lb.t_test_below([3.1 + 0.1] * 3, 3.28).p == 0.0  # no spread (scipy: 1e-16 noise), below: certain
        assert lb.t_test_below([3.28, 3.28], 3.28).p == 1.0  # no spread, at the target: H0 stands
        assert lb.t_test_below([3.3, 3.3], 3.28).p == 1.0
    with pytest.raises(ValueError):
        lb.t_test_below([], 3.28)


def test_records_of_several_runs_are_judged_by_the_t_test(tmp_path):
    root = tmp_path / "records"

    def runs(finals):
        return [(f"run{i}.txt", make_log(target=3.28, val_tokens=10485760, seed=i, run_id=f"r{i}",
                                         val=((0, 10.8, 0), (1000, f, 100_000 + 1000 * i))))
                for i, f in enumerate(finals)]
    good = make_record(root, "modded", "2025-01-01_Good", runs([3.2730, 3.2740, 3.2750, 3.2760, 3.2770]))
    weak = make_record(root, "modded", "2025-01-02_Weak", runs([3.2780, 3.2790, 3.2800, 3.2785]))
    assert lb.check_record(good) == []  # two of the five did not reach 3.28 on their own: the mean decides
    problems = lb.check_record(weak)
    assert len(problems) == 1 and "p = " in problems[0] and "needs p < 0.01" in problems[0]
    rows = {r.folder: r for r in lb.collect_rows(root, "modded")}
    assert rows["2025-01-01_Good"].ranked and rows["2025-01-01_Good"].time_s == pytest.approx(102.0)
    assert rows["2025-01-01_Good"].val_loss == pytest.approx(3.275)
    assert not rows["2025-01-02_Weak"].ranked
    table = lb.markdown_table(lb.collect_rows(root, "modded"), "modded")
    weak_line = next(line for line in table.splitlines() if "Weak" in line)
    assert weak_line.startswith("| — |") and "**p ≥ 0.01**" in weak_line and "(n=4, p=" in weak_line
    assert "fails check" not in weak_line  # the t-test is its only problem
    different = make_record(root, "modded", "2025-01-03_Diff", runs([3.2730, 3.2740]))
    log = (different / "run1.txt").read_text().replace('"batch_tokens": 524288', '"batch_tokens": 262144')
    (different / "run1.txt").write_text(edit_summary(log, tokens_seen=1000 * 262144))
    assert any("differ in settings: batch_tokens" in p for p in lb.check_record(different))


# ---- the table ----
def build_tree(root, real_log=None):
    for name, hours in [("2025-01-01_Baseline", 5.0), ("2025-02-01_Faster", 2.0), ("2025-03-01_Slower", 6.0)]:
        ms = int(hours * 3_600_000)
        make_record(root, "bottlecap_1gpu", name, [(f"{name}.txt", make_log(
            run_id=name, val=((0, 10.8, 0), (1000, 3.38, ms))))])
    make_record(root, "bottlecap_1gpu", "2025-03-02_OnCpu", [("a.txt", make_log(device="cpu (x86_64)"))])
    if real_log is not None:
        make_record(root, "proxy", "2025-01-01_Baseline", [real_log])


def test_table_is_sorted_by_time_with_the_baseline_and_speedups(tmp_path):
    root = tmp_path / "records"
    build_tree(root)
    rows = lb.collect_rows(root, "bottlecap_1gpu")
    assert [r.folder for r in rows] == ["2025-02-01_Faster", "2025-01-01_Baseline", "2025-03-01_Slower",
                                        "2025-03-02_OnCpu"]
    assert [r.baseline for r in rows] == [False, True, False, False]
    table = lb.markdown_table(rows, "bottlecap_1gpu").splitlines()
    assert table[0].startswith("| # | time | speed-up | val loss | tokens | script | device | date | record |")
    assert table[2].startswith("| 1 | 2.00 h | 2.50× | 3.3800 | 524.29M | `train_gpt2.py` | NVIDIA H100 80GB HBM3 |")
    assert "[2025-02-01_Faster](bottlecap_1gpu/2025-02-01_Faster/)" in table[2]
    assert table[3].startswith("| 2 | 5.00 h | 1.00× |") and table[3].endswith("| baseline |")
    assert table[4].startswith("| 3 | 6.00 h | 0.83× |")
    assert table[5].startswith("| — |") and "**fails check**" in table[5] and "needs a CUDA GPU" in table[5]


def test_speedups_compare_with_the_baseline_on_the_same_device(tmp_path):
    """BottleCap's rule: times on different GPUs compare only as speed-ups over a baseline on the same GPU."""
    root = tmp_path / "records"
    h100, a100, l4 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"
    for name, device, hours in [("2025-01-01_Baseline", h100, 5.0), ("2025-01-05_Baseline", a100, 10.0),
                                ("2025-02-01_Faster", h100, 2.0), ("2025-02-02_FasterA100", a100, 4.0),
                                ("2025-04-01_Baseline", h100, 4.5),  # a later H100 baseline: not the reference
                                ("2025-05-01_OnL4", l4, 8.0)]:
        make_record(root, "bottlecap_1gpu", name, [(f"{name}.txt", make_log(
            run_id=name, device=device, val=((0, 10.8, 0), (1000, 3.38, int(hours * 3_600_000)))))])
    rows = lb.collect_rows(root, "bottlecap_1gpu")
    assert {(r.folder, r.device) for r in rows if r.baseline} == {("2025-01-01_Baseline", h100),
                                                                  ("2025-01-05_Baseline", a100)}
    table = {line.split("](bottlecap_1gpu/")[1].split("/")[0]: line.split(" | ")
             for line in lb.markdown_table(rows, "bottlecap_1gpu").splitlines()[2:]}
    speedups = {folder: cells[2] for folder, cells in table.items()}
    # the A100 record against the A100 baseline (10 h / 4 h), not 1.25× against the H100's 5 h
    assert speedups == {"2025-02-01_Faster": "2.50×", "2025-02-02_FasterA100": "2.50×",
                        "2025-01-01_Baseline": "1.00×", "2025-04-01_Baseline": "1.11×",
                        "2025-01-05_Baseline": "1.00×", "2025-05-01_OnL4": "no baseline on this device"}
    assert table["2025-02-02_FasterA100"][6] == a100 and table["2025-01-05_Baseline"][-1] == "baseline |"


def test_readme_is_regenerated_deterministically(real_log, tmp_path):
    root = tmp_path / "records"
    root.mkdir()
    assert run_cli("table", root=root).returncode == 0
    text = (root / "README.md").read_text(encoding="utf-8")
    assert text.startswith(lb.README_TEMPLATE) and text.count("No records yet.") == 3
    assert "A log forged whole and consistently passes it" in " ".join(text.split())  # check's limit
    steps = text.split("## How to submit a record", 1)[1].split("## `", 1)[0]
    assert [line[:2] for line in steps.splitlines() if line[:1].isdigit()] == ["1.", "2.", "3.", "4.", "5."]
    (root / "README.md").write_text(text + "A note by hand.\n")
    build_tree(root, real_log)
    lb.write_readme(root)
    first = (root / "README.md").read_bytes()
    lb.write_readme(root)
    assert (root / "README.md").read_bytes() == first  # no timestamps, sorted inputs
    text = first.decode()
    assert "A note by hand." not in text  # generated whole: the prose lives in README_TEMPLATE
    generated = text.split(lb.README_TEMPLATE, 1)[1]
    assert generated.count("No records yet.") == 1  # modded
    assert generated.index("2025-02-01_Faster") < generated.index("2025-03-01_Slower")
    proxy = generated.split("## `proxy`", 1)[1]
    assert "| 1 |" in proxy and f"| {TARGET:g} |" in proxy and "baseline" in proxy  # the proxy's own target


def test_the_repository_records_verify_and_their_readme_is_current():
    """records/ in the repo: every record verifies, and records/README.md is what `table` writes."""
    out = io.StringIO()
    assert lb.run_check([], lb.RECORDS, out=out) == 0, out.getvalue()
    current = (lb.RECORDS / "README.md").read_text(encoding="utf-8")
    assert lb.render_readme(lb.RECORDS) == current, "run: python records/leaderboard.py table"


# ---- plots ----
def test_plot_writes_a_png(real_log, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (plots only) and not installed")
    out = lb.plot_runs([real_log, real_log], tmp_path / "p.png", labels=["a", "b"], baseline=real_log, x="both")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.endswith("p.png")
    root = tmp_path / "records"
    build_tree(root, real_log)
    assert run_cli("plot", "--track", "bottlecap_1gpu", root=root).returncode == 0
    assert (root / "bottlecap_1gpu" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    lb.write_readme(root)
    assert "![bottlecap_1gpu: val loss vs training time and tokens](bottlecap_1gpu/plot.png)" in \
        (root / "README.md").read_text(encoding="utf-8")


def test_plot_without_matplotlib_says_what_to_install(real_log, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        lb.plot_runs([real_log], tmp_path / "p.png")


# ---- bad paths: one error naming the flag, before anything is read or written ----
def leaderboard_error(*args):
    """The one `error:` line of `python records/leaderboard.py ARGS` (from the repo root): it fails, without a
    traceback."""
    cmd = without_file_permission_bypass([sys.executable, "records/leaderboard.py", *map(str, args)])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    return errors[0]


def test_root_must_be_a_folder_it_can_read_and_write(tmp_path):
    assert leaderboard_error("--root", tmp_path / "missing", "table") == \
        f"error: --root={tmp_path / 'missing'}: no such folder"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="^error: --root=.*a_file: is a file, not a folder$"):
        lb.main(["--root", str(tmp_path / "a_file"), "check"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert leaderboard_error("--root", locked, "table") == \
        f"error: --root={locked}: cannot be written (Permission denied)"
    assert not any(locked.iterdir())  # no README.md
    with pytest.raises(SystemExit, match="^error: --root=: is empty: give a folder$"):
        lb.main(["--root", "", "check"])


def test_log_and_output_paths_say_what_is_wrong(tmp_path):
    log = tmp_path / "run.txt"  # readable: the paths are checked before any log is parsed
    log.write_text("")
    assert leaderboard_error("plot", tmp_path / "missing.txt", "--out", tmp_path / "p.png") == \
        f"error: plot {tmp_path / 'missing.txt'}: no such file"
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for args, error in [
            (["check", tmp_path / "missing"], f"check {tmp_path / 'missing'}: no such file or folder"),
            (["check", ""], "check : is empty: give a file or folder"),
            (["check", tmp_path / "dangling"], rf"check {tmp_path / 'dangling'}: is a dangling symlink \(to .*gone\)"),
            (["plot", tmp_path, "--out", tmp_path / "p.png"], f"plot {tmp_path}: is a folder, not a file"),
            (["plot", log, "--baseline", tmp_path / "x.txt", "--out", tmp_path / "p.png"],
             f"--baseline={tmp_path / 'x.txt'}: no such file"),
            (["plot", log, "--out", tmp_path], f"--out={tmp_path}: is a folder, not a file"),
            (["plot", log, "--out", "/proc/x/p.png"],
             r"--out=/proc/x/p.png: cannot be written: its folder /proc/x cannot be made in /proc \(.*\)")]:
        with pytest.raises(SystemExit, match=f"^error: {error}$"):
            lb.main([str(a) for a in args])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "run.txt"]

"""How fast a step is, per train script: tokens/s, ms/step, MFU and peak memory on this device.

    python bench.py                                      every train_gpt2*.py, 124M preset, this device
    python bench.py --scripts train_gpt2.py train_gpt2_mla.py --device_batch_tokens 32768
    python bench.py --preset tiny --steps 5 --json       CPU-sized; --json for machines
    python bench.py --race --minutes 5 --train_files 'data/proxy/enwiki_train_*.bin' \\
        --val_files 'data/proxy/owt_val_*.bin'           equal-wall-clock proxy race (records/proxy/)

Each script is measured by running its own main() for --steps optimizer steps on synthetic token shards (uniform
random GPT-2 ids in 1024-token documents), so the numbers include everything a real step does: the data loader,
gradient accumulation, the optimizers, torch.compile (its warm-up is timed separately, as the script logs it). The
batch is the last stage's (--batch_stages=1, unless --set says otherwise). FLOPs per token come from
torch.utils.flop_counter on one forward+backward (matmuls and attention; FFTs are not counted), with attention
counted as full causal attention over a row as long as the last stage's long window (PaLM's MFU convention over the
keys a query may see; the short-window layers see fewer); MFU divides model FLOPs/s by the device's dense bf16 peak
from PEAK_TFLOPS below.

    python bench.py --gpu-check tests|bench|race|all [--out DIR]

makes a lent GPU's session count (30 minutes, 10 per command, see README "Checking on a lent GPU"): each stage is
one command that stops itself inside STAGE_BUDGET_S and leaves in DIR (default gpu_check/<date>_<time>_<device>/)
<stage>.json (its figures), <stage>.md (the summary, also printed), environment.txt and <stage>_logs.tar.gz (the
raw logs): four or five files, under the device tool's eight. `tests` runs `pytest -m gpu tests` (every CUDA test);
`bench` this table at 124M with compile, without then with --kernels=1; `race` an equal-training-time race on the
proxy shards in data/proxy/. At 124M the compile warm-up alone takes ~6 minutes (363 s on an H100), so bench and
race fit one script per command (--scripts). `all` runs the three in turn (not one device command).
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "data"))
import fineweb  # noqa: E402  (the shard writer)
from sample import import_script  # noqa: E402  (imports a train script without side effects)

leaderboard = import_script(ROOT / "records" / "leaderboard.py")  # parses and plots run logs

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; fp32 accumulate where consumer cards differ).
# Matched by substring of torch.cuda.get_device_name(), first match wins: put specific names first.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
               ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("RTX A6000", 154.8), ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device_name):
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def model_costs(module, args):
    """(total params, active params, training FLOPs per token) of the script's model at these settings."""
    from torch.utils.flop_counter import FlopCounterMode

    if args.attention == "flex":  # a causal row of the longest window stands for the windowed attention
        args = dataclasses.replace(args, attention="sdpa", seq_len=int(args.window_blocks.split(",")[-1]) * module.BLOCK)
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
        idx = torch.zeros(1, args.seq_len, dtype=torch.long)
    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "num_active_params"):  # e.g. a mixture of experts: the parameters one token uses
        active = model.num_active_params()
    else:  # embedding tables are looked up, not multiplied
        active = total - sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx, idx).backward()
    return total, active, counter.get_total_flops() / args.seq_len


def bench_script(path, flags, steps, workdir, log_dir=None):
    """Run the script's main() for `steps` steps on synthetic shards; return one row of the table. The run log goes
    to log_dir (default: beside the shards in workdir)."""
    module = import_script(path)
    flags = ["--batch_stages=1"] + flags  # the last stage's batch, unless the flags say otherwise
    args, _ = module.parse_args(flags)
    n_train = (steps + 1) * args.batch_tokens + 1  # the compile warm-up rewinds the loader
    shard_dir = Path(workdir) / path.stem
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("bench_train_000001.bin", n_train), ("bench_val_000000.bin", args.batch_tokens + 1)):
        tokens = rng.integers(0, 50256, n)
        tokens[::1024] = 50256  # documents of 1024 tokens: all kept under the document cap
        fineweb.write_shard(str(shard_dir / name), tokens)
    with contextlib.redirect_stdout(sys.stderr):  # the script's own step lines: progress, not results
        summary = module.main(flags + [f"--train_files={shard_dir / 'bench_train_*.bin'}",
                                       f"--val_files={shard_dir / 'bench_val_*.bin'}", f"--num_iterations={steps}",
                                       "--val_every=0", f"--val_tokens={args.batch_tokens}",
                                       f"--log_dir={log_dir or shard_dir}"])
    total, active, flops_per_token = model_costs(module, args)
    tokens_per_s = summary["tokens_seen"] / summary["train_time_s"]
    peak = peak_tflops(summary["device"])
    return dict(script=path.name, params_m=total / 1e6, active_params_m=active / 1e6, tokens_per_s=tokens_per_s,
                ms_per_step=1000 * summary["train_time_s"] / summary["steps"],
                gflops_per_token=flops_per_token / 1e9,
                mfu=flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
                peak_mem_gb=summary["peak_mem_gb"], compile_s=summary["compile_warmup_s"], device=summary["device"],
                world_size=summary["world_size"], batch_tokens=args.batch_tokens,
                micro_batch=args.device_batch_tokens)


def format_table(rows):
    head = "| script | params (total/active) | tokens/s | ms/step | GFLOP/token | MFU | peak mem | compile |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        compile_s = f"{r['compile_s']:.0f} s" if r["compile_s"] is not None else "off"
        lines.append(f"| {r['script']} | {r['params_m']:.1f}M / {r['active_params_m']:.1f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['gflops_per_token']:.3f} | {mfu} | "
                     f"{r['peak_mem_gb']:.2f} GB | {compile_s} |")
    return "\n".join(lines)


def race_table(summaries):
    """The race's markdown table (a list of lines), one row per run summary."""
    lines = ["| script | steps | tokens | final val loss | best val loss | tokens/s | peak mem |",
             "|---|---|---|---|---|---|---|"]
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731  (None: the run never validated)
    for s in summaries:
        lines.append(f"| {s['script']} | {s['steps']} | {s['tokens_seen']:,} | {loss(s['final_val_loss'])} | "
                     f"{loss(s['best_val_loss'])} | {s['tokens_seen'] / max(s['train_time_s'], 1e-9):,.0f} | "
                     f"{s['peak_mem_gb']:.2f} GB |")
    return lines


def race(scripts, flags, minutes, name, out_root, command):
    """Train every script for the same training time on the same data; write the logs, a table and a plot to
    records/proxy/<date>_<name>/ and refresh records/README.md."""
    folder = Path(out_root) / "proxy" / f"{datetime.date.today():%Y-%m-%d}_{name}"
    if folder.exists():
        raise SystemExit(f"error: {folder} exists; records are never overwritten: choose another --name")
    folder.mkdir(parents=True)
    summaries = []
    for script in scripts:
        module = import_script(script)
        summaries.append(module.main(flags + [f"--time_budget_s={60 * minutes}", "--num_iterations=1000000",
                                              f"--log_dir={folder}"]))
        del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logs = [folder / f"{s['run_id']}.txt" for s in summaries]
    lines = race_table(summaries)
    plot = ""
    try:
        baseline = next((log for log, s in zip(logs, summaries) if s["script"] == "train_gpt2.py"), None)
        leaderboard.plot_runs(logs, folder / "plot.png", baseline=baseline, x="both")
        plot = "\n![val loss vs training time and tokens](plot.png)\n"
    except RuntimeError as e:  # matplotlib is optional
        print(f"no plot: {e}", file=sys.stderr)
    (folder / "README.md").write_text(
        f"# Proxy race: {name}\n\nEvery script trained for {minutes:g} min of training time (validation excluded) on "
        f"the same data with the same settings, on {summaries[0]['device']} x{summaries[0]['world_size']}, torch "
        f"{torch.__version__}. Proxy data: a speed and loss-vs-tokens comparison, never a FineWeb result.\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n" + plot, encoding="utf-8")
    leaderboard.write_readme(Path(out_root))
    print("\n".join(lines) + f"\n\nwritten to {folder}")
    return summaries


# ---- gpu-check: a lent GPU's session, in stages that each end inside one device command ----
STAGES = ("tests", "bench", "race")
# A device command may run 10 minutes; its machine's start-up is not counted in them. A stage ends within 560 s: its
# commands get the budget less the grace a command stopped at the budget has to write its report (530 s); the rest
# is packing the logs.
STAGE_BUDGET_S = 560.0
STOP_GRACE_S = 30.0  # SIGINT at the budget, SIGKILL this much later: pytest writes its report, a script its summary
# One bench row at 124M with compile, measured on an H100 (torch 2.11, 2026-11-25): ~10 s start-up, 363 s compile
# warm-up (3 steps), 8 steps of 393,216 tokens at 943 ms, 81 s for the first validation (it compiles the eval graph).
# So a stage times ONE script: pass --scripts; the rest of a longer plan is skipped and reported.
BENCH_RUN_S = 470.0
# A race entry's wall time besides its training minutes: the same start-up, compile warm-up and eval-graph compile,
# and its validations (1,048,576 tokens each). See race_minutes().
RACE_OVERHEAD_S = 470.0
TEST_TIMEOUT_S = 180  # per GPU test: the compile tests (a compiled and an eager run each) are the longest
PROXY_DIR = ROOT / "data" / "proxy"
PROXY_TRAIN, PROXY_VAL = "enwiki_train_*.bin", "owt_val_*.bin"
RACE_VAL_TOKENS = 1048576  # the benchmark's count; the OpenWebText sample's 1.59M tokens hold it
PROXY_RECIPE = """\
  export TIKTOKEN_CACHE_DIR=$PWD/../shared/data/tiktoken_cache
  python data/fineweb.py --from-text ../shared/data/enwiki2015/*.jsonl.xz --out data/proxy --prefix enwiki \\
      --val-tokens 0 --max-tokens 20000000
  python data/fineweb.py --from-text ../shared/data/webtext_samples/openwebtext_sample.jsonl.xz --out data/proxy \\
      --prefix owt --val-tokens all"""
CHILD_ENV = {"TRITON_INTERPRET": "0",  # conftest.py's CPU default would run Triton (Inductor's too) in its interpreter
             "PYTHONUNBUFFERED": "1"}  # logs fill as a run goes, so a stopped run leaves what it printed


def race_minutes(n_scripts, budget_s=STAGE_BUDGET_S, overhead_s=RACE_OVERHEAD_S):
    """Training minutes per script, in quarter minutes, so that n_scripts x (minutes + overhead) fits the budget less
    the grace: 1 script: (560 s - 30 s - 470 s) = 60 s, so 1 minute. At 943 ms per 393,216-token step on an H100,
    that is 60 or more steps (the early batch stages are smaller). Scripts compared in separate stage commands need the same --minutes."""
    seconds = (budget_s - STOP_GRACE_S - n_scripts * overhead_s) / max(1, n_scripts)
    minutes = math.floor(seconds / 15) / 4
    if minutes < 0.25:
        raise SystemExit(f"error: {n_scripts} scripts do not fit one race stage ({budget_s:.0f} s, ~{overhead_s:.0f} s "
                         "of start-up and compile each): race one script per command (--scripts A, then --scripts B, with the same "
                         "--minutes)")
    return minutes


def proxy_shards(proxy_dir=PROXY_DIR, val_tokens=RACE_VAL_TOKENS):
    """(train glob, val glob) of the race's proxy shards, or an error that gives the recipe to make them."""
    proxy_dir = Path(proxy_dir)
    train, val = sorted(proxy_dir.glob(PROXY_TRAIN)), sorted(proxy_dir.glob(PROXY_VAL))
    if not (train and val):
        raise SystemExit(f"error: the race needs proxy shards {proxy_dir}/{PROXY_TRAIN} and {PROXY_VAL}; found "
                         f"{len(train)} and {len(val)}. Make them once in the repo root, beside ../shared/data "
                         f"(~10 s, 42 MB):\n{PROXY_RECIPE}\nthen pass carry=[\"data/proxy\"] to the device tool's run "
                         "(data/proxy/ is git-ignored, so only carry takes it along)")
    try:
        have = sum(fineweb.check_shard(str(f)) for f in val)
    except ValueError as e:
        raise SystemExit(f"error: {e}; remake the proxy shards:\n{PROXY_RECIPE}") from None
    if have < val_tokens + 1:
        raise SystemExit(f"error: {proxy_dir}/{PROXY_VAL} holds {have:,} tokens, fewer than --val_tokens={val_tokens} "
                         f"+ 1: lower --val_tokens or remake the val shard:\n{PROXY_RECIPE}")
    return str(proxy_dir / PROXY_TRAIN), str(proxy_dir / PROXY_VAL)


@dataclasses.dataclass
class CheckOptions:
    scripts: list  # train scripts (Paths)
    flags: list = dataclasses.field(default_factory=list)  # every script's flags, --name=value (later ones win)
    steps: int = 10  # bench: timed steps per run
    minutes: float | None = None  # race: training minutes per script (None: race_minutes())
    val_every: int = 10  # race: ~40 steps, so 5 validations of ~1 s each
    val_tokens: int = RACE_VAL_TOKENS
    budget_s: float = STAGE_BUDGET_S
    proxy_dir: Path = PROXY_DIR
    device: str = ""


@dataclasses.dataclass
class Run:
    """One command of a stage: its log (a file in the stage's logs folder), its expected wall time, how it went."""
    label: str
    cmd: list
    log: str
    estimate_s: float = 0.0
    status: str = "not run"
    rc: int | None = None
    seconds: float = 0.0


def run_logged(cmd, log_path, timeout_s, env=None, grace_s=STOP_GRACE_S):
    """Run cmd in the repo root, stdout and stderr into log_path. At timeout_s it gets SIGINT (pytest still writes
    its report, a train script its summary), and SIGKILL grace_s later. Returns (exit code, seconds, timed out)."""
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(map(str, cmd))}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            return proc.wait(timeout=timeout_s), time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return proc.returncode, time.monotonic() - t0, True


def execute(runs, logs, budget_s, runner, clock):
    """Run each command whose estimate fits in what is left of the budget, stopping it at the budget; skip the rest,
    saying why. So a stage never outlasts budget_s. Returns the stage's wall time."""
    start = clock()
    for run in runs:
        left = budget_s - (clock() - start) - STOP_GRACE_S
        if left < max(run.estimate_s, 1.0):
            run.status = f"skipped: {max(left, 0):.0f} s left of the stage's budget, ~{run.estimate_s:.0f} s needed"
            continue
        run.rc, run.seconds, timed_out = runner(run.cmd, logs / run.log, left, CHILD_ENV)
        run.status = "stopped at the stage's budget" if timed_out else "ok" if run.rc == 0 else f"exit code {run.rc}"
    return clock() - start


# -- tests: pytest -m gpu tests (tests/test_gpu.py and the ideas' own CUDA tests) --
def plan_tests(logs, o):
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rA", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1",  # xunit1 keeps the tests' record_property figures in the xml
           f"--junitxml={logs / 'junit.xml'}"]
    if importlib.util.find_spec("pytest_timeout"):  # per test; the stage's budget bounds the whole run regardless
        cmd.append(f"--timeout={TEST_TIMEOUT_S}")
    note = (f"pytest -m gpu tests; each test stopped at {TEST_TIMEOUT_S} s, the run at "
            f"{o.budget_s - STOP_GRACE_S:.0f} s")
    return [Run("pytest", cmd, "pytest.txt")], note, {}


def read_junit(path):
    """[{name, outcome, seconds, message, figures}] from pytest's junit xml; figures are the record_property ones."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, element.get("message", "")
                break
        figures = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append(dict(name=case.get("name"), outcome=outcome, seconds=float(case.get("time") or 0),
                          message=message, figures=figures))
    return tests


def read_pytest_verbose(path):
    """The outcomes from pytest -v's lines, for when it was killed before writing its xml."""
    found = re.findall(r"^tests/\S+?\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", path.read_text(), re.M)
    outcome = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
    return [dict(name=name, outcome=outcome.get(word, word.lower()), seconds=0.0, message="", figures={})
            for name, word in found]


def collect_tests(runs, logs, out, o, info):
    (run,) = runs
    junit, log = logs / "junit.xml", logs / run.log
    tests = read_junit(junit) if junit.exists() else read_pytest_verbose(log) if log.exists() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    problems = [f"test {t['name']} {t['outcome']}" for t in tests if t["outcome"] in ("failed", "error")]
    if counts["skipped"]:  # on the GPU machine every test should run
        problems.append(f"{counts['skipped']} test(s) skipped on the GPU machine")
    if run.status != "ok" and not problems:
        problems.append(f"pytest: {run.status}")
    if not tests:
        problems.append("no GPU test ran")
    lines = [f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} "
             f"skipped (pytest: {run.status}).", "", "| test | outcome | s | figures |", "|---|---|---|---|"]
    for t in tests:
        figures = "; ".join(f"{k} = {v}" for k, v in t["figures"].items())
        lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {figures} |")
    failed = [t for t in tests if t["outcome"] in ("failed", "error", "skipped")]
    if failed:
        lines += ["", "Not passed:", ""] + [f"- {t['name']} ({t['outcome']}): {' '.join(t['message'].split())[:400]}"
                                            for t in failed]
    return dict(counts=counts, tests=tests), "\n".join(lines), problems


# -- bench: the table, with and without --kernels=1 --
def plan_bench(logs, o):
    runs = []
    for k in (0, 1):  # every script without the kernels first: if time runs short, the plain table is complete
        for script in o.scripts:
            stem = f"{script.stem}_kernels{k}"
            cmd = [sys.executable, ROOT / "bench.py", "--scripts", script, "--steps", o.steps, "--json",
                   "--log_dir", logs / stem, "--set", "compile=1", f"kernels={k}", *(f[2:] for f in o.flags)]
            runs.append(Run(f"{script.name} --kernels={k}", cmd, f"{stem}.log", BENCH_RUN_S))
    total, usable = len(runs) * BENCH_RUN_S, o.budget_s - STOP_GRACE_S
    note = (f"{len(o.scripts)} scripts x 2 (--kernels=0, 1) x ~{BENCH_RUN_S:.0f} s (start-up, compile warm-up, "
            f"{o.steps} steps, FLOP count) = {total:.0f} s {'<=' if total <= usable else '>'} {usable:.0f} s"
            + ("" if total <= usable else ": the last runs will be skipped; split them with --scripts"))
    return runs, note, {}


def read_bench_row(path):
    """The JSON row a `bench.py --json` child printed (its only stdout line that starts so), or None."""
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []):
        if line.startswith('{"script"'):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def collect_bench(runs, logs, out, o, info):
    entries, problems = [], []
    for run in runs:
        row = read_bench_row(logs / run.log) if run.status == "ok" else None
        if run.status == "ok" and row is None:
            run.status = "no result row in its log"
        entries.append(dict(label=run.label, kernels=int(run.label.endswith("=1")), status=run.status, row=row))
        if row is None:
            problems.append(f"bench {run.label}: {run.status}")
    measured = [dict(e["row"], script=e["label"]) for e in entries if e["row"]]
    lines = [format_table(measured) if measured else "No run finished."]
    by_label = {e["label"]: e["row"] for e in entries}
    pairs = [(s.name, by_label.get(f"{s.name} --kernels=0"), by_label.get(f"{s.name} --kernels=1")) for s in o.scripts]
    changes = [f"- {name}: tokens/s x{on['tokens_per_s'] / off['tokens_per_s']:.3f}, peak memory "
               f"{off['peak_mem_gb']:.2f} -> {on['peak_mem_gb']:.2f} GB" for name, off, on in pairs if off and on]
    if changes:
        lines += ["", "--kernels=1 against --kernels=0:", ""] + changes
    if problems:
        lines += ["", "Not measured:", ""] + [f"- {p}" for p in problems]
    return dict(runs=entries), "\n".join(lines), problems


# -- race: equal training time on the proxy shards --
def plan_race(logs, o):
    train, val = proxy_shards(o.proxy_dir, o.val_tokens)
    minutes = o.minutes if o.minutes is not None else race_minutes(len(o.scripts), o.budget_s)
    runs = []
    for script in o.scripts:
        cmd = [sys.executable, script, "--compile=1", f"--train_files={train}", f"--val_files={val}",
               f"--val_tokens={o.val_tokens}", f"--val_every={o.val_every}", f"--time_budget_s={60 * minutes:g}",
               "--num_iterations=1000000", f"--log_dir={logs / script.stem}", *o.flags]
        runs.append(Run(script.name, cmd, f"{script.stem}.console.txt", 60 * minutes + RACE_OVERHEAD_S))
    total, usable = sum(r.estimate_s for r in runs), o.budget_s - STOP_GRACE_S
    note = (f"{len(runs)} scripts x ({minutes:g} min of training + ~{RACE_OVERHEAD_S:.0f} s start-up, compile and "
            f"validation) = {total:.0f} s {'<=' if total <= usable else '>'} {usable:.0f} s")
    return runs, note, dict(minutes=minutes, train_files=train, val_files=val)


def collect_race(runs, logs, out, o, info):
    finished, problems, entries = [], [], []
    for run in runs:
        found = sorted((logs / Path(run.label).stem).glob("*.txt"))
        log = leaderboard.parse_log(found[-1]) if found else None
        summary = log.summary if log else None
        entries.append(dict(script=run.label, status=run.status, summary=summary))
        if run.status == "ok" and summary:
            finished.append((found[-1], summary))
        else:
            problems.append(f"race {run.label}: {run.status}")
    lines = [f"Every script trained {info['minutes']:g} min (training time: validation and compile excluded) on "
             f"{info['train_files']}, validated on the first {o.val_tokens:,} tokens of {info['val_files']}. Proxy "
             "data: a speed and loss-vs-tokens comparison, never a FineWeb result.", ""]
    lines += race_table([s for _, s in finished]) if finished else ["No run finished."]
    try:
        if finished:
            paths = [path for path, _ in finished]
            baseline = next((p for p, s in finished if s["script"] == "train_gpt2.py"), None)
            leaderboard.plot_runs(paths, out / "race_plot.png", baseline=baseline, x="both")
            lines += ["", "![val loss vs training time and tokens](race_plot.png)"]
    except (RuntimeError, ValueError) as e:  # matplotlib is optional
        lines += ["", f"No plot: {e}"]
    if problems:
        lines += ["", "Not finished:", ""] + [f"- {p}" for p in problems]
    return dict(runs=entries, **info), "\n".join(lines), problems


PLANS = dict(tests=plan_tests, bench=plan_bench, race=plan_race)
COLLECTORS = dict(tests=collect_tests, bench=collect_bench, race=collect_race)


def environment_text():
    """Versions, the devices and nvidia-smi: what a result needs beside it to be compared."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
             f"cudnn {torch.backends.cudnn.version()}  triton {triton_version}",
             f"platform {platform.platform()}  cpus {os.cpu_count()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device {i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("device: no CUDA (torch.cuda.is_available() is False)")
    for cmd in (["git", "--no-optional-locks", "-C", str(ROOT), "rev-parse", "HEAD"],  # read-only git
                ["git", "--no-optional-locks", "-C", str(ROOT), "status", "--short"], ["nvidia-smi"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                lines.append(f"$ {' '.join(cmd[-2:] if cmd[0] == 'git' else cmd)}\n{done.stdout.rstrip()}")
    return "\n".join(lines) + "\n"


def run_stage(name, out, o, runner, clock):
    """Plan, run within the budget, collect; write <name>.json, <name>.md and <name>_logs.tar.gz into out."""
    if (out / f"{name}.json").exists():
        raise SystemExit(f"error: {out / name}.json exists; results are never overwritten: choose another --out")
    logs = out / f"{name}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    runs, note, info = PLANS[name](logs, o)
    print(f"== gpu-check {name}: {note}", flush=True)
    wall = execute(runs, logs, o.budget_s, runner, clock)
    result, body, problems = COLLECTORS[name](runs, logs, out, o, info)
    result = dict(stage=name, device=o.device, torch=torch.__version__, started=started, budget_s=o.budget_s,
                  wall_s=round(wall, 1), plan=note, problems=problems,
                  commands=[dict(label=r.label, cmd=shlex.join(map(str, r.cmd)), status=r.status, rc=r.rc,
                                 seconds=round(r.seconds, 1)) for r in runs], **result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = (f"# GPU check: {name}\n\n{o.device}, torch {torch.__version__}, {started}: {wall:.0f} s of the "
          f"{o.budget_s:.0f} s budget. Plan: {note}. Raw logs: {name}_logs.tar.gz; versions: environment.txt.\n\n"
          f"{body}\n")
    (out / f"{name}.md").write_text(md, encoding="utf-8")
    with tarfile.open(out / f"{name}_logs.tar.gz", "w:gz") as tar:  # one file: the device tool returns at most 8
        tar.add(logs, arcname=logs.name)
    shutil.rmtree(logs)
    print(md, flush=True)
    return result


def gpu_check(stage, out, o, runner=None, clock=time.monotonic):
    """Run one stage, or all three, into the folder out (None: gpu_check/<date>_<time>_<device>/); returns
    {stage: result}. The real runner needs CUDA; the tests inject one."""
    if runner is None:
        if not torch.cuda.is_available():
            raise SystemExit("error: --gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False here: run it "
                             "on a lent GPU machine (README: Checking on a lent GPU)")
        runner = run_logged
    if not o.device:
        o.device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    stages = STAGES if stage == "all" else (stage,)
    if "race" in stages:  # a missing proxy set is an error before any GPU time is spent
        proxy_shards(o.proxy_dir, o.val_tokens)
    slug = re.sub(r"[^a-z0-9]+", "-", o.device.lower()).strip("-")
    out = Path(out) if out else ROOT / "gpu_check" / f"{datetime.datetime.now():%Y-%m-%d_%H%M%S}_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.txt").write_text(environment_text(), encoding="utf-8")
    results = {name: run_stage(name, out, o, runner, clock) for name in stages}
    problems = [p for r in results.values() for p in r["problems"]]
    print(f"gpu-check {stage}: {len(problems)} problem(s){': ' + '; '.join(problems) if problems else ''}; "
          f"written to {out}", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=None, help="train scripts (default: every train_gpt2*.py)")
    p.add_argument("--preset", default="gpt2_124m", help="the scripts' --preset")
    p.add_argument("--device_batch_tokens", help="tokens per micro-step, or auto")
    p.add_argument("--batch_tokens", type=int, help="tokens per optimizer step (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per script")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="more flags for every script")
    p.add_argument("--json", action="store_true", help="print one JSON object per script instead of the table")
    p.add_argument("--log_dir", help="keep the scripts' run logs here (default: discarded with the synthetic shards)")
    race_args = p.add_argument_group("race: equal training time for every script, into records/proxy/")
    race_args.add_argument("--race", action="store_true", help="run the race instead of the throughput table")
    race_args.add_argument("--minutes", type=float, help="training minutes per script (default: 5; gpu-check: "
                                                         "what fits its budget)")
    race_args.add_argument("--train_files", help="training shards (glob)")
    race_args.add_argument("--val_files", help="validation shards (glob)")
    race_args.add_argument("--val_every", type=int, help="validation every N steps (default: 50; gpu-check: 10)")
    race_args.add_argument("--val_tokens", type=int, default=1048576, help="validation tokens")
    race_args.add_argument("--name", default="Race", help="the record folder's short name")
    race_args.add_argument("--records", default=str(ROOT / "records"), help="the records tree")
    gpu = p.add_argument_group("gpu-check: a lent GPU's session, in stages that each end inside 10 minutes")
    gpu.add_argument("--gpu-check", choices=[*STAGES, "all"], help="tests, bench, race, or all three in turn")
    gpu.add_argument("--out", help="the results folder (default: gpu_check/<date>_<time>_<device>/; on the device "
                                   "tool: $OUT/<name>)")
    gpu.add_argument("--budget_s", type=float, default=STAGE_BUDGET_S, help="each stage's wall-time budget, seconds")
    a = p.parse_args(argv)
    scripts = [Path(s).resolve() for s in a.scripts] if a.scripts else sorted(ROOT.glob("train_gpt2*.py"))
    flags = [f"--preset={a.preset}"] + [f"--{k}={v}" for k, v in (
             ("device_batch_tokens", a.device_batch_tokens), ("batch_tokens", a.batch_tokens)) if v is not None]
    flags += [f"--{kv}" for kv in a.set]
    if a.gpu_check:
        o = CheckOptions(scripts, flags, a.steps, a.minutes, a.val_every or 10, a.val_tokens, a.budget_s)
        results = gpu_check(a.gpu_check, a.out, o)
        if any(r["problems"] for r in results.values()):
            raise SystemExit(1)  # the problems are printed above and listed in each <stage>.md
        return results
    if a.race:
        if not (a.train_files and a.val_files):
            p.error("--race needs --train_files and --val_files (e.g. the proxy shards, see README)")
        flags += [f"--train_files={a.train_files}", f"--val_files={a.val_files}", f"--val_every={a.val_every or 50}",
                  f"--val_tokens={a.val_tokens}"]
        command = shlex.join(["python", "bench.py"] + list(sys.argv[1:] if argv is None else argv))
        return race(scripts, flags, 5.0 if a.minutes is None else a.minutes, a.name, a.records, command)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for script in scripts:
            rows.append(bench_script(script, flags, a.steps, workdir, a.log_dir))
    if a.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"\n{rows[0]['device']} x{rows[0]['world_size']}, torch {torch.__version__}, {a.preset} preset, "
              f"{rows[0]['batch_tokens']} tokens/step, micro-batch {rows[0]['micro_batch']} tokens, {a.steps} steps; "
              f"flags: {' '.join(flags)}\n")
        print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()

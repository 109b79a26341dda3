"""How fast a step is, per train script: tokens/s, ms/step, MFU and peak memory on this device.

    python bench.py                                      every train_gpt2*.py, 124M preset, this device
    python bench.py --scripts train_gpt2.py train_gpt2_mla.py --device_batch_tokens 32768
    python bench.py --preset tiny --steps 5 --json       CPU-sized; --json for machines
    python bench.py --race --minutes 5 --train_files 'data/proxy/enwiki_train_*.bin' \\
        --val_files 'data/proxy/owt_val_*.bin'           equal-wall-clock proxy race (records/proxy/)

Each script is measured by running its own main() for --steps optimizer steps on synthetic token shards
(uniform random GPT-2 ids in 1024-token documents), so the numbers include everything a real step does: the
data loader, gradient accumulation, the optimizers, torch.compile (its warm-up is timed separately, as the
script logs it); it never validates (--val_tokens=0). The batch is the last stage's (--batch_stages=1, unless
--set says otherwise). FLOPs per token come from torch.utils.flop_counter on one forward+backward (matmuls and
attention; FFTs are not counted), with attention counted as full causal attention over a row as long as the
last stage's long window (PaLM's MFU convention over the keys a query may see; the short-window layers see
fewer); MFU divides model FLOPs/s by the device's dense bf16 peak from PEAK_TFLOPS below.

    python bench.py --gpu-check quick [--out DIR] [--budget_s 540] [--race_script train_gpt2_mla.py]

checks a CUDA GPU (an RTX 4090 as much as an H100) in one command of under 10 minutes, all in one worker
process: (1) the device's own bf16 GEMM TFLOP/s at the model's shapes and its copy bandwidth; (2) the
baseline's cold compile at 124M: set-up, warm-up, Dynamo / AOTAutograd / Inductor seconds, graphs, graph
breaks; (3) from that one compile, every batch stage's tokens/s, ms/step, peak memory and MFU, counted as 6N
(matmul weights) and with the attention each query really sees; (4) one last-stage step under torch.profiler,
by kernel class, with its idle gaps; then, as the budget allows, (5) each idea script's last-stage speed and
--kernels=1's, and (6) with the proxy shards, an equal-training-time race of the baseline and --race_script (a
records/proxy/ entry). A planner runs each phase only if its estimate (from what has been measured so far)
fits what is left of --budget_s, and says why it skipped the others; a phase that overruns is stopped at the
budget. It writes into DIR (default gpu_check/<date>_<time>_<device>/) quick.json (every figure, the plan),
quick.md (the summary, also printed), environment.txt, quick_logs.tar.gz (the run logs, the console, the
profiler's table) and, after a race, race_plot.png; quick.json and quick.md are rewritten after every phase,
so a run stopped early keeps its figures.

    python bench.py --gpu-check tests|bench|race|all [--out DIR] [--scripts ...]

are the deeper looks, each one command that stops itself inside --budget_s (560 s) and leaves <stage>.json,
<stage>.md, environment.txt and <stage>_logs.tar.gz: `tests` runs `pytest -m gpu tests` (every CUDA test; with
--scripts only the tests of those scripts and the tests tied to no script), `bench` this table at 124M with
compile, without then with --kernels=1, `race` an equal-training-time race on the proxy shards in data/proxy/.
A 124M compile takes minutes, so bench and race fit one script per command (--scripts). `all` runs the three
in turn. Every --gpu-check needs CUDA.
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
import traceback
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "data"))
import fineweb  # noqa: E402  (the shard writer)
from sample import check_train_script, import_script  # noqa: E402  (train scripts, without side effects)

leaderboard = import_script(ROOT / "records" / "leaderboard.py")  # parses and plots run logs

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; fp32 accumulate where consumer cards differ).
# Matched by substring of torch.cuda.get_device_name(), first match wins: put specific names first.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
               ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("RTX A6000", 154.8), ("V100", 125.0), ("T4", 65.0)]


EOT = 50256  # <|endoftext|>: starts every document (the shard format), as in the train scripts
BENCH_DOC_TOKENS = 1024  # the bench table's synthetic documents


def peak_tflops(device_name):
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def mfu(flops_per_token, tokens_per_s, tflops):
    """Model FLOPs utilisation: the FLOPs/s the step did over a device's TFLOP/s (None when that is
    unknown)."""
    return flops_per_token * tokens_per_s / (tflops * 1e12) if tflops else None


MATMUL_OPS = ("mm", "addmm")  # FlopCounter's ops of the weights that multiply (nn.Linear); attention: bmm


def model_costs(module, args):
    """(total params, active params, training FLOPs per token, of which matmul weights) of the script's model
    at these settings. The matmul part is 6N: 6 FLOPs per weight that multiplies, per token, forward and
    backward."""
    from torch.utils.flop_counter import FlopCounterMode

    if args.attention == "flex":  # a causal row of the longest window stands for the windowed attention
        longest = int(args.window_blocks.split(",")[-1]) * module.BLOCK
        args = dataclasses.replace(args, attention="sdpa", seq_len=longest)
    with torch.device("meta"):
        model = module.GPT(module.GPTConfig.from_args(args))
        idx = torch.zeros(1, args.seq_len, dtype=torch.long)
    total = sum(p.numel() for p in model.parameters())
    active = model.num_active_params()  # embedding tables are looked up; a mixture of experts skips experts
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx, idx).backward()
    matmul = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op.__name__ in MATMUL_OPS)
    return total, active, counter.get_total_flops() / args.seq_len, matmul / args.seq_len


def write_synthetic_shards(directory, n_tokens, doc_tokens, vocab_size, seed=0, prefix="bench_train"):
    """directory/<prefix>_000001.bin: uniform random GPT-2 ids (those below vocab_size) in documents of
    doc_tokens tokens, each starting with <|endoftext|> (when the vocabulary holds it). Returns the shards'
    glob."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, min(EOT, vocab_size), n_tokens)
    if EOT < vocab_size:
        tokens[::doc_tokens] = EOT
    fineweb.write_shard(str(directory / f"{prefix}_000001.bin"), tokens)
    return str(directory / f"{prefix}_*.bin")


def bench_script(path, flags, steps, workdir, log_dir=None):
    """Run the script's main() for `steps` steps on synthetic shards; return one row of the table. The run log
    goes to log_dir (default: beside the shards in workdir). No validation: --val_tokens=0."""
    module = import_script(path)
    flags = ["--batch_stages=1"] + flags  # the last stage's batch, unless the flags say otherwise
    args, _ = module.parse_args(flags)
    n_train = (steps + 1) * args.batch_tokens + 1  # the compile warm-up rewinds the loader
    shard_dir = Path(workdir) / path.stem
    train = write_synthetic_shards(shard_dir, n_train, BENCH_DOC_TOKENS, args.vocab_size)  # none cut: doc_cap
    log_dir = Path(log_dir or shard_dir)
    with contextlib.redirect_stdout(sys.stderr):  # the script's own step lines: progress, not results
        summary = module.main(flags + [f"--train_files={train}", f"--num_iterations={steps}",
                                       "--val_tokens=0", f"--log_dir={log_dir}"])
    total, active, flops_per_token, _ = model_costs(module, args)
    seconds = summary["train_time_s"]
    tokens_per_s = summary["tokens_seen"] / seconds
    peak = peak_tflops(summary["device"])
    return dict(script=path.name, params_m=total / 1e6, active_params_m=active / 1e6,
                tokens_per_s=tokens_per_s, ms_per_step=1000 * seconds / summary["steps"],
                gflops_per_token=flops_per_token / 1e9, mfu=mfu(flops_per_token, tokens_per_s, peak),
                peak_mem_gb=summary["peak_mem_gb"], compile_s=summary["compile_warmup_s"],
                device=summary["device"], world_size=summary["world_size"], batch_tokens=args.batch_tokens,
                micro_batch=args.device_batch_tokens)


def format_table(rows):
    head = "| script | params (total/active) | tokens/s | ms/step | GFLOP/token | MFU | peak mem | compile |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        compile_s = f"{r['compile_s']:.0f} s" if r["compile_s"] is not None else "off"
        lines.append(f"| {r['script']} | {r['params_m']:.1f}M / {r['active_params_m']:.1f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['gflops_per_token']:.3f} | "
                     f"{mfu} | {r['peak_mem_gb']:.2f} GB | {compile_s} |")
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


def race_folder(out_root, name):
    """Where race() writes: records/proxy/<date>_<name>/."""
    return Path(out_root) / "proxy" / f"{datetime.date.today():%Y-%m-%d}_{name}"


def race(scripts, flags, minutes, name, out_root, command):
    """Train every script for the same training time on the same data; write the logs, a table and a plot to
    records/proxy/<date>_<name>/ and refresh records/README.md."""
    folder = race_folder(out_root, name)
    if folder.exists():
        raise SystemExit(f"error: {folder} exists; records are never overwritten: choose another --name")
    run_flags = flags + [f"--time_budget_s={60 * minutes}", "--num_iterations=1000000", f"--log_dir={folder}"]
    for script in scripts:  # every script's flags and data, checked before anything is written
        module = import_script(script)
        args, _ = module.parse_args(run_flags)
        module.check_train_is_not_val(args.train_files, args.val_files)
    made = folder  # the topmost folder the race makes (records/proxy/ too, in a new records tree)
    while not made.parent.exists():
        made = made.parent
    folder.mkdir(parents=True)
    try:
        summaries = []
        for script in scripts:
            module = import_script(script)
            summaries.append(module.main(run_flags))
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
            f"# Proxy race: {name}\n\nEvery script trained for {minutes:g} min of training time (validation "
            f"excluded) on the same data with the same settings, on {summaries[0]['device']} "
            f"x{summaries[0]['world_size']}, torch {torch.__version__}. Proxy data: a speed and "
            "loss-vs-tokens comparison, never a FineWeb result.\n\n"
            f"Command: `{command}`\n\n" + "\n".join(lines) + "\n" + plot, encoding="utf-8")
        leaderboard.write_readme(Path(out_root))
    except BaseException:  # failed or interrupted: no half record, and no folder that blocks the retry
        shutil.rmtree(made, ignore_errors=True)
        raise
    print("\n".join(lines) + f"\n\nwritten to {folder}")
    return summaries


# ---- gpu-check: checks of a CUDA GPU, each one command of under 10 minutes ----
STAGES = ("tests", "bench", "race")
# A stage ends within 560 s: its commands get the budget less the grace a command stopped at the budget has to
# write its report (530 s); the rest is packing the logs, so the whole command stays inside 10 minutes.
STAGE_BUDGET_S = 560.0
STOP_GRACE_S = 30.0  # SIGINT at the budget, SIGKILL this much later: pytest writes its report, a script its
# summary. One bench row at 124M with compile, measured on an H100 (torch 2.11, 2026-11-25, when the whole
# model was one graph): ~10 s start-up, 363 s compile warm-up (3 steps), 8 steps of 393,216 tokens at 943 ms;
# the 81 s its first validation took is gone (bench runs never validate). So a stage times ONE script: pass
# --scripts; the rest of a longer plan is skipped and reported. `--gpu-check quick` measures today's compile.
BENCH_RUN_S = 390.0
# A race entry's wall time besides its training minutes: the same start-up, compile warm-up and eval-graph
# compile, and its validations (1,048,576 tokens each). See race_minutes().
RACE_OVERHEAD_S = 470.0
TEST_TIMEOUT_S = 180  # per GPU test: the compile tests (a compiled and an eager run each) are the longest
PROXY_DIR = ROOT / "data" / "proxy"
PROXY_TRAIN, PROXY_VAL = "enwiki_train_*.bin", "owt_val_*.bin"
RACE_VAL_TOKENS = 1048576  # the benchmark's count; the OpenWebText sample's 1.59M tokens hold it
PROXY_RECIPE = """\
  export TIKTOKEN_CACHE_DIR=$PWD/../shared/data/tiktoken_cache
  python data/fineweb.py --from-text ../shared/data/enwiki2015/*.jsonl.xz --out data/proxy --prefix enwiki \\
      --val-tokens 0 --max-tokens 20000000
  python data/fineweb.py --from-text ../shared/data/webtext_samples/openwebtext_sample.jsonl.xz \\
      --out data/proxy --prefix owt --val-tokens all"""
CHILD_ENV = {"TRITON_INTERPRET": "0",  # conftest.py's CPU default: Triton (Inductor's too) in its interpreter
             "PYTHONUNBUFFERED": "1"}  # logs fill as a run goes, so a stopped run leaves what it printed
# quick: every phase in one command (the section `gpu-check quick` below)
BASELINE = "train_gpt2.py"
QUICK_BUDGET_S = 540.0  # 9 minutes: with the grace and the packing, one command stays inside 10 minutes
QUICK_PACK_S = 10.0  # kept back from the worker for the final report and the log archive
QUICK_STEPS = 4  # timed steps per batch stage and per idea, each after one untimed step
QUICK_DOC_TOKENS = 2048  # synthetic documents as long as the document cap (--doc_cap): none is cut
QUICK_LOGS = "quick_logs"  # the run logs' folder, packed into quick_logs.tar.gz
# (M, K, N): a 16,384-token micro-batch (M x K) times a weight (K x N) of the 124M model
GEMM_SHAPES = {"MLP up": (16384, 768, 3072), "MLP down": (16384, 3072, 768), "head": (16384, 768, 50304)}
COPY_MIB = 1024  # the device-to-device copy: 1 GiB read, 1 GiB written
# The planner's priors, each replaced by a measurement as the run goes (quick_estimates); est.: not measured.
CEILINGS_S = 30.0  # CUDA and cuBLAS start-up, 3 GEMMs and a copy, 13 runs each (est.)
# The baseline's set-up with its cold compile: the whole-model compile took 363 s on an H100 (2026-11-25); the
# regional compile of today is expected shorter, and this check measures it.
SETUP_PRIOR_S = 300.0
STEP_MFU_PRIOR = 0.25  # a step not yet timed: its 6N FLOPs at this fraction of the GEMM ceiling (est.)
STEP_PRIOR_S = 3.0  # a 393,216-token step when no ceiling is known either (est.)
PROFILE_FIXED_S = 20.0  # the profiler's start-up and its summary of ~10^4 kernels (est.)
IDEA_COMPILE_FACTOR = 1.3  # an idea's set-up and cold compile, times the baseline's measured one (est.)
IDEA_STEP_FACTOR = 1.5  # an idea's step, times the baseline's last-stage one (est.; MoE and MTP do more work)
TEARDOWN_S = 5.0  # freeing a model and resetting Dynamo between scripts
# a set-up whose graphs this command compiled before, from Inductor's on-disk cache, times the cold one (est.)
WARM_COMPILE_FRACTION = 0.5
EVAL_COMPILE_FRACTION = 0.3  # a race validates: its set-up compiles the eval forward too (est.: 81 vs 363 s)
VAL_TOKEN_COST = 0.5  # a validation token's time, times a training token's (a forward only is ~1/3; est.)
RACE_MIN_MINUTES = 1.0  # a shorter race says little: it is skipped instead
QUICK_NEEDS = {"stages": "baseline", "profile": "baseline", "race": "baseline"}  # its run, then its figures
STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a train script's exit when a signal ended its run


def quarter_minutes(seconds):
    """Whole quarter minutes in `seconds` (0 when there are none)."""
    return max(0.0, math.floor(seconds / 15) / 4)


def race_minutes(n_scripts, budget_s=STAGE_BUDGET_S, overhead_s=RACE_OVERHEAD_S):
    """Training minutes per script, in quarter minutes, so that n_scripts x (minutes + overhead) fits the
    budget less the grace: 1 script: (560 s - 30 s - 470 s) = 60 s, so 1 minute. At 943 ms per 393,216-token
    step on an H100, that is 60 or more steps (the early batch stages are smaller). Scripts compared in
    separate stage commands need the same --minutes."""
    minutes = quarter_minutes((budget_s - STOP_GRACE_S - n_scripts * overhead_s) / max(1, n_scripts))
    if minutes < 0.25:
        raise SystemExit(f"error: {n_scripts} scripts do not fit one race stage ({budget_s:.0f} s, "
                         f"~{overhead_s:.0f} s of start-up and compile each): race one script per command "
                         "(--scripts A, then --scripts B, with the same --minutes)")
    return minutes


def proxy_shards(proxy_dir=PROXY_DIR, val_tokens=RACE_VAL_TOKENS):
    """(train glob, val glob) of the race's proxy shards, or an error that gives the recipe to make them."""
    proxy_dir = Path(proxy_dir)
    train, val = sorted(proxy_dir.glob(PROXY_TRAIN)), sorted(proxy_dir.glob(PROXY_VAL))
    if not (train and val):
        raise SystemExit(f"error: the race needs proxy shards {proxy_dir}/{PROXY_TRAIN} and {PROXY_VAL}; "
                         f"found {len(train)} and {len(val)}.\nMake them once in the repo root, beside "
                         f"../shared/data (~10 s, 42 MB; README, The real run):\n{PROXY_RECIPE}\n"
                         "(data/proxy/ is git-ignored: every clone of the repo makes its own)")
    try:
        have = sum(fineweb.check_shard(str(f)) for f in val)
    except ValueError as e:
        raise SystemExit(f"error: {e}; remake the proxy shards:\n{PROXY_RECIPE}") from None
    if have < val_tokens + 1:
        raise SystemExit(f"error: {proxy_dir}/{PROXY_VAL} holds {have:,} tokens, fewer than "
                         f"--val_tokens={val_tokens} + 1: lower --val_tokens or remake the val shard:\n"
                         f"{PROXY_RECIPE}")
    return str(proxy_dir / PROXY_TRAIN), str(proxy_dir / PROXY_VAL)


@dataclasses.dataclass
class CheckOptions:
    scripts: list  # train scripts (Paths)
    flags: list = dataclasses.field(default_factory=list)  # every script's flags, --name=value (later win)
    steps: int = 10  # bench: timed steps per run; quick: per batch stage and per idea
    minutes: float | None = None  # race: training minutes per script (None: what fits the budget)
    val_every: int = 10  # race: ~40 steps, so 5 validations of ~1 s each
    val_tokens: int = RACE_VAL_TOKENS
    budget_s: float = STAGE_BUDGET_S
    proxy_dir: Path = PROXY_DIR
    device: str = ""
    race_script: Path = ROOT / "train_gpt2_mla.py"  # quick: the idea the baseline races
    records: Path = ROOT / "records"  # quick: the records tree the race's entry goes to
    gemm_shapes: dict = dataclasses.field(default_factory=lambda: dict(GEMM_SHAPES))  # quick: ceilings' GEMMs
    copy_mib: int = COPY_MIB  # quick: the ceilings' copy
    command: str = ""  # the command line, for the race's record

    PATHS = ("proxy_dir", "race_script", "records")

    def to_json(self):
        d = dataclasses.asdict(self)
        return dict(d, scripts=[str(s) for s in self.scripts], **{k: str(d[k]) for k in self.PATHS})

    @classmethod
    def from_json(cls, d):
        return cls(**dict(d, scripts=[Path(s) for s in d["scripts"]], **{k: Path(d[k]) for k in cls.PATHS},
                          gemm_shapes={k: tuple(v) for k, v in d["gemm_shapes"].items()}))


@dataclasses.dataclass
class Run:
    """One command of a stage: its log (a file in the stage's logs folder), its expected wall time, how it
    went."""
    label: str
    cmd: list
    log: str
    estimate_s: float = 0.0
    status: str = "not run"
    rc: int | None = None
    seconds: float = 0.0


def run_logged(cmd, log_path, timeout_s, env=None, grace_s=STOP_GRACE_S):
    """Run cmd in the repo root, stdout and stderr into log_path. At timeout_s it gets SIGINT (pytest still
    writes its report, a train script its summary), and SIGKILL grace_s later. Returns (exit code, seconds,
    timed out)."""
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
    """Run each command whose estimate fits in what is left of the budget, stopping it at the budget; skip the
    rest, saying why. So a stage never outlasts budget_s. Returns the stage's wall time."""
    start = clock()
    for run in runs:
        left = budget_s - (clock() - start) - STOP_GRACE_S
        if left < max(run.estimate_s, 1.0):
            run.status = (f"skipped: {max(left, 0):.0f} s left of the stage's budget, "
                          f"~{run.estimate_s:.0f} s needed")
            continue
        run.rc, run.seconds, timed_out = runner(run.cmd, logs / run.log, left, CHILD_ENV)
        run.status = ("stopped at the stage's budget" if timed_out else "ok" if run.rc == 0
                      else f"exit code {run.rc}")
    return clock() - start


# -- tests: pytest -m gpu tests (tests/test_gpu.py and the ideas' own CUDA tests) --
def script_test_filter(selected, every=None):
    """A pytest -k expression that leaves out the tests tied to the scripts not selected: those whose id names
    the script (test_sdpa_backend[train_gpt2_mla.py], test_compile_warmup[train_gpt2.py-kernels1]) and those
    in an idea's own test file (train_gpt2_moe.py: tests/test_moe.py). Tests tied to no script still run.
    None: every script."""
    every = sorted(ROOT.glob("train_gpt2*.py")) if every is None else every
    chosen = {Path(s).name for s in selected}
    left_out = []
    for script in (Path(s) for s in every):
        if script.name not in chosen:
            idea = script.stem.removeprefix("train_gpt2").lstrip("_")
            own_tests = ROOT / "tests" / f"test_{idea}.py"
            left_out += [script.name] + ([own_tests.name] if idea and own_tests.exists() else [])
    return f"not ({' or '.join(left_out)})" if left_out else None


def plan_tests(logs, o):
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rA", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1",  # xunit1 keeps the tests' record_property figures in the xml
           f"--junitxml={logs / 'junit.xml'}"]
    keep = script_test_filter(o.scripts)
    if keep:
        cmd += ["-k", keep]
    if importlib.util.find_spec("pytest_timeout"):  # per test; the stage's budget bounds the whole run anyway
        cmd.append(f"--timeout={TEST_TIMEOUT_S}")
    note = (f"pytest -m gpu tests{f' -k {shlex.quote(keep)}' if keep else ''}; each test stopped at "
            f"{TEST_TIMEOUT_S} s, the run at {o.budget_s - STOP_GRACE_S:.0f} s")
    return [Run("pytest", cmd, "pytest.txt")], note, {}


def read_junit(path):
    """[{name, outcome, seconds, message, figures}] from pytest's junit xml; figures are the record_property
    ones."""
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
    found = re.findall(r"^tests/\S+?\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", path.read_text(),
                       re.M)
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
    lines = [f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
             f"{counts['skipped']} skipped (pytest: {run.status}).", "", "| test | outcome | s | figures |",
             "|---|---|---|---|"]
    for t in tests:
        figures = "; ".join(f"{k} = {v}" for k, v in t["figures"].items())
        lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {figures} |")
    failed = [t for t in tests if t["outcome"] in ("failed", "error", "skipped")]
    if failed:
        lines += ["", "Not passed:", ""] + [f"- {t['name']} ({t['outcome']}): {one_line(t['message'], 400)}"
                                            for t in failed]
    return dict(counts=counts, tests=tests), "\n".join(lines), problems


# -- bench: the table, with and without --kernels=1 --
def plan_bench(logs, o):
    runs = []
    for k in (0, 1):  # every script without the kernels first: if time runs short, the plain table is whole
        for script in o.scripts:
            stem = f"{script.stem}_kernels{k}"
            cmd = [sys.executable, ROOT / "bench.py", "--scripts", script, "--steps", o.steps, "--json",
                   "--log_dir", logs / stem, "--set", "compile=1", f"kernels={k}", *(f[2:] for f in o.flags)]
            runs.append(Run(f"{script.name} --kernels={k}", cmd, f"{stem}.log", BENCH_RUN_S))
    total, usable = len(runs) * BENCH_RUN_S, o.budget_s - STOP_GRACE_S
    note = (f"{len(o.scripts)} scripts x 2 (--kernels=0, 1) x ~{BENCH_RUN_S:.0f} s (start-up, compile "
            f"warm-up, {o.steps} steps, FLOP count) = {total:.0f} s {'<=' if total <= usable else '>'} "
            f"{usable:.0f} s"
            + ("" if total <= usable else ": the last runs will be skipped; split them with --scripts"))
    return runs, note, {}


def read_bench_row(path):
    """The JSON row a `bench.py --json` child printed (its only stdout line that starts so), or None."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    for line in reversed(text.splitlines()):
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
        entries.append(dict(label=run.label, kernels=int(run.label.endswith("=1")), status=run.status,
                            row=row))
        if row is None:
            problems.append(f"bench {run.label}: {run.status}")
    measured = [dict(e["row"], script=e["label"]) for e in entries if e["row"]]
    lines = [format_table(measured) if measured else "No run finished."]
    by_label = {e["label"]: e["row"] for e in entries}
    pairs = [(s.name, by_label.get(f"{s.name} --kernels=0"), by_label.get(f"{s.name} --kernels=1"))
             for s in o.scripts]
    changes = [f"- {name}: tokens/s x{on['tokens_per_s'] / off['tokens_per_s']:.3f}, peak memory "
               f"{off['peak_mem_gb']:.2f} -> {on['peak_mem_gb']:.2f} GB"
               for name, off, on in pairs if off and on]
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
               f"--val_tokens={o.val_tokens}", f"--val_every={o.val_every}",
               f"--time_budget_s={60 * minutes:g}",
               "--num_iterations=1000000", f"--log_dir={logs / script.stem}", *o.flags]
        runs.append(Run(script.name, cmd, f"{script.stem}.console.txt", 60 * minutes + RACE_OVERHEAD_S))
    total, usable = sum(r.estimate_s for r in runs), o.budget_s - STOP_GRACE_S
    note = (f"{len(runs)} scripts x ({minutes:g} min of training + ~{RACE_OVERHEAD_S:.0f} s start-up, "
            f"compile and validation) = {total:.0f} s {'<=' if total <= usable else '>'} {usable:.0f} s")
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
    lines = [f"Every script trained {info['minutes']:g} min (training time: validation and compile excluded) "
             f"on {info['train_files']}, validated on the first {o.val_tokens:,} tokens of "
             f"{info['val_files']}. Proxy data: a speed and loss-vs-tokens comparison, never a FineWeb "
             "result.", ""]
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


def pack_logs(folder, tar_path):
    """The folder as one .tar.gz (a results folder stays a few files), written whole or not at all."""
    with tarfile.open(f"{tar_path}.tmp", "w:gz") as tar:
        tar.add(folder, arcname=Path(tar_path).name.removesuffix(".tar.gz"))
    os.replace(f"{tar_path}.tmp", tar_path)


def run_stage(name, out, o, runner, clock):
    """Plan, run within the budget, collect; write <name>.json, <name>.md and <name>_logs.tar.gz into out."""
    if (out / f"{name}.json").exists():
        raise SystemExit(f"error: {out / name}.json exists; results are never overwritten: choose another "
                         "--out")
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
          f"{o.budget_s:.0f} s budget. Plan: {note}. Raw logs: {name}_logs.tar.gz; versions: "
          "environment.txt.\n\n"
          f"{body}\n")
    (out / f"{name}.md").write_text(md, encoding="utf-8")
    pack_logs(logs, out / f"{name}_logs.tar.gz")
    shutil.rmtree(logs)
    print(md, flush=True)
    return result


# ---- gpu-check quick: one command, its phases in one worker process ----
def quick_ideas(o):
    """The ideas phase's runs, (label, script, extra flags), in order: the race's script first (the race then
    starts from its compiled code), the baseline with --kernels=1, then the other idea scripts of
    o.scripts."""
    runs = [] if o.race_script.name == BASELINE else [(o.race_script.name, o.race_script, [])]
    runs.append((f"{BASELINE} --kernels=1", ROOT / BASELINE, ["--kernels=1"]))
    return runs + [(s.name, s, []) for s in o.scripts if s.name not in (BASELINE, o.race_script.name)]


def quick_items(o):
    """The check's items, by priority: the baseline's four phases, one item per idea run, the race."""
    ideas = [f"idea {label}" for label, _, _ in quick_ideas(o)]
    return ["ceilings", "baseline", "stages", "profile", *ideas, "race"]


@dataclasses.dataclass
class Measured:
    """What the planner knows: the baseline's batch stages and FLOPs from its flags, then each figure
    measured."""
    stage_batches: list  # tokens per step of each batch stage
    flops_6n: float  # the baseline's matmul FLOPs per token
    peak_tflops: float | None = None  # the datasheet's (PEAK_TFLOPS)
    gemm_tflops: float | None = None  # the ceilings phase's fastest GEMM
    setup_s: float | None = None  # the baseline's set-up, cold compile included
    step_s: dict = dataclasses.field(default_factory=dict)  # batch stage (0-based) -> seconds per step
    idea_setup_s: dict = dataclasses.field(default_factory=dict)  # idea label -> its set-up, compile included
    proxy: str | None = None  # why there is no race (no proxy shards), or None

    def step(self, stage):
        """(seconds per step of a batch stage, how that was found): measured; else scaled by tokens from the
        last stage measured; else its 6N FLOPs at STEP_MFU_PRIOR of the GEMM ceiling (or the datasheet's);
        else STEP_PRIOR_S per 393,216 tokens."""
        tokens = self.stage_batches[stage]
        if stage in self.step_s:
            return self.step_s[stage], "measured"
        if self.step_s:
            known = max(self.step_s)
            return self.step_s[known] * tokens / self.stage_batches[known], f"scaled from stage {known + 1}"
        rate = self.gemm_tflops or self.peak_tflops
        if rate:
            return (tokens * self.flops_6n / (STEP_MFU_PRIOR * rate * 1e12),
                    f"6N at {STEP_MFU_PRIOR:.0%} of {rate:.4g} TFLOP/s")
        return STEP_PRIOR_S * tokens / 393216, "prior"


@dataclasses.dataclass
class Estimate:
    seconds: float | None  # None: the item cannot run, and `why` says why
    why: str  # how the estimate was reached, or why the item cannot run
    params: dict = dataclasses.field(default_factory=dict)  # what the item runs with (steps, minutes)


def fit_steps(step_s, left_s, wanted):
    """The most timed steps per stage, from wanted down to 1, whose (1 untimed + n) steps in every stage fit
    left_s; 1 when even that does not (the planner then skips the phase)."""
    return next((n for n in range(wanted, 0, -1) if sum(step_s) * (1 + n) <= left_s), 1)


def race_estimate(m, o, left_s, setup_s):
    """The race's wall time and its minutes per script: each script's set-up (warm when this command compiled
    its graphs: WARM_COMPILE_FRACTION; its eval graph is compiled cold: EVAL_COMPILE_FRACTION), two
    validations (step 0 and the last), one step past the time budget, then its training time, with the
    validations every val_every steps on top. The minutes fill what is left (quarter minutes, at least
    RACE_MIN_MINUTES), or are o.minutes."""
    stages = range(len(m.stage_batches))
    last_step = m.step(stages[-1])[0]
    mean_step = sum(m.step(k)[0] for k in stages) / len(stages)  # a time-budgeted run passes every stage
    val_s = o.val_tokens * last_step / m.stage_batches[-1] * VAL_TOKEN_COST
    per_train_s = 1 + val_s / (o.val_every * mean_step)  # wall seconds per training second, with validations
    fixed = 0.0
    for label in (BASELINE, o.race_script.name):
        cold = m.idea_setup_s.get(label, setup_s if label == BASELINE else IDEA_COMPILE_FACTOR * setup_s)
        compiled = label == BASELINE or label in m.idea_setup_s
        setup = cold * ((WARM_COMPILE_FRACTION if compiled else 1) + EVAL_COMPILE_FRACTION)
        fixed += setup + 2 * val_s + last_step
    minutes = o.minutes if o.minutes is not None else max(
        RACE_MIN_MINUTES, quarter_minutes((left_s - fixed) / (2 * per_train_s)))
    seconds = fixed + 2 * 60 * minutes * per_train_s
    why = (f"2 x {minutes:g} min of training x {per_train_s:.2f} (validations every {o.val_every} steps of "
           f"~{val_s:.1f} s) + {fixed:.0f} s of set-up, compile and first/last validations")
    return Estimate(seconds, why, dict(minutes=minutes))


def quick_estimates(order, m, o, left_s):
    """Each item's expected seconds (or why it cannot run), from what m holds so far and left_s, the seconds
    left."""
    setup = m.setup_s if m.setup_s is not None else SETUP_PRIOR_S
    setup_why = f"{'measured' if m.setup_s is not None else 'prior'} {setup:.0f} s"
    steps = [m.step(k)[0] for k in range(len(m.stage_batches))]
    last_step, last_why = m.step(len(steps) - 1)
    estimates = {}
    for name in order:
        if name == "ceilings":
            estimates[name] = Estimate(CEILINGS_S, "prior: 3 GEMMs and a copy")
        elif name == "baseline":
            estimates[name] = Estimate(setup, f"set-up and cold compile: {setup_why}")
        elif name == "stages":
            n = fit_steps(steps, left_s, o.steps)
            each = " / ".join(f"{s:.2f}" for s in steps)
            estimates[name] = Estimate(sum(steps) * (1 + n), f"{len(steps)} stages x (1 + {n}) steps of "
                                       f"{each} s ({m.step(0)[1]})", dict(steps=n))
        elif name == "profile":
            estimates[name] = Estimate(2 * last_step + PROFILE_FIXED_S, f"a {last_step:.2f} s step "
                                       f"({last_why}), profiled, + {PROFILE_FIXED_S:.0f} s")
        elif name.startswith("idea "):
            if m.idea_setup_s:  # the slowest idea set-up so far (their shared graphs now come from the cache)
                idea_setup = max(m.idea_setup_s.values())
                idea_why = f"the slowest idea set-up so far, {idea_setup:.0f} s"
            else:
                idea_setup = IDEA_COMPILE_FACTOR * setup
                idea_why = f"{IDEA_COMPILE_FACTOR:g} x the baseline's set-up ({setup_why})"
            seconds = idea_setup + (1 + o.steps) * IDEA_STEP_FACTOR * last_step + TEARDOWN_S
            estimates[name] = Estimate(seconds, f"{idea_why} + (1 + {o.steps}) steps of "
                                       f"{IDEA_STEP_FACTOR:g} x {last_step:.2f} s", dict(steps=o.steps))
        elif name == "race":
            estimates[name] = Estimate(None, m.proxy) if m.proxy else race_estimate(m, o, left_s, setup)
    return estimates


def plan_next(order, estimates, statuses, spent_s, budget_s, needs=QUICK_NEEDS):
    """(the next item to run, or None; {item: why it is skipped}) over the items of `order` not yet in
    statuses (item -> its status, "ok" when it succeeded). An item runs when the item it needs succeeded and
    its estimate fits what is left of budget_s after spent_s; each one before it that does not is skipped,
    saying why."""
    left, skipped = budget_s - spent_s, {}
    for name in order:
        if name in statuses:
            continue
        need, estimate = needs.get(name), estimates[name]
        if need and statuses.get(need) != "ok":
            how = (statuses.get(need) or "did not run").split(":")[0]
            skipped[name] = f"skipped: needs the {need}, which {how}"
        elif estimate.seconds is None:
            skipped[name] = f"skipped: {estimate.why}"
        elif estimate.seconds > left:
            skipped[name] = f"skipped: needs ~{estimate.seconds:.0f} s, {max(left, 0):.0f} s left"
        else:
            return name, skipped
    return None, skipped


# -- the measurements: each takes its device (and shapes, a run) as arguments, so each runs on a CPU too --
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup=3, reps=10):
    """The median time of fn() after warmup calls: CUDA events on a GPU (no host time in it), the host clock
    on a CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gemm_seconds(M, K, N, device):
    """The median time of a bf16 (M, K) x (K, N) matmul into a preallocated output."""
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=device, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=device, dtype=torch.bfloat16)
    return median_seconds(lambda: torch.mm(a, b, out=out), device)


def copy_seconds(n_bytes, device):
    """The median time of a device-to-device copy of n_bytes."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), device)


def measure_ceilings(device, shapes=GEMM_SHAPES, copy_mib=COPY_MIB):
    """The device's own ceilings: bf16 GEMM TFLOP/s at each (M, K, N) of shapes (2 M K N FLOPs), the fastest
    of them as the GEMM ceiling, and device-to-device copy GB/s (bytes read + bytes written)."""
    gemms = []
    for name, (M, K, N) in shapes.items():
        seconds = gemm_seconds(M, K, N, device)
        gemms.append(dict(name=name, shape=[M, K, N], ms=1000 * seconds,
                          tflops=2 * M * K * N / seconds / 1e12))
    seconds = copy_seconds(copy_mib * 2**20, device)
    if device.type == "cuda":  # the training runs after this get the memory back
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return dict(gemm=gemms, gemm_ceiling_tflops=max(g["tflops"] for g in gemms),
                peak_tflops=peak_tflops(name), copy_gb_per_s=2 * copy_mib * 2**20 / seconds / 1e9,
                copy_mib=copy_mib)


# torch._dynamo.utils.compile_times' timers, the first name found wins. They nest: Dynamo's compile_inner
# holds the backend call, which holds AOTAutograd's create_aot_dispatcher_function, which holds Inductor's
# forward compile (compile_fx_inner); Inductor compiles the backward lazily, at the first backward, outside.
COMPILE_TIMERS = dict(dynamo=("_compile.compile_inner", "compile_inner"),
                      backend=("OutputGraph.call_user_compiler", "call_user_compiler"),
                      aot=("create_aot_dispatcher_function",),
                      inductor=("compile_fx_inner", "fx_codegen_and_compile"),
                      backward=("compile_fx.<locals>.bw_compiler",))


def compile_metrics():
    """{timer: seconds} of every compile in this process so far (compile_times' aggregate, which only
    grows)."""
    from torch._dynamo.utils import compile_times
    names, values = compile_times(repr="csv", aggregate=True)
    return {n: float(v) for n, v in zip(names, values)}


def compile_breakdown(metrics):
    """Dynamo, AOTAutograd and Inductor seconds, each its own time, from the nested timers in metrics: Dynamo
    = compile_inner - the backend call; AOTAutograd = create_aot_dispatcher_function - the Inductor forward
    compiles inside it; Inductor = compile_fx_inner (forward and backward) + the backend's set-up around
    AOTAutograd. They add up to compile_inner + the lazy backward compile. None where no timer exists (nothing
    compiled)."""
    keys = {k: next((n for n in names if n in metrics), None) for k, names in COMPILE_TIMERS.items()}
    t = {k: metrics[n] if n else 0.0 for k, n in keys.items()}
    if keys["dynamo"] is None:
        return dict(dynamo_s=None, aot_s=None, inductor_s=None, total_s=None, timers=keys)
    return dict(dynamo_s=t["dynamo"] - t["backend"], aot_s=t["aot"] - (t["inductor"] - t["backward"]),
                inductor_s=t["inductor"] + t["backend"] - t["aot"], total_s=t["dynamo"] + t["backward"],
                timers=keys)


def setup_script(path, flags):
    """Import a train script and run its setup() (with compile on, its warm-up: one training step); returns
    (module, run, what the set-up cost: seconds, the compile's breakdown, graphs, graph breaks, the model)."""
    from torch._dynamo.utils import counters
    module = import_script(path)
    before, graphs = compile_metrics(), counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its start-up lines: progress, not results
        run = module.setup(flags)
    setup_s = time.perf_counter() - t0
    metrics = {k: v - before.get(k, 0.0) for k, v in compile_metrics().items()}
    args, model = run.args, run.raw_model
    figures = dict(script=path.name, setup_s=setup_s, compile_warmup_s=run.state.get("compile_warmup"),
                   compile=compile_breakdown(metrics),
                   unique_graphs=counters["stats"]["unique_graphs"] - graphs,
                   graph_breaks=sum(counters["graph_break"].values()) - breaks,
                   params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   micro_batch=args.device_batch_tokens, stage_batches=module.stage_batches(args),
                   run_log=Path(run.log.path).name,
                   describe=model.describe() or None)
    grouped = [m.grouped for m in model.modules() if hasattr(m, "grouped")]  # MoE: torch._grouped_mm
    if grouped:  # it runs on CUDA under bf16 autocast; elsewhere the dense fallback does
        bf16_cuda = run.device.type == "cuda" and run.amp_dtype == torch.bfloat16
        figures["grouped_gemm"] = all(grouped) and bf16_cuda
    return module, run, figures


def stage_step(module, args, stage, count):
    """The first of `count` consecutive steps inside batch stage `stage` (0-based): steps whose batch and
    windows are that stage's. One set-up serves every stage, since a stage changes only the accumulation
    count."""
    want = module.stage_batches(args)[stage]
    inside = lambda s: module.batch_stage(module.run_progress(s, args), args)[0] == want  # noqa: E731
    first = next((s for s in range(stage * args.num_iterations // args.batch_stages, args.num_iterations)
                  if inside(s)), None)
    if first is None or not all(inside(first + i) for i in range(count)):
        raise ValueError(f"batch stage {stage + 1} of --num_iterations={args.num_iterations} holds fewer "
                         f"than {count} steps")
    return first


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def time_steps(module, run, stage, steps, untimed=1):
    """Time `steps` optimizer steps of a batch stage after `untimed` ones, the host never waiting between them
    (as in the train loop); returns (figures, the loader's position before the timed steps)."""
    args, device = run.args, run.device
    first = stage_step(module, args, stage, untimed + steps)
    batch = module.stage_batches(args)[stage]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(untimed):
        module.train_step(run, first + i)
    synchronize(device)
    loader_at = run.train_loader.state_dict()
    t0 = time.perf_counter()
    losses = [module.train_step(run, first + untimed + i) for i in range(steps)]
    synchronize(device)
    seconds = time.perf_counter() - t0
    return dict(stage=stage + 1, batch_tokens=batch, steps=steps, ms_per_step=1000 * seconds / steps,
                tokens_per_s=batch * steps / seconds, peak_mem_gb=peak_memory_gb(device),
                loss=float(losses[-1]), windows=run.raw_model.windows.tolist()), loader_at


def attention_keys(idx, window):
    """The keys the queries of token streams idx (B, T) see under the train scripts' document masks, summed
    over the queries: a query sees its own document's keys, itself included, fewer than `window` back; a
    document starts at each <|endoftext|> and at the stream's start. So a query at position p of its document
    sees min(p + 1, window)."""
    t = torch.arange(idx.size(-1), device=idx.device)
    starts = torch.where(idx == EOT, t, 0).cummax(dim=-1).values
    return torch.clamp(t - starts + 1, max=window).sum()


def layer_keys(run, loader_at, steps, batch):
    """Each layer's mean keys per query over the batches of the timed steps (replayed from the loader's
    position loader_at, then put back), with each layer's window (long or short) of the stage now
    scheduled."""
    args, model, loader = run.args, run.raw_model, run.train_loader
    if args.attention != "flex":  # causal rows of seq_len, no documents, no windows
        return [(args.seq_len + 1) / 2] * len(model.blocks)
    long, short = model.windows.tolist()
    after = loader.state_dict()
    loader.load_state_dict(loader_at)
    sums, queries = {long: 0, short: 0}, 0
    for _ in range(steps * batch // (args.device_batch_tokens * run.world)):
        x, _ = loader.next_batch()
        for window in sums:
            sums[window] += attention_keys(x, window)
        queries += x.numel()
    loader.load_state_dict(after)
    return [float(sums[long if block.long_window else short]) / queries if getattr(block, "attn", True) is not None
            else 0.0 for block in model.blocks]  # a block without attention (the record's layer 6) sees no keys


def attention_flops(n_embd, keys_per_layer):
    """Training FLOPs per token of attention over the keys each query sees: per query-key pair and layer, QK^T
    and AV forward are 4 x n_embd, the backward twice that: 12 x n_embd."""
    return 12 * n_embd * sum(keys_per_layer)


def stage_mfus(flops_6n, flops_attention, tokens_per_s, peak, ceiling):
    """MFU of a stage in both conventions (6N; 6N + attention) against the datasheet peak and the measured
    GEMM ceiling; None where a denominator is unknown."""
    return {f"mfu_{kind}_{against}": mfu(flops, tokens_per_s, tflops)
            for kind, flops in (("6n", flops_6n), ("attention", flops_6n + flops_attention))
            for against, tflops in (("peak", peak), ("ceiling", ceiling))}


def baseline_stages(module, run, steps, flops_6n, peak, ceiling):
    """Every batch stage from the one set-up: timed steps, then the attention each query saw in them and
    MFU."""
    rows = []
    for stage in range(run.args.batch_stages):
        row, loader_at = time_steps(module, run, stage, steps)
        keys = layer_keys(run, loader_at, steps, row["batch_tokens"])
        flops_attention = attention_flops(run.args.n_embd, keys)
        long = [k for k, block in zip(keys, run.raw_model.blocks) if block.long_window]
        short = [k for k, block in zip(keys, run.raw_model.blocks) if not block.long_window]
        row.update(keys_long=long[0] if long else None, keys_short=short[0] if short else None,
                   gflops_6n=flops_6n / 1e9, gflops_attention=flops_attention / 1e9,
                   **stage_mfus(flops_6n, flops_attention, row["tokens_per_s"], peak, ceiling))
        rows.append(row)
    return rows


# -- the profile: one last-stage step, by kernel class --
KERNEL_CLASSES = ("GEMM", "attention", "elementwise/reduction", "optimizer", "communication", "other")
GEMM_RE = re.compile(r"cutlass|cublas|gemm|nvjet|xmma|sm90|xxt_kernel"  # xxt: kernels/' X X^T (Newton-Schulz)
                     r"|(?<![a-z])(mm|bmm|addmm|baddbmm|matmul|_?grouped_mm)(?![a-z])")
ATTENTION_RE = re.compile(r"flex|tem_fused|flash|fmha|sdpa|scaled_dot_product|attention")
ELEMENTWISE_RE = re.compile(r"^(triton_poi|triton_red|triton_per|aten::)|elementwise|reduce_kernel|at::native"
                            r"|softcap_ce|cross_entropy|softmax")  # softcap_ce: kernels/' fused loss


def kernel_class(name):
    """The class of a kernel (or, on a CPU, an operator) by its name: communication (NCCL); attention
    (FlexAttention's Triton templates, triton_tem_fused_*, unless a GEMM template; SDPA's flash/cuDNN
    kernels); GEMM (cuBLAS, CUTLASS, nvjet, mm, kernels/' xxt); optimizer (fused Adam, foreach,
    multi_tensor_apply); elementwise/reduction (Inductor's triton_poi/red/per kernels, aten's, the loss
    kernels); other (copies, sets, the rest)."""
    n = name.lower()
    if "nccl" in n:
        return "communication"
    if ATTENTION_RE.search(n) and not ("tem_fused" in n and GEMM_RE.search(n.replace("tem_fused", ""))):
        return "attention"
    if re.search(r"multi_tensor_apply|adam|foreach", n):
        return "optimizer"
    if GEMM_RE.search(n):
        return "GEMM"
    if ELEMENTWISE_RE.search(n):
        return "elementwise/reduction"
    return "other"


def profile_summary(events, top_gaps=5):
    """events: (name, start_us, duration_us) of what ran on the device in one step. Kernel time by class; the
    step's span on the device (first start to last end), the time no kernel ran (the span less the union of
    the kernels' intervals) and the largest such gaps, with the kernels on either side."""
    if not events:
        raise ValueError("the profiler recorded nothing on the device (is CUPTI available to this process?)")
    events = sorted(events, key=lambda e: e[1])
    classes = {c: dict(ms=0.0, kernels=0) for c in KERNEL_CLASSES}
    for name, _, duration in events:
        classes[kernel_class(name)]["ms"] += duration / 1000
        classes[kernel_class(name)]["kernels"] += 1
    busy, gaps, (name0, start, duration) = 0.0, [], events[0]
    begin, end, before = start, start + duration, name0
    for name, start, duration in events[1:]:
        if start > end:
            busy += end - begin
            gaps.append(dict(ms=(start - end) / 1000, at_ms=(end - events[0][1]) / 1000, after=before[:100],
                             before=name[:100]))
            begin = start
        if start + duration >= end:
            end, before = start + duration, name
    busy += end - begin
    span = max(s + d for _, s, d in events) - events[0][1]
    total = sum(c["ms"] for c in classes.values())
    for c in classes.values():
        c["share"] = c["ms"] / total if total else 0.0
    return dict(span_ms=span / 1000, busy_ms=busy / 1000, idle_ms=(span - busy) / 1000,
                idle_share=(span - busy) / span if span else 0.0, kernels=len(events), classes=classes,
                largest_gaps=sorted(gaps, key=lambda g: -g["ms"])[:top_gaps])


def own_intervals(event):
    """(start_us, duration_us) of the parts of a CPU operator's time when none of the operators it called
    ran."""
    start, pieces = event.time_range.start, []
    for child in sorted(event.cpu_children, key=lambda c: c.time_range.start):
        if child.time_range.start > start:
            pieces.append((start, child.time_range.start - start))
        start = max(start, child.time_range.end)
    return pieces + ([(start, event.time_range.end - start)] if event.time_range.end > start else [])


def profile_events(prof, device):
    """(name, start_us, duration_us) of what ran on the device: CUDA kernels, copies and sets. On a CPU, the
    operators' own time (the operators they called excluded), so that nothing is counted twice."""
    from torch.autograd import DeviceType
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    if device.type == "cuda":
        return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events]
    return [(e.name, start, duration) for e in events for start, duration in own_intervals(e)]


def profile_step(module, run, logs):
    """One last-stage step under torch.profiler; its kernel classes and idle gaps, and the profiler's
    key_averages table (the kernels by self time) in logs/profile_key_averages.txt."""
    from torch.profiler import ProfilerActivity, profile
    args, device = run.args, run.device
    step = stage_step(module, args, args.batch_stages - 1, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        float(module.train_step(run, step))  # float(): the step's kernels have all run inside the profile
    by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=by, row_limit=100, max_name_column_width=100)
    (logs / "profile_key_averages.txt").write_text(table + "\n", encoding="utf-8")
    return dict(profile_summary(profile_events(prof, device)), batch_tokens=module.stage_batches(args)[-1],
                micro_steps=module.stage_batches(args)[-1] // (args.device_batch_tokens * run.world))


def free_compiled():
    """Between scripts: the last one's memory and compiled code freed (its on-disk cache stays, warming the
    next)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def quick_flags(o, train_files, log_dir, extra=()):
    """A quick-check run's flags: three batch stages and compile on (o.flags, the preset and --set, may change
    them), the given data and no validation (the check never validates outside the race)."""
    return ["--batch_stages=3", "--compile=1", *o.flags, *extra, f"--train_files={train_files}",
            "--val_tokens=0", f"--log_dir={log_dir}"]


def quick_train_files(o, shard_dir, batch_tokens, vocab_size):
    """(train glob, what it is): the proxy training shards when present, else synthetic 2,048-token documents
    (the loader starts over at the end of its shards, so a few batches' worth is enough)."""
    if sorted(Path(o.proxy_dir).glob(PROXY_TRAIN)):
        return str(Path(o.proxy_dir) / PROXY_TRAIN), f"the proxy shards {Path(o.proxy_dir) / PROXY_TRAIN}"
    n = -(-4 * batch_tokens // QUICK_DOC_TOKENS) * QUICK_DOC_TOKENS + 1
    return (write_synthetic_shards(shard_dir, n, QUICK_DOC_TOKENS, vocab_size),
            f"synthetic: uniform random GPT-2 ids in {QUICK_DOC_TOKENS:,}-token documents")


def quick_val_files(o, shard_dir, tokens, vocab_size):
    """A validation glob holding `tokens` + 1 tokens, for the baseline's warm-up to compile its evaluation
    graph (one forward; the check never validates): the proxy val shards when present, else synthetic ones."""
    if sorted(Path(o.proxy_dir).glob(PROXY_VAL)):
        return str(Path(o.proxy_dir) / PROXY_VAL)
    return write_synthetic_shards(shard_dir, tokens + 1, QUICK_DOC_TOKENS, vocab_size, seed=1,
                                  prefix="bench_val")


def quick_race(o, minutes, logs, out):
    """The race of the baseline and o.race_script for `minutes` of training each, by race(): a records/proxy/
    entry; its folder is copied into the logs and its plot into out."""
    train, val = proxy_shards(o.proxy_dir, o.val_tokens)
    name = f"GpuCheck-{o.race_script.stem.removeprefix('train_gpt2_')}-{datetime.datetime.now():%H%M%S}"
    flags = ["--compile=1", f"--train_files={train}", f"--val_files={val}", f"--val_tokens={o.val_tokens}",
             f"--val_every={o.val_every}", *o.flags]
    summaries = race([ROOT / BASELINE, o.race_script], flags, minutes, name, o.records, o.command)
    folder = race_folder(o.records, name)
    shutil.copytree(folder, logs / "race_record" / folder.name)
    plot = (folder / "plot.png").exists()
    if plot:
        shutil.copy(folder / "plot.png", out / "race_plot.png")
    return dict(minutes=minutes, record=str(folder), summaries=summaries, table=race_table(summaries),
                plot=plot)


# -- the report: quick.json and quick.md, rewritten after every item --
def one_line(text, limit=300):
    return " ".join(str(text).split())[:limit]


def quick_problems(report):
    """Items that failed, were stopped or killed or never reached, and a worker that did not end well."""
    bad = ("failed", "stopped", "killed", "not run")
    problems = [f"{name}: {item['status']}" for name, item in report["items"].items()
                if item["status"].startswith(bad)]
    worker = report["worker"]["status"]
    return problems + ([f"worker: {worker}"] if worker not in ("ok", "running") else [])


def fmt(value, spec, suffix=""):
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def fmt_s(seconds):
    return "n/a" if seconds is None else f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def markdown_ceilings(r):
    lines = ["| GEMM (bf16) | M x K x N | ms | TFLOP/s | of the datasheet peak |", "|---|---|---|---|---|"]
    for g in r["gemm"]:
        share = g["tflops"] / r["peak_tflops"] if r["peak_tflops"] else None
        lines.append(f"| {g['name']} | {' x '.join(map(str, g['shape']))} | {g['ms']:.3f} | "
                     f"{g['tflops']:.4g} | {fmt(share, '.1%')} |")
    return lines + ["", f"Device-to-device copy of {r['copy_mib']} MiB: {r['copy_gb_per_s']:.0f} GB/s (bytes "
                    f"read + written). Datasheet dense bf16 peak: {fmt(r['peak_tflops'], '.1f', ' TFLOP/s')} "
                    f"(PEAK_TFLOPS). Measured GEMM ceiling, the fastest shape: "
                    f"{r['gemm_ceiling_tflops']:.4g} TFLOP/s: the second MFU denominator below."]


def markdown_setup(r):
    c = r["compile"]
    timers = ", ".join(f"{k}: `{v}`" for k, v in c["timers"].items() if v)
    lines = [f"Set-up {r['setup_s']:.1f} s, of which the compile warm-up "
             f"{fmt(r['compile_warmup_s'], '.1f', ' s')} (one real training step and one evaluation forward, "
             "which compile every graph). Compile: Dynamo "
             f"{fmt(c['dynamo_s'], '.1f', ' s')}, AOTAutograd {fmt(c['aot_s'], '.1f', ' s')}, Inductor "
             f"{fmt(c['inductor_s'], '.1f', ' s')} (of {fmt(c['total_s'], '.1f', ' s')} compiling; each its "
             f"own time, from compile_times' timers {timers or '(none: nothing compiled)'}); "
             f"{r['unique_graphs']} graphs, {r['graph_breaks']} graph breaks. {r['params_m']:.2f}M "
             f"parameters, micro-batch {r['micro_batch']:,} tokens."]
    if r.get("data"):
        lines[0] += f" Data: {r['data']}."
    if r.get("describe"):
        lines.append(f"\nThe model says: {r['describe']}")
    return lines


def markdown_stages(rows):
    lines = ["| stage | tokens/step | windows long/short | timed steps | ms/step | tokens/s | peak mem | "
             "keys/query long/short | GFLOP/token 6N + attention | MFU 6N: peak / ceiling | "
             "MFU with attention: peak / ceiling |", "|---" * 11 + "|"]
    for r in rows:
        mfus = " | ".join(f"{fmt(r[f'mfu_{kind}_peak'], '.1%')} / {fmt(r[f'mfu_{kind}_ceiling'], '.1%')}"
                          for kind in ("6n", "attention"))
        lines.append(f"| {r['stage']} | {r['batch_tokens']:,} | {r['windows'][0]} / {r['windows'][1]} | "
                     f"{r['steps']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r['peak_mem_gb'], '.2f', ' GB')} | {fmt(r['keys_long'], '.0f')} / "
                     f"{fmt(r['keys_short'], '.0f')} | {r['gflops_6n']:.3f} + {r['gflops_attention']:.3f} | "
                     f"{mfus} |")
    return lines + ["", "6N: 6 FLOPs per matmul weight per token (forward and backward). With attention: "
                    "plus 12 x n_embd per query-key pair and layer, over the keys each query of these "
                    "batches saw (its own document, within its layer's window). Peak: the datasheet's; "
                    "ceiling: the fastest GEMM measured above."]


def markdown_profile(r):
    lines = [f"One step of the last stage ({r['batch_tokens']:,} tokens, {r['micro_steps']} micro-steps): "
             f"{r['span_ms']:.1f} ms on the device from the first kernel to the last, {r['busy_ms']:.1f} ms "
             f"with a kernel running, {r['idle_ms']:.1f} ms ({r['idle_share']:.1%}) with none; "
             f"{r['kernels']:,} kernels.", "", "| class | ms | share of kernel time | kernels |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {c['ms']:.1f} | {c['share']:.1%} | {c['kernels']:,} |"
              for name, c in r["classes"].items()]
    if r["largest_gaps"]:
        lines += ["", "Largest idle gaps:", ""] + [
            f"- {g['ms']:.2f} ms at +{g['at_ms']:.1f} ms, after `{g['after']}`, before `{g['before']}`"
            for g in r["largest_gaps"]]
    return lines + ["", "The profiler's table (kernels by self time): profile_key_averages.txt in "
                    "quick_logs.tar.gz."]


def markdown_ideas(report):
    base = (report["items"]["stages"].get("result") or [None])[-1]
    lines = ["| run | set-up (compile warm-up) | tokens/s | vs the baseline's last stage | ms/step | "
             "peak mem | status |", "|---|---|---|---|---|---|---|"]
    notes = []
    for name, item in report["items"].items():
        if not name.startswith("idea "):
            continue
        r = item.get("result")
        if not r:
            lines.append(f"| {name[5:]} | | | | | | {item['status']} |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        lines.append(f"| {name[5:]} | {fmt_s(r['setup_s'])} ({fmt_s(r['compile_warmup_s'])}) | "
                     f"{r['tokens_per_s']:,.0f} | {fmt(ratio, '.3f', 'x')} | {r['ms_per_step']:.1f} | "
                     f"{fmt(r['peak_mem_gb'], '.2f', ' GB')} | {item['status']} |")
        if r.get("describe"):
            notes.append(f"- {name[5:]}: {r['describe']}")
        if "grouped_gemm" in r:
            notes.append(f"- {name[5:]}: the grouped-GEMM expert path (torch._grouped_mm, CUDA bf16) was "
                         f"{'on' if r['grouped_gemm'] else 'off: the dense fallback ran'}")
    return lines + (["", "What each model says at start-up:", ""] + notes if notes else [])


def markdown_race(r):
    plot = ["", "![val loss vs training time and tokens](race_plot.png)"] if r.get("plot") else []
    return [f"{r['minutes']:g} min of training each (validation and compile excluded) on the proxy shards; "
            f"record {r['record']} (its logs also in quick_logs.tar.gz).", "", *r["table"], *plot]


QUICK_SECTIONS = [("ceilings", "1. The device's ceilings", markdown_ceilings),
                  ("baseline", "2. The baseline's compile", markdown_setup),
                  ("stages", "3. The baseline's batch stages (from the same compile)", markdown_stages),
                  ("profile", "4. Profile of one last-stage step", markdown_profile)]


def quick_markdown(report):
    """quick.md: the plan, then a section per phase, then the problems."""
    items = report["items"]
    w = report["worker"]
    took = f" after {w['seconds']:.0f} s" if w.get("seconds") is not None else ""
    lines = ["# GPU check: quick", "",
             f"{report['device']}, torch {report['torch']}, started {report['started']}; budget "
             f"{report['budget_s']:.0f} s, of which {report['worker_budget_s']:.0f} s for the phases; "
             f"worker: {w['status']}{took}. Versions: environment.txt; the run logs, the console and the "
             "profiler's table: quick_logs.tar.gz.", "", "## Plan", "",
             "| item | estimate | took | status | how the estimate was reached |", "|---|---|---|---|---|"]
    for name, item in items.items():
        lines.append(f"| {name} | {fmt_s(item['estimate_s'])} | {fmt_s(item['seconds'])} | "
                     f"{item['status']} | {item['why'] or ''} |")
    for name, title, render in QUICK_SECTIONS:
        if items[name].get("result"):
            lines += ["", f"## {title}", "", *render(items[name]["result"])]
    if any(name.startswith("idea ") for name in items):
        lines += ["", "## 5. Ideas: the last stage, each compiled on its own", "", *markdown_ideas(report)]
    race = items["race"]
    lines += ["", "## 6. Race", ""]
    lines += markdown_race(race["result"]) if race.get("result") else [race["status"]]
    problems = quick_problems(report)
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in problems] if problems else ["None."])
    return "\n".join(lines) + "\n"


def write_quick(out, report, logs):
    """quick.json, quick.md and quick_logs.tar.gz, each replaced whole: a kill while writing keeps the last
    ones."""
    report["problems"] = quick_problems(report)
    texts = {"quick.json": json.dumps(report, indent=1) + "\n", "quick.md": quick_markdown(report)}
    for name, text in texts.items():
        (out / f"{name}.tmp").write_text(text, encoding="utf-8")
        os.replace(out / f"{name}.tmp", out / name)
    if logs.exists():
        pack_logs(logs, out / f"{QUICK_LOGS}.tar.gz")


# -- the worker (bench.py --quick-worker JOB) and the command that starts it --
def quick_item(name, params, ctx):
    """Run one item of the check; return its figures, and put what the planner needs into ctx.m."""
    o, m = ctx.o, ctx.m
    if name == "ceilings":
        result = measure_ceilings(ctx.device, o.gemm_shapes, o.copy_mib)
        m.gemm_tflops = result["gemm_ceiling_tflops"]
        return result
    if name == "baseline":  # its warm-up compiles the evaluation graph too: one stream of validation tokens
        flags = [*quick_flags(o, ctx.train_files, ctx.logs / "baseline"), f"--val_files={ctx.val_files}",
                 f"--val_tokens={ctx.val_tokens}"]
        module, run, result = setup_script(ROOT / BASELINE, flags)
        ctx.base, m.setup_s = (module, run), result["setup_s"]
        from torch._dynamo.utils import compile_times
        table = compile_times(repr="str", aggregate=True)
        (ctx.logs / "compile_times.txt").write_text(table + "\n", encoding="utf-8")
        return dict(result, data=ctx.data)
    if name == "stages":
        rows = baseline_stages(*ctx.base, params["steps"], m.flops_6n, m.peak_tflops, m.gemm_tflops)
        m.step_s.update({row["stage"] - 1: row["ms_per_step"] / 1000 for row in rows})
        return rows
    if name == "profile":
        return profile_step(*ctx.base, ctx.logs)
    ctx.base = None  # the ideas and the race set up their own runs
    free_compiled()
    if name == "race":
        return quick_race(o, params["minutes"], ctx.logs, ctx.out)
    label, script, extra = ctx.ideas[name]
    module, run, result = setup_script(script, quick_flags(o, ctx.train_files, ctx.logs / "ideas", extra))
    m.idea_setup_s[label] = result["setup_s"]
    timing, _ = time_steps(module, run, run.args.batch_stages - 1, params["steps"])
    return dict(result, **timing)


def quick_context(o, out, work, device_name):
    """What the worker's items share: the options, the data, the baseline's run once set up, and the planner's
    Measured, started from the baseline's flags (its batch stages, its 6N FLOPs) and the proxy shards'
    presence."""
    module = import_script(ROOT / BASELINE)
    args, _ = module.parse_args(quick_flags(o, "-", "-"))
    train_files, data = quick_train_files(o, work / "shards", args.batch_tokens, args.vocab_size)
    val_files = quick_val_files(o, work / "val_shards", args.device_batch_tokens, args.vocab_size)
    m = Measured(module.stage_batches(args), model_costs(module, args)[3], peak_tflops(device_name))
    try:
        proxy_shards(o.proxy_dir, o.val_tokens)
    except SystemExit as e:
        why = str(e).splitlines()[0].removeprefix("error: ").rstrip(".:")
        m.proxy = f"no race: {why} (to make them: README, The real run)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ideas = {f"idea {label}": (label, script, extra) for label, script, extra in quick_ideas(o)}
    return types.SimpleNamespace(o=o, out=out, logs=work / QUICK_LOGS, device=device, m=m, base=None,
                                 train_files=train_files, data=data, ideas=ideas, val_files=val_files,
                                 val_tokens=args.device_batch_tokens)


def quick_worker(job_path, clock=time.monotonic):
    """The quick check's items in one process: before each, the planner picks the next that fits what is left
    of the budget (the rest skipped, saying why); each item's figures are written as it ends. An exception
    ends only its item (the traceback goes to tracebacks.txt in the logs); SIGINT (the budget) ends the run,
    with what it has written."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    o, out, logs = CheckOptions.from_json(job["options"]), Path(job["out"]), Path(job["work"]) / QUICK_LOGS
    report = json.loads((out / "quick.json").read_text(encoding="utf-8"))
    items, order, statuses, stopped = report["items"], list(report["items"]), {}, False
    spent = lambda: clock() - job["clock_start"]  # noqa: E731  (the budget runs from the command's start)
    try:
        ctx = quick_context(o, out, Path(job["work"]), report["device"])
        while not stopped:
            left = job["budget_s"] - spent()
            estimates = quick_estimates(order, ctx.m, o, left)
            name, skipped = plan_next(order, estimates, statuses, spent(), job["budget_s"])
            for skip, why in skipped.items():
                statuses[skip] = why
                seconds = estimates[skip].seconds
                items[skip].update(status=why, estimate_s=None if seconds is None else round(seconds, 1),
                                   why=None if seconds is None else estimates[skip].why)  # else: the status
            if name is None:
                break
            estimate = estimates[name]
            items[name].update(status="running", estimate_s=round(estimate.seconds, 1), why=estimate.why,
                               started_at_s=round(spent(), 1))
            write_quick(out, report, logs)
            print(f"== gpu-check quick: {name}, ~{estimate.seconds:.0f} s ({estimate.why}); {left:.0f} s "
                  "left", flush=True)
            t0 = clock()
            try:
                items[name]["result"] = quick_item(name, estimate.params, ctx)
                status = "ok"
            except KeyboardInterrupt:
                status = "stopped at the budget"
            except SystemExit as e:  # a train script's error, or its exit after a signal ended its run
                status = "stopped at the budget" if e.code in STOP_CODES else f"failed: {one_line(e.code)}"
            except Exception as e:  # noqa: BLE001  (any failure ends its item only)
                status = f"failed: {type(e).__name__}: {one_line(e)}"
                trace = f"== {name}\n{traceback.format_exc()}\n"
                print(trace, file=sys.stderr, flush=True)
                with open(logs / "tracebacks.txt", "a", encoding="utf-8") as f:
                    f.write(trace)
            items[name].update(status=status, seconds=round(clock() - t0, 1))
            statuses[name], stopped = status, status.startswith("stopped")
            report["measured"] = dataclasses.asdict(ctx.m)
            write_quick(out, report, logs)
    except KeyboardInterrupt:  # between two items
        stopped = True
    if stopped:  # the budget: what is written stays, the rest says why it is missing
        for item in items.values():
            if item["status"] in ("planned", "running"):
                item["status"] = f"{'not run: ' if item['status'] == 'planned' else ''}stopped at the budget"
    write_quick(out, report, logs)  # the last skips too


def close_quick(report, rc, seconds, timed_out):
    """The worker's end, in the report: how it ended, and any item it left running (killed) or never
    reached."""
    status = "stopped at the budget" if timed_out else "ok" if rc == 0 else f"exit code {rc}"
    report["worker"] = dict(status=status, rc=rc, seconds=round(seconds, 1))
    for item in report["items"].values():
        if item["status"] == "running":
            item["status"] = f"killed: the worker ended ({status}) during it"
        elif item["status"] == "planned":
            item["status"] = f"not run: the worker ended ({status}) before it"
    return report


def quick_check(out, o, runner, clock):
    """--gpu-check quick: a worker process runs the items within the budget less the grace and the packing; at
    that time it gets SIGINT, and SIGKILL after the grace. Then this process closes the report (quick.json,
    quick.md) and packs the logs (quick_logs.tar.gz); environment.txt is written already, race_plot.png after
    a race."""
    if (out / "quick.json").exists():
        raise SystemExit(f"error: {out / 'quick.json'} exists; results are never overwritten: choose another "
                         "--out")
    import_script(ROOT / BASELINE).parse_args(quick_flags(o, "-", "-"))  # a bad --set: one error, no GPU time
    start, budget = clock(), o.budget_s - STOP_GRACE_S - QUICK_PACK_S
    work = Path(tempfile.mkdtemp(prefix="gpu_check_quick_"))
    logs = work / QUICK_LOGS
    logs.mkdir()
    try:
        report = dict(check="quick", device=o.device, torch=torch.__version__, command=o.command,
                      started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      budget_s=o.budget_s, worker_budget_s=budget, worker=dict(status="running"), wall_s=None,
                      items={name: dict(status="planned", estimate_s=None, seconds=None, why=None)
                             for name in quick_items(o)})
        write_quick(out, report, logs)
        job = work / "job.json"
        job.write_text(json.dumps(dict(options=o.to_json(), out=str(out), work=str(work), budget_s=budget,
                                       clock_start=start)), encoding="utf-8")
        print(f"== gpu-check quick: {len(report['items'])} items, planned one at a time within "
              f"{budget:.0f} s", flush=True)
        rc, seconds, timed_out = runner([sys.executable, ROOT / "bench.py", "--quick-worker", job],
                                        logs / "worker_console.txt", budget - (clock() - start), CHILD_ENV)
        written = json.loads((out / "quick.json").read_text(encoding="utf-8"))
        report = close_quick(written, rc, seconds, timed_out)
        report["wall_s"] = round(clock() - start, 1)
        write_quick(out, report, logs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(quick_markdown(report), flush=True)
    return report


def gpu_check(stage, out, o, runner=None, clock=time.monotonic):
    """Run the quick check, one stage, or all three stages, into the folder out (None:
    gpu_check/<date>_<time>_<device>/); returns {stage: result}. The real runner needs CUDA; the tests inject
    one."""
    if runner is None:
        if not torch.cuda.is_available():
            raise SystemExit("error: --gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False "
                             "here: run it on a machine with one (README: The GPU check)")
        runner = run_logged
    if not o.device:
        cuda = torch.cuda.is_available()
        o.device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})"
    stages = STAGES if stage == "all" else (stage,)
    if "race" in stages:  # a missing proxy set is an error before any GPU time is spent
        proxy_shards(o.proxy_dir, o.val_tokens)
    slug = re.sub(r"[^a-z0-9]+", "-", o.device.lower()).strip("-")
    out = Path(out) if out else ROOT / "gpu_check" / f"{datetime.datetime.now():%Y-%m-%d_%H%M%S}_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.txt").write_text(environment_text(), encoding="utf-8")
    if stage == "quick":
        results = {"quick": quick_check(out, o, runner, clock)}
    else:
        results = {name: run_stage(name, out, o, runner, clock) for name in stages}
    problems = [p for r in results.values() for p in r["problems"]]
    print(f"gpu-check {stage}: {len(problems)} problem(s){': ' + '; '.join(problems) if problems else ''}; "
          f"written to {out}", flush=True)
    return results


# ---- command line ----
# bench's own numbers: flag -> (test, what is allowed); a flag left out is not checked. NaN fails every test.
LIMITS = {
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "batch_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "device_batch_tokens": (lambda v: v == "auto" or v.isdigit() and int(v) >= 1, "an integer >= 1, or auto"),
    "minutes": (lambda v: 0 < v < math.inf, "a number of minutes > 0"),
    "val_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
    "val_tokens": (lambda v: v >= 0, "an integer >= 0 (0: no validation)"),
    "budget_s": (lambda v: 0 < v < math.inf, "a number of seconds > 0"),
}


def check_flags(a):
    """bench's flags, checked before anything runs or is written: a one-line SystemExit("error: ...") naming
    the first bad one, as the user typed it. The train scripts check the flags bench passes on (--set,
    --preset, the sizes) and the race's data, before anything is written too (main(), race())."""
    for name, (allowed, what) in LIMITS.items():
        value = getattr(a, name)
        if value is not None and not allowed(value):
            raise SystemExit(f"error: --{name}={value}: expected {what}")
    if a.race and not (a.train_files and a.val_files):
        raise SystemExit("error: --race needs --train_files and --val_files (e.g. the proxy shards, see "
                         "README)")
    if a.race and not leaderboard.RECORD_NAME_RE.match(f"{datetime.date.today():%Y-%m-%d}_{a.name}"):
        raise SystemExit(f"error: --name={a.name}: expected letters, digits, '_', '.' and '-', starting with "
                         "a letter or digit (the record folder is records/proxy/<date>_<name>/)")
    for script in a.scripts or []:
        check_train_script(script, "--scripts")
    if a.gpu_check == "quick":
        check_train_script(a.race_script, "--race_script")
    folders = [("log_dir", a.log_dir), ("records", a.records if a.race or a.gpu_check else None),
               ("out", a.out)]
    for name, folder in folders:
        problem = folder is not None and leaderboard.output_folder_problem(folder)
        if problem:
            raise SystemExit(f"error: --{name}={folder}: {problem}")


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's kill) stops bench as Ctrl-C does, with a KeyboardInterrupt: what bench made is
    removed on the way out (the shards' temporary folder, an unfinished race's record folder)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=None,
                   help="train scripts (default: every train_gpt2*.py; gpu-check quick: the ideas it times)")
    p.add_argument("--preset", default="gpt2_124m", help="the scripts' --preset")
    p.add_argument("--device_batch_tokens", help="tokens per micro-step, or auto")
    p.add_argument("--batch_tokens", type=int, help="tokens per optimizer step (default: the preset's)")
    p.add_argument("--steps", type=int, help=f"timed optimizer steps per script (default: 10; gpu-check "
                                          f"quick: {QUICK_STEPS} per batch stage and per idea)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="more flags for every script")
    p.add_argument("--json", action="store_true", help="print one JSON object per script, not the table")
    p.add_argument("--log_dir", help="keep the scripts' run logs here (default: deleted with the shards)")
    race_args = p.add_argument_group("race: equal training time for every script, into records/proxy/")
    race_args.add_argument("--race", action="store_true", help="run the race instead of the throughput table")
    race_args.add_argument("--minutes", type=float, help="training minutes per script (default: 5; "
                                                         "gpu-check: what fits its budget)")
    race_args.add_argument("--train_files", help="training shards (glob)")
    race_args.add_argument("--val_files", help="validation shards (glob)")
    race_args.add_argument("--val_every", type=int, help="validate every N steps (default 50; gpu-check 10)")
    race_args.add_argument("--val_tokens", type=int, default=1048576, help="validation tokens")
    race_args.add_argument("--name", default="Race", help="the record folder's short name")
    race_args.add_argument("--records", default=str(ROOT / "records"), help="the records tree")
    gpu = p.add_argument_group("gpu-check: checks of a CUDA GPU, each one command of under 10 minutes")
    gpu.add_argument("--gpu-check", choices=["quick", *STAGES, "all"],
                     help="quick: every phase in one command; tests, bench, race: deeper stages; all: the 3")
    gpu.add_argument("--out", help="the results folder (default: gpu_check/<date>_<time>_<device>/)")
    gpu.add_argument("--budget_s", type=float,
                     help=f"the command's wall-time budget in seconds (default: quick {QUICK_BUDGET_S:.0f}, "
                          f"a stage {STAGE_BUDGET_S:.0f})")
    gpu.add_argument("--race_script", default=str(ROOT / "train_gpt2_mla.py"),
                     help="quick: the idea script that races the baseline (default: train_gpt2_mla.py)")
    gpu.add_argument("--quick-worker", metavar="JOB", help=argparse.SUPPRESS)  # quick's own worker process
    a = p.parse_args(argv)
    if a.quick_worker:
        return quick_worker(a.quick_worker)
    check_flags(a)
    scripts = [Path(s).resolve() for s in a.scripts] if a.scripts else sorted(ROOT.glob("train_gpt2*.py"))
    sizes = (("device_batch_tokens", a.device_batch_tokens), ("batch_tokens", a.batch_tokens))
    flags = [f"--preset={a.preset}"] + [f"--{k}={v}" for k, v in sizes if v is not None]
    flags += [f"--{kv}" for kv in a.set]
    command = shlex.join(["python", "bench.py"] + list(sys.argv[1:] if argv is None else argv))
    if a.gpu_check:
        quick = a.gpu_check == "quick"
        budget = a.budget_s if a.budget_s is not None else QUICK_BUDGET_S if quick else STAGE_BUDGET_S
        steps = a.steps if a.steps is not None else QUICK_STEPS if quick else 10
        val_every = 10 if a.val_every is None else a.val_every
        o = CheckOptions(scripts, flags, steps, a.minutes, val_every, a.val_tokens, budget,
                         race_script=Path(a.race_script).resolve(), records=Path(a.records), command=command)
        results = gpu_check(a.gpu_check, a.out, o)
        if any(r["problems"] for r in results.values()):
            raise SystemExit(1)  # the problems are printed above and listed in each <stage>.md
        return results
    with sigterm_interrupts():
        if a.race:
            val_every = 50 if a.val_every is None else a.val_every
            flags += [f"--train_files={a.train_files}", f"--val_files={a.val_files}",
                      f"--val_every={val_every}", f"--val_tokens={a.val_tokens}"]
            return race(scripts, flags, 5.0 if a.minutes is None else a.minutes, a.name, a.records, command)
        rows, steps = [], 10 if a.steps is None else a.steps
        for script in scripts:  # a bad --set, --preset or size: one error before any script runs
            import_script(script).parse_args(["--batch_stages=1", *flags])
        with tempfile.TemporaryDirectory(prefix="bench_") as workdir:  # the shards; gone however bench ends
            for script in scripts:
                rows.append(bench_script(script, flags, steps, workdir, a.log_dir))
    if a.json:
        for row in rows:
            print(json.dumps(row))
    else:
        first = rows[0]
        print(f"\n{first['device']} x{first['world_size']}, torch {torch.__version__}, {a.preset} preset, "
              f"{first['batch_tokens']} tokens/step, micro-batch {first['micro_batch']} tokens, {steps} "
              f"steps; flags: {' '.join(flags)}\n")
        print(format_table(rows))
    return rows


def interrupted(signum):
    """The one line of a bench stopped by a signal, and the shell's exit code (SIGINT: 130, SIGTERM: 143)."""
    print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (sigterm_interrupts)
        interrupted(e.args[0] if e.args else signal.SIGINT)
    except SystemExit as e:
        if e.code in STOP_CODES:  # a train script stopped by the signal: it has logged where, and its summary
            interrupted(e.code - 128)
        raise

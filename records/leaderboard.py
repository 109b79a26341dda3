"""Verify record logs, regenerate the leaderboard (records/README.md) and plot runs.

    python records/leaderboard.py check [PATH...]       verify logs, record folders, tracks (default: all of records/)
    python records/leaderboard.py table                 rewrite records/README.md from README_TEMPLATE
    python records/leaderboard.py plot --track proxy    val loss vs time and tokens -> records/proxy/plot.png
    python records/leaderboard.py plot LOG... --out run.png [--baseline LOG] [--labels A B] [--x time|tokens|both]

Layout: records/<track>/<YYYY-MM-DD>_<ShortName>/ holds a README.md (what changed, command, device, result) and the
run logs (*.txt) exactly as train_gpt2*.py wrote them; the track is the parent folder's name. `check` verifies
consistency, not truth: the embedded code hashes to the summary's sha256, the step lines reproduce the summary, the
settings and device obey the track. A log forged whole and consistently passes; re-running its code is the test.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

RECORDS = Path(__file__).resolve().parent  # the default --root


@dataclass(frozen=True)
class Track:
    name: str
    title: str
    target: float | None  # the val loss a record must reach; None: the log's own target is reported
    val_tokens: int | None  # None: any
    world_size: int | None  # None: any
    fineweb: bool  # a FineWeb claim: a CUDA GPU, FineWeb's val shard, one uninterrupted run, one code per record,
    #                and several runs of it must pass the t-test at p < P_MAX


P_MAX = 0.01  # modded-nanogpt's significance level for a claim by the mean of several runs
TRACKS = {t.name: t for t in [
    Track("bottlecap_1gpu", "FineWeb val loss ≤ 3.3821 on the first 1,048,576 val tokens, 1 GPU",
          3.3821, 1048576, 1, True),
    Track("modded", "FineWeb val loss ≤ 3.28 on the first 10,485,760 val tokens, any number of GPUs "
          "(modded-nanogpt's rule)", 3.28, 10485760, None, True),
    Track("proxy", "offline proxy: enwiki train, OpenWebText-sample val — speed and loss-vs-tokens comparisons, "
          "never a FineWeb claim", None, None, None, False),
]}
RECORD_NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][A-Za-z0-9_.-]*$")
# settings that may differ between runs of one record (data paths differ between machines; FineWeb tracks check
# val_files by name)
PER_RUN_SETTINGS = {"seed", "log_dir", "save_every", "resume", "train_files", "val_files"}
LOSS_HALF_ULP = 0.5e-4  # step lines print losses with 4 decimals: the true value is within this of the printed one
TIME_TOL_MS = 1.0  # step lines print train_time in whole ms; the summary has full floats


# ---- parsing ----
@dataclass
class Log:
    """One run log, as train_gpt2*.py writes it (top-level README, "Run logs and checkpoints")."""
    path: str
    run_id: str = ""
    sources: dict = field(default_factory=dict)  # relpath -> exact text, the script first
    declared_sha256: dict = field(default_factory=dict)  # relpath -> the sha256 its header states
    environment: str = ""
    hyperparameters: dict = field(default_factory=dict)
    train_points: list = field(default_factory=list)  # (step, train_loss, train_time_ms)
    val_points: list = field(default_factory=list)  # (step, val_loss, train_time_ms)
    summary: dict | None = None
    errors: list = field(default_factory=list)  # the run's own `error: ...` lines
    comments: list = field(default_factory=list)  # `# ...` lines of the training section
    parse_errors: list = field(default_factory=list)  # what could not be read: each one fails `check`

    @property
    def batch_tokens(self):
        return self.hyperparameters.get("batch_tokens") or 0


SOURCE_RE = re.compile(r"==== source (.+?) sha256=([0-9a-f]{64}) chars=(\d+) ====\n")
SECTIONS_RE = re.compile(r"==== environment ====\n(.*?)\n==== hyperparameters ====\n([^\n]*)\n==== training ====\n",
                         re.S)
STEP_RE = re.compile(r"step:(\d+)/\d+ (train|val)_loss:(\S+) train_time:(-?\d+)ms(?: |$)")
ENV_DEVICE_RE = re.compile(r"^device (.+?)  world_size (\d+)", re.M)


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_log(path):
    """Read a run log into a Log; never raises on a malformed log (parse_errors says what is wrong)."""
    log = Log(path=str(path))
    err = log.parse_errors.append
    try:  # newline="": the sources' `chars=` counts hold only with the file's own line endings
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        err(f"cannot read the log: {e}")
        return log
    m = re.match(r"# run (\S+): .*\n", text)
    if m:
        log.run_id = m[1]
    else:
        err("line 1 is not `# run <run_id>: <script> <flags>`: not a train_gpt2*.py log")
    pos = text.find("\n") + 1
    while m := SOURCE_RE.match(text, pos):  # a header, then exactly `chars` characters of text and a newline
        rel, n, start = m[1], int(m[3]), m.end()
        if len(text) < start + n + 1 or text[start + n] != "\n":
            err(f"source {rel}: the text is not {n} characters and a newline, as its header says (edited code?)")
            break
        log.sources[rel], log.declared_sha256[rel] = text[start:start + n], m[2]
        pos = start + n + 1
    if not log.sources:
        err("no `==== source ... ====` block: the log does not carry its code")
    env = text.rfind("\n==== environment ====\n") + 1  # the last: the embedded code may print the same header
    if env and env != pos:
        err("`==== environment ====` does not follow the sources")
    m = SECTIONS_RE.match(text, env) if env else None
    if not m:
        err("no `==== environment ====`, `==== hyperparameters ====`, `==== training ====` sections in order")
        return log
    log.environment = m[1]
    hyper = json_or_none(m[2])
    if isinstance(hyper, dict):
        log.hyperparameters = hyper
    else:
        err("the hyperparameters line is not a JSON object")
    lines = text[m.end():].rstrip().split("\n")
    for i, line in enumerate(lines):
        step = STEP_RE.match(line)
        if line.startswith('{"summary"'):
            if i != len(lines) - 1:
                err("the summary is not the last line")
            summary = json_or_none(line)
            if isinstance(summary, dict) and isinstance(summary.get("summary"), dict):
                log.summary = summary["summary"]
            else:
                err("the summary line is not valid JSON")
        elif step:
            try:
                point = (int(step[1]), float(step[3]), int(step[4]))
            except ValueError:
                err(f"unreadable step line: {line[:120]!r}")
                continue
            (log.train_points if step[2] == "train" else log.val_points).append(point)
        elif line.startswith("error:"):
            log.errors.append(line)
        elif line.startswith("#"):
            log.comments.append(line)
    if log.summary is None and not any("summary" in e for e in log.parse_errors):
        err('no final `{"summary": ...}` line: the run did not finish')
    return log


def as_log(log_or_path):
    return log_or_path if isinstance(log_or_path, Log) else parse_log(log_or_path)


# ---- checks ----
def reaches(printed, target):
    """Does a val loss printed with 4 decimals reach the target? True, False, or None when the rounding hides it."""
    if printed + LOSS_HALF_ULP < target - 1e-12:
        return True
    if printed - LOSS_HALF_ULP > target + 1e-12:
        return False
    return None


def claimed_point(log):
    """The val line at the summary's time_to_target_s that reaches the target: (step, val_loss, ms), or None."""
    s = log.summary
    if s.get("time_to_target_s") is None:
        return None
    return next((p for p in log.val_points if abs(p[2] - s["time_to_target_s"] * 1000) <= TIME_TOL_MS
                 and reaches(p[1], s["target_val_loss"]) is not False), None)


def check_log(log, track=None, require_target=True):
    """Problems with one log (empty: it verifies). track: the TRACKS name whose rules apply, None for the generic
    checks only. require_target: the run must reach the track's target (a single-run record)."""
    log = as_log(log)
    problems = list(log.parse_errors)
    if log.summary is None:
        return problems
    try:
        problems += consistency_problems(log)
        if track is not None:
            problems += track_problems(log, track, require_target)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # an edited log: a key missing, a wrong type
        problems.append(f"malformed value in the summary or settings ({type(e).__name__}: {e})")
    return problems


def consistency_problems(log):
    """The code hashes to its headers and the summary; the settings, environment and step lines give the summary."""
    s, hp, problems = log.summary, log.hyperparameters, []
    for rel, text in log.sources.items():
        if sha256(text) != log.declared_sha256[rel]:
            problems.append(f"source {rel}: its text hashes to {sha256(text)[:12]}…, its header says "
                            f"{log.declared_sha256[rel][:12]}… (edited code)")
    if log.sources:
        script_rel, script_text = next(iter(log.sources.items()))
        if Path(script_rel).name != s["script"]:
            problems.append(f"the first source is {script_rel}, the summary's script is {s['script']}")
        if sha256(script_text) != s["script_sha256"]:
            problems.append(f"the embedded {script_rel} hashes to {sha256(script_text)[:12]}…, the summary's "
                            f"script_sha256 is {str(s['script_sha256'])[:12]}… (edited code or summary)")

    for key in ("target_val_loss", "val_tokens"):
        if key in hp and hp[key] != s[key]:
            problems.append(f"{key}: the hyperparameters say {hp[key]}, the summary {s[key]}")
    if log.batch_tokens and s["tokens_seen"] != s["steps"] * log.batch_tokens:
        problems.append(f"tokens_seen {s['tokens_seen']} != steps {s['steps']} x batch_tokens {log.batch_tokens}")
    m = ENV_DEVICE_RE.search(log.environment)
    if not m:
        problems.append("the environment does not name the device and world size")
    elif m[1] != s["device"] or int(m[2]) != s["world_size"]:
        problems.append(f"the environment says device {m[1]!r} x{m[2]}, the summary {s['device']!r} "
                        f"x{s['world_size']}")

    vals, points = log.val_points, log.train_points + log.val_points
    steps = [p[0] for p in sorted(points, key=lambda p: (p[2], p[0]))]
    if steps != sorted(steps):  # catches a val line moved earlier in time together with the summary
        problems.append("step lines are out of order (train_time and step disagree)")
    if not vals:
        return problems + ["no val_loss line"]
    if max(p[0] for p in points) != s["steps"]:
        problems.append(f"the last step line is step {max(p[0] for p in points)}, the summary says steps {s['steps']}")
    if f"{vals[-1][1]:.4f}" != f"{s['final_val_loss']:.4f}":
        problems.append(f"the last val line says val_loss {vals[-1][1]:.4f} at step {vals[-1][0]}, the summary's "
                        f"final_val_loss is {s['final_val_loss']} (edited val loss?)")
    best = min(p[1] for p in vals)
    if f"{best:.4f}" != f"{s['best_val_loss']:.4f}":
        problems.append(f"the best val line says {best:.4f}, the summary's best_val_loss is {s['best_val_loss']} "
                        "(edited val loss?)")
    last = max(points, key=lambda p: (p[2], p[0]))  # a run stopped by an error ends on a train line
    if not log.errors and last in vals and abs(last[2] - s["train_time_s"] * 1000) > TIME_TOL_MS:
        problems.append(f"the last val line is at train_time {last[2]}ms, the summary's train_time_s is "
                        f"{s['train_time_s']}")

    # time to target, recomputed: the first val line <= target
    target, tts = s["target_val_loss"], s["time_to_target_s"]
    first = next((p for p in vals if reaches(p[1], target)), None)
    if s["reached"]:
        point = claimed_point(log)
        if point is None:
            problems.append(f"time_to_target_s is {tts} but no val line at that train_time has val_loss <= {target}"
                            + (f"; the first that does is step {first[0]} at {first[2]}ms" if first else
                               "; none does: the run never reached the target"))
        elif first and first[0] < point[0]:
            problems.append(f"time_to_target_s is {tts:.3f}s (step {point[0]}), but step {first[0]} already had "
                            f"val_loss {first[1]:.4f} <= {target} at {first[2]}ms")
    elif tts is not None:
        problems.append("reached is false but time_to_target_s is set")
    elif first:
        problems.append(f"reached is false but step {first[0]} has val_loss {first[1]:.4f} <= {target}")
    return problems


def track_problems(log, track, require_target=True):
    """The track's rules: target, val_tokens, world size; on FineWeb tracks a CUDA GPU, FineWeb's val shard and one
    uninterrupted run; for a single-run record, the target reached."""
    rule = TRACKS.get(track)
    if rule is None:
        return [f"unknown track {track!r}: records/<track>/ must be one of {', '.join(TRACKS)}"]
    s, problems = log.summary, []
    if rule.target is not None and not math.isclose(s["target_val_loss"], rule.target, abs_tol=1e-9):
        problems.append(f"target_val_loss is {s['target_val_loss']}, the {rule.name} track's is {rule.target}")
    if rule.val_tokens is not None and s["val_tokens"] != rule.val_tokens:
        problems.append(f"val_tokens is {s['val_tokens']}, the {rule.name} track measures on {rule.val_tokens}")
    if rule.world_size is not None and s["world_size"] != rule.world_size:
        problems.append(f"world_size is {s['world_size']}, the {rule.name} track allows {rule.world_size}")
    if rule.fineweb:
        # logs name a CUDA device by its GPU name, a CPU as `cpu (<arch>)`; the environment names the CUDA build
        if str(s["device"]).lower().startswith("cpu") or "cuda None" in log.environment:
            problems.append(f"device is {s['device']!r}: the {rule.name} track needs a CUDA GPU")
        val_files = str(log.hyperparameters.get("val_files", "fineweb_val"))
        if "fineweb_val" not in val_files:
            problems.append(f"val_files is {val_files!r}: a FineWeb claim validates on fineweb_val_*.bin")
        resumed = next((c for c in log.comments if c.startswith("# resumed from")), None)
        if resumed:
            problems.append(f"a resumed run ({resumed[2:]}): its log lacks the steps before the resume; a record "
                            "is one uninterrupted run")
    if rule.target is not None and require_target and not s["reached"]:
        problems.append(f"the run never reached the target {rule.target} (best val_loss {s['best_val_loss']})")
    return problems


# ---- several runs of one code: a one-sided t-test ----
@dataclass
class TTest:
    n: int
    mean: float
    sem: float  # standard error of the mean (nan for one run)
    p: float | None  # None for one run


def t_test_below(values, target):
    """One-sided one-sample t-test of H0: mean >= target against H1: mean < target (modded-nanogpt accepts a record
    at p < 0.01). Degenerate samples, where scipy gives nan or rounding noise: one value gives no test (p None);
    identical values have no spread, so the mean is taken as exact: p = 0 if it is below the target, else 1."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if len(x) == 1:
        return TTest(1, mean, math.nan, None)
    if np.ptp(x) == 0:  # checked here: scipy's variance of equal floats can be 1e-16 noise, not 0
        return TTest(len(x), mean, 0.0, 0.0 if mean < target else 1.0)
    p = stats.ttest_1samp(x, target, alternative="less").pvalue
    return TTest(len(x), mean, float(stats.sem(x)), float(p))


# ---- record folders ----
@dataclass
class Row:
    """One line of a track's table: a record folder, or one code of a folder holding several (a proxy race)."""
    folder: str  # <YYYY-MM-DD>_<ShortName>
    date: str
    logs: list  # Log objects, sorted by file name
    problems: list  # from check: a row with problems is listed but not ranked
    script: str = "?"
    device: str = "?"  # the summary's device: speed-ups compare rows on the same device only
    world_size: int = 1
    target: float | None = None
    time_s: float | None = None  # one run: time to target; several: mean train_time_s (modded-style)
    val_loss: float | None = None  # one run: val loss at the target (or the final one); several: mean final
    tokens: int | None = None
    ttest: TTest | None = None  # several runs
    p_problem: str | None = None  # the one of problems that says the t-test failed
    baseline: bool = False

    @property
    def ranked(self):
        return not self.problems and self.time_s is not None


def folder_date(name):
    """The date of a `<YYYY-MM-DD>_<ShortName>` folder name; None if the name is not one."""
    m = RECORD_NAME_RE.match(name)
    if not m:
        return None
    try:
        return datetime.date.fromisoformat(m[1]).isoformat()
    except ValueError:  # e.g. 2025-02-30
        return None


def record_rows(folder, track=None):
    """The folder's rows (one per code it holds) with their check problems; track defaults to the parent's name."""
    folder = Path(folder)
    track = track or folder.parent.name
    rule = TRACKS.get(track)
    date = folder_date(folder.name)
    problems = [] if date else [f"folder name {folder.name!r} is not <YYYY-MM-DD>_<ShortName>"]
    if not (folder / "README.md").is_file():
        problems.append("no README.md (what changed, the command, the device, the result)")
    if rule is None:
        problems.append(f"unknown track {track!r}: records/<track>/ must be one of {', '.join(TRACKS)}")
    logs = [parse_log(p) for p in sorted(folder.glob("*.txt")) if p.is_file()]
    if not logs:
        return [Row(folder.name, date or "", [], problems + ["no run log (*.txt) in the folder"])]
    groups = {}  # "the same code": every embedded source file, byte for byte
    for log in logs:
        groups.setdefault(tuple(sorted(log.sources.items())), []).append(log)
    if rule and rule.fineweb and len(groups) > 1:
        problems.append(f"{len(groups)} different codes in one record: a FineWeb record is one code (several runs "
                        "of it are averaged)")
    if len({log.run_id for log in logs}) < len(logs):
        problems.append("the same run appears twice (duplicate run_id)")
    rows = []
    for group in groups.values():
        several = len(group) > 1  # several runs are judged by their mean: each needs not reach the target
        row = Row(folder.name, date or "", group, list(problems))
        for log in group:
            row.problems += [f"{Path(log.path).name}: {p}"
                             for p in check_log(log, track if rule else None, require_target=not several)]
        settings = [{k: v for k, v in log.hyperparameters.items() if k not in PER_RUN_SETTINGS} for log in group]
        differing = sorted({k for st in settings for k in st if st[k] != settings[0].get(k)})
        if differing:
            row.problems.append(f"the runs of one code differ in settings: {', '.join(differing)}")
        try:
            summarise(row, rule)
        except (TypeError, ValueError, KeyError, AttributeError):  # a malformed summary: check_log has said so
            row.time_s = row.val_loss = row.tokens = row.ttest = None
        rows.append(row)
    return rows


def summarise(row, rule):
    """A row's script, device, time, val loss and tokens: one run's claim, or the mean of several with the t-test."""
    s = row.logs[0].summary or {}
    row.script, row.device = str(s.get("script", "?")), str(s.get("device", "?"))
    row.world_size, row.target = s.get("world_size", 1), s.get("target_val_loss")
    if not all(log.summary for log in row.logs):
        return
    summaries = [log.summary for log in row.logs]
    if len(summaries) == 1:
        point = claimed_point(row.logs[0]) if s["reached"] else None
        if point:
            row.time_s, row.val_loss, row.tokens = s["time_to_target_s"], point[1], point[0] * row.logs[0].batch_tokens
        else:
            row.val_loss, row.tokens = s["final_val_loss"], s["tokens_seen"]
        return
    row.ttest = t = t_test_below([x["final_val_loss"] for x in summaries], row.target)
    row.val_loss = t.mean
    row.time_s = float(np.mean([x["train_time_s"] for x in summaries]))
    row.tokens = int(np.mean([x["tokens_seen"] for x in summaries]))
    if rule and rule.fineweb and not t.p < P_MAX:
        row.p_problem = (f"mean final val loss {t.mean:.4f} ± {t.sem:.4f} over {t.n} runs: p = {t.p:.3g} for "
                         f"mean <= {row.target}, the track needs p < {P_MAX}")
        row.problems.append(row.p_problem)


def check_record(folder, track=None):
    """Problems of a record folder (its name, README, every log, one code, the t-test for several runs)."""
    return list(dict.fromkeys(p for row in record_rows(folder, track) for p in row.problems))  # once each


def record_folders(track_dir):
    return sorted(p for p in Path(track_dir).iterdir() if p.is_dir()) if Path(track_dir).is_dir() else []


def collect_rows(root, track):
    """Every row of a track: ranked rows by time, then the others; each device's baseline marked."""
    rows = [row for folder in record_folders(Path(root) / track) for row in record_rows(folder, track)]
    rows.sort(key=lambda r: (not r.ranked, r.time_s is None, r.time_s or 0.0,
                             r.val_loss if r.val_loss is not None else math.inf, r.date, r.folder, r.script))
    # per device, the earliest `*_Baseline` folder's verified row (of a race folder, train_gpt2.py's)
    baselines = {}
    for row in sorted((r for r in rows if r.ranked and r.folder.lower().endswith("_baseline")),
                      key=lambda r: (r.date, r.folder, r.script != "train_gpt2.py", r.script)):
        baselines.setdefault(row.device, row).baseline = True
    return rows


# ---- the table ----
def format_time(s):
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.2f} min" if s < 7200 else f"{s / 3600:.2f} h"


def format_tokens(n):
    if n is None:
        return "—"
    unit, size = next(((u, v) for u, v in (("B", 1e9), ("M", 1e6), ("k", 1e3)) if n >= v), ("", 1))
    return f"{n / size:.2f}{unit}" if unit else str(n)


def format_loss(row):
    if row.val_loss is None:
        return "—"
    if row.ttest is not None and row.ttest.p is not None:
        return f"{row.val_loss:.4f} ± {row.ttest.sem:.4f} (n={row.ttest.n}, p={row.ttest.p:.2g})"
    return f"{row.val_loss:.4f}"


def speedup(row, baselines):
    """The baseline's time on the row's device / the row's time (BottleCap: GPUs compare only through this)."""
    if not row.ranked:
        return "—"
    base = baselines.get(row.device)
    if base is None:
        return "no baseline on this device"
    if base.target != row.target:
        return "— (baseline's target differs)"
    return f"{base.time_s / row.time_s:.2f}×"


def markdown_table(rows, track):
    """A track's rows (from collect_rows) as a Markdown table; links are relative to records/."""
    if not rows:
        return "No records yet."
    proxy = TRACKS[track].target is None  # the rows' own targets differ: show them
    baselines = {r.device: r for r in rows if r.baseline}
    head = ["#", "time", "speed-up", "val loss"] + (["target"] if proxy else []) + \
           ["tokens", "script", "device", "date", "record", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = 0
    for row in rows:
        rank += row.ranked
        notes = ["baseline"] if row.baseline else []
        if row.p_problem:
            notes.append(f"**p ≥ {P_MAX}**: not significant")
        others = [p for p in row.problems if p != row.p_problem]
        if others:
            notes.append(f"**fails check** ({len(others)}): {others[0]}")
        elif row.time_s is None:
            notes.append("target not reached")
        device = row.device + (f" x{row.world_size}" if row.world_size != 1 else "")
        cells = [str(rank) if row.ranked else "—", format_time(row.time_s), speedup(row, baselines),
                 format_loss(row)] + ([f"{row.target:g}" if row.target is not None else "—"] if proxy else []) + \
                [format_tokens(row.tokens), f"`{row.script}`", device, row.date,
                 f"[{row.folder}]({track}/{row.folder}/)", "; ".join(notes)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


README_TEMPLATE = """\
<!-- generated by `python records/leaderboard.py table` from README_TEMPLATE in records/leaderboard.py: edit there -->
# Records

Timed runs. Each record is a folder `records/<track>/<YYYY-MM-DD>_<ShortName>/` with a `README.md` (what changed,
the command, the device, the result) and the full, unedited run log(s) the training script wrote; every log carries
the code that produced it. `python records/leaderboard.py check` verifies every log and `table` rewrites this file.

**`check` verifies consistency, not truth.** It checks that each embedded source file hashes to its header and the
script to the summary's `script_sha256`, that the step lines and the environment reproduce the summary (time to
target, losses, steps, tokens, device), and that the settings and device obey the track. A log forged whole and
consistently passes it: invented step lines and a matching summary under the real code are indistinguishable from
a real run. Trust in a record comes from re-running its embedded code (the log holds every source file exactly:
a `==== source <path> sha256=… chars=N ====` line, then N characters) on the same GPU model and getting the same
result.

| track | rule |
| --- | --- |
""" + "\n".join(f"| `{t.name}` | {t.title} |" for t in TRACKS.values()) + f"""

- **time** is training time excluding validation (and compile warm-up, as the log states), to the first
  validation at or below the target. A record of several runs of one code (different `--seed`s) is judged
  modded-nanogpt-style instead: the mean final val loss ± its standard error, a one-sided t-test that the mean is
  ≤ the target (`scipy.stats.ttest_1samp(..., alternative="less")`; p < {P_MAX} on the FineWeb tracks), and the
  mean training time of the runs. Runs with identical final losses have no spread: p = 0 if their mean is below
  the target, else 1.
- **speed-up** = the time of the baseline on the same device / the row's time. Times on different GPUs are
  compared only through it (BottleCap's rule); rows are listed by time. A device's baseline is its earliest
  verified record in a folder whose name ends in `_Baseline` (in a folder of several scripts, `train_gpt2.py`'s
  run); the device is the log summary's `device`, e.g. `NVIDIA H100 80GB HBM3`. A row on a device without one
  says "no baseline on this device".
- A record that fails `check` is listed without a rank, with the first problem found.
- **proxy** rows compare scripts on our offline data at equal settings; they are never FineWeb results.

## How to submit a record

1. Train on an otherwise idle machine with the track's preset, e.g.
   `torchrun --nproc_per_node=1 train_gpt2_<idea>.py --preset=bottlecap` (stops at the target); to claim by the
   mean, run the same code and settings several times with different `--seed`s. If your GPU model has no
   baseline yet, also run `train_gpt2.py` the same way and submit it as `<YYYY-MM-DD>_Baseline`.
2. Create `records/<track>/<YYYY-MM-DD>_<ShortName>/` and copy the run log(s) from `logs/` into it, unedited.
3. Write its `README.md`: what changed and why (cite the paper), the exact command, the device (GPU, driver,
   torch version), and the result (time to target and val loss, or mean ± SE and p for several runs).
4. `python records/leaderboard.py check records/<track>/<YYYY-MM-DD>_<ShortName>` must print `ok`; if it names a
   problem, fix the run, never the log.
5. `python records/leaderboard.py table` (and `plot --track <track>` with matplotlib installed) and commit the
   folder, `records/README.md` and the plot together.
"""


def render_readme(root):
    """records/README.md: the template, then per track its rule, its plot if present and its table."""
    root, parts = Path(root), [README_TEMPLATE]
    for name, rule in TRACKS.items():
        parts.append(f"## `{name}`: {rule.title}\n")
        if (root / name / "plot.png").is_file():
            parts.append(f"![{name}: val loss vs training time and tokens]({name}/plot.png)\n")
        parts.append(markdown_table(collect_rows(root, name), name) + "\n")
    return "\n".join(parts)


def write_readme(root):
    path = Path(root) / "README.md"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(render_readme(root))
    return path


# ---- plots ----
def label_of(log):
    s = log.summary or {}
    return f"{s.get('script', '?')} ({s.get('device', '?')})"


def plot_runs(paths, out_png, labels=None, baseline=None, x="both", title=None):
    """Val loss vs training time (x="time"), tokens ("tokens") or both side by side; the baseline log (drawn even if
    not in paths) dashed; the target dotted when the runs share one."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    if x not in ("time", "tokens", "both"):
        raise ValueError(f"x must be time, tokens or both, not {x!r}")
    logs = [as_log(p) for p in paths]
    labels = list(labels) if labels else [label_of(log) for log in logs]
    if len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} logs")
    series = [(log, label, "-") for log, label in zip(logs, labels)]
    if baseline is not None:
        base = as_log(baseline)
        series = [(base, "baseline: " + label_of(base), "--")] + \
                 [s for s in series if Path(s[0].path).resolve() != Path(base.path).resolve()]
    longest = max((p[2] for log, _, _ in series for p in log.val_points), default=0) / 1000
    unit, scale = ("h", 3600) if longest >= 7200 else ("min", 60) if longest >= 120 else ("s", 1)
    losses = [p[1] for log, _, _ in series for p in log.val_points]
    targets = {(log.summary or {}).get("target_val_loss") for log, _, _ in series}
    target = targets.pop() if len(targets) == 1 else None
    kinds = ["time", "tokens"] if x == "both" else [x]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for log, label, style in series:
            xs = [p[2] / 1000 / scale if kind == "time" else p[0] * log.batch_tokens for p in log.val_points]
            ax.plot(xs, [p[1] for p in log.val_points], style, marker=".", label=label,
                    color="black" if style == "--" else None)
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1, label="target")
        if kind == "time":
            ax.set_xlabel(f"training time ({unit}, excluding validation)")
        else:
            ax.set_xlabel("tokens")
            ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("val loss")
        if losses:  # the first validations (~ln(vocab)) would squash the ends of the curves, where runs differ
            low, high = min(losses), min(max(losses), min(losses) + 1.5)
            pad = 0.05 * (high - low + 1e-3)
            ax.set_ylim(low - pad, high + pad)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, metadata={"Software": None})  # no version stamp: the same runs, the same bytes
    plt.close(fig)
    return str(out_png)


def plot_track(root, track, x="both"):
    """records/<track>/plot.png: the first log of every verified row, the earliest baseline dashed."""
    rows = [r for r in collect_rows(root, track) if r.logs and not r.problems]
    if not rows:
        raise RuntimeError(f"no verified record in records/{track}/ to plot")
    base = min((r for r in rows if r.baseline), key=lambda r: (r.date, r.folder), default=None)
    others = [r for r in rows if r is not base]
    return plot_runs([r.logs[0] for r in others], Path(root) / track / "plot.png",
                     labels=[f"{r.folder} {r.script} ({r.device})" for r in others],
                     baseline=base.logs[0] if base else None, x=x, title=f"records/{track}")


# ---- command line ----
def input_problem(path, want):
    """What keeps `path` from being read as `want` ("file", "folder" or "file or folder"), in a few words, or
    None when it can be read."""
    if not str(path):
        return f"is empty: give a {want}"
    path = Path(path)
    if not path.exists():
        return f"is a dangling symlink (to {os.readlink(path)})" if path.is_symlink() else f"no such {want}"
    if want == "file" and path.is_dir():
        return "is a folder, not a file"
    if want == "folder" and not path.is_dir():
        return "is a file, not a folder"
    try:  # the real test: modes, ACLs and capabilities all apply to it
        os.listdir(path) if path.is_dir() else open(path, "rb").close()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def output_folder_problem(path):
    """What keeps files from being written into the folder `path` (made when missing), in a few words, or None
    when they can be. Writing is tried, with a folder made and removed at once in `path`, or in its nearest
    existing parent when it is missing: file modes do not tell (root may write where they allow, yet not in
    /proc)."""
    if not str(path):
        return "is empty: give a folder"
    path = existing = Path(path)
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        what = "a file, not a folder" if existing.exists() else f"a dangling symlink (to {os.readlink(existing)})"
        return f"is {what}" if existing == path else f"cannot be made: {existing} is {what}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=existing))
    except OSError as e:
        return f"cannot be written ({e.strerror})" if existing == path else \
            f"cannot be made in {existing} ({e.strerror})"
    return None


def output_file_problem(path):
    """What keeps the file `path` from being written (its folder made when missing), in a few words, or None."""
    if not str(path):
        return "is empty: give a file"
    if Path(path).is_dir():
        return "is a folder, not a file"
    problem = output_folder_problem(Path(path).parent)
    return f"cannot be written: its folder {Path(path).parent} {problem}" if problem else None


def check_paths(args):
    """Every path of the command line, checked before anything is read or written: a one-line
    SystemExit("error: ...") naming the first bad one, the flag (or the command) and what is wrong."""
    problems = [(f"--root={args.root}", input_problem(args.root, "folder"))]
    if args.command == "table":  # it writes <root>/README.md
        problems.append((f"--root={args.root}", output_folder_problem(args.root)))
    elif args.command == "check":
        problems += [(f"check {p}", input_problem(p, "file or folder")) for p in args.paths]
    elif args.track:  # plot --track writes <root>/<track>/plot.png
        problems.append((f"--root={args.root}", output_folder_problem(Path(args.root) / args.track)))
    else:
        problems += [(f"plot {p}", input_problem(p, "file")) for p in args.logs]
        if args.baseline is not None:
            problems.append((f"--baseline={args.baseline}", input_problem(args.baseline, "file")))
        if args.out is not None:
            problems.append((f"--out={args.out}", output_file_problem(args.out)))
    for name, problem in problems:
        if problem:
            raise SystemExit(f"error: {name}: {problem}")


def run_check(paths, root, track=None, out=None):
    """Check log files, record folders, track folders, or (no paths) every track of root; print what fails and
    why; return how many items fail. A log's track is its grandparent folder's name, a record folder's its
    parent's, unless track is given."""
    out = out or sys.stdout
    items = []  # (label, problems)
    targets = [Path(p) for p in paths] or sorted(p for p in Path(root).iterdir()
                                                 if p.is_dir() and not p.name.startswith((".", "_")))
    for path in targets:
        if not path.exists():
            items.append((path, ["no such file or folder"]))
        elif path.is_file():
            rule = track or (path.parent.parent.name if path.parent.parent.name in TRACKS else None)
            if rule is None:
                print(f"note: {path} is not in records/<track>/<record>/: track rules not checked (use --track)",
                      file=out)
            items.append((path, check_log(path, rule)))
        elif path.name in TRACKS:
            items += [(f, check_record(f, track or path.name)) for f in record_folders(path)]
        elif not paths:
            items.append((path, [f"not a track: records/ holds only {', '.join(TRACKS)}"]))
        else:
            items.append((path, check_record(path, track)))
    for label, problems in items:
        print(f"{'FAIL' if problems else 'ok  '} {label}", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
    failed = sum(bool(problems) for _, problems in items)
    print(f"{len(items) - failed} ok, {failed} failing" if items else "nothing to check: no record folders yet",
          file=out)
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(RECORDS), help="the records/ tree (default: this file's folder)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="verify logs, record folders or tracks (default: all); exit 1 on failure")
    p_check.add_argument("paths", nargs="*", help="log files, record folders, track folders (default: all)")
    p_check.add_argument("--track", choices=sorted(TRACKS), help="apply this track's rules (default: from the path)")
    sub.add_parser("table", help="rewrite <root>/README.md")
    p_plot = sub.add_parser("plot", help="val loss vs time/tokens: given logs, or a track's records")
    p_plot.add_argument("logs", nargs="*", help="run logs to plot")
    p_plot.add_argument("--track", choices=sorted(TRACKS), help="plot a track's records into <root>/<track>/plot.png")
    p_plot.add_argument("--out", help="PNG path (for logs)")
    p_plot.add_argument("--labels", nargs="+", help="one label per log")
    p_plot.add_argument("--baseline", help="a log drawn dashed")
    p_plot.add_argument("--x", choices=["time", "tokens", "both"], default="both")
    args = parser.parse_args(argv)
    check_paths(args)
    if args.command == "check":
        return 1 if run_check(args.paths, args.root, args.track) else 0
    if args.command == "table":
        print(f"wrote {write_readme(args.root)}")
        return 0
    if not args.track and not (args.logs and args.out):
        parser.error("plot: give --track NAME, or logs and --out PNG")
    try:
        out = (plot_track(args.root, args.track, args.x) if args.track else
               plot_runs(args.logs, args.out, args.labels, args.baseline, args.x))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

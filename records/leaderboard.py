"""Verify record logs, keep the leaderboard (records/README.md) and plot runs.

    python records/leaderboard.py check [PATH...]       verify logs, record folders, tracks (default: all records/)
    python records/leaderboard.py table                 regenerate the tables in records/README.md
    python records/leaderboard.py plot --track proxy    val loss vs time and tokens -> records/proxy/plot.png
    python records/leaderboard.py plot LOG... --out run.png [--baseline LOG] [--labels A B] [--x time|tokens|both]

Layout: records/<track>/<YYYY-MM-DD>_<ShortName>/ holds a README.md (what changed, command, device, result) and one
or more full run logs (*.txt, as train_gpt2*.py wrote them). The track comes from the path. A log is trusted only as
far as it is consistent: the embedded code hashes to the summary's sha256, the step lines reproduce the summary's
time to target and losses, and the settings and device obey the track's rules. (A log can still be forged whole;
what it cannot do is claim a result its own lines and code contradict. Anyone can re-run the embedded code.)

Standard library + numpy; matplotlib only for `plot` (imported when used). Importable: bench.py builds on
parse_log, check_log, check_record, collect_rows, markdown_table and plot_runs.
"""
import argparse
import datetime
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RECORDS = Path(__file__).resolve().parent  # records/ itself; every command takes --root to use another tree


# ---- tracks ----
@dataclass(frozen=True)
class Track:
    name: str
    title: str
    target: float | None  # the val loss a record must reach; None: any (the log's own target is reported)
    val_tokens: int | None  # validation tokens the rules fix; None: any
    world_size: int | None  # processes the rules allow; None: any
    gpu: bool  # a CUDA device is required (CPU logs say `cpu (<arch>)`)
    fineweb: bool  # a FineWeb claim: validates on FineWeb's val shard
    p_max: float | None = 0.01  # several runs of one code: the one-sided t-test must give p < p_max (modded-nanogpt)


TRACKS = {t.name: t for t in [
    Track("bottlecap_1gpu", "FineWeb val loss ≤ 3.3821 on the first 1,048,576 val tokens, 1 GPU",
          3.3821, 1048576, 1, True, True),
    Track("modded", "FineWeb val loss ≤ 3.28 on the first 10,485,760 val tokens, any number of GPUs "
          "(modded-nanogpt's rule)", 3.28, 10485760, None, True, True),
    Track("proxy", "offline proxy: enwiki train, OpenWebText-sample val — speed and loss-vs-tokens comparisons, "
          "never a FineWeb claim", None, None, None, False, False, p_max=None),
]}
RECORD_NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_([A-Za-z0-9][A-Za-z0-9_.-]*)$")
LOG_SUFFIXES = (".txt", ".log")
# settings that may differ between runs of one record without making them different experiments
# (data paths differ between machines; the FineWeb tracks check val_files by name)
PER_RUN_SETTINGS = {"seed", "log_dir", "save_every", "resume", "train_files", "val_files"}
SUMMARY_KEYS = ["script", "script_sha256", "target_val_loss", "val_tokens", "best_val_loss", "final_val_loss",
                "reached", "time_to_target_s", "train_time_s", "tokens_seen", "steps", "peak_mem_gb", "device",
                "world_size"]  # DESIGN.md: exactly these keys, more may follow
LOSS_HALF_ULP = 0.5e-4  # step lines print losses with 4 decimals: the true value is within this of the printed one
TIME_TOL_MS = 1.0  # step lines print train_time in whole ms; the summary has full floats


# ---- parsing ----
@dataclass
class Log:
    """One run log, as train_gpt2*.py writes it (see README, "Run logs and checkpoints")."""
    path: str
    run_id: str = ""
    command: str = ""  # the `# run <id>: <script> <flags>` line, after the colon
    sources: dict = field(default_factory=dict)  # relpath -> exact text (the script first, then kernels/)
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
    def script(self):
        return (self.summary or {}).get("script") or (next(iter(self.sources), "?").rsplit("/", 1)[-1])

    @property
    def batch_tokens(self):
        return self.hyperparameters.get("batch_tokens")

    @property
    def target(self):
        return (self.summary or {}).get("target_val_loss", self.hyperparameters.get("target_val_loss"))

    @property
    def code_key(self):
        """What "the same code" means: every embedded source file and its hash."""
        return tuple(sorted((rel, sha256(text)) for rel, text in self.sources.items()))


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


SOURCE_RE = re.compile(r"==== source (.+?) sha256=([0-9a-f]{64}) chars=(\d+) ====")
STEP_RE = re.compile(r"step:(\d+)/(\d+) (train|val)_loss:(\S+) train_time:(-?\d+)ms(?: |$)")
ENV_DEVICE_RE = re.compile(r"^device (.+?)  world_size (\d+)", re.M)


def parse_log(path):
    """Read a run log into a Log; never raises on a malformed log (parse_errors says what was wrong)."""
    log = Log(path=str(path))
    try:  # newline="": the sources' `chars=` counts are exact only with the file's own line endings
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        log.parse_errors.append(f"cannot read the log: {e}")
        return log
    first, _, _ = text.partition("\n")
    m = re.match(r"# run (\S+): (.*)$", first)
    if m:
        log.run_id, log.command = m[1], m[2]
    else:
        log.parse_errors.append("line 1 is not `# run <run_id>: <script> <flags>`: not a train_gpt2*.py log")
    pos = len(first) + 1
    while text.startswith("==== source ", pos):  # header, exactly `chars` characters of text, "\n"
        eol = text.find("\n", pos)
        m = SOURCE_RE.fullmatch(text[pos:eol])
        if eol < 0 or not m:
            log.parse_errors.append(f"malformed source header: {text[pos:eol][:120]!r}")
            break
        rel, declared, n = m[1], m[2], int(m[3])
        body = text[eol + 1:eol + 1 + n]
        if len(body) < n or text[eol + 1 + n:eol + 2 + n] != "\n":
            log.parse_errors.append(f"source {rel}: the text is not {n} characters followed by a newline, as its "
                                    "header says (edited code?)")
            break
        log.sources[rel], log.declared_sha256[rel] = body, declared
        pos = eol + 2 + n
    if not log.sources:
        log.parse_errors.append("no `==== source ... ====` block: the log does not carry its code")
    env_header = "==== environment ====\n"
    if not text.startswith(env_header, pos):
        log.parse_errors.append("`==== environment ====` does not follow the sources")
        found = text.rfind("\n" + env_header)  # read on, so the other checks still report
        if found < 0:
            return log
        pos = found + 1
    rest = text[pos + len(env_header):]
    environment, sep, rest = rest.partition("==== hyperparameters ====\n")
    if not sep:
        log.parse_errors.append("no `==== hyperparameters ====` section")
        return log
    log.environment = environment.rstrip("\n")
    hyper_line, _, rest = rest.partition("\n")
    hyper = json_or_none(hyper_line)
    if isinstance(hyper, dict):
        log.hyperparameters = hyper
    else:
        log.parse_errors.append("the hyperparameters line is not a JSON object")
    training, sep, _ = rest.partition("==== training ====\n")
    if not sep or training.strip():
        log.parse_errors.append("no `==== training ====` line right after the hyperparameters")
        if not sep:
            return log
    lines = rest.split("==== training ====\n", 1)[1].split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        m = STEP_RE.match(line)
        if line.startswith('{"summary"'):
            if i != len(lines) - 1:
                log.parse_errors.append("the summary is not the last line")
            summary = (json_or_none(line) or {}).get("summary")
            if isinstance(summary, dict):
                log.summary = summary
            else:
                log.parse_errors.append("the summary line is not valid JSON")
        elif m:
            try:
                point = (int(m[1]), float(m[4]), int(m[5]))
            except ValueError:
                log.parse_errors.append(f"unreadable step line: {line[:120]!r}")
                continue
            (log.train_points if m[3] == "train" else log.val_points).append(point)
        elif line.startswith("error:"):
            log.errors.append(line)
        elif line.startswith("#"):
            log.comments.append(line)
    if log.summary is None and not any("summary" in e for e in log.parse_errors):
        log.parse_errors.append("no final `{\"summary\": ...}` line: the run did not finish")
    return log


def json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def as_log(log_or_path):
    return log_or_path if isinstance(log_or_path, Log) else parse_log(log_or_path)


# ---- the claim a log makes ----
def reaches(printed, target):
    """Does a val loss printed with 4 decimals reach the target? True, False, or None when the rounding hides it."""
    if printed + LOSS_HALF_ULP < target - 1e-12:
        return True
    if printed - LOSS_HALF_ULP > target + 1e-12:
        return False
    return None


def claimed_point(log):
    """The val line at the summary's time_to_target_s: (step, val_loss, train_time_ms), or None."""
    s = log.summary or {}
    tts, target = s.get("time_to_target_s"), s.get("target_val_loss")
    if tts is None or target is None:
        return None
    for point in log.val_points:
        if abs(point[2] - tts * 1000) <= TIME_TOL_MS and reaches(point[1], target) is not False:
            return point
    return None


@dataclass
class Result:
    """What one log shows: with reached, the time/loss/tokens at the first val line <= target; else the end."""
    reached: bool
    time_s: float | None
    val_loss: float | None
    tokens: int | None
    step: int | None


def log_result(log):
    log = as_log(log)
    s, bt = log.summary or {}, log.batch_tokens or 0
    point = claimed_point(log) if s.get("reached") else None
    if point:
        return Result(True, s["time_to_target_s"], point[1], point[0] * bt, point[0])
    return Result(False, None, s.get("final_val_loss"), s.get("tokens_seen"), s.get("steps"))


# ---- checks ----
def is_gpu_device(device, environment=""):
    """Logs name a CUDA device by its GPU name and a CPU as `cpu (<arch>)`; the environment names the CUDA build."""
    return bool(device) and not str(device).lower().startswith("cpu") and "cuda None" not in environment


def check_log(log_or_path, track=None, require_target=True):
    """Problems with one log (empty: it verifies). track: a TRACKS name (or Track) whose rules apply, None for the
    generic checks only. require_target: a FineWeb track's single-run record must reach its target."""
    log = as_log(log_or_path)
    try:
        return _check_log(log, track, require_target)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value of the wrong type in a hand-edited log
        return log.parse_errors + [f"malformed value in the summary or settings ({type(e).__name__}: {e})"]


def _check_log(log, track, require_target):
    problems = list(log.parse_errors)
    s = log.summary
    if s is None:
        return problems
    missing = [k for k in SUMMARY_KEYS if k not in s]
    if missing:
        return problems + [f"the summary lacks {', '.join(missing)}"]

    # the code: every source hashes to its header; the script's hash is the summary's
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

    # settings and summary agree
    hp = log.hyperparameters
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

    # the step lines reproduce the summary
    steps = [p[0] for p in sorted(log.train_points + log.val_points, key=lambda p: (p[2], p[0]))]
    if steps != sorted(steps):
        problems.append("step lines are out of order (train_time and step disagree)")
    vals = log.val_points
    if not vals:
        problems.append("no val_loss line")
        return problems
    last_step = max(p[0] for p in log.train_points + vals)
    if last_step != s["steps"]:
        problems.append(f"the last step line is step {last_step}, the summary says steps {s['steps']}")
    if s["final_val_loss"] is None or f"{vals[-1][1]:.4f}" != f"{s['final_val_loss']:.4f}":
        problems.append(f"the last val line says val_loss {vals[-1][1]:.4f} at step {vals[-1][0]}, the summary's "
                        f"final_val_loss is {s['final_val_loss']} (edited val loss?)")
    best = min(p[1] for p in vals)
    if s["best_val_loss"] is None or f"{best:.4f}" != f"{s['best_val_loss']:.4f}":
        problems.append(f"the best val line says {best:.4f}, the summary's best_val_loss is {s['best_val_loss']} "
                        "(edited val loss?)")
    last_timed = max(log.train_points + vals, key=lambda p: (p[2], p[0]))
    if not log.errors and last_timed in vals and abs(last_timed[2] - s["train_time_s"] * 1000) > TIME_TOL_MS:
        problems.append(f"the last val line is at train_time {last_timed[2]}ms, the summary's train_time_s is "
                        f"{s['train_time_s']}")

    # time to target, recomputed: the first val line <= target
    target = s["target_val_loss"]
    first_reached = next((p for p in vals if reaches(p[1], target)), None)
    if s["reached"]:
        point = claimed_point(log)
        if s["time_to_target_s"] is None:
            problems.append("reached is true but time_to_target_s is null")
        elif point is None:
            problems.append(f"time_to_target_s is {s['time_to_target_s']:.3f}s but no val line at that train_time "
                            f"has val_loss <= {target}" + (f"; the first that does is step {first_reached[0]} at "
                                                           f"{first_reached[2]}ms" if first_reached else
                                                           "; none does: the run never reached the target"))
        elif first_reached and first_reached[0] < point[0]:
            problems.append(f"time_to_target_s is {s['time_to_target_s']:.3f}s (step {point[0]}), but step "
                            f"{first_reached[0]} already had val_loss {first_reached[1]:.4f} <= {target} at "
                            f"{first_reached[2]}ms")
        if s["best_val_loss"] is not None and s["best_val_loss"] > target:
            problems.append(f"reached is true but best_val_loss {s['best_val_loss']} > target {target}")
    else:
        if s["time_to_target_s"] is not None:
            problems.append("reached is false but time_to_target_s is set")
        if first_reached:
            problems.append(f"reached is false but step {first_reached[0]} has val_loss {first_reached[1]:.4f} "
                            f"<= {target}")

    if track is not None:
        problems += track_problems(log, track, require_target)
    return problems


def track_problems(log, track, require_target=True):
    """The track's rules: target, val_tokens, device, world size; and, for a single-run claim, the target reached."""
    rule = track if isinstance(track, Track) else TRACKS.get(track)
    if rule is None:
        return [f"unknown track {track!r}: records/<track>/ must be one of {', '.join(TRACKS)}"]
    s, problems = log.summary, []
    if rule.target is not None and not math.isclose(s["target_val_loss"], rule.target, abs_tol=1e-9):
        problems.append(f"target_val_loss is {s['target_val_loss']}, the {rule.name} track's is {rule.target}")
    if rule.val_tokens is not None and s["val_tokens"] != rule.val_tokens:
        problems.append(f"val_tokens is {s['val_tokens']}, the {rule.name} track measures on {rule.val_tokens}")
    if rule.world_size is not None and s["world_size"] != rule.world_size:
        problems.append(f"world_size is {s['world_size']}, the {rule.name} track allows {rule.world_size}")
    if rule.gpu and not is_gpu_device(s["device"], log.environment):
        problems.append(f"device is {s['device']!r}: the {rule.name} track needs a CUDA GPU")
    if rule.fineweb and "fineweb_val" not in str(log.hyperparameters.get("val_files", "fineweb_val")):
        problems.append(f"val_files is {log.hyperparameters['val_files']!r}: a FineWeb claim validates on "
                        "fineweb_val_*.bin")
    resumed = next((c for c in log.comments if c.startswith("# resumed from")), None)
    if rule.fineweb and resumed:
        problems.append(f"a resumed run ({resumed[2:]}): its log lacks the steps before the resume; a record is one "
                        "uninterrupted run")
    if rule.target is not None and require_target and not s["reached"]:
        problems.append(f"the run never reached the target {rule.target} (best val_loss {s['best_val_loss']})")
    return problems


# ---- several runs of one code: a one-sided t-test ----
def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny = 1e-300  # modified Lentz's method
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even then the odd coefficient
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def student_t_cdf(t, dof):
    """P(T <= t) for Student's t with dof degrees of freedom: P(|T| > |t|) = I_{dof/(dof+t^2)}(dof/2, 1/2)."""
    if dof <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {dof}")
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))  # P(T > |t|)
    return tail if t < 0 else 1.0 - tail


@dataclass
class TTest:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator)
    sem: float  # standard error of the mean
    t: float | None
    p: float | None  # None for n < 2: one run gives no test


def t_test_below(values, target):
    """One-sided one-sample t-test of H0: mean >= target against H1: mean < target.
    t = (mean - target) / (s / sqrt(n)), p = P(T_{n-1} <= t). Identical values (s = 0): p = 0 if the mean is below
    the target, else 1. modded-nanogpt accepts a record at p < 0.01."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if n < 2:
        return TTest(1, mean, float("nan"), float("nan"), None, None)
    std = float(x.std(ddof=1)) if np.ptp(x) > 0 else 0.0  # identical values: exactly 0, not rounding noise
    sem = std / math.sqrt(n)
    if sem == 0.0:
        t = -math.inf if mean < target else (math.inf if mean > target else 0.0)
        return TTest(n, mean, std, sem, t, 0.0 if mean < target else 1.0)
    t = (mean - target) / sem
    return TTest(n, mean, std, sem, t, student_t_cdf(t, n - 1))


# ---- record folders ----
@dataclass
class Row:
    """One line of a track's table: one record folder, or one code of a folder holding several (a proxy race)."""
    track: str
    folder: str  # <YYYY-MM-DD>_<ShortName>
    date: str
    script: str
    device: str
    logs: list  # Log objects, sorted by file name
    target: float | None
    time_s: float | None  # one run: time to target; several: mean train_time_s (fixed-length runs, modded-style)
    val_loss: float | None  # one run: val loss at the target (or the final one); several: the mean final val loss
    tokens: int | None
    ttest: TTest | None = None  # several runs
    problems: list = field(default_factory=list)  # from check: a row with problems is listed but not ranked
    p_problem: str | None = None  # the one of problems that says the t-test failed
    baseline: bool = False

    @property
    def ranked(self):
        return not self.problems and self.time_s is not None


def find_logs(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in LOG_SUFFIXES)


def group_by_code(logs):
    groups = {}
    for log in logs:
        groups.setdefault(log.code_key, []).append(log)
    return list(groups.values())


def record_rows(folder, track=None):
    """The folder's rows (one per code it holds) with their check problems; track defaults to the parent's name."""
    folder = Path(folder)
    track = track or folder.parent.name
    rule = TRACKS.get(track)
    m = RECORD_NAME_RE.match(folder.name)
    folder_problems = []
    if not m:
        folder_problems.append(f"folder name {folder.name!r} is not <YYYY-MM-DD>_<ShortName>")
    else:
        try:
            datetime.date.fromisoformat(m[1])
        except ValueError:
            folder_problems.append(f"folder name {folder.name!r}: {m[1]} is not a date")
    if not (folder / "README.md").is_file():
        folder_problems.append("no README.md (what changed, the command, the device, the result)")
    if rule is None:
        folder_problems.append(f"unknown track {track!r}: records/<track>/ must be one of {', '.join(TRACKS)}")
    paths = find_logs(folder)
    if not paths:
        return [Row(track, folder.name, m[1] if m else "", "?", "?", [], None, None, None, None,
                    problems=folder_problems + ["no run log (*.txt) in the folder"])]
    logs = [parse_log(p) for p in paths]
    groups = group_by_code(logs)
    if rule is not None and rule.fineweb and len(groups) > 1:
        folder_problems.append(f"{len(groups)} different codes in one record: a FineWeb record is one code "
                               "(several runs of it are averaged)")
    run_ids = [log.run_id for log in logs]
    if len(set(run_ids)) < len(run_ids):
        folder_problems.append("the same run appears twice (duplicate run_id)")
    rows = []
    for group in groups:
        several = len(group) > 1  # several runs are judged by their mean: each needs not reach the target
        problems = list(folder_problems)
        for log in group:
            problems += [f"{Path(log.path).name}: {p}"
                         for p in check_log(log, track if rule else None, require_target=not several)]
        s0 = group[0].summary or {}
        settings = [{k: v for k, v in log.hyperparameters.items() if k not in PER_RUN_SETTINGS} for log in group]
        differing = sorted({k for st in settings for k in st if st[k] != settings[0].get(k)})
        if differing:
            problems.append(f"the runs of one code differ in settings: {', '.join(differing)}")
        device = str(s0.get("device", "?")) + (f" x{s0['world_size']}" if s0.get("world_size", 1) != 1 else "")
        row = Row(track, folder.name, m[1] if m else "", s0.get("script", group[0].script), device, group,
                  s0.get("target_val_loss"), None, None, None, problems=problems)
        try:
            summarise(row, rule)
        except (TypeError, ValueError, KeyError):  # malformed summaries: check_log has said so
            row.time_s = row.val_loss = row.tokens = row.ttest = None
        rows.append(row)
    return rows


def summarise(row, rule):
    """A row's time, val loss and tokens: one run's claim, or the mean of several with the t-test."""
    if not all(log.summary for log in row.logs):
        return
    if len(row.logs) == 1:
        r = log_result(row.logs[0])
        row.time_s, row.val_loss, row.tokens = r.time_s, r.val_loss, r.tokens
        return
    finals = [log.summary["final_val_loss"] for log in row.logs]
    if None in finals:
        row.problems.append("a run has no final val loss")
        return
    row.ttest = t = t_test_below(finals, row.target)
    row.val_loss = t.mean
    row.time_s = float(np.mean([log.summary["train_time_s"] for log in row.logs]))
    row.tokens = int(np.mean([log.summary["tokens_seen"] for log in row.logs]))
    if rule and rule.p_max is not None and not t.p < rule.p_max:
        row.p_problem = (f"mean final val loss {t.mean:.4f} ± {t.sem:.4f} over {t.n} runs: p = {t.p:.3g} for "
                         f"mean <= {row.target}, the track needs p < {rule.p_max}")
        row.problems.append(row.p_problem)


def check_record(folder, track=None):
    """Problems of a record folder (its name, README, every log, one code, the t-test for several runs)."""
    return list(dict.fromkeys(p for row in record_rows(folder, track) for p in row.problems))  # once each


def record_folders(root, track):
    d = Path(root) / track
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def is_baseline_folder(name):
    """The baseline rule: a record folder whose name ends in `_Baseline` (any case)."""
    return name.lower().endswith("_baseline")


def collect_rows(root, track):
    """Every row of a track, sorted: ranked rows by time, then unranked ones; the baseline marked."""
    rows = [row for folder in record_folders(root, track) for row in record_rows(folder, track)]
    rows.sort(key=lambda r: (not r.ranked, r.time_s is None, r.time_s or 0.0,
                             r.val_loss if r.val_loss is not None else math.inf, r.date, r.folder, r.script))
    base = baseline_row(rows)
    if base is not None:
        base.baseline = True
    return rows


def baseline_row(rows):
    """The track's baseline: the earliest `*_Baseline` folder's row that reached its target (in a folder holding
    several codes, the row of train_gpt2.py)."""
    candidates = [r for r in rows if is_baseline_folder(r.folder) and r.time_s is not None and not r.problems]
    candidates.sort(key=lambda r: (r.date, r.folder, r.script != "train_gpt2.py", r.script))
    return candidates[0] if candidates else None


# ---- the table ----
def format_time(s):
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.2f} min" if s < 7200 else f"{s / 3600:.2f} h"


def format_tokens(n):
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_loss(row):
    if row.val_loss is None:
        return "—"
    if row.ttest is not None and row.ttest.p is not None:
        return f"{row.val_loss:.4f} ± {row.ttest.sem:.4f} (n={row.ttest.n}, p={row.ttest.p:.2g})"
    return f"{row.val_loss:.4f}"


def markdown_table(rows, track):
    """A track's rows (from collect_rows) as a Markdown table; links are relative to records/."""
    rule = TRACKS.get(track)
    if not rows:
        return "No records yet."
    base = next((r for r in rows if r.baseline), None)
    proxy = rule is None or rule.target is None
    head = ["#", "time", "speed-up", "val loss"] + (["target"] if proxy else []) + \
           ["tokens", "script", "device", "date", "record", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = 0
    for row in rows:
        rank += row.ranked
        speedup = "—"
        if base is not None and row.ranked and row.target == base.target:
            speedup = f"{base.time_s / row.time_s:.2f}×"
        notes = []
        if row.baseline:
            notes.append("baseline")
        if row.p_problem:
            notes.append(f"**p ≥ {rule.p_max}**: not significant")
        others = [p for p in row.problems if p != row.p_problem]
        if others:
            notes.append(f"**fails check** ({len(others)}): {others[0]}")
        elif row.time_s is None:
            notes.append("target not reached")
        cells = [str(rank) if row.ranked else "—", format_time(row.time_s), speedup, format_loss(row)]
        cells += [f"{row.target:g}" if row.target is not None else "—"] if proxy else []
        cells += [format_tokens(row.tokens), f"`{row.script}`", row.device, row.date,
                  f"[{row.folder}]({track}/{row.folder}/)", "; ".join(notes)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


TABLE_BEGIN = "<!-- table:begin: generated by `python records/leaderboard.py table`; edits inside are lost -->"
TABLE_BEGIN_PREFIX = "<!-- table:begin"
TABLE_END = "<!-- table:end -->"
README_TEMPLATE = """# Records

Timed, verifiable runs. Each record is a folder `records/<track>/<YYYY-MM-DD>_<ShortName>/` with a `README.md`
(what changed, the command, the device, the result) and the full, unedited run log(s) the training script wrote.
Every log carries the code that produced it, so anyone can check it and re-run it:
`python records/leaderboard.py check` verifies every log (the code hashes to the summary, the step lines give the
summary's time to target and losses, the settings and device obey the track) and `table` rewrites the tables below.

| track | rule |
| --- | --- |
""" + "\n".join(f"| `{t.name}` | {t.title} |" for t in TRACKS.values()) + f"""

- **time** is training time excluding validation (and compile warm-up, as the log states), to the first
  validation at or below the target. A record of several runs of one code (different `--seed`s) is judged
  modded-nanogpt-style instead: the mean final val loss ± its standard error, a one-sided t-test that the mean is
  ≤ the target (p < 0.01 on the FineWeb tracks), and the mean training time of the runs.
- **baseline**: the earliest folder of a track whose name ends in `_Baseline`; speed-up = its time / the row's
  (same target only). A record that fails `check` is listed without a rank, with the first problem found.
- **proxy** rows compare scripts on our offline data at equal settings; they are never FineWeb results.

## How to submit a record

1. Train on an otherwise idle machine with the track's preset, e.g.
   `torchrun --nproc_per_node=1 train_gpt2_<idea>.py --preset=bottlecap` (stops at the target); to claim by the
   mean, run the same code and settings several times with different `--seed`s.
2. Create `records/<track>/<YYYY-MM-DD>_<ShortName>/` and copy the run log(s) from `logs/` into it, unedited.
3. Write its `README.md`: what changed and why (cite the paper), the exact command, the device (GPU, driver,
   torch version), and the result (time to target and val loss, or mean ± SE and p for several runs).
4. `python records/leaderboard.py check records/<track>/<YYYY-MM-DD>_<ShortName>` must print `ok`; if it names a
   problem, fix the run, never the log.
5. `python records/leaderboard.py table` (and `plot --track <track>` with matplotlib installed) and commit the
   folder, `records/README.md` and the plot together.

{TABLE_BEGIN}
{TABLE_END}
"""


def render_tables(root):
    """The generated part of records/README.md: per track, its rule, the plot if present, the table."""
    root = Path(root)
    parts = []
    for name, rule in TRACKS.items():
        rows = collect_rows(root, name)
        parts.append(f"## `{name}`: {rule.title}\n")
        if (root / name / "plot.png").is_file():
            parts.append(f"![{name}: val loss vs training time and tokens]({name}/plot.png)\n")
        parts.append(markdown_table(rows, name) + "\n")
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in TRACKS
                    and not p.name.startswith((".", "_"))) if root.is_dir() else []
    if others:
        parts.append("Ignored (not a track): " + ", ".join(f"`{o}/`" for o in others) + "\n")
    return "\n".join(parts)


def render_readme(root, current=None):
    """records/README.md with its tables regenerated: the text outside the table markers is kept as it is."""
    text = current if current is not None else README_TEMPLATE
    if TABLE_BEGIN_PREFIX not in text or TABLE_END not in text.split(TABLE_BEGIN_PREFIX, 1)[1]:
        text = README_TEMPLATE  # no markers: start again from the template
    begin = text.index(TABLE_BEGIN_PREFIX)
    begin_end = text.index("-->", begin) + len("-->")
    end = text.index(TABLE_END, begin_end)
    return text[:begin] + TABLE_BEGIN + "\n\n" + render_tables(root) + "\n" + text[end:]


def write_readme(root):
    path = Path(root) / "README.md"
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    text = render_readme(root, current)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return path


# ---- plots ----
def plot_runs(paths, out_png, labels=None, baseline=None, x="both", title=None, baseline_label=None):
    """Val loss vs training time (x="time"), vs tokens ("tokens") or both side by side, for run logs; the baseline
    log (a path, drawn even if not in paths) dashed; the target as a dotted line when the runs share one."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    if x not in ("time", "tokens", "both"):
        raise ValueError(f"x must be time, tokens or both, not {x!r}")
    logs = [as_log(p) for p in paths]
    labels = list(labels) if labels else [label_of(log) for log in logs]
    if len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} logs")
    base = None
    if baseline is not None:
        base = as_log(baseline)
        for i, log in enumerate(logs):
            if Path(log.path).resolve() == Path(base.path).resolve():
                del logs[i], labels[i]
                break
    series = ([(base, "baseline: " + (baseline_label or label_of(base)), "--")] if base else []) + [(lg, lb, "-")
                                                                                 for lg, lb in zip(logs, labels)]
    axes_x = ["time", "tokens"] if x == "both" else [x]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.5 * len(axes_x), 4.5), squeeze=False)
    longest = max([p[2] for log, _, _ in series for p in log.val_points] or [0]) / 1000
    unit, scale = ("h", 3600) if longest >= 7200 else ("min", 60) if longest >= 120 else ("s", 1)
    most = max([p[0] * (log.batch_tokens or 0) for log, _, _ in series for p in log.val_points] or [0])
    tok_unit, tok_scale = next((u, v) for u, v in (("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)) if most >= v or v == 1)
    targets = {log.target for log, _, _ in series}
    losses = [p[1] for log, _, _ in series for p in log.val_points]
    for ax, kind in zip(axes[0], axes_x):
        for log, label, style in series:
            pts = log.val_points
            if kind == "time":
                xs = [p[2] / 1000 / scale for p in pts]
            else:
                xs = [p[0] * (log.batch_tokens or 0) / tok_scale for p in pts]
            ax.plot(xs, [p[1] for p in pts], style, marker=".", label=label, color="black" if style == "--" else None)
        if len(targets) == 1 and None not in targets:
            ax.axhline(next(iter(targets)), color="gray", linestyle=":", linewidth=1, label="target")
        ax.set_xlabel(f"training time ({unit}, excluding validation)" if kind == "time"
                      else f"tokens ({tok_unit})" if tok_unit else "tokens")
        ax.set_ylabel("val loss")
        if losses:  # the first validations (~ln(vocab)) would squash the end of the curves, where records differ
            low, high = min(losses), min(max(losses), min(losses) + 1.5)
            ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return str(out_png)


def label_of(log):
    s = log.summary or {}
    return f"{s.get('script', log.script)} ({s.get('device', '?')})"


def plot_track(root, track, x="both"):
    """records/<track>/plot.png: the first log of every verified row, the baseline dashed."""
    rows = [r for r in collect_rows(root, track) if r.logs and not r.problems]
    if not rows:
        raise RuntimeError(f"no verified record in records/{track}/ to plot")
    base = next((r for r in rows if r.baseline), None)
    others = [r for r in rows if r is not base]
    labels = [r.folder + (f" {r.script}" if sum(o.folder == r.folder for o in rows) > 1 else "") for r in others]
    return plot_runs([r.logs[0] for r in others], Path(root) / track / "plot.png", labels=labels,
                     baseline=base.logs[0] if base else None, x=x, title=f"records/{track}",
                     baseline_label=base.folder if base else None)


# ---- command line ----
def run_check(paths, root, track_override=None, out=None):
    """Check log files, record folders, track folders or the whole tree (the default); print what fails and why;
    return the number of items failing. A log's track is its grandparent folder's name
    (records/<track>/<record>/<log>); a record folder's, its parent's."""
    root, out = Path(root), out or sys.stdout
    items = []  # (label, problems)
    for path in [Path(p) for p in paths] or [root]:
        if not path.exists():
            items.append((str(path), ["no such file or folder"]))
        elif path.is_file():
            track = track_override or (path.parent.parent.name if path.parent.parent.name in TRACKS else None)
            if track is None:
                print(f"note: {path} is not in records/<track>/<record>/: track rules not checked (use --track)",
                      file=out)
            items.append((str(path), check_log(path, track)))
        elif path.name in TRACKS:
            items += [(str(f), check_record(f, track_override or path.name)) for f in record_folders(path.parent,
                                                                                                     path.name)]
        elif path.resolve() == root.resolve():
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                if sub.name in TRACKS:
                    items += [(str(f), check_record(f, track_override or sub.name))
                              for f in record_folders(path, sub.name)]
                else:
                    items.append((str(sub), [f"not a track: records/ holds only {', '.join(TRACKS)}"]))
        else:
            items.append((str(path), check_record(path, track_override or path.parent.name)))
    failed = 0
    for label, problems in items:
        print(f"{'FAIL' if problems else 'ok  '} {label}", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
        failed += bool(problems)
    print(f"{len(items) - failed} ok, {failed} failing" if items else "nothing to check: no record folders yet",
          file=out)
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    root_help = "the records/ tree (default: this file's folder)"
    parser.add_argument("--root", default=str(RECORDS), help=root_help)
    common = argparse.ArgumentParser(add_help=False)  # --root also after the command
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", parents=[common],
                             help="verify logs, record folders or tracks (default: all); exit 1 on failure")
    p_check.add_argument("paths", nargs="*", help="log files, record folders, track folders (default: all)")
    p_check.add_argument("--track", choices=sorted(TRACKS), help="apply this track's rules (default: from the path)")
    sub.add_parser("table", parents=[common], help="regenerate the tables in <root>/README.md")
    p_plot = sub.add_parser("plot", parents=[common], help="val loss vs time/tokens: given logs, or a track's records")
    p_plot.add_argument("logs", nargs="*", help="run logs to plot")
    p_plot.add_argument("--track", choices=sorted(TRACKS), help="plot a track's records into <root>/<track>/plot.png")
    p_plot.add_argument("--out", help="PNG path (for logs)")
    p_plot.add_argument("--labels", nargs="+", help="one label per log")
    p_plot.add_argument("--baseline", help="a log drawn dashed")
    p_plot.add_argument("--x", choices=["time", "tokens", "both"], default="both")
    args = parser.parse_args(argv)

    if args.command == "check":
        return 1 if run_check(args.paths, args.root, args.track) else 0
    if args.command == "table":
        path = write_readme(args.root)
        print(f"wrote {path}")
        return 0
    try:
        if args.track:
            out = plot_track(args.root, args.track, args.x)
        elif args.logs and args.out:
            out = plot_runs(args.logs, args.out, args.labels, args.baseline, args.x)
        else:
            parser.error("plot: give --track NAME, or logs and --out PNG")
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

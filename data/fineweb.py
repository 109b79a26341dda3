"""Get token shards for the train scripts: download pre-tokenized FineWeb10B, or tokenize local text.

    python data/fineweb.py --shards 8
        the FineWeb validation shard and 8 training shards (100M GPT-2 tokens each) into data/fineweb10B/,
        from the Hugging Face dataset repo --repo (resumable; complete files are skipped; headers checked)
    python data/fineweb.py --from-text FILE... --out DIR [--prefix NAME] [--val-tokens N|all] [--shard-tokens N]
        .txt (one document per file) or .jsonl / .jsonl.xz / .jsonl.gz (field "text", one document per line),
        tokenized with tiktoken's GPT-2 BPE in parallel into DIR/NAME_val_000000.bin, DIR/NAME_train_000001.bin, ...
        (empty and blank documents are skipped). Existing shards are never overwritten, and a run that fails
        (bad input, Ctrl-C, SIGTERM) removes the shards it wrote: DIR holds a complete set or none.

Shard format (llm.c / modded-nanogpt): 256 little-endian int32 header [20240520, 1, n_tokens, 0, ...], then
n_tokens uint16 token ids; every document is preceded by <|endoftext|> (50256). Offline, tiktoken needs
TIKTOKEN_CACHE_DIR pointing at its BPE files; unset, ../shared/data/tiktoken_cache beside the repo is used if present.
"""
import argparse
import contextlib
import glob
import gzip
import json
import lzma
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256  # <|endoftext|> in the GPT-2 vocabulary
DEFAULT_REPO = "kjj0/fineweb10B-gpt2"  # the pre-tokenized FineWeb10B shards modded-nanogpt uses
DEFAULT_REPO_TRAIN_SHARDS = 103  # fineweb_train_000001.bin ... fineweb_train_000103.bin in DEFAULT_REPO
MAX_SHARD_TOKENS = 2**31 - 1  # the header holds the token count as an int32


def write_shard(path, tokens):
    """Write one shard atomically (temp file + rename), so an interrupted run leaves no half-written shard."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    os.replace(path + ".tmp", path)


def check_shard(path):
    """Number of tokens in a shard; ValueError naming the file if its header or size is wrong."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        raise ValueError(f"{path}: not a token shard (bad or short header)")
    if size != HEADER_INTS * 4 + 2 * int(header[2]):
        raise ValueError(f"{path}: header says {header[2]} tokens but the file has {size} bytes (incomplete?)")
    return int(header[2])


# ---- signals and folders, shared by both commands ----
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM. A KeyboardInterrupt, so that whatever cleans up after Ctrl-C (tokenize_files,
    huggingface_hub's download) does so after SIGTERM too."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """What signals_raise_interrupted's handler knows: inside signals_held (holding > 0) a signal is kept (pending)
    and raised when the hold ends; after the first one (fired), later ones are ignored, so that a second Ctrl-C
    cannot cut the clean-up of the first short."""
    holding, pending, fired = 0, None, False


def _on_stop_signal(signum, frame):  # Python runs a handler in the main thread, whichever thread the signal hit
    if _StopSignals.fired:
        return
    if _StopSignals.holding:
        _StopSignals.pending = _StopSignals.pending or signum
        return
    _StopSignals.fired = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise_interrupted():
    """While inside, the first SIGINT or SIGTERM raises Interrupted in the main thread (see _StopSignals). A signal
    the command was started with ignored (a background job's SIGINT, say) stays ignored."""
    _StopSignals.holding, _StopSignals.pending, _StopSignals.fired = 0, None, False
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, handler)


@contextlib.contextmanager
def signals_held():
    """Under signals_raise_interrupted, SIGINT and SIGTERM wait until the block ends (then the first raises
    Interrupted), for steps a signal must not cut in half: making folders, starting and stopping the workers,
    removing shards."""
    _StopSignals.holding += 1
    try:
        yield
    finally:
        _StopSignals.holding -= 1
        if not _StopSignals.holding and _StopSignals.pending and not _StopSignals.fired:
            _StopSignals.fired = True
            raise Interrupted(_StopSignals.pending)


def check_folder(flag, path):
    """SystemExit("error: ...") naming the flag unless `path` is a folder this process can write in, or can make
    (its nearest existing parent is a folder it can write in). Leaves nothing behind."""
    if not path:
        raise SystemExit(f"error: {flag} is empty; name a folder (it is made if missing)")
    if os.path.islink(path) and not os.path.exists(path):
        raise SystemExit(f"error: {flag}={path}: a dangling symlink (to {os.readlink(path)}); point it at a folder "
                         "or name another one")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag}={path}: exists and is not a folder; name a folder (it is made if missing)")
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"error: {flag}={path}: cannot be made, {parent} is not a folder; name another folder")
    try:
        with tempfile.TemporaryFile(dir=parent):  # the real test (modes, ACLs, read-only mounts, /proc); no name
            pass
    except OSError as e:
        problem = ("cannot write in it" if parent == os.path.abspath(path) else f"cannot be made in {parent}")
        raise SystemExit(f"error: {flag}={path}: {problem} ({e.strerror}); choose a folder you can write to") from None


def make_folder(flag, path):
    """Make folder `path` and its missing parents; returns the folders it made, outermost first (for remove_folders).
    SystemExit("error: ...") naming the flag if it cannot, having made none."""
    made, missing = [], os.path.abspath(path)
    while not os.path.lexists(missing):
        made.insert(0, missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # check_folder found it possible: something changed meanwhile
        remove_folders(made)
        raise SystemExit(f"error: {flag}={path}: cannot make this folder ({e.strerror}); choose a folder you can "
                         "write to") from None
    return made


def remove_folders(made):
    """Remove the folders make_folder made, innermost first, as far as they are empty again."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
        except OSError:  # not empty: someone else wrote there meanwhile
            return


# ---- download ----
def download(repo, n_train, local_dir, revision="main"):
    """The val shard and n_train train shards from a Hugging Face dataset repo (HF_ENDPOINT may point elsewhere).
    Errors are SystemExit("error: ...") naming the flag. A shard appears in local_dir only when whole, so a failed
    or interrupted run keeps the complete shards it got (a re-run skips them) and no partial one."""
    if n_train < 0 or (repo == DEFAULT_REPO and n_train > DEFAULT_REPO_TRAIN_SHARDS):
        allowed = f"0 to {DEFAULT_REPO_TRAIN_SHARDS}" if repo == DEFAULT_REPO else "0 or more"
        raise SystemExit(f"error: --shards={n_train}: the number of train shards to download, {allowed} "
                         f"(--repo={repo}; 0: the val shard only)")
    check_folder("--local-dir", local_dir)
    from huggingface_hub import hf_hub_download  # imported here: --from-text works without it

    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]
    made = []
    try:
        with signals_held():
            made = make_folder("--local-dir", local_dir)
        for name in names:
            path = os.path.join(local_dir, name)
            if os.path.exists(path):
                try:
                    check_shard(path)
                    print(f"{path}: complete, skipped")
                    continue
                except ValueError as e:
                    print(f"{e}; downloading it again")
                    os.remove(path)
            got = _hub_download(hf_hub_download, repo, revision, name, local_dir)
            try:
                check_shard(got)
            except ValueError as e:
                os.remove(got)
                raise SystemExit(f"error: {e}, so it was removed; run this command again, and if it persists, check "
                                 f"--repo={repo} and --revision={revision}") from None
            made = []  # a shard arrived: the folder is kept from now on
    except BaseException:
        if made:  # nothing arrived in the folder this run made: remove it, with huggingface_hub's bookkeeping
            with signals_held():
                shutil.rmtree(os.path.join(local_dir, ".cache", "huggingface"), ignore_errors=True)
                remove_folders([*made, os.path.join(os.path.abspath(local_dir), ".cache")])
        raise
    print(f"{len(names)} shards in {local_dir}")


def _hub_download(hf_hub_download, repo, revision, name, local_dir):
    """One file into local_dir. huggingface_hub writes it to a temporary file under local_dir/.cache and moves it
    into place when whole, retrying a broken connection from where it stopped, with a progress bar; its errors
    (no network, no such repo, revision or file, a full disk) become one line naming the flags."""
    endpoint = os.environ.get("HF_ENDPOINT")  # read now: a mirror or a test's stand-in
    try:
        return hf_hub_download(repo_id=repo, filename=name, repo_type="dataset", revision=revision,
                               local_dir=local_dir, endpoint=endpoint)
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors (HTTP, network) or ValueErrors
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        where = f" at HF_ENDPOINT={endpoint}" if endpoint else ""
        raise SystemExit(f"error: cannot download {name} from --repo={repo} --revision={revision}{where} "
                         f"({type(e).__name__}: {detail}); check the network, --repo and --revision") from None


# ---- tokenize local text ----
ROOT = Path(__file__).resolve().parent.parent
TIKTOKEN_CACHE = ROOT.parent / "shared" / "data" / "tiktoken_cache"  # offline GPT-2 BPE files, when beside the repo
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.xz", ".jsonl.gz")
JSONL_FIX = 'each line must be a JSON object {"text": "<the document>"}'
JSON_TYPES = {str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null",
              list: "a list", dict: "an object"}


class FromTextError(Exception):
    """A problem with --from-text's input or set-up, already worded for the user ("file:line: problem; fix").
    tokenize_files turns it into SystemExit("error: ..."). An Exception, not SystemExit, because it has to come back
    from the pool's reader thread and worker processes: a SystemExit there ends the thread or worker silently and
    the pool waits forever for the lost result."""


_encoding = None  # this process's GPT-2 encoding, loaded on first use


def _gpt2():
    """tiktoken's GPT-2 encoding, loaded once per process (parent and workers alike); FromTextError if it cannot be."""
    global _encoding
    if _encoding is None:
        if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN_CACHE.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)  # here, not at import: importing has no effects
        try:
            import tiktoken
        except ImportError:
            raise FromTextError("tiktoken is not installed: pip install tiktoken (or -r requirements.txt)") from None
        try:
            _encoding = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cached BPE files (requests' errors), a damaged cache file, ...
            cache = os.environ.get("TIKTOKEN_CACHE_DIR")
            where = (f"they are not in TIKTOKEN_CACHE_DIR={cache}" if cache else
                     f"TIKTOKEN_CACHE_DIR is unset and {TIKTOKEN_CACHE} does not exist")
            detail = str(e).splitlines()[0] if str(e) else ""
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            raise FromTextError(f"tiktoken cannot load the GPT-2 BPE files: {where}, and downloading them failed; "
                                "set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files (this kit's: "
                                f"../shared/data/tiktoken_cache beside the repo) ({type(e).__name__}: {detail})"
                                ) from None
    return _encoding


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, found offline in ../shared/data/tiktoken_cache beside the repo when
    TIKTOKEN_CACHE_DIR is unset; SystemExit("error: ...") saying what to set when it cannot be loaded."""
    try:
        return _gpt2()
    except FromTextError as e:
        raise SystemExit(f"error: {e}") from None


def _not_utf8(error, where):
    return (f"not UTF-8 (byte 0x{error.object[error.start]:02x} at {where}); re-encode the file as UTF-8 "
            "(iconv -f <its encoding> -t utf-8)")


def _json_value(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _open_binary(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise FromTextError(f"{path}: cannot read it ({e.strerror})") from None


def read_documents(paths, progress):
    """Documents from .txt / .jsonl / .jsonl.xz / .jsonl.gz files, skipping empty and blank ones; progress advances by
    (compressed) bytes read. Bad input raises FromTextError naming the file and line."""
    for path in paths:
        if path.endswith(".txt"):
            with _open_binary(path) as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                raise FromTextError(f"{path}:{line}: {_not_utf8(e, f'byte offset {e.start}')}") from None
            progress.update(len(data))
            if text.strip():
                yield text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open() gives
        else:
            yield from _read_jsonl(path, progress)


def _read_jsonl(path, progress):
    compression = os.path.splitext(path)[1]  # ".xz", ".gz" or ".jsonl"
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(compression)
    # Lines are read as bytes and decoded one at a time, so that bad UTF-8 is reported at its line.
    with _open_binary(path) as raw, (opener(raw, "rb") if opener else raw) as stream:
        line_no = done = 0
        while True:
            try:
                line = stream.readline()
            except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                if not opener:
                    raise FromTextError(f"{path}:{line_no + 1}: cannot read it ({e})") from None
                tool = "xz" if compression == ".xz" else "gzip"
                raise FromTextError(f"{path}:{line_no + 1}: corrupt or truncated {compression} data "
                                    f"({type(e).__name__}: {e}); the file is damaged: check it with {tool} -t, then "
                                    "re-download or re-compress it") from None
            if not line:
                break
            line_no += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FromTextError(f"{path}:{line_no}: {_not_utf8(e, f'column {e.start + 1}')}") from None
            if not text.strip():
                continue
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise FromTextError(f'{path}:{line_no}: not a JSON object with a "text" field ({e}); '
                                    f"{JSONL_FIX}") from None
            if not isinstance(doc, dict) or "text" not in doc:
                what = (f"its keys: {_json_value(list(doc))}" if isinstance(doc, dict) else
                        f"it is {JSON_TYPES[type(doc)]}")
                raise FromTextError(f'{path}:{line_no}: not a JSON object with a "text" field ({what}); {JSONL_FIX}')
            if not isinstance(doc["text"], str):
                value = doc["text"]
                shown = "" if value is None else f" ({_json_value(value)})"
                raise FromTextError(f'{path}:{line_no}: "text" is {JSON_TYPES[type(value)]}{shown}, not a string; '
                                    f"{JSONL_FIX}")
            progress.update(raw.tell() - done)
            done = raw.tell()
            if doc["text"].strip():
                yield doc["text"]


def _tokenize(text):  # runs in the worker processes
    return np.array([EOT] + _gpt2().encode_ordinary(text), dtype=np.uint16)


def _worker_init():
    """A worker ignores SIGINT and SIGTERM. When they are sent to the whole process group (Ctrl-C; a SIGTERM to
    every process, as job schedulers and service managers send) they are the parent's to handle: it stops the pool
    (stop_workers) and cleans up, and a worker that died on its own, holding one of the pool's queue locks, would
    hang it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def start_workers(n):
    """A pool of n tokenizer processes. They start with SIGINT ignored (a new process inherits only an ignored
    signal), so that a Ctrl-C before _worker_init does not print a worker's KeyboardInterrupt (one in that moment
    is lost: press it again); a SIGTERM then ends a worker that holds nothing yet, and the parent got it too."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(n, initializer=_worker_init)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def stop_workers(pool, stop):
    """Stop feeding the workers (`stop` ends the documents given to pool.imap) and wait while they finish the few
    tasks already queued; they ignore SIGINT and SIGTERM, so they do. Not pool.terminate(): its task thread can
    hang, blocked writing a task into the queue once no one reads it. Safe to call twice."""
    with signals_held():
        stop.set()
        pool.close()
        pool.join()


def _until(stop, documents):  # runs in the pool's task thread
    for document in documents:
        if stop.is_set():
            return
        yield document


class ShardWriter:
    """Fills shards of exactly shard_tokens tokens (the last one may be shorter), numbered from `first`."""

    def __init__(self, out, prefix, split, shard_tokens, first):
        self.out, self.prefix, self.split, self.size, self.index = out, prefix, split, shard_tokens, first
        self.buffer, self.fill, self.paths = np.empty(shard_tokens, dtype=np.uint16), 0, []

    def add(self, tokens):
        while len(tokens):
            take = min(len(tokens), self.size - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill, tokens = self.fill + take, tokens[take:]
            if self.fill == self.size:
                self.flush()

    def flush(self):
        if self.fill:
            path = os.path.join(self.out, f"{self.prefix}_{self.split}_{self.index:06d}.bin")
            if os.path.exists(path):  # checked before the run; this is another run writing into --out meanwhile
                raise FromTextError(f"{path} appeared while tokenizing (another run writing to the same --out?); "
                                    "shards are never overwritten: use another --prefix or --out")
            self.paths.append(path)  # before writing, so that remove() also deletes a half-written .tmp
            try:
                write_shard(path, self.buffer[:self.fill])
            except OSError as e:
                raise FromTextError(f"{path}: cannot write it ({e.strerror}); free some space or choose another "
                                    "--out") from None
            self.index, self.fill = self.index + 1, 0

    def remove(self):
        """Delete the shards (and temp files) this writer wrote."""
        for path in self.paths:
            for name in (path, path + ".tmp"):
                if os.path.exists(name):
                    os.remove(name)
        self.paths = []


def check_text_files(paths):
    """SystemExit("error: --from-text: ...") naming the first file that is missing, not a file, unreadable, of
    another kind, or given twice (also through a symlink or a hard link): a file given twice is refused, since
    tokenizing it twice would repeat its documents and tokenizing it once would quietly change the command."""
    seen = {}  # (device, inode) -> the name it was first given as
    for path in paths:
        if not path:
            raise SystemExit("error: --from-text: an empty file name; give .txt, .jsonl, .jsonl.xz or .jsonl.gz files")
        if os.path.islink(path) and not os.path.exists(path):
            raise SystemExit(f"error: --from-text: {path}: a dangling symlink (to {os.readlink(path)}); point it at "
                             "a file or give the file itself")
        if os.path.isdir(path):
            raise SystemExit(f"error: --from-text: {path}: is a folder; give the files in it (e.g. {path}/*.jsonl)")
        if not os.path.exists(path):
            raise SystemExit(f"error: --from-text: {path}: no such file; check the name")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --from-text: {path}: not a regular file (a device, FIFO or socket); give "
                             ".txt or .jsonl files")
        if not path.endswith(TEXT_SUFFIXES):
            raise SystemExit(f"error: --from-text: {path}: expected .txt, .jsonl, .jsonl.xz or .jsonl.gz")
        try:
            open(path, "rb").close()
        except OSError as e:
            raise SystemExit(f"error: --from-text: {path}: cannot read it ({e.strerror}); check its permissions "
                             "(ls -l)") from None
        st = os.stat(path)
        first = seen.setdefault((st.st_dev, st.st_ino), path)
        if first is not path:
            again = "is given twice" if first == path else f"is the same file as {first}"
            raise SystemExit(f"error: --from-text: {path}: {again}; give each file once")


def check_sizes(val_tokens, shard_tokens, max_tokens, workers):
    """SystemExit("error: --flag=value: ...") for a size tokenize_files cannot work with (zero would mean no shards
    ever filled, or no limit, or no workers: an error rather than a guess)."""
    if val_tokens is not None and val_tokens < 0:
        raise SystemExit(f"error: --val-tokens={val_tokens}: must be 0 (no val split) or more, or 'all'")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise SystemExit(f"error: --shard-tokens={shard_tokens}: must be 1 to {MAX_SHARD_TOKENS} (the header's "
                         "int32 count); FineWeb's shards hold 100000000")
    if max_tokens is not None and max_tokens < 1:
        raise SystemExit(f"error: --max-tokens={max_tokens}: must be at least 1; leave it out for no limit")
    if workers is not None and workers < 1:
        raise SystemExit(f"error: --workers={workers}: must be at least 1; leave it out for one per core")


def tokenize_files(paths, out, prefix, val_tokens, shard_tokens, max_tokens=None, workers=None):
    """Tokenize documents into shards: whole documents go to the val split until it holds at least val_tokens
    (None: all of them), the rest to train shards. Returns {split: [paths]}.
    Errors are SystemExit("error: ..."). Those that can be foreseen (sizes, missing, unreadable or repeated files,
    an --out that cannot be written, shards already in `out`, no GPT-2 encoding) come before anything is written;
    a run that fails later (bad input, no text at all, Ctrl-C, or SIGTERM under main()) first removes every shard
    and folder it made, so that `out` never holds a partial set (a val shard without its train shards, or train
    shards cut short)."""
    from tqdm import tqdm

    check_sizes(val_tokens, shard_tokens, max_tokens, workers)
    check_text_files(paths)
    if not prefix or "/" in prefix or os.sep in prefix:
        raise SystemExit(f"error: --prefix={prefix}: a name for the shards (NAME_train_000001.bin), not empty and "
                         "without '/'; the folder goes in --out")
    check_folder("--out", out)
    # Only the splits this run can write need to be new: e.g. --val-tokens 0 may add train shards beside old val ones.
    splits = (["val"] if val_tokens != 0 else []) + (["train"] if val_tokens is not None else [])
    for split in splits:
        existing = sorted(glob.glob(os.path.join(glob.escape(out), f"{glob.escape(prefix)}_{split}_*.bin")))
        if existing:
            raise SystemExit(f"error: {existing[0]} exists; shards are never overwritten: delete the old "
                             f"{prefix}_{split}_*.bin shards or choose another --prefix")
    gpt2_encoding()  # no BPE files: say so once, now, rather than from every worker
    writers = {"val": ShardWriter(out, prefix, "val", shard_tokens, 0),
               "train": ShardWriter(out, prefix, "train", shard_tokens, 1)}
    n_val = n_total = 0
    made, pool, stop = [], None, threading.Event()
    try:
        with signals_held():
            made = make_folder("--out", out)
            pool = start_workers(workers or os.cpu_count() or 1)
        with tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True, desc="tokenizing") as bar:
            for tokens in pool.imap(_tokenize, _until(stop, read_documents(paths, bar)), chunksize=16):
                to_val = val_tokens is None or n_val < val_tokens
                writers["val" if to_val else "train"].add(tokens)
                n_val += len(tokens) if to_val else 0
                n_total += len(tokens)
                bar.set_postfix(tokens=f"{n_total / 1e6:.1f}M", refresh=False)
                if max_tokens and n_total >= max_tokens:
                    break
        stop_workers(pool, stop)
        if not n_total:
            names = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            raise FromTextError(f"--from-text: no text in {names}: every document is empty or blank, so nothing was "
                                'written; give .txt files with text, or .jsonl lines {"text": "<the document>"}')
        for writer in writers.values():
            writer.flush()
    except BaseException as e:  # bad input, Ctrl-C, SIGTERM, a full disk, ...: leave `out` as it was
        with signals_held():
            if pool is not None:
                stop_workers(pool, stop)
            for writer in writers.values():
                writer.remove()
            remove_folders(made)
        if isinstance(e, FromTextError):
            raise SystemExit(f"error: {e}") from None
        raise
    print(f"{n_total} tokens: {n_val} val, {n_total - n_val} train, in {out}/{prefix}_*.bin")
    return {split: w.paths for split, w in writers.items()}


DOWNLOAD_FLAGS = {"shards": 8, "repo": DEFAULT_REPO, "revision": "main",
                  "local_dir": os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")}
FROM_TEXT_FLAGS = {"out": None, "prefix": "text", "val_tokens": "1048576", "shard_tokens": 100_000_000,
                   "max_tokens": None, "workers": None}


def parse_args(argv=None):
    """The command line, with each flag's default filled in; SystemExit("error: ...") for a flag of the other
    command (it would be ignored) and for a --val-tokens that is not a number or 'all'."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults are None here and filled in below, so that a flag given to the wrong command can be told apart.
    p.add_argument("--shards", type=int, help="training shards to download (100M tokens each; 0 to 103; default 8)")
    p.add_argument("--repo", help=f"Hugging Face dataset repo holding the shards (default {DEFAULT_REPO})")
    p.add_argument("--revision", help="branch, tag or commit of --repo (default main)")
    p.add_argument("--local-dir", help="where downloaded shards go (default: data/fineweb10B beside this file)")
    p.add_argument("--from-text", nargs="+", metavar="FILE", help="tokenize these files instead of downloading")
    p.add_argument("--out", help="with --from-text: output directory")
    p.add_argument("--prefix", help="with --from-text: shard name prefix (NAME_train_000001.bin; default text)")
    p.add_argument("--val-tokens", help="with --from-text: whole documents go to the val split until it has this "
                                        "many tokens; 0 for none, 'all' for everything (default 1048576)")
    p.add_argument("--shard-tokens", type=int, help="with --from-text: tokens per shard (default 100M, as FineWeb's)")
    p.add_argument("--max-tokens", type=int, help="with --from-text: stop after about this many tokens")
    p.add_argument("--workers", type=int, help="with --from-text: tokenizer processes (default: one per core)")
    a = p.parse_args(argv)
    mine, others = (FROM_TEXT_FLAGS, DOWNLOAD_FLAGS) if a.from_text else (DOWNLOAD_FLAGS, FROM_TEXT_FLAGS)
    for name in others:
        if getattr(a, name) is not None:
            flag = "--" + name.replace("_", "-")
            if a.from_text:
                raise SystemExit(f"error: {flag} goes with downloading FineWeb, not with --from-text; leave it out")
            raise SystemExit(f"error: {flag} goes with --from-text (tokenizing your own text); without --from-text "
                             "this command downloads FineWeb")
    for name, default in mine.items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.from_text:
        if a.out is None:  # an empty --out is check_folder's to name
            raise SystemExit("error: --from-text needs --out DIR, the folder for the shards")
        try:
            a.val_tokens = None if a.val_tokens == "all" else int(a.val_tokens)
        except ValueError:
            raise SystemExit(f"error: --val-tokens={a.val_tokens}: expected a number of tokens or 'all'") from None
    return a


def main(argv=None):
    """The command line; returns the exit status: 0, or 130 after Ctrl-C and 143 after SIGTERM (128 + the signal),
    each with the same clean-up and one line on stderr."""
    a = parse_args(argv)
    with signals_raise_interrupted():
        try:
            if a.from_text:
                tokenize_files(a.from_text, a.out, a.prefix, a.val_tokens, a.shard_tokens, a.max_tokens, a.workers)
            else:
                download(a.repo, a.shards, a.local_dir, a.revision)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (Interrupted); both commands have cleaned up
            signum = getattr(e, "signum", signal.SIGINT)
            left = (f"the shards this run wrote are removed and --out={a.out} is as it was; run the same command "
                    "again to start over" if a.from_text else
                    f"the shards in --local-dir={a.local_dir} are whole (a shard appears only when complete); run "
                    "the same command again for the rest")
            print(f"error: interrupted by {signal.Signals(signum).name}; {left}", file=sys.stderr)
            return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())

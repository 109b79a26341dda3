"""Get token shards for the train scripts: download pre-tokenized FineWeb10B, or tokenize local text.

    python data/fineweb.py --shards 8
        the FineWeb validation shard and 8 training shards (100M GPT-2 tokens each) into data/fineweb10B/,
        from the Hugging Face dataset repo --repo (resumable; complete files are skipped; headers checked)
    python data/fineweb.py --from-text FILE... --out DIR [--prefix NAME] [--val-tokens N|all] [--shard-tokens N]
        .txt (one document per file) or .jsonl / .jsonl.xz / .jsonl.gz (field "text", one document per line),
        tokenized with tiktoken's GPT-2 BPE in parallel into DIR/NAME_val_000000.bin, DIR/NAME_train_000001.bin, ...
        (empty and blank documents are skipped). Existing shards are never overwritten, and a run that fails
        (bad input, Ctrl-C) removes the shards it wrote: DIR holds a complete set or none.

Shard format (llm.c / modded-nanogpt): 256 little-endian int32 header [20240520, 1, n_tokens, 0, ...], then
n_tokens uint16 token ids; every document is preceded by <|endoftext|> (50256). Offline, tiktoken needs
TIKTOKEN_CACHE_DIR pointing at its BPE files; unset, ../shared/data/tiktoken_cache beside the repo is used if present.
"""
import argparse
import glob
import gzip
import json
import lzma
import multiprocessing
import os
import signal
import sys
import zlib
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256  # <|endoftext|> in the GPT-2 vocabulary
DEFAULT_REPO = "kjj0/fineweb10B-gpt2"  # the pre-tokenized FineWeb10B shards modded-nanogpt uses


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


# ---- download ----
def download(repo, n_train, local_dir, revision="main"):
    """The val shard and n_train train shards from a Hugging Face dataset repo (HF_ENDPOINT may point elsewhere)."""
    from huggingface_hub import hf_hub_download  # imported here: --from-text works without it

    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]
    os.makedirs(local_dir, exist_ok=True)
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
        # hf_hub_download resumes a partial download kept under local_dir/.cache and shows a progress bar
        got = hf_hub_download(repo_id=repo, filename=name, repo_type="dataset", revision=revision, local_dir=local_dir,
                              endpoint=os.environ.get("HF_ENDPOINT"))  # read now: a mirror or a test's stand-in
        try:
            check_shard(got)
        except ValueError as e:
            raise SystemExit(f"error: {e}. Delete it and run this command again; if it persists, check --repo={repo}")
    print(f"{len(names)} shards in {local_dir}")


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


def _ignore_sigint():  # worker initializer: on Ctrl-C the parent alone stops, terminates the pool and cleans up
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def tokenize_files(paths, out, prefix, val_tokens, shard_tokens, max_tokens=None, workers=None):
    """Tokenize documents into shards: whole documents go to the val split until it holds at least val_tokens
    (None: all of them), the rest to train shards. Returns {split: [paths]}.
    Errors are SystemExit("error: ..."). Those that can be foreseen (missing or unsupported files, shards already in
    `out`, no GPT-2 encoding) come before any tokenizing; a run that fails later (bad input, no text at all, Ctrl-C)
    first removes every shard it wrote, so that `out` never holds a partial set (a val shard without its train
    shards, or train shards cut short)."""
    from tqdm import tqdm

    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --from-text: no such file {path}")
        if not path.endswith(TEXT_SUFFIXES):
            raise SystemExit(f"error: --from-text: {path}: expected .txt, .jsonl, .jsonl.xz or .jsonl.gz")
    # Only the splits this run can write need to be new: e.g. --val-tokens 0 may add train shards beside old val ones.
    splits = (["val"] if val_tokens != 0 else []) + (["train"] if val_tokens is not None else [])
    for split in splits:
        existing = sorted(glob.glob(os.path.join(glob.escape(out), f"{glob.escape(prefix)}_{split}_*.bin")))
        if existing:
            raise SystemExit(f"error: {existing[0]} exists; shards are never overwritten: delete the old "
                             f"{prefix}_{split}_*.bin shards or choose another --prefix")
    gpt2_encoding()  # no BPE files: say so once, now, rather than from every worker
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out={out}: cannot create it ({e.strerror})") from None
    writers = {"val": ShardWriter(out, prefix, "val", shard_tokens, 0),
               "train": ShardWriter(out, prefix, "train", shard_tokens, 1)}
    n_val = n_total = 0
    workers = workers or os.cpu_count() or 1
    try:
        with tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True, desc="tokenizing") as bar, \
                multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
            for tokens in pool.imap(_tokenize, read_documents(paths, bar), chunksize=16):
                to_val = val_tokens is None or n_val < val_tokens
                writers["val" if to_val else "train"].add(tokens)
                n_val += len(tokens) if to_val else 0
                n_total += len(tokens)
                bar.set_postfix(tokens=f"{n_total / 1e6:.1f}M", refresh=False)
                if max_tokens and n_total >= max_tokens:
                    break
        if not n_total:
            names = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            raise FromTextError(f"--from-text: no text in {names}: every document is empty or blank, so nothing was "
                                'written; give .txt files with text, or .jsonl lines {"text": "<the document>"}')
        for writer in writers.values():
            writer.flush()
    except BaseException as e:  # bad input, Ctrl-C, a full disk, ...: leave `out` as it was
        for writer in writers.values():
            writer.remove()
        if created:
            try:
                os.rmdir(out)
            except OSError:  # not empty: someone else wrote there meanwhile
                pass
        if isinstance(e, FromTextError):
            raise SystemExit(f"error: {e}") from None
        raise
    print(f"{n_total} tokens: {n_val} val, {n_total - n_val} train, in {out}/{prefix}_*.bin")
    return {split: w.paths for split, w in writers.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8, help="training shards to download (100M tokens each; max 103)")
    p.add_argument("--repo", default=DEFAULT_REPO, help="Hugging Face dataset repo holding the shards")
    p.add_argument("--revision", default="main", help="branch, tag or commit of --repo")
    p.add_argument("--local-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B"),
                   help="where downloaded shards go (default: data/fineweb10B beside this file)")
    p.add_argument("--from-text", nargs="+", metavar="FILE", help="tokenize these files instead of downloading")
    p.add_argument("--out", help="with --from-text: output directory")
    p.add_argument("--prefix", default="text", help="with --from-text: shard name prefix (NAME_train_000001.bin)")
    p.add_argument("--val-tokens", default="1048576",
                   help="with --from-text: whole documents go to the val split until it has this many tokens; "
                        "0 for none, 'all' for everything (default 1048576)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (FineWeb: 100M)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after about this many tokens")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    a = p.parse_args(argv)
    if a.from_text:
        if not a.out:
            p.error("--from-text needs --out DIR")
        if a.val_tokens != "all" and not a.val_tokens.isdigit():
            p.error(f"--val-tokens={a.val_tokens}: expected a number of tokens or 'all'")
        try:
            tokenize_files(a.from_text, a.out, a.prefix, None if a.val_tokens == "all" else int(a.val_tokens),
                           a.shard_tokens, a.max_tokens, a.workers)
        except KeyboardInterrupt:  # tokenize_files has removed the shards it wrote
            print(f"error: interrupted; {a.out} is as it was (no shards of this run were kept)", file=sys.stderr)
            return 130
    else:
        download(a.repo, a.shards, a.local_dir, a.revision)


if __name__ == "__main__":
    sys.exit(main())

"""Get token shards for the train scripts: download pre-tokenized FineWeb10B, or tokenize local text.

    python data/fineweb.py --shards 8
        the FineWeb validation shard and 8 training shards (100M GPT-2 tokens each) into data/fineweb10B/,
        from the Hugging Face dataset repo --repo (resumable; complete files are skipped; headers checked)
    python data/fineweb.py --from-text FILE... --out DIR [--prefix NAME] [--val-tokens N|all] [--shard-tokens N]
        .txt (one document per file) or .jsonl / .jsonl.xz / .jsonl.gz (field "text", one document per line),
        tokenized with tiktoken's GPT-2 BPE in parallel into DIR/NAME_val_000000.bin, DIR/NAME_train_000001.bin, ...

Shard format (llm.c / modded-nanogpt): 256 little-endian int32 header [20240520, 1, n_tokens, 0, ...], then
n_tokens uint16 token ids; every document is preceded by <|endoftext|> (50256). Offline, tiktoken needs
TIKTOKEN_CACHE_DIR pointing at its BPE files (see README).
"""
import argparse
import glob
import gzip
import io
import json
import lzma
import multiprocessing
import os
import sys

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
def read_documents(paths, progress):
    """Documents from .txt / .jsonl / .jsonl.xz / .jsonl.gz files; progress advances by compressed bytes read.
    Bad input raises ValueError (not SystemExit, which would silently end the pool thread that reads this)."""
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
            progress.update(os.path.getsize(path))
            continue
        opener = {".xz": lzma.open, ".gz": gzip.open}.get(os.path.splitext(path)[1])
        if not (path.endswith(".jsonl") or opener and path[:-3].endswith(".jsonl")):
            raise ValueError(f"{path}: expected .txt, .jsonl, .jsonl.xz or .jsonl.gz")
        with open(path, "rb") as raw:
            stream = opener(raw, "rt", encoding="utf-8") if opener else io.TextIOWrapper(raw, encoding="utf-8")
            done = 0
            for line_no, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{line_no}: not a JSON object with a \"text\" field")
                progress.update(raw.tell() - done)
                done = raw.tell()


_encoding = None


def _tokenize(text):  # runs in worker processes
    global _encoding
    if _encoding is None:
        import tiktoken
        _encoding = tiktoken.get_encoding("gpt2")
    return np.array([EOT] + _encoding.encode_ordinary(text), dtype=np.uint16)


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
            existing = sorted(glob.glob(os.path.join(self.out, f"{self.prefix}_{self.split}_*.bin")))
            if not self.paths and existing:
                raise SystemExit(f"error: {existing[0]} exists; shards are never overwritten: delete the old "
                                 f"{self.prefix}_{self.split}_*.bin shards or choose another --prefix")
            path = os.path.join(self.out, f"{self.prefix}_{self.split}_{self.index:06d}.bin")
            write_shard(path, self.buffer[:self.fill])
            self.paths.append(path)
            self.index, self.fill = self.index + 1, 0


def tokenize_files(paths, out, prefix, val_tokens, shard_tokens, max_tokens=None, workers=None):
    """Tokenize documents into shards: whole documents go to the val split until it holds at least val_tokens
    (None: all of them), the rest to train shards. Returns {split: [paths]}."""
    from tqdm import tqdm

    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --from-text: no such file {path}")
    os.makedirs(out, exist_ok=True)
    writers = {"val": ShardWriter(out, prefix, "val", shard_tokens, 0),
               "train": ShardWriter(out, prefix, "train", shard_tokens, 1)}
    n_val = n_total = 0
    workers = workers or os.cpu_count() or 1
    with tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True, desc="tokenizing") as bar, \
            multiprocessing.get_context("spawn").Pool(workers) as pool:
        try:
            for tokens in pool.imap(_tokenize, read_documents(paths, bar), chunksize=16):
                to_val = val_tokens is None or n_val < val_tokens
                writers["val" if to_val else "train"].add(tokens)
                n_val += len(tokens) if to_val else 0
                n_total += len(tokens)
                bar.set_postfix(tokens=f"{n_total / 1e6:.1f}M", refresh=False)
                if max_tokens and n_total >= max_tokens:
                    break
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    for writer in writers.values():
        writer.flush()
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
        tokenize_files(a.from_text, a.out, a.prefix, None if a.val_tokens == "all" else int(a.val_tokens),
                       a.shard_tokens, a.max_tokens, a.workers)
    else:
        download(a.repo, a.shards, a.local_dir, a.revision)


if __name__ == "__main__":
    sys.exit(main())

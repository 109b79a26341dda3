"""Shared by the tests: find and import the train scripts, build token shards, run a script, read its log."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # offline proxy data (see README); tests skip without it
SCRIPTS = sorted(ROOT.glob("train_gpt2*.py"))  # every idea script is covered as soon as it exists
SECTION_RE = re.compile(r"^# ---- (\w+) ----$", re.M)
IDEA_MARKER = "    # idea: this script's own fields follow"
SECTION_ORDER = ["imports", "kernels", "muon", "model", "data", "hyperparameters", "train"]

sys.path.insert(0, str(ROOT / "data"))
import fineweb  # noqa: E402  (data/fineweb.py: the shard writer the tests use)
from sample import import_script  # noqa: E402  (the one loader of train scripts: sample.py's)


def load_script(path):
    """Import a train script (or a tool) as a module of its own name; importing never trains."""
    return import_script(path)


def sections(text):
    """{section name: its text} of a train script, split at the `# ---- name ----` lines."""
    names = SECTION_RE.findall(text)
    bodies = SECTION_RE.split(text)[2::2]
    return dict(zip(names, bodies))


def shared_view(text):
    """The parts of a script that must be identical across scripts: every section but `model`, and the
    hyperparameters section without the idea's own fields (from IDEA_MARKER to the end of the class)."""
    parts = sections(text)
    parts.pop("model", None)
    hp = parts.get("hyperparameters", "")
    if IDEA_MARKER in hp:
        head, tail = hp.split(IDEA_MARKER, 1)
        tail = tail[tail.index("\n\n\n"):] if "\n\n\n" in tail else ""
        parts["hyperparameters"] = head + IDEA_MARKER + tail
    return parts


def markov_tokens(n, vocab=256, branching=3, seed=0):
    """A token stream a small model can learn: each token is followed by one of `branching` fixed successors,
    documents start with <|endoftext|>-like token 0."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, branching))
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    choice = rng.integers(0, branching, size=n)
    for i in range(1, n):
        out[i] = 0 if i % 500 == 0 else successors[out[i - 1], choice[i]]
    return out


def make_shards(directory, n_train=60_000, n_val=8_192, shards=2, vocab=256, seed=0):
    """Synthetic train shards (train_000001.bin ...) and one val shard in the real format; returns the globs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = markov_tokens(n_train + n_val, vocab=vocab, seed=seed)
    fineweb.write_shard(str(directory / "syn_val_000000.bin"), tokens[:n_val])
    for i, part in enumerate(np.array_split(tokens[n_val:], shards), 1):
        fineweb.write_shard(str(directory / f"syn_train_{i:06d}.bin"), part)
    return str(directory / "syn_train_*.bin"), str(directory / "syn_val_*.bin")


def small_args(train_glob, val_glob, log_dir, **overrides):
    """Flags for a fast CPU run on synthetic shards (vocab 256): a few seconds for a dozen steps."""
    flags = dict(preset="tiny", train_files=train_glob, val_files=val_glob, log_dir=log_dir, vocab_size=256,
                 n_layer=2, n_head=2, n_embd=64, batch_tokens=256, batch_stages=1, device_batch_tokens=256,
                 window_blocks="1", num_iterations=12, val_every=6, val_tokens=2048, embed_lr=0.1, head_lr=0.02)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def random_model(module, *flags):
    """A script's model (--preset=tiny plus flags) in fp32 eval mode with random weights: zero-initialised projections
    and a zero head would hide a leak, every output being the same."""
    args, _ = module.parse_args(["--preset=tiny", *flags])
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig.from_args(args)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5)
    return model


def read_log(path):
    """(train losses by step, val losses by step, summary dict) from a run log's step lines and last line."""
    train, val, summary = {}, {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"step:(\d+)/\d+ (train|val)_loss:(\S+) ", line)
        if m:
            (train if m[2] == "train" else val)[int(m[1])] = float(m[3])
        elif line.startswith('{"summary"'):
            summary = json.loads(line)["summary"]
    return train, val, summary


def tokens(B, T, eots=(), seed=1):
    """Random ids (B, T) with <|endoftext|> (a document start) at the positions eots."""
    torch.manual_seed(seed)
    idx = torch.randint(0, 50000, (B, T))
    idx[:, list(eots)] = 50256
    return idx


def decode_in_pieces(model, idx, pieces):
    """forward_cached over consecutive slices of idx (a prefill, blocks, single tokens): (logits, cache)."""
    cache, out, t = None, [], 0
    for n in pieces:
        logits, cache = model.forward_cached(idx[:, t:t + n], cache)
        out.append(logits)
        t += n
    assert t == idx.size(1)
    return torch.cat(out, dim=1), cache

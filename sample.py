"""Generate text from any train script's checkpoint.

    python sample.py --checkpoint logs/<run_id>/ckpt_step003000.pt --prompt "The meaning of life is"
    python sample.py --checkpoint CKPT --temperature 0 --max_new_tokens 50          greedy
    python sample.py --checkpoint CKPT --top_k 50 --top_p 0.9 --num_samples 3 --seed 1

A checkpoint names the script that wrote it and its model config: the model class is imported from that script
(importing a train script never trains; --script overrides which file). Decoding uses the model's KV cache when
it has one (`GPT.forward_cached`: the baseline's keys/values, MLA's latent cache, ...) and a full forward over the
context otherwise; both give the same tokens (tests/test_sample.py). The cache respects the model's document masks
(a document starts at each <|endoftext|>) and its attention windows. The context is limited to the model's seq_len
(the longest stream it trained on): once the context is longer, every step recomputes over the last seq_len tokens,
a sliding window, with or without a cache. Text is GPT-2 BPE (tiktoken); ids of the padded vocabulary (>= 50257) are never
sampled, and a sample ends at <|endoftext|>. Checkpoints are pickles: load only ones you trust.
"""
import argparse
import importlib.util
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
EOT = 50256  # <|endoftext|>: starts every document in the training data
GPT2_VOCAB = 50257  # real GPT-2 tokens; the models pad the vocabulary to 50304 for fast matmuls
CHECKPOINT_KEYS = ("script", "model_config", "model")  # what sample.py needs of save_checkpoint's dict


# ---- loading ----
def import_script(path):
    """Import a train script as a module of its own name (reusing an import of the same file); no side effects."""
    path = Path(path).resolve()
    module = sys.modules.get(path.stem)
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
        return module
    name = path.stem if module is None else f"{path.stem}__{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the script's own imports (kernels/) resolve beside it
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


IS_A_FOLDER = "is a folder, not a file"


def input_file_problem(path):
    """What keeps `path` from being read as a file, in a few words, or None when it can be read."""
    if not str(path):
        return "is empty: give a file"
    path = Path(path)
    if not path.exists():
        return f"is a dangling symlink (to {os.readlink(path)})" if path.is_symlink() else "no such file"
    if path.is_dir():
        return IS_A_FOLDER
    if not path.is_file():
        return "is not a regular file"
    try:
        open(path, "rb").close()  # the real test: modes, ACLs and capabilities all apply to it
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


TRAIN_SCRIPT_NAMES = ("Hyperparameters", "GPTConfig", "GPT", "parse_args", "main")  # what the tools use of one
TOP_LEVEL_RE = re.compile(r"^(?:class|def) (\w+)", re.M)


def check_train_script(path, flag=None):
    """Import a train script (named by the user with `flag`, if given), or a one-line SystemExit("error: ...")
    saying why it is none. Its text is read first, so that a file that does not define TRAIN_SCRIPT_NAMES at
    top level is never executed."""
    name = f"{flag}={path}" if flag else str(path)
    problem = input_file_problem(path)
    if problem is None and Path(path).suffix != ".py":
        problem = "is not a Python file (.py)"
    if problem is None:
        defined = set(TOP_LEVEL_RE.findall(Path(path).read_text(encoding="utf-8", errors="replace")))
        missing = [n for n in TRAIN_SCRIPT_NAMES if n not in defined]
        if missing:
            problem = (f"not a train script: it defines no {', '.join(missing)} (a train_gpt2*.py defines "
                       f"{', '.join(TRAIN_SCRIPT_NAMES)})")
    if problem:
        raise SystemExit(f"error: {name}: {problem}")
    try:
        return import_script(path)
    except Exception as e:  # noqa: BLE001  (whatever the file raises, it is not a working train script)
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise SystemExit(f"error: {name}: importing it failed ({type(e).__name__}: {detail})") from None


def load_checkpoint(path, script=None, device="cpu"):
    """(model in eval mode, its script's module, the checkpoint dict). Errors are SystemExit("error: ...") that say
    what is wrong and what to do."""
    problem = input_file_problem(path)
    if problem == IS_A_FOLDER:  # e.g. a run's log folder: name a checkpoint in it
        found = sorted(Path(path).glob("*.pt"))
        problem += f"; give one of its checkpoints, e.g. --checkpoint={found[-1]}" if found else " (it holds no *.pt)"
    if problem:
        raise SystemExit(f"error: --checkpoint={path}: {problem}")
    path = Path(path)
    module = check_train_script(script, "--script") if script is not None else None  # before the (slow) load
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors all mean the same thing here
        raise SystemExit(f"error: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); was it written completely?") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise SystemExit(f"error: {path} is not a train_gpt2*.py checkpoint: it lacks {', '.join(missing)} "
                         f"(it has {have}); checkpoints come from --save_every")
    if module is None:  # the script the checkpoint names, beside sample.py
        script_path = ROOT / Path(str(ckpt["script"])).name
        if not script_path.is_file():
            raise SystemExit(f"error: the checkpoint was written by {ckpt['script']}, and {script_path} does not "
                             "exist; pass --script=PATH to the script (or a copy of it) that defines its model")
        module = check_train_script(script_path)
    name = Path(module.__file__).name
    try:
        config = module.GPTConfig(**ckpt["model_config"])
    except TypeError as e:
        raise SystemExit(f"error: the checkpoint's model_config does not fit {name}'s GPTConfig ({e}); it was "
                         f"written by {ckpt['script']}: pass --script=<that script>") from None
    config.activation_checkpointing = False  # inference only
    model = module.GPT(config)
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ: torch lists every tensor, the first few say enough
        lines = [line.strip() for line in str(e).strip().splitlines()[1:]]
        more = f"\n  ... and {len(lines) - 4} more" if len(lines) > 4 else ""
        raise SystemExit(f"error: the checkpoint's weights do not fit {name}'s GPT:\n  " + "\n  ".join(lines[:4])
                         + more + f"\nit was written by {ckpt['script']} with model_config {ckpt['model_config']}: "
                         "pass --script=<that script>") from None
    if result.missing_keys or result.unexpected_keys:
        def few(keys):
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else "none"
        raise SystemExit(f"error: the checkpoint's weights do not match {name}'s GPT: missing "
                         f"{few(result.missing_keys)}; unexpected {few(result.unexpected_keys)}. It was written by "
                         f"{ckpt['script']}: pass --script=<the script that wrote it>")
    return model.to(device).eval(), module, ckpt


# ---- sampling ----
def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits (ties with the k-th are kept), then the smallest set of the most likely tokens
    whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019); the rest become -inf. logits (B, V).
    The most likely token is always kept."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # a token is dropped when those above it already reach top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = -float("inf")
    return logits


def next_tokens(logits, temperature=1.0, top_k=None, top_p=None, generator=None, vocab_limit=None):
    """Pick one token per row of logits (B, V): argmax at temperature 0, else sample from the filtered softmax."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits[..., vocab_limit:] = -float("inf")  # padded ids are not tokens
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True,
             stop_token=EOT, vocab_limit=None):
    """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns one list of new token ids per row,
    ending before stop_token (which is not included). use_cache: decode with model.forward_cached when the model
    has it (prefill the context, then one token a step) while the context fits in config.seq_len; otherwise, and
    after that, a full forward over the last seq_len tokens. vocab_limit: ids >= it are never sampled (default:
    50257, GPT-2's vocabulary, when the model's is larger)."""
    seq_len, vocab = model.config.seq_len, model.config.vocab_size
    vocab_limit = vocab_limit if vocab_limit is not None else min(vocab, GPT2_VOCAB)
    use_cache = use_cache and hasattr(model, "forward_cached")
    out = [[] for _ in range(idx.size(0))]
    done = [False] * idx.size(0)
    caches = None
    for _ in range(max_new_tokens):
        if use_cache and idx.size(1) <= seq_len:  # the context still fits what the model trained on: extend the cache
            logits, caches = model.forward_cached(idx if caches is None else idx[:, -1:], caches)
        else:  # no cache, or the context outgrew seq_len: recompute over the last seq_len tokens
            logits = model(idx[:, -seq_len:])
        token = next_tokens(logits[:, -1, :], temperature, top_k, top_p, generator, vocab_limit)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                done[row] = t == stop_token
                if not done[row]:
                    out[row].append(t)
        if all(done):
            break
        idx = torch.cat((idx, token[:, None]), dim=1)
    return out


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, through data/fineweb.py's loader (the one the tokenizer uses): it finds
    ../shared/data/tiktoken_cache when TIKTOKEN_CACHE_DIR is unset, and fails with a SystemExit saying what to set."""
    return import_script(ROOT / "data" / "fineweb.py").gpt2_encoding()


# ---- command line ----
def resolve_device(flag):
    """--device as a torch.device, or a one-line SystemExit naming the flag: a device string torch does not know,
    or a device this machine lacks (rather than a failure to load the checkpoint onto it)."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device={flag}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise SystemExit(f"error: --device={flag}: " + (f"this machine has {have} CUDA GPU(s), cuda:0 to "
                                                        f"cuda:{have - 1}" if have else
                                                        "this machine has no CUDA GPU; use --device=cpu"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device={flag}: MPS (Apple GPUs) is not available here; use --device=cpu")
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by a train script (--save_every)")
    parser.add_argument("--prompt", default="<|endoftext|>",
                        help="text to continue (default: <|endoftext|>, i.e. a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (argmax)")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus: the most likely tokens up to this "
                                                                 "probability mass (1: all)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--script", help="the train script defining the model (default: the one the checkpoint "
                                         "names, beside sample.py)")
    parser.add_argument("--no_cache", action="store_true", help="full forward every step (to compare with the cache)")
    args = parser.parse_args(argv)
    limits = dict(temperature=(lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: greedy)"),
                  top_p=(lambda v: 0 < v <= 1, "a number in (0, 1] (1: all tokens)"),
                  top_k=(lambda v: v >= 0, "an integer >= 0 (0: all tokens)"),
                  num_samples=(lambda v: v >= 1, "an integer >= 1"),
                  max_new_tokens=(lambda v: v >= 0, "an integer >= 0"))
    for name, (allowed, what) in limits.items():
        if not allowed(getattr(args, name)):  # NaN fails every comparison, so it is refused too
            raise SystemExit(f"error: --{name}={getattr(args, name)}: expected {what}")
    if not args.prompt:
        raise SystemExit("error: --prompt is empty: give text to continue, or leave --prompt out for a new document")
    device = resolve_device(args.device)
    enc = gpt2_encoding()
    # decoding runs FlexAttention eagerly (correct, just unfused), as the train scripts' CPU validation does
    warnings.filterwarnings("ignore", message=r".*flex_attention called without torch\.compile")
    model, _, ckpt = load_checkpoint(args.checkpoint, args.script, device)
    prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if max(prompt) >= model.config.vocab_size:
        raise SystemExit(f"error: the prompt has token id {max(prompt)}, beyond this model's vocabulary of "
                         f"{model.config.vocab_size}; use a prompt of tokens it knows")
    cached = not args.no_cache and hasattr(model, "forward_cached")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {ckpt['script']} step {ckpt.get('step', '?')}, {n_params / 1e6:.2f}M parameters, {device}, "
          f"{'KV cache' if cached else 'full recompute'}, context {model.config.seq_len}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    samples = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                       generator, use_cache=not args.no_cache)
    shown_prompt = "" if args.prompt == "<|endoftext|>" else args.prompt
    for i, tokens in enumerate(samples):
        if i:
            print("-" * 40)
        print(shown_prompt + enc.decode(tokens), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: sampling writes no file, so there is nothing to clean up
        print("interrupted", file=sys.stderr)
        sys.exit(130)

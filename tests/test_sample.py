"""sample.py: loads any script's checkpoint, the KV cache gives the tokens a full recompute gives, sampling is
seeded, top-k/top-p keep exactly their sets, <|endoftext|> stops, padded ids never appear, bad checkpoints fail
clearly, and the command line prints text."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import sample
from tests import helpers
from tests.helpers import ROOT, SCRIPTS, load_script, small_args


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    """A real checkpoint of the baseline: 6 steps on the synthetic shards (vocab 256, 32-token streams)."""
    log_dir = tmp_path_factory.mktemp("sample_ckpt")
    summary = load_script(ROOT / "train_gpt2.py").main(
        small_args(*shards, log_dir, num_iterations=6, val_every=0, save_every=6, device_batch_tokens=32))
    return summary["last_checkpoint"]


@pytest.fixture(scope="module")
def model(checkpoint):
    return sample.load_checkpoint(checkpoint)[0]


def random_model(script, seq_len=16):
    """A script's tiny model with random weights (zero-initialised projections would make every logit equal)."""
    module = load_script(script)
    args, _ = module.parse_args(["--preset=tiny", "--vocab_size=512", f"--device_batch_tokens={seq_len}"])
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig.from_args(args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3 if p.ndim == 2 and p.shape[0] == 512 else 0.05)  # a peaked head: clear argmaxes
    return model


def save_like_a_train_script(model, script, path, **changes):
    """What save_checkpoint writes, minus the optimizer and data state sample.py does not read."""
    ckpt = dict(script=script.name, model_config=dataclasses.asdict(model.config), args={}, model=model.state_dict(),
                step=0)
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


class NoCache(torch.nn.Module):
    """A model without forward_cached (like AFNO's): sample.py must fall back to the full forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, idx):
        return self.inner(idx)


def test_a_trained_checkpoint_loads(checkpoint):
    model, module, ckpt = sample.load_checkpoint(checkpoint)
    assert module.__name__ == "train_gpt2" and not model.training
    assert model.config.vocab_size == 256 and model.config.seq_len == 32 and ckpt["step"] == 6
    torch.testing.assert_close(model.lm_head.weight, ckpt["model"]["lm_head.weight"])


def test_greedy_with_cache_equals_full_recompute_past_the_context(model):
    """40 new tokens after 5 with seq_len 32: the cache fills, then the sliding window takes over."""
    idx = torch.tensor([[0, 5, 17, 99, 3], [0, 1, 2, 3, 4]])
    cached = sample.generate(model, idx, 40, temperature=0, use_cache=True)
    full = sample.generate(model, idx, 40, temperature=0, use_cache=False)
    assert cached == full and all(len(row) == 40 for row in cached)
    assert sample.generate(NoCache(model), idx, 40, temperature=0, use_cache=True) == full


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_loads_and_decodes_the_same_with_and_without_cache(script, tmp_path):
    model = random_model(script)
    loaded = sample.load_checkpoint(save_like_a_train_script(model, script, tmp_path / "ckpt.pt"))[0]
    idx = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    full = sample.generate(loaded, idx, 30, temperature=0, use_cache=False, stop_token=None)
    cached = sample.generate(loaded, idx, 30, temperature=0, use_cache=True, stop_token=None)
    assert cached == full and len(set(full[0])) > 1  # and not a constant stream that would hide a cache bug


def test_seeded_sampling_is_deterministic(model):
    idx = torch.zeros(3, 1, dtype=torch.long)

    def run(seed):
        return sample.generate(model, idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len({tuple(row) for row in run(1)}) > 1  # the samples of one call differ from each other


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, -2.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    kept = torch.isfinite(sample.filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False], [False, False, False, True, True]]
    assert torch.isfinite(sample.filter_logits(logits, top_k=0)).all()  # 0 / None: no limit
    assert torch.equal(sample.filter_logits(logits, top_k=2)[kept], logits[kept])  # kept logits unchanged


@pytest.mark.parametrize("top_p, kept", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.97, [0, 1, 2, 3]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative .5, .8, .95, 1
    order = [1, 3, 0, 2]  # token ids by probability
    result = sample.filter_logits(probs.log()[None], top_p=top_p)
    assert sorted(torch.isfinite(result[0]).nonzero().flatten().tolist()) == sorted(order[i] for i in kept)


def test_sampled_tokens_respect_top_k_and_top_p():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top10 = set(torch.topk(logits[0], 10).indices.tolist())
    assert set(sample.next_tokens(logits, 1.0, top_k=10, generator=gen).tolist()) == top10  # all 10, none else
    probs = torch.softmax(logits[0], -1)
    nucleus = torch.argsort(probs, descending=True)[:int((probs.sort(descending=True).values.cumsum(0) < 0.5)
                                                          .sum()) + 1]
    assert set(sample.next_tokens(logits, 1.0, top_p=0.5, generator=gen).tolist()) <= set(nucleus.tolist())


def test_endoftext_stops_a_sample(model):
    idx = torch.tensor([[0, 5, 17], [0, 9, 9]])
    free = sample.generate(model, idx, 12, temperature=0, stop_token=None)
    stop = free[0][4]
    stopped = sample.generate(model, idx, 12, temperature=0, stop_token=stop)
    for row_free, row_stopped in zip(free, stopped):
        expected = row_free[:row_free.index(stop)] if stop in row_free else row_free
        assert row_stopped == expected  # ends before the stop token, each row on its own
    assert len(stopped[0]) <= 4


class PaddedVocab(torch.nn.Module):
    """A 50304-way model that prefers the padded ids 50257..50303 by far."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), dict(vocab_size=50304, seq_len=8))()

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 50304)
        logits[..., 50257:] = 30.0
        logits[..., 1000] = 1.0
        return logits


def test_padded_vocabulary_ids_are_never_sampled():
    idx = torch.zeros(4, 1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    tokens = sample.generate(PaddedVocab(), idx, 20, temperature=2.0, generator=gen)
    assert all(0 <= t < 50257 for row in tokens for t in row)
    assert sample.generate(PaddedVocab(), idx, 3, temperature=0) == [[1000] * 3] * 4


def test_corrupt_and_mismatched_checkpoints_fail_clearly(checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(SystemExit, match="not a readable PyTorch checkpoint"):
        sample.load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(checkpoint, "rb").read()[:5000])
    with pytest.raises(SystemExit, match="not a readable PyTorch checkpoint"):
        sample.load_checkpoint(truncated)
    with pytest.raises(SystemExit, match="no such file"):
        sample.load_checkpoint(tmp_path / "missing.pt")
    ckpt = torch.load(checkpoint, weights_only=False)
    torch.save({"model": ckpt["model"]}, tmp_path / "bare.pt")
    with pytest.raises(SystemExit, match="not a train_gpt2.*py checkpoint: it lacks script, model_config"):
        sample.load_checkpoint(tmp_path / "bare.pt")
    torch.save({**ckpt, "script": "train_gpt2_gone.py"}, tmp_path / "gone.pt")
    with pytest.raises(SystemExit, match=r"train_gpt2_gone.py.*does not exist; pass --script"):
        sample.load_checkpoint(tmp_path / "gone.pt")
    weights = {k: v for k, v in ckpt["model"].items() if k != "lm_head.weight"} | {"router.weight": torch.zeros(1)}
    torch.save({**ckpt, "model": weights}, tmp_path / "keys.pt")
    with pytest.raises(SystemExit, match=r"missing lm_head.weight; unexpected router.weight.*--script"):
        sample.load_checkpoint(tmp_path / "keys.pt")
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "latent_dim": 16}}, tmp_path / "config.pt")
    with pytest.raises(SystemExit, match=r"model_config does not fit train_gpt2.py's GPTConfig.*latent_dim"):
        sample.load_checkpoint(tmp_path / "config.pt")
    wide = {**ckpt["model_config"], "n_embd": 32}
    torch.save({**ckpt, "model_config": wide}, tmp_path / "shape.pt")
    shape_error = r"(?s)weights do not fit train_gpt2.py's GPT:\n  size mismatch for .*wte.weight.*and 14 more"
    with pytest.raises(SystemExit, match=shape_error):
        sample.load_checkpoint(tmp_path / "shape.pt")


def _tiktoken_or_skip():
    try:
        sample.gpt2_encoding()
    except SystemExit as e:
        pytest.skip(f"tiktoken's GPT-2 encoding is unavailable offline ({e}); see README, Tests")


def test_command_line_prints_text(checkpoint):
    _tiktoken_or_skip()
    cmd = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", checkpoint, "--prompt", "a",
           "--max_new_tokens", "12", "--num_samples", "2", "--seed", "3", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("a") and len(s.strip()) > 1 for s in samples), out.stdout
    assert "train_gpt2.py step 6" in out.stderr and "KV cache" in out.stderr
    recompute = subprocess.run(cmd + ["--no_cache"], capture_output=True, text=True, timeout=120)
    assert recompute.returncode == 0 and recompute.stdout == out.stdout, recompute.stderr  # the same samples
    for run in (out, recompute):  # FlexAttention's debug notice is for its developers, not for sampling
        assert "flex_attention called without torch.compile" not in run.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", __file__],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "error:" in bad.stderr and "not a readable PyTorch checkpoint" in bad.stderr


def test_main_greedy_with_and_without_cache_and_prompt_errors(checkpoint, capsys):
    _tiktoken_or_skip()
    with pytest.raises(SystemExit, match="beyond this model's vocabulary of 256"):
        sample.main(["--checkpoint", checkpoint, "--prompt", "Hello world", "--max_new_tokens", "1"])
    sample.main(["--checkpoint", checkpoint, "--prompt", "a", "--max_new_tokens", "5", "--temperature", "0"])
    greedy = capsys.readouterr().out
    sample.main(["--checkpoint", checkpoint, "--prompt", "a", "--max_new_tokens", "5", "--temperature", "0",
                 "--no_cache"])
    assert capsys.readouterr().out == greedy and greedy.startswith("a")


# ---- bad input: one error naming the flag, before the checkpoint is loaded ----
def sample_error(*flags):
    """The one `error:` line of `python sample.py FLAGS` (run as a user would, from the repo root): it fails,
    without a traceback; CUDA is hidden, so the command fails the same on a GPU machine."""
    cmd = helpers.without_file_permission_bypass([sys.executable, "sample.py", *map(str, flags)])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    return errors[0]


@pytest.mark.parametrize("flag, value, allowed", [
    ("temperature", "-1", "a finite number >= 0"), ("temperature", "nan", "a finite number >= 0"),
    ("temperature", "inf", "a finite number >= 0"), ("top_p", "0", r"a number in \(0, 1\]"),
    ("top_p", "1.5", r"a number in \(0, 1\]"), ("top_p", "nan", r"a number in \(0, 1\]"),
    ("top_k", "-1", "an integer >= 0"), ("num_samples", "0", "an integer >= 1"),
    ("max_new_tokens", "-1", "an integer >= 0")])
def test_each_value_flag_has_its_own_error(checkpoint, flag, value, allowed):
    with pytest.raises(SystemExit, match=rf"^error: --{flag}={value}(\.0)?: expected {allowed}"):
        sample.main(["--checkpoint", checkpoint, f"--{flag}", value, "--device", "cpu"])


def test_the_command_names_the_flag_that_is_out_of_range(checkpoint):
    assert sample_error("--checkpoint", checkpoint, "--top_p", "0") == \
        "error: --top_p=0.0: expected a number in (0, 1] (1: all tokens)"


def test_an_empty_prompt_is_an_error(checkpoint):
    with pytest.raises(SystemExit, match="^error: --prompt is empty: give text to continue"):
        sample.main(["--checkpoint", checkpoint, "--prompt", ""])


@pytest.mark.parametrize("device, message", [
    ("gpu", "expected auto, cpu, cuda, cuda:N or mps"), ("cuda:x", "expected auto, cpu, cuda, cuda:N or mps"),
    ("meta", "expected auto, cpu, cuda, cuda:N or mps"), ("cuda", "this machine has no CUDA GPU; use --device=cpu"),
    ("cuda:1", "this machine has no CUDA GPU; use --device=cpu")])
def test_a_bad_or_missing_device_is_named(checkpoint, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same message on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match=rf"^error: --device={device}: {message}$"):
        sample.main(["--checkpoint", checkpoint, "--device", device])


def test_cuda_without_a_gpu_blames_the_device_not_the_checkpoint(checkpoint):
    assert sample_error("--checkpoint", checkpoint, "--device", "cuda") == \
        "error: --device=cuda: this machine has no CUDA GPU; use --device=cpu"


def test_checkpoint_paths_say_what_is_wrong(checkpoint, tmp_path):
    folder = os.path.dirname(checkpoint)
    assert sample_error("--checkpoint", folder) == \
        f"error: --checkpoint={folder}: is a folder, not a file; give one of its checkpoints, e.g. " \
        f"--checkpoint={checkpoint}"
    with pytest.raises(SystemExit, match=r"is a folder, not a file \(it holds no \*\.pt\)$"):
        sample.load_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --checkpoint=: is empty: give a file$"):
        sample.load_checkpoint("")
    os.symlink(tmp_path / "gone.pt", tmp_path / "dangling.pt")
    with pytest.raises(SystemExit, match=r"^error: --checkpoint=.*dangling\.pt: is a dangling symlink \(to .*gone"):
        sample.load_checkpoint(tmp_path / "dangling.pt")
    with pytest.raises(SystemExit, match="^error: --checkpoint=/dev/null: is not a regular file$"):
        sample.load_checkpoint("/dev/null")
    unreadable = tmp_path / "ckpt.pt"
    shutil.copy(checkpoint, unreadable)
    unreadable.chmod(0)
    assert sample_error("--checkpoint", unreadable) == \
        f"error: --checkpoint={unreadable}: cannot be read (Permission denied)"


def test_script_must_be_a_train_script(checkpoint, tmp_path):
    def fails(script, message):
        with pytest.raises(SystemExit, match=rf"^error: --script={script}: {message}"):
            sample.load_checkpoint(checkpoint, script)
    fails(tmp_path / "missing.py", "no such file$")
    fails("", "is empty: give a file$")
    fails(ROOT / "README.md", r"is not a Python file \(\.py\)$")
    fails(ROOT / "bench.py", "not a train script: it defines no Hyperparameters, GPTConfig, GPT, parse_args ")
    broken = tmp_path / "broken.py"
    broken.write_text("class Hyperparameters: pass\nclass GPTConfig: pass\nclass GPT: pass\n"
                      "def parse_args(): pass\ndef main(): pass\nimport no_such_module_x\n")
    fails(broken, r"importing it failed \(ModuleNotFoundError: No module named 'no_such_module_x'\)$")
    assert "broken" not in sys.modules  # a failed import leaves nothing behind for the next one
    # the command: a Python file that is no train script is never executed
    marker, tool = tmp_path / "ran", tmp_path / "tool.py"
    tool.write_text(f"open({str(marker)!r}, 'w').close()\nclass GPT: pass\n")
    assert sample_error("--checkpoint", checkpoint, "--script", tool) == \
        f"error: --script={tool}: not a train script: it defines no Hyperparameters, GPTConfig, parse_args, " \
        "main (a train_gpt2*.py defines Hyperparameters, GPTConfig, GPT, parse_args, main)"
    assert not marker.exists()
    fails(tmp_path, "is a folder, not a file$")
    os.symlink(tmp_path / "gone.py", tmp_path / "dangling.py")
    fails(tmp_path / "dangling.py", rf"is a dangling symlink \(to {tmp_path / 'gone.py'}\)$")
    unreadable = tmp_path / "unreadable.py"
    shutil.copy(ROOT / "train_gpt2.py", unreadable)
    unreadable.chmod(0)
    assert sample_error("--checkpoint", checkpoint, "--script", unreadable) == \
        f"error: --script={unreadable}: cannot be read (Permission denied)"


def test_ctrl_c_while_sampling_exits_130_without_a_traceback(checkpoint):
    _tiktoken_or_skip()
    cmd = [sys.executable, "sample.py", "--checkpoint", checkpoint, "--prompt", "a", "--max_new_tokens", "1000000",
           "--device", "cpu", "--no_cache"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        header = proc.stderr.readline()  # printed once the model is loaded, just before decoding starts
        assert header.startswith("# train_gpt2.py step 6"), header
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=300)[1]  # a loaded CI machine may be slow to reach the next bytecode
    finally:
        proc.kill()
    assert proc.returncode == 130 and rest.strip() == "interrupted", rest

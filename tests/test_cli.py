"""The --name=value command line of every train script: presets, types, errors that name the fix, --help."""
import dataclasses

import pytest

from tests.helpers import SCRIPTS, load_script

ISSUE_FLAGS = ["preset", "train_files", "val_files", "num_iterations", "batch_tokens", "device_batch_tokens", "seq_len",
               "val_every", "val_tokens", "target_val_loss", "stop_at_target", "compile", "seed", "log_dir",
               "save_every", "resume"]


@pytest.fixture(params=SCRIPTS, ids=lambda p: p.name)
def script(request):
    return load_script(request.param)


def test_flags_have_the_documented_names(script):
    idea = [f.name for f in dataclasses.fields(script.IdeaFlags)]  # declared once, in the model section
    names = [f.name for f in dataclasses.fields(script.Hyperparameters) if f.name not in idea]
    assert set(ISSUE_FLAGS) <= set(names) and names[0] == "preset"
    assert set(idea) <= {f.name for f in dataclasses.fields(script.GPTConfig)}  # each a model setting too


def test_presets_and_overrides(script):
    args, given = script.parse_args(["--preset=modded", "--num_iterations=7", "--stop_at_target=1", "--compile=0"])
    assert (args.target_val_loss, args.val_tokens, args.num_iterations) == (3.28, 10485760, 7)
    assert script.parse_args(["--preset=modded"])[0].num_iterations == 2290
    assert args.stop_at_target is True and args.compile == 0
    assert given == {"preset": "modded", "num_iterations": 7, "stop_at_target": True, "compile": 0}
    bottlecap, _ = script.parse_args(["--preset=bottlecap"])
    assert (bottlecap.target_val_loss, bottlecap.val_tokens, bottlecap.stop_at_target) == (3.3821, 1048576, True)
    default, _ = script.parse_args([])
    assert (default.n_layer, default.n_head, default.n_embd, default.vocab_size) == (11, 6, 768, 50304)
    assert (default.batch_tokens, default.batch_stages, default.num_iterations, default.window_blocks) == (
        393216, 3, 1870, "3,7,11")
    assert script.parse_args(["--device_batch_tokens=auto"])[0].device_batch_tokens == "auto"
    assert script.parse_args(["--preset=tiny", "--device_batch_tokens=4"])[0].device_batch_tokens == 4


@pytest.mark.parametrize("argv, message", [
    (["--nonsense=1"], r"(?s)unknown flag '--nonsense=1'.*train_files.*resume"),
    (["--num_iterations"], r"unknown flag '--num_iterations'"),
    (["num_iterations=3"], r"unknown flag"),
    (["--num_iterations=three"], r"--num_iterations=three: expected an integer"),
    (["--muon_lr=fast"], r"--muon_lr=fast: expected a number"),
    (["--stop_at_target=yes"], r"--stop_at_target=yes: expected 0 or 1"),
    (["--device_batch_tokens=big"], r"--device_batch_tokens=big: expected an integer or auto"),
    (["--preset=huge"], r"--preset=huge: unknown preset; choose one of gpt2_124m, bottlecap, modded, tiny"),
])
def test_bad_flags_are_errors_that_say_what_is_valid(script, argv, message):
    with pytest.raises(SystemExit, match=message):
        script.parse_args(argv)


@pytest.mark.parametrize("flag, message", [
    ("--dtype=int8", r"--dtype=int8: expected auto, bf16, fp16 or fp32"),
    ("--dtype=bfloat16", r"--dtype=bfloat16: expected auto, bf16, fp16 or fp32"),
    ("--device_batch_tokens=0", r"--device_batch_tokens=0: expected an integer >= 1, or auto"),
    ("--device_batch_tokens=-2", r"--device_batch_tokens=-2: expected an integer >= 1, or auto"),
    ("--attention=xformers", r"--attention=xformers: expected flex or sdpa"),
    ("--window_blocks=3,,7", r"--window_blocks=3,,7: expected whole numbers >= 1, comma-separated"),
    ("--window_blocks=0", r"--window_blocks=0: expected whole numbers >= 1"),
    ("--batch_stages=0", r"--batch_stages=0: expected an integer >= 1"),
    ("--lr_floor=1.5", r"--lr_floor=1.5: expected a number in \[0, 1\]"),
    ("--seq_len=0", r"--seq_len=0: expected an integer >= 1"),
    ("--batch_tokens=0", r"--batch_tokens=0: expected an integer >= 1"),
    ("--val_tokens=-1", r"--val_tokens=-1: expected an integer >= 0 \(0: no validation\)"),
    ("--n_head=5", r"--n_head=5: must divide --n_embd=768 into a head size that is a multiple of 4; choose one of "
                   r"1, 2, 3, 4, 6, 8, 12, 16"),
    ("--num_iterations=-5", r"--num_iterations=-5: expected an integer >= 1"),
    ("--cooldown_frac=2", r"--cooldown_frac=2.0: expected a number in \[0, 1\]"),
    ("--val_every=-1", r"--val_every=-1: expected an integer >= 0"),
    ("--time_budget_s=-1", r"--time_budget_s=-1.0: expected a number of seconds >= 0"),
    ("--compile=2", r"--compile=2: expected 0, 1 or auto"),
    ("--muon_lr=nan", r"--muon_lr=nan: expected a number >= 0"),
    ("--muon_beta2=1", r"--muon_beta2=1.0: expected a number in \[0, 1\)"),
    ("--muon_weight_decay=-0.1", r"--muon_weight_decay=-0.1: expected a number >= 0"),
    ("--muon_momentum_cooldown_steps=-1", r"--muon_momentum_cooldown_steps=-1: expected an integer >= 0"),
    ("--adam_lr=-1", r"--adam_lr=-1.0: expected a number >= 0"),
    ("--adam_lr=inf", r"--adam_lr=inf: expected a number >= 0"),
    ("--adam_eps=0", r"--adam_eps=0.0: expected a number > 0"),
    ("--adam_weight_decay=-1", r"--adam_weight_decay=-1.0: expected a number >= 0"),
    ("--stage_lr_mults=fast", r"--stage_lr_mults=fast: expected auto or numbers >= 0, comma-separated, one per "
                              r"batch stage"),
    ("--stage_lr_mults=1,-2,3", r"--stage_lr_mults=1,-2,3: expected auto or numbers >= 0"),
    ("--stage_lr_mults=1,1.5", r"--stage_lr_mults=1,1.5: expected 3 multipliers, one per batch stage "
                               r"\(--batch_stages=3\), or auto"),
    ("--bigram_vocab=1", r"--bigram_vocab=1: expected 0 \(none\) or an integer >= 2"),
    ("--final_window_blocks=20", r"--final_window_blocks=20: expected two whole numbers >= 1, long,short"),
])
def test_out_of_range_values_name_the_flag_the_value_and_the_range(script, flag, message):
    with pytest.raises(SystemExit, match=message):
        script.parse_args([flag])


def test_stage_lr_mults_accepts_one_multiplier_per_stage(script):
    args, _ = script.parse_args(["--batch_stages=2", "--stage_lr_mults=1,1.25e0"])
    assert script.stage_lr_mults(args) == [1.0, 1.25]
    assert script.stage_lr_mults(script.parse_args(["--batch_stages=1"])[0]) == [1.0]


def test_help_lists_every_flag_with_its_default(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(script.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default  # booleans are given as 0/1
        assert f"--{f.name}={default}" in out
    assert "tokens per step over all ranks" in out  # the field comments are the help text
    assert "tiny: train_files=data/sample/sample_train_*.bin " in out and "n_layer=2" in out  # what each preset sets
    assert "bottlecap: target_val_loss=3.3821 val_tokens=1048576 stop_at_target=1" in out


def test_the_flags_page_lists_every_baseline_flag():
    """docs/runs.md's table of flags keeps up with Hyperparameters (--help is generated, the page is not)."""
    import re

    from tests.helpers import ROOT
    baseline = load_script(ROOT / "train_gpt2.py")
    table = (ROOT / "docs" / "runs.md").read_text(encoding="utf-8").split("## Flags", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`--(\w+)`", table))
    assert {f.name for f in dataclasses.fields(baseline.Hyperparameters)} <= documented

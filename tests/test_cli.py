"""The --name=value command line of every train script: presets, types, errors that name the fix, --help."""
import dataclasses

import pytest

from tests.helpers import SCRIPTS, load_script

ISSUE_FLAGS = ["preset", "train_files", "val_files", "num_iterations", "batch_tokens", "device_batch_size", "seq_len",
               "val_every", "val_tokens", "target_val_loss", "stop_at_target", "compile", "seed", "log_dir",
               "save_every", "resume"]


@pytest.fixture(params=SCRIPTS, ids=lambda p: p.name)
def script(request):
    return load_script(request.param)


def test_flags_have_the_documented_names(script):
    names = [f.name for f in dataclasses.fields(script.Hyperparameters)]
    assert set(ISSUE_FLAGS) <= set(names)
    assert names[0] == "preset"


def test_presets_and_overrides(script):
    args, given = script.parse_args(["--preset=modded", "--num_iterations=7", "--stop_at_target=1", "--compile=0"])
    assert (args.target_val_loss, args.val_tokens, args.num_iterations) == (3.28, 10485760, 7)
    assert args.stop_at_target is True and args.compile == 0
    assert given == {"preset": "modded", "num_iterations": 7, "stop_at_target": True, "compile": 0}
    bottlecap, _ = script.parse_args(["--preset=bottlecap"])
    assert (bottlecap.target_val_loss, bottlecap.val_tokens, bottlecap.stop_at_target) == (3.3821, 1048576, True)
    default, _ = script.parse_args([])
    assert (default.n_layer, default.n_head, default.n_embd, default.seq_len, default.vocab_size) == (12, 12, 768, 1024, 50304)
    assert script.parse_args(["--device_batch_size=auto"])[0].device_batch_size == "auto"
    assert script.parse_args(["--preset=tiny", "--device_batch_size=4"])[0].device_batch_size == 4


@pytest.mark.parametrize("argv, message", [
    (["--nonsense=1"], r"(?s)unknown flag '--nonsense=1'.*train_files.*resume"),
    (["--num_iterations"], r"unknown flag '--num_iterations'"),
    (["num_iterations=3"], r"unknown flag"),
    (["--num_iterations=three"], r"--num_iterations=three: expected an integer"),
    (["--muon_lr=fast"], r"--muon_lr=fast: expected a number"),
    (["--stop_at_target=yes"], r"--stop_at_target=yes: expected 0 or 1"),
    (["--device_batch_size=big"], r"--device_batch_size=big: expected an integer or auto"),
    (["--preset=huge"], r"--preset=huge: unknown preset; choose one of gpt2_124m, bottlecap, modded, tiny"),
])
def test_bad_flags_are_errors_that_say_what_is_valid(script, argv, message):
    with pytest.raises(SystemExit, match=message):
        script.parse_args(argv)


def test_help_lists_every_flag_with_its_default(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(script.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default  # booleans are given as 0/1
        assert f"--{f.name}={default}" in out
    assert "tokens per optimizer step" in out  # the field comments are the help text


def test_readme_flag_table_lists_every_baseline_flag():
    import re

    from tests.helpers import ROOT
    baseline = load_script(ROOT / "train_gpt2.py")
    table = (ROOT / "README.md").read_text(encoding="utf-8").split("## Flags", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`--(\w+)`", table))
    assert {f.name for f in dataclasses.fields(baseline.Hyperparameters)} <= documented

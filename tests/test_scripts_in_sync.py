"""Every section except `model` is byte-identical across train_gpt2*.py, and each script reads top to bottom: the ML
first, the harness last, lines of at most 110 columns."""
import difflib

import pytest

from tests.helpers import ROOT, SCRIPTS, SECTION_ORDER, sections, shared_view

BASELINE = (ROOT / "train_gpt2.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sections_in_order(script):
    text = script.read_text(encoding="utf-8")
    parts = sections(text)
    assert list(parts) == SECTION_ORDER
    assert "\nclass IdeaFlags:" in parts["model"] and "\nclass GPTConfig(IdeaFlags):" in parts["model"]
    assert "\nclass Hyperparameters(IdeaFlags):" in parts["hyperparameters"]
    assert text.rstrip().endswith('if __name__ == "__main__":\n    main()')


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "train_gpt2.py"], ids=lambda p: p.name)
def test_shared_sections_match_the_baseline(script):
    mine, base = shared_view(script.read_text(encoding="utf-8")), shared_view(BASELINE)
    for name in base:
        if mine.get(name) != base[name]:
            diff = "".join(difflib.unified_diff(base[name].splitlines(True), mine.get(name, "").splitlines(True),
                                                "train_gpt2.py", script.name, n=1))
            pytest.fail(f"section '{name}' of {script.name} differs from train_gpt2.py "
                        f"(apply shared fixes to every script):\n{diff[:3000]}")


def test_the_check_catches_a_drift():
    for drifted in (BASELINE.replace("eps=1e-10", "eps=1e-8"),  # train
                    BASELINE.replace('"n_layer": (at_least(1)', '"n_layer": (at_least(2)')):  # harness
        assert drifted != BASELINE and shared_view(drifted) != shared_view(BASELINE)
    idea = BASELINE.replace("class IdeaFlags:\n", "class IdeaFlags:\n    my_idea_width: int = 3  # an idea's flag\n")
    assert idea != BASELINE and shared_view(idea) == shared_view(BASELINE)  # an idea declares its flags in `model`
    model_only = BASELINE.replace("class MLP(nn.Module):", "class MLP(nn.Module):  # changed")
    assert shared_view(model_only) == shared_view(BASELINE)


def test_the_baseline_reads_top_to_bottom():
    """The ML first: a reader reaches the training loop within the first 55% of train_gpt2.py, the harness after."""
    lines = BASELINE.splitlines()
    loop = next(i for i, line in enumerate(lines) if line.startswith("def train_loop("))
    harness = lines.index("# ---- harness ----")
    assert loop < 0.55 * len(lines) < harness + 0.55 * len(lines) and loop < harness, (loop, harness, len(lines))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_lines_fit_110_columns(script):
    """At most 110 columns, bar fewer than 1% of lines (a URL, a table of constants that would not break)."""
    lines = script.read_text(encoding="utf-8").splitlines()
    over = [f"{i + 1}: {line[:60]}..." for i, line in enumerate(lines) if len(line) > 110]
    assert len(over) < 0.01 * len(lines), f"{len(over)} of {len(lines)} lines over 110 columns:\n" + "\n".join(over[:20])

"""Every section except `model` and the idea's own hyperparameters is byte-identical across train_gpt2*.py."""
import difflib

import pytest

from tests.helpers import IDEA_MARKER, ROOT, SCRIPTS, SECTION_ORDER, sections, shared_view

BASELINE = (ROOT / "train_gpt2.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sections_in_order(script):
    text = script.read_text(encoding="utf-8")
    assert list(sections(text)) == SECTION_ORDER
    assert IDEA_MARKER in sections(text)["hyperparameters"]
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
    drifted = BASELINE.replace("eps=1e-10", "eps=1e-8")
    assert shared_view(drifted)["train"] != shared_view(BASELINE)["train"]
    idea = BASELINE.replace(IDEA_MARKER, IDEA_MARKER + "\n    my_idea_width: int = 3  # idea-only field")
    assert shared_view(idea) == shared_view(BASELINE)  # the idea's own fields are allowed to differ
    model_only = BASELINE.replace("class MLP(nn.Module):", "class MLP(nn.Module):  # changed")
    assert shared_view(model_only) == shared_view(BASELINE)

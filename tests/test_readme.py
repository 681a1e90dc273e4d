"""The README's Python example runs as written (paths swapped for the demo models and a synthetic
sample) and gives the numbers an independent computation gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_MODELS = Path(__file__).resolve().parents[1] / "models" / "demo"


def python_example() -> str:
    text = README.read_text()
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_runs_and_its_numbers_hold(synthetic_dir, tmp_path, capsys):
    if not all((DEMO_MODELS / f"age_gender_{k}.keras").is_file() for k in "AB"):
        pytest.skip("the committed demo models are missing")
    code = python_example()
    for original, ours in (("../shared/utkface/test", synthetic_dir), ("models/age_gender_A.keras", DEMO_MODELS / "age_gender_A.keras"),
                           ("models/age_gender_B.keras", DEMO_MODELS / "age_gender_B.keras"), ("reports/ab_python", tmp_path / "report")):
        assert f'"{original}"' in code, original  # the example still uses these paths
        code = code.replace(f'"{original}"', repr(str(ours)))
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - our own README

    predictions = names["predictions"]
    accuracy_b = accuracy_score(predictions["gender"], (predictions["p_female_B"] >= 0.5).astype(int))
    assert capsys.readouterr().out.split()[0] == str(names["evaluation"].summary["models"]["B"]["gender_acc"])
    assert names["evaluation"].summary["models"]["B"]["gender_acc"] == pytest.approx(accuracy_b)
    assert len(predictions) == 120 and set(names["slices"]["slice_by"]) >= {"age_band", "gender", "ethnicity"}
    assert "fine-tuned ResNet" in str(names["chart"].to_dict())
    bundle_readme = (tmp_path / "report" / "README.md").read_text()
    assert "custom CNN" in bundle_readme and "fine-tuned ResNet" in bundle_readme

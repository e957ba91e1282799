"""bench/bench_budget_curve.py: a rerun with the same --out resumes only under the settings its points were
measured with (it kept them beside new points measured otherwise and recorded only the new settings)."""
import json

import pytest

from conftest import load_bench  # bench/<name>.py as a module


def test_resume_refuses_other_measurement_settings(tmp_path):
    out = tmp_path / "bc.json"
    settings = {"budgets": [200], "finetune_epochs": 0.5, "reuse_epochs": 0.5, "test_images": 10000,
                "train_limit": None}
    done = ["fmnist_deit_tiny", "fmnist_far_tiny", "fmnist_far_tiny_pruned", "fmnist_far_tiny_xs", "fmnist_trex_tiny",
            "far-mixer-arrays-200", "trex-3from2", "trex-1from0-3from2", "trex-1from0-2from0-3from0"]
    points = [{"name": n, "family": "far", "top1": 0.9, "none": {"mixer_arrays": 100}, "params": {"mixer_kept": 1000}}
              for n in done]  # every point done: the old code measured nothing, only rewrote the settings
    before = {"environment": {}, "points": points, "settings": settings}
    out.write_text(json.dumps(before))
    bench = load_bench("bench_budget_curve")
    with pytest.raises(SystemExit, match=r"other settings \(finetune_epochs 0.5 -> 3.0, test_images 10000 -> 100\)"):
        bench.main(["--out", str(out), "--budgets", "200", "--finetune-epochs", "3", "--test-images", "100"])
    assert json.loads(out.read_text()) == before  # untouched


@pytest.mark.parametrize("text,needle", [
    pytest.param('{"environment": {}, "points": [{"name": "fmnist_deit_t', "not a JSON --out file (", id="cut-short"),
    pytest.param('{"benchmark": "imc_cost", "rows": []}', "not a result of this benchmark", id="another-benchmark"),
    pytest.param("[1, 2]", "not a result of this benchmark", id="not-an-object"),
])
def test_resume_from_a_file_it_cannot_use_is_refused_by_name(tmp_path, text, needle):
    """An --out that exists is resumed from: one that is not this benchmark's result (cut short, another
    benchmark's) is one message naming it, before any work, and stays as it was."""
    out = tmp_path / "bc.json"
    out.write_text(text)
    with pytest.raises(SystemExit) as e:
        load_bench("bench_budget_curve").main(["--out", str(out), "--budgets", "200"])
    assert str(e.value).startswith(f"{out}: ") and needle in str(e.value), e.value
    assert out.read_text() == text

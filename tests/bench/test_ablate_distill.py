"""bench/ablate_distill.py: arguments refused before any work (its runs are minutes long; the README's ablation
table was made with it, bench/results/distill_ablation-*.json)."""
import pytest

from conftest import load_bench  # bench/<name>.py as a module


def test_append_without_out_is_refused(capsys):
    """--append keeps the configurations of --out: without --out it used to run everything into a new file."""
    with pytest.raises(SystemExit) as e:
        load_bench("ablate_distill").main(["--append"])
    assert e.value.code == 2 and "--append needs --out" in capsys.readouterr().err


def test_unknown_config_is_refused():
    with pytest.raises(SystemExit, match="unknown configs"):
        load_bench("ablate_distill").main(["--configs", "no_such_config"])


@pytest.mark.parametrize("text,needle", [
    pytest.param('{"benchmark": "distill_ablation", "configs": [', "not a JSON --append file (", id="cut-short"),
    pytest.param('{"benchmark": "budget_curve", "points": []}', "not a result of this benchmark", id="another"),
])
def test_append_to_a_file_it_cannot_use_is_refused_by_name(tmp_path, text, needle):
    """--append reads --out before any work: a file that is not this benchmark's result is one message naming
    it (not a JSON traceback after the teacher and data were loaded), and it stays as it was."""
    out = tmp_path / "ab.json"
    out.write_text(text)
    with pytest.raises(SystemExit) as e:
        load_bench("ablate_distill").main(["--append", "--out", str(out)])
    assert str(e.value).startswith(f"{out}: ") and needle in str(e.value), e.value
    assert out.read_text() == text

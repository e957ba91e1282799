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

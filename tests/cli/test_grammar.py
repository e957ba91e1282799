"""One command-line grammar: the same option names (and metavars) for the same things in every
command, MODEL wherever a command takes a model, no help that reads backwards, and a warning when an
option has no effect."""
import argparse

import pytest

from far.cli import main
from far.cli.main import build_parser

needs_fmnist = pytest.mark.fmnist


def commands():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(p):
    return {a.dest: a for a in p._actions if a.option_strings}


def test_model_positional_and_output_flags():
    writes = set()
    for name, p in commands().items():
        pos = [a for a in p._actions if not a.option_strings]
        opts = options(p)
        if name == "analyze":  # two models: each read by the MODEL grammar
            assert [a.metavar for a in pos] == ["TEACHER", "STUDENT"], "far analyze TEACHER STUDENT"
        elif name == "predict":  # the model, then the images it classifies
            assert [a.metavar for a in pos] == ["MODEL", "IMAGE"], "far predict MODEL IMAGE..."
        elif name != "demo":
            assert [a.metavar for a in pos] == ["MODEL"], f"far {name}: the model argument is called MODEL"
        if "output" in opts:
            assert opts["output"].option_strings == ["-o", "--output"] and opts["output"].metavar == "FILE", name
        if {"output", "json", "plot"} & set(opts):
            writes.add(name)
            assert opts["force"].option_strings == ["-f", "--force"], f"far {name} writes files: -f/--force"
        if name != "info":
            assert opts["quiet"].option_strings == ["-q", "--quiet"], f"far {name}: -q/--quiet"
    assert writes >= {"convert", "eval", "imc-eval", "train-teacher", "distill", "prune", "finetune"}


def test_same_option_same_spelling_everywhere():
    seen = {}
    for name, p in commands().items():
        for dest, a in options(p).items():
            if dest == "help":
                continue
            key = (tuple(a.option_strings), a.metavar, a.nargs)
            seen.setdefault(dest, {}).setdefault(key, []).append(name)
    mixed = {d: v for d, v in seen.items() if len(v) > 1}
    assert not mixed, f"options spelled differently in different commands: {mixed}"


def test_no_help_reads_backwards(capsys):
    for name in commands():
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert "(default: True)" not in text and "(default: False)" not in text, name
        assert "_" not in "".join(w for w in text.split() if w.startswith("--")), f"far {name}: an option with '_'"


def test_every_default_is_shown():
    """An option that has a default says it in its help, 0 included (--seed, --workers, --ema, --map-head)."""
    for name, p in commands().items():
        fmt = p._get_formatter()
        for a in options(p).values():
            if a.nargs == 0 or a.default is None or a.default is False or a.default == argparse.SUPPRESS:
                continue  # a flag, or nothing set unless given
            assert "default" in fmt._get_help_string(a), f"far {name} {a.option_strings[-1]}: default not shown"


@needs_fmnist
def test_options_without_effect_warn(capsys, tmp_path):
    code = main(["eval", "fmnist_deit_tiny", "--data", "fashion-mnist", "--limit", "8", "--backend", "torch",
                 "--workers", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "far: warning: --backend torch has no effect: fmnist_deit_tiny has no FAR blocks" in err
    assert "far: warning: --workers has no effect on fashion-mnist" in err
    code = main(["imc-eval", "fmnist_deit_tiny", "--data", "fashion-mnist", "--limit", "4", "--batch-size", "4",
                 "--include", "head", "--calib-images", "8", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "far: warning: --calib-images / --calib-data / --calib-per-slice have no effect" in err
    code = main(["convert", "fmnist_deit_tiny", "--pretrained", "-o", str(tmp_path / "x.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert code == 0 and "far: warning: --pretrained has no effect" in err

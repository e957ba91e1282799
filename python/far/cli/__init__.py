"""The `far` command line: a thin shell over the library. Nothing imports this package.

    main.py      the parser, error handling (one `far: error:` line, exit code 2), dispatch
    options.py   the shared grammar: MODEL, -o/--output, -f/--force, -q/--quiet, --device, ...
    models.py    far info, far convert
    evaluate.py  far eval, far demo (demo.py: the demo job)
    train.py     far train-teacher, distill, prune, finetune
    imc.py       far imc-eval
"""
from far.cli.main import main

__all__ = ["main"]

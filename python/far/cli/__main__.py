"""`python -m far.cli ...` (and `torchrun ... -m far.cli ...`)."""
from far.cli.main import main

raise SystemExit(main())

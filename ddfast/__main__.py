"""``python -m ddfast ...``: the command line (see ``ddfast.distill.cli``)."""

from .distill.cli import main

raise SystemExit(main())

"""``python -m ddfast ...``: the command line (see ``ddfast.cli``)."""

import sys

from .cli import main

sys.exit(main())

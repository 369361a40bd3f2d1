"""``python -m rmoe.sweep ...``: the same as ``rmoe sweep ...`` (and how a sweep starts its child processes)."""

import sys

from rmoe.sweep.sweep_cli import main

sys.exit(main())

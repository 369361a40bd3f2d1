"""``python -m rmoe.report ...``: the same as ``rmoe report ...``."""

import sys

from rmoe.report.command import main

sys.exit(main())

"""``python -m rmoe.report ...``: the same as ``rmoe report ...``."""

import sys

from rmoe.report.report_cli import main

sys.exit(main())

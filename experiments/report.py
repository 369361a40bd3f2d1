"""``python experiments/report.py ...``: the old name of ``rmoe report ...`` (:mod:`rmoe.report`)."""

import sys

from rmoe.report import main

if __name__ == "__main__":
    sys.exit(main())

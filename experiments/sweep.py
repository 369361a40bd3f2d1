"""``python experiments/sweep.py ...``: the old name of ``rmoe sweep ...`` (:mod:`rmoe.sweep`)."""

import sys

from rmoe.sweep import main

if __name__ == "__main__":
    sys.exit(main())

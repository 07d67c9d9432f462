"""Table and plots of a multirun sweep; the same as the ``nmf-sweep-report`` console script.

python scripts/sweep_report.py multirun/2026-01-01/12-00-00 [--metric val_relative_error]
"""

import sys

from nmf_lightning.report import main

if __name__ == "__main__":
    sys.exit(main())

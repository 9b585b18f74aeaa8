"""Run a sweep: `python apps/sweep.py configs/sweeps/cpu_small.yaml [--dry-run] [key=value ...]` (= `lingua-wd sweep`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lingua_wd.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

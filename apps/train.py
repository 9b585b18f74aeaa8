"""Train a model: `python apps/train.py config=configs/debug.yaml optim.lr=3e-3 ...` or under torchrun."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lingua_wd.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

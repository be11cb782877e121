"""`python -m npgpt.train`: the front door of npgpt/program/train.py (see there)."""

import sys

from .program.train import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m npgpt.plot`: the front door of npgpt/program/plot.py (see there)."""

import sys

from .program.plot import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m npgpt.viz`: the front door of npgpt/program/viz.py (see there)."""

import sys

from .program.viz import main

if __name__ == "__main__":
    sys.exit(main())

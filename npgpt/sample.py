"""`python -m npgpt.sample`: the front door of npgpt/program/sample.py (see there)."""

import sys

from .program.sample import main

if __name__ == "__main__":
    sys.exit(main())

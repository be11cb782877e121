"""`python -m npgpt.export`: the front door of npgpt/program/export.py (see there)."""

import sys

from .program.export import main

if __name__ == "__main__":
    sys.exit(main())

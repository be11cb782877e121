"""`python -m npgpt.proof`: the front door of npgpt/program/proof.py (see there)."""

import sys

from .program.proof import main

if __name__ == "__main__":
    sys.exit(main())

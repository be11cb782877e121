"""`python -m npgpt.proof`: the front door of npgpt/program/proof.py (see there)."""

from .program.cli import run_command
from .program.proof import main

if __name__ == "__main__":
    run_command(main)

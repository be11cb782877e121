"""`python -m npgpt.plot`: the front door of npgpt/program/plot.py (see there)."""

from .program.cli import run_command
from .program.plot import main

if __name__ == "__main__":
    run_command(main)

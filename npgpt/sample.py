"""`python -m npgpt.sample`: the front door of npgpt/program/sample.py (see there)."""

from .program.cli import run_command
from .program.sample import main

if __name__ == "__main__":
    run_command(main)

"""`python -m npgpt.viz`: the front door of npgpt/program/viz.py (see there)."""

from .program.cli import run_command
from .program.viz import main

if __name__ == "__main__":
    run_command(main)

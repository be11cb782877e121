"""`python -m npgpt.export`: the front door of npgpt/program/export.py (see there)."""

from .program.cli import run_command
from .program.export import main

if __name__ == "__main__":
    run_command(main)

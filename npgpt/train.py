"""`python -m npgpt.train`: the front door of npgpt/program/train.py (see there)."""

from .program.cli import run_command
from .program.train import main

if __name__ == "__main__":
    run_command(main)

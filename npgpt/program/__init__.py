"""The program: training, sampling, configuration, checkpoints, data, tokenizers, and the learner's tools.

Built on the textbook (``npgpt/*.py``) and, for speed, the fast paths (``npgpt/fast/``). Each command has a
front door at the package's top level, so ``python -m npgpt.train`` runs ``npgpt/program/train.py``.
"""

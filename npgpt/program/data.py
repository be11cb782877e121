"""The training text: loading it, splitting it 90/10, and drawing batches of random windows.

The default corpus is Tiny Shakespeare (public domain), installed inside the package.

Shapes: the corpus as ids (N,); a batch as inputs and targets (B, T).

Next to read: ``npgpt/program/config.py`` and ``npgpt/program/checkpoint.py``, then
``npgpt/program/train.py``.
"""

import os
from importlib import resources

import numpy as np


class DataError(ValueError):
    """A data problem the user must fix (the message says how)."""


def bundled_corpus_path():
    return str(resources.files("npgpt.program") / "corpus" / "tinyshakespeare.txt")


def read_text(path=None):
    """The corpus as a string: `path`, or the bundled Tiny Shakespeare when path is None."""
    path = path or bundled_corpus_path()
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist; pass --data PATH to a UTF-8 text file")
    if os.path.isdir(path):
        raise DataError(f"data path {path} is a directory; pass --data PATH to a UTF-8 text file")
    if not os.path.isfile(path):      # /dev/zero never ends, a FIFO waits for a writer: read regular files only
        raise DataError(f"data path {path} is not a regular file (a device, FIFO or socket); pass --data PATH "
                        "to a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read data file {path} ({exc.strerror}); check its permissions") from None
    if not raw:
        raise DataError(f"data file {path} is empty; pass --data PATH to a UTF-8 text file holding the text to "
                        "train on")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 text (bad byte at offset {exc.start}); "
                        "convert it with iconv -t UTF-8 or pass another file") from None


def split_tokens(ids, seq_len, train_fraction=0.9):
    """The first 90% of the token ids for training, the rest for validation; each must hold a window."""
    ids = np.asarray(ids)
    cut = int(len(ids) * train_fraction)
    train, val = ids[:cut], ids[cut:]
    need = seq_len + 1
    if len(val) < need:
        shorter = " or a smaller --seq-len" if seq_len > 1 else ""
        raise DataError(f"corpus too short: {len(ids)} tokens leave {len(val)} for validation, but one "
                        f"sequence needs {need} (seq_len + 1); use a longer text{shorter}")
    return train, val


def get_batch(tokens, batch_size, seq_len, rng):
    """(inputs, targets), each (B, T): random windows of the token stream and the same shifted by one."""
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)       # (B,)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)]              # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]

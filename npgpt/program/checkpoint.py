"""Checkpoints: one NumPy .npz file, never pickle, written atomically.

Inside: every parameter as ``param.<name>``, AdamW's moments as ``adam.m.<i>`` / ``adam.v.<i>`` with their step
counts in ``adam.step``, and ``meta``: a JSON string with the training config, the model config, the step, the
best validation loss, the random generators' states and the tokenizer. Arrays are stored as NumPy arrays
whatever the device, so a GPU checkpoint resumes on the CPU and back.

A save writes ``<path>.tmp`` then renames it over ``<path>``: an interruption leaves the previous good file.

Shapes: each parameter and moment as saved from the model, (V, C), (C,), ...

Next to read: ``npgpt/train.py``, which writes and reads these.
"""

import json
import os
import zipfile

import numpy as np

from .. import backend

FORMAT = "npgpt-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or from another configuration."""


def save_checkpoint(path, model, optimizer, meta):
    arrays = {f"param.{name}": backend.to_numpy(p.data) for name, p in model.named_parameters()}
    if optimizer is not None:
        state = optimizer.state_dict()
        arrays["adam.step"] = np.asarray(state["step"], dtype=np.int64)
        for i, (m, v) in enumerate(zip(state["exp_avg"], state["exp_avg_sq"])):
            if m is not None:
                arrays[f"adam.m.{i}"] = backend.to_numpy(m)
                arrays[f"adam.v.{i}"] = backend.to_numpy(v)
        meta = dict(meta, lr_groups=state["lr"])
    meta = dict(meta, format=FORMAT)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)          # atomic: readers see the old file or the new one, never half of one


def load_checkpoint(path):
    """(arrays, meta) from a checkpoint file, with a clear CheckpointError for anything wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first with python -m npgpt.train "
                              f"--out-dir {os.path.dirname(path) or '.'}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                              "delete it, or resume from best.npz / another --out-dir") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an npgpt checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return arrays, meta


def restore_model(model, arrays, path="checkpoint"):
    """Copy the checkpoint's parameters into `model`, checking every name and shape."""
    params = dict(model.named_parameters())
    saved = {k[len("param."):]: v for k, v in arrays.items() if k.startswith("param.")}
    if set(saved) != set(params):
        raise CheckpointError(f"{path} holds a different model: parameters {sorted(set(saved) ^ set(params))[:4]} "
                              "do not match; use the configuration it was trained with")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise CheckpointError(f"{path} holds a different model: {name} is {saved[name].shape} there, "
                                  f"{p.shape} here; use the configuration it was trained with")
    state = {name: saved[name] for name in params}
    model.load_state_dict(state, strict=False)


def restore_optimizer(optimizer, arrays, meta):
    steps = [int(s) for s in arrays.get("adam.step", [])]
    state = {"step": steps,
             "exp_avg": [arrays.get(f"adam.m.{i}") for i in range(len(steps))],
             "exp_avg_sq": [arrays.get(f"adam.v.{i}") for i in range(len(steps))],
             "lr": meta.get("lr_groups", [])}
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None

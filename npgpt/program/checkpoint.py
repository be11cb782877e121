"""Checkpoints: one NumPy .npz file, never pickle, written atomically, checked whole before it is used.

Inside: every parameter as ``param.<name>``, AdamW's moments as ``adam.m.<i>`` / ``adam.v.<i>`` with their step
counts in ``adam.step``, and ``meta``: a JSON string with the training config, the model config, the step, the
best validation loss, the random generators' states and the tokenizer. Arrays are stored as NumPy arrays
whatever the device, so a GPU checkpoint resumes on the CPU and back.

A save writes ``<path>.tmp-<pid>-<random>`` (unique to the writer), then renames it over ``<path>``: an
interruption leaves the previous good file, and a failed write (a full disk) removes its temporary file.
Nothing non-finite is ever saved (`state_problem`).

A load checks everything before any array is read or any model is built (`load_checkpoint`): the zip
members' .npy headers (read without their data) must name exactly the arrays the config implies, with
their shapes and dtype; the config's types and ranges; the memory the model would need; the tokenizer, the
step and the random states; then, once read, that the weights and moments are finite.

Shapes: each parameter and moment as saved from the model, (V, C), (C,), ...

Next to read: ``npgpt/program/train.py``, which writes and reads these.
"""

import json
import math
import os
import secrets
import zipfile
from dataclasses import fields

import numpy as np

from .. import backend
from .cli import os_error_fix
from .config import ARCHITECTURE_FIELDS, TrainConfig, config_problems, memory_problem, parameter_shapes
from .tokenizer import TokenizerError, tokenizer_from_dict

FORMAT = "npgpt-checkpoint-1"
META_LIMIT = 256 * 2 ** 20         # bytes of JSON metadata (a 50k-token BPE's merges take about 1 MB)
WEIGHT_LIMIT = 1e4                 # trained GPT weights stay within about +-10; beyond 1e4 a run has diverged


# GPT's keyword options beyond the TrainConfig fields, and the values each accepts
MODEL_OPTIONS = {
    "attention_bias": lambda v: isinstance(v, bool),
    "gelu_approximate": lambda v: v in ("none", "tanh"),
    "layer_norm_eps": lambda v: isinstance(v, float) and math.isfinite(v) and 0 < v < 1,
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, tampered with, or from another configuration."""


# ---------------------------------------------------------------------------------------------------------
# Saving

def state_problem(model, optimizer=None, limit=WEIGHT_LIMIT):
    """None when every weight and AdamW moment is finite and every |weight| <= limit; else what is wrong."""
    for name, p in model.named_parameters():
        largest = float(backend.get_array_module(p.data).abs(p.data).max())     # nan and inf propagate
        if not math.isfinite(largest):
            return f"weight {name} is not finite"
        if largest > limit:
            return f"weight {name} reaches {largest:.3g}, beyond {limit:g} (the run has diverged)"
    if optimizer is not None:
        for i, (m, v) in enumerate(zip(*[optimizer.state_dict()[k] for k in ("exp_avg", "exp_avg_sq")])):
            if m is not None and not all(math.isfinite(float(backend.get_array_module(a).abs(a).max()))
                                         for a in (m, v)):
                return f"AdamW moment {i} is not finite"
    return None


def _fsync_directory(directory):
    try:                                # the rename itself reaches the disk (best effort: not on every OS)
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, model, optimizer, meta):
    """Write model, AdamW state and meta to `path` atomically; CheckpointError (one line) if the disk refuses."""
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
    text = json.dumps(meta, allow_nan=True)     # best_val may be inf before the first evaluation
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"     # unique: two writers never share one
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(text), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)      # atomic: readers see the old file or the new one, never half of one
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write {path} ({exc.strerror or exc}); {os_error_fix(exc)}: the "
                                  "checkpoints already there are untouched") from None
        raise
    _fsync_directory(directory)


# ---------------------------------------------------------------------------------------------------------
# Loading: every check before anything is built

def read_npz_headers(path):
    """{array name: (shape, dtype)} from each .npy member's header, reading no array data.

    Also checks that each member's stored size is exactly its header plus shape x itemsize bytes, so a
    header that claims 10**11 floats in a 6 kB file is caught here, not by an allocation.
    """
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"it holds {info.filename!r}, which is not an array")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise CheckpointError(f"its {info.filename} has .npy format {version}, not 1.0 or 2.0")
                header_size = member.tell()
            name = info.filename[:-len(".npy")]
            if dtype.hasobject:
                raise CheckpointError(f"its {name} holds Python objects (pickle), which npgpt never writes "
                                      "and will not load: it is not a genuine checkpoint")
            if fortran_order:
                raise CheckpointError(f"its {name} is stored in Fortran order, which npgpt never writes")
            if info.file_size != header_size + math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"it is corrupt or truncated: {name}'s header claims {shape} x {dtype} "
                                      f"({math.prod(shape) * dtype.itemsize:,} bytes) but "
                                      f"{info.file_size - header_size:,} bytes are stored")
            headers[name] = (tuple(shape), dtype)
    return headers


def optimizer_order(shapes):
    """Parameter names in AdamW's order: make_optimizer's groups, matrices and embeddings, then the rest."""
    return [n for n, s in shapes.items() if len(s) >= 2] + [n for n, s in shapes.items() if len(s) < 2]


def _check_rng_state(state, what, allow_none):
    if state is None and allow_none:
        return
    try:
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(f"its {what} random-generator state is malformed") from None


def check_meta(meta, headers):
    """The metadata's config, tokenizer, step and generators, and the array headers against the config.

    Returns (config dict with every field, tokenizer). Raises CheckpointError naming the first problem.
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"it is not an npgpt checkpoint (format {found!r})")
    for key in ("config", "model_config", "step", "tokenizer", "rng"):
        if key not in meta:
            raise CheckpointError(f"its metadata has no {key!r}")
    saved = meta["config"]
    if not isinstance(saved, dict):
        raise CheckpointError("its config is not a mapping")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"its config has unknown field {unknown[0]!r}")
    missing = [name for name in ARCHITECTURE_FIELDS + ("dtype",) if name not in saved]
    if missing:
        raise CheckpointError(f"its config has no {missing[0]!r}")
    config = TrainConfig(**saved)            # fields added to npgpt since it was saved take their defaults
    problems = config_problems(config)
    if problems:
        raise CheckpointError(f"its config is invalid: {problems[0]}")
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
    except (TokenizerError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"its tokenizer does not load ({exc})") from None
    if tokenizer.kind != config.tokenizer:
        raise CheckpointError(f"its tokenizer is {tokenizer.kind!r} but its config says {config.tokenizer!r}")
    expected_model = config.model_kwargs(tokenizer.vocab_size)
    model_config = meta["model_config"]
    if not isinstance(model_config, dict):
        raise CheckpointError("its model_config is not a mapping")
    wrong = sorted(k for k in expected_model if model_config.get(k) != expected_model[k])
    if wrong:
        raise CheckpointError(f"its model_config disagrees with its config and tokenizer on {wrong[:3]}")
    for key in sorted(set(model_config) - set(expected_model)):
        check = MODEL_OPTIONS.get(key)
        if check is None:
            raise CheckpointError(f"its model_config has unknown field {key!r}")
        if not check(model_config[key]):
            raise CheckpointError(f"its model_config has {key}={model_config[key]!r}")
    expected_model = dict(model_config)
    too_big = memory_problem(config, tokenizer.vocab_size, weights_only=True)
    if too_big:
        raise CheckpointError(f"its model cannot be built here: {too_big}")
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"its step is {step!r}, not a non-negative integer")
    best_val = meta.get("best_val", math.inf)
    if isinstance(best_val, bool) or not isinstance(best_val, (int, float)) or not best_val >= 0:
        raise CheckpointError(f"its best_val is {best_val!r}, not a non-negative number")
    rng = meta["rng"]
    if not isinstance(rng, dict) or "data" not in rng or "dropout" not in rng:
        raise CheckpointError("its random-generator states are missing")
    _check_rng_state(rng["data"], "data", allow_none=False)
    _check_rng_state(rng["dropout"], "dropout", allow_none=True)

    # every array, by its header: exactly the parameters and moments this config implies
    dtype = np.dtype(config.dtype)
    shapes = parameter_shapes(**expected_model)
    expected = {f"param.{name}": (shape, dtype) for name, shape in shapes.items()}
    if "adam.step" in headers:
        order = optimizer_order(shapes)
        expected["adam.step"] = ((len(order),), np.dtype(np.int64))
        for i, name in enumerate(order):
            for moment in ("m", "v"):
                if f"adam.{moment}.{i}" in headers:
                    expected[f"adam.{moment}.{i}"] = (shapes[name], dtype)
        lr_groups = meta.get("lr_groups")
        if not (isinstance(lr_groups, list) and len(lr_groups) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                for x in lr_groups)):
            raise CheckpointError(f"its lr_groups is {lr_groups!r}, not two learning rates")
    headers = {k: v for k, v in headers.items() if k != "meta"}
    for name in sorted(set(headers) | set(expected)):
        if name not in headers:
            raise CheckpointError(f"it has no array {name}")
        if name not in expected:
            raise CheckpointError(f"it holds an array {name} that this configuration does not have")
        if headers[name] != expected[name]:
            (shape, kind), (want_shape, want_kind) = headers[name], expected[name]
            raise CheckpointError(f"its {name} is {shape} {kind}, but the config implies {want_shape} {want_kind}")
    return config.to_dict(), tokenizer


def _check_arrays(arrays, meta):
    """Values: finite weights and moments, v >= 0, AdamW step counts in 0..step with both moments present."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = "nan" if np.isnan(a).any() else "inf"
            raise CheckpointError(f"its {name} holds {bad}: the weights are damaged; use best.npz or "
                                  "an earlier run")
    steps = arrays.get("adam.step")
    if steps is not None:
        for i, s in enumerate(steps.tolist()):
            if not 0 <= s <= meta["step"]:
                raise CheckpointError(f"its AdamW step count {i} is {s}, outside 0..{meta['step']}")
            if (s > 0) != (f"adam.m.{i}" in arrays) or (f"adam.m.{i}" in arrays) != (f"adam.v.{i}" in arrays):
                raise CheckpointError(f"its AdamW moments for parameter {i} are missing")
            if f"adam.v.{i}" in arrays and (arrays[f"adam.v.{i}"] < 0).any():
                raise CheckpointError(f"its adam.v.{i} (a mean of squares) has negative entries")


def load_checkpoint(path, advice="delete it, or use the run's other checkpoint (--checkpoint best.npz or "
                                  "ckpt.npz) or another --out-dir"):
    """(arrays, meta) from a checkpoint file, checked whole; CheckpointError with one line for anything wrong,
    ending with `advice` where the file is unusable.

    meta["config"] holds every TrainConfig field (defaults for fields newer than the file).
    """
    out_dir = os.path.dirname(path) or "."
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):      # a run that stopped before its first save
            raise CheckpointError(f"no checkpoint at {path}: {out_dir} holds only the log of a run that saved none; "
                                  f"train one with python -m npgpt.train --out-dir {out_dir} --overwrite")
        raise CheckpointError(f"no checkpoint at {path}; train one first with python -m npgpt.train "
                              f"--out-dir {out_dir}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file; give a checkpoint file (ckpt.npz or best.npz)")
    if not path.endswith(".npz") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint (npgpt's are .npz files); give ckpt.npz or best.npz")
    try:
        headers = read_npz_headers(path)
        if headers.get("meta", ((), None))[1] is None or headers["meta"][0] != () \
                or headers["meta"][1].kind != "U" or headers["meta"][1].itemsize > META_LIMIT:
            raise CheckpointError("its metadata is missing or is not a short JSON string")
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            config, tokenizer = check_meta(meta, headers)
            arrays = {name: archive[name] for name in archive.files if name != "meta"}
        _check_arrays(arrays, meta)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} is unusable: {exc}; {advice}") from None
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, TypeError, RecursionError,
            zipfile.LargeZipFile, NotImplementedError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                              f"{advice}") from None
    meta = dict(meta, config=config)
    return arrays, meta


def read_checkpoint_meta(path):
    """A checkpoint's metadata alone (its JSON member; no array read); CheckpointError where it cannot be read."""
    try:
        headers = read_npz_headers(path)
        if headers.get("meta", ((), None))[1] is None or headers["meta"][1].kind != "U" \
                or headers["meta"][1].itemsize > META_LIMIT:
            raise CheckpointError(f"{path}: its metadata is missing or is not a short JSON string")
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object")
    return meta


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

"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, with a KV cache.

With the cache, each new token runs the model on one position: its keys and values are appended to those of
the earlier positions (``model.KVCache``), so the cost per token is one position's work instead of the whole
context's. The result equals running the whole context every time (``use_cache=False``), which a test checks.
When the context outgrows max_seq_len the window slides: the model is run afresh on the last max_seq_len
tokens, exactly as the no-cache computation does.

``generate_tokens`` yields each new token as soon as it is drawn (for printing a long sample as it grows,
and stopping it with Ctrl-C without losing what came out); ``generate`` collects them into one array.
Settings that cannot sample (a nan temperature, top_k < 1, float16 weights) raise ValueError before any
work, and non-finite logits (damaged weights) raise ValueError rather than yield garbage.

Shapes: prompt ids (B, T) -> logits (B, T, V); the KV cache holds (B, H, max_seq_len, D) per block.

The textbook ends here. Next: ``npgpt/fast/__init__.py`` (the fast paths) or ``npgpt/program/train.py``
(the training program, which uses all of it).
"""

import math

import numpy as np

from . import backend
from .engine import no_grad


def check_sampling(temperature, top_k=None, top_p=None):
    """ValueError unless temperature >= 0 (finite), top_k >= 1 and top_p in (0, 1] (None: no filter)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None: no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None: no nucleus filter), got {top_p!r}")


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Probabilities (B, V) float64 from last-position logits (B, V) after temperature, top-k and top-p."""
    check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]          # the k-th largest logit per row
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and 0.0 < top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")           # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs     # mass strictly before each token
        drop_sorted = before >= top_p                                 # keep the smallest set reaching top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Next ids (B,) from last-position logits (B, V); temperature 0 means greedy (argmax)."""
    logits = backend.to_numpy(logits)
    if not np.isfinite(logits).all():
        raise ValueError("the model's logits are not finite (nan or inf): its weights are damaged")
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = filter_logits(logits, temperature, top_k, top_p)
    # inverse-CDF sampling: one uniform number per row, reproducible from the generator's seed
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


SAMPLING_DTYPES = (np.float32, np.float64)


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rng=None,
                    use_cache=True):
    """Yield the next ids (B,) one step at a time, max_new_tokens times; prompt_ids (T,) or (B, T) integers.

    Everything is checked before the first step. The model stays in eval mode until the generator ends or is
    closed (``close()``, or leaving a for loop by an exception), then returns to its earlier mode.
    """
    rng = rng if rng is not None else np.random.default_rng()
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    dtype = model.parameters()[0].dtype
    if dtype not in SAMPLING_DTYPES:
        raise ValueError(f"generate: the model's weights are {np.dtype(dtype).name}; sampling runs in float32 "
                         "or float64 only (float16 overflows in attention and GELU): model.to(np.float32)")
    ids = np.atleast_2d(np.asarray(prompt_ids))
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"generate: prompt ids must be integers of shape (T,) or (B, T), got {ids.dtype} "
                         f"{ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"generate: the prompt is empty (shape {ids.shape}); give at least one token")
    if ids.min() < 0 or ids.max() >= model.vocab_size:
        raise ValueError(f"generate: prompt ids must lie in [0, {model.vocab_size}), found "
                         f"{ids.min()}..{ids.max()}")
    return _token_stream(model, ids.astype(np.int64), max_new_tokens, temperature, top_k, top_p, rng, use_cache)


def _token_stream(model, ids, max_new_tokens, temperature, top_k, top_p, rng, use_cache):
    was_training = model.training
    model.eval()
    limit = model.max_seq_len
    cache = None
    try:
        for _ in range(max_new_tokens):
            with no_grad():             # per step: the caller's code between tokens keeps its own grad mode
                if not use_cache:
                    logits = model(ids[:, -limit:])
                elif cache is None or cache.length >= limit:
                    cache = model.new_kv_cache(ids.shape[0])              # (re)fill with the last window
                    logits = model(ids[:, -limit:], kv_cache=cache)
                else:
                    logits = model(ids[:, -1:], kv_cache=cache)           # one new position
            next_ids = sample_next(logits.data[:, -1, :], rng, temperature, top_k, top_p).astype(np.int64)
            ids = np.concatenate([ids, next_ids[:, None]], axis=1)
            yield next_ids
    finally:
        model.train(was_training)


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rng=None,
             use_cache=True):
    """prompt_ids (T,) or (B, T) integers -> (B, T + max_new_tokens) as a NumPy array."""
    ids = np.atleast_2d(np.asarray(prompt_ids))
    steps = generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng, use_cache)
    new = [next_ids[:, None] for next_ids in steps]                     # each (B, 1)
    return np.concatenate([ids.astype(np.int64)] + new, axis=1)

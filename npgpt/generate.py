"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, with a KV cache.

With the cache, each new token runs the model on one position: its keys and values are appended to those of
the earlier positions (``model.KVCache``), so the cost per token is one position's work instead of the whole
context's. The result equals running the whole context every time (``use_cache=False``), which a test checks.
When the context outgrows max_seq_len the window slides: the model is run afresh on the last max_seq_len
tokens, exactly as the no-cache computation does.

Shapes: prompt ids (B, T) -> logits (B, T, V); the KV cache holds (B, H, max_seq_len, D) per block.

Next to read: ``npgpt/tokenizer.py`` and ``npgpt/data.py``, where the token ids come from.
"""

import numpy as np

from . import backend
from .engine import no_grad


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Probabilities (B, V) float64 from last-position logits (B, V) after temperature, top-k and top-p."""
    logits = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
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
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = filter_logits(logits, temperature, top_k, top_p)
    # inverse-CDF sampling: one uniform number per row, reproducible from the generator's seed
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


@no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rng=None,
             use_cache=True):
    """prompt_ids (T,) or (B, T) integers -> (B, T + max_new_tokens) as a NumPy array."""
    rng = rng if rng is not None else np.random.default_rng()
    ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int64))
    if ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty; give at least one token")
    was_training = model.training
    model.eval()
    limit = model.max_seq_len
    cache, logits = None, None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(ids[:, -limit:])
            elif cache is None or cache.length >= limit:
                cache = model.new_kv_cache(ids.shape[0])              # (re)fill with the last window
                logits = model(ids[:, -limit:], kv_cache=cache)
            else:
                logits = model(ids[:, -1:], kv_cache=cache)               # one new position
            next_ids = sample_next(logits.data[:, -1, :], rng, temperature, top_k, top_p)
            ids = np.concatenate([ids, next_ids[:, None].astype(np.int64)], axis=1)
    finally:
        model.train(was_training)
    return ids

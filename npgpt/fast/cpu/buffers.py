"""Large arrays of the CPU fast paths, kept and handed out again once nothing else holds them.

A training step makes the same large arrays every time: the logits and their gradient ((B T, V), 40 MB at the
tutorial's (8, 128)), the weights' gradients, the activations. glibc's malloc gives blocks of this size fresh
pages from the system, and each page then costs a fault on first touch: 40 MB is 10,000 of them, milliseconds
a step. Blocks of a few hundred KB fare no better: malloc maps them afresh, or hands back the top of its heap
to the system and takes it again, step after step (the shakespeare-char model's (768, 128) activations, 384 KB
each, would cost 939 faults a step without this cache, up to a tenth of its time). So the fast paths take
their outputs of MIN_BYTES and up from ``empty()``: an array of the same shape and dtype that this cache made
earlier and that nobody holds any more (its only reference is the cache's own, which Python's reference count
tells exactly) is returned as it is, its old values still in it (the ops overwrite every element); otherwise a
new one is made and remembered.

Only arrays of at least MIN_BYTES are kept, and at most MAX_BYTES of them in all; an array not kept is an
ordinary one. What is kept stays allocated between steps: ``release()`` gives it back (the arrays still in
use stay theirs). This is npgpt's own memory, not a setting of the process's allocator.
"""

import math
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 16       # 64 KB: below it, a step's few small arrays cost no measurable page faults
MAX_BYTES = 1 << 30

_arrays = {}            # (shape, dtype) -> every array of that kind made here and kept, in use or free
_held = {"bytes": 0}    # their bytes in all
_lock = threading.Lock()


def _first_free(arrays, free_count):
    """The index of the first array whose reference count is free_count (-1 if none). The count includes the
    references this loop itself adds (its list's, getrefcount's argument: how many depends on the Python
    version), so free_count is measured by this same loop, below."""
    for index in range(len(arrays)):
        if sys.getrefcount(arrays[index]) == free_count:
            return index
    return -1


# The count of an array that nothing outside this cache holds, as _first_free sees it: measured on an array
# that only a list holds, as the cache's lists hold theirs
_FREE_REFS = next(count for count in range(1, 64) if _first_free([np.empty(0)], count) == 0)


def empty(shape, dtype):
    """An uninitialised array of `shape` and `dtype`, reused from the cache where one is free."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    key = (shape, dtype)
    with _lock:
        kept = _arrays.setdefault(key, [])
        index = _first_free(kept, _FREE_REFS)
        if index >= 0:
            return kept[index]
        if _held["bytes"] + nbytes > MAX_BYTES:
            _drop_free()
        array = np.empty(shape, dtype=dtype)
        if _held["bytes"] + nbytes <= MAX_BYTES:
            _arrays.setdefault(key, []).append(array)
            _held["bytes"] += nbytes
        return array


def empty_like(array):
    return empty(array.shape, array.dtype)


def _drop_free():
    for key in list(_arrays):
        kept = _arrays[key]
        index = _first_free(kept, _FREE_REFS)
        while index >= 0:
            del kept[index]
            index = _first_free(kept, _FREE_REFS)
        if not kept:
            del _arrays[key]
    _held["bytes"] = sum(a.nbytes for kept in _arrays.values() for a in kept)


def release():
    """Forget every free array (the memory goes back to the system); returns the bytes still kept, those of
    arrays in use."""
    with _lock:
        _drop_free()
        return _held["bytes"]


def held_bytes():
    """Bytes of the arrays kept, in use or free."""
    with _lock:
        return _held["bytes"]

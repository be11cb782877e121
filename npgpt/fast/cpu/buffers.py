"""Large arrays of the CPU fast paths, kept and handed out again once nothing else holds them.

A training step makes the same large arrays every time: the logits and their gradient ((B T, V), 40 MB at
the tutorial's (8, 128)), the weights' gradients, the activations. glibc's malloc gives blocks of this size
fresh pages from the system, and each page then costs a fault on first touch: 40 MB is 10,000 of them,
milliseconds a step. So the fast paths take their large outputs from ``empty()``: an
array of the same shape and dtype that this cache made earlier and that nobody holds any more (its only
reference is the cache's own, which Python's reference count tells exactly) is returned as it is, its old
values still in it (the ops overwrite every element); otherwise a new one is made and remembered.

Only arrays of at least MIN_BYTES are kept, and at most MAX_BYTES of them in all; an array not kept is an
ordinary one. What is kept stays allocated between steps: ``release()`` gives it back (the arrays still in
use stay theirs). This is npgpt's own memory, not a setting of the process's allocator.
"""

import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20
MAX_BYTES = 1 << 30

_arrays = []            # every array made here and kept, in use or free
_lock = threading.Lock()
# references to a free array while the scan below looks at it: the list's, the loop's name, getrefcount's own
_FREE_REFS = 3


def empty(shape, dtype):
    """An uninitialised array of `shape` and `dtype`, reused from the cache where one is free."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    with _lock:
        held = 0
        for array in _arrays:
            if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) == _FREE_REFS:
                return array
            held += array.nbytes
        if held + nbytes > MAX_BYTES:
            _drop_free()
            held = sum(a.nbytes for a in _arrays)
        array = np.empty(shape, dtype=dtype)
        if held + nbytes <= MAX_BYTES:
            _arrays.append(array)
        return array


def empty_like(array):
    return empty(array.shape, array.dtype)


def _drop_free():
    _arrays[:] = [a for a in _arrays if sys.getrefcount(a) > _FREE_REFS]


def release():
    """Forget every free array (the memory goes back to the system); returns the bytes still kept, those of
    arrays in use."""
    with _lock:
        _drop_free()
        return sum(a.nbytes for a in _arrays)


def held_bytes():
    """Bytes of the arrays kept, in use or free."""
    with _lock:
        return sum(a.nbytes for a in _arrays)

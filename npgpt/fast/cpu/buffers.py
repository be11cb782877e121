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

Only arrays of at least MIN_BYTES are kept, and the cache holds at most MAX_BYTES of memory; an array not
kept is an ordinary one. What is kept stays allocated between steps: ``release()`` gives it back (the arrays
still in use stay theirs). This is npgpt's own memory, not a setting of the process's allocator.

The kept arrays under OWN_BLOCK_BYTES are cut side by side from blocks of BLOCK_BYTES, each block starting at
a 2 MB boundary. NumPy asks Linux for huge pages on an allocation of 4 MB and up (madvise MADV_HUGEPAGE, its
default), so a block is backed by 2 MB pages where the system grants them (with 4 KB base pages, as on x86-64
and most ARM64 systems, a huge page is 2 MB), and so are the arrays cut from it: a step's activations then
span a few dozen pages instead of thousands, and the processor's page-table cache (the TLB) holds them all.
Without it, each op that reads its operands after other work has passed through the cache also waits on
page-table walks, which in a virtual machine cost several memory reads each. Larger arrays are allocations of
their own, which NumPy asks huge pages for itself. A block is never cut again once it is full or released;
its memory goes back when none of its arrays is kept or held any more, and the cache counts it, whole, until
then.

A block is an ndarray of a subclass of its own, which owns its memory. When NumPy makes a view, it sets the
view's base by walking up the bases from the array viewed, and stops at the first array that owns its memory
or whose own base is of another type than the view. A kept array's base is its block, of another type, so a
view of a kept array (the reshaped outputs the ops return) has the kept array as its base, and the kept
array's reference count still tells whether anything holds it. (A block of the plain ndarray type would make
the block the base of every such view: the kept array would look free while a view of it is in use.)
"""

import math
import sys
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 16       # 64 KB: below it, a step's few small arrays cost no measurable page faults
MAX_BYTES = 1 << 30
BLOCK_BYTES = 16 << 20    # the blocks the smaller kept arrays are cut from
OWN_BLOCK_BYTES = 4 << 20  # from here up, an array is an allocation of its own (NumPy asks 2 MB pages for it)
PAGE_BYTES = 2 << 20      # a block's arrays start at this boundary, the size of a huge page
ALIGN_BYTES = 64          # each array at a cache line's boundary

_arrays = {}            # (shape, dtype, own_memory) -> every array of that kind made here and kept, in use or free
_own = {"bytes": 0}     # the bytes of the kept arrays of their own
_blocks = weakref.WeakValueDictionary()     # id -> every block still alive: one of its arrays kept or held
_block = {"memory": None, "next": 0, "end": 0}     # the block being cut: its next free byte, the end of its part
_lock = threading.Lock()


class _Block(np.ndarray):
    """The bytes a block's arrays are cut from (a subclass of its own: see the module's notes)."""


def _padding_to(address, multiple):
    """Bytes from `address` up to the next multiple of `multiple` (0 where it is one)."""
    return -address % multiple


def _start_in_block(nbytes):
    """Where an array of nbytes would start in the block being cut (at a cache line's boundary), or None
    where it does not fit there."""
    memory = _block["memory"]
    if memory is None:
        return None
    start = _block["next"] + _padding_to(memory.ctypes.data + _block["next"], ALIGN_BYTES)
    return start if start + nbytes <= _block["end"] else None


def _new_bytes(nbytes, own_memory):
    """The memory a new array of nbytes adds to the cache's: its own, none where it fits in the block being
    cut, or a new block."""
    if own_memory or nbytes >= OWN_BLOCK_BYTES:
        return nbytes
    return 0 if _start_in_block(nbytes) is not None else BLOCK_BYTES + PAGE_BYTES


def _new_array(shape, dtype, nbytes, own_memory):
    """A new array for the cache: an allocation of its own from OWN_BLOCK_BYTES up or where asked; else cut
    from the block being cut, or from a new one where it does not fit."""
    if own_memory or nbytes >= OWN_BLOCK_BYTES:
        return np.empty(shape, dtype=dtype)
    start = _start_in_block(nbytes)
    if start is None:
        memory = _Block((BLOCK_BYTES + PAGE_BYTES,), dtype=np.uint8)
        _blocks[id(memory)] = memory
        start = _padding_to(memory.ctypes.data, PAGE_BYTES)            # the first 2 MB boundary in it
        _block.update(memory=memory, end=start + BLOCK_BYTES)
    _block["next"] = start + nbytes
    return np.ndarray(shape, dtype=dtype, buffer=_block["memory"], offset=start)


def _held_bytes():
    """The memory the cache holds: its kept arrays of their own, and its blocks (a few dozen at most) while
    any of their arrays lives."""
    return _own["bytes"] + sum(block.nbytes for block in _blocks.values())


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


def empty(shape, dtype, own_memory=False):
    """An uninitialised array of `shape` and `dtype`, reused from the cache where one is free.

    own_memory: an array that owns its memory (its base None), never one cut from a block. A weight's
    gradient asks for one: the engine takes such an array as the weight's .grad as it is, and copies one
    whose memory another array owns."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    key = (shape, dtype, own_memory)
    with _lock:
        kept = _arrays.setdefault(key, [])
        index = _first_free(kept, _FREE_REFS)
        if index >= 0:
            return kept[index]
        if _held_bytes() + _new_bytes(nbytes, own_memory) > MAX_BYTES:
            _drop_free()
            if _held_bytes() + _new_bytes(nbytes, own_memory) > MAX_BYTES:
                return np.empty(shape, dtype=dtype)
        array = _new_array(shape, dtype, nbytes, own_memory)
        _arrays.setdefault(key, []).append(array)
        if array.base is None:
            _own["bytes"] += nbytes
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
    _own["bytes"] = sum(array.nbytes for kept in _arrays.values() for array in kept if array.base is None)


def release():
    """Forget every free array (the memory goes back to the system, a block's once none of its arrays is in
    use); returns the bytes the cache still holds: arrays in use, and the blocks they lie in."""
    with _lock:
        _drop_free()
        _block.update(memory=None, next=0, end=0)
        return _held_bytes()


def held_bytes():
    """Bytes the cache holds: its kept arrays of their own, in use or free, and its blocks still alive."""
    with _lock:
        return _held_bytes()

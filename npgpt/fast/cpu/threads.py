"""CPU threads: data parallelism inside one process, a persistent pool, and OpenBLAS's thread count.

NumPy releases the GIL inside BLAS calls and inside its loops over large arrays, so two Python threads really
compute at the same time. ``sharded_backward`` splits a batch into one shard per thread; each thread runs
forward and backward on its shard with its own dropout generator and collects its gradients in a dict of its
own (the engine's ``backward(into=...)``); the calling thread then adds the shards' gradients into ``.grad``
in shard order. BLAS runs one thread per worker meanwhile. That keeps every core busy through the elementwise
work (GELU, softmax, LayerNorm, dropout, ...) that NumPy would otherwise run on one core, and spares the many
small attention GEMMs BLAS's thread synchronisation. The result never depends on timing: the shards, their
seeds and the order of the sums are fixed.

Shapes: a batch (B, T) is split into row shards (B / workers, T).

Next to read: ``npgpt/program/train.py``, which uses them.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from ... import backend
from ...engine import accumulate_grad
from . import native

_pool = None
_local = threading.local()      # .worker: True on a pool thread, and while the caller works a chunk itself
_blas = None  # (set_num_threads, get_num_threads) of the loaded OpenBLAS, or () when not found


def usable_cores():
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def default_workers():
    """Threads for the CPU: one per core this process may run on, at most 4 (the GIL limits more)."""
    return min(usable_cores(), 4)


def _openblas_libraries():
    """The OpenBLAS libraries this process has loaded (NumPy's), opened with ctypes."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line and ".so" in line}
    except OSError:
        return []
    libraries = []
    for path in sorted(paths):
        try:
            libraries.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libraries


def _find_blas_controls():
    """openblas_set/get_num_threads of the OpenBLAS that NumPy loaded (any symbol suffix), or ()."""
    global _blas
    if _blas is not None:
        return _blas
    _blas = ()
    for lib in _openblas_libraries():
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_", "_64"):
                try:
                    setter = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                    getter = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                _blas = (setter, getter)
                return _blas
    return _blas


_gemms = {}


def blas_gemm(dtype):
    """(address, int64) of cblas_sgemm (float32) or cblas_dgemm (float64) in the OpenBLAS NumPy loaded, int64
    true where its integers are 64-bit; None where there is none (or its thread count cannot be set, which
    the kernels' products need: BLAS at one thread on each of their threads)."""
    dtype = np.dtype(dtype)
    if dtype not in _gemms:
        _gemms[dtype] = None
        letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}.get(dtype)
        for lib in _openblas_libraries() if letter and can_control_blas() else []:
            for prefix, suffix, int64 in (("scipy_", "64_", True), ("", "64_", True), ("", "_64", True),
                                          ("scipy_", "", False), ("", "", False)):
                try:
                    fn = getattr(lib, f"{prefix}cblas_{letter}gemm{suffix}")
                except AttributeError:
                    continue
                if not int64:       # an unsuffixed name: 64-bit integers only if the build says so
                    config = getattr(lib, f"{prefix}openblas_get_config", None)
                    if config is not None:
                        config.restype = ctypes.c_char_p
                        int64 = b"USE64BITINT" in (config() or b"")
                _gemms[dtype] = (ctypes.cast(fn, ctypes.c_void_p).value, int64)
                return _gemms[dtype]
    return _gemms[dtype]


def can_control_blas():
    return bool(_find_blas_controls())


_blas_scopes = {"active": [], "original": None, "set": None}  # the open blocks, oldest first; the count set
_blas_lock = threading.Lock()


class blas_threads:
    """``with blas_threads(count):`` runs the block with OpenBLAS limited to `count` threads (a no-op where
    OpenBLAS is not found).

    OpenBLAS has one process-wide count, and blocks may open and close on several threads in any order; so
    the open blocks are kept in a list: the count is always the latest open block's, and when the last one
    closes the count from before the first is restored. A block that would set the count already in force
    leaves it be. (A class, not a generator: a small model opens one of these for each of its ~75 products
    a step.)
    """

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        controls = _find_blas_controls()
        if controls:
            setter, getter = controls
            with _blas_lock:
                active = _blas_scopes["active"]
                if not active:
                    _blas_scopes["original"] = _blas_scopes["set"] = getter()
                active.append(self)
                _set_blas_count(setter, self.count)
        return self

    def __exit__(self, *exc):
        controls = _find_blas_controls()
        if controls:
            with _blas_lock:
                active = _blas_scopes["active"]
                del active[next(i for i, block in enumerate(active) if block is self)]
                _set_blas_count(controls[0], active[-1].count if active else _blas_scopes["original"])
        return False


def _set_blas_count(setter, count):
    if _blas_scopes["set"] != count:
        setter(count)
        _blas_scopes["set"] = count


_settings = {"workers": None}      # None until first asked: then default_workers(), or 1 without BLAS control


def workers():
    """The threads npgpt's CPU fast paths share their work among (1: everything on the calling thread).

    The default is one per core, at most 4 (default_workers()), where npgpt can set OpenBLAS's thread count
    (without that, threads of ours and of BLAS would oversubscribe the cores): 1 otherwise."""
    if _settings["workers"] is None:
        _settings["workers"] = default_workers() if can_control_blas() else 1
    return _settings["workers"]


def set_workers(count):
    """Use `count` threads for the CPU fast paths (each op's chunks, the AdamW update, data-parallel shards).
    Returns the previous count. npgpt's own setting: no process-wide state changes."""
    if count < 1:
        raise ValueError(f"set_workers: the thread count must be at least 1, got {count}")
    previous, _settings["workers"] = workers(), int(count)
    return previous


def data_parallel_shards(workers, dtype="float32"):
    """The row shards a training step should run on parallel threads (sharded_backward): one per worker
    thread where the C kernels are not built; with them one, since each op then splits its own work among the
    kernels' thread pool, the matrix products included (and on a small model that ran faster)."""
    return 1 if native.kernels(np.dtype(dtype)) is not None else workers


def on_worker_thread():
    """True on a pool thread (or inside a chunk the calling thread works itself): ops here run serially,
    because a pool thread that waited on the pool could wait for itself."""
    return getattr(_local, "worker", False)


@contextmanager
def as_worker():
    """Mark the calling thread as working a chunk for the length of the block (no nested parallelism)."""
    previous = on_worker_thread()
    _local.worker = True
    try:
        yield
    finally:
        _local.worker = previous


def _mark_worker():
    _local.worker = True


def _get_pool(count):
    """The persistent pool, grown to `count` threads if needed (the smaller one it replaces is shut down)."""
    global _pool
    if _pool is None or _pool._max_workers < count:
        previous = _pool
        _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="npgpt-worker",
                                   initializer=_mark_worker)
        if previous is not None:
            previous.shutdown(wait=True)
    return _pool


def _forget_pool_after_fork():
    """A forked child has none of its parent's threads: it starts a pool of its own when it needs one."""
    global _pool, _blas_lock
    _pool, _blas_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def run_in_parallel(fn, items, count=None):
    """fn(item) for every item, spread over `count` threads (default: workers()), BLAS at one thread meanwhile."""
    count = 1 if on_worker_thread() else count or workers()
    if count <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with blas_threads(1):
        list(_get_pool(count).map(fn, items))


def split_rows(batch, parts):
    """Split arrays of the same leading length into `parts` row blocks: [(a0, b0), (a1, b1), ...]."""
    bounds = np.linspace(0, len(batch[0]), parts + 1).astype(int)
    return [tuple(a[lo:hi] for a in batch) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def sharded_backward(params, shards, loss_of_shard):
    """For each shard on its own thread: loss = loss_of_shard(shard), then backward. The shards' gradients
    are added into each parameter's .grad in shard order; returns the shards' losses (arrays)."""
    seeds = backend.global_rng().integers(0, 2**63 - 1, size=len(shards))

    def work(i):
        with backend.using_rng(backend.default_rng(int(seeds[i]))):
            loss = loss_of_shard(shards[i])
            grads = {}
            loss.backward(into=grads)
            return loss.data, grads

    if on_worker_thread():          # already on a pool thread: the shards one after another, right here
        results = [work(i) for i in range(len(shards))]
    else:
        with blas_threads(1):
            results = list(_get_pool(len(shards)).map(work, range(len(shards))))
    for p in params:
        for _, grads in results:
            if id(p) in grads:
                accumulate_grad(p, grads[id(p)])
    return [loss for loss, _ in results]

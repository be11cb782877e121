"""Intra-op parallelism: one op's rows (or heads, or elements) split over the worker threads.

This is PyTorch's ``parallel_for`` for npgpt's CPU fast paths. An op cuts its work into chunks with fixed
boundaries (a few per worker thread), and the calling thread and ``workers() - 1`` threads of the persistent
pool (``threads.py``) take chunks from a shared queue until none is left; every chunk runs the reference
formulas on its slice. NumPy releases the GIL inside its loops over large arrays, so the chunks really run at
the same time. Taking chunks from a queue, rather than one fixed chunk per thread, keeps a busy core (another
program's) from holding the op up: the threads that run take over the chunks of one that does not.

Rules that keep it exact, deterministic and safe:

- Boundaries depend only on the work's length and the thread count, never on timing, and each chunk's
  result goes to its own place; results that combine chunks (LayerNorm's weight and bias gradients) are
  added in chunk order. So a run is bit for bit the same for a fixed thread count, whichever thread ran
  which chunk.
- No nesting: code running on a pool thread (a data-parallel shard of ``sharded_backward``, or another op's
  chunk) runs every op serially on that thread. A pool thread waiting on the pool could otherwise wait for
  itself.
- Work too small to pay for the hand-off (about 50 microseconds) runs serially: each op passes the smallest
  chunk worth a thread (``min_size``).
- Nothing process-wide changes except inside a scoped, restored region: ops whose chunks call BLAS run with
  OpenBLAS's threads shared out among the chunks for the length of the region (``threads.blas_threads``;
  one each on a machine with as many cores as workers), so the two never oversubscribe the cores.

Next to read: ``ops.py``, whose fast paths use it.
"""

from collections import deque

import numpy as np

from ... import backend
from . import threads

CHUNKS_PER_WORKER = 4       # chunks a worker thread's share is cut into, so that the others can take some


def chunk_count(size, min_size, per_worker=None):
    """How many chunks `size` units of work are cut into: `per_worker` (default CHUNKS_PER_WORKER) for each
    worker thread, fewer if a chunk would be smaller than `min_size` units, and more chunks than workers only
    in a multiple of the workers (3 equal chunks on 2 workers take as long as 4: one does two while the other
    does one); 1 with one worker, or on a pool thread (no nesting)."""
    count = threads.workers()
    if count == 1 or threads.on_worker_thread():
        return 1
    per_worker = CHUNKS_PER_WORKER if per_worker is None else per_worker
    fitting = size // max(1, min_size)
    if fitting >= count * per_worker:
        return count * per_worker
    return max(1, fitting // count * count if fitting > count else fitting)


def chunk_bounds(size, parts):
    """[(lo, hi), ...]: `parts` contiguous ranges covering 0..size, as equal as whole units allow."""
    edges = [size * i // parts for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def run_chunks(body, bounds, blas_each=None):
    """[body(lo, hi) for each (lo, hi) in bounds], on the calling thread and the pool's; returns the results
    in chunk order. blas_each: OpenBLAS at that many threads meanwhile (restored after), even for a single
    chunk (attention passes 1: its many small products run faster on one BLAS thread anyway)."""
    if blas_each is None and len(bounds) == 1:
        return [body(*bounds[0])]
    if blas_each is not None and not threads.on_worker_thread():
        with threads.blas_threads(blas_each):
            return _run_chunks(body, bounds)
    return _run_chunks(body, bounds)


def _run_chunks(body, bounds):
    if len(bounds) == 1:
        return [body(*bounds[0])]
    results, errors = [None] * len(bounds), [None] * len(bounds)
    queue = deque(range(len(bounds)))           # chunk indices; popleft() is atomic, so each is taken once

    def take_chunks():
        while True:
            try:
                i = queue.popleft()
            except IndexError:
                return
            try:
                results[i] = body(*bounds[i])
            except BaseException as error:      # raised on the calling thread, once every chunk is done
                errors[i] = error

    helpers = min(threads.workers(), len(bounds)) - 1
    pool = threads._get_pool(helpers)
    futures = [pool.submit(take_chunks) for _ in range(helpers)]
    with threads.as_worker():       # an op called inside a chunk runs serially, as on the pool's threads
        take_chunks()
    for future in futures:          # a helper that never started has nothing to do; one that did may still
        if not future.cancel():     # be working its last chunk, which must be done before we return
            future.result()
    for error in errors:
        if error is not None:
            raise error
    return results


def parallel_for(size, body, min_size=1, blas_each=None, per_worker=None):
    """Cut range(size) into chunk_count(size, min_size, per_worker) chunks and run body(lo, hi) on each at
    once; returns the results in chunk order."""
    return run_chunks(body, chunk_bounds(size, chunk_count(size, min_size, per_worker)), blas_each)


def chunk_generators(generator, parts):
    """One NumPy generator per chunk, seeded from `parts` seeds drawn once from `generator` (the global one
    if None), so every chunk's random numbers are fixed for a fixed thread count."""
    rng = generator if generator is not None else backend.global_rng()
    seeds = rng.integers(0, 2**63 - 1, size=parts)
    return [np.random.default_rng(int(s)) for s in seeds]

"""Intra-op parallelism: one op's rows (or heads, or elements) split over the worker threads.

This is PyTorch's ``parallel_for`` for npgpt's CPU fast paths. An op cuts its work into ``workers()`` chunks
with fixed boundaries, hands all but the first to the persistent pool (``threads.py``) and works the first
on the calling thread; every chunk runs the reference formulas on its slice. NumPy releases the GIL inside
its loops over large arrays, so the chunks really run at the same time.

Rules that keep it exact, deterministic and safe:

- Boundaries depend only on the work's length and the thread count, never on timing; results that combine
  chunks (LayerNorm's weight and bias gradients) are added in chunk order. So a run is bit for bit the same
  for a fixed thread count.
- No nesting: code running on a pool thread (a data-parallel shard of ``sharded_backward``, or another op's
  chunk) runs every op serially on that thread. A pool thread waiting on the pool could otherwise wait for
  itself.
- Work too small to pay for the hand-off (about 30-60 microseconds a chunk) runs serially: each op passes
  the smallest chunk worth a thread (``min_size``).
- Nothing process-wide changes except inside a scoped, restored region: ops whose chunks call BLAS run with
  OpenBLAS at one thread for the length of the region (``threads.blas_threads``), so the two never
  oversubscribe the cores.

Next to read: ``ops.py``, whose fast paths use it.
"""

import numpy as np

from ... import backend
from . import threads


def chunk_count(size, min_size):
    """How many chunks `size` units of work are cut into: workers(), fewer if a chunk would be smaller than
    `min_size` units, and 1 on a pool thread (no nesting)."""
    if threads.on_worker_thread():
        return 1
    return max(1, min(threads.workers(), size // max(1, min_size)))


def chunk_bounds(size, parts):
    """[(lo, hi), ...]: `parts` contiguous ranges covering 0..size, as equal as whole units allow."""
    edges = [size * i // parts for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def run_chunks(body, bounds, single_blas=False):
    """[body(lo, hi) for each (lo, hi) in bounds], the first on the calling thread, the others on the pool;
    returns the results in chunk order. single_blas: OpenBLAS at one thread meanwhile (restored after),
    even for a single chunk: the many small products of attention run faster on one BLAS thread anyway."""
    if single_blas and not threads.on_worker_thread():
        with threads.blas_threads(1):
            return _run_chunks(body, bounds)
    return _run_chunks(body, bounds)


def _run_chunks(body, bounds):
    if len(bounds) == 1:
        return [body(*bounds[0])]
    pool = threads._get_pool(len(bounds))
    futures = [pool.submit(body, lo, hi) for lo, hi in bounds[1:]]
    try:
        with threads.as_worker():       # an op called by the first chunk runs serially, like the others
            first = body(*bounds[0])
    finally:
        # every chunk has finished before the arrays it writes into are used (or an error is raised)
        rest = [f.exception() for f in futures]
    for future, error in zip(futures, rest):
        if error is not None:
            raise error
    return [first] + [f.result() for f in futures]


def parallel_for(size, body, min_size=1, single_blas=False):
    """Cut range(size) into chunk_count(size, min_size) chunks and run body(lo, hi) on each at once;
    returns the results in chunk order."""
    return run_chunks(body, chunk_bounds(size, chunk_count(size, min_size)), single_blas)


def chunk_generators(generator, parts):
    """One NumPy generator per chunk, seeded from `parts` seeds drawn once from `generator` (the global one
    if None), so every chunk's random numbers are fixed for a fixed thread count."""
    rng = generator if generator is not None else backend.global_rng()
    seeds = rng.integers(0, 2**63 - 1, size=parts)
    return [np.random.default_rng(int(s)) for s in seeds]

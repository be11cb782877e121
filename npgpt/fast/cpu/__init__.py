"""CPU fast paths: cache-blocked and multi-threaded versions of some textbook ops (``ops.py``), the worker
threads (``threads.py``), and the allocator setting the training program opts into (``allocator.py``)."""

from . import ops


def register():
    ops.register()

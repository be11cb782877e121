"""CPU fast paths: the C kernels and the ops on them (``kernels.c``, ``native.py``, ``native_ops.py``), the
model's attention and feed-forward layers as one op each on the same kernels (``layers.py``), cache-blocked
and multi-threaded NumPy versions of the textbook ops for where the kernels cannot be built (``ops.py``), the
worker threads (``threads.py``, ``parallel.py``), and the allocator setting the training program opts into
(``allocator.py``)."""

from . import layers, native_ops, ops


def register():
    ops.register()
    native_ops.register()       # registered later: asked first
    layers.register()           # whole layers of the model (their ops' paths run where these do not apply)

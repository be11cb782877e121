"""What may happen while a CUDA graph records (graph.py): nothing that waits for the device or copies from
the host. ``capturing()`` tells the code that would; ``copy_into`` is the host-to-device copy that can wait
in the stream's order instead."""

import numpy as np

from ... import backend


def capturing():
    """True while this thread's current GPU stream is being recorded into a CUDA graph: then nothing may wait
    for the device or copy from the host, so checks that read device values skip."""
    cp = backend.module_for("gpu")
    return cp.cuda.get_current_stream().is_capturing()


def copy_into(target, source):
    """target[...] = source, a host array, as an asynchronous copy in the current stream's order."""
    cp = backend.module_for("gpu")
    target.set(np.ascontiguousarray(source, dtype=target.dtype), stream=cp.cuda.get_current_stream())

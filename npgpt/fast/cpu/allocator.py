"""The allocator setting the training program opts into: freed memory kept in the process for reuse.

glibc returns large freed blocks to the system at once (they were mmapped) and trims the heap's top, so the
large temporaries of one training step are mapped afresh in the next: a 160 MB array of logits is 40,000
page faults every time. ``keep_freed_memory()`` makes every block come from the heap and keeps freed ones
there. It changes the whole process (glibc has no way to read the old settings back), so npgpt never calls
it on import or inside an op: ``python -m npgpt.train`` calls it once, and a program of your own may too.
"""

import ctypes

def keep_freed_memory():
    """Keep freed memory for reuse: no unmapping of large blocks, no trimming of the heap (glibc only).
    Returns True where it took effect. Process-wide and not undone: call it from a program, not a library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = libc.mallopt(M_MMAP_MAX, 0)                     # every block comes from the heap, even 160 MB logits,
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)        # and freed ones stay there for the next step
    ok &= libc.mallopt(M_TOP_PAD, 64 << 20)
    return bool(ok)

"""The fast paths: faster implementations of the textbook's ops, registered beside them.

Each op of the textbook (``npgpt/functional.py``, ``engine.py``, ``optim.py``, and two layers of
``model.py``) has one reference body. The
modules here register faster bodies for some of them with the dispatcher in ``engine.py``, each for a device,
dtypes and a rule on the arguments; the reference op asks the dispatcher, which runs the first fast path that
applies, else the reference.

    cpu/    the C kernels and their thread pool, the model's attention and feed-forward layers as one op
            each, cache-blocked NumPy versions where no C compiler is found, OpenBLAS's thread count, the
            allocator setting programs opt into
    cuda/   CUDA kernels (the .cu files in cuda/kernels/), cuBLAS and GEMM tuning, the CUDA-graph step

Switches:

    NPGPT_FAST=0, or npgpt.fast.disable()     every op runs its reference body (the textbook alone)
    npgpt.fast.enable()                       fast paths on again (the default)
    NPGPT_FAST_CUDA=1, or npgpt.fast.enable_cuda()
                                              also the CUDA fast paths: off by default, because in their
                                              present form they have not run on a GPU (see README.md)
"""

import os

from .. import engine
from . import cpu

_cuda = {"registered": False}


def enable():
    """Run the fast paths where they apply (the default, unless NPGPT_FAST=0)."""
    engine.set_fast_paths_enabled(True)


def disable():
    """Run every op on its reference path."""
    engine.set_fast_paths_enabled(False)


def enabled():
    return engine.fast_paths_enabled()


def enable_cuda():
    """Register the CUDA fast paths (kernels, cuBLAS products, the graph-recordable AdamW)."""
    if not _cuda["registered"]:
        from . import cuda
        cuda.register()
        _cuda["registered"] = True


def cuda_enabled():
    """True when the CUDA fast paths are registered and fast paths are on."""
    return _cuda["registered"] and enabled()


cpu.register()
if os.environ.get("NPGPT_FAST_CUDA") == "1":
    enable_cuda()

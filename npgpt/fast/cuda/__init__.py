"""CUDA fast paths: kernels (``kernels.py``, CUDA C in ``kernels/*.cu``), cuBLAS products (``cublas.py``,
``gemm_tuning.py``), the ops built on them (``ops.py``) and the training step as a CUDA graph (``graph.py``).
Importing this needs no GPU: CuPy is reached through npgpt.backend on first use."""

from . import ops


def register():
    ops.register()

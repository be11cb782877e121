"""Hypothesis strategies for shapes and values, and helpers that build float64 test tensors."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npgpt
from npgpt import backend

# Small shapes keep finite differences cheap: up to 3 dims of up to 4 elements (size-1 dims included)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
nonscalar_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
# Pairs of shapes that broadcast against each other (batch dims, size-1 dims, missing leading dims)
broadcast_pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def rand(shape, seed, low=None, high=None, requires_grad=True, dtype=np.float64):
    """A tensor on the current device: N(0, 1) values, or U(low, high) when bounds are given."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) if low is None else rng.uniform(low, high, size=shape)
    data = backend.current().asarray(np.asarray(values, dtype=dtype))
    return npgpt.Tensor(data, requires_grad=requires_grad)

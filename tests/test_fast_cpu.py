"""Every CPU fast path equals its reference in npgpt/functional.py and optim.py: values and gradients, on one
thread and split over several (intra-op parallelism), deterministic for a fixed thread count."""

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import engine, optim
from npgpt.fast.cpu import ops as cpu_ops
from npgpt.fast.cpu import native, parallel, threads


@pytest.fixture(autouse=True)
def numpy_fast_paths():
    """These tests are of the NumPy fast paths (ops.py): the C kernels, asked first where they are built,
    are turned off here (tests/test_fast_native.py tests them)."""
    previous = native.set_enabled(False)
    yield
    native.set_enabled(previous)


def leaf(rng, *shape, dtype=np.float64):
    return npgpt.Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)


def values_and_grads(fn, inputs, cotangent):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * cotangent) with respect to every input."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out * npgpt.Tensor(cotangent)).sum().backward()
    return [out.data.copy()] + [t.grad.copy() for t in inputs]


def assert_same(fast, reference, rtol=1e-12, atol=1e-12):
    assert len(fast) == len(reference)
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def test_the_dispatcher_picks_the_cpu_fast_paths(fast_paths_on):
    x = np.zeros((2, 3, 8, 4))
    assert engine.fast_path_for("scaled_dot_product_attention", (x, x, x), {}) is cpu_ops.scaled_dot_product_attention
    assert engine.fast_path_for("cross_entropy", (np.zeros((4, 5)), np.zeros(4, int)), {}) is cpu_ops.cross_entropy
    previous = engine.set_fast_paths_enabled(False)       # what NPGPT_FAST=0 and npgpt.fast.disable() do
    try:
        assert engine.fast_path_for("cross_entropy", (np.zeros((4, 5)), np.zeros(4, int)), {}) is None
    finally:
        engine.set_fast_paths_enabled(previous)
    float16 = np.zeros((2, 3), np.float16)
    with pytest.raises(TypeError, match="float16 is not supported"):
        F.gelu(float16)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_blocked_cross_entropy_equals_the_reference(reduction, monkeypatch):
    monkeypatch.setattr(cpu_ops, "CACHE_BLOCK_BYTES", 64 * 8 * 3)   # 3 rows a block: several blocks, a ragged end
    rng = np.random.default_rng(0)
    logits = leaf(rng, 11, 64)
    target = rng.integers(0, 64, 11)
    target[[2, 7]] = -100                                           # ignored rows
    cot = rng.standard_normal(11) if reduction == "none" else np.array(1.7)
    fast = values_and_grads(lambda z: cpu_ops.cross_entropy(z, target, reduction=reduction), [logits], cot)
    reference = values_and_grads(lambda z: F.cross_entropy.reference(z, target, reduction=reduction), [logits], cot)
    assert_same(fast, reference)
    # (N, C, d) logits take the same path
    logits3 = leaf(rng, 2, 5, 3)
    target3 = rng.integers(0, 5, (2, 3))
    assert_same(values_and_grads(lambda z: cpu_ops.cross_entropy(z, target3), [logits3], np.array(1.0)),
                values_and_grads(lambda z: F.cross_entropy.reference(z, target3), [logits3], np.array(1.0)))


def test_16_bit_dropout_keeps_its_masks_and_mean():
    rng = np.random.default_rng(1)
    x = leaf(rng, 300, 400)
    previous = threads.set_workers(1)                          # one chunk: the mask from the generator itself
    try:
        out = cpu_ops.dropout(x, 0.3, generator=np.random.default_rng(7))
    finally:
        threads.set_workers(previous)
    draws = np.random.default_rng(7).integers(0, 65536, size=x.shape, dtype=np.uint16)  # the same random draw
    keep = draws >= round(0.3 * 65536)
    scale = 65536 / (65536 - round(0.3 * 65536))
    np.testing.assert_array_equal(out.data, x.data * keep * scale)
    out.backward(np.ones(x.shape))
    np.testing.assert_array_equal(x.grad, keep * scale)
    assert abs(keep.mean() - 0.7) < 0.005
    assert abs(keep.mean() * scale - 1.0) < 0.01               # inverted dropout keeps the mean


@pytest.mark.parametrize("length", [6, 127, 128, 300])
@pytest.mark.parametrize("masked", ["causal", "bool", "float", "none"])
def test_cpu_attention_equals_the_reference(length, masked):
    """Short sequences: the softmax in place on the scores; causal ones from 128 on: block by block."""
    rng = np.random.default_rng(length)
    q, k, v = (leaf(rng, 2, 3, length, 8) for _ in range(3))
    cot = rng.standard_normal((2, 3, length, 8))
    kwargs = {"causal": dict(is_causal=True), "none": {},
              "bool": dict(attn_mask=(rng.random((length, length)) > 0.3) | np.eye(length, dtype=bool)),
              "float": dict(attn_mask=rng.standard_normal((length, length)))}[masked]
    fast = values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, scale=0.7, **kwargs),
                            [q, k, v], cot)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, scale=0.7,
                                                                                         **kwargs), [q, k, v], cot)
    assert_same(fast, reference, rtol=1e-10)


def test_blocked_attention_with_dropout_passes_gradcheck():
    rng = np.random.default_rng(3)
    q, k, v = (leaf(rng, 1, 1, 130, 4) for _ in range(3))
    npgpt.gradcheck(lambda a, b, c: cpu_ops.scaled_dot_product_attention(
        a, b, c, is_causal=True, dropout_p=0.2, generator=np.random.default_rng(3)), [q, k, v], max_probes=40)


def test_the_causal_mask_cache_is_bounded():
    cache = cpu_ops.MaskCache(max_bytes=8 * 2**20)
    for length in range(1, 1025):                      # generation with a growing context: 1..1024, float32
        cache.get(length, length, 0, np.dtype(np.float32))
    assert cache.bytes <= 8 * 2**20
    assert cache.bytes == sum(m.nbytes for m in cache.masks.values())
    mask = cache.get(3, 5, 1, np.dtype(np.float64))
    np.testing.assert_array_equal(mask, [[0, 0, -np.inf, -np.inf, -np.inf], [0, 0, 0, -np.inf, -np.inf],
                                         [0, 0, 0, 0, -np.inf]])
    assert cpu_ops.causal_masks.max_bytes <= 16 * 2**20


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_adamw_equals_the_reference_update(workers, monkeypatch, fast_paths_on):
    monkeypatch.setattr(cpu_ops, "ADAMW_PIECE", 1000)                # pieces of every parameter
    rng = np.random.default_rng(4)
    shapes = [(50, 70), (70,), (3, 4, 5)]
    params = {name: [npgpt.nn.Parameter(rng.standard_normal(s)) for s in shapes] for name in ("fast", "ref")}
    for a, b in zip(params["fast"], params["ref"]):
        b.data[...] = a.data
    previous = threads.set_workers(workers)
    try:
        opts = {name: optim.AdamW(ps, lr=0.01, weight_decay=0.1) for name, ps in params.items()}
        for step in range(3):
            grads = [rng.standard_normal(s) for s in shapes]
            for name in ("fast", "ref"):
                for p, g in zip(params[name], grads):
                    p.grad = g.copy()
            opts["fast"].step()
            with_fast = engine.set_fast_paths_enabled(False)
            opts["ref"].step()
            engine.set_fast_paths_enabled(with_fast)
    finally:
        threads.set_workers(previous)
    for a, b in zip(params["fast"], params["ref"]):
        np.testing.assert_array_equal(a.data, b.data)       # elementwise: the same operations, bit for bit


# ---------------------------------------------------------------------------------------------------------
# Intra-op parallelism: each op's chunks on the worker threads give the reference's numbers


@pytest.fixture(params=[1, 2, 3])
def workers(request, monkeypatch):
    """Run the test at 1, 2 and 3 worker threads, with chunks and cache blocks small enough that the test's
    small arrays are split into several of each (and ragged: the sizes below divide by neither 2 nor 3)."""
    monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_ELEMENTS", 8)
    monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_SCORES", 8)
    monkeypatch.setattr(cpu_ops, "LAYER_NORM_MIN_ELEMENTS", 8)
    monkeypatch.setattr(cpu_ops, "DROPOUT_MIN_ELEMENTS", 32)
    monkeypatch.setattr(cpu_ops, "ELEMENTWISE_BLOCK_BYTES", 8 * 10)     # 10 float64 / 20 float32 a block
    monkeypatch.setattr(cpu_ops, "LAYER_NORM_BLOCK_BYTES", 8 * 12 * 2)  # 2 rows of 12 float64 a block
    previous = threads.set_workers(request.param)
    yield request.param
    threads.set_workers(previous)


def tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)


def test_chunk_bounds_are_fixed_and_cover_the_rows():
    assert parallel.chunk_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert parallel.chunk_bounds(5, 1) == [(0, 5)]
    previous = threads.set_workers(3)
    try:
        assert parallel.chunk_count(1000, 10) == 3 * parallel.CHUNKS_PER_WORKER
        assert parallel.chunk_count(25, 10) == 2              # chunks below the minimum size: fewer of them
        assert parallel.chunk_count(9, 10) == 1
        assert parallel.chunk_count(50, 10) == 3              # 5 would fit: a multiple of the workers, 3
        assert parallel.chunk_count(80, 10) == 6
        threads.set_workers(2)
        assert parallel.chunk_count(30, 10) == 2              # not 3: one worker would do two, the other one
        threads.set_workers(1)
        assert parallel.chunk_count(1000, 10) == 1
    finally:
        threads.set_workers(previous)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_parallel_gelu_equals_the_reference(workers, dtype, approximate):
    rng = np.random.default_rng(10)
    x = leaf(rng, 7, 13, dtype=dtype)
    x.data *= 3                                                # both erf branches and the far tail
    cot = rng.standard_normal((7, 13)).astype(dtype)
    fast = values_and_grads(lambda a: cpu_ops.gelu(a, approximate), [x], cot)
    reference = values_and_grads(lambda a: F.gelu.reference(a, approximate), [x], cot)
    assert fast[0].dtype == dtype and fast[1].dtype == dtype
    assert_same(fast, reference, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("affine", [True, False])
def test_parallel_layer_norm_equals_the_reference(workers, dtype, affine):
    rng = np.random.default_rng(11)
    x = leaf(rng, 5, 7, 12, dtype=dtype)                       # 35 rows of 12
    params = [leaf(rng, 12, dtype=dtype), leaf(rng, 12, dtype=dtype)] if affine else []
    cot = rng.standard_normal((5, 7, 12)).astype(dtype)

    def run(layer_norm):
        return values_and_grads(lambda a, *wb: layer_norm(a, (12,), *wb, eps=1e-5), [x] + params, cot)
    fast = run(cpu_ops.layer_norm)
    assert all(g.shape == (12,) for g in fast[2:])              # weight and bias gradients arrive summed
    assert_same(fast, run(F.layer_norm.reference), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parallel_cross_entropy_equals_the_reference(workers, dtype, monkeypatch):
    monkeypatch.setattr(cpu_ops, "CACHE_BLOCK_BYTES", 16 * 8 * 2)     # 2 rows a block
    rng = np.random.default_rng(12)
    logits = leaf(rng, 23, 16, dtype=dtype)
    target = rng.integers(0, 16, 23)
    target[[3, 20]] = -100
    fast = values_and_grads(lambda z: cpu_ops.cross_entropy(z, target), [logits], np.array(1.3, dtype))
    reference = values_and_grads(lambda z: F.cross_entropy.reference(z, target), [logits], np.array(1.3, dtype))
    assert_same(fast, reference, **tolerance(dtype))


def test_parallel_dropout_draws_each_chunk_from_its_own_seed(workers):
    rng = np.random.default_rng(13)
    x = leaf(rng, 9, 11, dtype=np.float32)                     # 99 elements
    out = cpu_ops.dropout(x, 0.25, generator=np.random.default_rng(5))
    out.backward(np.full(x.shape, 2.0, np.float32))
    # the expected mask, drawn here as the op is documented to: one chunk from the generator itself, or
    # one seed per chunk drawn once from it, each chunk's 16-bit integers from its own seed
    generator = np.random.default_rng(5)
    parts = {1: 1, 2: 2, 3: 3}[workers]                       # chunks of at least 32, a multiple of the workers
    assert parallel.chunk_count(99, cpu_ops.DROPOUT_MIN_ELEMENTS) == parts
    bounds = parallel.chunk_bounds(99, parts)
    if workers == 1:
        draws = generator.integers(0, 65536, size=99, dtype=np.uint16)
    else:
        seeds = generator.integers(0, 2**63 - 1, size=parts)
        draws = np.concatenate([np.random.default_rng(int(s)).integers(0, 65536, size=hi - lo, dtype=np.uint16)
                                for s, (lo, hi) in zip(seeds, bounds)])
    keep = (draws >= round(0.25 * 65536)).reshape(x.shape)
    scale = np.float32(65536 / (65536 - round(0.25 * 65536)))
    np.testing.assert_array_equal(out.data, x.data * keep * scale)
    np.testing.assert_array_equal(x.grad, 2 * keep * scale)
    again = cpu_ops.dropout(x, 0.25, generator=np.random.default_rng(5))
    np.testing.assert_array_equal(again.data, out.data)       # deterministic for a fixed thread count


@pytest.mark.parametrize("length", [6, 130])
@pytest.mark.parametrize("masked", ["causal", "bool", "float", "none"])
def test_parallel_attention_equals_the_reference(workers, length, masked):
    """The (B, H) heads split among the threads; from 128 on the causal path goes block by block."""
    rng = np.random.default_rng(14)
    q, k, v = (leaf(rng, 5, 3, length, 4) for _ in range(3))    # 5 x 3 heads: ragged chunks
    cot = rng.standard_normal((5, 3, length, 4))
    kwargs = {"causal": dict(is_causal=True), "none": {},
              "bool": dict(attn_mask=(rng.random((length, length)) > 0.3) | np.eye(length, dtype=bool)),
              "float": dict(attn_mask=rng.standard_normal((length, length)))}[masked]
    fast = values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, **kwargs), [q, k, v],
                            cot)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, **kwargs),
                                 [q, k, v], cot)
    assert_same(fast, reference, rtol=1e-10)


def test_parallel_attention_splits_the_heads_when_the_batch_is_one(workers):
    rng = np.random.default_rng(15)
    q, k, v = (leaf(rng, 1, 5, 9, 4, dtype=np.float32) for _ in range(3))
    axis, bounds = cpu_ops.head_chunks(q.data, k.data, v.data, None)
    # the 5 heads as chunks of whole heads, as many as the workers share evenly
    assert (axis, len(bounds)) == ((1, {2: 4, 3: 3}[workers]) if workers > 1 else (0, 1))
    cot = rng.standard_normal((1, 5, 9, 4)).astype(np.float32)
    fast = values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, is_causal=True),
                            [q, k, v], cot)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, is_causal=True),
                                 [q, k, v], cot)
    assert_same(fast, reference, rtol=2e-5, atol=2e-6)


def test_parallel_attention_with_dropout_is_deterministic_and_passes_gradcheck(workers):
    rng = np.random.default_rng(16)
    q, k, v = (leaf(rng, 3, 2, 130, 4) for _ in range(3))
    cot = rng.standard_normal((3, 2, 130, 4))

    def attention(a, b, c):
        return cpu_ops.scaled_dot_product_attention(a, b, c, is_causal=True, dropout_p=0.2,
                                                    generator=np.random.default_rng(3))
    first, second = (values_and_grads(attention, [q, k, v], cot) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    small = [leaf(rng, 3, 1, 20, 4) for _ in range(3)]
    npgpt.gradcheck(lambda a, b, c: cpu_ops.scaled_dot_product_attention(
        a, b, c, is_causal=True, dropout_p=0.2, generator=np.random.default_rng(3)), small, max_probes=30)


def test_a_call_from_a_pool_thread_runs_serially_and_equals_the_reference(monkeypatch):
    """The data-parallel shards run ops on the pool's threads: there every op works alone (a pool thread
    waiting on the pool could wait for itself), and gives the same numbers."""
    monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_ELEMENTS", 8)
    monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_SCORES", 8)
    chunks_seen = []
    real_run_chunks = parallel.run_chunks
    monkeypatch.setattr(parallel, "run_chunks",
                        lambda body, bounds, blas_each=None: (chunks_seen.append(len(bounds)),
                                                              real_run_chunks(body, bounds, blas_each))[1])
    rng = np.random.default_rng(17)
    arrays = {"x": rng.standard_normal((6, 9, 16)), "W": rng.standard_normal((16, 16)),
              "q": rng.standard_normal((4, 2, 10, 4)), "k": rng.standard_normal((4, 2, 10, 4)),
              "v": rng.standard_normal((4, 2, 10, 4))}
    cot = rng.standard_normal((4, 2, 10, 4))

    def run(gelu, layer_norm, linear, attention):
        """Both computations on leaves of their own (each thread accumulates into its own .grad)."""
        t = {name: npgpt.Tensor(a.copy(), requires_grad=True) for name, a in arrays.items()}
        return (values_and_grads(lambda a, w: linear(layer_norm(gelu(a), (16,)), w), [t["x"], t["W"]],
                                 np.ones((6, 9, 16))),
                values_and_grads(lambda a, b, c: attention(a, b, c, is_causal=True),
                                 [t["q"], t["k"], t["v"]], cot))

    def work():
        assert threads.on_worker_thread() and parallel.chunk_count(10**6, 1) == 1
        return run(cpu_ops.gelu, cpu_ops.layer_norm, F.linear, cpu_ops.scaled_dot_product_attention)
    previous = threads.set_workers(2)
    try:
        pool = threads._get_pool(2)
        futures = [pool.submit(work) for _ in range(2)]         # both pool threads busy: nesting would hang
        results = [f.result(timeout=60) for f in futures]
    except FutureTimeout:
        pytest.fail("an op called on a pool thread waited on the pool")
    finally:
        threads.set_workers(previous)
    assert chunks_seen and set(chunks_seen) == {1}
    layers_reference, attention_reference = run(F.gelu.reference, F.layer_norm.reference, F.linear.reference,
                                                F.scaled_dot_product_attention.reference)
    for layers, attention in results:
        assert_same(layers, layers_reference)
        assert_same(attention, attention_reference, rtol=1e-10)
    assert not threads.on_worker_thread()                      # the calling thread is not marked


def five_line_steps(dtype, dropout, steps=2):
    """The README's loop on a small GPT: (loss, gradients) of each step."""
    npgpt.manual_seed(0)
    model = npgpt.GPT(vocab_size=40, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_seq_len=16,
                      dropout=dropout)
    for p in model.parameters():
        p.data = p.data.astype(dtype)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    ids = np.random.default_rng(0).integers(0, 40, (5, 13))
    history = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 40), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        history.append((loss.data.copy(), [p.grad.copy() for p in model.parameters()]))
        opt.step()
    return history


def test_the_five_line_loop_on_threads_equals_the_reference(workers):
    assert_five_line_loop_equals_the_reference()


def assert_five_line_loop_equals_the_reference():
    """The fast paths' five-line loop against the textbook's in float64 (1e-12); with dropout, two runs at
    the same thread count bit for bit the same."""
    with_fast = engine.set_fast_paths_enabled(False)
    try:
        reference = five_line_steps(np.float64, dropout=0.0)
    finally:
        engine.set_fast_paths_enabled(with_fast)
    for (loss, grads), (ref_loss, ref_grads) in zip(five_line_steps(np.float64, dropout=0.0), reference):
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
    # with dropout: two runs at the same thread count are bit for bit the same
    first, second = five_line_steps(np.float32, dropout=0.1), five_line_steps(np.float32, dropout=0.1)
    for (loss, grads), (loss2, grads2) in zip(first, second):
        np.testing.assert_array_equal(loss, loss2)
        for g, g2 in zip(grads, grads2):
            np.testing.assert_array_equal(g, g2)


def test_blas_thread_scopes_restore_the_count_whatever_order_they_close_in():
    if not threads.can_control_blas():
        pytest.skip("OpenBLAS's thread controls were not found in this NumPy")
    count = threads._find_blas_controls()[1]
    before = count()
    outer, first, second = threads.blas_threads(3), threads.blas_threads(1), threads.blas_threads(1)
    outer.__enter__()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)            # two threads' regions may close in either order
    assert count() == 1
    second.__exit__(None, None, None)
    assert count() == 3
    outer.__exit__(None, None, None)
    assert count() == before
    previous = threads.set_workers(2)
    try:
        five_line_steps(np.float32, dropout=0.1, steps=1)
    finally:
        threads.set_workers(previous)
    assert count() == before                    # the attention's single-thread BLAS regions are all closed


def test_blas_thread_scopes_set_the_count_only_where_it_changes(monkeypatch):
    """A fake OpenBLAS records each set: a block whose count is already in force sets nothing, and the last
    block to close restores the count from before the first."""
    counts, calls = [4], []

    def setter(n):
        calls.append(n)
        counts[0] = n
    monkeypatch.setattr(threads, "_find_blas_controls", lambda: (setter, lambda: counts[0]))
    monkeypatch.setattr(threads, "_blas_scopes", {"active": [], "original": None, "set": None})
    with threads.blas_threads(1):
        with threads.blas_threads(1):
            assert counts[0] == 1
        with threads.blas_threads(2):
            assert counts[0] == 2
        assert counts[0] == 1
    assert counts[0] == 4
    assert calls == [1, 2, 1, 4]
    with threads.blas_threads(4):                # the count already in force: nothing to set or restore
        pass
    assert calls == [1, 2, 1, 4]


def test_heads_that_cannot_be_split_run_as_one_chunk(workers):
    """Q, K, V whose batch dimensions broadcast, or a mask with batch dimensions of its own: one chunk,
    still the reference's numbers."""
    rng = np.random.default_rng(18)
    q, k, v = leaf(rng, 4, 3, 7, 4), leaf(rng, 1, 3, 7, 4), leaf(rng, 1, 3, 7, 4)
    mask = rng.random((4, 3, 7, 7)) > 0.3
    mask[..., 0] = True
    assert len(cpu_ops.head_chunks(q.data, k.data, v.data, None)[1]) == 1
    assert len(cpu_ops.head_chunks(q.data, q.data, q.data, mask)[1]) == 1
    cot = rng.standard_normal((4, 3, 7, 4))
    own_batch = [q, leaf(rng, 4, 3, 7, 4), leaf(rng, 4, 3, 7, 4)]
    for inputs, kwargs in (([q, k, v], {}), (own_batch, {"attn_mask": mask})):
        assert_same(values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, **kwargs),
                                     inputs, cot),
                    values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, **kwargs),
                                     inputs, cot), rtol=1e-10)


def test_an_error_in_any_chunk_is_raised_after_every_chunk_has_finished():
    finished = []

    def body(lo, hi):
        if lo == 4:
            raise ValueError("chunk 4..6 failed")
        finished.append(lo)
    previous = threads.set_workers(3)
    try:
        with pytest.raises(ValueError, match="chunk 4..6 failed"):
            parallel.parallel_for(6, body)
    finally:
        threads.set_workers(previous)
    assert sorted(finished) == [0, 1, 2, 3, 5]                 # six chunks of one; the others all ran


def test_when_the_pool_is_busy_the_calling_thread_works_every_chunk_itself():
    """A helper that does not start (its core busy elsewhere) holds nothing up: the chunks are taken from a
    queue, so the calling thread runs them all and the helper's task is cancelled."""
    previous = threads.set_workers(2)
    release = threading.Event()
    pool = threads._get_pool(2)
    blockers = [pool.submit(release.wait, 60) for _ in range(pool._max_workers)]
    ran_on = []
    try:
        parallel.parallel_for(8, lambda lo, hi: ran_on.append(threading.get_ident()))
    finally:
        release.set()
        threads.set_workers(previous)
    assert all(b.result(timeout=60) for b in blockers)
    assert ran_on == [threading.get_ident()] * 8


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parallel_add_arrays_equals_numpys_sum_and_is_asked_only_for_large_alike_arrays(workers, dtype,
                                                                                        monkeypatch, fast_paths_on):
    monkeypatch.setattr(cpu_ops, "ADD_MIN_ELEMENTS", 5)
    rng = np.random.default_rng(21)
    a, b = rng.standard_normal((7, 11)).astype(dtype), rng.standard_normal((7, 11)).astype(dtype)
    np.testing.assert_array_equal(cpu_ops.add_arrays(a, b), a + b)       # elementwise: exactly NumPy's
    expected = cpu_ops.add_arrays if workers > 1 else None
    assert engine.fast_path_for("add_arrays", (a, b), {}) is expected
    assert engine.fast_path_for("add_arrays", (a, b[:1]), {}) is None     # broadcasting: NumPy's own
    assert engine.fast_path_for("add_arrays", (a, b.T.copy().T), {}) is None  # not C-contiguous
    x = npgpt.Tensor(a, requires_grad=True)
    y = x + npgpt.Tensor(b)
    (y * y).sum().backward()                                              # the residual's sum and its
    np.testing.assert_allclose(x.grad, 2 * (a + b), rtol=1e-6)            # gradients meeting

"""The C kernels (npgpt/fast/cpu/kernels.c) equal the textbook's references: values and gradients, float64
to 1e-12 and float32 to the usual tolerances, whole and cut into chunks on 1 to 4 worker threads,
deterministic for a fixed thread count; and their build: cached, refused cleanly, never half-loaded."""

import os
import platform
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import engine, optim
from npgpt.fast.cpu import native, native_ops, threads
from npgpt.fast.cpu import ops as cpu_ops

from optional import IN_CI
from test_fast_cpu import assert_five_line_loop_equals_the_reference

FLOATS = [np.float64, np.float32]


@pytest.fixture(autouse=True)
def built(fast_paths_on):
    """The kernels, built: a skip on a machine without a C compiler (a failure in CI, which has one)."""
    if native.kernels(np.dtype(np.float64)) is None:
        reason = native.status()["reason"]
        if IN_CI:
            pytest.fail(f"CI has a C compiler, yet the kernels were not built: {reason}")
        pytest.skip(f"the C kernels are not built here: {reason}")


@pytest.fixture(params=[1, 2, 3, 4])
def workers(request, monkeypatch):
    """1, 2, 3 and 4 worker threads, with chunks small enough that the tests' arrays are cut into several,
    of ragged sizes. (An even count makes a linear's two backward products at once, threads / 2 on each.)"""
    monkeypatch.setattr(native_ops, "KERNEL_MIN_ELEMENTS", 7)
    monkeypatch.setattr(native_ops, "ADAMW_MIN_ELEMENTS", 50)
    monkeypatch.setattr(native_ops, "GEMM_MIN_ROWS", 5)
    monkeypatch.setattr(native_ops, "SMALL_PRODUCT", 0)
    monkeypatch.setattr(cpu_ops, "DROPOUT_MIN_ELEMENTS", 32)
    monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_SCORES", 8)
    previous = threads.set_workers(request.param)
    yield request.param
    threads.set_workers(previous)


def tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)


def leaf(rng, *shape, dtype=np.float64, spread=1.0):
    return npgpt.Tensor((spread * rng.standard_normal(shape)).astype(dtype), requires_grad=True)


def values_and_grads(fn, inputs, cotangent):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * cotangent) with respect to every input."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out * npgpt.Tensor(cotangent.astype(out.dtype))).sum().backward()
    return [out.data.copy()] + [t.grad.copy() for t in inputs]


def assert_same(fast, reference, dtype):
    assert len(fast) == len(reference)
    for got, expected in zip(fast, reference):
        assert got.dtype == expected.dtype == dtype
        np.testing.assert_allclose(got, expected, **tolerance(dtype))


def test_the_dispatcher_asks_the_kernels_first_and_falls_back_without_them():
    x = np.zeros((4, 5))
    assert engine.fast_path_for("gelu", (x,), {}) is native_ops.gelu
    assert engine.fast_path_for("cross_entropy", (x, np.zeros(4, int)), {}) is native_ops.cross_entropy
    assert engine.fast_path_for("layer_norm", (x, 5), {}) is native_ops.layer_norm
    previous = native.set_enabled(False)
    try:
        assert engine.fast_path_for("gelu", (x,), {}) is cpu_ops.gelu
        assert engine.fast_path_for("cross_entropy", (x, np.zeros(4, int)), {}) is cpu_ops.cross_entropy
    finally:
        native.set_enabled(previous)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_kernel_equals_the_reference(workers, dtype, approximate):
    rng = np.random.default_rng(0)
    x = leaf(rng, 5, 41, dtype=dtype, spread=3.0)
    x.data[0, :6] = [-12.0, -6.0, -4.5, 0.0, 4.5, 12.0]     # tails, where erf saturates, and zero
    cot = rng.standard_normal((5, 41))
    fast = values_and_grads(lambda a: native_ops.gelu(a, approximate), [x], cot)
    reference = values_and_grads(lambda a: F.gelu.reference(a, approximate), [x], cot)
    assert_same(fast, reference, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_kernel_keeps_the_left_tail_digits_in_float64(dtype):
    x = npgpt.Tensor(np.array([-30.0, -20.0, -9.0], dtype=dtype))
    got, expected = native_ops.gelu(x).data, F.gelu.reference(x).data
    np.testing.assert_allclose(got, expected, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=0)
    if dtype == np.float64:
        assert got[0] != 0 and got[0] > -1e-190       # -30 Phi(-30): about -1.5e-196, not rounded to 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_kernel_equals_the_reference(workers, dtype, affine):
    rng = np.random.default_rng(1)
    x = leaf(rng, 3, 7, 12, dtype=dtype)
    x.data += 5.0                                           # an offset the mean must remove
    w = leaf(rng, 12, dtype=dtype) if affine != "none" else None
    b = leaf(rng, 12, dtype=dtype) if affine == "both" else None
    params = [x] + [p for p in (w, b) if p is not None]
    cot = rng.standard_normal((3, 7, 12))

    def run(layer_norm):
        return values_and_grads(lambda *a: layer_norm(a[0], 12, *a[1:], eps=1e-5), params, cot)
    assert_same(run(native_ops.layer_norm), run(F.layer_norm.reference), dtype)


def test_layer_norm_kernel_leaves_out_gradients_nobody_needs():
    rng = np.random.default_rng(2)
    x = npgpt.Tensor(rng.standard_normal((4, 6)))           # no gradient for the input
    w, b = leaf(rng, 6), npgpt.Tensor(np.zeros(6))
    native_ops.layer_norm(x, 6, w, b).sum().backward()
    assert x.grad is None and b.grad is None
    np.testing.assert_allclose(w.grad, F.layer_norm.reference(x, 6).data.sum(axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_kernel_equals_the_reference(workers, dtype, reduction):
    rng = np.random.default_rng(3)
    logits = leaf(rng, 3, 5, 37, dtype=dtype, spread=4.0)   # (B, T, V) logits, as the model gives them
    target = rng.integers(0, 37, (3, 5))
    target[0, 1] = target[2, 4] = -100                      # ignored positions
    cot = rng.standard_normal((3, 5)) if reduction == "none" else np.array(1.3)
    flat = lambda z: z.reshape(-1, 37)                      # noqa: E731
    fast = values_and_grads(lambda z: native_ops.cross_entropy(flat(z), target.reshape(-1), reduction=reduction),
                            [logits], cot.reshape(-1) if reduction == "none" else cot)
    reference = values_and_grads(lambda z: F.cross_entropy.reference(flat(z), target.reshape(-1),
                                                                     reduction=reduction),
                                 [logits], cot.reshape(-1) if reduction == "none" else cot)
    assert_same(fast, reference, dtype)


def test_cross_entropy_kernel_with_huge_logits_stays_finite():
    logits = npgpt.Tensor(np.array([[1000.0, -1000.0, 0.0], [-np.inf, 2.0, 1.0]], dtype=np.float32),
                          requires_grad=True)
    loss = native_ops.cross_entropy(logits, np.array([0, 1]))
    expected = F.cross_entropy.reference(npgpt.Tensor(logits.data), np.array([0, 1]))
    np.testing.assert_allclose(loss.data, expected.data, rtol=1e-6)
    loss.backward()
    assert np.isfinite(logits.grad).all() and logits.grad[1, 0] == 0


def dropout_run(dtype, p=0.3, seed=9):
    rng = np.random.default_rng(4)
    x = leaf(rng, 6, 50, dtype=dtype)
    cot = rng.standard_normal((6, 50))
    return x, values_and_grads(lambda a: native_ops.dropout(a, p, generator=np.random.default_rng(seed)), [x], cot), cot


@pytest.mark.parametrize("dtype", FLOATS)
def test_dropout_kernel_keeps_zeroes_and_scales_as_dropout_does(workers, dtype):
    x, (out, grad), cot = dropout_run(dtype)
    kept = out != 0
    scale = dtype(65536 / (65536 - round(0.3 * 65536)))     # p rounded to 16 bits, and the scale that matches
    np.testing.assert_array_equal(out[kept], x.data[kept] * scale)
    np.testing.assert_array_equal(grad[kept], cot[kept].astype(dtype) * scale)    # the backward's mask is
    np.testing.assert_array_equal(grad[~kept], 0)                                 # the forward's
    assert out.dtype == grad.dtype == dtype
    assert 0.6 < kept.mean() < 0.8


def test_dropout_kernel_mask_depends_on_the_seed_alone_not_the_thread_count(monkeypatch):
    masks = {}
    for count in (1, 2, 3):
        monkeypatch.setattr(native_ops, "KERNEL_MIN_ELEMENTS", 7)
        previous = threads.set_workers(count)
        try:
            masks[count] = dropout_run(np.float32)[1][0] != 0
        finally:
            threads.set_workers(previous)
    np.testing.assert_array_equal(masks[1], masks[2])
    np.testing.assert_array_equal(masks[1], masks[3])
    other_seed = dropout_run(np.float32, seed=10)[1][0] != 0
    assert (other_seed != masks[1]).mean() > 0.2


def test_dropout_kernel_keeps_each_element_with_probability_one_minus_p():
    x = npgpt.Tensor(np.ones(1 << 20, dtype=np.float32))
    for p in (0.1, 0.5, 0.9):
        kept = (native_ops.dropout(x, p, generator=np.random.default_rng(0)).data != 0).mean()
        assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / x.size)     # within 5 standard errors
    blocks = native_ops.dropout(x, 0.5, generator=np.random.default_rng(1)).data.reshape(64, -1) != 0
    assert np.abs(blocks.mean(axis=1) - 0.5).max() < 0.02                   # no stretch of the array is biased


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("length", [6, 130])
@pytest.mark.parametrize("masked", ["causal", "bool", "float", "none"])
def test_attention_softmax_kernel_equals_the_reference(workers, dtype, length, masked):
    rng = np.random.default_rng(5)
    q, k, v = (leaf(rng, 2, 3, length, 8, dtype=dtype) for _ in range(3))
    cot = rng.standard_normal((2, 3, length, 8))
    kwargs = {"causal": dict(is_causal=True), "none": {},
              "bool": dict(attn_mask=(rng.random((length, length)) > 0.3) | np.eye(length, dtype=bool)),
              "float": dict(attn_mask=rng.standard_normal((length, length)).astype(dtype))}[masked]
    fast = values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, scale=0.7, **kwargs),
                            [q, k, v], cot)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, scale=0.7,
                                                                                         **kwargs), [q, k, v], cot)
    assert_same(fast, reference, dtype)


def test_causal_softmax_kernel_zeroes_exactly_the_keys_a_query_may_not_see():
    scores = np.random.default_rng(6).standard_normal((2, 3, 5))       # 2 heads, 3 queries at 2, 3, 4
    probs = native.softmax_rows_in_place(scores.copy(), causal=True, offset=2)
    allowed = F.causal_mask(np, 3, 5, 2)
    np.testing.assert_array_equal(probs[:, ~allowed], 0)
    masked = np.where(allowed, scores, -np.inf)
    expected = np.exp(masked - masked.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(-1, keepdims=True), rtol=1e-13)


def attention_tolerance(dtype):
    return tolerance(dtype) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)


def attention_inputs(rng, case, dtype):
    """Q, K, V leaves for one case: "model" as the model makes them, strided views (B, H, T, D) into one
    (B, T, 3 H D) projection; "3d" (B, T, D); "cross" L != S and Dv != D; "long" 130 positions of width 64;
    "one query" and "two queries" against 130 keys, of widths that are not a whole number of registers
    (the kernel's block of queries repeats the last one); "wide" heads of 48 (Q, K) and 32 (V), which take
    the kernel's block of two registers (float32 with AVX-512: 48 = 2 + 1 registers, 32 = 2); "more queries"
    9 queries against 5 keys (causal: the queries past the last key see every key)."""
    if case == "model":
        qkv = rng.standard_normal((2, 37, 3 * 3 * 24)).astype(dtype)           # B 2, T 37, H 3, D 24
        views = [qkv[..., i * 72:(i + 1) * 72].reshape(2, 37, 3, 24).transpose(0, 2, 1, 3) for i in range(3)]
        return [npgpt.Tensor(view, requires_grad=True) for view in views]
    shapes = {"3d": [(3, 9, 8)] * 3, "cross": [(2, 2, 5, 8), (2, 2, 9, 8), (2, 2, 9, 20)],
              "long": [(1, 2, 130, 64)] * 3, "one query": [(2, 3, 1, 20), (2, 3, 130, 20), (2, 3, 130, 12)],
              "two queries": [(1, 2, 2, 64), (1, 2, 130, 64), (1, 2, 130, 64)],
              "wide": [(2, 2, 33, 48), (2, 2, 40, 48), (2, 2, 40, 32)],
              "more queries": [(2, 2, 9, 8), (2, 2, 5, 8), (2, 2, 5, 8)]}[case]
    return [leaf(rng, *shape, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["model", "3d", "cross", "long", "one query", "two queries", "wide",
                                  "more queries"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_attention_kernel_equals_the_reference(workers, dtype, case, is_causal):
    rng = np.random.default_rng(11)
    inputs = attention_inputs(rng, case, dtype)
    chosen = engine.fast_path_for("scaled_dot_product_attention", inputs, {"is_causal": is_causal})
    # one query (generation's) is left to the NumPy paths, whose products run on the BLAS
    assert (chosen is native_ops.scaled_dot_product_attention) == (case != "one query")
    cot = rng.standard_normal(inputs[0].shape[:-1] + inputs[2].shape[-1:])
    # float32 against the float64 reference on the same inputs: the kernel sums in another order than the
    # float32 reference, so the two differ by twice the rounding of either
    exact = [npgpt.Tensor(t.data.astype(np.float64), requires_grad=True) for t in inputs]
    for scale in (None, 0.7):
        fast = values_and_grads(lambda a, b, c: native_ops.scaled_dot_product_attention(
            a, b, c, is_causal=is_causal, scale=scale), inputs, cot)
        reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(
            a, b, c, is_causal=is_causal, scale=scale), exact, cot)
        for got, expected in zip(fast, reference):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, expected, **attention_tolerance(dtype))
    with npgpt.no_grad():           # nothing kept for a backward, the same output
        again = native_ops.scaled_dot_product_attention(*inputs, is_causal=is_causal, scale=0.7)
    np.testing.assert_array_equal(again.data, fast[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("new", [1, 3])
def test_attention_over_a_kv_cache_equals_the_reference(workers, dtype, new):
    """attention_cached: `new` queries, the last of 37 positions, against a cache's (B, H, capacity, D)
    arrays read where they lie, keys of width 20 and values of 12 (not whole registers); query i sees keys
    0 .. 37 - new + i, the textbook's causal mask offset by the cached positions."""
    rng = np.random.default_rng(25)
    B, H, S, capacity = 2, 3, 37, 50
    q = rng.standard_normal((B, new, H, 20)).astype(dtype).transpose(0, 2, 1, 3)      # heads side by side
    keys = rng.standard_normal((B, H, capacity, 20)).astype(dtype)
    values = rng.standard_normal((B, H, capacity, 12)).astype(dtype)
    out = np.full((B, new, H, 12), np.nan, dtype=dtype).transpose(0, 2, 1, 3)
    native_ops.attention_cached(q, keys[:, :, :S], values[:, :, :S], out, dtype(0.3))
    exact = [npgpt.Tensor(a.astype(np.float64)) for a in (q, keys[:, :, :S], values[:, :, :S])]
    expected = F.scaled_dot_product_attention.reference(*exact, attn_mask=F.causal_mask(np, new, S, S - new),
                                                        scale=0.3)
    np.testing.assert_allclose(out, expected.data, **attention_tolerance(dtype))


# Each SIMD width the attention's register blocks are written for (kernels.c: VECTOR_BYTES, BLOCK), built
# with the flags that select it; the native build covers the CPU's own
ATTENTION_BUILDS = {"16-byte registers (no -march)": ([], 16), "AVX2": (["-mavx2", "-mfma"], 32),
                    "AVX-512": (["-mavx512f", "-mfma"], 64),
                    # ARM64's block of four 16-byte registers, and its block of two, on any x86
                    "16-byte registers, blocks of 4": (["-DBLOCK=4"], 16)}
ATTENTION_BUILD_CPU_FLAGS = {"AVX2": {"avx2", "fma"}, "AVX-512": {"avx512f", "fma"}}


@pytest.mark.parametrize("build", list(ATTENTION_BUILDS))
def test_attention_kernel_built_for_each_simd_width_equals_the_reference(fresh_build, monkeypatch, build):
    needs = ATTENTION_BUILD_CPU_FLAGS.get(build, set())
    cpu_flags = set(native._cpu_description().split())       # the flags line of /proc/cpuinfo
    if os.uname().machine not in ("x86_64", "AMD64") or not needs <= cpu_flags:
        pytest.skip(f"this CPU cannot run the {build} build")
    flags, width = ATTENTION_BUILDS[build]
    monkeypatch.setattr(native, "NATIVE_FLAGS", flags)
    assert native.status()["vector_bytes"] == width
    previous = threads.set_workers(2)
    try:
        rng = np.random.default_rng(5)
        for dtype in FLOATS:
            for case in ("model", "cross", "long", "one query", "wide"):
                inputs = attention_inputs(rng, case, dtype)
                cot = rng.standard_normal(inputs[0].shape[:-1] + inputs[2].shape[-1:])
                exact = [npgpt.Tensor(t.data.astype(np.float64), requires_grad=True) for t in inputs]
                for is_causal in (True, False):
                    fast = values_and_grads(lambda a, b, c: native_ops.scaled_dot_product_attention(
                        a, b, c, is_causal=is_causal), inputs, cot)
                    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(
                        a, b, c, is_causal=is_causal), exact, cot)
                    for got, expected in zip(fast, reference):
                        np.testing.assert_allclose(got, expected, **attention_tolerance(dtype))
            for new in (1, 3):          # generation's kernels: the cache's attention and few-rows products
                test_attention_over_a_kv_cache_equals_the_reference(2, dtype, new)
            for case in ("one row", "four rows", "row-strided"):
                test_few_rows_product_equals_the_reference(2, dtype, case)
            for case in OWN_PRODUCT_CASES:      # the own product, built for each width (routed to on AVX-512)
                for trans_a, trans_b in TRANSPOSES:
                    test_own_product_equals_the_reference(2, dtype, trans_a, trans_b, case)
    finally:
        threads.set_workers(previous)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["long", "one query"])
def test_attention_kernel_dropout_is_the_hashed_mask_of_each_weight(workers, dtype, case):
    """A = P * mask: the mask of weight (head, i, j) is the dropout kernel's hashed bit of that index of the
    (heads, L, S) weights, from one seed drawn from the generator; the gradients are the reference's
    formulas with that mask (worked here in float64)."""
    rng = np.random.default_rng(12)
    q, k, v = attention_inputs(rng, case, dtype)
    cot = rng.standard_normal(q.shape[:-1] + v.shape[-1:])
    p, scale = 0.3, 1 / np.sqrt(q.shape[-1])
    is_causal = case == "long"                  # one query against a causal mask would see one key
    fast = values_and_grads(lambda a, b, c: native_ops.scaled_dot_product_attention(
        a, b, c, is_causal=is_causal, dropout_p=p, generator=np.random.default_rng(4)), [q, k, v], cot)
    threshold, keep_scale = cpu_ops.dropout_threshold(p, np.float64)
    seed = native.dropout_seed(np.random.default_rng(4))
    weights_shape = q.shape[:-1] + k.shape[-2:-1]                    # (B, H, L, S)
    mask = native.dropout_hashed(np.ones(weights_shape), np.empty(weights_shape), seed, threshold,
                                 keep_scale)                          # keep * scale, or 0
    Q, K, V, G = (np.asarray(a, dtype=np.float64) for a in (q.data, k.data, v.data, cot))
    L, S = weights_shape[-2:]
    scores = scale * Q @ K.swapaxes(-1, -2)
    scores = np.where(F.causal_mask(np, L, S), scores, -np.inf) if is_causal else scores
    P = np.exp(scores - scores.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    A = P * mask
    grad_P = (G @ V.swapaxes(-1, -2)) * mask
    grad_S = P * (grad_P - (grad_P * P).sum(-1, keepdims=True))
    expected = [A @ V, scale * grad_S @ K, scale * grad_S.swapaxes(-1, -2) @ Q, A.swapaxes(-1, -2) @ G]
    assert 0.2 < (mask == 0).mean() < 0.4                                # about p of the weights dropped
    for got, want in zip(fast, expected):
        np.testing.assert_allclose(got, want, **attention_tolerance(dtype))


def test_attention_kernel_with_dropout_passes_gradcheck(workers):
    rng = np.random.default_rng(3)
    q, k, v = attention_inputs(rng, "model", np.float64)
    npgpt.gradcheck(lambda a, b, c: native_ops.scaled_dot_product_attention(
        a, b, c, is_causal=True, dropout_p=0.2, generator=np.random.default_rng(3)), [q, k, v], max_probes=40)


def test_attention_kernel_leaves_masks_broadcasts_and_reversed_views_to_the_numpy_path():
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((2, 3, 6, 8)) for _ in range(3))
    mask = np.tril(np.ones((6, 6), dtype=bool))
    cases = [((q, k, v), {"attn_mask": mask}),
             ((q, k[:1], v[:1]), {}),                                      # K and V broadcast over B
             ((q[..., ::-1, :], k, v), {}),                                # a reversed axis
             ((q[None], k[None], v[None]), {}),                            # five dimensions
             ((q, k, v), {"dropout_p": 0.1, "generator": object()})]       # not a NumPy generator
    for args, kwargs in cases:
        assert not native_ops.attention_applies(*args, **kwargs)
    assert engine.fast_path_for("scaled_dot_product_attention", (q, k, v), {"attn_mask": mask}) is \
        cpu_ops.scaled_dot_product_attention


def adamw_run(dtype, weight_decay, steps=3):
    """Three AdamW steps on parameters of three shapes with fixed gradients; the parameters after them."""
    params = [npgpt.Tensor(np.random.default_rng(1).standard_normal(s).astype(dtype), requires_grad=True)
              for s in [(50, 70), (70,), (3, 4, 5)]]
    opt = optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    grads = np.random.default_rng(2)
    for _ in range(steps):
        for p in params:
            p.grad = grads.standard_normal(p.shape).astype(dtype)
        opt.step()
    return [p.data for p in params]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_kernel_equals_the_reference_update(workers, dtype, weight_decay):
    assert engine.fast_path_for("adamw_step", ([(npgpt.Tensor(np.zeros(2, dtype)), {}, {})],), {}) \
        is native_ops.adamw_step
    fast = adamw_run(dtype, weight_decay)
    previous = engine.set_fast_paths_enabled(False)
    try:
        reference = adamw_run(dtype, weight_decay)
    finally:
        engine.set_fast_paths_enabled(previous)
    for got, expected in zip(fast, reference):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, expected, **tolerance(dtype))


def clip_run(dtype, max_norm, grad_scale=1.0, listed_twice=False):
    """Parameters of four shapes (one without a gradient) with fixed gradients, clipped: the norm returned
    and the gradients after."""
    rng = np.random.default_rng(4)
    params = [npgpt.Tensor(np.zeros(s, dtype), requires_grad=True) for s in [(50, 70), (70,), (3, 4, 5), (9,)]]
    for p in params[:3]:
        p.grad = (grad_scale * rng.standard_normal(p.shape)).astype(dtype)
    listed = params + params[:1] if listed_twice else params
    total = optim.clip_grad_norm_(listed, max_norm)
    return total, [p.grad for p in params]


def reference_clip_run(*args, **kwargs):
    previous = engine.set_fast_paths_enabled(False)
    try:
        return clip_run(*args, **kwargs)
    finally:
        engine.set_fast_paths_enabled(previous)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("max_norm, grad_scale", [(1.0, 1.0), (1e3, 1.0), (0.0, 1.0), (1.0, 1e-3)])
def test_clip_kernels_equal_the_reference_clipping(workers, dtype, max_norm, grad_scale):
    assert engine.fast_path_for("clip_grad_norm", ([npgpt.Tensor(np.zeros(2, dtype))], 1.0), {}) is None  # no grads
    params = [npgpt.Tensor(np.zeros(2, dtype), requires_grad=True)]
    params[0].grad = np.ones(2, dtype)
    assert engine.fast_path_for("clip_grad_norm", (params, 1.0), {}) is native_ops.clip_grad_norm
    total, grads = clip_run(dtype, max_norm, grad_scale)
    expected_total, expected = reference_clip_run(dtype, max_norm, grad_scale)
    # the norm itself, from the gradients drawn again, summed in float64 by NumPy
    rng = np.random.default_rng(4)
    drawn = [(grad_scale * rng.standard_normal(s)).astype(dtype) for s in [(50, 70), (70,), (3, 4, 5)]]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in drawn))
    assert type(total) is type(expected_total) and np.asarray(total).dtype == dtype
    np.testing.assert_allclose(total, norm, **tolerance(dtype))
    np.testing.assert_allclose(total, expected_total, **tolerance(dtype))
    for got, want, before in zip(grads, expected, drawn):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tolerance(dtype))
        if max_norm > 0 and norm > max_norm:            # clipped, as torch's: times max_norm / (norm + 1e-6)
            np.testing.assert_allclose(got, before * (max_norm / (norm + 1e-6)), **tolerance(dtype))
        else:                                           # not clipped: every element as it was
            np.testing.assert_array_equal(got, before)
    assert grads[3] is None
    if max_norm == 1.0 and grad_scale == 1.0:
        clipped_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads[:3]))
        np.testing.assert_allclose(clipped_norm, 1.0, rtol=1e-5)


def test_clip_kernels_scale_a_gradient_listed_twice_twice_as_the_reference_does(workers):
    total, grads = clip_run(np.float64, 1.0, listed_twice=True)
    expected_total, expected = reference_clip_run(np.float64, 1.0, listed_twice=True)
    np.testing.assert_allclose(total, expected_total, **tolerance(np.float64))
    for got, want in zip(grads[:3], expected[:3]):
        np.testing.assert_allclose(got, want, **tolerance(np.float64))


def test_clip_kernels_scale_gradients_that_share_memory_as_the_reference_does(workers):
    def run():
        buffer = np.arange(1.0, 101.0)
        params = [npgpt.Tensor(np.zeros(50), requires_grad=True) for _ in range(2)]
        params[0].grad, params[1].grad = buffer[0:50], buffer[25:75]      # 25 elements in both
        total = optim.clip_grad_norm_(params, 1.0)
        return total, buffer
    total, buffer = run()
    previous = engine.set_fast_paths_enabled(False)
    try:
        expected_total, expected = run()
    finally:
        engine.set_fast_paths_enabled(previous)
    np.testing.assert_allclose(total, expected_total, **tolerance(np.float64))
    np.testing.assert_allclose(buffer, expected, **tolerance(np.float64))
    factor = 1.0 / (expected_total + 1e-6)
    np.testing.assert_allclose(buffer[25:50], np.arange(26.0, 51.0) * factor ** 2, rtol=1e-12)   # twice


def test_byte_ranges_overlap_only_where_they_share_a_byte():
    def overlapping(*ranges):
        begins, ends = zip(*ranges)
        return native_ops._overlapping(np.array(begins, dtype=np.uint64),
                                       np.array(ends, dtype=np.int64) - np.array(begins, dtype=np.int64))
    assert not overlapping((0, 100))
    assert not overlapping((100, 200), (0, 100), (300, 400))         # touching, in any order
    assert overlapping((0, 100), (99, 200))
    assert overlapping((300, 400), (0, 1000), (500, 600))            # one inside another
    assert overlapping((0, 100), (0, 100))                           # the same array twice


def test_clip_kernels_are_deterministic_for_a_fixed_thread_count(workers):
    runs = [clip_run(np.float32, 1.0) for _ in range(3)]
    for total, grads in runs[1:]:
        assert total == runs[0][0]
        for got, first in zip(grads[:3], runs[0][1][:3]):
            np.testing.assert_array_equal(got, first)


def test_clip_leaves_strided_and_read_only_gradients_to_the_reference():
    params = [npgpt.Tensor(np.zeros((4, 6)), requires_grad=True) for _ in range(2)]
    params[0].grad = np.ones((6, 4)).T                  # a transposed view
    params[1].grad = np.ones((4, 6))
    assert engine.fast_path_for("clip_grad_norm", (params, 1.0), {}) is None
    total = optim.clip_grad_norm_(params, 1.0)
    np.testing.assert_allclose(total, np.sqrt(48.0), rtol=1e-12)
    np.testing.assert_allclose(params[0].grad, 1 / np.sqrt(48.0), rtol=1e-6)
    params[0].grad = np.ones((4, 6))
    params[1].grad.flags.writeable = False
    assert engine.fast_path_for("clip_grad_norm", (params, 1.0), {}) is None
    with pytest.raises(ValueError, match="read-only"):  # NumPy's refusal, from the reference's own multiply
        optim.clip_grad_norm_(params, 1.0)


def test_kernels_are_deterministic_for_a_fixed_thread_count(workers):
    rng = np.random.default_rng(8)
    x = leaf(rng, 9, 33, dtype=np.float32)
    w, b = leaf(rng, 33, dtype=np.float32), leaf(rng, 33, dtype=np.float32)
    cot = rng.standard_normal((9, 33))
    runs = [values_and_grads(lambda a, c, d: native_ops.layer_norm(native_ops.gelu(a), 33, c, d), [x, w, b], cot)
            for _ in range(3)]
    for other in runs[1:]:
        for got, first in zip(other, runs[0]):
            np.testing.assert_array_equal(got, first)


# ========================================================================================================
# The build

@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache in tmp_path and a native module that has not tried to build yet."""
    monkeypatch.setenv("NPGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {"libraries": None, "reason": None, "paths": {}, "enabled": True})
    return tmp_path / "cache"


def test_a_new_build_deletes_the_builds_unused_for_30_days_and_keeps_the_others(fresh_build):
    fresh_build.mkdir(parents=True)
    day = 86400
    stale = {f"kernels-{real}-0123456789abcdef.so": 31 for real in ("float", "double")}
    recent = {"kernels-float-fedcba9876543210.so": 29, "kernels-double-fedcba9876543210.so": 1}
    others = {"notes.txt": 400, "kernels-float-0123456789abcdef.txt": 400}     # not builds: untouched
    for name, age in {**stale, **recent, **others}.items():
        path = fresh_build / name
        path.write_bytes(b"")
        os.utime(path, (time.time() - age * day, time.time() - age * day))
    assert native.status()["built"]
    left = set(os.listdir(fresh_build))
    assert not left & set(stale)
    assert set(recent) | set(others) <= left
    assert len(left) == len(recent) + len(others) + 2          # and the two just built


def test_loading_a_cached_build_marks_it_used(fresh_build, monkeypatch):
    assert native.status()["built"]
    paths = [fresh_build / name for name in os.listdir(fresh_build)]
    old = time.time() - 40 * 86400
    for path in paths:
        os.utime(path, (old, old))
    monkeypatch.setattr(native, "_state", {"libraries": None, "reason": None, "paths": {}, "enabled": True})
    assert native.kernels(np.dtype(np.float32)) is not None
    assert all(path.stat().st_mtime > time.time() - 3600 for path in paths)


def test_a_build_is_cached_and_the_cache_is_reused_without_compiling(fresh_build, monkeypatch):
    assert native.status()["built"]
    files = sorted(os.listdir(fresh_build))
    assert len(files) == 2 and all(f.startswith("kernels-") and f.endswith(".so") for f in files)
    monkeypatch.setattr(native, "_state", {"libraries": None, "reason": None, "paths": {}, "enabled": True})

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the libraries")
    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    assert native.kernels(np.dtype(np.float32)) is not None
    assert sorted(os.listdir(fresh_build)) == files


def test_a_changed_source_builds_anew(fresh_build, monkeypatch, tmp_path):
    assert native.status()["built"]
    changed = tmp_path / "kernels.c"
    changed.write_text(open(native.SOURCE).read() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", str(changed))
    monkeypatch.setattr(native, "_state", {"libraries": None, "reason": None, "paths": {}, "enabled": True})
    assert native.status()["built"]
    assert len(os.listdir(fresh_build)) == 4


def test_without_a_compiler_the_numpy_fast_paths_run(fresh_build, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)      # no cc, no gcc on PATH
    status = native.status()
    assert not status["built"] and "no C compiler" in status["reason"]
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    assert engine.fast_path_for("gelu", (x,), {}) is cpu_ops.gelu
    np.testing.assert_allclose(F.gelu(x).data, F.gelu.reference(x).data, rtol=1e-12)
    assert not os.path.exists(fresh_build) or not os.listdir(fresh_build)


def test_a_source_that_does_not_compile_leaves_no_file_and_says_why(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "kernels.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", str(broken))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.warns(RuntimeWarning, match="the NumPy fast paths run instead"):
        status = native.status()
    assert not status["built"] and "could not be built" in status["reason"]
    assert os.listdir(fresh_build) == []                    # no half-written library left behind


def test_npgpt_cpu_kernels_0_turns_them_off(fresh_build, monkeypatch):
    monkeypatch.setenv("NPGPT_CPU_KERNELS", "0")
    assert native.kernels(np.dtype(np.float32)) is None
    assert "NPGPT_CPU_KERNELS=0" in native.status()["reason"]


def test_attention_with_the_kernels_dropout_passes_gradcheck(workers):
    rng = np.random.default_rng(3)
    q, k, v = (leaf(rng, 2, 2, 130, 4) for _ in range(3))      # 130: the causal blocks, each its own mask
    npgpt.gradcheck(lambda a, b, c: cpu_ops.scaled_dot_product_attention(
        a, b, c, is_causal=True, dropout_p=0.2, generator=np.random.default_rng(3)), [q, k, v], max_probes=40)


def test_the_five_line_loop_on_the_kernels_equals_the_reference(workers):
    assert_five_line_loop_equals_the_reference()


def test_an_unwritable_cache_directory_falls_back_to_the_temporary_one(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("NPGPT_CACHE_DIR", "/proc/npgpt-cannot-be-made-here")
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    status = native.status()
    assert status["built"], status["reason"]
    assert all(path.startswith(str(tmp_path / "tmp")) for path in status["paths"].values())


def test_a_cache_directory_others_may_write_in_is_refused(fresh_build, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                                       # anyone could plant a library here
    monkeypatch.setenv("NPGPT_CACHE_DIR", str(shared))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    status = native.status()
    assert status["built"] and os.listdir(shared) == []
    assert all(path.startswith(str(tmp_path / "tmp")) for path in status["paths"].values())
    assert oct(os.stat(os.path.dirname(status["paths"]["float"])).st_mode & 0o777) == oct(0o700)


def test_a_cc_that_is_not_found_says_so(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-npgpt -O2")
    with pytest.warns(RuntimeWarning, match="CC='no-such-compiler-npgpt -O2' is not a command"):
        status = native.status()
    assert not status["built"]
    assert engine.fast_path_for("gelu", (np.zeros(3),), {}) is cpu_ops.gelu


def test_a_compiler_that_refuses_the_vector_width_still_builds_for_this_cpu(fresh_build, monkeypatch, tmp_path):
    """On x86 the build asks for 512-bit vectors; a compiler that refuses the flag gets -march=native alone,
    not the plain build."""
    if not native.WIDE_VECTOR_FLAGS:
        pytest.skip("the flag is asked for on x86 alone")
    seen = tmp_path / "flags.txt"
    picky = tmp_path / "picky-cc"
    picky.write_text("#!/bin/sh\necho \"$@\" >> " + str(seen) + "\n"
                     "case \"$*\" in *-mprefer-vector-width*) echo 'unknown option' >&2; exit 1;; esac\n"
                     "exec cc \"$@\"\n")
    picky.chmod(0o755)
    monkeypatch.setenv("CC", str(picky))
    assert native.status()["built"]
    builds = seen.read_text().splitlines()
    assert "-mprefer-vector-width=512" in builds[0] and "-march=native" in builds[0]       # asked for first
    assert "-march=native" in builds[1] and "-mprefer-vector-width" not in builds[1]      # then without it


def test_cc_may_hold_arguments(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "cc -DNPGPT_UNUSED_DEFINE=1")
    assert native.status()["built"]


def test_float32_attention_with_a_float64_gradient_equals_the_reference():
    rng = np.random.default_rng(10)
    q, k, v = (leaf(rng, 2, 2, 130, 8, dtype=np.float32) for _ in range(3))
    cot = rng.standard_normal((2, 2, 130, 8))                 # float64: dO arrives in float64
    for dropout_p in (0.0, 0.3):
        def attention(fn):
            return lambda a, b, c: fn(a, b, c, is_causal=True, dropout_p=dropout_p,
                                      generator=np.random.default_rng(1))
        fast = values_and_grads(attention(cpu_ops.scaled_dot_product_attention), [q, k, v], cot)
        for t in (q, k, v):
            t.grad = None
        out = cpu_ops.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                   generator=np.random.default_rng(1))
        (out * npgpt.Tensor(cot)).sum().backward()           # the float64 cotangent itself, not cast
        for got, again in zip(fast[1:], [q.grad, k.grad, v.grad]):
            assert np.isfinite(again).all()
            np.testing.assert_allclose(again, got, rtol=1e-4, atol=1e-5)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, is_causal=True),
                                 [q, k, v], cot)
    for t in (q, k, v):
        t.grad = None
    (cpu_ops.scaled_dot_product_attention(q, k, v, is_causal=True) * npgpt.Tensor(cot)).sum().backward()
    for got, expected in zip([q.grad, k.grad, v.grad], reference[1:]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_zero_dimensional_inputs_keep_their_shape():
    x = npgpt.Tensor(np.array(0.5, dtype=np.float32), requires_grad=True)
    for op in (native_ops.gelu, lambda t: native_ops.dropout(t, 0.5, generator=np.random.default_rng(0))):
        y = op(x)
        assert y.shape == ()
        x.grad = None
        y.backward()
        assert x.grad.shape == ()


def test_dropout_with_p_next_to_one_drops_everything():
    x = npgpt.Tensor(np.ones((4, 5), dtype=np.float32), requires_grad=True)
    for dropout in (native_ops.dropout, cpu_ops.dropout):
        y = dropout(x, 1 - 1e-7, generator=np.random.default_rng(0))
        np.testing.assert_array_equal(y.data, 0)
        x.grad = None
        y.sum().backward()
        np.testing.assert_array_equal(x.grad, 0)


# ---- linear, embedding and sums on the kernels' pool ----------------------------------------------------

def linear_inputs(rng, case, dtype):
    """(x, W, b) leaves: "3d" (2, 7, 33) @ (65, 33)^T + b; "wide" fewer rows than outputs (the result's
    columns are split), no bias; "strided" x a transposed view (copied for BLAS), b without a gradient.
    At most FEW_ROWS rows: "one row" (1, 1, 33) @ (65, 33)^T + b, 33 not a whole number of registers and 65
    not of ROWS; "four rows" (4, 40) @ (9, 40)^T, no bias; "row-strided" x rows of a wider array (a row
    stride of 70), b without a gradient."""
    if case in ("3d", "one row"):
        rows = (2, 7) if case == "3d" else (1, 1)
        return leaf(rng, *rows, 33, dtype=dtype), leaf(rng, 65, 33, dtype=dtype), leaf(rng, 65, dtype=dtype)
    if case in ("wide", "four rows"):
        (N, C), out = ((9, 20), 130) if case == "wide" else ((4, 40), 9)
        return leaf(rng, N, C, dtype=dtype), leaf(rng, out, C, dtype=dtype), None
    if case == "strided":
        x = npgpt.Tensor(rng.standard_normal((24, 40)).astype(dtype).T, requires_grad=True)       # (40, 24)
    else:
        x = npgpt.Tensor(rng.standard_normal((3, 70)).astype(dtype)[:, 10:50], requires_grad=True)  # (3, 40)
    out = x.shape[1] + 7
    return x, leaf(rng, out, x.shape[1], dtype=dtype), npgpt.Tensor(rng.standard_normal(out).astype(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["3d", "wide", "strided"])
def test_linear_kernel_equals_the_reference(workers, dtype, case):
    rng = np.random.default_rng(20)
    x, W, b = linear_inputs(rng, case, dtype)
    assert engine.fast_path_for("linear", (x, W, b), {}) is native_ops.linear
    inputs = [t for t in (x, W, b) if t is not None and t.requires_grad]
    cot = rng.standard_normal(x.shape[:-1] + W.shape[:1])

    def run(fn):
        for t in inputs:
            t.grad = None
        out = fn(x, W, b)
        (out * npgpt.Tensor(cot.astype(dtype))).sum().backward()
        return [out.data.copy()] + [t.grad.copy() for t in inputs]
    assert_same(run(native_ops.linear), run(F.linear.reference), dtype)


def test_linear_backward_makes_its_two_products_at_once_with_an_even_thread_count(workers):
    calls = []
    previous = native.set_call_observer(lambda name, seconds: calls.append(name))
    try:
        x, W, b = linear_inputs(np.random.default_rng(22), "3d", np.float32)
        out = native_ops.linear(x, W, b)
        del calls[:]
        out.sum().backward()
    finally:
        native.set_call_observer(previous)
    products = [name for name in calls if name.startswith("gemm")]
    assert products == (["gemm_pair_parallel"] if workers % 2 == 0 else ["gemm_parallel", "gemm_parallel"])


def test_products_go_by_their_rows_to_few_rows_product_numpy_or_the_pools_blas():
    W = np.zeros((768, 256), np.float32)
    for x in (np.zeros((1, 1, 256), np.float32), np.zeros((4, 256), np.float32)):    # generation's rows
        assert engine.fast_path_for("linear", (x, W), {}) is native_ops.linear
    assert native_ops.FEW_ROWS == 4
    # 8 rows: 1.5M multiply-adds, under SMALL_PRODUCT: the reference's one NumPy call
    assert engine.fast_path_for("linear", (np.zeros((8, 256), np.float32), W), {}) is None
    assert engine.fast_path_for("linear", (np.zeros((64, 256), np.float32), W), {}) is native_ops.linear


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["one row", "four rows", "row-strided"])
def test_few_rows_product_equals_the_reference(workers, dtype, case):
    rng = np.random.default_rng(23)
    x, W, b = linear_inputs(rng, case, dtype)
    calls = []
    previous = native.set_call_observer(lambda name, seconds: calls.append(name))
    try:
        native_ops.linear(x, W, b)
    finally:
        native.set_call_observer(previous)
    assert calls == ["few_rows_product_parallel"]
    inputs = [t for t in (x, W, b) if t is not None and t.requires_grad]
    cot = rng.standard_normal(x.shape[:-1] + W.shape[:1])
    assert_same(values_and_grads(lambda *_: native_ops.linear(x, W, b), inputs, cot),
                values_and_grads(lambda *_: F.linear.reference(x, W, b), inputs, cot), dtype)


def test_few_rows_product_gives_the_same_bits_on_any_thread_count(monkeypatch):
    """Each element is one thread's sum in a fixed order, whichever thread and chunk it falls in."""
    monkeypatch.setattr(native_ops, "KERNEL_MIN_ELEMENTS", 7)
    rng = np.random.default_rng(24)
    x, W, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((3, 50), (203, 50), (203,)))
    results = []
    for count in (1, 2, 3, 4):
        previous = threads.set_workers(count)
        try:
            results.append(native_ops.linear(x, W, b).data.copy())
        finally:
            threads.set_workers(previous)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


# kernels.c's own product (own_product), on shapes past each edge of its blocking: a last panel of fewer than
# 12 rows and of fewer than 32 float (16 double) columns, more rows than a block of A (96), more columns than
# a packed slice of B (512 in float, 256 in double) and a depth past a slice's (512), each with a rest over
OWN_PRODUCT_CASES = {"edges": (29, 45, 37), "blocks": (203, 1100, 1100), "one element": (1, 1, 1)}
TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]


def own_product(op_a, op_b, trans_a, trans_b):
    """op_a @ op_b by the kernels' own product (gemm_parallel given no BLAS), each operand stored transposed
    where asked, as a view whose rows lie 3 elements further apart than their length."""
    def stored(m, trans):
        m = m.T if trans else m
        padded = np.full((m.shape[0], m.shape[1] + 3), np.nan, m.dtype)
        padded[:, :m.shape[1]] = m
        return padded[:, :m.shape[1]]
    a, b = stored(op_a, trans_a), stored(op_b, trans_b)
    (M, K), N = op_a.shape, op_b.shape[1]
    out = np.full((M, N), np.nan, op_a.dtype)
    failed = native.kernels(op_a.dtype).gemm_parallel(
        None, 0, int(trans_a), int(trans_b), M, N, K, native.address(a), a.strides[0] // a.itemsize,
        native.address(b), b.strides[0] // b.itemsize, native.address(out), N, None, threads.workers(),
        native_ops.GEMM_MIN_ROWS)
    assert failed == 0
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
@pytest.mark.parametrize("case", list(OWN_PRODUCT_CASES))
def test_own_product_equals_the_reference(workers, dtype, trans_a, trans_b, case):
    M, N, K = OWN_PRODUCT_CASES[case]
    rng = np.random.default_rng(25)
    op_a, op_b = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    got = own_product(op_a, op_b, trans_a, trans_b)
    exact = op_a.astype(np.float64) @ op_b.astype(np.float64)
    # a sum of K rounded products and partial sums is within K eps of the sum of their sizes
    bound = K * np.finfo(dtype).eps * (np.abs(op_a).astype(np.float64) @ np.abs(op_b).astype(np.float64))
    assert got.dtype == dtype and not np.isnan(got).any()
    assert (np.abs(got - exact) <= bound).all()     # a slice or panel left out or doubled is off by ~sqrt(K)


def test_own_product_gives_the_same_bits_on_any_thread_count(monkeypatch):
    """Each element is one sum in a fixed order of k, whichever thread's block of rows or columns it is in."""
    monkeypatch.setattr(native_ops, "GEMM_MIN_ROWS", 5)
    rng = np.random.default_rng(26)
    for M, N, K in ((203, 45, 1100), (29, 1100, 600)):       # rows split among the threads; columns
        op_a, op_b = (rng.standard_normal(shape).astype(np.float32) for shape in ((M, K), (K, N)))
        results = []
        for count in (1, 2, 3, 4):
            previous = threads.set_workers(count)
            try:
                results.append(own_product(op_a, op_b, False, True))
            finally:
                threads.set_workers(previous)
        for other in results[1:]:
            np.testing.assert_array_equal(other, results[0])


def test_float32_products_need_no_blas_where_the_own_product_is_built(monkeypatch):
    """On an Intel CPU with 512-bit vectors, a float32 linear and its backward multiply by kernels.c's own
    product, their bits the same on any thread count (dx and dW made at once with an even count, one after
    the other with an odd); elsewhere, by the BLAS."""
    own = native.kernels(np.dtype(np.float32)).own_product
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            intel = "GenuineIntel" in f.read()
        assert own == (intel and native.status()["vector_bytes"] == 64)
    except OSError:                     # no /proc/cpuinfo to tell the vendor by
        pass
    if not own:
        pytest.skip("this CPU multiplies by the BLAS (the own product runs on Intel CPUs with 512-bit vectors)")
    assert not native.kernels(np.dtype(np.float64)).own_product       # float64: the BLAS's, for gradchecks
    monkeypatch.setattr(threads, "blas_gemm", lambda dtype: pytest.fail("the BLAS was asked for"))
    monkeypatch.setattr(native_ops, "GEMM_MIN_ROWS", 5)
    results = []
    for count in (1, 2, 3, 4):
        previous = threads.set_workers(count)
        try:
            x, W, b = linear_inputs(np.random.default_rng(27), "3d", np.float32)
            out = native_ops.linear(x, W, b)
            out.sum().backward()
            results.append([out.data.copy(), x.grad.copy(), W.grad.copy()])
        finally:
            threads.set_workers(previous)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


def test_linear_kernel_leaves_the_blas_thread_count_as_it_was(workers):
    set_count, get_count = threads._find_blas_controls()
    before = get_count()
    rng = np.random.default_rng(21)
    x, W, b = linear_inputs(rng, "3d", np.float32)
    native_ops.linear(x, W, b).sum().backward()
    assert get_count() == before


@pytest.mark.parametrize("dtype", FLOATS)
def test_embedding_kernel_equals_the_reference(workers, dtype):
    rng = np.random.default_rng(22)
    W = leaf(rng, 13, 40, dtype=dtype)
    ids = rng.integers(0, 13, (3, 11))                      # repeats: their rows' gradients add up
    assert engine.fast_path_for("embedding", (ids, W), {}) is native_ops.embedding
    cot = rng.standard_normal((3, 11, 40))
    fast = values_and_grads(lambda w: native_ops.embedding(ids, w), [W], cot)
    reference = values_and_grads(lambda w: F.embedding.reference(ids, w), [W], cot)
    assert_same(fast, reference, dtype)
    with pytest.raises(IndexError, match="must lie in"):
        native_ops.embedding(np.array([13]), W)


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_kernel_equals_numpys_sum(workers, dtype):
    rng = np.random.default_rng(23)
    a, b = (rng.standard_normal((37, 11)).astype(dtype) for _ in range(2))
    assert native_ops.add_applies(a, b)
    np.testing.assert_array_equal(native_ops.add_arrays(a, b), a + b)
    assert not native_ops.add_applies(a, b.T.copy().T)      # not C-contiguous: NumPy's own sum


def test_pool_called_from_many_threads_at_once_gives_each_its_own_answer(workers):
    """One task runs on the pool at a time; a call that finds it busy works its chunks itself."""
    import concurrent.futures
    rng = np.random.default_rng(24)
    inputs = [leaf(rng, 300, 40) for _ in range(8)]
    expected = [native_ops.gelu(x).data for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: native_ops.gelu(x).data, inputs))
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_pool_cuts_work_into_chunks_that_share_out_evenly(dtype):
    chunks = native.kernels(np.dtype(dtype)).parallel_chunks      # (size, min_chunk, threads)
    assert chunks(1000, 10, 3) == 6                 # two a thread
    assert chunks(48, 16, 2) == 2                   # 3 would fit: one thread would do two, the other one
    assert chunks(50, 10, 3) == 3 and chunks(80, 10, 3) == 6
    assert chunks(25, 10, 3) == 2 and chunks(19, 10, 2) == 1 and chunks(1000, 10, 1) == 1


def test_more_threads_than_cores_give_the_same_numbers_as_that_count_asks_for(monkeypatch):
    """The pool runs no more threads than cores, but the chunks are cut for the count asked for: so 64
    threads give 64's numbers (LayerNorm's parameter sums in 64's chunks), the same on every run."""
    monkeypatch.setattr(native_ops, "KERNEL_MIN_ELEMENTS", 7)
    rng = np.random.default_rng(26)
    x, w, b = leaf(rng, 300, 16), leaf(rng, 16), leaf(rng, 16)
    cot = rng.standard_normal((300, 16))
    runs = []
    for _ in range(2):
        previous = threads.set_workers(64)
        try:
            runs.append(values_and_grads(lambda a, c, d: native_ops.layer_norm(a, 16, c, d), [x, w, b], cot))
        finally:
            threads.set_workers(previous)
    for a, c in zip(*runs):
        np.testing.assert_array_equal(a, c)
    reference = values_and_grads(lambda a, c, d: F.layer_norm.reference(a, 16, c, d), [x, w, b], cot)
    assert_same(runs[0], reference, np.float64)


def test_a_forked_child_runs_the_kernels_on_a_pool_of_its_own():
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    previous = threads.set_workers(2)
    try:
        x = leaf(np.random.default_rng(25), 400, 300)
        expected = native_ops.gelu(x).data            # the parent's pool has started
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_gelu_in_child, (x.data,)).get(timeout=60)
        np.testing.assert_array_equal(got, expected)
    finally:
        threads.set_workers(previous)


def _gelu_in_child(x):
    threads.set_workers(2)
    return native_ops.gelu(npgpt.Tensor(x)).data


def test_the_five_line_loop_leaves_the_blas_thread_count_as_it_was():
    set_count, get_count = threads._find_blas_controls()
    before = get_count()
    assert_five_line_loop_equals_the_reference()
    assert get_count() == before


# ---- the cache of large arrays -------------------------------------------------------------------------

@pytest.fixture
def empty_cache(monkeypatch):
    """The cache of large arrays, empty, with no block begun."""
    from npgpt.fast.cpu import buffers
    monkeypatch.setattr(buffers, "_arrays", {})
    monkeypatch.setattr(buffers, "_own", {"bytes": 0})
    monkeypatch.setattr(buffers, "_blocks", weakref.WeakValueDictionary())
    monkeypatch.setattr(buffers, "_block", {"memory": None, "next": 0, "end": 0})
    return buffers


def test_a_large_array_nobody_holds_is_handed_out_again(empty_cache):
    buffers = empty_cache
    first = buffers.empty((512, 1024), np.float32)          # 2 MB: kept
    address = first.ctypes.data
    held = first
    assert buffers.empty((512, 1024), np.float32) is not held      # in use: a new one
    del first, held
    again = buffers.empty((512, 1024), np.float32)
    assert again.ctypes.data == address                     # the free one, as it was
    view = again.reshape(-1)                                # a view holds its base
    del again
    assert buffers.empty((512, 1024), np.float32).ctypes.data != address
    del view
    assert buffers.empty((512, 1024), np.float64).dtype == np.float64       # another dtype: its own array
    assert buffers.empty((3, 4), np.float32).base is None                  # small: never kept
    assert sum(len(kept) for kept in buffers._arrays.values()) == 3
    buffers.empty((128, 128), np.float32)                   # 64 KB: kept
    buffers.empty((128, 127), np.float32)                   # just under: not
    assert sum(len(kept) for kept in buffers._arrays.values()) == 4


def test_kept_arrays_under_4_mb_are_cut_side_by_side_from_blocks_on_2_mb_boundaries(empty_cache, monkeypatch):
    buffers = empty_cache
    monkeypatch.setattr(buffers, "BLOCK_BYTES", 4 << 20)
    first = buffers.empty((256, 1024), np.float32)                  # 1 MB
    second = buffers.empty((100, 99), np.float64)                   # 79,200 bytes
    third = buffers.empty((64, 1024), np.float32)                   # 256 KB
    assert isinstance(first.base, buffers._Block)
    assert second.base is first.base and third.base is first.base  # one block
    assert first.ctypes.data % (2 << 20) == 0                       # at a 2 MB boundary (a huge page's)
    assert second.ctypes.data == first.ctypes.data + (1 << 20)      # right after it
    assert third.ctypes.data == second.ctypes.data + 79232          # 79,200 rounded up to a cache line (64)
    fourth = buffers.empty((3 << 18,), np.float32)                  # 3 MB: past the block's 4 MB, a new one
    assert fourth.base is not first.base and fourth.ctypes.data % (2 << 20) == 0
    assert buffers.empty((1 << 20,), np.float32).base is None       # 4 MB: an allocation of its own
    owned = buffers.empty((256, 1024), np.float32, own_memory=True)
    assert owned.base is None and owned.flags.owndata
    # a kept array's views hold it, not its block: while one lives, the array is not handed out again
    view = first.reshape(-1)[1:]
    address = first.ctypes.data
    del first
    assert buffers.empty((256, 1024), np.float32).ctypes.data != address
    del view
    assert buffers.empty((256, 1024), np.float32).ctypes.data == address


def test_a_weights_gradient_from_the_kernels_becomes_its_grad_without_a_copy(empty_cache):
    """The engine takes an array that owns its memory as a leaf's .grad as it is and copies any other; the
    kernels' weight gradients own theirs (they are never cut from a block), so no step copies them."""
    rng = np.random.default_rng(3)
    layer = npgpt.nn.Linear(256, 128)
    x = npgpt.Tensor(rng.standard_normal((512, 256)).astype(np.float32))
    assert engine.fast_path_for("linear", (x, layer.weight, layer.bias), {}) is native_ops.linear
    F.linear(x, layer.weight, layer.bias).sum().backward()
    grad = layer.weight.grad
    kept = empty_cache._arrays.get(((128, 256), np.dtype(np.float32), True), [])
    assert any(array is grad for array in kept), "the weight's gradient is not the kernels' own array"
    np.testing.assert_allclose(grad, np.ones((128, 512)) @ x.data.astype(np.float64), rtol=1e-5, atol=1e-4)


PAGE_FAULTS_OF_A_LOOP = """
import resource
import numpy as np, npgpt
import npgpt.functional as F
npgpt.fast.cpu.threads.set_workers(2)
model = npgpt.GPT(vocab_size=65, d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=64, dropout=0.0)
opt = npgpt.optim.AdamW(model.parameters(), lr=1e-3)
ids = np.random.default_rng(0).integers(0, 65, (12, 65))

def step():
    loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 65), ids[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts glibc's page faults")
def test_a_plain_loop_of_the_small_model_takes_no_fresh_pages_a_step():
    """Without the allocator setting a program may opt into, the shakespeare-char model's five-line loop
    reuses its memory: its activations (384 KB) and gradients come from the cache above, not from fresh
    pages (939 faults a step without the cache)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the page faults counted are glibc malloc's")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env["NPGPT_FAST"] = "1"
    proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_LOOP], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 50


def test_the_cache_keeps_no_more_than_its_limit_and_gives_back_what_is_free(empty_cache, monkeypatch):
    buffers = empty_cache
    monkeypatch.setattr(buffers, "MAX_BYTES", 5 << 20)
    held = [buffers.empty((1 << 20,), np.float32) for _ in range(2)]     # 8 MB asked, 4 MB kept each...
    assert buffers.held_bytes() == 4 << 20                  # ... one kept: a second would pass the limit
    assert buffers.release() == 4 << 20                     # in use: still kept
    del held
    assert buffers.release() == 0


def test_the_cache_counts_a_block_whole_while_one_of_its_arrays_lives(empty_cache, monkeypatch):
    buffers = empty_cache
    block_bytes = buffers.BLOCK_BYTES + buffers.PAGE_BYTES
    monkeypatch.setattr(buffers, "MAX_BYTES", block_bytes + (1 << 20))
    first = buffers.empty((256, 1024), np.float32)                  # 1 MB, from a new block
    assert buffers.held_bytes() == block_bytes
    second = buffers.empty((256, 1024), np.float32)                 # from the same block: nothing more
    assert buffers.held_bytes() == block_bytes and second.base is first.base
    owned = buffers.empty((256, 1024), np.float32, own_memory=True)     # 1 MB of its own: within the limit
    assert owned.base is None and buffers.held_bytes() == block_bytes + (1 << 20)
    del owned
    view = first[:1]
    del first, second
    assert buffers.release() == block_bytes                         # a view of one of its arrays lives
    assert buffers.empty((256, 1024), np.float32).base is None      # a new block would pass the limit
    del view
    assert buffers.release() == 0                                   # the block is gone


def test_a_call_observer_hears_each_kernel_call_until_it_is_turned_off():
    heard, also_heard = [], []
    x = npgpt.Tensor(np.random.default_rng(23).standard_normal((64, 300)).astype(np.float32), requires_grad=True)
    library = native.kernels(np.dtype(np.float32))
    original = library.gelu_forward_parallel
    first = native.set_call_observer(lambda name, seconds: also_heard.append(name))
    previous = native.set_call_observer(lambda name, seconds: heard.append((name, seconds)))   # replaces it
    try:
        F.gelu(x).sum().backward()
        F.linear(x, npgpt.Tensor(np.ones((300, 300), np.float32)))
    finally:
        native.set_call_observer(first)
    names = [name for name, _ in heard]
    assert "gelu_forward_parallel" in names and "gemm_parallel" in names
    assert names.index("gelu_forward_parallel") < names.index("gelu_backward_parallel")
    assert all(seconds > 0 for _, seconds in heard) and also_heard == []
    assert previous is not None and native.set_call_observer(None) is None
    # turned off, the kernels are the library's own functions again, and nobody hears them
    assert library.gelu_forward_parallel is original
    count = len(heard)
    F.gelu(x)
    assert len(heard) == count


def test_a_call_observer_set_while_the_kernels_are_turned_off_hears_them_once_on(fresh_build):
    heard = []
    native.set_enabled(False)                   # nothing built or loaded yet
    native.set_call_observer(lambda name, seconds: heard.append(name))
    try:
        native.set_enabled(True)
        F.gelu(npgpt.Tensor(np.ones((8, 8), np.float32)))
    finally:
        native.set_call_observer(None)
    assert heard == ["gelu_forward_parallel"]

"""The model's attention and feed-forward layers as one op each (npgpt/fast/cpu/layers.py) equal the textbook's
forward: values and every gradient, float64 to 1e-12 and float32 to the usual tolerances, on 1 to 4 threads;
with dropout, the same masks as the textbook's ops on the kernels; deterministic; and the textbook's own path
wherever they do not apply (a mask, a KV cache, a replaced Linear, mixed dtypes, one position)."""

import numpy as np
import pytest

import npgpt
from npgpt import engine, nn
from npgpt.fast.cpu import layers
from npgpt.generate import generate
from npgpt.model import FeedForward, LayerKV, MultiHeadAttention

from test_fast_native import built, leaf, tolerance, values_and_grads, workers  # noqa: F401 (fixtures)

FLOATS = [np.float64, np.float32]


def textbook(fn):
    """fn() with every fast path off: the textbook's ops alone."""
    previous = engine.set_fast_paths_enabled(False)
    try:
        return fn()
    finally:
        engine.set_fast_paths_enabled(previous)


def cast(module, dtype, rng):
    """Every parameter of `module` in `dtype`, drawn afresh (non-zero biases, so that their paths count)."""
    for p in module.parameters():
        p.data = (0.3 * rng.standard_normal(p.data.shape)).astype(dtype)
    return module


def values_and_all_grads(module, call, x, cotangent):
    """call(x)'s values and the gradients of x and of every parameter of `module`, and the op that made it."""
    params = module.parameters()
    found = {}

    def fn(x, *_):
        out = call(x)
        found["op"] = out._op
        return out
    return values_and_grads(fn, [x] + params, cotangent), found["op"]


def assert_close(got, expected, dtype):
    """Equal to the dtype's tolerance; in float32 the absolute part is scaled by the largest element of all
    the arrays, as a sum's rounding is (b_k's gradient is 0 in exact arithmetic, and is made of terms as large
    as the other gradients' elements)."""
    assert len(got) == len(expected)
    limits = tolerance(dtype)
    if dtype == np.float32:
        limits["atol"] *= max(1.0, max(float(np.abs(b).max()) for b in expected))
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, **limits)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_the_attention_layer_equals_the_textbook(workers, dtype, bias, causal):
    rng = np.random.default_rng(1)
    layer = cast(MultiHeadAttention(24, 3, dropout=0.0, bias=bias), dtype, rng)
    x = leaf(rng, 2, 9, 24, dtype=dtype)
    cotangent = rng.standard_normal((2, 9, 24))
    fast, op = values_and_all_grads(layer, lambda x: layer(x, None, causal), x, cotangent)
    reference, reference_op = textbook(lambda: values_and_all_grads(layer, lambda x: layer(x, None, causal), x,
                                                                    cotangent))
    assert op == "multi_head_attention" and reference_op == "linear"        # one node; the textbook's W_o last
    assert len(fast) == 2 + (8 if bias else 4)                              # y, dx, the weights (and biases)
    assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_feed_forward_layer_equals_the_textbook(workers, dtype, approximate):
    rng = np.random.default_rng(2)
    layer = cast(FeedForward(16, 40, dropout=0.0, gelu_approximate=approximate), dtype, rng)
    x = leaf(rng, 3, 7, 16, dtype=dtype)
    cotangent = rng.standard_normal((3, 7, 16))
    fast, op = values_and_all_grads(layer, layer, x, cotangent)
    reference, reference_op = textbook(lambda: values_and_all_grads(layer, layer, x, cotangent))
    assert op == "feed_forward" and reference_op == "linear"
    assert_close(fast, reference, dtype)


def with_dropout(layer, call, x, cotangent, seed):
    """(values and gradients, the op that made the output, the generator's next draw afterwards)."""
    npgpt.manual_seed(seed)
    results, op = values_and_all_grads(layer, call, x, cotangent)
    return results, op, npgpt.backend.global_rng().integers(2**62)


@pytest.mark.parametrize("kind", ["attention", "feed_forward"])
def test_with_dropout_the_layers_draw_the_masks_of_the_ops_they_replace(workers, kind, monkeypatch):
    """In training with dropout, each layer draws its mask's seed where the textbook's op would, so the layer
    as one op and the textbook's ops on the kernels give the same values and gradients; two runs are bit for
    bit the same; and some elements really were dropped."""
    rng = np.random.default_rng(3)
    if kind == "attention":
        layer = cast(MultiHeadAttention(16, 2, dropout=0.3, bias=True), np.float64, rng)
        call = lambda x: layer(x, None, True)                   # noqa: E731
    else:
        layer = cast(FeedForward(16, 32, dropout=0.3), np.float64, rng)
        call = layer
    x = leaf(rng, 2, 8, 16)
    cotangent = rng.standard_normal((2, 8, 16))
    op_name = "multi_head_attention" if kind == "attention" else "feed_forward"
    fast, op, next_draw = with_dropout(layer, call, x, cotangent, seed=5)
    assert op == op_name
    again, _, next_draw_again = with_dropout(layer, call, x, cotangent, seed=5)
    for a, b in zip(fast, again):
        np.testing.assert_array_equal(a, b)
    with monkeypatch.context() as patch:
        patch.setitem(engine._fast_paths, op_name, [])
        ops_on_kernels, op, ops_next_draw = with_dropout(layer, call, x, cotangent, seed=5)
    assert op != op_name
    assert_close(fast, ops_on_kernels, np.float64)
    assert next_draw == next_draw_again == ops_next_draw           # as many draws from the generator
    layer.eval()                    # the identity: nothing drawn, nothing dropped
    evaluated, op, eval_next_draw = with_dropout(layer, call, x, cotangent, seed=5)
    npgpt.manual_seed(5)
    assert op == op_name and eval_next_draw == npgpt.backend.global_rng().integers(2**62)
    assert not np.allclose(evaluated[0], fast[0])                                           # dropout did act


def test_the_layers_are_deterministic_for_a_thread_count(workers):
    rng = np.random.default_rng(4)
    model = npgpt.GPT(vocab_size=30, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_seq_len=16, dropout=0.2)
    for p in model.parameters():
        p.data = p.data.astype(np.float32)
    ids = rng.integers(0, 30, (3, 12))

    def run():
        npgpt.manual_seed(7)
        for p in model.parameters():
            p.grad = None
        block = model.blocks[0]
        ops = (block.attention(block.attn_norm(model.token_embedding(ids)), None, True)._op,
               block.ffn(model.token_embedding(ids))._op)
        loss = npgpt.functional.cross_entropy(model(ids).reshape(-1, 30), ids.reshape(-1))
        loss.backward()
        return ops, [loss.data] + [p.grad.copy() for p in model.parameters()]
    (ops, first), (_, second) = run(), run()
    assert ops == ("multi_head_attention", "feed_forward")
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_frozen_weights_get_no_gradient_and_the_rest_are_the_textbooks(workers):
    rng = np.random.default_rng(5)
    layer = cast(MultiHeadAttention(16, 2, dropout=0.0, bias=True), np.float64, rng)
    ffn = cast(FeedForward(16, 24, dropout=0.0), np.float64, rng)
    layer.W_k.weight.requires_grad = layer.W_o.weight.requires_grad = ffn.linear1.weight.requires_grad = False
    x = leaf(rng, 2, 5, 16)
    x.requires_grad = False         # nor the input: only the other weights' gradients are made

    def grads():
        for p in layer.parameters() + ffn.parameters():
            p.grad = None
        attended = layer(x, None, True)
        out = ffn(attended)
        out.sum().backward()
        return (attended._op, out._op), [p.grad for p in layer.parameters() + ffn.parameters()]
    (ops, fast), (_, reference) = grads(), textbook(grads)
    assert ops == ("multi_head_attention", "feed_forward")
    assert [g is None for g in fast] == [g is None for g in reference] == \
        [not p.requires_grad for p in layer.parameters() + ffn.parameters()]
    for got, expected in zip(fast, reference):
        if got is not None:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_only_w_o_learning_keeps_no_attention_weights_and_gets_the_textbooks_gradient(workers):
    """With x, W_q, W_k, W_v and their biases frozen, the backward makes only W_o's and b_o's gradients."""
    rng = np.random.default_rng(8)
    layer = cast(MultiHeadAttention(16, 2, dropout=0.0, bias=True), np.float64, rng)
    for p in (layer.W_q, layer.W_k, layer.W_v):
        p.weight.requires_grad = p.bias.requires_grad = False
    x = npgpt.Tensor(rng.standard_normal((2, 5, 16)))

    def grads():
        layer.W_o.weight.grad = layer.W_o.bias.grad = None
        out = layer(x, None, True)
        (out * out).sum().backward()
        return out._op, [layer.W_o.weight.grad, layer.W_o.bias.grad]
    (op, fast), (_, reference) = grads(), textbook(grads)
    assert op == "multi_head_attention"
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["W_o bias only", "W_q, W_k, W_v biases only", "tied W_q and W_k",
                                  "strided input and biases", "linear2 without a bias"])
def test_odd_but_valid_layers_equal_the_textbook(workers, case):
    rng = np.random.default_rng(9)
    layer = cast(MultiHeadAttention(16, 2, dropout=0.0, bias=case != "W_o bias only"), np.float64, rng)
    ffn = cast(FeedForward(16, 24, dropout=0.0), np.float64, rng)
    x = leaf(rng, 2, 6, 16)
    if case == "W_o bias only":
        layer.W_o.bias = nn.Parameter(rng.standard_normal(16))
    elif case == "W_q, W_k, W_v biases only":
        layer.W_o.bias = None
    elif case == "tied W_q and W_k":
        layer.W_k.weight = layer.W_q.weight
    elif case == "strided input and biases":
        x = npgpt.Tensor(rng.standard_normal((2, 6, 32))[:, :, ::2], requires_grad=True)   # every other column
        for linear in (layer.W_q, layer.W_k, layer.W_v, layer.W_o, ffn.linear2):
            linear.bias.data = rng.standard_normal(32)[::2]     # a strided bias
    else:
        ffn.linear2.bias = None
    parameters = layer.parameters() + ffn.parameters()

    def run():
        for p in parameters + [x]:
            p.grad = None
        attended = layer(x, None, True)
        out = ffn(attended)
        (out * out).sum().backward()
        return (attended._op, out._op), [out.data] + [p.grad for p in parameters]
    (ops, fast), (_, reference) = run(), textbook(run)
    assert ops == ("multi_head_attention", "feed_forward")
    assert len(fast) == len(reference) == 1 + len(parameters)
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


class LoRALinear(nn.Linear):
    """A Linear that adds a low-rank update: its forward is not the plain product the layers fold in."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_the_textbooks_path_runs_wherever_the_layers_do_not_apply(workers):
    rng = np.random.default_rng(6)
    layer = cast(MultiHeadAttention(16, 2, dropout=0.0), np.float64, rng)
    x = leaf(rng, 2, 6, 16)
    assert engine.fast_path_for("multi_head_attention", (layer, x, None, True), {}) is layers.multi_head_attention
    mask = np.triu(np.ones((6, 6), dtype=bool), 1)
    assert engine.fast_path_for("multi_head_attention", (layer, x, mask), {}) is None         # a mask
    assert engine.fast_path_for("multi_head_attention", (layer, x[:, :1]), {}) is None         # one position
    assert engine.fast_path_for("multi_head_attention", (layer, x, None, False, object()), {}) is None  # a cache
    with_lora = cast(MultiHeadAttention(16, 2, dropout=0.0), np.float64, rng)
    with_lora.W_q = cast(LoRALinear(16, 16, bias=False), np.float64, rng)
    assert engine.fast_path_for("multi_head_attention", (with_lora, x, None, True), {}) is None
    # a replaced Linear's own forward runs: the result is the textbook's, LoRA's doubling included
    out = with_lora(x, None, True)
    np.testing.assert_allclose(out.data, textbook(lambda: with_lora(x, None, True)).data, rtol=1e-12)
    mixed = cast(MultiHeadAttention(16, 2, dropout=0.0), np.float32, rng)
    assert engine.fast_path_for("multi_head_attention", (mixed, x, None, True), {}) is None    # float32 weights
    ffn = cast(FeedForward(16, 24), np.float64, rng)
    assert engine.fast_path_for("feed_forward", (ffn, x), {}) is layers.feed_forward
    ffn.train()
    ffn.dropout.p = 1.0                                     # drops everything: the textbook's dropout
    assert engine.fast_path_for("feed_forward", (ffn, x), {}) is None
    ffn.eval()
    ffn.dropout.p = 1.5                                     # F.dropout's error, even in eval mode
    assert engine.fast_path_for("feed_forward", (ffn, x), {}) is None
    ffn.train()
    ffn.dropout.p = 0.1
    ffn.linear2 = LoRALinear(24, 16)
    assert engine.fast_path_for("feed_forward", (ffn, x), {}) is None


def test_a_small_layer_is_left_to_the_ops_and_a_large_one_runs_whole():
    """Without the tests' lowered threshold: a tiny model's layer of more than FEW_ROWS rows runs op by op;
    one of at most FEW_ROWS rows runs whole, its products few_rows_product's."""
    rng = np.random.default_rng(7)
    layer = cast(MultiHeadAttention(16, 2, dropout=0.0), np.float32, rng)
    assert engine.fast_path_for("multi_head_attention", (layer, leaf(rng, 1, 8, 16, dtype=np.float32)), {}) \
        is None
    assert engine.fast_path_for("multi_head_attention", (layer, leaf(rng, 1, 4, 16, dtype=np.float32)), {}) \
        is layers.multi_head_attention
    wide = cast(MultiHeadAttention(128, 4, dropout=0.0), np.float32, rng)
    x = leaf(rng, 4, 64, 128, dtype=np.float32)             # 256 x 128 x 128 multiply-adds in each product
    assert engine.fast_path_for("multi_head_attention", (wide, x, None, True), {}) is layers.multi_head_attention


# ---- generation: new positions against a KV cache ----------------------------------------------------------

def small_gpt(dtype, rng, **config):
    """A 2-block GPT in eval mode, every parameter drawn afresh in `dtype`."""
    model = npgpt.GPT(vocab_size=50, d_model=24, num_heads=3, num_layers=2, d_ff=40, max_seq_len=16, **config)
    cast(model, dtype, rng)
    model.eval()
    return model


def ops_of(fn):
    """fn()'s result and the names of the ops it ran, in order."""
    names = []
    previous = engine.set_op_observer(lambda op, backward: names.append(op) or backward)
    try:
        return fn(), names
    finally:
        engine.set_op_observer(previous)


def steps_through_a_cache(model, ids, spans):
    """The logits of model(ids[:, a:b]) for each (a, b) of `spans` in turn against one new KV cache, under
    no_grad, then the cache's keys and values of every layer."""
    cache = model.new_kv_cache(ids.shape[0])
    with npgpt.no_grad():
        logits = [model(ids[:, a:b], kv_cache=cache).data for a, b in spans]
    return logits + [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("gpt2", [False, True])
def test_a_generated_tokens_blocks_run_as_one_op_each_and_equal_the_textbook(workers, dtype, gpt2):
    """A batch of 2: a prompt of 5 positions (more than FEW_ROWS a sequence: the textbook's block), then steps
    of 1 and of 2 new positions (block_with_cache): each step's logits and the cache's keys and values equal
    the textbook's, for the tutorial's GPT and for GPT-2's switches (biases, tanh GELU, its eps); greedy
    generation gives the textbook's tokens."""
    rng = np.random.default_rng(8)
    config = dict(attention_bias=True, gelu_approximate="tanh", layer_norm_eps=1e-6) if gpt2 else {}
    model = small_gpt(dtype, rng, **config)
    ids = rng.integers(0, 50, (2, 8))

    def steps():
        return steps_through_a_cache(model, ids, ((0, 5), (5, 6), (6, 8)))
    fast, names = ops_of(steps)
    assert names.count("transformer_block") == 2 * 2                    # the two steps' blocks, whole
    assert_close(fast, textbook(steps), dtype)
    prompt = ids[:, :4]
    tokens = generate(model, prompt, 8, temperature=0.0)
    np.testing.assert_array_equal(tokens, textbook(lambda: generate(model, prompt, 8, temperature=0.0)))


class ScaledNorm(nn.LayerNorm):
    """A LayerNorm of another class: the block's one call, which knows only the textbook's, leaves it alone."""

    def forward(self, x):
        return super().forward(x) * 0.5


def random_cache(model, batch, length, rng):
    """A cache of `batch` sequences whose first `length` positions hold random keys and values."""
    cache = model.new_kv_cache(batch)
    for layer in cache.layers:
        layer.keys[:, :, :length] = rng.standard_normal(layer.keys[:, :, :length].shape)
        layer.values[:, :, :length] = rng.standard_normal(layer.values[:, :, :length].shape)
    cache.length = length
    return cache


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("batch, new", [(2, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_in_a_block_of_its_own_the_attention_alone_runs_as_one_op(workers, dtype, batch, new, bias):
    """A block whose LayerNorm is not the textbook's: the block runs its own body, and its attention over the
    cache is one op (attention_with_cache): `new` positions a sequence after 7 cached ones of random keys and
    values, equal to the textbook's, the cache's new keys and values too."""
    rng = np.random.default_rng(9)
    model = small_gpt(dtype, rng, attention_bias=bias)
    block = model.blocks[0]
    block.ffn_norm = cast(ScaledNorm(24), dtype, rng)
    x = leaf(rng, batch, new, 24, dtype=dtype)
    cache = random_cache(model, batch, 7, rng)
    with npgpt.no_grad():
        assert engine.fast_path_for("transformer_block", (block, x, None, False, cache.layers[0]), {}) is None
        assert engine.fast_path_for("multi_head_attention", (block.attention, block.attn_norm(x), None, False,
                                                             cache.layers[0]), {}) is layers.attention_with_cache
    saved = [(layer.keys.copy(), layer.values.copy()) for layer in cache.layers]

    def step():
        for layer, (keys, values) in zip(cache.layers, saved):
            layer.keys[...], layer.values[...] = keys, values
        with npgpt.no_grad():
            return [block(x, None, False, cache.layers[0]).data, cache.layers[0].keys.copy(),
                    cache.layers[0].values.copy()]
    fast, names = ops_of(step)
    assert names.count("multi_head_attention") == 1 and "scaled_dot_product_attention" not in names
    assert_close(fast, textbook(step), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_block_without_biases_or_layer_norm_weights_equals_the_textbook(workers, dtype):
    """The one call with every optional part absent (its addresses 0): no LayerNorm weight or bias, no
    biases on the feed-forward network's Linears; 2 new positions after 5 cached ones."""
    rng = np.random.default_rng(12)
    model = small_gpt(dtype, rng)
    block = model.blocks[1]
    for norm in (block.attn_norm, block.ffn_norm):
        norm.weight = norm.bias = None
    block.ffn.linear1.bias = block.ffn.linear2.bias = None
    x = leaf(rng, 2, 2, 24, dtype=dtype)
    cache = random_cache(model, 2, 5, rng)
    saved = (cache.layers[1].keys.copy(), cache.layers[1].values.copy())

    def step():
        cache.layers[1].keys[...], cache.layers[1].values[...] = saved
        with npgpt.no_grad():
            return [block(x, None, False, cache.layers[1]).data, cache.layers[1].keys.copy(),
                    cache.layers[1].values.copy()]
    fast, names = ops_of(step)
    assert names == ["transformer_block"]
    assert_close(fast, textbook(step), dtype)


def test_a_blocks_one_call_gives_the_same_bits_on_any_thread_count(monkeypatch):
    """Every product's element and every head is one thread's work in a fixed order."""
    from npgpt.fast.cpu import native_ops, threads
    monkeypatch.setattr(native_ops, "KERNEL_MIN_ELEMENTS", 7)
    rng = np.random.default_rng(13)
    model = small_gpt(np.float32, rng)
    x = leaf(rng, 2, 2, 24, dtype=np.float32)
    results = []
    for count in (1, 2, 3, 4):
        previous = threads.set_workers(count)
        try:
            cache = random_cache(model, 2, 6, np.random.default_rng(14))
            with npgpt.no_grad():
                out, names = ops_of(lambda: model.blocks[0](x, None, False, cache.layers[0]).data)
            assert names == ["transformer_block"]
            results.append((out, cache.layers[0].keys))
        finally:
            threads.set_workers(previous)
    for out, keys in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(keys, results[0][1])


@pytest.mark.parametrize("dtype", FLOATS)
def test_many_sequences_at_once_take_the_blocks_one_call_and_equal_the_textbook(workers, dtype):
    """6 sequences: a prompt of 4 positions, then steps of 1 and of 3 new positions (24, 6 and 18 rows, more
    than FEW_ROWS in all): each block of each step one call, its products few_rows_product's on those rows."""
    rng = np.random.default_rng(15)
    model = small_gpt(dtype, rng, attention_bias=True)
    ids = rng.integers(0, 50, (6, 8))

    def steps():
        return steps_through_a_cache(model, ids, ((0, 4), (4, 5), (5, 8)))
    fast, names = ops_of(steps)
    assert names.count("transformer_block") == 3 * 2
    assert_close(fast, textbook(steps), dtype)


class OtherCache(LayerKV):
    """A LayerKV of another class, whose extend might return other arrays or a mask: the cache paths, which
    know the textbook's, leave it alone."""


def test_the_textbooks_block_runs_wherever_the_cache_paths_do_not_apply(workers):
    rng = np.random.default_rng(10)
    model = small_gpt(np.float64, rng)
    block, x = model.blocks[0], leaf(rng, 2, 1, 24)
    cache = model.new_kv_cache(2)
    layer_cache = cache.layers[0]

    def chosen(*args, op="transformer_block", layer=block):
        with npgpt.no_grad():
            return engine.fast_path_for(op, (layer,) + args, {})
    assert chosen(x, None, False, layer_cache) is layers.block_with_cache
    assert chosen(leaf(rng, 2, 5, 24), None, False, layer_cache) is None               # more than FEW_ROWS
    many = (leaf(rng, 5, 1, 24), None, False, model.new_kv_cache(5).layers[0])         # 5 sequences, 5 rows
    assert chosen(*many) is layers.block_with_cache
    previous, layers.BLOCK_WITH_CACHE_MAX_ROWS = layers.BLOCK_WITH_CACHE_MAX_ROWS, 4
    try:                                        # more rows than the block's cap: its attention alone, whole
        assert chosen(*many) is None
        assert chosen(block.attn_norm(many[0]), *many[1:], op="multi_head_attention", layer=block.attention) \
            is layers.attention_with_cache
    finally:
        layers.BLOCK_WITH_CACHE_MAX_ROWS = previous
    assert chosen(x, np.ones((1, 1), dtype=bool), False, layer_cache) is None          # a mask
    assert chosen(x) is None                                                            # no cache
    other = OtherCache(cache, layer_cache.keys.shape, np.float64, np)
    assert chosen(x, None, False, other) is None                                        # another cache class
    assert chosen(block.attn_norm(x), None, False, other, op="multi_head_attention", layer=block.attention) is None
    cache.length = 16
    assert chosen(x, None, False, layer_cache) is None                                  # the cache is full
    cache.length = 0
    strided = model.new_kv_cache(2)
    strided.layers[0].keys = np.zeros((2, 3, 16, 16))[..., ::2]                         # not contiguous
    assert chosen(x, None, False, strided.layers[0]) is None
    flat = model.new_kv_cache(2)
    flat.layers[0].keys = flat.layers[0].values = np.zeros((2, 3, 16))                 # not (B, H, S, D)
    assert chosen(x, None, False, flat.layers[0]) is None
    short = model.new_kv_cache(2)
    short.layers[0].values = short.layers[0].values[:, :, :8].copy()                   # keys and values differ
    assert chosen(x, None, False, short.layers[0]) is None
    model32 = small_gpt(np.float32, rng)
    x32 = leaf(rng, 2, 1, 24, dtype=np.float32)
    assert chosen(x32, None, False, model32.new_kv_cache(2).layers[0], layer=model32.blocks[0]) \
        is layers.block_with_cache
    wide = LayerKV(model32.new_kv_cache(2), (2, 3, 16, 8), np.float64, np)             # a float64 cache
    assert chosen(x32, None, False, wide, layer=model32.blocks[0]) is None
    # recording a graph: grad mode on and the parameters need gradients; or x alone needs one
    assert engine.fast_path_for("transformer_block", (block, x, None, False, layer_cache), {}) is None
    for p in model.parameters():
        p.requires_grad = False
    assert engine.fast_path_for("transformer_block", (block, x, None, False, layer_cache), {}) is None
    x_constant = npgpt.Tensor(x.data)
    assert engine.fast_path_for("transformer_block", (block, x_constant, None, False, layer_cache), {}) \
        is layers.block_with_cache
    model.train()                                                                       # dropout 0.1 in training
    assert chosen(x, None, False, layer_cache) is None
    assert chosen(block.attn_norm(x), None, False, layer_cache, op="multi_head_attention",
                  layer=block.attention) is None
    for module in model.modules():                                                      # p = 0 in training
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert chosen(x, None, False, layer_cache) is layers.block_with_cache
    model.eval()
    block.ffn.linear2 = cast(LoRALinear(40, 24), np.float64, rng)                      # a replaced Linear
    assert chosen(x, None, False, layer_cache) is None

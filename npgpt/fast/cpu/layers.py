"""The model's layers as one op each on the C kernels: its attention and its feed-forward network, and in
generation (new positions against a KV cache, no graph) the attention and the whole block.

    multi_head_attention   MultiHeadAttention.forward (npgpt/model.py). Q, K and V come from one product,
                           x times the transpose of W_q, W_k and W_v stacked (3C, C); the attention kernel reads
                           each head where it lies in that (N, 3C) result and writes the context heads side by
                           side; then W_o. The backward writes dQ, dK and dV into one (N, 3C) array, so that
                           dx (= dQ W_q + dK W_k + dV W_v) is one product over the stack, and the three weights'
                           gradients are one more.
    feed_forward           FeedForward.forward: linear1, GELU, linear2 and dropout.
    attention_with_cache   MultiHeadAttention.forward on at most FEW_ROWS new positions a sequence against a
                           KV cache: the three projections, the cache's extend, the kernels' attention of the new
                           queries over the cache, W_o; no graph.
    block_with_cache       TransformerBlock.forward likewise: the whole block in one call of the kernels.

The textbook runs a block's attention as 13 ops (four linears, the views and transposes of the heads,
scaled_dot_product_attention) and its feed-forward network as 4, each a node of the graph with its own
dispatch, arguments and backward closure. Here each is one node: the same maths on the same kernels
(native_ops' products, attention, GELU and dropout), with Python's work between the kernel calls and the
engine's bookkeeping made once. On the shakespeare-char model, whose ops are small, that is most of what
Python costs a step.

They apply where the layer's Linears and Dropout are the textbook's own (not subclassed, their forward not
replaced, as a LoRA adapter would replace one), its weights are NumPy arrays of the input's dtype, and the
products are large enough for the kernels' pool (native_ops.SMALL_PRODUCT) or of at most native_ops.FEW_ROWS
rows; for the attention also more than one position, no mask and no KV cache, and W_q, W_k and W_v all with a
bias or all without; for the feed-forward network exact or tanh GELU, and a dropout p below 1 in training.
The two paths with a KV cache take the textbook's own LayerKV, at most FEW_ROWS new positions a sequence (a
longer prompt runs the textbook's block), no mask, no dropout in effect and nothing that records a graph; the
block also its own LayerNorms and Dropouts, and at most BLOCK_WITH_CACHE_MAX_ROWS rows in all.
Anything else runs the textbook's forward, whose ops dispatch one by one as always. The dropout
masks are the kernels' hashed ones, their seeds drawn from the generator where the ops' fast paths would draw
them, so the layer as one op and its ops on the kernels give the same masks, and values and gradients equal to
rounding (one product over the stack sums in another order than three and their sum).
``tests/test_fast_layers.py`` holds each equal to the textbook's forward and its gradients.
"""

import numpy as np

from ... import functional as F
from ... import nn
from ...engine import _make, records_graph, register_fast_path
from . import buffers, native, native_ops

at = native.address


# ========================================================================================================
# multi_head_attention

def multi_head_attention(self, x, mask=None, is_causal=False, kv_cache=None):
    """MultiHeadAttention.forward as one op: y = attention(x W_q^T, x W_k^T, x W_v^T) W_o^T (+ biases).

    Forward, x (B, T, C), N = B T:
        qkv = x [W_q; W_k; W_v]^T + [b_q; b_k; b_v]       (N, 3C): q, k, v side by side, each H heads of D
        context = attention(q, k, v)                        (N, C): heads side by side
        y = context W_o^T + b_o                             (N, C)
    Backward, from dy:
        dcontext = dy W_o,  dW_o = dy^T context,  db_o = sum_n dy
        dq, dk, dv = the attention's backward, written into dqkv (N, 3C) side by side
        dx = dqkv [W_q; W_k; W_v],  d[W_q; W_k; W_v] = dqkv^T x,  d[b_q; b_k; b_v] = sum_n dqkv
    The three weights' gradients are views of one (3C, C) array (the engine copies each into its own .grad).
    Where neither x nor W_q, W_k, W_v nor their biases need a gradient, P is not kept and only W_o's are made.
    """
    x = F._t(x)
    B, T, C = x.shape
    H, D = self.num_heads, self.d_k
    N, dtype = B * T, x.dtype
    projections = (self.W_q, self.W_k, self.W_v)
    x2d = native_ops._rows_view(x.data.reshape(N, C))                            # (N, C)
    W_qkv = buffers.empty((3 * C, C), dtype)                                     # (3C, C)
    np.concatenate([p.weight.data for p in projections], out=W_qkv)
    b_qkv = np.concatenate([p.bias.data for p in projections]) if self.W_q.bias is not None else None
    qkv = buffers.empty((N, 3 * C), dtype)
    native_ops._product(x2d, W_qkv, qkv, trans_b=True, bias=b_qkv)
    q, k, v = (_heads(qkv, part, B, T, H, D) for part in range(3))               # (B, H, T, D) views
    dropout_p = self.dropout.p if self.training else 0.0
    attention = native_ops.Attention(q, k, v, dtype.type(1.0 / np.sqrt(D)), is_causal, dropout_p)
    context = buffers.empty((B, T, H, D), dtype)                                # (N, C): heads side by side
    W_o, b_o = self.W_o.weight, self.W_o.bias
    qkv_parents = (x,) + tuple(p.weight for p in projections)
    if b_qkv is not None:
        qkv_parents += tuple(p.bias for p in projections)
    parents = qkv_parents[:4] + (W_o,) + qkv_parents[4:] + ((b_o,) if b_o is not None else ())
    qkv_needs_grad = records_graph(qkv_parents)
    attention.forward(context.transpose(0, 2, 1, 3), keep_probs=qkv_needs_grad)
    context2d = context.reshape(N, C)
    w_o = native_ops._rows_view(W_o.data)
    y = buffers.empty((N, C), dtype)
    native_ops._product(context2d, w_o, y, trans_b=True, bias=_data(b_o))

    def backward(grad):
        grad_y = native_ops._rows_view(np.asarray(grad, dtype=dtype).reshape(N, C))      # (N, C)
        grad_context, grad_W_o = native_ops._linear_grads(grad_y, context2d, w_o, qkv_needs_grad,
                                                          W_o.requires_grad)
        grad_b_o = native_ops._column_sums(grad_y) if b_o is not None and b_o.requires_grad else None
        if not qkv_needs_grad:          # only W_o (and b_o) learn: P was not kept, nothing flows further
            grads = [None] * len(parents)
            grads[4] = grad_W_o
            if b_o is not None:
                grads[-1] = grad_b_o
            return tuple(grads)
        grad_qkv = buffers.empty((N, 3 * C), dtype)
        attention.backward(grad_context.reshape(B, T, H, D).transpose(0, 2, 1, 3),
                           tuple(_heads(grad_qkv, part, B, T, H, D) for part in range(3)))
        weights_need = any(p.weight.requires_grad for p in projections)
        grad_x, grad_W_qkv = native_ops._linear_grads(grad_qkv, x2d, W_qkv, x.requires_grad, weights_need)
        grads = (grad_x.reshape(B, T, C) if grad_x is not None else None,)
        grads += _thirds(grad_W_qkv, C) + (grad_W_o,)
        if b_qkv is not None:
            needed = any(p.bias.requires_grad for p in projections)
            grads += _thirds(native_ops._column_sums(grad_qkv) if needed else None, C)
        if b_o is not None:
            grads += (grad_b_o,)
        return grads
    return _make(y.reshape(B, T, C), parents, backward, "multi_head_attention")


def _heads(qkv, part, B, T, H, D):
    """Part 0, 1 or 2 (q, k or v) of (N, 3C) seen as (B, H, T, D): a view, each head's rows 3C apart."""
    C = H * D
    return _as_heads(qkv[:, part * C:(part + 1) * C], B, T, H, D)


def _as_heads(a, B, T, H, D):
    """(N, C) rows, N = B T, heads side by side, seen as (B, H, T, D): a view."""
    return a.reshape(B, T, H, D).transpose(0, 2, 1, 3)


def _thirds(a, C):
    """(3C, ...) as its three (C, ...) parts, views; (None, None, None) for None."""
    return (None,) * 3 if a is None else (a[:C], a[C:2 * C], a[2 * C:])


def attention_applies(self, x, mask=None, is_causal=False, kv_cache=None):
    """The layer on a (B, T, C) NumPy input with T > 1, no mask and no KV cache; its four projections plain
    Linears of (C, C) weights of the input's dtype, W_q, W_k and W_v all with a bias or all without; its
    dropout's p (all the textbook's forward reads of it) in [0, 1]; large enough products."""
    data = x.data if isinstance(x, F.Tensor) else x
    if mask is not None or kv_cache is not None or not isinstance(data, np.ndarray) or data.ndim != 3 \
            or data.shape[1] < 2:
        return False
    C = data.shape[2]
    projections = (self.W_q, self.W_k, self.W_v, self.W_o)
    if C != self.d_model or not all(_plain_linear(p, C, C, data.dtype) for p in projections):
        return False
    if len({p.bias is None for p in projections[:3]}) != 1 or not _probability(self.dropout):
        return False
    return native_ops.linear_applies(data, self.W_q.weight.data)      # its products large enough, as linear's


# ========================================================================================================
# multi_head_attention on generation's new positions, with a KV cache

def attention_with_cache(self, x, mask=None, is_causal=False, kv_cache=None):
    """MultiHeadAttention.forward on a few new positions against a KV cache, as one op that records no graph
    (generation asks for none). x (B, T, C), N = B T:
        q, k, v = x W_q^T + b_q, x W_k^T + b_k, x W_v^T + b_v      (N, C) each, seen as (B, H, T, D)
        kv_cache.extend(k, v): the cache keeps the new keys and values and gives back all S positions'
        context: new query i (position S - T + i) attends over keys 0 .. S - T + i (the textbook's mask of
                 the new positions against the cache), by the kernels' attention_cached
        y = context W_o^T + b_o                                     (N, C)
    Each product of at most FEW_ROWS rows is few_rows_product: every weight read once, by the pool's threads.
    (Inside the textbook's own block, block_with_cache below runs this and the rest of the block in one call.)
    """
    x = F._t(x)
    B, T, C = x.shape
    H, D = self.num_heads, self.d_k
    N = B * T
    x2d = native_ops._rows_view(x.data.reshape(N, C))                            # (N, C)
    q, k, v = (_project(x2d, p) for p in (self.W_q, self.W_k, self.W_v))       # (N, C) each
    keys, values, _ = kv_cache.extend(F.Tensor(_as_heads(k, B, T, H, D)), F.Tensor(_as_heads(v, B, T, H, D)))
    context = buffers.empty((B, T, H, D), x.dtype)                              # (N, C): heads side by side
    native_ops.attention_cached(_as_heads(q, B, T, H, D), keys.data, values.data, context.transpose(0, 2, 1, 3),
                                x.dtype.type(1.0 / np.sqrt(D)))
    y = _project(context.reshape(N, C), self.W_o)
    return _make(y.reshape(B, T, C), (x,), None, "multi_head_attention")


def _project(x2d, linear):
    """x2d (N, in) W^T + b for the Linear's W (out, in) and b: (N, out), from the buffers' cache."""
    W = native_ops._rows_view(linear.weight.data)
    out = buffers.empty((x2d.shape[0], W.shape[0]), x2d.dtype)
    native_ops._product(x2d, W, out, trans_b=True, bias=_data(linear.bias))
    return out


def attention_with_cache_applies(self, x, mask=None, is_causal=False, kv_cache=None):
    """A NumPy (B, T, C) input of 1 to FEW_ROWS new positions a sequence, no mask, and the textbook's own
    LayerKV (whose extend gives back the cache's arrays with the new positions last) of contiguous NumPy arrays
    (B, H, capacity, D) of the input's dtype, with room for the new positions; the four projections plain
    Linears of (C, C) weights of that dtype; no dropout on the attention (eval mode, or p = 0); and nothing
    that records a graph."""
    if kv_cache is None:        # training, and a forward pass without a cache: asked first, answered at once
        return False
    from ... import model       # here, not at the top: `python -m npgpt.model` must find it not yet imported
    data = x.data if isinstance(x, F.Tensor) else x
    if type(kv_cache) is not model.LayerKV or mask is not None or not isinstance(data, np.ndarray) \
            or data.ndim != 3 or data.shape[0] < 1 or not 1 <= data.shape[1] <= native_ops.FEW_ROWS:
        return False
    B, T, C = data.shape
    keys, values, length = kv_cache.keys, kv_cache.values, kv_cache.owner.length
    if not (isinstance(keys, np.ndarray) and isinstance(values, np.ndarray) and keys.ndim == 4
            and keys.shape == values.shape and keys.shape[:2] == (B, self.num_heads) and keys.shape[3] == self.d_k
            and keys.dtype == values.dtype == data.dtype and keys.flags.c_contiguous and values.flags.c_contiguous
            and isinstance(length, int) and 0 <= length and length + T <= keys.shape[2]):
        return False
    projections = (self.W_q, self.W_k, self.W_v, self.W_o)
    if C != self.d_model or not all(_plain_linear(p, C, C, data.dtype) for p in projections):
        return False
    if self.training and self.dropout.p != 0.0:
        return False
    parents = ((x,) if isinstance(x, F.Tensor) else ()) + tuple(p.weight for p in projections) + \
        tuple(p.bias for p in projections if p.bias is not None)
    return not records_graph(parents) and native.kernels(data.dtype) is not None


# ========================================================================================================
# transformer_block on generation's new positions, with a KV cache

BLOCK_WITH_CACHE_MAX_ROWS = 64    # the most rows (sequences x new positions) the block's one call takes: its
                                  # products are all few_rows_product's, which read W once but multiply at a
                                  # fraction of the BLAS's speed. A generated token of the tutorial GPT took
                                  # 3.1 ms this way against 10.2 ms op by op at batch 8, 13.0 against 21.5 ms
                                  # at 64, and about as long at 128 (25.3 against 27.0 ms)


def block_with_cache(self, x, mask=None, is_causal=False, kv_cache=None):
    """TransformerBlock.forward on a few new positions against a KV cache, as one op that records no graph.
    x (B, T, C), N = B T:
        h = x + attention(attn_norm(x))                 attention_with_cache's maths, the cache's extend
        y = h + linear2(gelu(linear1(ffn_norm(h))))     the feed-forward network
    Its dropouts are the identity (eval mode, or p = 0). A generated token's block is a few rows, whose ops
    cost more in Python than in arithmetic: the textbook's 6 ops (two LayerNorms, the attention, the
    feed-forward network, two sums) are one call of the kernels' block_with_cache here, on their kernels.
    """
    x = F._t(x)
    B, T, C = x.shape
    dtype, attention, ffn = x.dtype, self.attention, self.ffn
    x2d = np.ascontiguousarray(x.data).reshape(B * T, C)                        # (N, C)
    y = buffers.empty((B * T, C), dtype)
    weights = np.array([0 if p is None else at(p.data) for m in _block_parts(self) for p in (m.weight, m.bias)],
                       dtype=np.uint64)                                          # kernels.c's order
    dims = np.array([B, T, C, attention.num_heads, ffn.linear1.out_features, kv_cache.owner.length,
                     kv_cache.keys.shape[2]], dtype=np.int64)
    if native.kernels(dtype).block_with_cache(at(x2d), at(y), at(weights), at(kv_cache.keys), at(kv_cache.values),
                                              at(dims), dtype.type(1.0 / np.sqrt(attention.d_k)),
                                              self.attn_norm.eps, self.ffn_norm.eps,
                                              int(ffn.gelu_approximate == "tanh"), native_ops._threads(),
                                              native_ops.KERNEL_MIN_ELEMENTS):
        raise MemoryError("transformer_block: no memory for the kernel's scratch")
    return _make(y.reshape(B, T, C), (x,), None, "transformer_block")


def block_with_cache_applies(self, x, mask=None, is_causal=False, kv_cache=None):
    """The textbook's own block: its attention, feed-forward network, LayerNorms and Dropouts of the
    textbook's classes, none with its forward replaced; every dropout the identity (eval mode, or p = 0); the
    attention where attention_with_cache applies (its cache the textbook's LayerKV, whose extend the kernel
    does); at most BLOCK_WITH_CACHE_MAX_ROWS rows in all; plain Linears C -> d_ff -> C and exact or tanh GELU
    in the feed-forward network; every weight contiguous; and nothing that records a graph."""
    from ... import model       # here, not at the top: `python -m npgpt.model` must find it not yet imported
    if not attention_with_cache_applies(self.attention, x, mask, is_causal, kv_cache):
        return False
    data = x.data if isinstance(x, F.Tensor) else x
    if data.shape[0] * data.shape[1] > BLOCK_WITH_CACHE_MAX_ROWS:
        return False
    C, dtype, ffn = data.shape[2], data.dtype, self.ffn
    if not (_textbook(self.attention, model.MultiHeadAttention) and _textbook(ffn, model.FeedForward)
            and all(_textbook(n, nn.LayerNorm) and _affine_of(n, C, dtype) for n in (self.attn_norm, self.ffn_norm))
            and all(_identity_dropout(d) for d in (self.dropout, ffn.dropout))):
        return False
    d_ff = getattr(ffn.linear1, "out_features", 0)
    if ffn.gelu_approximate not in ("none", "tanh") or not (_plain_linear(ffn.linear1, d_ff, C, dtype)
                                                            and _plain_linear(ffn.linear2, C, d_ff, dtype)):
        return False
    parameters = [p for m in _block_parts(self) for p in (m.weight, m.bias) if p is not None]
    return all(p.data.flags.c_contiguous for p in parameters) and not records_graph(parameters)


def _block_parts(block):
    """The block's modules that hold its weights, in the order of block_with_cache's `weights` (kernels.c)."""
    attention, ffn = block.attention, block.ffn
    return (block.attn_norm, attention.W_q, attention.W_k, attention.W_v, attention.W_o, block.ffn_norm,
            ffn.linear1, ffn.linear2)


def _textbook(module, cls):
    """`module` is an instance of `cls` itself, its forward not replaced."""
    return type(module) is cls and "forward" not in vars(module)


def _affine_of(norm, C, dtype):
    """A LayerNorm over the last C features whose weight and bias (each may be None) are NumPy (C,) arrays of
    `dtype`."""
    return tuple(norm.normalized_shape) == (C,) and all(
        p is None or (isinstance(p, F.Tensor) and isinstance(p.data, np.ndarray) and p.data.dtype == dtype
                      and p.data.shape == (C,)) for p in (norm.weight, norm.bias))


def _identity_dropout(layer):
    """An nn.Dropout itself that is the identity: eval mode or p = 0 (p in [0, 1])."""
    return _textbook(layer, nn.Dropout) and _probability(layer) and (not layer.training or layer.p == 0.0)


# ========================================================================================================
# feed_forward

def feed_forward(self, x):
    """FeedForward.forward as one op: y = dropout(gelu(x W1^T + b1) W2^T + b2).

    Forward, x (N, C) (any leading shape):  h = x W1^T + b1 (N, d_ff);  g = gelu(h);
        y = g W2^T + b2 (N, C);  out = y keep / (1 - p) in training (keep: the hashed mask, p rounded to a
        multiple of 1/65536), else y
    Backward, from dout:  dy = dout keep / (1 - p);  dg = dy W2, dW2 = dy^T g, db2 = sum_n dy;
        dh = gelu'(h) dg;  dx = dh W1, dW1 = dh^T x, db1 = sum_n dh
    """
    x = F._t(x)
    linear1, linear2 = self.linear1, self.linear2
    C, d_ff, dtype = x.shape[-1], linear1.weight.shape[0], x.dtype
    x2d = native_ops._rows_view(x.data.reshape(-1, C))                          # (N, C)
    N = x2d.shape[0]
    kernels, min_elements = native.kernels(dtype), native_ops.KERNEL_MIN_ELEMENTS
    w1, w2 = native_ops._rows_view(linear1.weight.data), native_ops._rows_view(linear2.weight.data)
    h = buffers.empty((N, d_ff), dtype)
    native_ops._product(x2d, w1, h, trans_b=True, bias=_data(linear1.bias))
    tanh_form = int(self.gelu_approximate == "tanh")
    g = buffers.empty((N, d_ff), dtype)
    kernels.gelu_forward_parallel(at(h), at(g), h.size, tanh_form, native_ops._threads(), min_elements)
    y = buffers.empty((N, C), dtype)
    native_ops._product(g, w2, y, trans_b=True, bias=_data(linear2.bias))
    # nn.Dropout's mask, its seed drawn where F.dropout's fast path would draw it (none in eval mode or at 0)
    dropout = self.dropout.training and self.dropout.p > 0.0
    if dropout:
        apply_mask = native_ops.hashed_dropout(self.dropout.p, dtype)
        apply_mask(y, out=y)
    parents = (x, linear1.weight) + ((linear1.bias,) if linear1.bias is not None else ()) + \
        (linear2.weight,) + ((linear2.bias,) if linear2.bias is not None else ())

    def backward(grad):
        grad_y = native_ops._rows_view(np.asarray(grad, dtype=dtype).reshape(N, C))       # (N, C)
        if dropout:
            grad_y = apply_mask(np.ascontiguousarray(grad_y))
        grad_g, grad_w2 = native_ops._linear_grads(grad_y, g, w2, True, linear2.weight.requires_grad)
        grad_h = buffers.empty((N, d_ff), dtype)
        kernels.gelu_backward_parallel(at(h), at(grad_g), at(grad_h), h.size, tanh_form, native_ops._threads(),
                                       min_elements)
        grad_x, grad_w1 = native_ops._linear_grads(grad_h, x2d, w1, x.requires_grad, linear1.weight.requires_grad)
        grads = (grad_x.reshape(x.shape) if grad_x is not None else None, grad_w1)
        if linear1.bias is not None:
            grads += (native_ops._column_sums(grad_h) if linear1.bias.requires_grad else None,)
        grads += (grad_w2,)
        if linear2.bias is not None:
            grads += (native_ops._column_sums(grad_y) if linear2.bias.requires_grad else None,)
        return grads
    return _make(y.reshape(x.shape), parents, backward, "feed_forward")


def _data(tensor):
    """A bias as the kernels read it: contiguous (a copy where it is a strided view), or None."""
    return None if tensor is None else np.ascontiguousarray(tensor.data)


def feed_forward_applies(self, x):
    """The textbook's own layer on a NumPy input: plain Linears C -> d_ff -> C of the input's dtype, a plain
    Dropout with p below 1 in training, exact or tanh GELU; large enough products."""
    data = x.data if isinstance(x, F.Tensor) else x
    if not isinstance(data, np.ndarray) or data.ndim == 0 or data.dtype.kind != "f":
        return False
    C, d_ff = data.shape[-1], getattr(self.linear1, "out_features", 0)
    if not (_plain_linear(self.linear1, d_ff, C, data.dtype) and _plain_linear(self.linear2, C, d_ff, data.dtype)):
        return False
    if self.gelu_approximate not in ("none", "tanh") or not _plain_dropout(self.dropout):
        return False
    return native_ops.linear_applies(data, self.linear1.weight.data)  # its products large enough, as linear's


# ========================================================================================================

def _plain_linear(layer, n_out, n_in, dtype):
    """`layer` is an nn.Linear itself (not a subclass, its forward not replaced) whose weight is a NumPy
    (n_out, n_in) array and bias (if any) a NumPy (n_out,) array, both of `dtype`."""
    if type(layer) is not nn.Linear or "forward" in vars(layer):
        return False
    parts = [(layer.weight, (n_out, n_in))] + ([(layer.bias, (n_out,))] if layer.bias is not None else [])
    return all(isinstance(t, F.Tensor) and isinstance(t.data, np.ndarray) and t.data.dtype == dtype
               and t.data.shape == shape for t, shape in parts)


def _plain_dropout(layer):
    """An nn.Dropout itself whose p the kernels' mask can draw: in [0, 1] (F.dropout's error otherwise, even
    in eval mode), and below 1 where it is in training."""
    return type(layer) is nn.Dropout and "forward" not in vars(layer) and _probability(layer) and \
        (not layer.training or layer.p < 1.0)


def _probability(layer):
    p = getattr(layer, "p", None)
    return isinstance(p, (int, float)) and 0.0 <= p <= 1.0


def register():
    register_fast_path("multi_head_attention", multi_head_attention, "cpu", applies=attention_applies)
    register_fast_path("multi_head_attention", attention_with_cache, "cpu", applies=attention_with_cache_applies)
    register_fast_path("transformer_block", block_with_cache, "cpu", applies=block_with_cache_applies)
    register_fast_path("feed_forward", feed_forward, "cpu", applies=feed_forward_applies)

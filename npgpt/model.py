"""The GPT of the reference tutorial, layer for layer, with the same attribute names and initialisation.

    token ids (B, T)
      -> token_embedding + position_embedding -> embed_dropout       (B, T, C)
      -> blocks: x + dropout(attention(attn_norm(x))), then x + dropout(ffn(ffn_norm(x)))   x num_layers
      -> ln_f -> output_proj (weight tied to token_embedding)        (B, T, V) logits

Run ``python -m npgpt.model`` to print the configuration and the parameter breakdown (5,846,528 at the
tutorial's defaults). Shapes: B batch, T time, C = d_model, H heads, D = d_k head size, V vocabulary.

Next to read: ``npgpt/generate.py`` (sampling with a KV cache), the last file of the textbook.
"""

import numpy as np

from . import backend
from . import functional as F
from . import nn
from .engine import Tensor, dispatchable


class MultiHeadAttention(nn.Module):
    """H heads of causal self-attention; W_q, W_k, W_v, W_o are (C, C) projections, bias-free in the tutorial
    (GPT-2 gives all four a bias: bias=True)."""

    def __init__(self, d_model, num_heads, dropout=0.1, bias=False):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}); "
                             f"choose num_heads among the divisors of {d_model}")
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @dispatchable("multi_head_attention")
    def forward(self, x, mask=None, is_causal=False, kv_cache=None):
        """x (B, T, C). mask: bool (T, T), True where attention is blocked (the tutorial's convention).

        kv_cache: during generation, a LayerKV holding the keys and values of earlier positions.

        The whole layer is one dispatchable op, like F.linear: with the fast paths on, a large enough layer
        runs as one node of the graph (npgpt/fast/cpu/layers.py, the same maths) instead of this body;
        NPGPT_FAST=0 runs this body, to step through it or print from it.
        """
        B, T, C = x.shape
        H, D = self.num_heads, self.d_k
        q = self.W_q(x).view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
        k = self.W_k(x).view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
        v = self.W_v(x).view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
        attn_mask = None if mask is None else ~(mask.data if isinstance(mask, Tensor) else mask)
        if kv_cache is not None:
            k, v, attn_mask = kv_cache.extend(k, v)           # (B, H, S, D), S = earlier + T
            is_causal = False
        p = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                                 is_causal=is_causal)   # (B, H, T, D)
        context = context.transpose(1, 2).reshape(B, T, C)   # (B, T, C): heads side by side
        return self.W_o(context)


class FeedForward(nn.Module):
    """linear1 (C -> d_ff), GELU (exact; GPT-2 uses its tanh form, gelu_approximate='tanh'), linear2
    (d_ff -> C), dropout."""

    def __init__(self, d_model, d_ff, dropout=0.1, gelu_approximate="none"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.gelu_approximate = gelu_approximate

    @dispatchable("feed_forward")
    def forward(self, x):
        """x (..., C) -> (..., C); one dispatchable op, as MultiHeadAttention's forward is (NPGPT_FAST=0 runs
        this body)."""
        return self.dropout(self.linear2(F.gelu(self.linear1(x), approximate=self.gelu_approximate)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: attention, then the feed-forward network."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, attention_bias=False, gelu_approximate="none",
                 layer_norm_eps=1e-5):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attention = MultiHeadAttention(d_model, num_heads, dropout, bias=attention_bias)
        self.ffn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ffn = FeedForward(d_model, d_ff, dropout, gelu_approximate)
        self.dropout = nn.Dropout(dropout)

    @dispatchable("transformer_block")
    def forward(self, x, mask=None, is_causal=False, kv_cache=None):
        """x (B, T, C) -> (B, T, C). One dispatchable op, as the attention and the feed-forward network are:
        with the fast paths on, a generated token's step through the block (a KV cache, no graph) runs as
        one op (npgpt/fast/cpu/layers.py); otherwise, and with NPGPT_FAST=0, this body."""
        x = x + self.dropout(self.attention(self.attn_norm(x), mask, is_causal, kv_cache))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x


class GPT(nn.Module):
    """A decoder-only transformer language model: the tutorial's GPT.

    GPT-2 is this same network with three switches set: attention_bias=True (biases on W_q, W_k, W_v, W_o),
    gelu_approximate='tanh' (GPT-2's "gelu_new") and its layer_norm_eps; its n_inner is d_ff and its
    n_positions is max_seq_len. The defaults are the tutorial's GPT, which is therefore GPT-2 with zero
    attention biases and exact GELU.

    GPT.from_pretrained(directory) and model.save_pretrained(directory) read and write Hugging Face GPT-2
    directories (config.json, model.safetensors). The file format is not the model's business, so those two
    methods live in npgpt/program/hf.py, which attaches them to this class when ``npgpt.GPT`` is first used
    (or npgpt.program.hf is imported); this file imports nothing above it.
    """

    def __init__(self, vocab_size, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512,
                 dropout=0.1, attention_bias=False, gelu_approximate="none", layer_norm_eps=1e-5):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}); "
                             f"choose num_heads among the divisors of {d_model}")
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' (exact GELU) or 'tanh', not {gelu_approximate!r}")
        self.d_model, self.vocab_size = d_model, vocab_size
        self.num_heads, self.num_layers, self.d_ff = num_heads, num_layers, d_ff
        self.max_seq_len, self.dropout_p = max_seq_len, dropout
        self.attention_bias, self.gelu_approximate, self.layer_norm_eps = attention_bias, gelu_approximate, \
            layer_norm_eps

        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_seq_len, d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, num_heads, d_ff, dropout, attention_bias,
                                                      gelu_approximate, layer_norm_eps)
                                     for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.output_proj = nn.Linear(d_model, vocab_size, bias=False)
        # Weight tying: the output projection reuses the token embedding's (V, C) matrix, one Parameter
        self.output_proj.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self):
        """N(0, 0.02) for every Linear and Embedding weight, zero biases (the tutorial's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init_normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init_zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init_normal_(module.weight, mean=0.0, std=0.02)

    @property
    def config(self):
        return dict(vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads,
                    num_layers=self.num_layers, d_ff=self.d_ff, max_seq_len=self.max_seq_len,
                    dropout=self.dropout_p, attention_bias=self.attention_bias,
                    gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps)

    def forward(self, token_ids, mask=None, kv_cache=None):
        """token_ids (B, T) integers -> logits (B, T, V). With no mask, attention is causal.

        kv_cache: a KVCache from new_kv_cache(); the T new positions follow the ones it already holds.
        """
        token_ids = token_ids.data if isinstance(token_ids, Tensor) else token_ids
        token_ids = token_ids if hasattr(token_ids, "ndim") else np.asarray(token_ids)
        if token_ids.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, seq_len), got {token_ids.shape}")
        B, T = token_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"GPT got token ids of shape {token_ids.shape}: give at least one sequence of "
                             "at least one token")
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.max_seq_len}; "
                             "use shorter sequences or a model with a larger max_seq_len")
        # position_embedding(arange(start, start + T)) is exactly the slice of rows start..start+T-1
        positions = self.position_embedding.weight[start:start + T]               # (T, C)
        x = self.token_embedding(token_ids) + positions                           # (B, T, C)
        x = self.embed_dropout(x)
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layers[i] if kv_cache is not None else None
            x = block(x, mask, mask is None and kv_cache is None, layer_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        return self.output_proj(x)                                     # (B, T, V)

    def new_kv_cache(self, batch_size):
        """An empty key/value cache for generating up to max_seq_len positions."""
        return KVCache(self, batch_size)


class LayerKV:
    """One block's cached keys and values, (B, H, max_seq_len, D); `owner.length` positions are filled."""

    def __init__(self, owner, shape, dtype, xp):
        self.owner = owner
        self.keys = xp.zeros(shape, dtype=dtype)
        self.values = xp.zeros(shape, dtype=dtype)

    def extend(self, k, v):
        """Store the new positions' k, v (B, H, T, D); return all keys and values so far, and the mask."""
        xp = backend.get_array_module(self.keys)
        start, T = self.owner.length, k.shape[2]
        self.keys[:, :, start:start + T] = k.data
        self.values[:, :, start:start + T] = v.data
        keys = Tensor(self.keys[:, :, :start + T])                # (B, H, S, D)
        values = Tensor(self.values[:, :, :start + T])
        if T == 1:                                                # one new query sees every key: no mask
            return keys, values, None
        mask = F.causal_mask(xp, T, start + T, offset=start)          # new query i sees keys <= start + i
        return keys, values, mask


class KVCache:
    """Keys and values of the positions generated so far, for every block."""

    def __init__(self, model, batch_size):
        xp = backend.get_array_module(model.token_embedding.weight.data)
        dtype = model.token_embedding.weight.dtype
        d_k = model.d_model // model.num_heads
        shape = (batch_size, model.num_heads, model.max_seq_len, d_k)
        self.length = 0
        self.layers = [LayerKV(self, shape, dtype, xp) for _ in range(model.num_layers)]


def parameter_breakdown(vocab_size=10000, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512):
    """The tutorial's parameter count, term by term: [(label, count)], and the total."""
    token_embed = vocab_size * d_model
    pos_embed = max_seq_len * d_model
    attn = 4 * d_model * d_model                     # W_q, W_k, W_v, W_o, no biases
    ffn = 2 * d_model * d_ff + d_ff + d_model        # up + down weights, and their biases
    norms = 4 * d_model                              # two LayerNorms, weight and bias each
    block = attn + ffn + norms
    final_ln = 2 * d_model
    rows = [(f"Token embeddings: {vocab_size} x {d_model}", token_embed),
            (f"Position embeddings: {max_seq_len} x {d_model}", pos_embed),
            (f"  Attention (Q,K,V,O): 4 x {d_model}^2", attn),
            ("  FFN", ffn),
            ("  LayerNorm (x2)", norms),
            ("  Block total", block),
            (f"All {num_layers} blocks", num_layers * block),
            ("Final LayerNorm", final_ln),
            ("Output projection (tied with token embeddings)", 0)]
    return rows, token_embed + pos_embed + num_layers * block + final_ln


def main(argv=None):
    """python -m npgpt.model: the parameter count of the default GPT, term by term, against model.parameters().

    Only --help is taken; this module is below npgpt.program, so its refusal of anything else is its own.
    """
    import argparse
    import os
    import sys
    parser = argparse.ArgumentParser(prog="python -m npgpt.model", exit_on_error=False,
                                     description="Print the parameter count of the tutorial's GPT at its default "
                                                 "size, term by term, and check it against the model's own count. "
                                                 "It takes no arguments.")
    try:
        _, extra = parser.parse_known_args(argv)
        if extra:
            raise argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(extra)}")
    except argparse.ArgumentError as exc:
        print(f"error: {exc}; python -m npgpt.model takes no arguments (see --help)", file=sys.stderr)
        return 2
    config = dict(vocab_size=10000, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512)
    model = GPT(**config, dropout=0.1)
    rows, total = parameter_breakdown(**config)
    lines = ["GPT Model Configuration", "=" * 60]
    lines += [f"  {key}: {value:,}" for key, value in config.items()]
    lines += ["  dropout: 0.1", "", "Parameter Breakdown", "=" * 60]
    lines += [f"{label:<48}{count:>12,}" if count else label for label, count in rows]
    lines += ["=" * 60, f"{'Total (calculated)':<48}{total:>12,}",
              f"{'Total (actual, model.parameters())':<48}{model.num_parameters():>12,}"]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:         # the reader stopped early (| head): stdout to os.devnull, so that the
        devnull = os.open(os.devnull, os.O_WRONLY)          # interpreter's last flush does not fail again
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if total != model.num_parameters():
        raise SystemExit("parameter count mismatch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

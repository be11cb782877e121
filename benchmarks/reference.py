"""The tutorial's GPT in PyTorch: the reference npgpt is checked and measured against.

Same architecture, attribute names and initialisation as ``npgpt.model`` (and the tutorial), plus a converter
from a PyTorch state_dict to npgpt's NumPy arrays. Tests and the benchmark suite import this module; npgpt
itself never imports torch.

``GPT(..., attention="tutorial")`` is the tutorial's code (masked_fill, softmax, dropout, matmul), which the
parity tests compare against. ``attention="sdpa"`` is what a PyTorch user writes today (nanoGPT's attention):
``F.scaled_dot_product_attention(is_causal=True)``, the same maths; with it, ``generate_with_cache`` decodes
with a KV cache, one position per new token.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads, dropout=0.1, attention="tutorial"):
        super().__init__()
        assert d_model % num_heads == 0 and attention in ("tutorial", "sdpa")
        self.attention = attention
        self.dropout_p = dropout
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache=None):
        batch_size, seq_len, _ = x.shape
        Q = self.W_q(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        K = self.W_k(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        V = self.W_v(x).view(batch_size, seq_len, self.num_heads, self.d_k).transpose(1, 2)
        if self.attention == "sdpa":
            if cache is not None:               # [K, V] of the earlier positions, extended in place
                if cache:
                    K, V = torch.cat([cache[0], K], dim=2), torch.cat([cache[1], V], dim=2)
                cache[:] = [K, V]
            # a prompt is causal; one new position sees every cached key
            context = F.scaled_dot_product_attention(Q, K, V, dropout_p=self.dropout_p if self.training else 0.0,
                                                     is_causal=seq_len > 1)
            return self.W_o(context.transpose(1, 2).contiguous().view(batch_size, seq_len, self.d_model))
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_k)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        attn = F.softmax(scores, dim=-1)
        attn = self.dropout(attn)
        context = torch.matmul(attn, V)
        context = context.transpose(1, 2).contiguous().view(batch_size, seq_len, self.d_model)
        return self.W_o(context)


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.linear2(F.gelu(self.linear1(x))))


class TransformerBlock(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, attention="tutorial"):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, num_heads, dropout, attention)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache=None):
        x = x + self.dropout(self.attention(self.attn_norm(x), mask, cache))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x


class GPT(nn.Module):
    def __init__(self, vocab_size, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512,
                 dropout=0.1, attention="tutorial"):
        super().__init__()
        self.attention = attention
        self.d_model = d_model
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_seq_len, d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, num_heads, d_ff, dropout, attention)
                                     for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.output_proj = nn.Linear(d_model, vocab_size, bias=False)
        self.output_proj.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, token_ids, mask=None, caches=None, start=0):
        """caches: (with attention='sdpa') one list per block holding its keys and values so far; the new
        positions start at `start`."""
        batch_size, seq_len = token_ids.shape
        device = token_ids.device
        if mask is None and self.attention == "tutorial":
            mask = torch.triu(torch.ones(seq_len, seq_len, device=device), diagonal=1).bool()
        positions = torch.arange(start, start + seq_len, device=device)
        x = self.token_embedding(token_ids) + self.position_embedding(positions)
        x = self.embed_dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, caches[i] if caches is not None else None)
        x = self.ln_f(x)
        return self.output_proj(x)


@torch.no_grad()
def generate_with_cache(model, ids, new_tokens):
    """Greedy decoding with a KV cache (attention='sdpa'): the prompt once, then one position per token."""
    assert model.attention == "sdpa"
    caches = [[] for _ in model.blocks]
    logits = model(ids, caches=caches)
    length = ids.shape[1]
    for _ in range(new_tokens):
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        logits = model(next_id, caches=caches, start=length)
        length += 1
    return ids


# ---- converters -----------------------------------------------------------------------------------------

def torch_to_numpy_state(torch_model):
    """{name: numpy array} from a PyTorch model's state_dict (tied weights under both names)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in torch_model.state_dict().items()}


def copy_torch_to_npgpt(torch_model, npgpt_model):
    """Load the PyTorch model's weights into npgpt's model."""
    npgpt_model.load_state_dict(torch_to_numpy_state(torch_model))
    return npgpt_model

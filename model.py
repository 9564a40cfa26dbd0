"""
Gen: the generator. A GPT in the manner of nanoGPT (pre-LayerNorm blocks, causal attention, MLP,
learned positions, token embedding tied to lm_head) with one addition, `seq_head`.

Gen has two heads on the same final hidden state h_t:
  - lm_head scores the next *token*:       p(x_{t+1} | x_<=t) = softmax(h_t W_tok^T)   (for L_NTP)
  - seq_head makes a *query* for the next *sequence*, used at retrieval markers only:
        q_t = normalize(W_seq h_t)                                                   (for L_NSP)
The query is compared with Emb_seq's sequence embeddings (embedder.py); losses.py has both losses.

The attention block is shared with Emb_seq, which runs it without the causal mask.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.dropout, self.causal = n_head, dropout, causal
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, key_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        mask, causal = None, self.causal
        if key_mask is not None:  # (B, T), True on real tokens: padding is never attended to
            mask = key_mask[:, None, None, :]
        if cache is not None:
            k, v = cache.extend(k, v)
            past = k.shape[2] - T
            if past and T == 1:  # one new token sees every key: no mask at all
                causal = False
            elif past:  # new token i sits at position past + i: it sees keys 0 .. past + i
                rows = torch.arange(T, device=x.device)[:, None]
                mask, causal = torch.arange(past + T, device=x.device) <= past + rows, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class KVCache:
    """The keys and values of one attention layer for the tokens seen so far, so that generation
    runs each new token through the model once instead of re-reading the whole context. The
    buffers are allocated once, for block_size tokens, and filled in place: one token's step then
    costs no allocation and no copy of the past."""

    def __init__(self, block_size):
        self.block_size, self.n = block_size, 0
        self.k = self.v = None

    def extend(self, k, v):
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.block_size, D)
            self.v = v.new_empty(B, H, self.block_size, D)
        self.k[:, :, self.n:self.n + T], self.v[:, :, self.n:self.n + T] = k, v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def __len__(self):
        return self.n


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x, key_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), key_mask, cache)
        return x + self.mlp(self.ln_2(x))


def init_weights(model, n_layer):
    """GPT-2's init: N(0, 0.02), and residual projections scaled down by sqrt(2 * n_layer) so the
    residual stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


@dataclass
class GenConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    seq_dim: int      # width of a query (and of Emb_seq's sequence embeddings)
    dropout: float = 0.0


class Gen(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c.n_embd, c.n_head, c.dropout, causal=True)
                                     for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.seq_head = nn.Linear(c.n_embd, c.seq_dim, bias=False)
        init_weights(self, c.n_layer)
        self.lm_head.weight = self.wte.weight  # tied: one table for reading and writing tokens

    def hidden(self, idx, caches=None):
        """Final hidden states h (B, T, n_embd) of token ids (B, T). With caches (one KVCache per
        layer, from new_caches), idx continues the tokens already in them."""
        past = len(caches[0]) if caches else 0
        T = idx.shape[1]
        assert past + T <= self.config.block_size, f"{past + T} tokens > block_size"
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(past, past + T, device=idx.device)))
        for i, block in enumerate(self.blocks):
            x = block(x, cache=caches[i] if caches else None)
        return self.ln_f(x)

    def new_caches(self):
        return [KVCache(self.config.block_size) for _ in self.blocks]

    def query(self, h):
        """q = normalize(W_seq h): a unit vector, so q . e is the cosine with a sequence embedding."""
        return F.normalize(self.seq_head(h), dim=-1)

    def forward(self, idx, marker_index=None):
        """Logits for every position, and queries at marker_index = (rows, cols) if given."""
        h = self.hidden(idx)
        queries = None if marker_index is None else self.query(h[marker_index])
        return self.lm_head(h), queries

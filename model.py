"""
Gen: the generator. A GPT in the manner of nanoGPT (pre-LayerNorm blocks, causal attention, MLP,
learned positions, token embedding tied to lm_head) with one addition, `seq_head`.

Gen has two heads on the same final hidden state h_t:
  - lm_head scores the next *token*:       p(x_{t+1} | x_<=t) = softmax(h_t W_tok^T)   (for L_NTP)
  - seq_head makes a *query* for the next *sequence*, used at retrieval markers only:
        q_t = normalize(W_seq h_t)                                                   (for L_NSP)

Emb_seq (embedder.py) is built from the same Transformer with its own weights, not causal. With
gpt2_block, every Linear and LayerNorm has a bias and GELU is its tanh approximation, as GPT-2's
block, so GPT-2's weights can be read into it (machinery/gpt2.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal, bias):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.dropout, self.causal = n_head, dropout, causal
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        # torch's fused kernel where this torch has it; else the same attention written out
        self.flash = hasattr(F, "scaled_dot_product_attention")

    def forward(self, x, key_mask=None, cache=None):
        """softmax(Q K^T / sqrt(d)) V per head of x (B, T, n_embd): causal in Gen; Emb_seq never
        attends to padding (key_mask); in generation the cache says which keys a token sees."""
        B, T, n_embd = x.shape
        q, k, v = (t.view(B, T, self.n_head, n_embd // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(n_embd, dim=2))    # (B, H, T, n_embd/H) each
        mask, causal = None, self.causal
        if key_mask is not None:  # (B, T), True on real tokens: padding is never attended to
            mask = key_mask[:, None, None, :]                           # (B, 1, 1, T)
        if cache is not None:  # no mask back: nothing past, the new tokens plainly causal
            k, v, mask = cache.extend(k, v)                             # (B, H, S, n_embd/H) each
            causal = mask is None and T > 1
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])      # (B, H, T, S)
            if causal:  # here S = T: token t sees keys 0..t
                tril = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()    # (T, T)
                mask = tril if mask is None else mask & tril
            if mask is not None:
                att = att.masked_fill(~mask, -math.inf)
            y = self.attn_dropout(att.softmax(dim=-1)) @ v              # (B, H, T, n_embd/H)
        y = y.transpose(1, 2).reshape(B, T, n_embd)                     # heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout, gpt2_block):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=gpt2_block)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=gpt2_block)
        self.dropout = nn.Dropout(dropout)
        self.gelu = "tanh" if gpt2_block else "none"  # GPT-2's GELU is the tanh approximation

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal, gpt2_block):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=gpt2_block)  # eps 1e-5, as GPT-2's
        self.attn = SelfAttention(n_embd, n_head, dropout, causal, gpt2_block)
        self.ln_2 = nn.LayerNorm(n_embd, bias=gpt2_block)
        self.mlp = MLP(n_embd, dropout, gpt2_block)

    def forward(self, x, key_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), key_mask, cache)
        return x + self.mlp(self.ln_2(x))


def init_weights(model, n_layer):
    """GPT-2's init: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


@dataclass
class GenConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    seq_dim: int      # width of a query (and of Emb_seq's sequence embeddings)
    dropout: float = 0.0
    gpt2_block: bool = False  # biases and GELU's tanh approximation, as GPT-2 (module docstring)


class Transformer(nn.Module):
    """The trunk of Gen and of Emb_seq: embeddings, n_layer Blocks, a final LayerNorm."""

    def __init__(self, vocab_size, max_len, n_layer, n_head, n_embd, dropout, causal, gpt2_block):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(max_len, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, causal, gpt2_block)
                                     for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=gpt2_block)

    def forward(self, idx, past=0, key_mask=None, caches=None):
        """Hidden states (B, T, n_embd) of token ids idx (B, T) at positions past .. past+T-1;
        past is 0, or (B, 1) in generation, where each row reads at its own positions."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device) + past                  # (T,) or (B, T)
        # a short row's padding may run past the last position: its states are never read
        pos = pos.clamp(max=self.wpe.num_embeddings - 1)
        x = self.drop(self.wte(idx) + self.wpe(pos))                     # (B, T, n_embd)
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, caches[i] if caches else None)        # (B, T, n_embd)
        return self.ln_f(x)


class Gen(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = Transformer(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd,
                                       c.dropout, causal=True, gpt2_block=c.gpt2_block)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.seq_head = nn.Linear(c.n_embd, c.seq_dim, bias=False)
        init_weights(self, c.n_layer)
        # tied: one table for reading and writing tokens
        self.lm_head.weight = self.transformer.wte.weight

    def hidden(self, idx, caches=None):
        """Final hidden states h (B, T, n_embd) of token ids (B, T), after those in caches."""
        assert idx.shape[1] <= self.config.block_size, "more tokens than block_size"
        return self.transformer(idx, caches[0].past if caches else 0, caches=caches)

    def query(self, h):
        """q = normalize(W_seq h): a unit vector, so q . e is its cosine with an embedding."""
        return F.normalize(self.seq_head(h), dim=-1)

    def forward(self, idx, marker_index=None):
        """Logits for every position, and queries at marker_index = (rows, cols) if given."""
        h = self.hidden(idx)                                              # (B, T, n_embd)
        queries = None if marker_index is None else self.query(h[marker_index])  # (M, seq_dim)
        return self.lm_head(h), queries                                   # logits (B, T, vocab)

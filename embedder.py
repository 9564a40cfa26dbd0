"""
Emb_seq: the sequence embedder, a whole sequence (a fact, a sentence) to one unit vector; all
sequences embedded are the nonparametric sequence space (the datastore).

    e = normalize(W_proj * mean_{i: not pad} Enc(x)_i)

Enc is a small bidirectional transformer (model.py's Transformer) with its own weights and
sizes. The mean is over real tokens only, so padding never changes an embedding (the paper's code
takes the last token's state; in a bidirectional encoder no one position has read the whole
sequence). Started from GPT-2, Enc reads causally, as GPT-2 was trained, and token i, having read
tokens 1..i, counts i times in the mean (SGPT's pooling).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.buckets import BUCKETS, in_length_buckets
from model import Transformer, init_weights


@dataclass
class EmbedderConfig:
    vocab_size: int
    block_size: int   # longest sequence it reads; longer ones are cut to their first block_size
    n_layer: int
    n_head: int
    n_embd: int
    seq_dim: int      # width of the output embedding (= Gen's query width)
    dropout: float = 0.0
    gpt2_block: bool = False  # GPT-2's block (model.py)
    causal: bool = False      # each token reads only those before it (as GPT-2 was trained)


class SeqEmbedder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = Transformer(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd,
                                       c.dropout, causal=c.causal, gpt2_block=c.gpt2_block)
        self.proj = nn.Linear(c.n_embd, c.seq_dim, bias=False)
        init_weights(self, c.n_layer)

    @torch.no_grad()
    def start_from(self, gen):
        """Copy Gen's trunk into this one, as the paper starts both networks from one pretrained
        LM: the same width, heads and gpt2_block, at most Gen's layers and block_size."""
        theirs = gen.transformer.state_dict()
        for name, p in self.transformer.state_dict().items():
            p.copy_(theirs[name][:p.shape[0]] if name == "wpe.weight" else theirs[name])

    def embed_tokens(self, tokens, mask):
        """e (N, seq_dim) of tokens (N, L) right-padded, mask (N, L) True on real tokens."""
        x = self.transformer(tokens, key_mask=mask)                       # (N, L, n_embd)
        m = mask.unsqueeze(-1).to(x.dtype)                                # (N, L, 1)
        if self.config.causal:  # token i has read i tokens: it weighs i (module docstring)
            m = m * torch.arange(1, m.shape[1] + 1, dtype=m.dtype, device=m.device)[:, None]
        mean = (x * m).sum(1) / m.sum(1)          # (N, n_embd): the (weighted) mean of real tokens
        return F.normalize(self.proj(mean), dim=-1)                       # (N, seq_dim)

    def forward(self, tokens, mask, buckets=BUCKETS):
        """embed_tokens, in groups of similar length: less padding (machinery/buckets.py)."""
        return in_length_buckets(self.embed_tokens, tokens, mask, buckets)

"""
Emb_seq: the sequence embedder. It turns a whole sequence (a fact, a sentence) into one unit
vector; all sequences of a corpus, embedded, are the nonparametric sequence space (the datastore).

    e = normalize(W_proj * mean_{i: not pad} Enc(x)_i)

Enc is a small bidirectional transformer (model.py's Transformer, not causal) with its own
token embedding and its own sizes. Mean pooling over real tokens only, so padding never changes an
embedding. (The paper's code takes the encoder's last-token state instead; mean pooling suits a
bidirectional encoder, where no single position has read the whole sequence by construction.)
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model import Transformer, init_weights


# Candidates of a training batch are embedded in this many length buckets: on the default demo's
# batches (about 100 candidates of 34 tokens on average, padded to 48) Emb_seq then reads 13% more
# tokens than the candidates hold instead of 44%, and the co-supervised step drops from 1.64 to
# 1.55 times an NTP-only one; 4 or 6 buckets did no better (experiments/README.md, Performance).
BUCKETS = 3


@dataclass
class EmbedderConfig:
    vocab_size: int
    seq_len: int      # longest sequence it reads; longer ones are cut to their first seq_len tokens
    n_layer: int
    n_head: int
    n_embd: int
    seq_dim: int      # width of the output embedding (= Gen's query width)
    dropout: float = 0.0


class SeqEmbedder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = Transformer(c.vocab_size, c.seq_len, c.n_layer, c.n_head, c.n_embd,
                                       c.dropout, causal=False)
        self.proj = nn.Linear(c.n_embd, c.seq_dim, bias=False)
        init_weights(self, c.n_layer)

    @torch.no_grad()
    def start_from(self, gen):
        """Copy Gen's trunk into this one (token and position embeddings, the first n_layer
        blocks, the final norm), as the paper starts both networks from one pretrained LM: the
        token space Gen has learned becomes Emb_seq's start. Attention here stays bidirectional.
        Needs the same width and heads, at most Gen's layers, seq_len at most Gen's block_size."""
        theirs = gen.transformer.state_dict()
        for name, p in self.transformer.state_dict().items():
            p.copy_(theirs[name][:p.shape[0]] if name == "wpe.weight" else theirs[name])

    def forward(self, tokens, mask, buckets=BUCKETS):
        """tokens (N, L) right-padded, mask (N, L) True on real tokens -> unit vectors
        (N, seq_dim). The rows are embedded in `buckets` groups of similar length, each cut to its
        own longest row: padding is never attended to nor pooled, so this changes no embedding
        (beyond float rounding) and saves the work of most of the padding."""
        if buckets <= 1 or len(tokens) < 2:
            return self.embed_padded(tokens, mask)
        lengths = mask.sum(dim=1)                                         # (N,)
        order = lengths.argsort()                                         # (N,) shortest first
        parts = []
        for rows in order.tensor_split(min(buckets, len(tokens))):       # (n_b,) each, n_b >= 1
            width = int(lengths[rows[-1]])                                # the bucket's longest
            parts.append(self.embed_padded(tokens[rows, :width], mask[rows, :width]))
        return torch.cat(parts)[order.argsort()]                          # (N, seq_dim)

    def embed_padded(self, tokens, mask):
        """Unit vectors (N, seq_dim) of tokens (N, L) right-padded, mask (N, L) True on real
        tokens, all read at the length L."""
        x = self.transformer(tokens, key_mask=mask)                       # (N, L, C)
        m = mask.unsqueeze(-1).to(x.dtype)                                # (N, L, 1)
        pooled = (x * m).sum(1) / m.sum(1)                       # (N, C): mean of real tokens
        return F.normalize(self.proj(pooled), dim=-1)                     # (N, seq_dim)

    @torch.inference_mode()
    def embed(self, data, ids=None, batch_size=256, progress=None):
        """Embeddings (len(ids), seq_dim), float32, of datastore sequences `ids` (default: all).
        Sorted by length first, so each batch pads little; a progress bar for long jobs."""
        ids = np.arange(data.n_sequences) if ids is None else np.asarray(ids)
        device = next(self.parameters()).device
        order = np.argsort(data.offsets[ids + 1] - data.offsets[ids], kind="stable")
        out = torch.empty(len(ids), self.config.seq_dim)
        starts = range(0, len(ids), batch_size)
        show = len(ids) > 20_000 if progress is None else progress
        for s in tqdm(starts, desc="embedding sequences", disable=not show, leave=False):
            rows = order[s:s + batch_size]
            tokens, mask = data.pad_sequences(ids[rows], self.config.seq_len)
            out[torch.from_numpy(rows)] = self(tokens.to(device), mask.to(device)).float().cpu()
        return out

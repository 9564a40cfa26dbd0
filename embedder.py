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


class SeqEmbedder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = Transformer(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd,
                                       c.dropout, causal=False)
        self.proj = nn.Linear(c.n_embd, c.seq_dim, bias=False)
        init_weights(self, c.n_layer)

    @torch.no_grad()
    def start_from(self, gen):
        """Copy Gen's trunk into this one (token and position embeddings, the first n_layer
        blocks, the final norm), as the paper starts both networks from one pretrained LM: the
        token space Gen has learned becomes Emb_seq's start. Attention here stays bidirectional.
        Needs the same width and heads, at most Gen's layers, a block_size at most Gen's."""
        theirs = gen.transformer.state_dict()
        for name, p in self.transformer.state_dict().items():
            p.copy_(theirs[name][:p.shape[0]] if name == "wpe.weight" else theirs[name])

    def embed_tokens(self, tokens, mask):
        """e = normalize(W_proj * mean_{i: not pad} Enc(x)_i): unit vectors (N, seq_dim) of
        tokens (N, L) right-padded, mask (N, L) True on real tokens."""
        x = self.transformer(tokens, key_mask=mask)                       # (N, L, n_embd)
        m = mask.unsqueeze(-1).to(x.dtype)                                # (N, L, 1)
        mean = (x * m).sum(1) / m.sum(1)                   # (N, n_embd): mean of real tokens
        return F.normalize(self.proj(mean), dim=-1)                       # (N, seq_dim)

    def forward(self, tokens, mask, buckets=BUCKETS):
        """embed_tokens, run in `buckets` groups of rows of similar length, each cut to its own
        longest row: the same embeddings, less work on padding (machinery/buckets.py)."""
        return in_length_buckets(self.embed_tokens, tokens, mask, buckets)

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
            tokens, mask = data.pad_sequences(ids[rows], self.config.block_size)
            out[torch.from_numpy(rows)] = self(tokens.to(device), mask.to(device)).float().cpu()
        return out

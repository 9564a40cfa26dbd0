"""
Length buckets for Emb_seq (embedder.SeqEmbedder.forward): the candidates of a training batch are
embedded in groups of similar length, each cut to its own longest row. Padding is never attended
to nor pooled, so this changes no embedding (beyond float rounding, tests/test_losses.py) and
saves the work of most of the padding. Speed only: embed_tokens, all rows at one width, is the
reference.
"""

import torch

# On the default demo's batches (about 100 candidates of 34 tokens on average, padded to 48)
# Emb_seq then reads 13% more tokens than the candidates hold instead of 44%, and the co-supervised
# step drops from 1.64 to 1.55 times an NTP-only one; 4 or 6 buckets did no better
# (experiments/README.md, Performance).
BUCKETS = 3


def in_length_buckets(embed, tokens, mask, buckets=BUCKETS):
    """embed(tokens, mask) of tokens (N, L) right-padded, mask (N, L) True on real tokens, run in
    `buckets` groups of rows of similar length: the same (N, seq_dim) rows, in the same order."""
    if buckets <= 1 or len(tokens) < 2:
        return embed(tokens, mask)
    lengths = mask.sum(dim=1)                                             # (N,)
    order = lengths.argsort()                                             # (N,) shortest first
    parts = []
    for rows in order.tensor_split(min(buckets, len(tokens))):           # (n_b,) each, n_b >= 1
        width = int(lengths[rows[-1]])                                    # the bucket's longest
        parts.append(embed(tokens[rows, :width], mask[rows, :width]))
    return torch.cat(parts)[order.argsort()]                              # (N, seq_dim)

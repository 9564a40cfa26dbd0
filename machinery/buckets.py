"""Emb_seq over a batch's candidates in groups of similar length, each cut to its longest row:
embedder.embed_tokens' embeddings (up to float rounding), less padding read."""

import torch

BUCKETS = 3  # groups per batch (experiments/README.md, Performance)


def in_length_buckets(embed, tokens, mask, buckets=BUCKETS):
    """embed(tokens, mask) of tokens (N, L), mask (N, L) True on real tokens, run in `buckets`
    groups of rows of similar length: the same (N, seq_dim) rows, in the same order."""
    if buckets <= 1 or len(tokens) < 2:
        return embed(tokens, mask)
    lengths = mask.sum(dim=1)                                             # (N,)
    order = lengths.argsort()                                             # (N,) shortest first
    parts = []
    for rows in order.tensor_split(min(buckets, len(tokens))):           # (n_b,) each, n_b >= 1
        width = int(lengths[rows[-1]])                                    # the bucket's longest
        parts.append(embed(tokens[rows, :width], mask[rows, :width]))
    return torch.cat(parts)[order.argsort()]                              # (N, seq_dim)

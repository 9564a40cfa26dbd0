"""The KV cache of generation: each layer's keys and values of the tokens seen so far."""

import torch


class KVCache:
    """One attention layer's keys and values in buffers of block_size tokens, filled in place.
    Row b holds past[b] tokens; a step brings it fresh[b] more (default T), right-padded to T."""

    def __init__(self, block_size):
        self.block_size, self.past = block_size, 0  # tokens held per row: (B, 1) after a step
        self.k = self.v = self.fresh = None

    def extend(self, k, v):
        """Keep the real ones of the new k and v (B, H, T, D). Returns keys and values up to the
        longest row (B, H, S, D), and the mask (B, 1, T, S): new token i of row b sees keys
        0 .. past[b] + i (None where nothing is past: causal)."""
        B, H, T, D = k.shape
        if self.k is None:  # zeros: a masked-out slot still gets weight 0, and 0 * NaN is NaN
            self.k = k.new_zeros(B, H, self.block_size, D)
            self.v = v.new_zeros(B, H, self.block_size, D)
        n = self.past + torch.zeros(B, 1, dtype=torch.long, device=k.device)    # (B, 1)
        fresh = torch.full_like(n, T) if self.fresh is None else self.fresh     # (B, 1)
        cols = torch.arange(T, device=k.device)
        rows, i = (cols < fresh).nonzero(as_tuple=True)  # the real new tokens
        self.k[rows, :, n[rows, 0] + i] = k[rows, :, i]
        self.v[rows, :, n[rows, 0] + i] = v[rows, :, i]
        self.past = n + fresh
        S = int(self.past.max())
        mask = torch.arange(S, device=k.device) <= (n + cols)[:, None, :, None]  # (B, 1, T, S)
        return self.k[:, :, :S], self.v[:, :, :S], mask if n.any() else None

    def take(self, rows):
        """A cache of only the rows (R,) given, in that order (a row given twice is copied)."""
        out = KVCache(self.block_size)
        out.past, out.k, out.v = self.past[rows], self.k[rows], self.v[rows]
        return out


def new_caches(gen):  # one per layer of Gen
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]

"""
The KV cache of generation (generate.py): each layer's keys and values of the tokens seen so far,
so that each new token runs through Gen once instead of the whole context again.
"""

import torch


class KVCache:
    """One attention layer's keys and values for B rows, in buffers of block_size tokens filled
    in place. Row b holds its n[b] tokens in slots 0 .. n[b]-1. A step brings row b fresh[b] new
    tokens (by default all T), right-padded to a common width T: only the real ones are kept,
    and new token i of row b sees its row's keys 0 .. n[b] + i."""

    def __init__(self, block_size):
        self.block_size, self.n, self.fresh = block_size, 0, None  # n: an int until a first step
        self.k = self.v = None

    def next_step(self, fresh, restart):
        """The next extend brings fresh[b] real tokens to row b (B,); rows where restart (B,)
        first drop what they hold."""
        self.n, self.fresh = torch.where(restart, 0, self.n), fresh

    def extend(self, k, v):
        """Keep the real ones of the new k and v (B, H, T, D). Returns the keys and values up to
        the longest row (B, H, S, D) each, and which keys each new token sees (B, 1, T, S)."""
        B, H, T, D = k.shape
        if self.k is None:  # zeros: a masked-out slot still gets weight 0, and 0 * NaN is NaN
            self.k = k.new_zeros(B, H, self.block_size, D)
            self.v = v.new_zeros(B, H, self.block_size, D)
        n = self.n + torch.zeros(B, dtype=torch.long, device=k.device)        # (B,) tokens held
        fresh = torch.full_like(n, T) if self.fresh is None else self.fresh   # (B,) new ones
        cols = torch.arange(T, device=k.device)
        rows, i = (cols < fresh[:, None]).nonzero(as_tuple=True)  # the real new tokens
        slots = n[rows] + i
        self.k[rows, :, slots], self.v[rows, :, slots] = k[rows, :, i], v[rows, :, i]
        end = n + fresh                                                       # (B,)
        S = int(end.max())
        assert S <= self.block_size, "more tokens than block_size"
        mask = None  # every row starting from nothing: right-padded, so plainly causal
        if n.any():
            sees = (n[:, None] + cols)[:, None, :, None]                       # (B, 1, T, 1)
            mask = torch.arange(S, device=k.device) <= sees                     # (B, 1, T, S)
        self.n = end
        return self.k[:, :, :S], self.v[:, :, :S], mask

    def take(self, rows):
        """A cache of only the rows (R,) given, in that order (a row given twice is copied)."""
        out = KVCache(self.block_size)
        out.n, out.k, out.v = self.n[rows], self.k[rows], self.v[rows]
        return out

    @property
    def past(self):
        """Each row's tokens held: the position of its next one, (B, 1) (0 before a first step)."""
        return self.n if isinstance(self.n, int) else self.n[:, None]


def new_caches(gen):
    """One empty KVCache per layer of Gen."""
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]

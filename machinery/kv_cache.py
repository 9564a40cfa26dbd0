"""
The KV cache of generation (generate.py): each layer's keys and values of the tokens seen so far,
so that each new token runs through Gen once instead of the whole context again.
"""

import torch


class KVCache:
    """One attention layer's keys and values, in buffers of block_size tokens allocated once and
    filled in place: a token's step costs no allocation and no copy of the past."""

    def __init__(self, block_size):
        self.block_size, self.n = block_size, 0
        self.k = self.v = None

    def extend(self, k, v):
        """Append the new tokens' k and v (B, H, T, D). Returns all keys and values so far
        (B, H, n, D) each, and which of them each new token sees: None where attention's plain
        rule says it (nothing past: causal; one new token: every key), else a mask (T, n), True
        where new token i, at position past + i, sees key j <= past + i."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.block_size, D)
            self.v = v.new_empty(B, H, self.block_size, D)
        past, self.n = self.n, self.n + T
        self.k[:, :, past:self.n], self.v[:, :, past:self.n] = k, v
        mask = None
        if past and T > 1:
            rows = torch.arange(T, device=k.device)[:, None]
            mask = torch.arange(self.n, device=k.device) <= past + rows             # (T, n)
        return self.k[:, :, :self.n], self.v[:, :, :self.n], mask

    @property
    def past(self):
        """The tokens held: the position of the next one."""
        return self.n


def new_caches(gen):
    """One empty KVCache per layer of Gen."""
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]

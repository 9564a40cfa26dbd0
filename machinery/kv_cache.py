"""The KV cache of generation: each layer's keys and values of the tokens seen so far."""

import torch


class KVCache:
    """One attention layer's keys and values in buffers of block_size tokens, filled in place.
    One prompt (generate.py): past is the tokens held, a step adds T. Many prompts at once
    (batch_generate.py sets past and fresh, (B, 1) each): row b holds past[b] tokens and a step
    brings it fresh[b] more, right-padded to T."""

    def __init__(self, block_size):
        self.block_size, self.past, self.fresh = block_size, 0, None
        self.k = self.v = None

    def extend(self, k, v):
        """Keep the real ones of the new k and v (B, H, T, D). Returns the keys and values up to
        the longest row (B, H, S, D) each, and which keys each new token sees: new token i of row
        b sees keys 0 .. past[b] + i, (T, S) or (B, 1, T, S); None where attention's plain rule
        says it (nothing past: causal; one new token: every key)."""
        B, H, T, D = k.shape
        if self.k is None:  # zeros: a masked-out slot still gets weight 0, and 0 * NaN is NaN
            self.k = k.new_zeros(B, H, self.block_size, D)
            self.v = v.new_zeros(B, H, self.block_size, D)
        if self.fresh is None:  # one prompt: its new tokens are a slice, no index arithmetic
            n, self.past = self.past, self.past + T
            self.k[:, :, n:self.past], self.v[:, :, n:self.past] = k, v
            rows = torch.arange(T, device=k.device)[:, None]
            mask = torch.arange(self.past, device=k.device) <= n + rows           # (T, S)
            return self.k[:, :, :self.past], self.v[:, :, :self.past], mask if n and T > 1 else None
        n, cols = self.past, torch.arange(T, device=k.device)                     # (B, 1), (T,)
        rows, i = (cols < self.fresh).nonzero(as_tuple=True)  # the real new tokens
        self.k[rows, :, n[rows, 0] + i] = k[rows, :, i]
        self.v[rows, :, n[rows, 0] + i] = v[rows, :, i]
        self.past = n + self.fresh
        S = int(self.past.max())
        mask = torch.arange(S, device=k.device) <= (n + cols)[:, None, :, None]  # (B, 1, T, S)
        return self.k[:, :, :S], self.v[:, :, :S], mask if n.any() else None

    def take(self, rows):
        """A cache of only the rows (R,) given, in that order (a row given twice is copied)."""
        out = KVCache(self.block_size)
        out.past, out.fresh = self.past[rows], self.fresh[rows]
        out.k, out.v = self.k[rows], self.v[rows]
        return out


def new_caches(gen):  # one per layer of Gen
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]

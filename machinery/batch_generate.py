"""
Many prompts decoded at once, greedily (evaluate.py's answers): generate.generate() of each, one
forward pass per step for every unfinished row (generate_batch), in batches of similar prompts
(decode_prompts), none decoded twice (already_decoded). generate() is the reference, tested token
for token (tests/test_generate.py). Rows have different lengths, so BatchKVCache holds each row's
own count of tokens, and Gen reads each row at its own positions (model.Transformer's `past`).
"""

import torch

from generate import check_prompt, marker_step_queries, retrieval_step, window_start


class BatchKVCache:
    """A KVCache for B rows of different lengths: row b holds its n[b] tokens in slots
    0 .. n[b]-1. A step brings row b fresh[b] new tokens, right-padded to a common width T: only
    the real ones are kept, and new token i of row b sees its row's keys 0 .. n[b] + i."""

    def __init__(self, block_size, rows, device):
        self.block_size = block_size
        self.n = torch.zeros(rows, dtype=torch.long, device=device)     # (B,) tokens held
        self.fresh = None               # (B,) real tokens of the next step (next_step)
        self.k = self.v = None

    def next_step(self, fresh, restart):
        """The next extend brings fresh[b] real tokens to row b; rows where restart (B,) first
        drop what they hold."""
        self.n, self.fresh = torch.where(restart, 0, self.n), fresh

    def extend(self, k, v):
        """Keep the real ones of the new k and v (B, H, T, D). Returns the keys and values up to
        the longest row (B, H, S, D) each, and which keys each new token sees (B, 1, T, S)."""
        B, H, T, D = k.shape
        if self.k is None:  # zeros: a masked-out slot still gets weight 0, and 0 * NaN is NaN
            self.k = k.new_zeros(B, H, self.block_size, D)
            self.v = v.new_zeros(B, H, self.block_size, D)
        cols = torch.arange(T, device=k.device)
        rows, i = (cols < self.fresh[:, None]).nonzero(as_tuple=True)  # the real new tokens
        slots = self.n[rows] + i
        self.k[rows, :, slots], self.v[rows, :, slots] = k[rows, :, i], v[rows, :, i]
        end = self.n + self.fresh                                       # (B,)
        S = int(end.max())
        assert S <= self.block_size, "more tokens than block_size"
        mask = None  # every row starting from nothing: right-padded, so plainly causal
        if self.n.any():
            sees = (self.n[:, None] + cols)[:, None, :, None]                  # (B, 1, T, 1)
            mask = torch.arange(S, device=k.device) <= sees                     # (B, 1, T, S)
        self.n = end
        return self.k[:, :, :S], self.v[:, :, :S], mask

    def take(self, rows):
        """A cache of only the rows (R,) given, in that order (a row given twice is copied)."""
        out = BatchKVCache(self.block_size, 0, self.n.device)
        out.n = self.n[rows]
        if self.k is not None:
            out.k, out.v = self.k[rows], self.v[rows]
        return out

    @property
    def past(self):
        """Each row's tokens held: the position of its next one, (B, 1)."""
        return self.n[:, None]


def _feed(gen, caches, fresh, restart, device):
    """Run each row's fresh tokens (a list per row) through Gen in one pass, right-padded; rows
    where restart is True first empty their caches. Returns the final state at each row's last
    fresh token (B, n_embd) (for a row with none, a state to ignore)."""
    counts = [len(f) for f in fresh]
    T = max(counts)
    x = torch.tensor([f + [0] * (T - len(f)) for f in fresh], dtype=torch.long,
                     device=device)                                                 # (B, T)
    counts, restart = torch.tensor(counts, device=device), torch.tensor(restart, device=device)
    for cache in caches:
        cache.next_step(counts, restart)
    h = gen.hidden(x, caches)                                                       # (B, T, n_embd)
    return h[torch.arange(len(fresh), device=device), (counts - 1).clamp(min=0)]    # (B, n_embd)


@torch.inference_mode()
def generate_batch(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                   query_gen=None, retrieve=None):
    """generate() of each of the token id lists `prompts`, greedy, all at once. Each row has its
    own budget (max_new_tokens: one for all, or one per prompt), retrievals and end; retrieve
    (one bool per prompt, default all True) says whose markers search the datastore. Returns
    (ids, Retrievals) per prompt: generate()'s, unless a batched product's rounding turns a near
    tie of two tokens or entries. Each distinct prompt runs through Gen once (a question asked
    with and without retrieval shares that pass); then rows with retrieval and rows without
    decode as two batches, since a step runs every row as wide as its widest."""
    for p in prompts:
        check_prompt(p)
    device = next(gen.parameters()).device
    block, B = gen.config.block_size, len(prompts)
    budget = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    retrieve = [datastore is not None and (retrieve is None or retrieve[b]) for b in range(B)]
    ids = [list(p) for p in prompts]
    start = [max(0, len(p) - block) for p in prompts]   # row b's Gen sees ids[b][start[b]:]
    fed = [len(p) for p in prompts]                     # its caches hold ids[b][start[b]:fed[b]]
    n_new, retrievals = [0] * B, [[] for _ in range(B)]
    done = [n <= 0 for n in budget]
    asking = [False] * B                # the row's last token is a marker that Gen wrote

    def decode(live, caches, h):
        """Step the rows `live` (in the caches, in order; h (L, n_embd): their last final states)
        until every one has finished."""
        while True:
            # rows at a marker retrieve; the others write their next token
            at_marker = [i for i, b in enumerate(live) if asking[b]]
            if at_marker:
                rows = [live[i] for i in at_marker]
                windows = [ids[b][start[b]:] for b in rows]
                queries = marker_step_queries(gen, query_gen, h[at_marker], windows, device)
                found = retrieval_step(datastore, queries, [len(ids[b]) for b in rows],
                                  [budget[b] - n_new[b] for b in rows], windows)
                for b, (retrieval, inserted) in zip(rows, found):
                    retrievals[b].append(retrieval)
                    ids[b].extend(inserted)
                    n_new[b] += len(inserted)
                    asking[b], done[b] = False, not inserted or n_new[b] >= budget[b]
            tokens = gen.lm_head(h).float().argmax(dim=-1).tolist()                # (L,)
            retrieved = set(at_marker)
            for i, b in enumerate(live):
                if i not in retrieved and not done[b]:
                    ids[b].append(tokens[i])
                    n_new[b] += 1
                    asking[b] = tokens[i] == marker and retrieve[b]
                    done[b] = tokens[i] == stop or (not asking[b] and n_new[b] >= budget[b])
            kept = [i for i, b in enumerate(live) if not done[b]]
            if not kept:
                return
            # finished rows leave the batch once a quarter of it has finished: leaving copies
            # the caches, which at every row's end would cost more than the finished rows' padding
            if len(kept) <= 3 * len(live) // 4:
                index = torch.tensor(kept, dtype=torch.long, device=device)
                caches, live = [cache.take(index) for cache in caches], [live[i] for i in kept]
            fresh, restart = [], []
            for b in live:
                s = window_start(len(ids[b]), start[b], block)
                restart.append(s != start[b] and not done[b])
                if restart[-1]:
                    start[b] = fed[b] = s
                fresh.append([] if done[b] else ids[b][fed[b]:])  # finished: nothing to feed
                fed[b] = len(ids[b])
            h = _feed(gen, caches, fresh, restart, device)                          # (L, n_embd)

    live = [b for b in range(B) if not done[b]]
    if not live:
        return list(zip(ids, retrievals))
    distinct = {}   # prompt -> its row in the prompt pass
    first = [distinct.setdefault(tuple(ids[b][start[b]:]), len(distinct)) for b in live]
    caches = [BatchKVCache(block, len(distinct), device) for _ in range(gen.config.n_layer)]
    h = _feed(gen, caches, [list(p) for p in distinct], [False] * len(distinct),
              device)                                                               # (U, n_embd)
    for group in (True, False):
        rows = [i for i, b in enumerate(live) if retrieve[b] == group]
        if rows:
            index = torch.tensor([first[i] for i in rows], dtype=torch.long, device=device)
            decode([live[i] for i in rows], [cache.take(index) for cache in caches], h[index])
    return list(zip(ids, retrievals))


def decode_prompts(gen, prompts, budgets, marker, stop, datastore, query_gen, retrieve,
                   batch_size, known=()):
    """generate_batch() of every prompt (with its budget, and retrieval where retrieve[i] says
    so), batch_size at a time, but those whose outcome `known` holds, {i: (ids, retrievals)}.
    Prompts are sorted by length, so a batch pads little and one question's prompts sit side by
    side (they share a pass through Gen). Returns (ids, Retrievals) per prompt, in order."""
    outs = dict(known)
    todo = sorted((i for i in range(len(prompts)) if i not in outs),
                  key=lambda i: (len(prompts[i]), prompts[i]))
    for s in range(0, len(todo), batch_size):
        batch = todo[s:s + batch_size]
        outs.update(zip(batch, generate_batch(
            gen, [prompts[i] for i in batch], [budgets[i] for i in batch], marker, stop,
            datastore, query_gen, [retrieve[i] for i in batch])))
    return [outs[i] for i in range(len(prompts))]


def already_decoded(retrieved, given, eod, block_size):
    """Greedy decoding is a function of the context. Where retrieval in the loop (retrieved:
    (ids, Retrievals) per question) put the gold sequence right after the question (the context
    `given` here), then wrote to the end of the document with no other marker, inside one window,
    Gen given the gold sequence writes the same tokens: {i: (ids, [])} of those questions, which
    need not be decoded twice."""
    return {i: (ids, []) for i, ((ids, retrievals), g) in enumerate(zip(retrieved, given))
            if ids[:len(g)] == g and len(retrievals) == 1 and ids[-1] == eod
            and len(ids) <= block_size}

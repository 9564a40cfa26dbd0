"""
Semiparametric generation: Gen writes tokens, and when it writes the marker, its query at the
marker searches the datastore and the best sequence is appended verbatim (the paper's [Ret] step):

    x_{t+1} ~ p(. | x_<=t)                                   a token step (lm_head)
    if x_{t+1} is the marker:
        j* = argmax_j  q_{t+1} . e_j                          the retrieval step (seq_head, datastore)
        x_{t+2} .. x_{t+1+|s_j*|} = the tokens of sequence j*   appended, not written token by token

A KV cache keeps every token's keys and values, so each token, and each inserted sequence, runs
through Gen once; the prefix is never re-encoded after a retrieval (the paper's code re-encodes it).

generate() continues one prompt and is the reference; generate_batch() decodes many prompts at
once, greedily, each row with its own length, retrievals and end, to the same tokens.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from datastore import marker_queries


@dataclass
class Retrieval:
    position: int           # index in the output ids where the inserted sequence starts
    id: int                 # datastore entry
    score: float            # q . e of that entry
    alternatives: list = field(default_factory=list)   # (id, score) of the next best entries
    first_stage_rank: int = None  # two-stage search: where the first stage ranked the entry


class KVCache:
    """The keys and values of one attention layer for the tokens seen so far, so that generation
    runs each new token through the model once instead of re-reading the whole context. The
    buffers are allocated once, for block_size tokens, and filled in place: one token's step then
    costs no allocation and no copy of the past."""

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


class BatchKVCache:
    """A KVCache for B rows of different lengths. Row b holds its n[b] tokens in slots
    0 .. n[b]-1, at positions 0 .. n[b]-1, as a KVCache of its own would. A step brings row b
    fresh[b] new tokens, right-padded to a common width T: only the real ones are kept, and new
    token i of row b sees its row's keys 0 .. n[b] + i. Slots past a row's end are masked out.
    Finished rows leave the batch (take)."""

    def __init__(self, block_size, rows, device):
        self.block_size = block_size
        self.n = torch.zeros(rows, dtype=torch.long, device=device)     # (B,) tokens held
        self.fresh = None               # (B,) real tokens of the next step (next_step)
        self.k = self.v = None

    def next_step(self, fresh, restart):
        """The next extend brings fresh[b] real tokens to row b; rows where restart (B,) is True
        first drop what they hold."""
        self.n, self.fresh = torch.where(restart, 0, self.n), fresh

    def extend(self, k, v):
        """Keep the real ones of the new k and v (B, H, T, D). Returns the keys and values of the
        longest row (B, H, S, D) each, and the mask (B, 1, T, S) of which each new token sees."""
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


def new_caches(gen):
    """One empty KVCache per layer of Gen."""
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]


def _next_token(logits, temperature, top_k, generator):
    if temperature == 0:  # greedy
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _window_start(n_ids, start, block):
    """Where Gen's window over n_ids ids starts, given where it started. Positions are learned
    and absolute, so cached keys cannot slide along with a moving window: when the context
    outgrows block_size we keep its last half, to be re-encoded from position 0 (every path does
    the same, so they agree exactly)."""
    return n_ids - block // 2 if n_ids - start > block else start


def _queries(gen, query_gen, h, windows, device):
    """The queries (R, seq_dim) at R markers: Gen's from its final states there h (R, n_embd),
    or query_gen's, which reads each window (the ids Gen sees, up to the marker) cut to its own
    block, in one pass."""
    if query_gen is None:
        return gen.query(h).float().cpu()
    cut = query_gen.config.block_size
    return marker_queries(query_gen, [np.asarray(w[-cut:], dtype=np.int64) for w in windows],
                          device)


def _retrieve(datastore, queries, positions, room, windows, alternatives=0):
    """The retrieval step of R markers: search the datastore with queries (R, d) (with a first
    stage, among its candidates for the windows' texts: Datastore.rerank). For each, its
    Retrieval (inserted at positions[r]) and the tokens to insert, cut to room[r] (what is left
    of its budget)."""
    if datastore.first is not None:
        scores, top, stage = datastore.rerank(queries, windows, k=1 + alternatives)
        stage = stage[:, 0].tolist()
    else:
        (scores, top), stage = datastore.search(queries, k=1 + alternatives), [None] * len(queries)
    out = []
    for position, left, s, t, r in zip(positions, room, scores.tolist(), top.tolist(), stage):
        inserted = [int(x) for x in datastore.sequence(t[0])][:left]
        out.append((Retrieval(position, t[0], s[0], list(zip(t[1:], s[1:])), r), inserted))
    return out


def _check_prompt(prompt):
    if not len(prompt):
        raise ValueError("generate() needs a prompt of at least one token (to start a document "
                         "from nothing, the end-of-document token)")


@torch.inference_mode()
def generate(gen, prompt, max_new_tokens, marker, stop=None, datastore=None, temperature=0.0,
             top_k=None, alternatives=0, use_cache=True, generator=None, query_gen=None):
    """Continue the token ids `prompt` by up to max_new_tokens tokens (inserted sequences count
    too), stopping after `stop`. With a datastore, a marker triggers retrieval. Returns the ids
    (prompt included) and the list of Retrievals. use_cache=False re-reads the whole context at
    every step, as nanoGPT does: slower, and the reference that the cache must agree with.
    query_gen: another Gen that makes the queries (the paper's separate-supervision baseline).
    The prompt must hold at least one token: Gen's first prediction reads the last one."""
    _check_prompt(prompt)
    device = next(gen.parameters()).device
    block = gen.config.block_size
    ids = list(prompt)
    start = max(0, len(ids) - block)      # Gen sees ids[start:]
    caches, fed = None, start             # what the caches hold: ids[start:fed]
    retrievals = []

    def advance():
        """Run the not yet seen ids through Gen; the final hidden state of the last one."""
        nonlocal start, caches, fed
        moved = _window_start(len(ids), start, block)
        if moved != start or not use_cache:
            start, caches = moved, None
        if caches is None:
            caches, fed = new_caches(gen), start
        x = torch.tensor([ids[fed:]], dtype=torch.long, device=device)
        fed = len(ids)
        return gen.hidden(x, caches)[0, -1]

    h = advance()
    n_new = 0
    while n_new < max_new_tokens:
        token = _next_token(gen.lm_head(h).float(), temperature, top_k, generator)
        ids.append(token)
        n_new += 1
        if token == stop:
            break
        h = advance()
        if token == marker and datastore is not None:
            query = _queries(gen, query_gen, h[None], [ids[start:]], device)
            (retrieval, inserted), = _retrieve(datastore, query, [len(ids)],
                                               [max_new_tokens - n_new], [ids[start:]],
                                               alternatives)
            retrievals.append(retrieval)
            if not inserted:
                break
            ids.extend(inserted)
            n_new += len(inserted)
            h = advance()
    return ids, retrievals


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
    h = gen.hidden(x, caches)                                                       # (B, T, C)
    return h[torch.arange(len(fresh), device=device), (counts - 1).clamp(min=0)]    # (B, C)


@torch.inference_mode()
def generate_batch(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                   query_gen=None, retrieve=None):
    """generate() of each of the token id lists `prompts`, greedy, all at once: one forward pass
    per step for every unfinished row. Each row has its own length, budget (max_new_tokens: one
    for all, or one per prompt), retrievals and end; retrieve (one bool per prompt, by default
    all True) says whose markers search the datastore: a row without is Gen alone. Returns a list
    of (ids, Retrievals), one per prompt: what generate() returns for it (batched products may
    round differently, which could turn a near tie of two tokens or entries).

    Each distinct prompt runs through Gen once: one question asked with and without retrieval
    shares that pass. Then rows with retrieval and rows without decode as two batches, because
    a step runs every row as wide as its widest, and an inserted sequence is wide."""
    for p in prompts:
        _check_prompt(p)
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
        """Step the rows `live` (in the caches, in order; h (L, C): their last final states)
        until every one has finished."""
        while True:
            # rows at a marker retrieve; the others write their next token
            at_marker = [i for i, b in enumerate(live) if asking[b]]
            if at_marker:
                rows = [live[i] for i in at_marker]
                windows = [ids[b][start[b]:] for b in rows]
                queries = _queries(gen, query_gen, h[at_marker], windows, device)
                found = _retrieve(datastore, queries, [len(ids[b]) for b in rows],
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
                s = _window_start(len(ids[b]), start[b], block)
                restart.append(s != start[b] and not done[b])
                if restart[-1]:
                    start[b] = fed[b] = s
                fresh.append([] if done[b] else ids[b][fed[b]:])  # finished: nothing to feed
                fed[b] = len(ids[b])
            h = _feed(gen, caches, fresh, restart, device)                          # (L, C)

    live = [b for b in range(B) if not done[b]]
    if not live:
        return list(zip(ids, retrievals))
    distinct = {}   # prompt -> its row in the prompt pass
    first = [distinct.setdefault(tuple(ids[b][start[b]:]), len(distinct)) for b in live]
    caches = [BatchKVCache(block, len(distinct), device) for _ in range(gen.config.n_layer)]
    h = _feed(gen, caches, [list(p) for p in distinct], [False] * len(distinct), device)  # (U, C)
    for group in (True, False):
        rows = [i for i, b in enumerate(live) if retrieve[b] == group]
        if rows:
            index = torch.tensor([first[i] for i in rows], dtype=torch.long, device=device)
            decode([live[i] for i in rows], [cache.take(index) for cache in caches], h[index])
    return list(zip(ids, retrievals))

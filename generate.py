"""
Semiparametric generation: Gen writes tokens, and when it writes the marker, its query at the
marker searches the datastore and the best sequence is appended verbatim (the paper's [Ret] step):

    x_{t+1} ~ p(. | x_<=t)                                  a token step (lm_head)
    if x_{t+1} is the marker:
        j* = argmax_j  q_{t+1} . e_j                         the retrieval step (seq_head)
        x_{t+2} .. x_{t+1+|s_j*|} = the tokens of sequence j*  appended, not written one by one

generate_batch() continues many prompts at once, one pass through Gen per step; generate() is a
batch of one. A KV cache (machinery/kv_cache.py) keeps every token's keys and values, so each
token, and each inserted sequence, runs through Gen once. Positions are absolute, so when a row
outgrows block_size, its window jumps to its last half, encoded again (window_start).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from datastore import marker_queries
from machinery.kv_cache import new_caches  # each layer's keys and values, kept between steps


@dataclass
class Retrieval:
    position: int           # index in the output ids where the inserted sequence starts
    id: int                 # datastore entry
    score: float            # q . e of that entry
    alternatives: list = field(default_factory=list)   # (id, score) of the next best entries
    first_stage_rank: int = None  # two-stage search: where the first stage ranked the entry


def next_tokens(logits, temperature, top_k, generator):
    """The next token of each row of logits (R, vocab): the likeliest at temperature 0, else one
    drawn from softmax(logits / temperature), among the top_k only if given."""
    if temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]     # (R, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0].tolist()


def window_start(n_ids, start, block):
    """Where Gen's window over n_ids ids starts, given where it started. Positions are absolute,
    so cached keys cannot slide with the window: past block_size it jumps to the last half."""
    return n_ids - block // 2 if n_ids - start > block else start


def marker_step_queries(gen, query_gen, h, windows, device):
    """The queries (R, seq_dim) at R markers: Gen's from its final states there h (R, n_embd),
    or query_gen's, which reads each window (the ids Gen sees) cut to its own block."""
    if query_gen is None:
        return gen.query(h).float().cpu()
    cut = query_gen.config.block_size
    return marker_queries(query_gen, [np.asarray(w[-cut:], dtype=np.int64) for w in windows],
                          device)


def retrieval_step(datastore, queries, positions, room, windows, alternatives=0):
    """The retrieval step of R markers: search the datastore with queries (R, d) (two-stage: among
    the first stage's candidates for the windows). For each, its Retrieval (at positions[r]) and
    the tokens to insert, cut to room[r]. No candidate: id -1, nothing inserted, the row ends."""
    if datastore.first is not None:
        scores, top, stage = datastore.rerank(queries, windows, k=1 + alternatives)
        stage = stage[:, 0].tolist()
    else:
        (scores, top), stage = datastore.search(queries, k=1 + alternatives), [None] * len(queries)
    out = []
    for position, left, s, t, r in zip(positions, room, scores.tolist(), top.tolist(), stage):
        found = [(i, score) for i, score in zip(t, s) if i >= 0]   # -1: past the first stage's
        if not found:
            out.append((Retrieval(position, -1, -math.inf), []))
            continue
        inserted = [int(x) for x in datastore.sequence(found[0][0])][:left]
        out.append((Retrieval(position, *found[0], found[1:], r), inserted))
    return out


def _feed(gen, caches, fresh, restart, device):
    """Run each row's fresh tokens (a list per row) through Gen in one pass, right-padded, rows
    where restart is True first emptying their caches: the final state at each row's last fresh
    token (B, n_embd) (for a row with none, one to ignore)."""
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
                   query_gen=None, retrieve=None, temperature=0.0, top_k=None, alternatives=0,
                   use_cache=True, generator=None):
    """Continue each token id list of `prompts` by up to max_new_tokens tokens (one for all, or
    one per prompt; inserted sequences count), stopping after `stop`. With a datastore, a marker
    triggers retrieval where retrieve (a bool per prompt, default all) says so. Returns (ids,
    Retrievals) per prompt. use_cache=False re-reads each window at every step: the reference
    the cache must agree with. query_gen: another Gen makes the queries (separate supervision).
    Each distinct prompt runs through Gen once; rows with and without retrieval then decode
    apart."""
    if not all(len(p) for p in prompts):
        raise ValueError("generate() needs a prompt of at least one token (to start a document "
                         "from nothing, the end-of-document token)")
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
                                       [budget[b] - n_new[b] for b in rows], windows,
                                       alternatives)
                for b, (retrieval, inserted) in zip(rows, found):
                    retrievals[b].append(retrieval)
                    ids[b].extend(inserted)
                    n_new[b] += len(inserted)
                    asking[b], done[b] = False, not inserted or n_new[b] >= budget[b]
            writing = [i for i, b in enumerate(live) if i not in at_marker and not done[b]]
            logits = gen.lm_head(h).float()[writing]                              # (W, vocab)
            for i, token in zip(writing, next_tokens(logits, temperature, top_k, generator)):
                b = live[i]
                ids[b].append(token)
                n_new[b] += 1
                asking[b] = token == marker and retrieve[b]
                done[b] = token == stop or (not asking[b] and n_new[b] >= budget[b])
            kept = [i for i, b in enumerate(live) if not done[b]]
            if not kept:
                return
            # finished rows leave once a quarter of the batch has: leaving copies the caches
            if len(kept) <= 3 * len(live) // 4:
                index = torch.tensor(kept, dtype=torch.long, device=device)
                caches, live = [cache.take(index) for cache in caches], [live[i] for i in kept]
            fresh, restart = [], []
            for b in live:
                s = window_start(len(ids[b]), start[b], block)
                restart.append((s != start[b] or not use_cache) and not done[b])
                if restart[-1]:
                    start[b] = fed[b] = s
                fresh.append([] if done[b] else ids[b][fed[b]:])  # finished: nothing to feed
                fed[b] = len(ids[b])
            h = _feed(gen, caches, fresh, restart, device)                          # (L, n_embd)

    live = [b for b in range(B) if not done[b]]
    if live:
        distinct = {}   # prompt -> its row in the prompt pass
        first = [distinct.setdefault(tuple(ids[b][start[b]:]), len(distinct)) for b in live]
        caches = new_caches(gen)
        h = _feed(gen, caches, [list(p) for p in distinct], [False] * len(distinct),
                  device)                                                           # (U, n_embd)
        for group in (True, False):
            rows = [i for i, b in enumerate(live) if retrieve[b] == group]
            if rows:
                index = torch.tensor([first[i] for i in rows], dtype=torch.long, device=device)
                decode([live[i] for i in rows], [cache.take(index) for cache in caches], h[index])
    return list(zip(ids, retrievals))


def generate(gen, prompt, max_new_tokens, marker, stop=None, datastore=None, temperature=0.0,
             top_k=None, alternatives=0, use_cache=True, generator=None, query_gen=None):
    """generate_batch() of one prompt (at least one token): its (ids, Retrievals)."""
    return generate_batch(gen, [prompt], max_new_tokens, marker, stop, datastore, query_gen,
                          None, temperature, top_k, alternatives, use_cache, generator)[0]

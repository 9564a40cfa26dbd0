"""
Semiparametric generation: Gen writes tokens, and when it writes the marker, its query at the
marker searches the datastore and the best sequence is appended verbatim (the paper's [Ret] step):

    x_{t+1} ~ p(. | x_<=t)                                  a token step (lm_head)
    if x_{t+1} is the marker:
        j* = argmax_j  q_{t+1} . e_j                         the retrieval step (seq_head)
        x_{t+2} .. x_{t+1+|s_j*|} = the tokens of sequence j*  appended, not written one by one

A KV cache (machinery/kv_cache.py) keeps every token's keys and values, so each token, and each
inserted sequence, runs through Gen once. Evaluation decodes many prompts at once, greedily, the
same way (machinery/batch_generate.py): the same tokens but where batched rounding turns a tie.
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


def window_start(n_ids, start, block):
    """Where Gen's window over n_ids ids starts. Positions are absolute, so cached keys cannot
    slide with the window: past block_size it jumps to the last half, encoded again."""
    return n_ids - block // 2 if n_ids - start > block else start


def marker_step_queries(gen, query_gen, h, windows, device):
    """The queries (R, seq_dim) at R markers: Gen's from h (R, n_embd), or query_gen's."""
    if query_gen is None:
        return gen.query(h).float().cpu()
    cut = query_gen.config.block_size
    return marker_queries(query_gen, [np.asarray(w[-cut:], dtype=np.int64) for w in windows],
                          device)


def retrieval_step(datastore, queries, positions, room, windows, alternatives=0):
    """The retrieval step of R markers, queries (R, d): each one's Retrieval (at positions[r]) and
    the tokens to insert, cut to room[r]. No candidate (two-stage): id -1, nothing inserted."""
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


def check_prompt(prompt):
    if not len(prompt):
        raise ValueError("generate() needs a prompt of at least one token (to start a document "
                         "from nothing, the end-of-document token)")


@torch.inference_mode()
def generate(gen, prompt, max_new_tokens, marker, stop=None, datastore=None, temperature=0.0,
             top_k=None, alternatives=0, use_cache=True, generator=None, query_gen=None):
    """Continue the token ids `prompt` by up to max_new_tokens tokens (inserted ones count),
    stopping after `stop`; with a datastore, a marker triggers retrieval. Returns the ids and
    the Retrievals. use_cache=False re-reads the window at every step: the cache's reference.
    query_gen: another Gen that makes the queries (separate supervision)."""
    check_prompt(prompt)
    device = next(gen.parameters()).device
    block = gen.config.block_size
    ids = list(prompt)
    start = max(0, len(ids) - block)      # Gen sees ids[start:]
    caches, fed = None, start             # what the caches hold: ids[start:fed]
    retrievals = []

    def advance():
        """Run the not yet seen ids through Gen; the final hidden state of the last one."""
        nonlocal start, caches, fed
        moved = window_start(len(ids), start, block)
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
        logits = gen.lm_head(h).float()                                   # (vocab,)
        if temperature == 0:  # greedy
            token = int(logits.argmax())
        else:  # drawn from softmax(logits / temperature), among the top_k only if given
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        ids.append(token)
        n_new += 1
        if token == stop:
            break
        h = advance()
        if token == marker and datastore is not None:
            query = marker_step_queries(gen, query_gen, h[None], [ids[start:]], device)
            (retrieval, inserted), = retrieval_step(datastore, query, [len(ids)],
                                               [max_new_tokens - n_new], [ids[start:]],
                                               alternatives)
            retrievals.append(retrieval)
            if not inserted:
                break
            ids.extend(inserted)
            n_new += len(inserted)
            h = advance()
    return ids, retrievals

"""
Exact search at speed (datastore.search and datastore.target_ranks): the scores q . e_j of every
entry, a chunk of entries at a time, so that memory stays bounded on a datastore of millions, and
on a CPU through numpy. The same numbers as the plain product queries @ embeddings.T (tests).
"""

import math

import torch


def dot_scores(queries, keys):
    """The scores q . e_j of queries (Q, d) against keys (n, d): (Q, n). On a CPU numpy computes
    the product, on the same memory (.numpy() copies nothing): this torch build's product over 1M
    x 128 float32 keys took about twice numpy's time here, and the product is the whole cost of
    exact search. On a GPU, torch."""
    if keys.device.type == "cpu":
        return torch.from_numpy(queries.detach().numpy() @ keys.detach().numpy().T)  # (Q, n)
    return queries.to(keys.device) @ keys.T                                        # (Q, n)


def chunk_scores(queries, embeddings, chunk):
    """Each chunk's start s and the scores queries @ embeddings[s:s + chunk].T, (Q, chunk)."""
    for s in range(0, len(embeddings), chunk):
        yield s, dot_scores(queries, embeddings[s:s + chunk])                  # (Q, chunk)


def top_k(queries, embeddings, k, chunk):
    """The k best entries of embeddings (n, d) for each of queries (Q, d) by inner product, one
    chunk of entries at a time: scores (Q, k) and ids (Q, k), best first (k at most n)."""
    best_scores = torch.full((len(queries), 0), -math.inf, device=embeddings.device)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.long, device=embeddings.device)
    for s, scores in chunk_scores(queries, embeddings, chunk):
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_ids = torch.cat([best_ids, top.indices + s], dim=1)
        keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
        best_scores, best_ids = best_scores.gather(1, keep), best_ids.gather(1, keep)
    return best_scores, best_ids


def ranks_from_chunks(score_chunks, targets, tolerance):
    """The rank of each query's target, a tie counted against it, from score_chunks(): the
    scores of the queries against every entry, as (start s, scores (Q, c) of entries s .. s+c-1).
    An entry ties the target when it scores at least the target's score minus tolerance (a
    number, or (Q, 1)). Two passes, so that only one chunk of scores is held at a time."""
    rows = torch.arange(len(targets))
    # the target's score from the same product as the others' (another order of summation
    # rounds it differently again)
    target_scores = None                                                  # (Q, 1)
    for s, scores in score_chunks():
        if target_scores is None:
            target_scores = scores.new_empty(len(targets), 1)
        inside = (targets >= s) & (targets < s + scores.shape[1])
        target_scores[inside, 0] = scores[rows[inside], targets[inside] - s]
    at_least = torch.zeros(len(targets), dtype=torch.long)  # the target itself, and every tie
    for s, scores in score_chunks():
        at_least += (scores >= target_scores - tolerance).sum(dim=1)
    return at_least


def score_tolerance(queries, embeddings):
    """The tie tolerance of target_ranks for each query (Q, 1): d * eps * |q| * max|e|.

    A tie is a score within float32's rounding of the target's, not a bitwise-equal one. A dot
    product of width d computed in float32 is off by at most about d * u * |q| |e| (u = 2^-24, the
    unit roundoff), and which way it rounds depends on the BLAS kernel, the instruction set and
    the thread count: two identical entries can score 1 ulp apart on one machine and equal on
    another. Two computed scores whose exact values are equal therefore differ by at most
    2 d u |q| max|e| = d * eps * |q| max|e| (eps = 2u), and every entry within that of the target
    counts as a tie: the same ranks on every machine."""
    norms = (queries.double().norm(dim=1, keepdim=True)
             * embeddings.double().norm(dim=1).max(dim=0, keepdim=True).values)     # (Q, 1)
    dtype = torch.promote_types(queries.dtype, embeddings.dtype)
    return tie_tolerance(queries.shape[1], dtype, norms).to(dtype)                  # (Q, 1)


def tie_tolerance(width, dtype, scale=1.0):
    """How far apart float arithmetic can put two dot products of width `width` that are equal
    in exact arithmetic (target_ranks): width * eps * scale, scale bounding |q| |e| (1 for unit
    vectors)."""
    return width * torch.finfo(dtype).eps * scale

"""
The retrieval step and how it is scored.

Retrieval is exact maximum inner product search: for a query q (Gen at a marker) the datastore
entry returned is

    argmax_j  q . e_j        over every sequence j of the corpus, e_j = Emb_seq(sequence j)

Queries and embeddings are unit vectors, so this is also the nearest neighbour by cosine.
Evaluation asks where each marker's true target lands in that ranking: recall@k (target in the top
k) and MRR (mean of 1 / rank), against the whole datastore, not just a batch.
"""

import math

import numpy as np
import torch


def search(queries, keys, k=10, chunk=65536):
    """Exact top-k by inner product of queries (Q, d) over keys (N, d), in chunks of keys so
    memory stays bounded. Returns scores (Q, k) and ids (Q, k), best first."""
    best_scores = torch.full((len(queries), 0), -math.inf)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.long)
    for s in range(0, len(keys), chunk):
        scores = queries @ keys[s:s + chunk].T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_ids = torch.cat([best_ids, top.indices + s], dim=1)
        keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
        best_scores, best_ids = best_scores.gather(1, keep), best_ids.gather(1, keep)
    return best_scores, best_ids


def target_ranks(queries, keys, targets, chunk=65536):
    """Rank (1 = best) of each query's target among all keys: 1 + the number scoring higher."""
    target_scores = (queries * keys[targets]).sum(dim=1, keepdim=True)
    higher = torch.zeros(len(queries), dtype=torch.long)
    for s in range(0, len(keys), chunk):
        higher += (queries @ keys[s:s + chunk].T > target_scores).sum(dim=1)
    return higher + 1


def retrieval_metrics(ranks):
    ranks = ranks.double()
    return {"recall@1": (ranks <= 1).double().mean().item(),
            "recall@10": (ranks <= 10).double().mean().item(),
            "mrr": (1.0 / ranks).mean().item()}


def chance_metrics(n):
    """What a random ranking of n entries scores: recall@k = k/n, MRR = (1/n) sum_r 1/r."""
    return {"recall@1": 1 / n, "recall@10": min(10, n) / n,
            "mrr": float(np.sum(1.0 / np.arange(1, n + 1)) / n)}


@torch.inference_mode()
def marker_queries(gen, contexts, device, batch_size=256):
    """Gen's query at the last token (a marker) of each context (a list of 1-d token arrays).
    Contexts are right-padded into batches: under the causal mask the padding after a marker
    cannot change the hidden state at the marker."""
    out = []
    for s in range(0, len(contexts), batch_size):
        chunk = contexts[s:s + batch_size]
        lengths = torch.tensor([len(c) for c in chunk])
        x = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for i, c in enumerate(chunk):
            x[i, :len(c)] = torch.from_numpy(c)
        h = gen.hidden(x.to(device))
        out.append(gen.query(h[torch.arange(len(chunk)), lengths - 1]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, gen.config.seq_dim)

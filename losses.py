"""
The co-supervision objective, each term next to the code that computes it.

    L = lambda_tok * L_NTP + lambda_seq * L_NSP

L_NTP, next-token prediction, over every token of the B windows of T (markers and sequences too):

    L_NTP = -(1/(B T)) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})

L_NSP, next-sequence prediction, an InfoNCE over the M markers of a batch: at marker i Gen's query
q_i must score its target's embedding e_{p(i)} above the batch's other candidates C (the other
markers' targets and the hard negatives), less F_i, its likely false negatives (data.near_targets):

    L_NSP = -(1/M) sum_i log [ exp(q_i . e_{p(i)} / tau) / sum_{j in C - F_i} exp(q_i . e_j / tau) ]

q and e are unit vectors, so q . e is a cosine in [-1, 1] and tau sets how sharp the softmax is
(the paper's code uses a raw dot product: experiments/README.md, "Where cosup differs").
"""

import torch.nn.functional as F


def ntp_loss(logits, targets):
    """L_NTP: mean cross-entropy of the next token. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def nsp_loss(queries, embeddings, target_row, temperature, excluded=None):
    """L_NSP of queries (M, d) against the candidates (N, d), target_row (M,) being p(i) and
    excluded (M, N) F_i; and the in-batch top-1 accuracy."""
    scores = queries.float() @ embeddings.float().T / temperature  # (M, N): q_i . e_j / tau
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))      # (M, N): j in F_i counts 0
    loss = F.cross_entropy(scores, target_row)                    # -log softmax at the target
    accuracy = (scores.argmax(dim=1) == target_row).float().mean()
    return loss, accuracy


def co_supervision_loss(gen, embedder, batch, lambda_tok, lambda_seq, temperature, gather=None):
    """L on one batch, and its parts. Without lambda_seq > 0 and markers Emb_seq does not run:
    exactly NTP training. gather (train.py) widens the candidates to every process's."""
    with_nsp = lambda_seq > 0 and (len(batch.target_row) > 0 or gather is not None)
    logits, queries = gen(batch.x, batch.marker_index if with_nsp else None)  # (B, T, V), (M, d)
    l_ntp = ntp_loss(logits, batch.y)
    stats = {"ntp": l_ntp.detach()}
    loss = lambda_tok * l_ntp
    if with_nsp:
        embeddings = embedder(batch.candidates, batch.candidate_mask)       # (N, d)
        nsp = (queries, embeddings, batch.target_row, batch.candidate_ids, batch.neighbours)
        if gather is not None:
            nsp = gather(*nsp)
        queries, embeddings, target_row, candidate_ids, neighbours = nsp
        # F_i: the candidates among marker i's neighbours (datastore ids), but its own target
        near = (neighbours[:, :, None] == candidate_ids[None, None, :]).any(dim=1)   # (M, N)
        excluded = near & (candidate_ids[None, :] != candidate_ids[target_row][:, None])
        l_nsp, accuracy = nsp_loss(queries, embeddings, target_row, temperature, excluded)
        stats.update(nsp=l_nsp.detach(), nsp_acc=accuracy)
        loss = loss + lambda_seq * l_nsp
    return loss, stats

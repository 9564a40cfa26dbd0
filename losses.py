"""
The co-supervision objective, each term next to the code that computes it.

    L = lambda_tok * L_NTP + lambda_seq * L_NSP

L_NTP, next-token prediction, over every position t of every window (markers and sequence tokens
included):

    L_NTP = -(1/N) sum_t log p(x_{t+1} | x_<=t)

L_NSP, next-sequence prediction, an InfoNCE over the M markers of a batch. At marker i Gen's query
q_i (model.py) must score its target sequence's embedding e_{p(i)} (embedder.py) above every other
candidate in the batch C (the other markers' targets and the hard negatives):

    L_NSP = -(1/M) sum_i log [ exp(q_i . e_{p(i)} / tau) / sum_{j in C} exp(q_i . e_j / tau) ]

q and e are unit vectors, so q . e is a cosine in [-1, 1] and tau (the temperature) sets how sharp
the softmax is. (The paper's code uses a raw dot product with no temperature; see README.)

With several processes (torchrun), C is the union of every process's candidates and the M markers
are all processes' markers (distributed.gather_candidates), as in the paper's code.
"""

import torch.nn.functional as F

from distributed import gather_candidates, total, world_size


def ntp_loss(logits, targets):
    """L_NTP: mean cross-entropy of the next token. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def nsp_loss(queries, keys, positive, temperature):
    """L_NSP: InfoNCE of queries (M, d) against candidate keys (N, d); positive (M,) is the row of
    each query's target in keys. Returns the loss and the in-batch top-1 accuracy."""
    scores = queries.float() @ keys.float().T / temperature      # (M, N): q_i . e_j / tau
    loss = F.cross_entropy(scores, positive)                      # -log softmax at the target
    accuracy = (scores.argmax(dim=1) == positive).float().mean()
    return loss, accuracy


def co_supervision_loss(gen, embedder, batch, lambda_tok, lambda_seq, temperature, with_nsp=None,
                        gather=False):
    """L = lambda_tok * L_NTP + lambda_seq * L_NSP on one batch, and its parts for logging.

    L_NSP is computed when lambda_seq > 0 (or with_nsp, to measure it). When it is not, Emb_seq
    does not run at all: with lambda_seq = 0 it gets no gradient and this is exactly NTP training.
    gather (training with several processes): L_NSP over the candidates of all processes."""
    with_nsp = lambda_seq > 0 if with_nsp is None else with_nsp
    # a batch may hold no marker; with several processes, all run L_NSP if any batch has one
    markers = total(len(batch.positive), batch.x.device) if gather else len(batch.positive)
    with_nsp = with_nsp and markers > 0
    logits, queries = gen(batch.x, batch.marker_index if with_nsp else None)
    l_ntp = ntp_loss(logits, batch.y)
    stats = {"ntp": l_ntp.detach()}
    loss = lambda_tok * l_ntp
    if with_nsp:
        keys, positive = embedder(batch.seq_tokens, batch.seq_mask), batch.positive
        if gather:
            queries, keys, positive = gather_candidates(queries, keys, positive, batch.seq_ids)
        l_nsp, accuracy = nsp_loss(queries, keys, positive, temperature)
        stats.update(nsp=l_nsp.detach(), nsp_acc=accuracy)
        if lambda_seq > 0:
            # gathered, each of the W processes computes all of L_NSP but its gradient only
            # through its own queries and keys, and DDP averages the W gradients: the weight W
            # makes that average the gradient of L_NSP (distributed.gather_candidates)
            loss = loss + (lambda_seq * world_size() if gather else lambda_seq) * l_nsp
    return loss, stats

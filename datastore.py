"""
The retrieval step and how it is scored.

Retrieval is exact maximum inner product search: for a query q (Gen at a marker) the datastore
entry returned is

    argmax_j  q . e_j        over every sequence j of the corpus, e_j = Emb_seq(sequence j)

Queries and embeddings are unit vectors, so this is also the nearest neighbour by cosine. Past
about 1M sequences an approximate index (faiss, optional: machinery/faiss_index.py) can stand in
for the search of generation; evaluation's ranks are always exact.
Evaluation asks where each marker's true target lands in that ranking: recall@k (target in the top
k) and MRR (mean of 1 / rank), against the whole datastore, not just a batch. Beside chance, a
training-free lexical retriever (TF-IDF, machinery/lexical.py) is scored on exactly the same
markers, contexts and datastore: the learned sequence space earns its keep only where it beats words alone.
The paper evaluates otherwise: a first stage retrieves each question's top K candidates and the
learned score only re-ranks those (two-stage retrieval, end of this file); both are reported.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

from machinery import exact_search  # the same products, a chunk at a time
from machinery import intervals  # 95% intervals over the markers


def search(queries, embeddings, k=10, chunk=65536):
    """Exact top-k by inner product of queries (Q, d) over embeddings (n, d),

        top-k_j  q . e_j        over every entry j,

    as (queries @ embeddings.T).topk(k) would give, a chunk of entries at a time (exact_search.py).
    Returns scores (Q, k) and ids (Q, k), best first, on the embeddings' device."""
    return exact_search.top_k(queries, embeddings, k, chunk)


def target_ranks(queries, embeddings, targets, chunk=None):
    """Rank (1 = best) of each query's target among all embeddings: 1 + the number of OTHER
    entries scoring at least as high as the target (a tie counts against it, so n identical
    embeddings rank every target n-th, not first). queries (Q, d), embeddings (n, d), targets
    (Q,) ids; returns (Q,). A query or embedding that is not finite is an error: it would make
    the ranking, and every number from it, meaningless. chunk: entries scored at a time, by
    default as many as keep one (Q, chunk) table of scores within 16 MB. A tie is a score within
    float32's rounding of the target's (exact_search.score_tolerance): the same ranks anywhere."""
    if not (torch.isfinite(queries).all() and torch.isfinite(embeddings).all()):
        raise ValueError("a query or datastore embedding is not finite (NaN or inf): retrieval "
                         "cannot be scored")
    chunk = chunk or max(1, 2**22 // max(1, len(queries)))
    tolerance = exact_search.score_tolerance(queries, embeddings)                    # (Q, 1)
    return exact_search.ranks_from_chunks(
        lambda: exact_search.chunk_scores(queries, embeddings, chunk), targets, tolerance)


def retrieval_metrics(ranks):
    """recall@1, recall@10 (the share of targets ranked in the top 1 / 10) and MRR (mean 1/rank),
    each with its 95% interval over the markers, name_ci (machinery/intervals.py): exact binomial
    for a recall, a bootstrap of the markers for MRR."""
    ranks = ranks.double()
    out = {}
    for k in (1, 10):
        hits = ranks <= k                                                   # (Q,)
        out[f"recall@{k}"] = hits.double().mean().item()
        out[f"recall@{k}_ci"] = intervals.share_interval(int(hits.sum()), len(ranks))
    out["mrr"] = (1.0 / ranks).mean().item()
    out["mrr_ci"] = intervals.mean_interval((1.0 / ranks).numpy())
    return out


def chance_metrics(n):
    """What a random ranking of n entries scores: recall@k = k/n, MRR = (1/n) sum_r 1/r."""
    if n == 0:
        return {"recall@1": None, "recall@10": None, "mrr": None}
    return {"recall@1": 1 / n, "recall@10": min(10, n) / n,
            "mrr": float(np.sum(1.0 / np.arange(1, n + 1)) / n)}


@torch.inference_mode()
def marker_queries(gen, contexts, device, batch_size=64):
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
        h = gen.hidden(x.to(device))                                      # (b, T, n_embd)
        out.append(gen.query(h[torch.arange(len(chunk)), lengths - 1]).float().cpu())  # (b, d)
    return torch.cat(out) if out else torch.zeros(0, gen.config.seq_dim)


@torch.no_grad()
def split_queries(gen, data, split, device, ctx, limit=None):
    """Gen's query at each marker of a split (the first `limit`), (Q, d), and each marker's
    target id (Q,). Each marker's context is cut to what this Gen can read: its own block_size."""
    contexts, targets = data.marker_contexts(split, limit, gen.config.block_size)
    with ctx:
        queries = marker_queries(gen, contexts, device)                     # (Q, d)
    return queries, torch.from_numpy(targets)


def retrieval_quality(gen, embeddings, data, split, device, ctx, limit=None, stage=None):
    """recall@1, recall@10 and MRR of a split's markers (the first `limit`) against the whole
    datastore `embeddings`: every sequence of the corpus, embedded. With a FirstStage of the
    same markers, also reranked_*: the learned score re-ranking the first stage's K (two-stage
    retrieval, below), and its MRR minus TF-IDF's order's, paired (reranking)."""
    queries, targets = split_queries(gen, data, split, device, ctx, limit)
    if not len(targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    out = retrieval_metrics(target_ranks(queries, embeddings, targets))
    if stage is not None:
        learned = candidate_scores(queries, embeddings, stage.ids)          # (Q, K)
        tolerance = exact_search.score_tolerance(queries, embeddings)       # (Q, 1)
        m = reranking(learned, stage, tolerance)
        out.update({f"reranked_{k}": v for k, v in m.items()})
    return out


class Datastore:
    """The nonparametric sequence space: every sequence of a corpus embedded by Emb_seq, in one
    contiguous (n, d) tensor, with the token ids of each entry (what retrieval inserts):
    entry i is seq_tokens[offsets[i]:offsets[i + 1]], as in data.Data."""

    def __init__(self, embeddings, offsets, seq_tokens, fingerprint):
        self.embeddings, self.offsets, self.seq_tokens = embeddings, offsets, seq_tokens
        self.fingerprint = fingerprint
        self.index = None   # None: exact search; else faiss (machinery/search.py)
        self.first = None   # None: search every entry; else (Lexical, K, tok): use_first_stage

    def __len__(self):
        return len(self.embeddings)

    def sequence(self, i):
        return self.seq_tokens[self.offsets[i]:self.offsets[i + 1]]

    def use_first_stage(self, lexical, k, tok):
        """Two-stage search from now on (rerank): the learned score re-ranks the top k of lexical
        (a Lexical of this datastore's texts) for the query text of each context; k = 0: off."""
        self.first = (lexical, k, tok) if k else None
        return self

    def search(self, queries, k=1):
        """The top-k entries for queries (Q, d): scores (Q, k) and ids (Q, k), best first."""
        if self.index is not None:
            return self.index.search(queries, k)
        return search(queries, self.embeddings, k)

    def rerank(self, queries, contexts, k=1):
        """Two-stage search (use_first_stage): the top-k entries for queries (Q, d) among the
        first stage's K for the texts of contexts (the ids Gen sees at each marker): scores
        (Q, k), ids (Q, k), best first, and where the first stage ranked each of them (Q, k),
        1 = its own best. Past the first stage's candidates (those that share a word with the
        context: Lexical.top), id -1 and score -inf."""
        lexical, K, tok = self.first
        _, ids = lexical.top([query_text(tok, c) for c in contexts], K)        # (Q, K)
        scores, order = candidate_scores(queries, self.embeddings, ids).topk(
            min(k, ids.shape[1]), dim=1)                                       # (Q, k) each
        return scores, ids.gather(1, order), order + 1

    # building it (Emb_seq over every sequence, with a fingerprint of the weights and data), and
    # saving and loading it: machinery/datastore_file.py


# -----------------------------------------------------------------------------------------------
# The lexical query of a marker: the text Gen sees there. A training-free TF-IDF retriever reads
# it (machinery/lexical.py, its equations there), as the baseline every learned number stands
# beside and as the first stage of two-stage retrieval (below).

def query_text(tok, ids):
    """The lexical query of a context: its text, special tokens (marker, end of document) left
    out."""
    return tok.decode([t for t in ids if t not in (tok.marker, tok.eod)])


def marker_texts(data, tok, split, limit=None):
    """The lexical query of each marker of a split (the first limit): the text Gen sees there.
    Returns (strings, target ids (Q,))."""
    contexts, targets = data.marker_contexts(split, limit)
    return [query_text(tok, c) for c in contexts], targets


# -----------------------------------------------------------------------------------------------
# Two-stage retrieval, as the paper evaluates: a first stage (TF-IDF) returns each query's top K
# candidates C_K(q); the learned score re-ranks only those,
#
#     j* = argmax_{j in C_K(q)}  q . e_j
#
# A target outside C_K(q) is a miss (rank infinite: recall 0, reciprocal rank 0), so the first
# stage's recall@K is the ceiling of every re-ranked number. TF-IDF's own order of the same K is
# the line the learned order must beat.

class FirstStage(NamedTuple):
    ids: torch.Tensor       # (Q, K) each query's candidates, TF-IDF's best first
    scores: torch.Tensor    # (Q, K) their TF-IDF cosines s(q, j)
    targets: torch.Tensor   # (Q,) each query's target id
    tolerance: float = 0.0  # two cosines this close tie (Lexical.tolerance: their rounding)


def first_stage(lexical, data, tok, split, k, limit=None):
    """The first stage's top k for each marker of a split (the first limit)."""
    queries, targets = marker_texts(data, tok, split, limit)
    scores, ids = lexical.top(queries, k)
    return FirstStage(ids, scores, torch.as_tensor(targets), lexical.tolerance)


def candidate_scores(queries, embeddings, ids, chunk=None):
    """The learned score q . e_j of each query (Q, d) for its own candidates ids (Q, K):
    (Q, K), -inf where the id is -1 (no candidate: Lexical.top). Queries a chunk at a time: the
    gathered embeddings are (chunk, K, d), by default within 8 MB; each query's scores are the
    same whatever the chunk."""
    chunk = chunk or max(1, 2**21 // max(1, ids.shape[1] * embeddings.shape[1]))  # float32
    out = [torch.zeros(0, ids.shape[1])]
    for s in range(0, len(queries), chunk):
        e = embeddings[ids[s:s + chunk].clamp(min=0)].float()              # (c, K, d)
        scores = torch.einsum("cd,ckd->ck", queries[s:s + chunk].float(), e)      # (c, K)
        out.append(scores.masked_fill(ids[s:s + chunk] < 0, -math.inf))
    return torch.cat(out)


def candidate_ranks(scores, ids, targets, tolerance=0.0):
    """Rank (1 = best) of each target among its own candidates ids (Q, K) under scores (Q, K):
    1 + the number of other candidates scoring at least the target's minus tolerance (a tie
    counts against it); inf where the target is not a candidate. Returns (Q,) float64."""
    hit = ids == targets[:, None]                                          # (Q, K)
    target_scores = scores.gather(1, hit.double().argmax(dim=1, keepdim=True))  # (Q, 1)
    ranks = (scores >= target_scores - tolerance).sum(dim=1).double()      # (Q,)
    return torch.where(hit.any(dim=1), ranks, torch.full_like(ranks, math.inf))


def rerank_metrics(scores, stage, tolerance=0.0):
    """recall@1, recall@10 and MRR of stage's targets when scores (Q, K) order its candidates."""
    if not len(stage.targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    return retrieval_metrics(candidate_ranks(scores, stage.ids, stage.targets, tolerance))


def first_stage_metrics(stage, lexical):
    """The first stage alone, named first_stage_*: recall@K (the share of targets among the K:
    the ceiling of every re-ranked number) and TF-IDF's own order of the K."""
    m = rerank_metrics(stage.scores, stage, lexical.tolerance)
    held = (stage.ids == stage.targets[:, None]).any(dim=1)                # (Q,)
    ceiling = {"first_stage_recall@K": held.double().mean().item() if len(held) else None}
    if len(held):
        ceiling["first_stage_recall@K_ci"] = intervals.share_interval(int(held.sum()), len(held))
    return {"first_stage_k": stage.ids.shape[1], **ceiling,
            **{f"first_stage_{k}": v for k, v in m.items()}}


def reranking(scores, stage, tolerance=0.0):
    """rerank_metrics of scores (Q, K) ordering stage's candidates, and, paired on the same
    markers, their MRR minus that of TF-IDF's own order of them: mrr_minus_first_stage, with its
    95% interval (_ci) and two-sided p (_p) from a bootstrap of the markers
    (machinery/intervals.py): whether the learned order beats TF-IDF's, or only seems to."""
    if not len(stage.targets):
        return {**rerank_metrics(scores, stage), "mrr_minus_first_stage": None}
    ranks = candidate_ranks(scores, stage.ids, stage.targets, tolerance)             # (Q,)
    own = candidate_ranks(stage.scores, stage.ids, stage.targets, stage.tolerance)  # (Q,)
    diff, ci, p = intervals.paired_difference((1.0 / ranks).numpy(), (1.0 / own).numpy())
    return {**retrieval_metrics(ranks), "mrr_minus_first_stage": diff,
            "mrr_minus_first_stage_ci": ci, "mrr_minus_first_stage_p": p}

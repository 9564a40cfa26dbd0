"""
The retrieval step and how it is scored. Retrieval is exact maximum inner product search: for a
query q (Gen at a marker) the datastore entry returned is

    argmax_j  q . e_j        over every sequence j of the corpus, e_j = Emb_seq(sequence j)

q and e are unit vectors, so this is the nearest neighbour by cosine (faiss can stand in for it in
generation: machinery/search.py). Evaluation asks where each marker's target lands: recall@k (in
the top k) and MRR (mean of 1 / rank), beside chance and TF-IDF; then two-stage retrieval.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from machinery import intervals  # 95% intervals over the markers


def query_chunks(queries, keys, chunk=None):
    """(s, q . e_j of queries s .. s+c-1 against every key (c, n)), as many queries at a time as
    keep the table within 16 MB. On a CPU numpy's product, the faster there, on the same memory."""
    chunk = chunk or max(1, 2**22 // max(1, len(keys)))
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        if keys.device.type == "cpu":
            yield s, torch.from_numpy(q.detach().numpy() @ keys.detach().numpy().T)  # (c, n)
        else:
            yield s, q.to(keys.device) @ keys.T                                     # (c, n)


def search(queries, embeddings, k=10, chunk=None):
    """Exact top-k of queries (Q, d) over embeddings (n, d): scores and ids (Q, k), best first."""
    k = min(k, len(embeddings))
    top = [scores.topk(k, dim=1) for _, scores in query_chunks(queries, embeddings, chunk)]
    return torch.cat([t.values for t in top]), torch.cat([t.indices for t in top])


# The tie rule: a tie counts against the target. A dot product of width d is off by at most about
# d (eps / 2) |q| |e|, its rounding up to the BLAS kernel and thread count, so every entry within
# d eps |q| max|e| of the target ties with it: the same ranks on any machine.

def tie_tolerance(width, dtype, scale=1.0):
    """How far rounding can part two equal dot products: width * eps * scale, scale >= |q| |e|."""
    return width * torch.finfo(dtype).eps * scale


def score_tolerance(queries, embeddings):
    """The tie tolerance of each query (Q, 1) against embeddings: d * eps * |q| * max|e|."""
    norms = (queries.double().norm(dim=1, keepdim=True)
             * embeddings.double().norm(dim=1).max(dim=0, keepdim=True).values)     # (Q, 1)
    dtype = torch.promote_types(queries.dtype, embeddings.dtype)
    return tie_tolerance(queries.shape[1], dtype, norms).to(dtype)                  # (Q, 1)


def ranks_in(scores, targets, tolerance):
    """Rank (1 = best) of each row's target (Q,): the entries scoring >= its score - tolerance."""
    target_scores = scores.gather(1, targets[:, None])                      # (Q, 1)
    return (scores >= target_scores - tolerance).sum(dim=1)                 # (Q,)


def target_ranks(queries, embeddings, targets, chunk=None):
    """Rank (1 = best) of each query's (Q, d) target (Q,) among all embeddings (n, d): (Q,)."""
    if not (torch.isfinite(queries).all() and torch.isfinite(embeddings).all()):
        raise ValueError("a query or datastore embedding is not finite (NaN or inf): retrieval "
                         "cannot be scored")
    tolerance = score_tolerance(queries, embeddings)                                 # (Q, 1)
    ranks = [ranks_in(scores, targets[s:s + len(scores)], tolerance[s:s + len(scores)])
             for s, scores in query_chunks(queries, embeddings, chunk)]
    return torch.cat(ranks or [torch.zeros(0, dtype=torch.long)])


def retrieval_metrics(ranks):
    """recall@1, recall@10 and MRR (mean 1/rank) of ranks, each with its 95% interval, name_ci."""
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
    """Gen's query at the last token (a marker) of each context, right-padded in batches."""
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
    """Gen's query at each marker of a split (the first `limit`), (Q, d), and its target (Q,)."""
    contexts, targets = data.marker_contexts(split, limit, gen.config.block_size)
    with ctx:
        queries = marker_queries(gen, contexts, device)                     # (Q, d)
    return queries, torch.from_numpy(targets)


def retrieval_quality(gen, embeddings, data, split, device, ctx, limit=None, stage=None):
    """recall@1, recall@10 and MRR of a split's markers; with a FirstStage, reranked_* too."""
    queries, targets = split_queries(gen, data, split, device, ctx, limit)
    if not len(targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    out = retrieval_metrics(target_ranks(queries, embeddings, targets))
    if stage is not None:
        learned = candidate_scores(queries, embeddings, stage.ids)          # (Q, K)
        m = reranking(learned, stage, score_tolerance(queries, embeddings))
        out.update({f"reranked_{k}": v for k, v in m.items()})
    return out


@torch.inference_mode()
def embed_all(embedder, data, batch_size=256, progress=None):
    """Emb_seq of every sequence (n_sequences, seq_dim), float32, in batches of similar lengths."""
    device = next(embedder.parameters()).device
    order = np.argsort(np.diff(data.offsets), kind="stable")                  # shortest first
    out = torch.empty(data.n_sequences, embedder.config.seq_dim)
    show = data.n_sequences > 20_000 if progress is None else progress
    for s in tqdm(range(0, data.n_sequences, batch_size), desc="embedding sequences",
                  disable=not show, leave=False):
        rows = order[s:s + batch_size]
        tokens, mask = data.pad_sequences(rows, embedder.config.block_size)
        out[torch.from_numpy(rows)] = embedder(tokens.to(device), mask.to(device)).float().cpu()
    return out


class Datastore:
    """The nonparametric sequence space: every sequence embedded (n, d), and sequence(i), the
    token ids of entry i (Data.sequence)."""

    def __init__(self, embeddings, sequence, fingerprint):
        self.embeddings, self.sequence, self.fingerprint = embeddings, sequence, fingerprint
        self.index = None   # None: exact search; else faiss (machinery/search.py)
        self.first = None   # None: search every entry; else (Lexical, K, tok): use_first_stage

    def __len__(self):
        return len(self.embeddings)

    def use_first_stage(self, lexical, k, tok):
        """Two-stage search (rerank) from now on, over lexical's top k; k = 0: off."""
        self.first = (lexical, k, tok) if k else None
        return self

    def search(self, queries, k=1):
        """The top-k entries for queries (Q, d): scores (Q, k) and ids (Q, k), best first."""
        if self.index is not None:
            return self.index.search(queries, k)
        return search(queries, self.embeddings, k)

    def rerank(self, queries, contexts, k=1):
        """The top-k entries for queries (Q, d) among the first stage's K for the contexts' texts:
        scores, ids (-1 past the candidates) and the first stage's rank of each, (Q, k) each."""
        lexical, K, tok = self.first
        _, ids = lexical.top([query_text(tok, c) for c in contexts], K)        # (Q, K)
        scores, order = candidate_scores(queries, self.embeddings, ids).topk(
            min(k, ids.shape[1]), dim=1)                                       # (Q, k) each
        return scores, ids.gather(1, order), order + 1


# -----------------------------------------------------------------------------------------------
# TF-IDF, the training-free baseline and first stage. Words are lowercase \w+ runs. Over the N
# datastore sequences, n(w, d) the count of word w in text d, df(w) the sequences that hold w:
#
#     v_d[w] = tf(w, d) * idf(w),   tf = 1 + log n(w, d)  (0 where n = 0),
#                                   idf(w) = 1 + log((1 + N) / (1 + df(w)))
#     s(q, j) = v_q . v_j / (|v_q| |v_j|)          (0 where either vector is all zero)
#
# The query is the text Gen sees at the marker (query_text). machinery/lexical.py computes s over
# a whole corpus: sparse vectors, a chunk of queries at a time.

def query_text(tok, ids):
    """The lexical query of a context: its text, without the marker and end of document."""
    return tok.decode([t for t in ids if t not in (tok.marker, tok.eod)])


def marker_texts(data, tok, split, limit=None):
    """The lexical query of each marker of a split (the first limit), and its target id (Q,)."""
    contexts, targets = data.marker_contexts(split, limit)
    return [query_text(tok, c) for c in contexts], targets


# -----------------------------------------------------------------------------------------------
# Two-stage retrieval, as the paper evaluates: a first stage (TF-IDF) returns each query's top K
# candidates C_K(q); the learned score re-ranks only those,
#
#     j* = argmax_{j in C_K(q)}  q . e_j
#
# A target outside C_K(q) is a miss (reciprocal rank 0), so the first stage's recall@K is the
# ceiling of every re-ranked number; TF-IDF's own order of the K is the line to beat.

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
    """q . e_j of each query (Q, d) for its candidates ids (Q, K), -inf where -1: (Q, K). As many
    queries at a time as keep the gathered (c, K, d) within 8 MB."""
    chunk = chunk or max(1, 2**21 // max(1, ids.shape[1] * embeddings.shape[1]))  # float32
    out = [torch.zeros(0, ids.shape[1])]
    for s in range(0, len(queries), chunk):
        e = embeddings[ids[s:s + chunk].clamp(min=0)].float()              # (c, K, d)
        scores = torch.einsum("cd,ckd->ck", queries[s:s + chunk].float(), e)      # (c, K)
        out.append(scores.masked_fill(ids[s:s + chunk] < 0, -math.inf))
    return torch.cat(out)


def candidate_ranks(scores, ids, targets, tolerance=0.0):
    """Rank of each target among its candidates ids (Q, K) by scores, inf if none: (Q,) float64."""
    hit = ids == targets[:, None]                                          # (Q, K)
    ranks = ranks_in(scores, hit.double().argmax(dim=1), tolerance).double()   # (Q,)
    return torch.where(hit.any(dim=1), ranks, torch.full_like(ranks, math.inf))


def rerank_metrics(scores, stage, tolerance=0.0):
    """recall@1, recall@10 and MRR of stage's targets when scores (Q, K) order its candidates."""
    if not len(stage.targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    return retrieval_metrics(candidate_ranks(scores, stage.ids, stage.targets, tolerance))


def first_stage_metrics(stage, lexical):
    """The first stage alone (first_stage_*): recall@K, the ceiling, and TF-IDF's order of K."""
    m = rerank_metrics(stage.scores, stage, lexical.tolerance)
    held = (stage.ids == stage.targets[:, None]).any(dim=1)                # (Q,)
    ceiling = {"first_stage_recall@K": held.double().mean().item() if len(held) else None}
    if len(held):
        ceiling["first_stage_recall@K_ci"] = intervals.share_interval(int(held.sum()), len(held))
    return {"first_stage_k": stage.ids.shape[1], **ceiling,
            **{f"first_stage_{k}": v for k, v in m.items()}}


def reranking(scores, stage, tolerance=0.0):
    """rerank_metrics of scores (Q, K), and their MRR minus TF-IDF's order's, paired: _ci and _p."""
    if not len(stage.targets):
        return {**rerank_metrics(scores, stage), "mrr_minus_first_stage": None}
    ranks = candidate_ranks(scores, stage.ids, stage.targets, tolerance)             # (Q,)
    own = candidate_ranks(stage.scores, stage.ids, stage.targets, stage.tolerance)  # (Q,)
    diff, ci, p = intervals.paired_difference((1.0 / ranks).numpy(), (1.0 / own).numpy())
    return {**retrieval_metrics(ranks), "mrr_minus_first_stage": diff,
            "mrr_minus_first_stage_ci": ci, "mrr_minus_first_stage_p": p}

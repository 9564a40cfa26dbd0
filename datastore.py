"""
The retrieval step and how it is scored.

Retrieval is exact maximum inner product search: for a query q (Gen at a marker) the datastore
entry returned is

    argmax_j  q . e_j        over every sequence j of the corpus, e_j = Emb_seq(sequence j)

Queries and embeddings are unit vectors, so this is also the nearest neighbour by cosine. Past
about 1M sequences an approximate index (faiss, optional: FaissIndex) can stand in for the search
of generation; evaluation's ranks are always exact.
Evaluation asks where each marker's true target lands in that ranking: recall@k (target in the top
k) and MRR (mean of 1 / rank), against the whole datastore, not just a batch. Beside chance, a
training-free lexical retriever (TF-IDF, end of this file) is scored on exactly the same markers,
contexts and datastore: the learned sequence space earns its keep only where it beats words alone.
"""

import hashlib
import math
import os
import re
import sys
from collections import Counter

import numpy as np
import torch

from machinery.cli import UserError

INDEXES = ("exact", "faiss")   # Datastore.use_index


def _scores(queries, keys):
    """The scores q . e_j of queries (Q, d) against keys (n, d): (Q, n). On a CPU numpy computes
    the product, on the same memory (.numpy() copies nothing): this torch build's product over 1M
    x 128 float32 keys took about twice numpy's time here, and the product is the whole cost of
    exact search. On a GPU, torch."""
    if keys.device.type == "cpu":
        return torch.from_numpy(queries.detach().numpy() @ keys.detach().numpy().T)  # (Q, n)
    return queries.to(keys.device) @ keys.T                                        # (Q, n)


def _chunk_scores(queries, embeddings, chunk):
    """Each chunk's start s and the scores queries @ embeddings[s:s + chunk].T, (Q, chunk)."""
    for s in range(0, len(embeddings), chunk):
        yield s, _scores(queries, embeddings[s:s + chunk])                  # (Q, chunk)


def search(queries, embeddings, k=10, chunk=65536):
    """Exact top-k by inner product of queries (Q, d) over embeddings (N, d),

        top-k_j  q . e_j        over every entry j,

    in chunks of embeddings so that memory stays bounded (a chunk costs no speed: the product
    streams the keys either way). Returns scores (Q, k) and ids (Q, k), best first, on the
    embeddings' device."""
    best_scores = torch.full((len(queries), 0), -math.inf, device=embeddings.device)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.long, device=embeddings.device)
    for s, scores in _chunk_scores(queries, embeddings, chunk):
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_ids = torch.cat([best_ids, top.indices + s], dim=1)
        keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
        best_scores, best_ids = best_scores.gather(1, keep), best_ids.gather(1, keep)
    return best_scores, best_ids


def target_ranks(queries, embeddings, targets, chunk=None):
    """Rank (1 = best) of each query's target among all embeddings: 1 + the number of OTHER
    entries scoring at least as high as the target (a tie counts against it, so N identical
    embeddings rank every target N-th, not first). queries (Q, d), embeddings (N, d), targets
    (Q,) ids; returns (Q,). A query or embedding that is not finite is an error: it would make
    the ranking, and every number from it, meaningless. chunk: entries scored at a time, by
    default as many as keep one (Q, chunk) table of scores within 16 MB.

    A tie is a score within float32's rounding of the target's, not a bitwise-equal one. A dot
    product of width d computed in float32 is off by at most about d * u * |q| |e| (u = 2^-24, the
    unit roundoff), and which way it rounds depends on the BLAS kernel, the instruction set and
    the thread count: two identical entries can score 1 ulp apart on one machine and equal on
    another. Two computed scores whose exact values are equal therefore differ by at most
    2 d u |q| max|e| = d * eps * |q| max|e| (eps = 2u), and every entry within that of the target
    counts as a tie: the same ranks on every machine."""
    if not (torch.isfinite(queries).all() and torch.isfinite(embeddings).all()):
        raise ValueError("a query or datastore embedding is not finite (NaN or inf): retrieval "
                         "cannot be scored")
    chunk = chunk or max(1, 2**22 // max(1, len(queries)))
    norms = (queries.double().norm(dim=1, keepdim=True)
             * embeddings.double().norm(dim=1).max(dim=0, keepdim=True).values)     # (Q, 1)
    dtype = torch.promote_types(queries.dtype, embeddings.dtype)
    tolerance = tie_tolerance(queries.shape[1], dtype, norms).to(dtype)              # (Q, 1)
    return _ranks(lambda: _chunk_scores(queries, embeddings, chunk), targets, tolerance)


def tie_tolerance(width, dtype, scale=1.0):
    """How far apart float arithmetic can put two dot products of width `width` that are equal
    in exact arithmetic (target_ranks): width * eps * scale, scale bounding |q| |e| (1 for unit
    vectors)."""
    return width * torch.finfo(dtype).eps * scale


def _ranks(score_chunks, targets, tolerance):
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


def retrieval_metrics(ranks):
    """recall@1, recall@10 (the share of targets ranked in the top 1 / 10) and MRR (mean 1/rank)."""
    ranks = ranks.double()
    return {"recall@1": (ranks <= 1).double().mean().item(),
            "recall@10": (ranks <= 10).double().mean().item(),
            "mrr": (1.0 / ranks).mean().item()}


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
def retrieval_quality(gen, embeddings, data, split, device, ctx, limit=None):
    """recall@1, recall@10 and MRR of a split's markers (the first `limit`) against the whole
    datastore `embeddings`: every sequence of the corpus, embedded. Each marker's context is cut
    to what this Gen can read: its own block_size."""
    contexts, targets = data.marker_contexts(split, limit, gen.config.block_size)
    if not len(targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    with ctx:
        queries = marker_queries(gen, contexts, device)
    return retrieval_metrics(target_ranks(queries, embeddings, torch.from_numpy(targets)))


def _faiss():
    try:
        import faiss
    except ImportError:  # an optional install
        raise UserError("--index faiss needs faiss: pip install faiss-cpu") from None
    return faiss


def require_index(kind):
    """Refuse, in one line, an --index that is unknown, or faiss where it is not installed (a
    script checks this before it loads or builds anything)."""
    if kind not in INDEXES:
        raise UserError(f"--index must be one of {', '.join(INDEXES)}, got {kind!r}")
    if kind == "faiss":
        _faiss()


class FaissIndex:
    """Approximate top-k by inner product through faiss (an optional install: pip install
    faiss-cpu), for datastores past about 1M sequences, where exact search reads every key for
    every query. IVF-Flat: k-means (on the unit sphere) splits the N keys into nlist = sqrt(N)
    lists; a query scores exactly (Flat: keys kept whole) the keys of the nprobe lists whose
    centroids score highest for it, about nprobe / nlist of the datastore:

        top-k_j  q . e_j        over j in the nprobe lists nearest q

    Its scores are the same q . e_j as exact search; what it can miss is a best key in a list it
    did not probe. A datastore of up to about 1,300 entries has nlist <= nprobe: every list is
    probed, and the search is exact."""

    def __init__(self, embeddings, nprobe=32):
        faiss = _faiss()
        keys = embeddings.detach().float().cpu().numpy()                  # (N, d)
        n, d = keys.shape
        nlist = max(1, min(int(math.sqrt(n)), n // 39))  # k-means wants 39 keys per list or more
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.spherical = True   # unit centroids: a list is probed for its direction only
        self.index.cp.min_points_per_centroid = 1  # under 39 keys: one list, without a warning
        self.index.train(keys)
        self.index.add(keys)
        self.index.nprobe = min(nprobe, nlist)

    def search(self, queries, k):
        """Scores (Q, k) and ids (Q, k), best first, as search() (k at most N); where the probed
        lists hold fewer than k keys, faiss pads a row with id -1 and score -3.4e38."""
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(ids)


class Datastore:
    """The nonparametric sequence space: every sequence of a corpus embedded by Emb_seq, in one
    contiguous (N, d) tensor, with the token ids of each entry (what retrieval inserts):
    entry i is seq_tokens[offsets[i]:offsets[i + 1]], as in data.Data."""

    def __init__(self, embeddings, offsets, seq_tokens, fingerprint):
        self.embeddings, self.offsets, self.seq_tokens = embeddings, offsets, seq_tokens
        self.fingerprint = fingerprint
        self.index = None   # None: exact search; else an approximate index (use_index)

    def __len__(self):
        return len(self.embeddings)

    def sequence(self, i):
        return self.seq_tokens[self.offsets[i]:self.offsets[i + 1]]

    def use_index(self, kind):
        """How search() finds the best entries: "exact" (search()) or "faiss" (FaissIndex, built
        here, over the whole datastore)."""
        require_index(kind)
        self.index = FaissIndex(self.embeddings) if kind == "faiss" else None
        return self

    def search(self, queries, k=1):
        """The top-k entries for queries (Q, d): scores (Q, k) and ids (Q, k), best first."""
        if self.index is not None:
            return self.index.search(queries, k)
        return search(queries, self.embeddings, k)

    @staticmethod
    def fingerprint_of(embedder, data):
        """A hash of Emb_seq's weights and the data: a datastore built from either, changed, is
        stale."""
        h = hashlib.sha256(data.fingerprint.encode())
        for name, t in sorted(embedder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def build(cls, embedder, data, progress=True):
        embeddings = embedder.embed(data, progress=progress)
        return cls(embeddings, data.offsets, data.seq_tokens, cls.fingerprint_of(embedder, data))

    def save(self, path):
        tmp = path + ".tmp"
        torch.save({"embeddings": self.embeddings, "offsets": torch.from_numpy(self.offsets),
                    "seq_tokens": torch.from_numpy(self.seq_tokens.astype(np.int64)),
                    "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, embedder, data):
        """The datastore saved at path if it was built by this Emb_seq from this data; None if
        there is none, or it is stale or unreadable (said on stderr). A stale one is never used."""
        if not os.path.exists(path):
            return None
        fingerprint = cls.fingerprint_of(embedder, data)
        try:
            saved = torch.load(path, weights_only=True)
            if saved["fingerprint"] == fingerprint and "embeddings" in saved:
                return cls(saved["embeddings"], saved["offsets"].numpy(),
                           saved["seq_tokens"].numpy(), fingerprint)
        except Exception:  # cut short, or not a datastore: as good as stale
            pass
        print(f"{path} is stale or unreadable (another Emb_seq or other data): not used",
              file=sys.stderr)
        return None

    @classmethod
    def load_or_build(cls, path, embedder, data):
        """The datastore saved at path if it is fresh (load); else build it (and say so) and
        save it there."""
        store = cls.load(path, embedder, data)
        if store is None:
            print(f"building the datastore: {data.n_sequences:,} sequences", file=sys.stderr)
            store = cls.build(embedder, data)
            store.save(path)
        return store


# -----------------------------------------------------------------------------------------------
# The lexical baseline: TF-IDF, no training
#
# Words are lowercase \w+ runs. Over the N datastore sequences, with n(w, d) the count of word w
# in text d and df(w) the number of sequences holding w (sublinear tf, smoothed idf):
#
#     v_d[w] = tf(w, d) * idf(w),   tf = 1 + log n(w, d)  (0 where n = 0),
#                                   idf(w) = 1 + log((1 + N) / (1 + df(w)))
#     s(q, j) = v_q . v_j / (|v_q| |v_j|)          (0 where either vector is all zero)
#
# The query is the text Gen sees at the marker (data.marker_contexts); a tie counts against
# the target.

WORD = re.compile(r"\w+")


def tfidf_vectors(texts, vocab, idf):
    """Unit TF-IDF rows (len(texts), len(vocab)), a sparse tensor; words outside vocab (the
    datastore's words) are dropped, since they match nothing."""
    rows, cols, vals = [], [], []
    for row, text in enumerate(texts):
        for w, n in Counter(WORD.findall(text.lower())).items():
            if w in vocab:
                rows.append(row), cols.append(vocab[w])
                vals.append((1 + math.log(n)) * idf[vocab[w]])
    rows, cols = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    vals = torch.tensor(vals, dtype=torch.float64)
    norms = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, rows, vals ** 2).sqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals / norms[rows],
                                   (len(texts), len(vocab)), check_invariants=True)


def lexical_ranks(queries, texts, targets, chunk=256):
    """Rank (1 = best) of each query's target among the texts by TF-IDF cosine, ties counted
    against the target. queries: strings, texts: the datastore's strings, targets (Q,) ids."""
    df = Counter(w for t in texts for w in set(WORD.findall(t.lower())))
    vocab = {w: i for i, w in enumerate(df)}
    idf = [1 + math.log((1 + len(texts)) / (1 + df[w])) for w in vocab]
    e, targets = tfidf_vectors(texts, vocab, idf), torch.as_tensor(targets)
    ranks = []
    # queries a chunk at a time: a dense (Q, vocabulary) or (Q, N) table of a whole split would
    # take gigabytes on a novel
    for s in range(0, len(queries), chunk):
        q = tfidf_vectors(queries[s:s + chunk], vocab, idf).to_dense()  # (chunk, vocabulary)
        scores = torch.sparse.mm(e, q.T).T                                 # (chunk, N) cosines
        ranks.append(_ranks(lambda: [(0, scores)], targets[s:s + chunk],
                            tie_tolerance(len(vocab), scores.dtype)))  # unit rows
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def lexical_metrics(data, tok, split, limit=None):
    """retrieval_metrics of TF-IDF for a split's markers (the first limit), named lexical_*."""
    contexts, targets = data.marker_contexts(split, limit)
    if not len(targets):
        return {"lexical_recall@1": None, "lexical_recall@10": None, "lexical_mrr": None}
    special = {tok.marker, tok.eod}
    queries = [tok.decode([t for t in c if t not in special]) for c in contexts]
    texts = [tok.decode(data.sequence(i)) for i in range(data.n_sequences)]
    ranks = lexical_ranks(queries, texts, targets)
    return {f"lexical_{k}": v for k, v in retrieval_metrics(ranks).items()}


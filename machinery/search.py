"""How generation searches a run's datastore (--index): exactly, with faiss (approximate, an
optional install), or in two stages (the learned score re-ranks TF-IDF's top K)."""

import math

import torch

from machinery.cli import UserError
from machinery.corpora import is_facts
from machinery.lexical import lexical_index

INDEXES = ("auto", "exact", "faiss", "first_stage")


def load_faiss():
    try:
        import faiss
    except ImportError:  # an optional install
        raise UserError("--index faiss needs faiss: pip install faiss-cpu") from None
    return faiss


class FaissIndex:
    """Approximate top-k by inner product for millions of keys (IVF-Flat): sqrt(N) k-means lists;
    a query scores the keys of its nprobe nearest lists."""

    def __init__(self, embeddings, nprobe=32):
        faiss = load_faiss()
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
        """Scores (Q, k) and ids (Q, k), best first; id -1 where the probed lists hold fewer."""
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(ids)


def require_index(kind):
    """Refuse, in one line, an unknown --index, or faiss where it is not installed."""
    if kind not in INDEXES:
        raise UserError(f"--index must be one of {', '.join(INDEXES)}, got {kind!r}")
    if kind == "faiss":
        load_faiss()


def use_index(datastore, kind):
    """Exact search ("exact") or a FaissIndex over the whole datastore ("faiss") from now on."""
    datastore.index = FaissIndex(datastore.embeddings) if kind == "faiss" else None
    return datastore


def use_search(datastore, kind, cfg, data, tok, lexical=None):
    """Set how generation searches; auto: first_stage on text (TF-IDF beats the learned score
    alone there), exact on facts. lexical: if already built."""
    if kind == "auto":
        kind = "exact" if is_facts(cfg.dataset) else "first_stage"
    if kind == "first_stage":
        return datastore.use_first_stage(lexical or lexical_index(data, tok), cfg.first_stage,
                                         tok)
    return use_index(datastore, kind)

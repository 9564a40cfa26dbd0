"""
An approximate index for the datastore's search (machinery/search.py's use_index): faiss, an
optional install, for datastores past about 1M sequences, where exact search reads every key for
every query. Speed only: the exact search of datastore.py is the reference it is tested against.
"""

import math

import torch

from machinery.cli import UserError

def load_faiss():
    """The faiss module, or a one-line error that says how to install it."""
    try:
        import faiss
    except ImportError:  # an optional install
        raise UserError("--index faiss needs faiss: pip install faiss-cpu") from None
    return faiss


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
        """Scores (Q, k) and ids (Q, k), best first, as search() (k at most N); where the probed
        lists hold fewer than k keys, faiss pads a row with id -1 and score -3.4e38."""
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(ids)

"""TF-IDF as datastore.py states it, over a whole corpus: the entries' unit vectors in a CSR
table, scored a chunk of queries at a time; the baseline's ranks and the first stage's top K."""

import math
import re
import warnings
from collections import Counter

import torch
from tqdm import tqdm

from datastore import marker_texts, ranks_in, retrieval_metrics, tie_tolerance

WORD = re.compile(r"\w+")


def tfidf_vectors(texts, vocab, idf):
    """Unit vectors v_d / |v_d| of texts, sparse (len(texts), len(vocab)); other words dropped."""
    rows, cols, vals = [], [], []
    for row, text in enumerate(texts):
        for w, n in Counter(WORD.findall(text.lower())).items():
            if w in vocab:
                rows.append(row)
                cols.append(vocab[w])
                vals.append((1 + math.log(n)) * idf[vocab[w]])                 # tf * idf
    rows, cols = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    vals = torch.tensor(vals, dtype=torch.float64)
    norms = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, rows, vals ** 2).sqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals / norms[rows],
                                   (len(texts), len(vocab)), check_invariants=True)


class Lexical:
    """TF-IDF over the datastore's texts: s(q, j) for query strings against every entry j."""

    def __init__(self, texts):
        df = Counter(w for t in texts for w in set(WORD.findall(t.lower())))
        self.vocab = {w: i for i, w in enumerate(df)}
        self.idf = [1 + math.log((1 + len(texts)) / (1 + df[w])) for w in self.vocab]  # idf(w)
        with warnings.catch_warnings():  # CSR: a faster product than COO's; torch warns it is beta
            warnings.simplefilter("ignore")
            self.rows = tfidf_vectors(texts, self.vocab, self.idf).to_sparse_csr()  # (N, vocab)
        self.tolerance = tie_tolerance(len(self.vocab), torch.float64)       # unit rows

    def score_chunks(self, queries, chunk=None):
        """(s, cosines (c, N) of queries s .. s+c-1 against every entry), by default as many
        queries at a time as keep the table within 16 MB (a novel's whole table: gigabytes)."""
        chunk = chunk or max(1, 2**21 // max(1, self.rows.shape[0]))        # float64: 8 bytes
        slow = len(queries) * self.rows.shape[0] > 5e8  # ten seconds or more on 2 cores
        for s in tqdm(range(0, len(queries), chunk), "TF-IDF", disable=not slow, leave=False):
            q = tfidf_vectors(queries[s:s + chunk], self.vocab, self.idf).to_dense()  # (c, vocab)
            yield s, torch.sparse.mm(self.rows, q.T).T                              # (c, N)

    def ranks(self, queries, targets, chunk=None):
        """Rank (1 = best) of each query's target (Q,) among all entries, ties against it."""
        targets = torch.as_tensor(targets)
        ranks = [ranks_in(scores, targets[s:s + len(scores)], self.tolerance)
                 for s, scores in self.score_chunks(queries, chunk)]
        return torch.cat(ranks or [torch.zeros(0, dtype=torch.long)])

    def top(self, queries, k, chunk=None):
        """The first stage: each query's k best entries, scores and ids (Q, k), best first; id -1
        where the score is 0 (a tie with every other entry)."""
        k = min(k, self.rows.shape[0])
        scores = torch.zeros(len(queries), k, dtype=torch.float64)                 # (Q, k)
        ids = torch.zeros(len(queries), k, dtype=torch.long)                       # (Q, k)
        for s, chunk_scores in self.score_chunks(queries, chunk):
            rows = slice(s, s + len(chunk_scores))
            # in place: small tensors kept between the chunks' large tables fragment the heap
            torch.topk(chunk_scores, k, dim=1, out=(scores[rows], ids[rows]))
            ids[rows].masked_fill_(scores[rows] <= 0, -1)
        return scores, ids


def lexical_index(data, tok, n=None):
    """The Lexical of a corpus's datastore, or of its first n sequences."""
    n = data.n_sequences if n is None else n
    return Lexical([tok.decode(data.sequence(i)) for i in range(n)])


def lexical_metrics(data, tok, split, limit=None, lexical=None):
    """retrieval_metrics of TF-IDF for a split's markers (the first limit), named lexical_*."""
    queries, targets = marker_texts(data, tok, split, limit)
    if not len(targets):
        return {"lexical_recall@1": None, "lexical_recall@10": None, "lexical_mrr": None}
    ranks = (lexical or lexical_index(data, tok)).ranks(queries, targets)
    return {f"lexical_{k}": v for k, v in retrieval_metrics(ranks).items()}

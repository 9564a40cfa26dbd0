"""The lexical baseline (TF-IDF: datastore.py, machinery/lexical.py): ranks by hand, ties against
the target."""
import math

import numpy as np
import pytest
import torch

from machinery.lexical import Lexical, lexical_metrics


def test_ranks_by_hand_with_ties_counted_against_the_target():
    texts = ["red apple", "green apple", "red car", "blue sky", "blue sky"]
    queries = ["a red apple", "apple", "blue", "nothing matches"]
    # 0: "red apple" is an exact match (cosine 1) -> rank 1
    # 1: "apple" scores texts 0 and 1 alike (same idf, same length): the tie counts -> rank 2
    # 2: texts 3 and 4 are identical: target 4 ties with 3 -> rank 2
    # 3: every text scores 0: all 4 others tie -> rank 5
    assert Lexical(texts).ranks(queries, np.array([0, 1, 4, 2])).tolist() == [1, 2, 2, 5]


def test_rarer_words_weigh_more():
    texts = ["the cat", "the dog", "the bird", "a dog barks"]
    # "the" is in 3 texts, "dog" in 2: "the dog" beats "the cat" and "the bird"; "a dog barks"
    # lacks "the" and has more words
    assert Lexical(texts).ranks(["the dog"], np.array([1])).tolist() == [1]
    assert Lexical(texts).ranks(["the dog"], np.array([3])).tolist() == [2]


def test_the_scores_are_tfidf_cosines():
    # query "dog dog cat" against text "dog": tf 1 + log 2 for dog, 1 for cat; idf from 2 texts
    texts, query = ["dog", "cat bird"], "dog dog cat"
    idf = {w: 1 + math.log(3 / 2) for w in ("dog", "cat", "bird")}
    q = np.array([(1 + math.log(2)) * idf["dog"], idf["cat"]])
    cos_dog = q[0] / np.linalg.norm(q)
    cos_cat = q[1] * idf["cat"] / (np.linalg.norm(q) * math.hypot(idf["cat"], idf["bird"]))
    assert cos_dog > cos_cat  # so "dog" ranks first, and "cat bird" second
    assert Lexical(texts).ranks([query], np.array([0])).tolist() == [1]
    assert Lexical(texts).ranks([query], np.array([1])).tolist() == [2]


def test_the_cosines_are_tfidf_not_raw_counts():
    """The cosine values by hand: "dog" ranks first by TF-IDF, while raw counts (0.316 against
    0.671), raw counts times idf (0.401, 0.554) or sublinear tf alone (0.430, 0.638) would put
    "cat bird" first."""
    texts, query = ["dog", "cat bird", "cat fish"], "cat cat cat dog"
    # N = 3; df: cat 2, the rest 1; idf = 1 + log((1 + N) / (1 + df))
    idf_cat, idf_1 = 1 + math.log(4 / 3), 1 + math.log(2)
    q = {"cat": (1 + math.log(3)) * idf_cat, "dog": idf_1}            # tf = 1 + log 3 for cat
    norm_q = math.hypot(q["cat"], q["dog"])
    want = [q["dog"] / norm_q,                                           # "dog": v = [idf_1], unit
            q["cat"] * idf_cat / (norm_q * math.hypot(idf_cat, idf_1)),  # "cat bird"
            q["cat"] * idf_cat / (norm_q * math.hypot(idf_cat, idf_1))]  # "cat fish"
    assert want[:2] == pytest.approx([0.53094, 0.51298], abs=1e-5)
    (_, scores), = Lexical(texts).score_chunks([query])                  # (1, 3)
    assert scores[0].tolist() == pytest.approx(want, rel=1e-12)
    assert Lexical(texts).ranks([query] * 2, np.array([0, 1])).tolist() == [1, 3]  # 1 and 2 tie


def test_metrics_are_those_of_ranks_worked_out_by_hand():
    """lexical_metrics reads each marker's context (special tokens left out) as its query: on the
    texts and queries of test_ranks_by_hand_with_ties_counted_against_the_target, ranks 1, 2, 2,
    5: MRR (1 + 1/2 + 1/2 + 1/5) / 4 = 0.55, recall@1 1/4, recall@10 1; the first two alone:
    MRR 0.75, recall@1 0.5."""
    from types import SimpleNamespace
    from machinery.tokenizer import Tokenizer
    tok = Tokenizer("bytes")
    texts = ["red apple", "green apple", "red car", "blue sky", "blue sky"]
    queries, targets = ["a red apple", "apple", "blue", "nothing matches"], np.array([0, 1, 4, 2])
    contexts = [np.array([tok.eod, *tok.encode(f"Q: {q} "), tok.marker]) for q in queries]
    data = SimpleNamespace(
        n_sequences=len(texts), sequence=lambda i: np.array(tok.encode(texts[i])),
        marker_contexts=lambda split, limit=None: (contexts[:limit], targets[:limit]))
    def figures(m):  # beside their intervals (machinery/intervals.py)
        return {k: v for k, v in m.items() if not k.endswith("_ci")}
    assert figures(lexical_metrics(data, tok, "val")) == pytest.approx(
        {"lexical_recall@1": 0.25, "lexical_recall@10": 1.0, "lexical_mrr": 0.55})
    assert figures(lexical_metrics(data, tok, "val", limit=2)) == pytest.approx(
        {"lexical_recall@1": 0.5, "lexical_recall@10": 1.0, "lexical_mrr": 0.75})


def test_metrics_on_prepared_data_match_the_ranks(tiny_data):
    data, tok = tiny_data
    m = lexical_metrics(data, tok, "val", limit=40)
    contexts, targets = data.marker_contexts("val", 40)
    special = {tok.marker, tok.eod}
    queries = [tok.decode([t for t in c if t not in special]) for c in contexts]
    texts = [tok.decode(data.sequence(i)) for i in range(data.n_sequences)]
    ranks = Lexical(texts).ranks(queries, targets).double()
    # queries are scored a chunk at a time: the ranks must not depend on the chunk
    assert torch.equal(Lexical(texts).ranks(queries, targets, chunk=7).double(), ranks)
    assert m["lexical_mrr"] == (1 / ranks).mean().item()
    assert m["lexical_recall@1"] == (ranks == 1).double().mean().item()
    # facts: the question names the person, so words find many a fact, far above chance
    assert m["lexical_recall@10"] > 0.3


def test_a_chunk_of_scores_stays_within_16_mb_and_changes_no_score():
    """The (c, N) cosines of a chunk of queries: at most 16 MB however many entries (a novel's
    first stage held gigabytes), and each query's cosines the same as scored alone."""
    texts = [f"word{i} word{i % 97} shared" for i in range(9000)]
    lexical = Lexical(texts)
    queries = [f"word{i} word{i % 7}" for i in range(0, 9000, 30)]                 # 300
    chunks = list(lexical.score_chunks(queries))
    assert len(chunks) > 1 and all(s.numel() * 8 <= 2**24 for _, s in chunks)
    scores = torch.cat([s for _, s in chunks])                                     # (300, 9000)
    assert torch.equal(scores, torch.cat([s for _, s in lexical.score_chunks(queries, 1)]))

"""The lexical baseline (machinery/lexical.py): TF-IDF ranks by hand, ties against the target."""
import math

import numpy as np
import torch

from machinery.lexical import lexical_metrics, lexical_ranks


def test_ranks_by_hand_with_ties_counted_against_the_target():
    texts = ["red apple", "green apple", "red car", "blue sky", "blue sky"]
    queries = ["a red apple", "apple", "blue", "nothing matches"]
    # 0: "red apple" is an exact match (cosine 1) -> rank 1
    # 1: "apple" scores texts 0 and 1 alike (same idf, same length): the tie counts -> rank 2
    # 2: texts 3 and 4 are identical: target 4 ties with 3 -> rank 2
    # 3: every text scores 0: all 4 others tie -> rank 5
    assert lexical_ranks(queries, texts, np.array([0, 1, 4, 2])).tolist() == [1, 2, 2, 5]


def test_rarer_words_weigh_more():
    texts = ["the cat", "the dog", "the bird", "a dog barks"]
    # "the" is in 3 texts, "dog" in 2: "the dog" beats "the cat" and "the bird"; "a dog barks"
    # lacks "the" and has more words
    assert lexical_ranks(["the dog"], texts, np.array([1])).tolist() == [1]
    assert lexical_ranks(["the dog"], texts, np.array([3])).tolist() == [2]


def test_the_scores_are_tfidf_cosines():
    # query "dog dog cat" against text "dog": tf 1 + log 2 for dog, 1 for cat; idf from 2 texts
    texts, query = ["dog", "cat bird"], "dog dog cat"
    idf = {w: 1 + math.log(3 / 2) for w in ("dog", "cat", "bird")}
    q = np.array([(1 + math.log(2)) * idf["dog"], idf["cat"]])
    cos_dog = q[0] / np.linalg.norm(q)
    cos_cat = q[1] * idf["cat"] / (np.linalg.norm(q) * math.hypot(idf["cat"], idf["bird"]))
    assert cos_dog > cos_cat  # so "dog" ranks first, and "cat bird" second
    assert lexical_ranks([query], texts, np.array([0])).tolist() == [1]
    assert lexical_ranks([query], texts, np.array([1])).tolist() == [2]


def test_metrics_on_prepared_data_match_the_ranks(tiny_data):
    data, tok = tiny_data
    m = lexical_metrics(data, tok, "val", limit=40)
    contexts, targets = data.marker_contexts("val", 40)
    special = {tok.marker, tok.eod}
    queries = [tok.decode([t for t in c if t not in special]) for c in contexts]
    texts = [tok.decode(data.sequence(i)) for i in range(data.n_sequences)]
    ranks = lexical_ranks(queries, texts, targets).double()
    # queries are scored a chunk at a time: the ranks must not depend on the chunk
    assert torch.equal(lexical_ranks(queries, texts, targets, chunk=7).double(), ranks)
    assert m["lexical_mrr"] == (1 / ranks).mean().item()
    assert m["lexical_recall@1"] == (ranks == 1).double().mean().item()
    # facts: the question names the person, so words find many a fact, far above chance
    assert m["lexical_recall@10"] > 0.3

"""How retrieval is scored: ranks, recall@k, MRR, chance, and the queries and contexts they use."""
import math

import pytest
import torch

from datastore import chance_metrics, retrieval_metrics, target_ranks


def test_identical_embeddings_rank_every_target_last():
    n = 2400
    emb = torch.nn.functional.normalize(torch.ones(n, 8), dim=-1)           # (N, d) all the same
    queries = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)     # (Q, d)
    targets = torch.randint(0, n, (50,))
    for chunk in (65536, 7):
        assert torch.equal(target_ranks(queries, emb, targets, chunk), torch.full((50,), n))
    assert retrieval_metrics(target_ranks(queries, emb, targets))["recall@1"] == 0


def test_ranks_of_a_hand_built_case_with_ties():
    emb = torch.tensor([[1.0, 0], [0.5, 0], [1.0, 0], [0, 1.0], [-1.0, 0]])  # (5, 2)
    queries = torch.tensor([[1.0, 0]] * 5 + [[0, 1.0]])                       # (6, 2)
    targets = torch.tensor([0, 1, 2, 3, 4, 3])
    # scores of query [1, 0]: 1, 0.5, 1, 0, -1; entries 0 and 2 tie, so each ranks 2nd
    want = torch.tensor([2, 3, 2, 4, 5, 1])
    for chunk in (65536, 1, 2, 3):
        assert torch.equal(target_ranks(queries, emb, targets, chunk), want)


@pytest.mark.parametrize("where", ["query", "embedding", "inf"])
def test_non_finite_query_or_embedding_is_an_error(where):
    queries, emb = torch.eye(3), torch.eye(3)
    if where == "query":
        queries[1, 0] = math.nan
    elif where == "embedding":
        emb[2, 2] = math.nan
    else:
        emb[0, 1] = math.inf
    with pytest.raises(ValueError, match="not finite"):
        target_ranks(queries, emb, torch.tensor([0, 1, 2]))

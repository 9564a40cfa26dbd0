"""Search (exact, and faiss's approximate index) and how retrieval is scored: ranks, recall@k, MRR,
chance, and the queries and contexts they use."""
import contextlib
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import Data
from datastore import (Datastore, chance_metrics, marker_queries, retrieval_metrics,
                       retrieval_quality, search, target_ranks)
from machinery import batch_generate
from machinery.search import require_index, use_index
import evaluate
from machinery.prompts import answer as _answer, questions
from generate import Retrieval
from machinery.cli import UserError
from machinery.tokenizer import Tokenizer
from model import Gen, GenConfig

TOK = Tokenizer("bytes")
M, E = TOK.marker, TOK.eod
# a hand-built val split: five documents
#   0: text, marker, sequence 3, text        -> a question
#   8: marker first, sequence 5, text        -> a question with no text before its marker
#  14: two markers (sequences 1 and 2)       -> not a question
#  20: no marker                             -> not a question
#  23: text, marker, sequence 0              -> a question
IDS = [65, 66, M, 1, 2, 10, 67, E,  M, 3, 4, 10, 68, E,  69, M, 5, M, 6, E,  70, 71, E,
       72, M, 7, E]
SPLIT = SimpleNamespace(ids=np.array(IDS), doc_starts=np.array([0, 8, 14, 20, 23]),
                        marker_pos=np.array([2, 8, 15, 17, 24]),
                        marker_target=np.array([3, 5, 1, 2, 0]))
DATA = SimpleNamespace(val=SPLIT)


def _gen(vocab_size=TOK.vocab_size, block_size=96):
    torch.manual_seed(0)
    return Gen(GenConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2,
                         n_embd=16, seq_dim=8)).eval()


def test_identical_embeddings_rank_every_target_last():
    # Whether a BLAS kernel rounds identical rows' products to the same float depends on where a
    # row sits, the instruction set and the threads (OPENBLAS_CORETYPE=Haswell puts some 1 ulp
    # apart): ties are a tolerance, so every machine ranks every target last.
    g = torch.Generator().manual_seed(0)
    n = 2400
    emb = torch.nn.functional.normalize(torch.ones(n, 8), dim=-1)            # (N, d) all the same
    queries = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)  # (Q, d)
    targets = torch.randint(0, n, (50,), generator=g)
    for chunk in (65536, 7):
        assert torch.equal(target_ranks(queries, emb, targets, chunk), torch.full((50,), n))
    assert retrieval_metrics(target_ranks(queries, emb, targets))["recall@1"] == 0


def test_a_tie_is_within_rounding_and_no_wider():
    # one query, a target scoring 0.5; entries 1 ulp-scale below it tie, 1e-4 below it does not
    d = 128
    q = torch.zeros(1, d)
    q[0, 0] = 1.0
    scores = torch.tensor([0.5, 0.5 - 3e-7, 0.5 - 1e-4, 0.5 + 1e-4])
    emb = torch.zeros(4, d)
    emb[:, 0], emb[:, 1] = scores, (1 - scores ** 2).sqrt()               # unit rows
    assert d * torch.finfo(torch.float32).eps > 3e-7                      # inside the tolerance
    assert target_ranks(q, emb, torch.tensor([0])).item() == 3            # itself, the tie, above
    assert target_ranks(q, emb, torch.tensor([2])).item() == 4


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


def test_retrieval_metrics_of_known_ranks():
    m = retrieval_metrics(torch.tensor([1, 2, 10, 11, 2400]))
    assert m["recall@1"] == pytest.approx(1 / 5) and m["recall@10"] == pytest.approx(3 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 2400) / 5)


def test_chance_is_the_metrics_of_a_uniformly_random_rank():
    assert chance_metrics(4) == pytest.approx({"recall@1": 0.25, "recall@10": 1.0,
                                               "mrr": (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4})
    assert chance_metrics(2400) == pytest.approx({"recall@1": 0.0004167, "recall@10": 0.0041667,
                                                  "mrr": 0.0035}, abs=5e-5)   # as in README
    for n in (1, 9, 37):  # every rank 1..n equally likely
        m = retrieval_metrics(torch.arange(1, n + 1))
        assert chance_metrics(n) == pytest.approx({k: m[k] for k in chance_metrics(n)})
    assert chance_metrics(0) == {"recall@1": None, "recall@10": None, "mrr": None}


def test_marker_contexts_are_the_document_up_to_each_marker_cut_to_the_block():
    contexts, targets = Data.marker_contexts(DATA, "val", block_size=3)
    assert [c.tolist() for c in contexts] == [[65, 66, M], [M], [69, M], [M, 5, M], [72, M]]
    assert targets.tolist() == [3, 5, 1, 2, 0]
    contexts, targets = Data.marker_contexts(DATA, "val", 4, block_size=96)
    assert [c.tolist() for c in contexts] == [[65, 66, M], [M], [69, M], [69, M, 5, M]]
    assert targets.tolist() == [3, 5, 1, 2]


def test_marker_queries_equal_a_single_unpadded_forward_each():
    gen = _gen()
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 256, n) for n in (1, 5, 3, 9, 2)]
    batched = marker_queries(gen, contexts, "cpu", batch_size=2)                  # (5, d)
    with torch.no_grad():
        single = torch.stack([gen.query(gen.hidden(torch.from_numpy(c)[None])[0, -1])
                              for c in contexts])                                  # (5, d)
    assert torch.allclose(batched, single, atol=1e-6)


def test_questions_are_the_documents_with_one_marker():
    qs = questions(DATA, TOK, "val", 10)
    assert [(p.tolist(), t, g.tolist()) for p, t, g in qs] == [
        ([65, 66], 3, [M, 1, 2, 10, 67]),
        ([E], 5, [M, 3, 4, 10, 68]),       # nothing before the marker: the end-of-document token
        ([72], 0, [M, 7])]
    assert len(questions(DATA, TOK, "val", 2)) == 2


def test_the_answer_is_the_last_non_empty_line_without_special_tokens():
    doc = TOK.encode("Q: Where does Vok live?\n") + [M] + TOK.encode("Vok lives in Mom.\nA:")
    assert _answer(TOK, doc + [M] + TOK.encode(" Mom.  \n\n  \n") + [E]) == "A: Mom."
    assert _answer(TOK, TOK.encode("one line")) == "one line"
    assert _answer(TOK, TOK.encode(" \n\n") + [E]) == ""


def test_retrieval_quality_of_embeddings_with_known_ranks(tiny_data):
    data, tok = tiny_data
    gen, limit = _gen(tok.vocab_size), 30
    contexts, targets = data.marker_contexts("val", limit)
    assert len(set(targets.tolist())) == limit          # each target once, so each can score 1
    queries = marker_queries(gen, contexts, "cpu")                                 # (30, d)
    perfect = torch.zeros(data.n_sequences, 8)          # each target's embedding is its query:
    perfect[torch.from_numpy(targets)] = queries        # it scores 1, every other entry less
    got = retrieval_quality(gen, perfect, data, "val", "cpu", contextlib.nullcontext(), limit)
    figures = ("recall@1", "recall@10", "mrr")          # each beside its interval (below)
    assert {k: got[k] for k in figures} == pytest.approx({"recall@1": 1.0, "recall@10": 1.0,
                                                          "mrr": 1.0})
    # 30 of 30: the exact binomial interval's lower end is where 30 hits have chance 2.5%
    assert got["recall@1_ci"] == pytest.approx([0.025 ** (1 / limit), 1.0])
    assert got["mrr_ci"] == [1.0, 1.0]
    same = torch.zeros(data.n_sequences, 8)             # every entry ties: every target is last
    got = retrieval_quality(gen, same, data, "val", "cpu", contextlib.nullcontext(), limit)
    assert {k: got[k] for k in figures} == pytest.approx({"recall@1": 0.0, "recall@10": 0.0,
                                                          "mrr": 1 / data.n_sequences})


def test_answer_metrics_count_what_generation_did(tiny_data, monkeypatch):
    """A stand-in for generate_batch() whose outcome per question is set: 0 and 3 retrieve the gold
    sequence and answer right (0 to the end of its document), 1 retrieves another entry and
    answers wrong, 2 writes no marker; without retrieval every answer is wrong, given the gold
    sequence every answer is right. Given the gold sequence, question 0 is not decoded again:
    retrieval already wrote that context to its end."""
    data, tok = tiny_data
    qs = questions(data, tok, "val", 4)
    wrong = tok.encode("\nA: nobody knows.\n")
    asked = []

    def answer(given, marker, retrieve):
        i = next(i for i, (p, _, _) in enumerate(qs) if given[:len(p)] == list(p))
        prompt, target, gold = qs[i]
        gold, seq = [int(t) for t in gold], [int(t) for t in data.sequence(target)]
        if len(given) > len(prompt):                        # given the gold sequence
            asked.append(i)
            return given + gold[1 + len(seq):], []
        if not retrieve or i == 2:
            return given + wrong, []
        if i == 1:
            return given + [marker] + seq + wrong, [Retrieval(len(given) + 1, target + 1, 0.5)]
        end = [tok.eod] if i == 0 else []
        return given + gold + end, [Retrieval(len(given) + 1, target, 0.9)]

    def fake_generate_batch(gen, prompts, budgets, marker, stop, store, query_gen, retrieve):
        return [answer(given, marker, r) for given, r in zip(prompts, retrieve)]

    monkeypatch.setattr(batch_generate, "generate_batch", fake_generate_batch)
    gen = SimpleNamespace(config=SimpleNamespace(block_size=1000))
    got = evaluate.answer_metrics(gen, "a datastore", data, tok, "val", 4,
                                  batch_size=3)  # several batches
    assert got == {"answer_em_retrieval": 0.5, "marker_rate": 0.75, "retrieval_acc": 0.5,
                   "answer_em_no_retrieval": 0.0, "answer_em_gold": 1.0}
    assert sorted(asked) == [1, 2, 3]


def _unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator()
                                                     .manual_seed(seed)), dim=-1)   # (n, d)


def test_exact_search_equals_a_full_sort_with_every_chunk_size():
    keys, queries = _unit(3000, 16, 0), _unit(5, 16, 1)                     # (N, d), (Q, d)
    full = (queries.double() @ keys.double().T).sort(dim=1, descending=True)
    for chunk in (65536, 1000, 7):
        scores, ids = search(queries, keys, k=10, chunk=chunk)
        assert torch.equal(ids, full.indices[:, :10])
        assert torch.allclose(scores.double(), full.values[:, :10], atol=1e-6)
    assert search(queries, keys[:4], k=10)[1].shape == (5, 4)     # k past N: every entry


def test_faiss_index_finds_each_key_as_its_own_best_entry():
    pytest.importorskip("faiss")
    keys = _unit(20_000, 16, 0)                                            # (N, d)
    queries = torch.nn.functional.normalize(keys[:200] + 0.01 * _unit(200, 16, 1), dim=-1)
    store = use_index(Datastore(keys, None, "test"), "faiss")
    assert store.index.index.nlist == 141 and store.index.index.nprobe == 32  # it is approximate
    scores, ids = store.search(queries, k=1)
    assert torch.equal(ids[:, 0], torch.arange(200))
    assert torch.allclose(scores[:, 0], (queries * keys[:200]).sum(1), atol=1e-5)


def test_faiss_index_recall_at_10_on_random_data():
    pytest.importorskip("faiss")
    keys, queries = _unit(20_000, 16, 0), _unit(100, 16, 1)
    store = Datastore(keys, None, "test")
    _, exact = store.search(queries, k=10)
    scores, approx = use_index(store, "faiss").search(queries, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.95
    # the scores it returns are the exact inner products of the entries it returns, best first
    assert torch.allclose(scores, (queries[:, None] * keys[approx]).sum(-1), atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert use_index(store, "exact").search(queries, k=10)[1].equal(exact)


def test_faiss_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    with pytest.raises(UserError) as e:
        use_index(Datastore(_unit(50, 8, 0), None, "test"), "faiss")
    assert str(e.value) == "--index faiss needs faiss: pip install faiss-cpu"
    with pytest.raises(UserError, match="--index must be one of auto, exact, faiss, "
                                        "first_stage, got 'hnsw'"):
        require_index("hnsw")

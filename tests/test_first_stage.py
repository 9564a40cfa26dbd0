"""Two-stage retrieval (datastore.py): TF-IDF's top K, re-ranked by the learned score; and the
lexical hard negatives that train for it (data.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write
import data
from data import load_data
from datastore import (Datastore, FirstStage, candidate_ranks, candidate_scores, first_stage,
                       first_stage_metrics, marker_texts, rerank_metrics)
from machinery.lexical import Lexical, lexical_index
from machinery.config import Config


def test_candidate_ranks_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.7], [0.3, 0.2, 0.1]])
    ids = torch.tensor([[4, 7, 2], [1, 3, 5], [0, 1, 2]])
    # 0: target 2 scores 0.5, below 0.9: rank 2
    # 1: target 3 ties with 1 (0.2): the tie counts against it, and 5 is above: rank 3
    # 2: target 9 is not a candidate: a miss
    ranks = candidate_ranks(scores, ids, torch.tensor([2, 3, 9]))
    assert ranks.tolist() == [2, 3, math.inf]
    m = rerank_metrics(scores, FirstStage(ids, scores, torch.tensor([2, 3, 9])))
    figures = {k: m[k] for k in ("recall@1", "recall@10", "mrr")}  # beside their intervals
    assert figures == {"recall@1": 0.0, "recall@10": 2 / 3, "mrr": (1 / 2 + 1 / 3 + 0) / 3}


def test_reranking_is_a_full_sort_restricted_to_the_candidates():
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(200, 16, generator=g), dim=1)     # (N, d)
    queries = F.normalize(torch.randn(30, 16, generator=g), dim=1)         # (Q, d)
    ids = torch.stack([torch.randperm(200, generator=g)[:20] for _ in range(30)])  # (Q, K)
    targets = torch.where(torch.arange(30) % 3 == 0, torch.tensor(-1), ids[:, 7])  # a third miss
    learned = candidate_scores(queries, embeddings, ids)
    full = queries @ embeddings.T                                          # (Q, N)
    assert torch.allclose(learned, full.gather(1, ids), atol=1e-6)
    ranks = candidate_ranks(learned, ids, targets)
    for i in range(30):
        if targets[i] < 0:
            assert ranks[i] == math.inf
            continue
        # the rank in a full sort of all N entries, counting only those among the K
        order = full[i].argsort(descending=True).tolist()
        kept = [j for j in order if j in set(ids[i].tolist())]
        assert ranks[i] == kept.index(int(targets[i])) + 1


def test_a_target_outside_the_first_stage_is_a_miss():
    texts = ["red apple pie", "green apple", "red car wash", "blue sky", "apple tree", "pie crust"]
    lexical = Lexical(texts)
    queries = ["red apple", "apple", "blue sky", "wash"]
    scores, ids = lexical.top(queries, 2)
    whole = lexical.ranks(queries, torch.tensor([0, 0, 0, 2]))
    stage = FirstStage(ids, scores, torch.tensor([0, 0, 0, 2]))
    within = candidate_ranks(stage.scores, stage.ids, stage.targets, lexical.tolerance)
    # TF-IDF's own order of its top 2: the whole-datastore rank where that is 1 or 2, else a miss
    assert whole.tolist() == [1, 3, 6, 1]
    assert within.tolist() == [1, math.inf, math.inf, 1]
    m = first_stage_metrics(stage, lexical)
    assert m["first_stage_recall@K"] == 0.5 and m["first_stage_mrr"] == 0.5
    # the top k are the k best of the scores, best first
    full = torch.cat([s for _, s in lexical.score_chunks(queries)])
    assert torch.equal(scores, full.sort(dim=1, descending=True).values[:, :2])


def _text(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(150)]   # few ties
    sentences = [" ".join(rng.choice(words, 6)).capitalize() + "." for _ in range(300)]
    return write(str(tmp_path / "t.txt"), " ".join(sentences))


@pytest.mark.parametrize("transductive", [False, True])
def test_lexical_negatives_leave_out_the_target_its_neighbours_and_val(tmp_path, transductive):
    cfg = Config(dataset=_text(tmp_path), block_size=64, cache_dir=str(tmp_path / "cache"),
                 transductive=transductive)
    data, tok = load_data(cfg)   # a text corpus: lexical negatives by default
    n_train = data.meta["n_train_sequences"]
    for split in ("train", "val"):
        strict = split == "train" and not transductive   # TF-IDF over train's sequences alone
        lexical = lexical_index(data, tok, n_train if strict else None)
        negatives = data.negatives[split]
        queries, targets = marker_texts(data, tok, split)
        _, top = lexical.top(queries, 29)   # the depth use_lexical_negatives reads
        seen, filled = set(), 0
        for m, t in enumerate(targets):
            row = [j for j in negatives[t].tolist() if j >= 0]
            assert t not in row and len(set(row)) == len(row)
            if split == "train" and not transductive:
                assert all(j < n_train for j in row)   # strictly held out: never a val sequence
            if t in seen:
                continue
            seen.add(t)
            near = set(targets[max(0, m - 2):m + 3].tolist())
            assert not near & set(row)
            # the first stage's best candidates for the marker's context, in its order
            allowed = [j for j in top[m].tolist() if j not in near and j >= 0]
            assert row == allowed[:len(row)]
            filled += len(row) == 8
        assert filled > 0.9 * len(seen)
    assert transductive == any(j >= n_train for j in data.negatives["train"].ravel())


def test_rerank_searches_the_first_stage_candidates(tiny_data):
    data, tok = tiny_data
    g = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(data.n_sequences, 8, generator=g), dim=1)
    store = Datastore(embeddings, data.sequence, "x")
    lexical = lexical_index(data, tok)
    store.use_first_stage(lexical, 30, tok)
    contexts, _ = data.marker_contexts("val", 20)
    queries = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    scores, ids, stage_ranks = store.rerank(queries, contexts, k=3)
    stage = first_stage(lexical, data, tok, "val", 30, limit=20)  # the same first stage
    candidates = stage.ids
    assert torch.equal(stage.targets, torch.from_numpy(data.marker_contexts("val", 20)[1]))
    for i in range(20):
        learned = queries[i] @ embeddings[candidates[i]].T                  # (K,)
        best = learned.topk(3)
        assert ids[i].tolist() == candidates[i][best.indices].tolist()
        assert torch.allclose(scores[i], best.values)
        assert stage_ranks[i].tolist() == (best.indices + 1).tolist()


def test_tf_idf_on_questions_ranks_by_shared_words_and_counts_ties_against_the_target():
    from evaluate import question_lexical
    from machinery.tokenizer import Tokenizer
    tok = Tokenizer("bytes", None)
    lexical = Lexical(["alpha beta", "gamma delta", "alpha gamma"])
    qs = [(np.array(tok.encode(text)), target, None)
          for text, target in (("alpha beta?", 0), ("delta", 1), ("beta", 2))]
    # "beta" shares no word with entry 2 (score 0) and ties with entry 1 (0): rank 3
    m = question_lexical(lexical, qs, tok)
    assert m["lexical_recall@1"] == pytest.approx(2 / 3)
    assert m["lexical_mrr"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert m["lexical_recall@10"] == 1


def test_a_strict_run_never_reads_a_transductive_runs_negatives(tmp_path):
    """One data_cache for both settings: whichever ran first, the strict setting's training
    negatives hold no val sequence, and are those it picks in a cache of its own."""
    text, cache = _text(tmp_path), str(tmp_path / "cache")
    loose, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache, transductive=True))
    n_train = loose.meta["n_train_sequences"]
    assert (loose.negatives["train"] >= n_train).any()
    strict, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache))
    assert not (strict.negatives["train"] >= n_train).any()
    alone, _ = load_data(Config(dataset=text, block_size=64, cache_dir=str(tmp_path / "own")))
    for split in ("train", "val"):
        assert np.array_equal(strict.negatives[split], alone.negatives[split]), split


def test_the_negatives_of_a_strict_run_do_not_depend_on_the_val_text(tmp_path):
    """Strictly held out, the TF-IDF that picks the training negatives weighs words by the
    training sequences alone: two texts with the same training part and other val sentences
    (of the same length, so the split falls at the same place) give the same negatives."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(150)]
    sentences = [" ".join(rng.choice(words, 6)).capitalize() + "." for _ in range(300)]
    common = words[:3]   # val sentences of three training words: those words' idf falls
    other = [" ".join(rng.choice(common, 6)).capitalize() + "." for _ in range(30)]
    a = write(str(tmp_path / "a.txt"), " ".join(sentences))
    b = write(str(tmp_path / "b.txt"), " ".join(sentences[:270] + other))
    (da, _), (db, _) = (load_data(Config(dataset=t, block_size=64, cache_dir=str(tmp_path / "c")))
                        for t in (a, b))
    assert np.array_equal(da.train.ids, db.train.ids) and da.fingerprint != db.fingerprint
    assert np.array_equal(da.negatives["train"], db.negatives["train"])


def test_the_first_stage_holds_only_candidates_that_share_a_word():
    """A candidate that TF-IDF scores 0 shares no word with the query: it ties with every other
    such one, so it would sit among the K only by the order of ties. The K hold the candidates
    that score above 0 (id -1 after them); a target outside them is a miss for the ceiling, for
    the re-ranked numbers and for generation, even where the learned score would pick it."""
    from generate import retrieval_step
    from machinery.tokenizer import Tokenizer
    tok = Tokenizer("bytes")
    texts = ["red apple", "green pear", "red car", "blue sky"]
    lexical = Lexical(texts)
    scores, ids = lexical.top(["red", "nothing"], 4)   # K = N: every entry, were ties kept
    assert sorted(ids[0, :2].tolist()) == [0, 2] and ids[0, 2:].tolist() == [-1, -1]
    assert ids[1].tolist() == [-1] * 4 and scores[1].tolist() == [0.0] * 4
    # the learned score prefers 1 ("green pear"), then 2, then 0: 1 is no candidate of "red"
    embeddings = torch.eye(4)[[2, 0, 1, 3]]                                  # (N, d)
    queries = torch.tensor([[0.3, 0.2, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0]])      # (Q, d)
    stage = FirstStage(ids, scores, torch.tensor([1, 1]))
    assert first_stage_metrics(stage, lexical)["first_stage_recall@K"] == 0
    learned = candidate_scores(queries, embeddings, ids)                      # (Q, K)
    assert torch.isinf(learned[0, 2:]).all() and torch.isinf(learned[1]).all()
    assert rerank_metrics(learned, stage)["recall@10"] == 0
    store = Datastore(embeddings, _packed(texts, tok), "x").use_first_stage(lexical, 4, tok)
    contexts = [np.array(tok.encode(q)) for q in ("red", "nothing")]
    (first, inserted), (none, nothing) = retrieval_step(store, queries, [0, 0], [99, 99],
                                                        contexts, alternatives=3)
    assert first.id == 2 and [i for i, _ in first.alternatives] == [0]
    assert tok.decode(inserted) == "red car"
    assert none.id == -1 and nothing == [] and none.alternatives == []   # nothing to insert


def _packed(texts, tok):
    """sequence(i), the token ids of texts[i], as a Datastore reads them."""
    tokens = [np.array(tok.encode(t)) for t in texts]
    return tokens.__getitem__


def test_candidate_scores_gather_at_most_8_mb_at_a_time_and_change_no_score(monkeypatch):
    """The gathered embeddings (chunk, K, d) of re-ranking stay within 8 MB however many markers
    (a novel's val holds thousands), and each query's scores are the same as scored alone."""
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(300, 128), dim=-1)
    embeddings = F.normalize(torch.randn(5000, 128), dim=-1)
    ids = torch.randint(0, 5000, (300, 100))
    alone = candidate_scores(queries, embeddings, ids, chunk=1)
    gathered, einsum = [], torch.einsum
    monkeypatch.setattr(torch, "einsum",
                        lambda eq, q, e: gathered.append(e.shape) or einsum(eq, q, e))
    assert torch.equal(candidate_scores(queries, embeddings, ids), alone)
    assert len(gathered) > 1 and all(math.prod(s) * 4 <= 2**23 for s in gathered)


def test_auto_takes_neighbours_past_the_size_where_tfidf_over_every_marker_is_too_slow(
        tmp_path, monkeypatch, capsys):
    """--negatives auto on a text: TF-IDF's negatives up to data.LEXICAL_LIMIT sequences, the
    corpus's (neighbouring sentences) above it, with a note; --negatives lexical still forces."""
    text, cache = _text(tmp_path), str(tmp_path / "cache")
    corpus, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache, negatives="corpus"))
    lexical, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache))
    assert not np.array_equal(lexical.negatives["train"], corpus.negatives["train"])
    monkeypatch.setattr(data, "LEXICAL_LIMIT", corpus.n_sequences - 1)
    auto, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache))
    note = f"{corpus.n_sequences:,} sequences: hard negatives are neighbours"
    assert note in capsys.readouterr().err
    for split in ("train", "val"):
        assert np.array_equal(auto.negatives[split], corpus.negatives[split]), split
    forced, _ = load_data(Config(dataset=text, block_size=64, cache_dir=cache, negatives="lexical"))
    assert np.array_equal(forced.negatives["train"], lexical.negatives["train"])

"""The 95% intervals of the retrieval figures (machinery/intervals.py) against cases computed by
hand, and the paired comparison of two orders of the same candidates (datastore.reranking)."""
import numpy as np
import pytest
import torch

from datastore import FirstStage, reranking
from machinery import intervals


def test_exact_binomial_interval_of_counts_worked_out_by_hand():
    # no hit in 20: the upper end is the p at which 0 of 20 has chance 2.5%, (1 - p)^20 = 0.025
    assert intervals.share_interval(0, 20) == pytest.approx([0.0, 1 - 0.025 ** (1 / 20)])
    assert intervals.share_interval(20, 20) == pytest.approx([0.025 ** (1 / 20), 1.0])
    # 3 of 10: the tabulated Clopper-Pearson interval (R's binom.test(3, 10))
    assert intervals.share_interval(3, 10) == pytest.approx([0.0667395, 0.6524529], abs=1e-7)
    lo, hi = intervals.share_interval(7, 10)  # hits and misses swap: the interval mirrors
    assert [1 - hi, 1 - lo] == pytest.approx([0.0667395, 0.6524529], abs=1e-7)
    # 500 of 1000: about 0.5 +- 1.96 sqrt(0.25 / 1000) = 0.031, a little wider (exact)
    lo, hi = intervals.share_interval(500, 1000)
    assert 0.031 < hi - 0.5 < 0.033 and 0.5 - lo == pytest.approx(hi - 0.5)


def test_the_bootstrap_interval_covers_the_mean_narrows_with_markers_and_repeats():
    rng = np.random.default_rng(1)
    ranks = rng.geometric(0.1, 3200)                         # ranks of a middling retriever
    widths = []
    for n in (50, 800, 3200):
        rr = 1.0 / ranks[:n]
        lo, hi = intervals.mean_interval(rr)
        assert lo < rr.mean() < hi
        assert [lo, hi] == intervals.mean_interval(rr)       # a fixed seed: the same output
        widths.append(hi - lo)
    # the width falls as 1 / sqrt(n): 16 and 4 times the markers, about 4 and 2 times narrower
    assert widths[0] / widths[1] == pytest.approx(4, rel=0.25)
    assert widths[1] / widths[2] == pytest.approx(2, rel=0.25)
    assert intervals.mean_interval(np.full(40, 0.5)) == [0.5, 0.5]   # no spread, no width


def test_paired_difference_is_nothing_for_the_same_ranks_and_clear_for_a_clear_case():
    rr = 1.0 / np.arange(1, 41)
    assert intervals.paired_difference(rr, rr) == (0.0, [0.0, 0.0], 1.0)
    # 30 of 40 markers ranked 1 instead of 2, the rest the same: +0.375 on average
    better = np.where(np.arange(40) < 30, 1.0, 0.5)
    diff, (lo, hi), p = intervals.paired_difference(better, np.full(40, 0.5))
    assert diff == pytest.approx(0.375) and 0.25 < lo < diff < hi <= 0.5
    assert p == pytest.approx(2 / (1 + intervals.RESAMPLES))  # no resample at or below 0
    # one marker each way: a difference of 0 that the interval must straddle
    diff, (lo, hi), p = intervals.paired_difference([1.0, 0.5] * 20, [0.5, 1.0] * 20)
    assert diff == 0 and lo < 0 < hi and p > 0.5


def test_reranking_compares_the_learned_order_with_tfidfs_on_the_same_markers():
    # two candidates a marker, the target first: TF-IDF ranks it 2 at markers 0 and 1 (and a tie
    # within its tolerance counts against it at 2), 1 at 3; the learned score 1 at 0, 1, 2, 2 at 3
    ids = torch.tensor([[5, 0], [5, 1], [5, 2], [3, 5]])
    targets = torch.tensor([0, 1, 2, 3])
    tfidf = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5 - 1e-12], [0.7, 0.3]],
                         dtype=torch.float64)
    learned = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.6], [0.2, 0.4]])
    m = reranking(learned, FirstStage(ids, tfidf, targets, tolerance=1e-9))
    assert m["mrr"] == pytest.approx((1 + 1 + 1 + 1 / 2) / 4)
    # TF-IDF's own order: 1/2, 1/2, 1/2 (the tie), 1: MRR 0.625; the difference 0.25
    assert m["mrr_minus_first_stage"] == pytest.approx(0.875 - 0.625)
    assert m["mrr_minus_first_stage_ci"][0] <= 0.25 <= m["mrr_minus_first_stage_ci"][1]
    assert m["recall@1_ci"] == pytest.approx(intervals.share_interval(3, 4))
    same = reranking(tfidf, FirstStage(ids, tfidf, targets, tolerance=1e-9), tolerance=1e-9)
    assert same["mrr_minus_first_stage_ci"] == [0.0, 0.0] and same["mrr_minus_first_stage_p"] == 1


def test_the_summary_shows_each_figure_with_its_interval():
    m = {"recall@1": 0.07, "recall@1_ci": [0.045, 0.098], "mrr": 0.5, "mrr_ci": [0.25, 0.75],
         "lexical_mrr": 0.4, "lexical_mrr_ci": [0.3, 0.5], "first_stage_k": 100,
         "first_stage_recall@K": 0.43, "first_stage_recall@K_ci": [0.35, 0.51],
         "reranked_mrr": 0.07, "reranked_mrr_ci": [0.05, 0.09], "first_stage_mrr": 0.063,
         "reranked_mrr_minus_first_stage": 0.007,
         "reranked_mrr_minus_first_stage_ci": [-0.01, 0.025],
         "reranked_mrr_minus_first_stage_p": 0.41}
    text = "\n".join(intervals.retrieval_lines(m, {"recall@1": 0.0004, "mrr": 0.0035}))
    assert "recall@1   0.0700 [0.0450, 0.0980]" in text
    assert "0.5000 [0.2500, 0.7500]  0.4000 [0.3000, 0.5000]  0.0035" in text
    assert "43.0% [35.0%, 51.0%] of markers" in text
    assert "learned minus TF-IDF's order (paired): +0.0070 [-0.0100, +0.0250], p = 0.41" in text
    assert "recall@10  n/a" in text

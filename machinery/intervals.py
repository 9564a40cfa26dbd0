"""
95% intervals of the retrieval figures over the markers scored: recall@k's exact binomial
(Clopper-Pearson), MRR's percentile bootstrap, and the paired bootstrap of the difference of two
orders of the same markers, with a two-sided p. Under about 30 markers a bootstrap is too narrow.
"""

import math

import numpy as np

LEVEL = 0.95         # every interval's coverage
RESAMPLES = 2000     # bootstrap resamples of the markers
SEED = 0             # the bootstrap's generator


def binomial_p(k, n, cdf):
    """The p at which P(X <= k) equals cdf, X ~ Binomial(n, p), 0 <= k < n, by bisection; the
    terms in logs (they can be far below the smallest float), summed by log-sum-exp."""
    i = np.arange(k + 1)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                           for j in range(k + 1)])                                  # (k + 1,)
    lo, hi = 0.0, 1.0
    for _ in range(50):  # 2^-50: below any digit shown
        p = (lo + hi) / 2
        logs = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)             # (k + 1,)
        below = math.exp(logs.max()) * float(np.exp(logs - logs.max()).sum())      # P(X <= k)
        lo, hi = (p, hi) if below > cdf else (lo, p)
    return (lo + hi) / 2


def share_interval(hits, n, level=LEVEL):
    """Clopper-Pearson interval [lo, hi] of a share hits / n: the p at which hits or more, and
    the p at which hits or fewer, are as rare as (1 - level) / 2."""
    tail = (1 - level) / 2
    lo = 0.0 if hits == 0 else binomial_p(hits - 1, n, 1 - tail)
    hi = 1.0 if hits == n else binomial_p(hits, n, tail)
    return [lo, hi]


def bootstrap_means(values):
    """The mean of values (n,) in each of RESAMPLES resamples of the markers: (RESAMPLES,)."""
    values = np.asarray(values, dtype=np.float64)
    n, rng = len(values), np.random.default_rng(SEED)
    block = max(1, 2**22 // n)
    return np.concatenate([values[rng.integers(0, n, (min(block, RESAMPLES - s), n))].mean(axis=1)
                           for s in range(0, RESAMPLES, block)])                 # (RESAMPLES,)


def mean_interval(values, level=LEVEL):
    """Percentile bootstrap interval [lo, hi] of the mean of values (n,), as an MRR's."""
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(bootstrap_means(values), [tail, 100 - tail])]


def paired_difference(a, b, level=LEVEL):
    """(mean(a) - mean(b), its bootstrap interval [lo, hi], p) for figures a and b (n,) of the
    same markers; p is twice the smaller share of resampled differences on one side of 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)        # (n,)
    means = bootstrap_means(d)                                                   # (RESAMPLES,)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    other_side = min((means <= 0).sum(), (means >= 0).sum())
    p = min(1.0, 2 * (1 + int(other_side)) / (1 + RESAMPLES))
    return float(d.mean()), [float(lo), float(hi)], p


def shown(m, key, digits=4):
    """m[key] with its interval m[key + '_ci'], as 0.0700 [0.0450, 0.0980]; n/a where missing."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def retrieval_lines(m, chance, split="val", train=None):
    """One split's retrieval figures with their intervals, as lines of text: learned beside
    TF-IDF and chance (and train's); re-ranking the first stage's top K, beside TF-IDF's order."""
    width = 24  # 0.0700 [0.0450, 0.0980]
    lines = [f"  {split} retrieval against the whole datastore, 95% intervals over its markers:",
             f"    {'':<10} {'learned':<{width}} {'TF-IDF':<{width}} chance"]
    for k in ("recall@1", "recall@10", "mrr"):
        lines.append(f"    {k:<10} {shown(m, k):<{width}} {shown(m, 'lexical_' + k):<{width}} "
                     f"{shown(chance, k):<8}"
                     + ("" if train is None else f"   (train markers: {shown(train, k)})"))
    if m.get("first_stage_recall@K") is None:
        return lines
    ceiling, (lo, hi) = m["first_stage_recall@K"], m["first_stage_recall@K_ci"]
    orders = [("reranked", "learned"), ("first_stage", "TF-IDF's order")]
    if m.get("combined_mrr") is not None:
        orders.insert(1, ("combined", f"learned + {m['combined_weight']:g} TF-IDF"))
    lines += [f"  {split} retrieval re-ranking TF-IDF's top {m['first_stage_k']} (which hold the "
              f"target for {ceiling:.1%} [{lo:.1%}, {hi:.1%}] of markers: the ceiling):",
              "    " + " ".join([f"{'':<10}"] + [f"{name:<{width}}" for _, name in orders])]
    for k in ("recall@1", "recall@10", "mrr"):
        lines.append("    " + " ".join([f"{k:<10}"] + [f"{shown(m, f'{o}_{k}'):<{width}}"
                                                        for o, _ in orders]))
    for order, name in orders[:-1]:  # each against TF-IDF's own order, marker by marker
        key = f"{order}_mrr_minus_first_stage"
        if m.get(key) is not None:
            lines.append(f"    MRR, {name} minus TF-IDF's order (paired): {m[key]:+.4f} "
                         f"[{m[key + '_ci'][0]:+.4f}, {m[key + '_ci'][1]:+.4f}], "
                         f"p = {m[key + '_p']:.3g}")
    return [line.rstrip() for line in lines]

"""
The protocol's report from runs.jsonl alone: table.md (the primary comparison, the tables, the
paired tests) and the plots. `python -m experiments.report`
"""

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from experiments.band import last_quarter_gain
from machinery.checkpoint import read_jsonl
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.corpora import is_facts

RESULTS = os.path.join("experiments", "results")                     # from the repository's root

# (record field, column title, higher is better)
FACTS = [("val_ntp", "val NTP loss", False), ("recall@1", "held-out recall@1", True),
         ("mrr", "held-out MRR", True), ("answer_em_retrieval", "answer EM, retrieval", True),
         ("answer_em_no_retrieval", "answer EM, Gen alone", True),
         ("reworded_answer_em_retrieval", "reworded: answer EM", True),
         ("reworded_recall@1", "reworded: recall@1", True), ("reworded_mrr", "reworded: MRR", True)]
TEXT = [("val_ntp", "val NTP loss", False), ("recall@1", "val recall@1", True),
        ("recall@10", "val recall@10", True), ("mrr", "val MRR", True)]
# Fixed before the grid ran: co-supervision at lambda_seq 0.5 minus separate supervision.
TESTED, BASELINE = "co0.5", "sep"
PRIMARY = {"facts": ["answer_em_retrieval", "recall@1"], "text": ["mrr"]}
GENERALISATION = ["reworded_answer_em_retrieval", "reworded_recall@1"]  # facts, secondary
CURVES = ["pretrained", "ntp-ft", "nsp-ft", "co0.1", "co0.5", "scratch"]
# Fixed before any of its runs: co0.1, chosen after looking at the first protocol, on new seeds;
# each metric a two-sided paired t-test at alpha 0.05 / 2, confirmed only if better on both.
CONFIRMATORY = {"dataset": "facts", "tested": "co0.1", "baseline": "sep",
                "seeds": [2001, 2002, 2003, 2004, 2005], "steps": "800+1600",
                "metrics": ["answer_em_retrieval", "recall@1"], "alpha": 0.025,
                "name": "Confirmatory test", "about": "new seeds 2001 to 2005"}
# Fixed before any of its runs: the primary comparison on facts_test, a world no choice of recipe,
# weight or budget has seen, tested as the confirmatory test is; the headline either way.
TEST_WORLD = {**CONFIRMATORY, "dataset": "facts_test", "tested": "co0.5",
              "seeds": [1337, 1338, 1339, 1340, 1341], "name": "Test world",
              "about": "a world no choice has seen, seeds 1337 to 1341"}
FLAT = 0.02   # the most a flattened curve gains in its last quarter (recall, or val NTP's fall)
ALPHA = 0.05  # the level at which a result sentence calls a difference shown (two-sided)


def key(dataset, variant, seed, steps, setting=None):
    """A run's identity; setting is grid.setting's hash of everything else it ran under."""
    return f"{dataset}/{variant}/s{seed}/{steps}/{setting}"


def load(path):
    """The records of runs.jsonl by key; a later line for the same run wins, and a line a crash
    cut short is skipped (that run is done again)."""
    records = read_jsonl(path)[0] if os.path.exists(path) else []
    return {key(r["dataset"], r["variant"], r["seed"], r["steps"], r.get("setting")): r
            for r in records}


def kind(dataset):
    return "facts" if is_facts(dataset) else "text"


def columns(dataset):
    return FACTS if is_facts(dataset) else TEXT


def datasets(records):
    return sorted({r["dataset"] for r in records}, key=lambda d: (d != "facts", d != "pydoc", d))


def variants(runs):
    """pretrained, ntp-ft, nsp-ft, sep, the co-supervised runs by lambda_seq, scratch."""
    fixed = {"pretrained": 0, "ntp-ft": 1, "nsp-ft": 2, "sep": 3, "scratch": 1e9}
    return sorted({r["variant"] for r in runs},
                  key=lambda v: fixed[v] if v in fixed else 4 + float(v[2:]))


def values(runs, variant, field):
    """A metric's values over seeds, in seed order (None where the run has no such metric)."""
    return [r.get(field) for r in sorted((r for r in runs if r["variant"] == variant),
                                         key=lambda r: r["seed"])]


def t_test(diffs):
    """Paired t-test of per-seed differences: (mean, t, two-sided p). p integrates Student's t
    density (n - 1 degrees of freedom) beyond |t|, with x = |t| + tan(phi)."""
    d = np.asarray(diffs, dtype=float)
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return mean, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0
    t, nu = mean / (sd / math.sqrt(n)), n - 1
    phi = np.linspace(0, math.pi / 2, 200_001)[:-1]
    x = abs(t) + np.tan(phi)
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    density = c * (1 + x ** 2 / nu) ** (-(nu + 1) / 2) / np.cos(phi) ** 2
    return mean, t, float(min(1.0, 2 * np.trapezoid(density, phi)))


def mean_sd(vals):
    """Mean and sample standard deviation (ddof 1: seeds are a sample) of the values not None."""
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def fmt(vals):
    vals = [v for v in vals if v is not None]
    if len(vals) < 2:
        return f"{vals[0]:.3f}" if vals else "-"
    return "{:.3f} +- {:.3f}".format(*mean_sd(vals))


def pvalue(p):
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def lexical_values(runs, field):
    """TF-IDF's values of a retrieval field over seeds (every run of a seed has the same); []
    where TF-IDF has none."""
    name = re.sub(r"^(reworded_)?(recall@\d+|mrr)$", r"\1lexical_\2", field)
    found = [values(runs, v, name) for v in variants(runs)] if name != field else []
    return next((vals for vals in found if any(v is not None for v in vals)), [])


def paired(runs, a, b, field):
    """`a`'s and `b`'s values of one metric on the seeds where both have it, in seed order."""
    pairs = {}
    for r in runs:
        if r["variant"] in (a, b) and r.get(field) is not None:
            if r["variant"] in pairs.setdefault(r["seed"], {}):
                raise UserError(f"{r['variant']} has 2 runs of seed {r['seed']}: runs of two "
                                "budgets or settings mixed")
            pairs[r["seed"]][r["variant"]] = r[field]
    seeds = sorted(s for s, p in pairs.items() if len(p) == 2)
    return [pairs[s][a] for s in seeds], [pairs[s][b] for s in seeds]


def compare(runs, a, b, field, title, higher, short=False):
    """`a` minus `b` on one metric, paired by seed: means, per-seed differences, the paired
    t-test, the sign count; short: one clause."""
    mine, theirs = paired(runs, a, b, field)
    if not mine:
        return None
    diffs = np.subtract(mine, theirs)
    wins = int(np.sum(diffs > 0 if higher else diffs < 0))
    test = "one seed: no test" if len(diffs) < 2 else "t = {1:.2f}, p = {2:.3f}".format(
        *t_test(diffs))
    head = f"{title} {fmt(mine)} against {fmt(theirs)}, difference {np.mean(diffs):+.3f}"
    if short:
        return f"{head} ({test}; {a} better in {wins} of {len(diffs)} seeds)"
    return (f"- {title}: {a} {fmt(mine)}, {b} {fmt(theirs)}; per seed "
            f"{', '.join(f'{d:+.3f}' for d in diffs)}; mean {np.mean(diffs):+.3f}, {test}; "
            f"{a} better in {wins} of {len(diffs)} seeds")


def finding(runs, a, b, field, title, higher):
    """Which of a and b the paired test shows better at p < ALPHA, or no difference; None
    without two seeds of both."""
    mine, theirs = paired(runs, a, b, field)
    if len(mine) < 2:
        return None
    mean, _, p = t_test(np.subtract(mine, theirs))
    shown = f"({a} - {b} = {mean:+.3f}, {pvalue(p)})"
    if p >= ALPHA:
        return f"no difference shown on {title} {shown}"
    better, worse = (a, b) if (mean > 0) == higher else (b, a)
    return f"{better} better than {worse} on {title} {shown}"


def summary(records):
    """Per dataset, the primary result and what its test shows, TF-IDF beside it; on facts the
    same for reworded questions (secondary)."""
    lines = []
    for dataset in datasets(records):
        runs = [r for r in records if r["dataset"] == dataset]
        titles = {f: t for f, t, _ in columns(dataset)}
        parts = [compare(runs, TESTED, BASELINE, f, titles[f], True, short=True)
                 for f in PRIMARY[kind(dataset)]]
        if not all(parts):
            continue
        lines.append(f"- **{dataset}**: co-supervision ({TESTED}) minus separate supervision "
                     f"({BASELINE}): " + "; ".join(parts) + ".")
        tests = [("Result", PRIMARY[kind(dataset)]), ("Generalisation (secondary; held-out "
                 "questions in a wording no training document uses)", GENERALISATION)]
        for name, fields in tests[:1 + is_facts(dataset)]:
            short = {f: titles[f].replace("reworded: ", "") for f in fields}
            found = [finding(runs, TESTED, BASELINE, f, short[f], True) for f in fields]
            if all(found):
                tf_idf = fmt(lexical_values(runs, fields[-1]))
                extra = f"; TF-IDF's {short[fields[-1]]}: {tf_idf}" if tf_idf != "-" else ""
                lines.append(f"  {name}, each metric at p < {ALPHA} (uncorrected): "
                             + "; ".join(found) + extra + ".")
    return lines


def confirmatory(records, c=CONFIRMATORY):
    """A test fixed before its runs (CONFIRMATORY, TEST_WORLD): verdict, comparisons, flatness;
    [] until all its runs are in."""
    runs = [r for r in records if r["dataset"] == c["dataset"] and r["seed"] in c["seeds"]
            and r["steps"] == c["steps"]]
    titles = {f: t for f, t, _ in FACTS}
    lines, confirmed = [], True
    for field in c["metrics"]:
        pairs = paired(runs, c["tested"], c["baseline"], field)
        if len(pairs[0]) < len(c["seeds"]):
            return []
        mean, _, p = t_test(np.subtract(*pairs))
        confirmed = confirmed and mean > 0 and p < c["alpha"]
        lines.append(compare(runs, c["tested"], c["baseline"], field, titles[field], True))
    claim = f"{c['tested']} is better than {c['baseline']} on both metrics at p < {c['alpha']}"
    verdict = f"confirmed: {claim}" if confirmed else f"not confirmed: not every part of '{claim}'"
    return [f"{c['name']}, fixed before its runs ({c['tested']} minus {c['baseline']} on "
            f"{c['dataset']}, {c['about']}, {c['steps']} steps): {verdict}.", "",
            *lines, "", "On its seeds, too:", "", *flatness(runs, kind(c["dataset"]))]


def table(records):
    """table.md's text. Runs of one dataset at two budgets or settings are an error: every mean
    and pairing would mix them."""
    confirm = confirmatory(records) + confirmatory(records, TEST_WORLD)
    records = [r for r in records if r["seed"] not in CONFIRMATORY["seeds"]]
    for dataset in datasets(records):
        found = sorted({(r["steps"], str(r.get("setting"))) for r in records
                        if r["dataset"] == dataset})
        if len(found) > 1:
            runs = ", ".join(f"{steps} (setting {tag})" for steps, tag in found)
            raise UserError(f"{dataset}: runs at {len(found)} budgets or settings in one results "
                            f"folder ({runs}): give each its own folder")
    lines = ["Primary comparison, fixed before the protocol ran: co-supervision at lambda_seq 0.5 "
             "minus separate supervision, paired by seed (Student's t with seeds - 1 degrees of "
             "freedom):", "", *summary(records), "", *confirm]
    for dataset in datasets(records):
        runs = [r for r in records if r["dataset"] == dataset]
        fields = [m for m in columns(dataset) if any(r.get(m[0]) is not None for r in runs)]
        seeds, steps = len({r["seed"] for r in runs}), runs[0]["steps"]
        lines += [f"#### {dataset}: {seeds} seed(s), {steps} steps (pretraining + fine-tuning)", "",
                  "| variant | " + " | ".join(title for _, title, _ in fields) + " |",
                  "|---" * (len(fields) + 1) + "|"]
        for variant in variants(runs):
            cells = [fmt(values(runs, variant, f)) for f, _, _ in fields]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lexical = [fmt(lexical_values(runs, f)) for f, _, _ in fields]
        lines += ["| TF-IDF (no training) | " + " | ".join(lexical) + " |", "",
                  *flatness(runs, kind(dataset)), "Primary:"]
        lines += [compare(runs, TESTED, BASELINE, f, t, h) or f"- {t}: -"
                  for f, t, h in fields if f in PRIMARY[kind(dataset)]]
        lines += ["", "Secondary (not fixed in advance):"]
        for a, b, field in secondary(dataset):
            title, higher = next(((t, h) for f, t, h in fields if f == field), (None, True))
            line = title and compare(runs, a, b, field, f"{a} minus {b}, {title}", higher)
            lines += [line] if line else []
        lines.append("")
    return "\n".join(lines)


def secondary(dataset):
    """(a, b, field) comparisons reported beside the primary one, labelled as such."""
    if is_facts(dataset):  # co0.1: the lambda nearest the paper's weighting, L_NSP / 100
        return [("co0.1", BASELINE, "answer_em_retrieval"), ("co0.1", BASELINE, "recall@1"),
                (TESTED, BASELINE, "reworded_answer_em_retrieval"),
                (TESTED, BASELINE, "reworded_recall@1"),
                (TESTED, "scratch", "answer_em_retrieval"), (TESTED, "scratch", "recall@1"),
                (TESTED, "ntp-ft", "val_ntp")]
    return [(TESTED, "scratch", "mrr"), (TESTED, "ntp-ft", "val_ntp")]


def gains(runs, variant, metric):
    """(seed, what the last quarter of its steps added to metric) for each run of a variant
    with a curve of the metric, in seed order."""
    return [(r["seed"], last_quarter_gain(r["curve"], metric))
            for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == variant
            and len(r.get("curve", [])) > 1 and None not in [p[metric] for p in r["curve"]]]


def flatness(runs, corpus_kind):
    """Whether each variant had finished learning: what the last quarter of its steps added to
    retrieval and to val NTP loss, judged on what it trains, on average and seed by seed. A val
    NTP loss that rises is over-fitting, not flat."""
    metric = "recall@1" if corpus_kind == "facts" else "mrr"
    lines = [f"Last quarter of each run's steps (flattened: {metric} gains at most {FLAT} and val "
             f"NTP loss moves at most {FLAT}, on average and on every seed; pretrained and ntp-ft "
             f"judged on val NTP loss alone, nsp-ft on {metric} alone):", "",
             f"| variant | {metric} gained | val NTP loss changed |", "|---|---|---|"]
    judged = {name: [] for name in ("Flattened on every seed", "flattened on average",
                                    "still learning", "val NTP loss rising (over-fitting, not "
                                    "flat)", "no curve to judge")}
    flat, on_average, learning, rising_loss, no_curve = judged.values()
    for variant in variants(r for r in runs if "curve" in r):
        both = [gains(runs, variant, m) for m in (metric, "val_ntp")]
        lines.append(f"| {variant} | " + " | ".join(fmt([g for _, g in gs]) for gs in both)
                     + " |")
        trains = {"pretrained": (1,), "ntp-ft": (1,), "nsp-ft": (0,)}.get(variant, (0, 1))
        # judged on the digits the table prints, so that 0.020 in the table reads as flattened;
        # a fall in val NTP loss is its gain
        signed = {i: [(s, round(g * (-1 if i else 1), 3)) for s, g in both[i]]
                  for i in trains if both[i]}
        means = {i: round(float(np.mean([g for _, g in v])), 3) for i, v in signed.items()}
        gaining = sorted({s for v in signed.values() for s, g in v if g > FLAT})
        rising = sorted(s for s, g in signed.get(1, []) if g < -FLAT)
        seeds = [f"{what} on seed{'s' * (len(ss) > 1)} {', '.join(map(str, ss))}"
                 for what, ss in (("still gaining", gaining), ("val NTP loss rising", rising))
                 if ss]
        if not signed:
            no_curve.append(variant)
        elif max(means.values()) > FLAT:
            learning.append(variant)
        elif means.get(1, 0) < -FLAT:
            loss = [f"{-means[1]:+.3f}"] + seeds[:bool(gaining)]  # and seeds still gaining
            rising_loss.append(f"{variant} ({'; '.join(loss)})")
        elif seeds:
            on_average.append(f"{variant} ({'; '.join(seeds)})")
        else:
            flat.append(variant)
    verdict = "; ".join(f"{name}: {', '.join(vs) or 'none'}" for name, vs in judged.items()
                        if vs or vs is flat)
    return lines + ["", verdict + ".", ""]


def plots(records, out_dir):
    """Per dataset, the metrics against lambda_seq and the learning curves, as PNGs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, title, name):
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}_{slug(dataset)}.png"), dpi=100)
    records = [r for r in records if r["seed"] not in CONFIRMATORY["seeds"]]  # its own lines
    for dataset in datasets(records):
        runs = [r for r in records if r["dataset"] == dataset]
        co = [v for v in variants(runs) if v.startswith("co")]
        if len(co) > 1:  # the lambda plot: co-supervision against lambda_seq, baselines as lines
            lams = [float(v[2:]) for v in co]
            shown = [m for m in columns(dataset)[:5]
                     if m[0] != "recall@10" and None not in values(runs, co[0], m[0])]
            fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.3), squeeze=False)
            for ax, (field, title, _) in zip(axes[0], shown):
                means, sds = zip(*(mean_sd(values(runs, v, field)) for v in co))
                ax.errorbar(lams, means, yerr=sds, marker="o", capsize=3, label="co")
                for i, base in enumerate(("ntp-ft", "nsp-ft", "sep", "scratch")):
                    vals = [v for v in values(runs, base, field) if v is not None]
                    if vals:
                        ax.axhline(np.mean(vals), ls="--", color=f"C{i + 1}", label=base)
                ax.set_xscale("log")
                ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
                ax.minorticks_off()
                ax.set(xlabel="lambda_seq")
                ax.set_title(title, fontsize=9)
            axes[0, 0].legend(fontsize=7)
            save(fig, f"{dataset}: against lambda_seq (mean +- std over seeds)", "lambda")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, field in zip(axes, ("recall@1" if is_facts(dataset) else "mrr", "val_ntp")):
            for variant in CURVES:
                curves = [r for r in runs if r["variant"] == variant and "curve" in r]
                if curves:  # stage 2 starts where pretraining ended: one axis of total steps
                    stage2 = variant not in ("pretrained", "scratch")
                    shift = int(curves[0]["steps"].split("+")[0]) if stage2 else 0
                    ys = np.mean([[np.nan if c[field] is None else c[field] for c in r["curve"]]
                                  for r in curves], axis=0)
                    ax.plot([c["iter"] + shift for c in curves[0]["curve"]], ys, marker=".",
                            label=variant)
            lexical = values(runs, "pretrained", f"lexical_{field}")
            if lexical and lexical[0] is not None:
                ax.axhline(lexical[0], ls="--", color="grey", label="TF-IDF")
            ax.set(xlabel="steps since random weights",
                   title=field if field.startswith("val") else f"val {field}")
        axes[1].set_yscale("log")  # nsp-ft's untrained lm_head (~5) would flatten the rest
        axes[0].legend(fontsize=7)
        save(fig, f"{dataset}: learning curves (mean over seeds)", "curves")
        plt.close("all")


def slug(dataset):
    """A file-name form of a dataset: facts, pydoc, or a corpus file's name without extension."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(dataset))[0])


def write(records, out_dir):
    text = table(records)  # before the file opens: a refused folder keeps its table.md
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    plots(records, out_dir)


@dataclass
class ReportConfig:
    results: str = flag(RESULTS, "the folder with runs.jsonl; table.md and plots are rewritten")


def main(argv=None):
    cfg, _ = parse_config(ReportConfig, __doc__, argv)
    records = list(load(os.path.join(cfg.results, "runs.jsonl")).values())
    if not records:
        raise UserError(f"no runs in {cfg.results}/runs.jsonl: run python -m experiments.grid "
                        "first")
    write(records, cfg.results)
    print(open(os.path.join(cfg.results, "table.md")).read())


if __name__ == "__main__":
    main_guard(main)

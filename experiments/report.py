"""
The experiments' report (grid.py runs the grid): experiments/results/runs.jsonl in, a markdown
table with a paired test, and PNG plots out.

Every number in table.md is computed here from runs.jsonl, so the table can be regenerated from
the committed records alone:

    python -m experiments.report
"""

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from machinery.checkpoint import read_jsonl
from machinery.cli import UserError, flag, main_guard, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RESULTS = os.path.join("experiments", "results")                     # from the repository's root

# (record field, column title, higher is better)
METRICS = [("val_ntp", "val NTP loss", False), ("recall@1", "held-out recall@1", True),
           ("mrr", "held-out MRR", True), ("answer_em_retrieval", "answer EM, retrieval", True),
           ("answer_em_no_retrieval", "answer EM, Gen alone", True)]
MAIN = ["ntp", "nsp", "co0.5", "pre"]      # the learning curves' variants
TESTED = "co0.5"                           # fixed before the grid ran: the default lambda_seq


def key(dataset, variant, seed, iters):
    return f"{dataset}/{variant}/s{seed}/{iters}"


def load(path):
    """The records of runs.jsonl by key; a later line for the same run wins."""
    if not os.path.exists(path):
        return {}
    records, broken = read_jsonl(path)
    for n in broken:  # a line cut short by a crash: that run is simply done again
        print(f"note: {path} line {n} is not a whole record; skipping it", file=sys.stderr)
    return {key(r["dataset"], r["variant"], r["seed"], r["iters"]): r for r in records}


def order(variant):
    """ntp, nsp, sep, the co-supervised runs by lambda_seq, pre."""
    fixed = {"ntp": 0, "nsp": 1, "sep": 2, "pre": 1e9}
    return fixed.get(variant, 3 + float(variant[2:]) if variant.startswith("co") else 1e8)


def values(records, dataset, variant, field):
    """A metric's values over seeds, in seed order (None where the run has no such metric)."""
    runs = sorted((r for r in records if r["dataset"] == dataset and r["variant"] == variant),
                  key=lambda r: r["seed"])
    return [r.get(field) for r in runs]


def t_test(diffs):
    """Paired t-test of per-seed differences: (mean, t, two-sided p). The p-value integrates
    Student's t density with n - 1 degrees of freedom beyond |t| (x = |t| + tan(phi))."""
    d = np.asarray(diffs, dtype=float)
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0:
        return mean, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0
    t, nu = mean / (sd / math.sqrt(n)), n - 1
    phi = np.linspace(0, math.pi / 2, 200_001)[:-1]
    x = abs(t) + np.tan(phi)
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    density = c * (1 + x ** 2 / nu) ** (-(nu + 1) / 2) / np.cos(phi) ** 2
    return mean, t, float(min(1.0, 2 * np.trapezoid(density, phi)))


def fmt(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} +- {np.std(vals, ddof=1):.3f}"


def table(records):
    lines = []
    for dataset in sorted({r["dataset"] for r in records}):
        runs = [r for r in records if r["dataset"] == dataset]
        fields = [m for m in METRICS if any(r.get(m[0]) is not None for r in runs)]
        seeds, iters = len({r["seed"] for r in runs}), sorted({r["iters"] for r in runs})
        lines += [f"### {dataset}: {seeds} seed(s), {', '.join(map(str, iters))} steps per run", "",
                  "| variant | " + " | ".join(title for _, title, _ in fields) + " |",
                  "|---" * (len(fields) + 1) + "|"]
        for variant in sorted({r["variant"] for r in runs}, key=order):
            cells = [fmt(values(runs, dataset, variant, f)) for f, _, _ in fields]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += ["", *paired(runs, dataset, fields), ""]
    return "\n".join(lines)


def paired(runs, dataset, fields):
    """co0.5 against the best single-supervision system of each metric, seed by seed; then pre
    against sep, the two variants with twice the steps of training in total."""
    if not any(r["variant"] == TESTED for r in runs):
        return []
    out = [f"Paired test, {TESTED} minus the best single-supervision system (best by mean over "
           "seeds; per-seed differences, Student's t with seeds - 1 degrees of freedom):", ""]
    for field, title, higher in fields:
        if field == "answer_em_no_retrieval":
            continue
        systems = {v: values(runs, dataset, v, field) for v in ("ntp", "nsp", "sep")}
        if field == "answer_em_retrieval":  # Gen alone is ntp's best way to answer, too
            systems["ntp, Gen alone"] = values(runs, dataset, "ntp", "answer_em_no_retrieval")
        out += compare(values(runs, dataset, TESTED, field), TESTED, systems, title, higher)
    if any(r["variant"] == "pre" for r in runs) and any(r["variant"] == "sep" for r in runs):
        out += ["", "Added after the grid had run (not fixed beforehand): pre minus sep. Both had "
                "twice the steps of training of the others (pre: ntp's steps, then its own; sep: "
                "ntp's and nsp's):", ""]
        for field, title, higher in fields:
            if field != "answer_em_no_retrieval":
                out += compare(values(runs, dataset, "pre", field), "pre",
                               {"sep": values(runs, dataset, "sep", field)}, title, higher)
    return out


def compare(mine, name, systems, title, higher):
    """One line: `mine` (per seed) against the best by mean of `systems`, with a paired t-test."""
    systems = {k: v for k, v in systems.items() if v and None not in v and len(v) == len(mine)}
    if not systems or None in mine:
        return []
    best = (max if higher else min)(systems, key=lambda k: np.mean(systems[k]))
    diffs = np.subtract(mine, systems[best])
    if len(diffs) < 2:
        return [f"- {title}: {name} {fmt(mine)} vs {best} {fmt(systems[best])} (one seed: no test)"]
    mean, t, p = t_test(diffs)
    wins = int(np.sum(diffs > 0 if higher else diffs < 0))
    return [f"- {title}: {name} {fmt(mine)} vs {best} {fmt(systems[best])}: difference "
            f"{mean:+.3f}, t = {t:.2f}, p = {p:.3f}; {name} better in {wins} of {len(diffs)} seeds"]


def plots(records, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for dataset in sorted({r["dataset"] for r in records}):
        runs = [r for r in records if r["dataset"] == dataset]
        fields = [m for m in METRICS[:4] if any(r.get(m[0]) is not None for r in runs)]
        co = sorted({r["variant"] for r in runs if r["variant"].startswith("co")}, key=order)
        lams = [float(v[2:]) for v in co]
        fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.4))
        for ax, (field, title, _) in zip(np.atleast_1d(axes), fields):
            means = [np.mean(values(runs, dataset, v, field)) for v in co]
            sds = [np.std(values(runs, dataset, v, field)) for v in co]
            ax.errorbar(lams, means, yerr=sds, marker="o", capsize=3, label="co-supervision")
            for i, base in enumerate(("ntp", "nsp", "sep", "pre")):
                vals = [v for v in values(runs, dataset, base, field) if v is not None]
                if vals:
                    ax.axhline(np.mean(vals), ls="--", color=f"C{i + 1}", label=base)
            ax.set_xscale("log")
            ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
            ax.minorticks_off()
            ax.set_xlabel("lambda_seq")
            ax.set_title(title)
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle(f"{dataset}: metrics against lambda_seq (mean +- std over seeds)")
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"lambda_{dataset}.png"))
        fig.savefig(written[-1], dpi=110)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, field, title in zip(axes, ("recall@1", "val_ntp"),
                                    ("held-out recall@1", "val NTP loss")):
            for variant in MAIN:
                curves = [r["curve"] for r in runs if r["variant"] == variant and "curve" in r]
                if curves:
                    ax.plot([c["iter"] for c in curves[0]],
                            np.mean([[c[field] for c in curve] for curve in curves], axis=0),
                            marker=".", label=variant)
            ax.set_xlabel("iteration (pre: after ntp's steps)")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{dataset}: learning curves (mean over seeds)")
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"curves_{dataset}.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close("all")
    return written


def write(records, out_dir):
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table(records) + "\n")
    return plots(records, out_dir)


@dataclass
class ReportConfig:
    results: str = flag(RESULTS, "the folder with runs.jsonl; table.md and plots are rewritten")


def main(argv=None):
    cfg, _ = parse_config(ReportConfig, __doc__, argv)
    records = list(load(os.path.join(cfg.results, "runs.jsonl")).values())
    if not records:
        raise UserError(f"no runs in {cfg.results}/runs.jsonl: run python -m experiments.grid first")
    write(records, cfg.results)
    print(open(os.path.join(cfg.results, "table.md")).read())


if __name__ == "__main__":
    main_guard(main)

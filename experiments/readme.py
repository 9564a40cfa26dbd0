"""
The result blocks of README.md and experiments/README.md, computed from the committed records in
experiments/results/, so that no reported number is typed by hand. A block sits between
`<!-- readme.py NAME -->` and `<!-- /readme.py -->`; tests/test_readme.py checks that each holds
what this module computes from the records today.

    python -m experiments.readme            # rewrite the blocks from the records
    python -m experiments.readme --check    # say which blocks differ, change nothing
"""

import os
import re
from dataclasses import dataclass

import numpy as np

from experiments import report
from experiments.band import TEST_WORLD_BAND, pooled_difference
from machinery.intervals import paired_difference
from machinery.checkpoint import read_jsonl
from machinery.cli import UserError, flag, main_guard, parse_config

RESULTS = os.path.join(report.ROOT, "experiments", "results")
FILES = [os.path.join(report.ROOT, "README.md"),
         os.path.join(report.ROOT, "experiments", "README.md")]
BLOCK = re.compile(r"(<!-- readme.py (\S+) -->\n)(.*?)(<!-- /readme.py -->)", re.S)


def band(name):
    """The records of a band (experiments/band.py), [] where it has not run yet."""
    path = os.path.join(RESULTS, "band", f"{name}.jsonl")
    return read_jsonl(path)[0] if os.path.exists(path) else []


def grid(folder):
    """The records of a grid's results folder (experiments/grid.py)."""
    return list(report.load(os.path.join(RESULTS, folder, "runs.jsonl")).values())


def field(record, path):
    """A band record's metric: a top-level key, or split/key inside its evaluation."""
    split, _, key = path.rpartition("/")
    return record["eval"][split][key] if split else record[key]


def spread(records, path):
    """mean +- sd (min to max) over a band's runs: the form every band figure takes."""
    v = np.array([field(r, path) for r in records], dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.3f} +- {sd:.3f} ({v.min():.3f} to {v.max():.3f})"


# (row title, band metric, TF-IDF's metric on the same questions or None, chance)
BAND_ROWS = [
    ("val NTP loss", "val_ntp", None, ""),
    ("recall@1, whole datastore", "recall@1", "val/lexical_recall@1", "0.0004"),
    ("recall@10", "recall@10", "val/lexical_recall@10", "0.0042"),
    ("MRR", "mrr", "val/lexical_mrr", "0.0035"),
    ("answer exact match, retrieval in the loop", "answer_em_retrieval", None, "1/16 to 1/12"),
    ("answer exact match, no retrieval", "val/answer_em_no_retrieval", None, "1/16 to 1/12"),
    ("answer exact match given the gold fact", "val/answer_em_gold", None, ""),
    ("reworded questions: answer exact match", "val_reworded/answer_em_retrieval", None, ""),
    ("reworded questions: recall@1", "val_reworded/recall@1", "val_reworded/lexical_recall@1",
     ""),
    ("recall@1 added by the last quarter of training", "last_quarter_gain", None, ""),
]


def band_table():
    """The default run's band on the test world (the headline) and on the tuning world, NTP-only
    training beside them, TF-IDF on the same questions and chance."""
    plan = TEST_WORLD_BAND  # fixed before its runs: shown once every one of them is in
    test = band(plan["name"])
    test = test if len(test) == len(plan["seeds"]) * len(plan["threads"]) else []
    worlds = [("test world", test), ("tuning world", band("default"))]
    ntp = band("ntp_only_test") if test else []
    head = ["held-out (val)"] + [f"{w}: band of {len(r)} runs, mean +- sd (min to max)"
                                 for w, r in worlds if r]
    head += ["NTP only (lambda_seq 0, seed 1337)" if ntp else None,
             "TF-IDF, " + " / ".join(w for w, r in worlds if r), "chance"]
    head = [h for h in head if h]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for title, path, lexical, chance in BAND_ROWS:
        cells = [title] + [spread(r, path) for _, r in worlds if r]
        if ntp:
            cells.append(f"{field(ntp[0], path):.3f}" if path != "last_quarter_gain" else "")
        cells.append(" / ".join(f"{field(r[0], lexical):.3f}" for _, r in worlds if r)
                     if lexical else "")
        rows.append("| " + " | ".join(cells + [chance]) + " |")
    ntp_note = (f"; NTP only: one run, {ntp[0]['threads']} threads, "
                f"{ntp[0]['cpu']}, test world"
                if ntp else "")
    machines = sorted({f"{r['cpu']}" for _, rs in worlds for r in rs})
    seeds = sorted({r["seed"] for _, rs in worlds for r in rs})
    threads = sorted({r["threads"] for _, rs in worlds for r in rs})
    return "\n".join(rows) + (
        f"\n\nSeeds {seeds[0]} to {seeds[-1]} at {' and '.join(map(str, threads))} threads, "
        f"{', '.join(machines)}{ntp_note} (`experiments/results/band/`).\n\n"
        + band_summary(*next((w, r) for w, r in worlds if r), ntp))


def band_summary(world, runs, ntp):
    """What the headline world's band says, in sentences whose numbers are the table's."""
    def mean(path):
        return np.mean([field(r, path) for r in runs])
    lexical = field(runs[0], "val_reworded/lexical_recall@1")
    side = "below" if mean("val_reworded/recall@1") < lexical else "above"
    below = sum((field(r, "val_reworded/recall@1") < lexical) == (side == "below") for r in runs)
    ntp_loss = [field(r, "val_ntp") for r in runs]
    return (
        f"On the {world}, the co-supervised model answers a held-out question right "
        f"{mean('answer_em_retrieval'):.3f} of the time, and only through retrieval: without it "
        f"{mean('val/answer_em_no_retrieval'):.3f}, about chance, since a held-out person's facts "
        f"are in the datastore and not in Gen's weights. Its queries beat TF-IDF on the same "
        f"questions (recall@1 {mean('recall@1'):.3f} against "
        f"{field(runs[0], 'val/lexical_recall@1'):.3f}: words find the person, not which of the "
        f"person's six facts a question asks for). Asked in words no training document uses, it "
        f"answers {mean('val_reworded/answer_em_retrieval'):.3f} and ranks the fact first "
        f"{mean('val_reworded/recall@1'):.3f} of the time, **{side} TF-IDF's {lexical:.3f} on "
        f"the same questions** (on average; {side} it in {below} of {len(runs)} runs)."
        + (f" Val NTP loss {min(ntp_loss):.3f} to {max(ntp_loss):.3f}, against "
           f"{field(ntp[0], 'val_ntp'):.3f} for NTP alone (one seed): with the token space "
           f"trained first, co-supervision does not cost Gen's writing." if ntp else "") + "\n")


def pvalue(p):
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def test(records, a, b, metric):
    """(a's mean, b's mean, a-better seeds of n, mean difference, p): the paired test."""
    mine, theirs = report.paired(records, a, b, metric)
    diff = np.subtract(mine, theirs)
    return (np.mean(mine), np.mean(theirs), int((diff > 0).sum()), len(diff),
            float(diff.mean()), report.t_test(diff)[2])


def clause(records, a, b, metric, what=""):
    m, t, wins, n, d, p = test(records, a, b, metric)
    head = f"{what} " if what else ""
    return f"{head}{m:.3f} against {t:.3f} ({a} better in {wins} of {n} seeds, {pvalue(p)})"


def last_quarter(records, variant, metric):
    """Per-seed last-quarter gains of a variant's curve: {seed: gain}."""
    return {r["seed"]: report.last_quarter_gain(r["curve"], metric) for r in records
            if r["variant"] == variant and len(r.get("curve", [])) > 1}


def comparison():
    """The paper's comparison in a paragraph: the test world's pre-registered result first, then
    the tuning world's tests in the order they were made, with what did not hold."""
    tw, c = grid("test_world"), report.TEST_WORLD
    parts = []
    tw_runs = [r for r in tw if r["steps"] == c["steps"]]
    if report.confirmatory(tw_runs, c):
        verdict = report.confirmatory(tw_runs, c)[0].split("): ", 1)[1].split(":")[0]
        parts.append(
            f"**On a world no choice was tuned on** (`facts_test`, the test fixed before its "
            f"runs in `report.TEST_WORLD`: co0.5 minus sep, seeds 1337 to 1341, {c['steps']} "
            f"steps, alpha {c['alpha']} per metric), co-supervision answered "
            + clause(tw_runs, "co0.5", "sep", "answer_em_retrieval", "held-out questions")
            + " and " + clause(tw_runs, "co0.5", "sep", "recall@1", "ranked their fact first")
            + f": **{verdict}**.")
    else:
        parts.append("**On a world no choice was tuned on** (`facts_test`, fixed before its runs "
                     "in `report.TEST_WORLD`): its runs are not all in yet.")
    first, main_, long = grid("first_protocol"), grid(""), grid("stage2_3200")
    first = [r for r in first if r["dataset"] == "facts"]
    primary = [r for r in main_ if r["seed"] not in report.CONFIRMATORY["seeds"]]
    confirm = [r for r in main_ if r["seed"] in report.CONFIRMATORY["seeds"]]
    *_, p_long = test(long, "co0.5", "sep", "recall@1")
    co_late = {s: g for s, g in last_quarter(long, "co0.5", "recall@1").items()
               if g > report.FLAT}
    ntp_rise = np.mean(list(last_quarter(long, "ntp-ft", "val_ntp").values()))
    nsp_late = last_quarter(confirm, "nsp-ft", "recall@1").values()
    asked = [r for r in primary if r["variant"] == "co0.5"]
    parts.append(
        "On the world the recipe was tuned on (`facts`, whose held-out people also chose the "
        "recipe, the weight and the budgets), in the order the tests were made: the first "
        "protocol's primary test, fixed before it ran (400 + 400 steps), showed "
        + clause(first, "co0.5", "sep", "answer_em_retrieval", "no difference on answers,")
        + " and " + clause(first, "co0.5", "sep", "recall@1", "recall@1")
        + "; the budget was then changed to 800 + 1,600 steps, where co-supervision answered "
        + clause(primary, "co0.5", "sep", "answer_em_retrieval")
        + " and " + clause(primary, "co0.5", "sep", "recall@1", "recall@1")
        + "; lambda_seq 0.1 on 5 new seeds, fixed before its runs: "
        + clause(confirm, "co0.1", "sep", "answer_em_retrieval", "answers")
        + " and " + clause(confirm, "co0.1", "sep", "recall@1", "recall@1")
        + " (confirmed at alpha 0.025 each); at 800 + 3,200 steps "
        + clause(long, "co0.5", "sep", "answer_em_retrieval", "answers")
        + " and " + clause(long, "co0.5", "sep", "recall@1", "recall@1")
        + (" (above the 0.025 the pre-registered tests use)." if p_long >= 0.025 else "."))
    parts.append(
        f"At 3,200 steps the curves had flattened on average, not on every seed: "
        f"{len(co_late)} of 5 co0.5 runs still gained "
        + " and ".join(f"{g:.3f}" for g in co_late.values())
        + f" recall@1 in their last quarter, and ntp-ft's val NTP loss rose by {ntp_rise:.3f} "
        f"(over-fitting). On the confirmatory seeds the baseline's retriever (nsp-ft) was still "
        f"learning ({min(nsp_late):+.3f} to {max(nsp_late):+.3f} recall@1 in the last quarter). "
        f"The two primary metrics are nearly one measurement: answers follow retrieval (co0.5 "
        f"answered {np.mean([r['answer_em_retrieval'] for r in asked]):.3f}, its first "
        f"retrieval was the gold fact {np.mean([r['retrieval_acc'] for r in asked]):.3f}).")
    return "\n".join(parts) + "\n"


# The real-text measurements (experiments/texts.py, band.py): each text from scratch and from
# the base, the records experiments/results/text/<text>_<start>.jsonl
TEXTS = [("pydoc", "`pydoc`"), ("alice", "`alice.txt`"), ("hound", "`hound.txt`")]
STARTS = [("scratch", "from scratch"), ("base", "from the base")]


def text_records(name, folder="text"):
    path = os.path.join(RESULTS, folder, f"{name}.jsonl")
    return read_jsonl(path)[0] if os.path.exists(path) else []


def mean_range(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def text_row(title, runs):
    """One row of a real-text table: the runs' val markers against TF-IDF's order of the first
    stage's candidates, re-ranked by the learned score (mean over runs, and the difference pooled
    over them with its 95% interval, band.pooled_difference), and the whole datastore."""
    val = [r["eval"]["val"] for r in runs]
    tfidf = val[0]["first_stage_mrr"]
    learned = [v["reranked_mrr"] for v in val]
    diff, (lo, hi), p = pooled_difference(runs)
    markers = len(val[0]["reciprocal_ranks"]["first_stage"])
    return (f"| {title} | {markers} | {len(runs)} | {val[0]['first_stage_recall@K']:.3f} | "
            f"{tfidf:.3f} | {mean_range(learned)} | {np.mean(learned) / tfidf:.2f} | "
            f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}], {pvalue(p)} | "
            f"{mean_range([r['mrr'] for r in runs])} | {val[0]['lexical_mrr']:.3f} |")


TEXT_HEAD = ("| text | val markers | runs | the first stage's top 100 hold the target | "
             "TF-IDF's order of them: MRR | learned score re-ranking them: MRR, mean (min to "
             "max) | learned / TF-IDF | learned minus TF-IDF, pooled over the runs [95% "
             "interval] | whole datastore: learned MRR | whole datastore: TF-IDF MRR |\n"
             + "| --- " * 10 + "|")


def text_table():
    """Each small text from scratch and from the base: the re-ranking that a text's result lies
    in, with the interval that says whether it is one."""
    rows, seen = [TEXT_HEAD], []
    for name, title in TEXTS:
        for start, how in STARTS:
            runs = text_records(f"{name}_{start}")
            if runs:
                rows.append(text_row(f"{title} {how}", runs))
                seen += runs
    if not seen:
        return "No runs yet.\n"
    seeds = sorted({r["seed"] for r in seen})
    return "\n".join(rows) + (
        f"\n\nSeeds {', '.join(map(str, seeds))}, "
        f"{' and '.join(sorted({str(r['threads']) for r in seen}))} thread(s), "
        f"{', '.join(sorted({r['cpu'] for r in seen}))} (`experiments/results/text/`).\n\n"
        + " ".join(filter(None, [base_itself()] + [base_lift(name, title)
                                                    for name, title in TEXTS])) + "\n")


def base_itself():
    """The base's own last evaluation, on its val markers (its log: results/text/base/)."""
    path = os.path.join(RESULTS, "text", "base", "log.jsonl")
    if not os.path.exists(path):
        return ""
    m = read_jsonl(path)[0][-1]
    lo, hi = m["reranked_mrr_minus_first_stage_ci"]
    return (f"The base itself ({m['iter']:,} steps), on its own text's val markers, re-ranks "
            f"TF-IDF's top 100 with MRR {m['reranked_mrr']:.4f} against TF-IDF's order's "
            f"{m['first_stage_mrr']:.4f} ({m['reranked_mrr'] / m['first_stage_mrr']:.1f} times; "
            f"the difference's 95% interval [{lo:+.4f}, {hi:+.4f}])"
            + (": on a 2.7 MB text the learned score carries what words lack." if lo > 0
               else "."))


def base_lift(name, title):
    """What the base adds on one text, paired on its val markers: the learned re-ranking MRR from
    the base minus from scratch (each marker's 1/rank averaged over each start's runs), with its
    95% interval, and the whole-datastore MRR of each start."""
    scratch, based = text_records(f"{name}_scratch"), text_records(f"{name}_base")
    if not scratch or not based:
        return ""

    def learned(runs):
        return np.mean([r["eval"]["val"]["reciprocal_ranks"]["reranked"] for r in runs], axis=0)
    diff, (lo, hi), p = paired_difference(learned(based), learned(scratch))
    verdict = "a lift" if lo > 0 else "a loss" if hi < 0 else "no difference the markers can show"
    return (f"On {title} the base changes the learned re-ranking MRR by {diff:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] ({pvalue(p)}): {verdict}; whole-datastore MRR "
            f"{np.mean([r['mrr'] for r in scratch]):.3f} from scratch, "
            f"{np.mean([r['mrr'] for r in based]):.3f} from the base.")


def tune_table():
    """The fine-tuning recipes tried from the base, on a held-out slice of pydoc's training
    markers (experiments/texts.py: pydoc_tune.txt), never on val."""
    head, rule = TEXT_HEAD.replace("| text | val markers", "| from the base, seed 1337 | "
                                                           "held-out training markers").split("\n")
    rows = [head + " train s |", rule + " --- |"]
    path = os.path.join(RESULTS, "text_tune")
    for name in sorted(f[:-len(".jsonl")] for f in os.listdir(path) if f.endswith(".jsonl")):
        runs = text_records(name, "text_tune")
        flags = runs[0]["train_args"].split("--init_from out_base")[-1]
        flags = flags.replace("--eval_interval 300", "").strip()  # every run: a finer curve
        title = f"`{flags}`" if flags else "the text defaults (2,400 steps, L_NSP from step 300)"
        rows.append(text_row(title, runs) + f" {runs[0]['train_s']:.0f} s |")
    return "\n".join(rows) + "\n"


def blocks():
    """Every block's text by name."""
    out = {"band": band_table(), "comparison": comparison(), "text": text_table()}
    if os.path.isdir(os.path.join(RESULTS, "text_tune")):
        out["text_tune"] = tune_table()
    for folder in ("results", "results/stage2_3200", "results/first_protocol",
                   "results/test_world"):
        out[f"report:{folder}"] = report.table(grid(folder[len("results/"):])).strip() + "\n"
    return out


@dataclass
class ReadmeConfig:
    check: bool = flag(False, "only say which blocks differ from the records; write nothing")


def main(argv=None):
    cfg, _ = parse_config(ReadmeConfig, __doc__, argv)
    want, stale = blocks(), []
    for path in FILES:
        text = open(path).read()

        def fill(m):
            if m.group(2) not in want:
                raise UserError(f"{path}: no block named {m.group(2)!r}")
            if m.group(3) != want[m.group(2)]:
                stale.append(f"{os.path.relpath(path, report.ROOT)}: {m.group(2)}")
            return m.group(1) + want[m.group(2)] + m.group(4)
        new = BLOCK.sub(fill, text)
        if not cfg.check and new != text:
            with open(path, "w") as f:
                f.write(new)
    print(("differ from the records: " if cfg.check else "rewritten: ")
          + (", ".join(stale) or "none"))
    if cfg.check and stale:
        raise SystemExit(1)


if __name__ == "__main__":
    main_guard(main)

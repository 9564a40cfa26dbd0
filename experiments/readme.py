"""
The result blocks of README.md and experiments/README.md, computed from the committed records in
experiments/results/, so that no reported number is typed by hand. A block sits between
`<!-- readme.py NAME -->` and `<!-- /readme.py -->`.

    python -m experiments.readme            # rewrite the blocks from the records
    python -m experiments.readme --check    # say which blocks differ, change nothing
"""

import os
import re
from dataclasses import dataclass

import numpy as np

from experiments import report
from experiments.band import ROOT, pooled_difference
from machinery.checkpoint import read_jsonl
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.intervals import paired_difference

RESULTS = os.path.join(ROOT, "experiments", "results")
FILES = [os.path.join(ROOT, "README.md"),
         os.path.join(ROOT, "experiments", "README.md")]
BLOCK = re.compile(r"(<!-- readme.py (\S+) -->\n)(.*?)(<!-- /readme.py -->)", re.S)
pvalue = report.pvalue


def records(path):
    """The records of a JSON-lines file under RESULTS, [] where there is none."""
    path = os.path.join(RESULTS, path)
    return read_jsonl(path)[0] if os.path.exists(path) else []


def grid(folder):
    """The records of a grid's results folder (experiments/grid.py)."""
    return list(report.load(os.path.join(RESULTS, folder, "runs.jsonl")).values())


def field(record, path):
    """A band record's metric: a top-level key, or split/key inside its evaluation."""
    split, _, key = path.rpartition("/")
    return record["eval"][split][key] if split else record[key]


def spread(records, path):
    """mean +- sd (min to max) over a band's runs."""
    v = [field(r, path) for r in records]
    return f"{report.fmt(v)} ({min(v):.3f} to {max(v):.3f})"


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
    """The default run's band on the test world (the headline) and the tuning world, beside
    NTP-only training, TF-IDF and chance."""
    worlds = [("test world", records("band/test_world.jsonl")),
              ("tuning world", records("band/default.jsonl"))]
    ntp = records("band/ntp_only_test.jsonl")[0]
    head = ["held-out (val)"] + [f"{w}: band of {len(r)} runs, mean +- sd (min to max)"
                                 for w, r in worlds]
    head += ["NTP only (lambda_seq 0, seed 1337)", "TF-IDF, test world / tuning world", "chance"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for title, path, lexical, chance in BAND_ROWS:
        cells = [title] + [spread(r, path) for _, r in worlds]
        cells.append(f"{field(ntp, path):.3f}" if path != "last_quarter_gain" else "")
        cells.append(" / ".join(f"{field(r[0], lexical):.3f}" for _, r in worlds)
                     if lexical else "")
        rows.append("| " + " | ".join(cells + [chance]) + " |")
    runs = [r for _, rs in worlds for r in rs]
    seeds = sorted({r["seed"] for r in runs})
    threads = sorted({r["threads"] for r in runs})
    return "\n".join(rows) + (
        f"\n\nSeeds {seeds[0]} to {seeds[-1]} at {' and '.join(map(str, threads))} threads, "
        f"{', '.join(sorted({r['cpu'] for r in runs}))}; NTP only: one run, {ntp['threads']} "
        f"threads, {ntp['cpu']}, test world (`experiments/results/band/`).\n\n"
        + band_summary(*worlds[0], ntp))


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
        f"the same questions** (on average; {side} it in {below} of {len(runs)} runs). Val NTP "
        f"loss {min(ntp_loss):.3f} to {max(ntp_loss):.3f}, against {field(ntp, 'val_ntp'):.3f} "
        f"for NTP alone (one seed): with the token space trained first, co-supervision does not "
        f"cost Gen's writing.\n")


def clause(records, a, b, metric, what=""):
    """a's mean against b's on one metric, with the paired test's sign count and p."""
    mine, theirs = report.paired(records, a, b, metric)
    diff = np.subtract(mine, theirs)
    head = f"{what} " if what else ""
    return (f"{head}{np.mean(mine):.3f} against {np.mean(theirs):.3f} ({a} better in "
            f"{int((diff > 0).sum())} of {len(diff)} seeds, {pvalue(report.t_test(diff)[2])})")


def last_quarter(records, variant, metric):
    return [g for _, g in report.gains(records, variant, metric)]


def comparison():
    """The paper's comparison in a paragraph: the test world's pre-registered result, then the
    tuning world's tests in the order they were made."""
    tw, c = grid("test_world"), report.TEST_WORLD
    verdict = report.confirmatory(tw, c)[0].split("): ", 1)[1].split(":")[0]
    first = [r for r in grid("first_protocol") if r["dataset"] == "facts"]
    main_, long = grid(""), grid("stage2_3200")
    primary = [r for r in main_ if r["seed"] not in report.CONFIRMATORY["seeds"]]
    confirm = [r for r in main_ if r["seed"] in report.CONFIRMATORY["seeds"]]
    p_long = report.t_test(np.subtract(*report.paired(long, "co0.5", "sep", "recall@1")))[2]
    co_late = [g for g in last_quarter(long, "co0.5", "recall@1") if g > report.FLAT]
    nsp_late = last_quarter(confirm, "nsp-ft", "recall@1")
    asked = [r for r in primary if r["variant"] == "co0.5"]

    def both(runs, a, first, second="recall@1"):  # "answers ... and recall@1 ..."
        return (clause(runs, a, "sep", "answer_em_retrieval", first) + " and "
                + clause(runs, a, "sep", "recall@1", second))
    return (
        f"**On a world no choice was tuned on** (`facts_test`, the test fixed before its runs in "
        f"`report.TEST_WORLD`: co0.5 minus sep, seeds 1337 to 1341, {c['steps']} steps, alpha "
        f"{c['alpha']} per metric), co-supervision answered "
        + both(tw, "co0.5", "held-out questions", "ranked their fact first")
        + f": **{verdict}**.\n"
        "On the world the recipe was tuned on (`facts`, whose held-out people also chose the "
        "recipe, the weight and the budgets), in the order the tests were made: the first "
        "protocol's primary test, fixed before it ran (400 + 400 steps), showed "
        + both(first, "co0.5", "no difference on answers,")
        + "; the budget was then changed to 800 + 1,600 steps, where co-supervision answered "
        + both(primary, "co0.5", "")
        + "; lambda_seq 0.1 on 5 new seeds, fixed before its runs: "
        + both(confirm, "co0.1", "answers")
        + " (confirmed at alpha 0.025 each); at 800 + 3,200 steps "
        + both(long, "co0.5", "answers")
        + (" (above the 0.025 the pre-registered tests use)." if p_long >= 0.025 else ".")
        + f"\nAt 3,200 steps the curves had flattened on average, not on every seed: "
        f"{len(co_late)} of 5 co0.5 runs still gained "
        + " and ".join(f"{g:.3f}" for g in co_late)
        + f" recall@1 in their last quarter, and ntp-ft's val NTP loss rose by "
        f"{np.mean(last_quarter(long, 'ntp-ft', 'val_ntp')):.3f} (over-fitting). On the "
        f"confirmatory seeds the baseline's retriever (nsp-ft) was still learning "
        f"({min(nsp_late):+.3f} to {max(nsp_late):+.3f} recall@1 in the last quarter). The two "
        f"primary metrics are nearly one measurement: answers follow retrieval (co0.5 answered "
        f"{np.mean([r['answer_em_retrieval'] for r in asked]):.3f}, its first retrieval was the "
        f"gold fact {np.mean([r['retrieval_acc'] for r in asked]):.3f}).\n")


# The real-text measurements (experiments/texts.py, band.py): each text from scratch and from
# the base, the records experiments/results/text/<text>_<start>.jsonl
TEXTS = [("pydoc", "`pydoc`"), ("alice", "`alice.txt`"), ("hound", "`hound.txt`")]
STARTS = [("scratch", "from scratch"), ("base", "from the base")]
TEXT_HEAD = ("| text | val markers | runs | the first stage's top 100 hold the target | "
             "TF-IDF's order of them: MRR | learned score re-ranking them: MRR, mean (min to "
             "max) | learned / TF-IDF | learned minus TF-IDF, pooled over the runs [95% "
             "interval] | whole datastore: learned MRR | whole datastore: TF-IDF MRR |\n"
             + "| --- " * 10 + "|")


def mean_range(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def text_row(title, runs):
    """One row of a real-text table: the learned re-ranking of TF-IDF's candidates against
    TF-IDF's order (pooled over the runs), and the whole datastore."""
    val = [r["eval"]["val"] for r in runs]
    tfidf = val[0]["first_stage_mrr"]
    learned = [v["reranked_mrr"] for v in val]
    diff, (lo, hi), p = pooled_difference(runs)
    markers = len(val[0]["reciprocal_ranks"]["first_stage"])
    return (f"| {title} | {markers} | {len(runs)} | {val[0]['first_stage_recall@K']:.3f} | "
            f"{tfidf:.3f} | {mean_range(learned)} | {np.mean(learned) / tfidf:.2f} | "
            f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}], {pvalue(p)} | "
            f"{mean_range([r['mrr'] for r in runs])} | {val[0]['lexical_mrr']:.3f} |")


def text_table():
    """Each small text from scratch and from the base, then what the base adds."""
    rows, seen = [TEXT_HEAD], []
    for name, title in TEXTS:
        for start, how in STARTS:
            runs = records(f"text/{name}_{start}.jsonl")
            if runs:
                rows.append(text_row(f"{title} {how}", runs))
                seen += runs
    seeds = sorted({r["seed"] for r in seen})
    return "\n".join(rows) + (
        f"\n\nSeeds {', '.join(map(str, seeds))}, "
        f"{' and '.join(sorted({str(r['threads']) for r in seen}))} thread(s), "
        f"{', '.join(sorted({r['cpu'] for r in seen}))} (`experiments/results/text/`).\n\n"
        + " ".join(filter(None, [base_itself()] + [base_lift(name, title)
                                                    for name, title in TEXTS])) + "\n")


def base_itself():
    """The base's own last evaluation, on its val markers (its log: results/text/base/)."""
    m = records("text/base/log.jsonl")[-1]
    lo, hi = m["reranked_mrr_minus_first_stage_ci"]
    return (f"The base itself ({m['iter']:,} steps), on its own text's val markers, re-ranks "
            f"TF-IDF's top 100 with MRR {m['reranked_mrr']:.4f} against TF-IDF's order's "
            f"{m['first_stage_mrr']:.4f} ({m['reranked_mrr'] / m['first_stage_mrr']:.1f} times; "
            f"the difference's 95% interval [{lo:+.4f}, {hi:+.4f}])"
            + (": on a 2.7 MB text the learned score carries what words lack." if lo > 0
               else "."))


def base_lift(name, title):
    """What the base adds on one text: learned re-ranking MRR from the base minus from scratch,
    paired on the val markers (each marker's 1/rank averaged over a start's runs)."""
    scratch, based = records(f"text/{name}_scratch.jsonl"), records(f"text/{name}_base.jsonl")
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
    """The fine-tuning recipes tried from a base, on held-out training markers of pydoc: the
    2,400-step base's rows first, then those of the base named in --init_from."""
    head, rule = TEXT_HEAD.replace("| text | val markers", "| from the base, seed 1337 | "
                                                           "held-out training markers").split("\n")
    rows = []
    for name in os.listdir(os.path.join(RESULTS, "text_tune")):
        if name.endswith(".jsonl"):
            runs = records(f"text_tune/{name}")
            base, _, flags = runs[0]["train_args"].split("--init_from ")[-1].partition(" ")
            flags = " ".join(flags.replace("--eval_interval 300", "").split())  # a finer curve
            title = (f"`{flags}`" if flags
                     else "the text defaults (2,400 steps, L_NSP from step 300)")
            if base != "out_base":
                title += f", from `{base}`"
            rows.append(((base != "out_base", name),
                         text_row(title, runs) + f" {runs[0]['train_s']:.0f} s |"))
    return "\n".join([head + " train s |", rule + " --- |"] + [r for _, r in sorted(rows)]) + "\n"


def blocks():
    """Every block's text by name."""
    out = {"band": band_table(), "comparison": comparison(), "text": text_table(),
           "text_tune": tune_table()}
    for folder in ("", "/stage2_3200", "/first_protocol", "/test_world"):
        out[f"report:results{folder}"] = report.table(grid(folder[1:])).strip() + "\n"
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
                stale.append(f"{os.path.relpath(path, ROOT)}: {m.group(2)}")
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

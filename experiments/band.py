"""
A recipe's band: `python train.py --lambda_seq 0.5` (plus --train_args) and `python evaluate.py`
over seeds and thread counts, and how far the numbers spread (seed, threads and instruction set
all move float rounding). Records go to --results/NAME.jsonl, the table to --results/NAME.md.

    python -m experiments.band                      # the default run, 5 seeds x 1 and 2 threads
    python -m experiments.band --name mytext --train_args "--dataset pydoc" --seeds 1337,1338
"""

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from machinery.checkpoint import read_jsonl
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.config import Config
from machinery.corpora import is_facts
from machinery.intervals import paired_difference

# The default run's band on the test world (facts_test, which no choice of recipe has seen), fixed
# before its runs: it holds if every run's recall@1 is at least 0.93 and their spread at most 0.05.
TEST_WORLD_BAND = {"name": "test_world", "train_args": "--dataset facts_test",
                   "seeds": [1337, 1338, 1339, 1340, 1341], "threads": [1, 2],
                   "min_recall@1": 0.93, "max_spread": 0.05}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
METRICS = ("recall@1", "recall@10", "mrr", "val_ntp", "answer_em_retrieval", "last_quarter_gain",
           "train_s")
# a text's runs also record evaluate.py's re-ranking of TF-IDF's top K, where its result lies
TEXT_METRICS = ("reranked_mrr", "reranked_recall@1", "reranked_mrr_minus_first_stage",
                "first_stage_mrr", "combined_mrr")


@dataclass
class BandConfig:
    name: str = flag("default", "the recipe's name: its records are RESULTS/NAME.jsonl")
    train_args: str = flag("", "train.py flags beside --lambda_seq 0.5 and the defaults")
    seeds: str = flag("1337,1338,1339,1340,1341", "comma-separated seeds")
    threads: str = flag("1,2", "comma-separated thread counts; every seed runs at each")
    results: str = flag(os.path.join("experiments", "results", "band"), "where records go")
    work_dir: str = flag("out_band", "where the runs' checkpoints and logs go")


def _ints(text, name):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{name} must be positive, got {text!r}")
    return values


def chosen(parts, names):
    """The names --parts asks for (all: every one), in the order of names (bench's)."""
    asked = names if parts == "all" else parts.split(",")
    if not set(asked) <= set(names):
        raise UserError(f"--parts takes all or some of {', '.join(names)}, got {parts!r}")
    return [name for name in names if name in asked]


def instruction_set():
    """This CPU's widest x86 vector extension (BLAS picks kernels by it), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return next((ext for ext in ("avx512f", "avx2", "avx") if ext in flags), platform.machine())


def last_quarter_gain(curve, metric="recall@1"):
    """What the last quarter of training added: metric at the end minus at 3/4 (interpolated)."""
    steps = np.array([r["iter"] for r in curve], dtype=float)
    values = np.array([r[metric] for r in curve], dtype=float)
    return float(values[-1] - np.interp(0.75 * steps[-1], steps, values))


def defaults():
    """A short hash of train.py's defaults: a run is reused only under the defaults it ran with."""
    config = dataclasses.asdict(Config())
    if not config["gpt2_block"]:  # added after the records, off as they ran: left out of the hash
        del config["gpt2_block"]
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def run(cfg, seed, threads):
    """Train and evaluate one run in fresh processes with `threads` threads; its record."""
    facts = is_facts(parse_config(Config, "", cfg.train_args.split())[0].dataset)
    out = os.path.join(cfg.work_dir, f"{cfg.name}-s{seed}-t{threads}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--lambda_seq", "0.5",
            "--seed", str(seed), "--out_dir", out, "--overwrite", *cfg.train_args.split()]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.out"), "w") as log:
        t0 = time.perf_counter()
        failed = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        train_s = time.perf_counter() - t0
        if not failed:
            evaluate = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--out_dir", out]
            failed = subprocess.run(evaluate + ([] if facts else ["--questions", "0"]),
                                    stdout=subprocess.DEVNULL, stderr=log, env=env).returncode
    if failed:
        raise UserError(f"seed {seed}, {threads} threads failed: see {out}/train.out")
    curve, _ = read_jsonl(os.path.join(out, "log.jsonl"))
    with open(os.path.join(out, "eval.json")) as f:
        evaluation = json.load(f)
    last = curve[-1]
    record = {"name": cfg.name, "train_args": cfg.train_args, "defaults": defaults(),
              "seed": seed, "threads": threads,
              "cpu": instruction_set(), "torch": torch.__version__,
              **{k: last[k] for k in ("recall@1", "recall@10", "mrr", "val_ntp", "val_nsp")},
              "answer_em_retrieval": evaluation["val"].get("answer_em_retrieval"),
              "last_quarter_gain": last_quarter_gain(curve), "train_s": round(train_s, 1),
              "curve": [{"iter": r["iter"], "recall@1": r["recall@1"]} for r in curve],
              "eval": {k: evaluation.get(k) for k in ("val", "val_reworded")}}
    if not facts:
        record.update({k: evaluation["val"].get(k) for k in TEXT_METRICS})
    return record


def pooled_difference(records):
    """Learned re-ranking MRR minus TF-IDF's order's on the same val markers, each marker's 1/rank
    averaged over the runs: (difference, [lo, hi], p), by the paired bootstrap over markers."""
    ranks = [r["eval"]["val"]["reciprocal_ranks"] for r in records]
    if any(r["first_stage"] != ranks[0]["first_stage"] for r in ranks):
        raise UserError("the runs rank other markers (or TF-IDF ranks them otherwise): they "
                        "cannot be pooled")
    learned = np.mean([r["reranked"] for r in ranks], axis=0)                   # (markers,)
    return paired_difference(learned, ranks[0]["first_stage"])


def table(records):
    """The runs, one row each, then each metric's mean, sd (ddof 1), min, max and max - min. A
    figure a run lacks (answers on a text) is blank and left out of the band."""
    metrics = [*METRICS, *(k for k in TEXT_METRICS if any(k in r for r in records))]
    head = ["seed", "threads", "cpu", *metrics]
    rows = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in records:
        rows.append(" | ".join([str(r["seed"]), str(r["threads"]), r["cpu"]] +
                               [_fmt(r.get(k), k) for k in metrics]))
    values = {k: [r[k] for r in records if r.get(k) is not None] for k in metrics}
    for stat, f in (("mean", np.mean), ("sd", lambda v: np.std(v, ddof=1) if len(v) > 1 else 0),
                    ("min", np.min), ("max", np.max), ("max - min", np.ptp)):
        rows.append(" | ".join([stat, "", ""] + [_fmt(f(values[k]) if values[k] else None, k)
                                                for k in metrics]))
    return "\n".join(f"| {row} |" for row in rows) + "\n"


def _fmt(v, key):
    return "" if v is None else f"{v:.0f}" if key == "train_s" else f"{v:.3f}"


def main(argv=None):
    cfg, _ = parse_config(BandConfig, __doc__, argv)
    seeds, threads = _ints(cfg.seeds, "seeds"), _ints(cfg.threads, "threads")
    os.makedirs(cfg.results, exist_ok=True)
    path = os.path.join(cfg.results, f"{cfg.name}.jsonl")
    records = read_jsonl(path)[0] if os.path.exists(path) else []
    if any((r["train_args"], r.get("defaults")) != (cfg.train_args, defaults()) for r in records):
        raise UserError(f"{path} holds runs with other --train_args or other train.py defaults: "
                        "give another --name")
    done = {(r["seed"], r["threads"]) for r in records}
    for seed, n in [(s, n) for s in seeds for n in threads if (s, n) not in done]:
        print(f"{cfg.name}: seed {seed}, {n} threads", file=sys.stderr, flush=True)
        records.append(run(cfg, seed, n))
        with open(path, "a") as f:  # one line per finished run: an interrupted band resumes
            f.write(json.dumps(records[-1]) + "\n")
    mine = [r for r in records if r["seed"] in seeds and r["threads"] in threads]
    text = table(sorted(mine, key=lambda r: (r["threads"], r["seed"])))
    with open(os.path.join(cfg.results, f"{cfg.name}.md"), "w") as f:
        f.write(f"`python -m experiments.band --name {cfg.name} --seeds {cfg.seeds} --threads "
                f"{cfg.threads}" + (f' --train_args "{cfg.train_args}"' if cfg.train_args else "")
                + "`\n\n" + text)
    print(text)


if __name__ == "__main__":
    main_guard(main)

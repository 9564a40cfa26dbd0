"""
The paper's comparison: co-supervision against separate supervision, both fine-tuned from one
pretrained Gen, over seeds. Per seed, `pretrained` trains L_NTP alone; from it `ntp-ft` (L_NTP),
`nsp-ft` (L_NSP) and `co<lambda>` (both); `sep` trains nothing: ntp-ft's Gen writes, nsp-ft's
networks retrieve. Each finished run is a line of --results/runs.jsonl (a rerun redoes nothing).

    python -m experiments.grid                   # the full protocol (experiments/README.md)
    python -m experiments.grid --quick           # 2 seeds, few steps, one lambda: to see it work
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from evaluate import answer_metrics
from experiments import band, report
from machinery import datastore_file
from machinery.checkpoint import read_jsonl
from machinery.cli import Interrupted, UserError, flag, main_guard, parse_config
from machinery.config import Config, check_config
from machinery.corpora import is_facts
from machinery.lexical import lexical_index
from train import load_run


@dataclass
class ExperimentConfig:
    quick: bool = flag(False, "2 seeds, 100 + 100 steps, lambda 0.5 only, in --results/quick")
    datasets: str = flag("facts", "comma-separated: facts, pydoc, or .txt / .jsonl files")
    seeds: int = flag(5, "seeds, 1337 onwards")
    pretrain_iters: int = flag(800, "stage 1: L_NTP-only steps of the pretrained Gen")
    iters: int = flag(1600, "stage 2: steps of every fine-tuning run")
    lambdas: str = flag("0.1,0.5", "lambda_seq of the co-supervised runs on facts, 0.5 among them")
    evals: int = flag(4, "evaluations of every run after its first: its learning curve's points")
    questions: int = flag(200, "held-out questions per facts run, asked as trained and reworded")
    results: str = flag("out_grid", "where runs.jsonl, table.md and the plots go")
    work_dir: str = flag("out_experiments", "where the runs' checkpoints and logs go")
    train_args: str = flag("", "extra train.py flags for every run (e.g. a tiny model, for tests)")
    scratch: bool = flag(False, "also run scratch, co-supervision from random weights (secondary)")


# the protocol's own flags, whatever train.py's defaults become: L_NSP from the first step (stage
# 1 has put the token space in place), and questions in three wordings (the reworded set: a fourth)
PROTOCOL = ["--nsp_start", "0", "--temperature", "0.1", "--facts_wordings", "3"]
# train.py's behaviour when the committed records were made, kept after its default changed
AS_RECORDED = ["--nsp_lr_scale", "1"]
# What the runs' code does that no flag says, counted up when it changes so that no record made
# before is reused (2: a stage-2 run draws batches of its own)
BEHAVIOUR = 2
GRID_FLAGS = {"dataset", "seed", "max_iters", "eval_interval", "out_dir", "lambda_seq",
              "lambda_tok", "init_from", "resume", "overwrite"}


def setting(cfg):
    """A short hash of what every run depends on besides its dataset, variant, seed and steps:
    part of each run's folder and record key, so a changed setting never reuses stale runs."""
    text = json.dumps([band.defaults(), PROTOCOL, AS_RECORDED, cfg.train_args.split(),
                       cfg.questions, cfg.evals, BEHAVIOUR])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def variants(cfg, lambdas):
    """name -> (train.py flags, the variant it starts from or None, steps); sep: None."""
    out = {"pretrained": (["--lambda_seq", "0"], None, cfg.pretrain_iters),
           "ntp-ft": (["--lambda_seq", "0"], "pretrained", cfg.iters),
           "nsp-ft": (["--lambda_tok", "0", "--lambda_seq", "1"], "pretrained", cfg.iters)}
    out.update({f"co{lam:g}": (["--lambda_seq", f"{lam:g}"], "pretrained", cfg.iters)
                for lam in lambdas})
    out["sep"] = None
    if cfg.scratch:
        out["scratch"] = (["--lambda_seq", "0.5"], None, cfg.pretrain_iters + cfg.iters)
    return out


def run_dir(cfg, dataset, variant, seed):
    return os.path.join(cfg.work_dir, f"{report.slug(dataset)}-{variant}-s{seed}-"
                                      f"{cfg.pretrain_iters}+{cfg.iters}-{setting(cfg)}")


def trained(cfg, dataset, variant, seed, lambdas):
    """The run's out_dir, trained now (with what it starts from) unless work_dir has it."""
    out = run_dir(cfg, dataset, variant, seed)
    if not os.path.isfile(os.path.join(out, "done")):
        flags, start, iters = variants(cfg, lambdas)[variant]
        argv = [sys.executable, os.path.join(band.ROOT, "train.py"),
                "--dataset", dataset, "--seed", str(seed), "--max_iters", str(iters),
                "--eval_interval", str(max(1, iters // cfg.evals)), "--out_dir", out,
                *flags, *PROTOCOL, *AS_RECORDED, *cfg.train_args.split()]
        if start:
            argv += ["--init_from", trained(cfg, dataset, start, seed, lambdas)]
        shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier starts again
        os.makedirs(out)
        with open(os.path.join(out, "train.out"), "w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise UserError(f"training {dataset}/{variant}/seed {seed} failed: see "
                                f"{os.path.join(out, 'train.out')}")
        open(os.path.join(out, "done"), "w").close()
    return out


@torch.inference_mode()
def answers(out, n, query_from=None, modes=("retrieval",)):
    """Held-out answer metrics (evaluate.py's) on n questions, as asked in training and reworded.
    OUT's Gen writes; with query_from, that run's Gen and Emb_seq retrieve (sep)."""
    _, gen, embedder, data, tok = load_run(out, "cpu")
    query_gen = None
    if query_from:
        _, query_gen, embedder, _, _ = load_run(query_from, "cpu")
    store = datastore_file.build(embedder, data, progress=False)
    asked = answer_metrics(gen, store, data, tok, "val", n, query_gen, modes)
    new = answer_metrics(gen, store, data, tok, "val", n, query_gen, modes,
                         reword_questions=True, lexical=lexical_index(data, tok))
    return {**asked, **{f"reworded_{k}": v for k, v in new.items()}}


def run(cfg, dataset, variant, seed, lambdas):
    """Train (or, for sep, combine) and measure one run of the protocol; its record."""
    t0, facts, n = time.time(), is_facts(dataset), cfg.questions
    record = {"dataset": dataset, "variant": variant, "seed": seed,
              "steps": f"{cfg.pretrain_iters}+{cfg.iters}", "setting": setting(cfg)}
    if variant == "sep":  # ntp-ft's Gen writes, nsp-ft's Gen and Emb_seq retrieve
        ntp = trained(cfg, dataset, "ntp-ft", seed, lambdas)
        nsp = trained(cfg, dataset, "nsp-ft", seed, lambdas)
        record.update(read_log(nsp)[0], val_ntp=read_log(ntp)[0]["val_ntp"])
        if facts:
            record.update(answers(ntp, n, query_from=nsp))
    else:
        out = trained(cfg, dataset, variant, seed, lambdas)
        final, curve = read_log(out)
        record.update(final, curve=curve)
        if facts and variant == "ntp-ft":  # Gen alone: its queries were never trained
            record.update(answers(out, n, modes=("no_retrieval",)))
        elif facts and variant not in ("pretrained", "nsp-ft"):  # nsp-ft cannot write
            record.update(answers(out, n))
    record["wall_s"] = round(time.time() - t0, 1)
    return record


CURVE = ("iter", "val_ntp", "val_nsp", "recall@1", "mrr")
FINAL = ("val_ntp", "val_nsp", "recall@1", "recall@10", "mrr", "lexical_recall@1",
         "lexical_recall@10", "lexical_mrr")


def read_log(out):
    log, _ = read_jsonl(os.path.join(out, "log.jsonl"))
    return {k: log[-1].get(k) for k in FINAL}, [{k: r.get(k) for k in CURVE} for r in log]


def check(cfg):
    """The protocol's datasets and each one's lambdas, or a one-line error."""
    if cfg.quick:  # its own folder: a smoke run never overwrites the full protocol's results
        cfg.seeds, cfg.pretrain_iters, cfg.iters, cfg.questions, cfg.evals = 2, 100, 100, 60, 2
        cfg.lambdas, cfg.results = "0.5", os.path.join(cfg.results, "quick")
    try:
        lambdas = [float(x) for x in cfg.lambdas.split(",")]
    except ValueError:
        raise UserError(f"--lambdas is comma-separated numbers, got {cfg.lambdas!r}") from None
    if any(not lam > 0 for lam in lambdas):
        raise UserError("--lambdas: co-supervision needs lambda_seq > 0 (0 is ntp-ft)")
    if 0.5 not in lambdas:
        raise UserError("--lambdas must include 0.5: the primary comparison uses it")
    if min(cfg.seeds, cfg.pretrain_iters, cfg.iters, cfg.questions, cfg.evals) < 1:
        raise UserError("--seeds, --pretrain_iters, --iters, --questions and --evals must be "
                        "positive")
    args = cfg.train_args.split()  # valid train.py flags, and not ones the grid sets itself
    clash = sorted(GRID_FLAGS & {a[2:].split("=")[0] for a in args if a.startswith("--")})
    if clash:
        raise UserError(f"--train_args: the grid sets --{clash[0]} itself for each run")
    datasets = cfg.datasets.split(",")
    for d in datasets:  # each run's train.py flags, checked as train.py checks them
        try:
            check_config(parse_config(Config, "", args + ["--dataset", d])[0])
        except UserError as e:
            raise UserError(f"--datasets, --train_args: {e}") from None
    for folder in (cfg.results, cfg.work_dir):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder} is a file, not a directory")
    return {d: lambdas if is_facts(d) else [0.5] for d in datasets}


def main(argv=None):
    cfg, _ = parse_config(ExperimentConfig, __doc__, argv)
    datasets = check(cfg)
    os.makedirs(cfg.results, exist_ok=True)
    path = os.path.join(cfg.results, "runs.jsonl")
    done, steps, tag = report.load(path), f"{cfg.pretrain_iters}+{cfg.iters}", setting(cfg)
    cells = [(d, v, s, lams) for d, lams in datasets.items()
             for s in range(1337, 1337 + cfg.seeds) for v in variants(cfg, lams)]
    confirm = report.CONFIRMATORY  # its seeds run only what it compares
    lams = datasets.get(confirm["dataset"])
    if lams is not None and confirm["tested"] in variants(cfg, lams):
        cells += [(confirm["dataset"], v, s, lams) for s in confirm["seeds"]
                  for v in ("pretrained", "ntp-ft", "nsp-ft", confirm["tested"], "sep")]
    # one seed after another, stage 1 first and sep last: an interrupted grid leaves whole seeds
    rank = {"pretrained": 0, "sep": 2}
    cells.sort(key=lambda c: (c[2] in confirm["seeds"], c[0], c[2], rank.get(c[1], 1)))
    todo = [c for c in cells if report.key(c[0], c[1], c[2], steps, tag) not in done]
    print(f"{len(cells)} runs in the protocol, {len(cells) - len(todo)} already in {path}")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())  # for the answers computed here, as for the trainings
    try:
        for cell in tqdm(todo, desc="grid", dynamic_ncols=True):
            record = run(cfg, *cell)
            with open(path, "a") as f:  # one line per finished run: an interrupted grid resumes
                f.write(json.dumps(record) + "\n")
    except KeyboardInterrupt:  # the run in flight got Ctrl-C too: it saves and stops
        raise Interrupted(f"interrupted: the finished runs are in {path}; the same command goes "
                          "on from there") from None
    finally:
        torch.set_num_threads(threads)
    wanted = {report.key(c[0], c[1], c[2], steps, tag) for c in cells}
    report.write([r for k, r in report.load(path).items() if k in wanted], cfg.results)
    print(f"results in {cfg.results}/: table.md and the plots")


if __name__ == "__main__":
    main_guard(main)

"""
The paper's claim in miniature: does a model trained with both losses beat models trained with
each alone, and does a pretrained token space help the sequence space? An ablation grid at equal
training steps, several seeds each, on `facts` (with answers) and `pydoc` (real prose).

    python -m experiments.grid           # the full grid (experiments/README.md: 53 min on 2 cores)
    python -m experiments.grid --quick   # 1 seed, fewer steps: about 8 minutes, to see it work

The variants (`variants()`), each trained by train.py with the same steps and seed:
  ntp          L_NTP only (lambda_seq 0): answers by Gen alone, and with its untrained queries
  nsp          L_NSP only (lambda_tok 0)
  sep          separate supervision, the paper's baseline: ntp's Gen writes, nsp's Gen makes the
               queries and nsp's Emb_seq the datastore (evaluate.py --query_from); no training
               of its own
  co<lambda>   co-supervision, L_NTP + lambda_seq L_NSP, at each of --lambdas
  pre          co-supervision (lambda_seq 0.5) started from ntp's weights: a pretrained token space,
               as the paper starts from Llama-2 (it has had ntp's steps before its own)

experiments/results/ gets runs.jsonl (one JSON line per run; a run already there is not redone),
table.md (mean +- std over seeds, and a paired test of co-supervision against the best
single-supervision baseline) and PNG plots. Checkpoints go to --work_dir.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from datastore import Datastore
from evaluate import answer_metrics
from experiments import report
from machinery.checkpoint import load_run, read_jsonl
from machinery.cli import Interrupted, UserError, flag, main_guard, parse_config
from machinery.config import Config, check_config


@dataclass
class ExperimentConfig:
    quick: bool = flag(False, "1 seed and fewer steps: a smoke run of the whole grid")
    datasets: str = flag("facts,pydoc", "comma-separated datasets to run the grid on")
    seeds: int = flag(3, "seeds per variant (--quick: 1)")
    iters: int = flag(500, "training steps of every run on facts (--quick: 150)")
    pydoc_iters: int = flag(300, "training steps of every run on pydoc (--quick: 100)")
    lambdas: str = flag("0.1,0.5,1,2", "lambda_seq values of the co-supervised runs")
    pydoc_lambdas: str = flag("0.5", "lambda_seq values on pydoc (each run there costs as much as "
                                     "on facts, with no answer metric)")
    questions: int = flag(200, "held-out questions per run for answer exact match (--quick: 60)")
    results: str = flag(report.RESULTS, "where runs.jsonl, table.md and the plots go (--quick: "
                                   "its quick/ subfolder)")
    work_dir: str = flag("out_experiments", "where the runs' checkpoints and logs go")
    jobs: int = flag(0, "runs at a time, the cores shared among them (0: one per core)")
    train_args: str = flag("", "extra train.py flags for every run (e.g. a tiny model, for tests)")


def variants(lambdas):
    """name -> (train.py flags, or None for an evaluation-only variant)."""
    out = {"ntp": ["--lambda_seq", "0"], "nsp": ["--lambda_tok", "0", "--lambda_seq", "1"],
           "sep": None}
    out.update({f"co{lam:g}": ["--lambda_seq", f"{lam:g}"] for lam in lambdas})
    out["pre"] = ["--lambda_seq", "0.5"]  # + --init_from the ntp run of the same seed
    return out


def run_dir(cfg, dataset, variant, seed, iters):
    return os.path.join(cfg.work_dir, f"{dataset}-{variant}-s{seed}-{iters}")


def train(cfg, dataset, variant, seed, flags, iters):
    """One train.py run in a subprocess (its own threads and memory; its output to train.out)."""
    out = run_dir(cfg, dataset, variant, seed, iters)
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier starts again
    os.makedirs(out)
    argv = [sys.executable, os.path.join(report.ROOT, "train.py"),
            "--dataset", dataset, "--seed", str(seed), "--max_iters", str(iters),
            "--eval_interval", str(max(1, iters // 5)), "--out_dir", out, *flags,
            *cfg.train_args.split()]
    if variant == "pre":
        argv += ["--init_from", ensure_trained(cfg, dataset, "ntp", seed, iters)]
    with open(os.path.join(out, "train.out"), "w") as log:
        if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"training {dataset}/{variant}/seed {seed} failed: see "
                            f"{os.path.join(out, 'train.out')}")
    return out


def ensure_trained(cfg, dataset, variant, seed, iters):
    """The checkpoint directory of a run, training it again if results/ has it but not
    work_dir (a fresh clone): `pre` and `sep` need ntp's and nsp's weights."""
    out = run_dir(cfg, dataset, variant, seed, iters)
    with _retraining:  # pre and sep of one seed may both need it at once: train it once
        if not os.path.isfile(os.path.join(out, "ckpt.pt")):
            train(cfg, dataset, variant, seed, variants([])[variant], iters)
    return out


_retraining = threading.Lock()


@torch.inference_mode()
def answers(cfg, out, query_from=None, modes=("retrieval",)):
    """Held-out answer metrics of a trained run (evaluate.py's), with retrieval in the loop."""
    _, gen, embedder, data, tok = load_run(out, "cpu")
    query_gen = None
    if query_from:
        _, query_gen, embedder, _, _ = load_run(query_from, "cpu")
    store = Datastore.build(embedder, data, progress=False)
    return answer_metrics(gen, store, data, tok, "val", cfg.questions, query_gen, modes)


def read_log(out):
    log, _ = read_jsonl(os.path.join(out, "log.jsonl"))
    curve = [{k: r[k] for k in ("iter", "val_ntp", "recall@1")} for r in log]
    final = {k: log[-1][k] for k in ("val_ntp", "val_nsp", "recall@1", "recall@10", "mrr")}
    return final, curve


def run(cfg, dataset, variant, seed, iters, lambdas):
    """Train (or, for sep, combine) and measure one cell of the grid; its record."""
    flags = variants(lambdas)[variant]
    lambda_seq = None if flags is None else float(flags[flags.index("--lambda_seq") + 1])
    record = {"dataset": dataset, "variant": variant, "seed": seed, "iters": iters,
              "lambda_seq": lambda_seq}
    t0 = time.time()
    if variant == "sep":  # no training: ntp's Gen writes, nsp's Gen and Emb_seq retrieve
        ntp = ensure_trained(cfg, dataset, "ntp", seed, iters)
        nsp = ensure_trained(cfg, dataset, "nsp", seed, iters)
        (ntp_final, _), (nsp_final, _) = read_log(ntp), read_log(nsp)
        record.update(val_ntp=ntp_final["val_ntp"],
                      **{k: nsp_final[k] for k in ("val_nsp", "recall@1", "recall@10", "mrr")})
        if dataset == "facts":
            record.update(answers(cfg, ntp, query_from=nsp))
    else:
        out = train(cfg, dataset, variant, seed, flags, iters)
        final, curve = read_log(out)
        record.update(final, curve=curve)
        if dataset == "facts":
            modes = ("retrieval", "no_retrieval") if variant == "ntp" else ("retrieval",)
            record.update(answers(cfg, out, modes=modes))
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def run_all(cfg, todo, path):
    """Run the grid's cells, --jobs at a time, each finished one appended to runs.jsonl."""
    jobs = cfg.jobs or os.cpu_count()
    # each job gets its share of the cores: on 2 cores two 1-thread trainings do about 1.6x the
    # work of one 2-thread training (a small model's operations use a second thread poorly)
    threads, saved = max(1, os.cpu_count() // jobs), (torch.get_num_threads(),
                                                      os.environ.get("OMP_NUM_THREADS"))
    os.environ["OMP_NUM_THREADS"] = str(threads)   # for the train.py subprocesses
    torch.set_num_threads(threads)                 # for the answers computed here
    bar, lock = tqdm(total=len(todo), desc="grid", dynamic_ncols=True), threading.Lock()

    def finish(cell):
        record = run(cfg, *cell)
        with lock, open(path, "a") as f:  # one line per finished run: an interrupted grid resumes
            f.write(json.dumps(record) + "\n")
        bar.update()

    pool = ThreadPoolExecutor(jobs)
    try:
        # pre and sep start from ntp's and nsp's checkpoints: they wait for the first wave
        for wave in ([g for g in todo if g[1] not in ("pre", "sep")],
                     [g for g in todo if g[1] in ("pre", "sep")]):
            for future in [pool.submit(finish, cell) for cell in wave]:
                future.result()
    except KeyboardInterrupt:  # the runs in flight got Ctrl-C too: they save and stop
        raise Interrupted(f"interrupted: the finished runs are in {path}; the same command goes "
                          "on from there") from None
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


GRID_FLAGS = {"dataset", "seed", "max_iters", "eval_interval", "out_dir", "lambda_seq",
              "lambda_tok", "init_from", "resume", "overwrite"}


def check_train_args(train_args):
    """--train_args must be valid train.py flags, and not ones the grid sets for each run."""
    args = train_args.split()
    clash = sorted(GRID_FLAGS & {a[2:].split("=")[0] for a in args if a.startswith("--")})
    if clash:
        raise UserError(f"--train_args: the grid sets --{clash[0]} itself for each run")
    try:
        check_config(parse_config(Config, "", args)[0])
    except UserError as e:
        raise UserError(f"--train_args: {e}") from None


def main(argv=None):
    cfg, _ = parse_config(ExperimentConfig, __doc__, argv)
    if cfg.quick:  # its own folder: a smoke run never overwrites the full grid's results
        cfg.seeds, cfg.iters, cfg.pydoc_iters, cfg.questions = 1, 150, 100, 60
        cfg.results = os.path.join(cfg.results, "quick")
    try:
        lambdas = [float(x) for x in cfg.lambdas.split(",")]
        pydoc_lambdas = [float(x) for x in cfg.pydoc_lambdas.split(",")]
    except ValueError:
        raise UserError("--lambdas and --pydoc_lambdas are comma-separated numbers") from None
    if any(not lam > 0 for lam in lambdas + pydoc_lambdas):
        raise UserError("co-supervision needs lambda_seq > 0 (lambda_seq 0 is the ntp variant)")
    datasets = [d for d in cfg.datasets.split(",") if d]
    if not datasets or set(datasets) - {"facts", "pydoc"}:
        raise UserError(f"--datasets takes facts and/or pydoc, got {cfg.datasets!r}")
    if cfg.seeds < 1 or cfg.iters < 1 or cfg.pydoc_iters < 1 or cfg.questions < 1:
        raise UserError("--seeds, --iters, --pydoc_iters and --questions must be positive")
    if cfg.jobs < 0:
        raise UserError(f"--jobs must be >= 0, got {cfg.jobs}")
    check_train_args(cfg.train_args)
    for folder in (cfg.results, cfg.work_dir):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder} is a file, not a directory")
    os.makedirs(cfg.results, exist_ok=True)
    path = os.path.join(cfg.results, "runs.jsonl")
    done = report.load(path)
    grid = []
    for dataset in datasets:
        iters, lams = (cfg.iters, lambdas) if dataset == "facts" else (cfg.pydoc_iters,
                                                                       pydoc_lambdas)
        for seed in range(1337, 1337 + cfg.seeds):
            grid += [(dataset, v, seed, iters, lams) for v in variants(lams)]
    todo = [g for g in grid if report.key(*g[:4]) not in done]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already in {path}")
    run_all(cfg, todo, path)
    wanted = {report.key(*g[:4]) for g in grid}
    records = [r for k, r in report.load(path).items() if k in wanted]
    report.write(records, cfg.results)
    print(f"results in {cfg.results}/: table.md and the plots")


if __name__ == "__main__":
    main_guard(main)

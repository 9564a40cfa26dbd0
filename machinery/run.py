"""
The bookkeeping of one training run, so that train.py's loop shows only the method: the out_dir,
its log and checkpoints, --resume and --init_from, several processes (torchrun), Ctrl-C, the stop
on divergence, the progress bar and the summary at the end.

Every `eval_interval` iterations, and at the end, the loop evaluates and `save` appends one line to
out_dir/log.jsonl, redraws out_dir/curves.png (machinery/plots.py) and writes out_dir/ckpt.pt.
Ctrl-C (or SIGTERM) saves a checkpoint after the current step and stops; --resume continues exactly
where it stopped (tests/test_resume.py).
"""

import dataclasses
import glob
import json
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from datastore import chance_metrics
from machinery import distributed
from machinery.checkpoint import (init_from, keep_log_until, provenance, resume, rng_state,
                                  save_checkpoint)
from machinery.cli import Interrupted, UserError, interruptible, malloc_for
from machinery.config import pick_device
from machinery.intervals import retrieval_lines
from machinery.plots import plot_run

# Every file a run has in its out_dir: train.py's, evaluate.py's, sample.py's, and the .tmp a save
# cut short leaves. --overwrite removes them all, so that nothing of the old run is read with the
# new checkpoint; any other file there is the user's, and stays.
RUN_FILES = ("ckpt.pt", "ckpt.pt.tmp", "log.jsonl", "log.jsonl.tmp", "curves.png", "curves.png.tmp",
             "eval.json", "eval_*.json", "datastore.pt", "datastore.pt.tmp", "provenance.json")
# Drawing curves.png takes about half a second: redrawn at an evaluation once this many seconds
# have passed since the last drawing, and always when the run ends or stops (a short run, as in
# the tests, evaluates every few steps and would spend most of its time drawing).
DRAW_EVERY = 30.0
# Steps between two trims of the heap while training: Emb_seq's candidates differ in shape from
# batch to batch, and what they free stays resident until trimmed.
TRIM_EVERY = 10


class Run:
    def __init__(self, cfg, argv):
        """Check the out_dir, join the other processes (if torchrun started several). The seeds,
        the batches' generator and the autocast context are train.py's."""
        self.cfg, self.argv = cfg, argv
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
            raise UserError(f"--out_dir {cfg.out_dir} is a file, not a directory")
        # never replace another run's checkpoint by accident
        if os.path.exists(self.ckpt_path) and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{self.ckpt_path} already exists: pass --resume to continue it or "
                            "--overwrite to start over")
        self.rank, self.world, self.device = distributed.setup(pick_device(cfg.device))
        self.main = self.rank == 0  # evaluates, logs, saves
        malloc_for("transient")  # preparing the corpus, until begin()
        self.metrics, self.saved, self.stop = {}, None, False
        self.steps, self.step_time, self.t0 = 0, 0.0, 0.0
        self.undrawn, self.drawn_at = False, float("-inf")  # curves.png lags the log?

    def begin(self, gen, embedder, optimizer, params, data, tok, rng):
        """The models, optimizer and batches' generator rng from --resume or --init_from, if
        given (every checkpoint keeps rng's state); the log opened. Returns the first
        iteration."""
        cfg, start = self.cfg, 0
        malloc_for("training")  # and what preparing the corpus freed goes back to the system
        self.gen, self.embedder, self.optimizer, self.params = gen, embedder, optimizer, params
        self.data, self.tok, self.rng = data, tok, rng
        self.base = None  # the provenance of the run --init_from names
        if cfg.resume:
            start, self.metrics, self.base = resume(self.ckpt_path, cfg, gen, embedder, optimizer,
                                                    self.rng, data, tok, self.device)
            self.saved = start
        elif cfg.init_from:  # with --resume, the run it started goes on from the checkpoint
            self.base = init_from(cfg.init_from, cfg, gen, embedder, data, tok)
        if self.main:
            try:
                os.makedirs(cfg.out_dir, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create --out_dir {cfg.out_dir}: {e.strerror}") from None
            if cfg.overwrite:
                self.remove_old_run()
            if cfg.resume:
                keep_log_until(self.log_path, start)
            print(f"{cfg.dataset}: {len(data.train.ids):,} train / {len(data.val.ids):,} val "
                  f"tokens, {len(data.train.marker_pos):,} / {len(data.val.marker_pos):,} "
                  f"markers, datastore of {data.n_sequences:,} sequences; device {self.device}"
                  + (f", {self.world} processes" if self.world > 1 else ""))
        self.log = open(self.log_path, "a" if cfg.resume else "w") if self.main else None
        return start

    def remove_old_run(self):
        """--overwrite: the files of the run that was in out_dir before (RUN_FILES)."""
        for name in RUN_FILES:
            for path in glob.glob(os.path.join(glob.escape(self.cfg.out_dir), name)):
                try:
                    os.remove(path)
                except OSError as e:
                    raise UserError(f"--overwrite cannot remove {path}: {e.strerror}") from None

    def step_models(self, gen, embedder):
        """The copies the training step runs: compiled (--compile), and wrapped in DDP with several
        processes. They share the plain modules' parameters, which are what is saved and
        evaluated."""
        if self.cfg.compile:
            gen, embedder = torch.compile(gen), torch.compile(embedder)
        gen = distributed.wrap(gen, self.device, find_unused=True)  # seq_head: only with L_NSP
        return gen, distributed.wrap(embedder, self.device)

    def iterations(self, start):
        """start, start + 1, ..., max_iters, with a progress bar. Before each: stop if the weights
        are no longer finite, or (after saving) if any process got Ctrl-C or SIGTERM."""
        cfg = self.cfg
        bar = tqdm(range(start, cfg.max_iters + 1), initial=start, total=cfg.max_iters + 1,
                   desc="training", dynamic_ncols=True, disable=not self.main)
        self.bar = bar
        with interruptible("interrupted: saving a checkpoint after this step (Ctrl-C again: "
                           "quit without saving)") as self.interrupt:
            for it in bar:
                # a non-finite gradient can spoil the weights while the loss still looks fine
                if (self.due(it) or self.stop) and not all(bool(torch.isfinite(p).all())
                                                           for p in self.params):
                    raise self.diverged("the weights are not finite", it)
                if self.stop and not self.due(it):  # when due, save() stops after evaluating
                    self.interrupted(it)
                self.t0 = time.perf_counter()
                yield it

    def due(self, it):
        """Evaluate and save: every eval_interval and at the end (a resumed run has done start)."""
        due = (it % self.cfg.eval_interval == 0 or it == self.cfg.max_iters) and it != self.saved
        if due:
            malloc_for("transient")  # until save(): evaluation's tensors come and go
        return due

    def save(self, it, lr, evaluation):
        """Log rank 0's evaluation at iteration it, with the speed of the steps since the last,
        and write the checkpoint (every process calls this)."""
        malloc_for("training")  # the evaluation is over (due() set "transient")
        if self.main:
            cfg, steps = self.cfg, self.steps
            tokens = steps * cfg.batch_size * self.world * cfg.block_size
            self.metrics = {"iter": it, **evaluation, "lr": lr,
                            "ms_per_iter": 1000 * self.step_time / steps if steps else None,
                            "tokens_per_s": tokens / self.step_time if steps else None}
            self.log.write(json.dumps(self.metrics) + "\n")
            self.log.flush()
            self.undrawn = True
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in self.metrics.items()
                                    if not isinstance(v, list)))  # intervals: in the summary
        self.checkpoint(it)
        self.draw(now=it == self.cfg.max_iters or self.stop)  # after the checkpoint: it matters more
        self.saved, self.steps, self.step_time = it, 0, 0.0
        if self.stop and it != self.cfg.max_iters:
            self.interrupted(it)
        self.t0 = time.perf_counter()  # the steps' speed leaves evaluation out

    def draw(self, now):
        """curves.png from the log, if it lags: now, or if DRAW_EVERY seconds have passed."""
        if self.main and self.undrawn and (now or time.monotonic() - self.drawn_at >= DRAW_EVERY):
            plot_run(self.log_path, os.path.join(self.cfg.out_dir, "curves.png"),
                     chance_metrics(self.data.n_sequences))
            self.undrawn, self.drawn_at = False, time.monotonic()

    def stepped(self, it, loss, stats):
        """After a training step: its time; whether any process was interrupted or diverged."""
        self.step_time += time.perf_counter() - self.t0
        self.steps += 1
        self.stop, not_finite = distributed.any_rank(self.interrupt.set, not torch.isfinite(loss),
                                                     device=self.device)
        if not_finite:
            raise self.diverged("the loss is not finite", it)
        if it % TRIM_EVERY == 0:  # the free heap's pages back to the system (cli.malloc_for)
            malloc_for("training")
        if it % 10 == 0:
            self.bar.set_postfix({k: f"{v.item():.3f}" for k, v in stats.items()})

    def checkpoint(self, it):
        """ckpt.pt at iteration it, and provenance.json beside it. Every process calls it: rank 0
        keeps every process's RNG."""
        rngs = distributed.all_gather_objects(rng_state(self.rng, self.device))
        if self.main:
            cfg, gen, embedder = self.cfg, self.gen, self.embedder
            record = provenance(cfg, self.data, self.tok, it, self.base)
            save_checkpoint(self.ckpt_path, gen=gen.state_dict(), embedder=embedder.state_dict(),
                            optimizer=self.optimizer.state_dict(), config=dataclasses.asdict(cfg),
                            gen_config=dataclasses.asdict(gen.config),
                            embedder_config=dataclasses.asdict(embedder.config),
                            tokenizer={"name": self.tok.name, "fingerprint": self.tok.fingerprint},
                            data_fingerprint=self.data.fingerprint, iter=it, metrics=self.metrics,
                            rng=rngs, provenance=record)
            with open(os.path.join(cfg.out_dir, "provenance.json"), "w") as f:
                json.dump(record, f, indent=1)

    def interrupted(self, it):
        """Ctrl-C or SIGTERM in some process: all stop here, after the same step, with a
        checkpoint."""
        if self.saved != it:
            self.checkpoint(it)
        self.draw(now=True)
        args = [a for a in (sys.argv[1:] if self.argv is None else self.argv) if a != "--overwrite"]
        args = shlex.join(["train.py", *args] + ([] if "--resume" in args else ["--resume"]))
        again = ("python " if self.world == 1 else "torchrun (as before) ") + args
        raise Interrupted(f"interrupted: {self.ckpt_path} holds iteration {it}; continue with: "
                          f"{again}")

    def diverged(self, what, it):
        self.draw(now=True)
        return UserError(f"{what} at iteration {it}: training stopped; {self.ckpt_path} holds the "
                         f"last good iteration, {self.saved}; try a lower --learning_rate")

    def finish(self):
        """Close the log and print the last evaluation beside the lexical baseline and chance."""
        if not self.main:
            return
        self.log.close()
        m, chance = self.metrics, chance_metrics(self.data.n_sequences)

        def f(v):
            return "n/a" if v is None else f"{v:.4f}"
        print(f"\ndone: {m['iter']} iterations, {f(m['ms_per_iter'])} ms/iter")
        print(f"  NTP loss        train {f(m['train_ntp'])}   val {f(m['val_ntp'])}")
        print(f"  NSP loss (val)  {f(m['val_nsp'])}")
        train = {k[len("train_"):]: v for k, v in m.items() if k.startswith("train_")}
        print("\n".join(retrieval_lines(m, chance, "val", train)))  # each with its interval
        print(f"  checkpoint {self.ckpt_path}, log {self.log_path}")

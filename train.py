"""
Train Gen and Emb_seq jointly with semiparametric token-sequence co-supervision:

    L = lambda_tok * L_NTP + lambda_seq * L_NSP          (losses.co_supervision_loss)

    python train.py --lambda_seq 0.5          # the built-in `facts` world, CPU, a few minutes
    python train.py --lambda_seq 0            # NTP only: Emb_seq is never trained
    python train.py --dataset pydoc           # real prose: CPython's documentation

Every eval_interval iterations and at the end: losses, retrieval of the val markers, a line in
out_dir/log.jsonl and out_dir/ckpt.pt. Ctrl-C saves and stops; --resume continues exactly there.
Several processes: torchrun (README). Every flag: machinery/config.py, or --help.
"""

import dataclasses
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from data import load_data
from datastore import (chance_metrics, embed_all, first_stage, first_stage_metrics,
                       retrieval_quality)
from embedder import EmbedderConfig, SeqEmbedder
from losses import co_supervision_loss
from machinery import distributed
from machinery.checkpoint import (check_out_dir, check_same_data, init_from, open_log,
                                  read_checkpoint, resume, rng_states, save_checkpoint,
                                  set_rng_states)
from machinery.cli import (Interrupted, UserError, interruptible, main_guard, malloc_for,
                           parse_config)
from machinery.config import Config, autocast, check_config, pick_device
from machinery.corpora import is_facts
from machinery.intervals import retrieval_lines
from machinery.lexical import lexical_index, lexical_metrics
from machinery.plots import plot_run
from model import Gen, GenConfig

# The recipe's numbers for flags left at -1 (experiments/README.md, The default recipe).
RECIPE = {"facts": {"max_iters": 1200, "eval_interval": 300, "nsp_lr_scale": 0.3},
          "text": {"max_iters": 2400, "eval_interval": 600, "nsp_lr_scale": 1.0}}
# oneDNN, behind some of torch's CPU kernels, keeps a compiled kernel for each new tensor shape, up
# to 1,024 of them; a text's L_NSP candidates change shape every step, and the cache would grow
# all run long. A few entries keep the shapes that repeat.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
TRIM_EVERY = 10  # steps between two trims of the heap (a text's candidates vary in shape)
VAL_MARKERS = 5_000  # val markers scored (the first): TF-IDF's cost grows as markers x datastore


def configure(argv=None):
    """The config of the command line: the flags, the recipe's -1s settled, bad values errors."""
    cfg, _ = parse_config(Config, __doc__, argv)
    for name, value in RECIPE["facts" if is_facts(cfg.dataset) else "text"].items():
        if getattr(cfg, name) == -1:
            setattr(cfg, name, value)
    check_config(cfg)
    return cfg


def learning_rate(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def nsp_lr_scale(it, cfg):
    """The rate of the parts only L_NSP trains, times learning_rate: warmup from nsp_start."""
    if cfg.nsp_start == 0:
        return cfg.nsp_lr_scale
    return cfg.nsp_lr_scale * min(1.0, max(0, it - cfg.nsp_start + 1) / (cfg.warmup_iters + 1))


def build_models(cfg, vocab_size):
    """Gen and Emb_seq of the sizes a config gives, freshly initialised."""
    gen = Gen(GenConfig(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        cfg.seq_dim, cfg.dropout, cfg.gpt2_block))
    embedder = SeqEmbedder(EmbedderConfig(vocab_size, cfg.emb_block_size, cfg.emb_layer,
                                          cfg.emb_head, cfg.emb_embd, cfg.seq_dim, cfg.dropout,
                                          gpt2_block=cfg.gpt2_block, causal=cfg.gpt2_block))
    return gen, embedder


def make_optimizer(cfg, gen, embedder, device):
    """AdamW, weight decay on matrices only, as in nanoGPT; the parts only L_NSP trains (Emb_seq,
    seq_head) in groups marked "nsp", with a rate of their own (nsp_lr_scale)."""
    nsp_only = [*gen.seq_head.parameters(), *embedder.parameters()]
    shared = [p for p in gen.parameters() if all(p is not q for q in nsp_only)]
    groups = []
    for params, nsp in ((shared, False), (nsp_only, True)):
        groups += [{"params": [p for p in params if p.dim() >= 2], "nsp": nsp,
                    "weight_decay": cfg.weight_decay},
                   {"params": [p for p in params if p.dim() < 2], "nsp": nsp, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2),
                             fused=device.startswith("cuda"))


def across_processes(batch, lambda_seq, world):
    """W > 1 processes: L_NSP over all their markers and candidates (the gather), weighted by W,
    since DDP averages W gradients. All processes run L_NSP or none (DDP waits for all)."""
    if world == 1 or lambda_seq == 0:
        return None, lambda_seq
    markers = distributed.total(len(batch.target_row), batch.x.device)
    return (distributed.gather_candidates if markers > 0 else None), lambda_seq * world


def load_run(out_dir, device="auto"):
    """A trained run, for sample.py and evaluate.py: (config, Gen, Emb_seq, Data, Tokenizer)."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = read_checkpoint(path, f"train one first (train.py --out_dir {out_dir})")
    cfg, device = Config(**ckpt["config"]), pick_device(device)
    data, tok = load_data(cfg)
    check_same_data(ckpt, path, data, tok)
    gen, embedder = build_models(cfg, tok.vocab_size)
    gen.load_state_dict(ckpt["gen"])
    embedder.load_state_dict(ckpt["embedder"])
    return cfg, gen.to(device).eval(), embedder.to(device).eval(), data, tok


@torch.no_grad()
def loss_estimates(gen, embedder, data, cfg, device, ctx, split, measure_nsp=True):
    """Mean L_NTP and L_NSP (None without markers or measure_nsp) over eval_iters fixed batches."""
    rng = np.random.default_rng(cfg.seed + 1)
    ntp, nsp = [], []
    for _ in range(cfg.eval_iters):
        batch = data.get_batch(split, cfg.batch_size, rng, cfg.hard_negatives,
                               cfg.emb_block_size)
        with ctx:
            _, stats = co_supervision_loss(gen, embedder, batch.to(device), cfg.lambda_tok,
                                           float(measure_nsp), cfg.temperature)
        ntp.append(stats["ntp"].item())
        nsp += [stats["nsp"].item()] if "nsp" in stats else []
    return float(np.mean(ntp)), (float(np.mean(nsp)) if nsp else None)


def evaluate(gen, embedder, data, cfg, device, ctx, baseline, stage):
    """Losses on both splits, retrieval of val's markers (and train's first 500), and baseline."""
    gen.eval(), embedder.eval()
    out = {}
    for split in ("train", "val"):
        out[f"{split}_ntp"], out[f"{split}_nsp"] = loss_estimates(gen, embedder, data, cfg,
                                                                  device, ctx, split)
    with ctx:
        embeddings = embed_all(embedder, data)                            # (n_sequences, d)
    out.update(retrieval_quality(gen, embeddings, data, "val", device, ctx, VAL_MARKERS, stage))
    # the same for train's first markers: how far the val numbers are from what training fits
    train = retrieval_quality(gen, embeddings, data, "train", device, ctx, limit=500)
    out.update({f"train_{k}": v for k, v in train.items()})
    gen.train(), embedder.train()
    return {**out, **baseline}


def stopped_at(it, ckpt_path, argv, world):
    """Ctrl-C or SIGTERM: the line the run ends with, and the command that continues it."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    args = shlex.join(["train.py", *args] + ([] if "--resume" in args else ["--resume"]))
    again = ("python " if world == 1 else "torchrun (as before) ") + args
    return Interrupted(f"interrupted: {ckpt_path} holds iteration {it}; continue with: {again}")


def diverged(what, it, ckpt_path, saved):
    return UserError(f"{what} not finite at iteration {it}: training stopped; {ckpt_path} holds "
                     f"the last good iteration, {saved}; try a lower --learning_rate")


def main(argv=None):
    cfg = configure(argv)
    check_out_dir(cfg)  # before preparing anything: never another run's checkpoint replaced
    rank, world, device = distributed.setup(pick_device(cfg.device))  # torchrun: several
    master = rank == 0  # the process that evaluates, logs and saves
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    malloc_for("transient")  # preparing the corpus: large arrays that come and go (cli.py)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    # the batches: each process its own, and --init_from's not a replay of the base run's
    rng = np.random.default_rng([cfg.seed + rank, 1] if cfg.init_from else cfg.seed + rank)
    ctx = autocast(device, cfg.dtype)  # bfloat16 on a GPU, plain float32 on a CPU
    data, tok = load_data(cfg)
    gen, embedder = build_models(cfg, tok.vocab_size)
    gen.to(device), embedder.to(device)
    if world > 1:  # the weights are built, the same everywhere: now each its own dropout
        torch.manual_seed(cfg.seed + rank)
    params = list(gen.parameters()) + list(embedder.parameters())
    optimizer = make_optimizer(cfg, gen, embedder, device)
    start, saved, metrics, base = 0, None, {}, None  # base: the provenance of --init_from's run
    if cfg.resume:  # the models, optimizer and random streams exactly as they were saved
        ckpt = resume(ckpt_path, cfg, data, tok)
        gen.load_state_dict(ckpt["gen"])
        embedder.load_state_dict(ckpt["embedder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_states(ckpt["rng"], rng, device)
        start = saved = ckpt["iter"]
        metrics, base = ckpt["metrics"], ckpt["provenance"]["base"]
    elif cfg.init_from:  # another run's weights or GPT-2's; a fresh optimizer and schedule
        base = init_from(cfg.init_from, cfg, gen, embedder, tok)
    log = open_log(cfg, start) if master else None
    if master:
        print(f"{cfg.dataset}: {len(data.train.ids):,} train / {len(data.val.ids):,} val "
              f"tokens, {len(data.train.marker_pos):,} / {len(data.val.marker_pos):,} markers, "
              f"datastore of {data.n_sequences:,} sequences; device {device}"
              + (f", {world} processes" if world > 1 else "")
              + (f"; val scored on its first {VAL_MARKERS:,} markers"
                 if len(data.val.marker_pos) > VAL_MARKERS else ""))
    # the step runs copies (compiled; DDP) that share the parameters saved and evaluated
    step_gen, step_embedder = (torch.compile(gen), torch.compile(embedder)) if cfg.compile else (
        gen, embedder)
    step_gen = distributed.wrap(step_gen, device, find_unused=True)  # seq_head: only with L_NSP
    step_embedder = distributed.wrap(step_embedder, device)
    baseline, stage = {}, None
    if master:  # TF-IDF's numbers and the first stage's candidates: no training, so once
        lexical = lexical_index(data, tok)
        stage = first_stage(lexical, data, tok, "val", cfg.first_stage, VAL_MARKERS)
        baseline = {**lexical_metrics(data, tok, "val", VAL_MARKERS, lexical),
                    **first_stage_metrics(stage, lexical)}
    malloc_for("training")  # the step's blocks reused from the heap

    def save_at(it):  # every process joins: rank 0 keeps all their random streams
        rngs = rng_states(rng, device)
        if master:
            record = {"dataset": cfg.dataset, "data_fingerprint": data.fingerprint,
                      "train_tokens": len(data.train.ids), "sequences": data.n_sequences,
                      "tokenizer": tok.name, "iters": it, "base": base}  # what it was trained on
            save_checkpoint(ckpt_path, gen=gen.state_dict(), embedder=embedder.state_dict(),
                            optimizer=optimizer.state_dict(), config=dataclasses.asdict(cfg),
                            gen_config=dataclasses.asdict(gen.config),
                            embedder_config=dataclasses.asdict(embedder.config),
                            tokenizer={"name": tok.name, "fingerprint": tok.fingerprint},
                            data_fingerprint=data.fingerprint, iter=it, metrics=metrics,
                            rng=rngs, provenance=record)
            with open(os.path.join(cfg.out_dir, "provenance.json"), "w") as f:
                json.dump(record, f, indent=1)

    bar = tqdm(range(start, cfg.max_iters + 1), initial=start, total=cfg.max_iters + 1,
               desc="training", dynamic_ncols=True, disable=not master)
    steps, step_time, stop = 0, 0.0, False  # stop: some process got Ctrl-C or SIGTERM
    with interruptible("interrupted: saving a checkpoint after this step (Ctrl-C again: quit "
                       "without saving)") as interrupt:
        for it in bar:  # to max_iters inclusive: the last iteration only evaluates and saves
            due = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != saved
            # a non-finite gradient can spoil the weights while the loss still looks fine
            if (due or stop) and not all(bool(torch.isfinite(p).all()) for p in params):
                raise diverged("the weights are", it, ckpt_path, saved)
            if stop and not due:  # all processes stop after the same step, with a checkpoint
                if saved != it:
                    save_at(it)
                raise stopped_at(it, ckpt_path, argv, world)
            t0 = time.perf_counter()
            lr = learning_rate(it, cfg)
            if due:  # evaluate, log, draw curves.png and save
                malloc_for("transient")
                evaluation = evaluate(gen, embedder, data, cfg, device, ctx, baseline,
                                      stage) if master else None
                malloc_for("training")
                if master:
                    tokens = steps * cfg.batch_size * world * cfg.block_size
                    metrics = {"iter": it, **evaluation, "lr": lr,
                               "ms_per_iter": 1000 * step_time / steps if steps else None,
                               "tokens_per_s": tokens / step_time if steps else None}
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items() if not isinstance(v, list)))
                save_at(it)
                if master:
                    plot_run(log.name, os.path.join(cfg.out_dir, "curves.png"),
                             chance_metrics(data.n_sequences))
                saved, steps, step_time = it, 0, 0.0
                if stop and it != cfg.max_iters:
                    raise stopped_at(it, ckpt_path, argv, world)
                t0 = time.perf_counter()  # the steps' speed leaves evaluation out
            if it == cfg.max_iters:
                break
            if it == cfg.nsp_start and cfg.emb_from_gen:  # Gen's token space starts Emb_seq
                embedder.start_from(gen)
            lambda_seq = cfg.lambda_seq if it >= cfg.nsp_start else 0.0  # L_NSP joins late
            for group in optimizer.param_groups:  # the parts only L_NSP trains: their own warmup
                group["lr"] = lr * nsp_lr_scale(it, cfg) if group["nsp"] else lr
            batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                                   cfg.emb_block_size).to(device)
            gather, lambda_seq = across_processes(batch, lambda_seq, world)  # one process: as is
            with ctx:
                loss, stats = co_supervision_loss(step_gen, step_embedder, batch, cfg.lambda_tok,
                                                  lambda_seq, cfg.temperature, gather)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step_time += time.perf_counter() - t0
            steps += 1
            if it % TRIM_EVERY == 0:  # the heap's free pages back to the system (cli.malloc_for)
                malloc_for("training")
            stop, not_finite = distributed.any_rank(interrupt.set, not torch.isfinite(loss),
                                                    device=device)
            if not_finite:
                raise diverged("the loss is", it, ckpt_path, saved)
            if it % 10 == 0:
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in stats.items()})
    if master:  # the last evaluation beside chance and TF-IDF, with intervals
        log.close()
        nsp = "n/a" if metrics["val_nsp"] is None else f"{metrics['val_nsp']:.4f}"
        print(f"\ndone: {metrics['iter']} iterations; checkpoint {ckpt_path}, log {log.name}\n"
              f"  NTP loss train {metrics['train_ntp']:.4f} val {metrics['val_ntp']:.4f}, "
              f"NSP loss (val) {nsp}")
        train = {k[len("train_"):]: v for k, v in metrics.items() if k.startswith("train_")}
        print("\n".join(retrieval_lines(metrics, chance_metrics(data.n_sequences), "val", train)))


if __name__ == "__main__":
    main_guard(main)

"""
Train Gen and Emb_seq jointly with semiparametric token-sequence co-supervision:

    L = lambda_tok * L_NTP + lambda_seq * L_NSP          (losses.co_supervision_loss)

    python train.py --lambda_seq 0.5          # the built-in `facts` world, CPU, a few minutes
    python train.py --lambda_seq 0            # NTP only: Emb_seq is never trained
    python train.py --dataset pydoc           # real prose: CPython's documentation

Every eval_interval iterations, and at the end: L_NTP and L_NSP on both splits, retrieval of the
val markers against the whole datastore, a line in out_dir/log.jsonl and a checkpoint
out_dir/ckpt.pt. Ctrl-C (or SIGTERM) saves and stops; --resume continues exactly where it stopped.
Several processes: torchrun (README). Every flag: machinery/config.py, or --help.
"""

import math

import numpy as np
import torch

from data import load_data
from datastore import first_stage, first_stage_metrics, retrieval_quality
from losses import co_supervision_loss
from machinery import datastore_file, distributed  # every sequence embedded: embed_all
from machinery.cli import main_guard, parse_config
from machinery.config import Config, autocast, build_models, check_config, make_optimizer
from machinery.lexical import lexical_index, lexical_metrics
from machinery.run import Run


def learning_rate(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def nsp_lr_scale(it, cfg):
    """The parts only L_NSP trains (Emb_seq, seq_head) learn at learning_rate times this: at most
    cfg.nsp_lr_scale (on facts 0.3: at Gen's full rate the sequence space climbs slower,
    experiments/README.md, The default recipe). When L_NSP joins after nsp_start > 0 steps of
    NTP alone, those parts are still at their initialisation: they get a warmup of their own,
    warmup_iters long, from nsp_start, instead of meeting their peak rate at once."""
    if cfg.nsp_start == 0:
        return cfg.nsp_lr_scale
    return cfg.nsp_lr_scale * min(1.0, max(0, it - cfg.nsp_start + 1) / (cfg.warmup_iters + 1))


@torch.no_grad()
def loss_estimates(gen, embedder, data, cfg, device, ctx, split, measure_nsp=True):
    """Mean L_NTP and L_NSP over eval_iters fixed batches of a split (the same batches each time,
    so the curves are smooth); L_NSP is None where the split has no marker, or without
    measure_nsp (then Emb_seq does not run). The parts do not depend on the weights: L_NSP is
    measured at weight 1 even in a run that trains without it."""
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
    """The training loop's evaluation: losses on both splits, retrieval of val's markers (and of
    train's first 500) against the whole datastore (datastore.py), and re-ranking the first
    stage's candidates for the same val markers (stage); beside them `baseline`: TF-IDF's
    numbers on the same markers."""
    gen.eval(), embedder.eval()
    out = {}
    for split in ("train", "val"):
        out[f"{split}_ntp"], out[f"{split}_nsp"] = loss_estimates(gen, embedder, data, cfg,
                                                                  device, ctx, split)
    with ctx:
        embeddings = datastore_file.embed_all(embedder, data)             # (n_sequences, d)
    out.update(retrieval_quality(gen, embeddings, data, "val", device, ctx, stage=stage))
    # the same for train's first markers: how far the val numbers are from what training fits
    train = retrieval_quality(gen, embeddings, data, "train", device, ctx, limit=500)
    out.update({f"train_{k}": v for k, v in train.items()})
    gen.train(), embedder.train()
    return {**out, **baseline}


def main(argv=None):
    cfg, _ = parse_config(Config, __doc__, argv)
    check_config(cfg)
    run = Run(cfg, argv)  # the out_dir, log and checkpoints, the processes (machinery/run.py)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    # the batches: each process its own; a run from another's weights (--init_from) a stream of
    # its own too: with the seed alone it would replay that run's batches from its first
    rng = np.random.default_rng([cfg.seed + run.rank, 1] if cfg.init_from
                                else cfg.seed + run.rank)
    ctx = autocast(run.device, cfg.dtype)  # bfloat16 on a GPU, plain float32 on a CPU
    data, tok = load_data(cfg)
    gen, embedder = build_models(cfg, tok.vocab_size)  # Gen and Emb_seq of the config's sizes
    gen.to(run.device), embedder.to(run.device)
    if run.world > 1:  # the weights are built, the same everywhere: now each its own dropout
        torch.manual_seed(cfg.seed + run.rank)
    params = list(gen.parameters()) + list(embedder.parameters())
    optimizer = make_optimizer(cfg, gen, embedder, run.device)  # AdamW (machinery/config.py)
    start = run.begin(gen, embedder, optimizer, params, data, tok, rng)  # --resume, --init_from
    step_gen, step_embedder = run.step_models(gen, embedder)        # --compile, DDP
    baseline, stage = {}, None
    if run.main:  # TF-IDF's numbers and the first stage's candidates: no training, so once
        lexical = lexical_index(data, tok)
        stage = first_stage(lexical, data, tok, "val", cfg.first_stage)
        baseline = {**lexical_metrics(data, tok, "val", lexical=lexical),
                    **first_stage_metrics(stage, lexical)}
    for it in run.iterations(start):  # the progress bar; Ctrl-C and divergence stop it
        lr = learning_rate(it, cfg)
        if run.due(it):  # every eval_interval, and at the end: log and checkpoint
            run.save(it, lr, evaluate(gen, embedder, data, cfg, run.device, ctx, baseline, stage)
                     if run.main else None)
        if it == cfg.max_iters:
            break
        if it == cfg.nsp_start and cfg.emb_from_gen:  # Gen's token space starts Emb_seq
            embedder.start_from(gen)
        lambda_seq = cfg.lambda_seq if it >= cfg.nsp_start else 0.0
        for group in optimizer.param_groups:  # the parts only L_NSP trains: their own warmup
            group["lr"] = lr * nsp_lr_scale(it, cfg) if group["nsp"] else lr
        batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                               cfg.emb_block_size).to(run.device)
        # W > 1 processes: L_NSP over all their candidates, weighted by W (machinery/distributed.py)
        gather, lambda_seq = distributed.across_processes(batch, lambda_seq, run.world)
        with ctx:
            loss, stats = co_supervision_loss(step_gen, step_embedder, batch, cfg.lambda_tok,
                                              lambda_seq, cfg.temperature, gather)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        run.stepped(it, loss, stats)
    run.finish()


if __name__ == "__main__":
    main_guard(main)

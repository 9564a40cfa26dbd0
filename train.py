"""
Train Gen and Emb_seq jointly with semiparametric token-sequence co-supervision:

    L = lambda_tok * L_NTP + lambda_seq * L_NSP          (losses.co_supervision_loss)

    python train.py --lambda_seq 0.5          # the built-in `facts` world, CPU, a few minutes
    python train.py --lambda_seq 0            # NTP only: Emb_seq is never trained
    python train.py --dataset pydoc           # real prose: CPython's documentation

The first `nsp_start` iterations train L_NTP alone, then L_NSP joins (see README for why).
Every eval_interval: losses, retrieval of val markers against the whole datastore, a line in
out_dir/log.jsonl and a checkpoint out_dir/ckpt.pt. Ctrl-C saves a checkpoint and stops; --resume
continues exactly where it stopped. Several processes: torchrun (distributed.py, README).
"""

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import distributed
from checkpoint import (check_same_data, init_from, keep_log_until, read_checkpoint, resume,
                        rng_state, save_checkpoint)
from cli import Interrupted, UserError, flag, interruptible, main_guard, parse_config
from data import load_data
from datastore import chance_metrics, marker_queries, retrieval_metrics, target_ranks
from embedder import EmbedderConfig, SeqEmbedder
from losses import co_supervision_loss
from model import Gen, GenConfig


@dataclass
class Config:
    # data
    dataset: str = flag("facts", "facts, pydoc, or a path to a .txt or .jsonl file")
    split: str = flag("sentence", "what a sequence is in a .txt or pydoc: sentence, line, or none "
                                  "(no markers: plain language modelling)")
    val_fraction: float = flag(0.1, "share of a .txt/.jsonl/pydoc corpus held out as val (its end)")
    facts_people: int = flag(400, "facts: people in the world (6 facts each)")
    facts_heldout: float = flag(0.2, "facts: share of people whose questions are held out (val)")
    tokenizer: str = flag("bytes", "bytes (offline) or gpt2 (tiktoken's cache or --gpt2_file)")
    gpt2_file: str = flag("", "path to a gpt2.tiktoken file (or set COSUP_GPT2_FILE)")
    cache_dir: str = flag("data_cache", "where prepared corpora are cached")
    # Gen
    n_layer: int = flag(2, "Gen: transformer layers")
    n_head: int = flag(4, "Gen: attention heads")
    n_embd: int = flag(128, "Gen: width")
    block_size: int = flag(128, "Gen: context length in tokens (and training window)")
    dropout: float = flag(0.0, "dropout in Gen and Emb_seq")
    # Emb_seq
    emb_layer: int = flag(2, "Emb_seq: transformer layers")
    emb_head: int = flag(4, "Emb_seq: attention heads")
    emb_embd: int = flag(64, "Emb_seq: width")
    seq_len: int = flag(64, "Emb_seq: longest sequence it reads (longer ones are cut)")
    seq_dim: int = flag(128, "width of queries and sequence embeddings")
    # objective
    lambda_tok: float = flag(1.0, "weight of L_NTP (0: NSP-only training)")
    lambda_seq: float = flag(0.5, "weight of L_NSP (0: NTP-only training)")
    nsp_start: int = flag(0, "iterations of NTP alone before L_NSP joins")
    temperature: float = flag(0.05, "InfoNCE temperature tau")
    hard_negatives: int = flag(2, "hard negatives per marker (confusable sequences) in L_NSP")
    # optimisation
    batch_size: int = flag(24, "windows per batch, per process (torchrun: each process draws its "
                               "own, so N processes train on N * batch_size windows per step)")
    max_iters: int = flag(1200, "training iterations")
    learning_rate: float = flag(2e-3, "peak learning rate")
    min_lr: float = flag(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(100, "linear warmup iterations")
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices only)")
    beta2: float = flag(0.99, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)")
    # evaluation and i/o
    eval_interval: int = flag(400, "iterations between evaluations and checkpoints")
    eval_iters: int = flag(10, "batches per split for the loss estimates")
    out_dir: str = flag("out", "where ckpt.pt and log.jsonl go")
    seed: int = flag(1337, "random seed (weights, batches)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (bfloat16 on a GPU with it, else float32), float32, bfloat16")
    compile: bool = flag(False, "torch.compile the models")
    resume: bool = flag(False, "continue from out_dir/ckpt.pt")
    overwrite: bool = flag(False, "start afresh in an out_dir that holds another run's checkpoint "
                                  "(it and the log are replaced)")
    init_from: str = flag("", "start from the weights of another run's out_dir (same data and "
                              "model sizes), with a fresh optimizer and schedule")


def check_config(cfg):
    for name in ("lambda_tok", "lambda_seq"):
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0:
            raise UserError(f"--{name} must be a finite number >= 0, got {v}")
    if cfg.lambda_tok == 0 and cfg.lambda_seq == 0:
        raise UserError("--lambda_tok and --lambda_seq are both 0: nothing to train")
    for name in ("block_size", "batch_size", "n_layer", "n_head", "n_embd", "emb_layer", "emb_head",
                 "emb_embd", "seq_len", "seq_dim", "eval_interval", "eval_iters"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for width, heads in (("n_embd", "n_head"), ("emb_embd", "emb_head")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise UserError(f"--{width} {getattr(cfg, width)} is not divisible by "
                            f"--{heads} {getattr(cfg, heads)}")
    for name in ("max_iters", "nsp_start", "hard_negatives", "warmup_iters"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.temperature > 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.split not in ("sentence", "line", "none"):
        raise UserError(f"--split must be sentence, line or none, got {cfg.split!r}")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.facts_heldout < 1:
        raise UserError("--val_fraction and --facts_heldout must be between 0 and 1")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if cfg.resume and cfg.init_from:
        raise UserError("--resume and --init_from exclude each other: resume continues out_dir's "
                        "run, init_from starts a new one from another run's weights")


def check_out_dir(cfg, ckpt_path):
    """Never replace another run's checkpoint by accident."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir {cfg.out_dir} is a file, not a directory")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{ckpt_path} already exists: pass --resume to continue it or --overwrite "
                        "to start over")


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[kind]:
        raise UserError(f"device {name!r} is not available on this machine")
    return name


def autocast(device, dtype):
    """bfloat16 autocast on a GPU; plain float32 elsewhere (CPU autocast is slower than fp32)."""
    kind = device.split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=torch.bfloat16)


def build_models(cfg, vocab_size):
    gen = Gen(GenConfig(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        cfg.seq_dim, cfg.dropout))
    embedder = SeqEmbedder(EmbedderConfig(vocab_size, cfg.seq_len, cfg.emb_layer, cfg.emb_head,
                                          cfg.emb_embd, cfg.seq_dim, cfg.dropout))
    return gen, embedder


def make_optimizer(cfg, params, device):
    """AdamW; weight decay on matrices (and embeddings) only, not on norms, as in nanoGPT."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2),
                             fused=device.startswith("cuda"))


def learning_rate(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def loss_estimates(gen, embedder, data, cfg, device, ctx, split):
    """Mean L_NTP and L_NSP over eval_iters fixed batches of a split (the same batches each time,
    so the curves are smooth); L_NSP is None where the split has no marker."""
    rng = np.random.default_rng(cfg.seed + 1)
    ntp, nsp = [], []
    for _ in range(cfg.eval_iters):
        batch = data.get_batch(split, cfg.batch_size, rng, cfg.hard_negatives, cfg.seq_len)
        with ctx:
            _, stats = co_supervision_loss(gen, embedder, batch.to(device), cfg.lambda_tok,
                                           cfg.lambda_seq, cfg.temperature, with_nsp=True)
        ntp.append(stats["ntp"].item())
        nsp += [stats["nsp"].item()] if "nsp" in stats else []
    return float(np.mean(ntp)), (float(np.mean(nsp)) if nsp else None)


@torch.no_grad()
def retrieval_quality(gen, keys, data, split, device, ctx, limit=None):
    """recall@1, recall@10 and MRR of a split's markers (the first `limit`) against the whole
    datastore `keys`: every sequence of the corpus, embedded."""
    contexts, targets = data.marker_contexts(split, limit)
    if not len(targets):
        return {"recall@1": None, "recall@10": None, "mrr": None}
    with ctx:
        queries = marker_queries(gen, contexts, device)
    return retrieval_metrics(target_ranks(queries, keys, torch.from_numpy(targets)))


def evaluate(gen, embedder, data, cfg, device, ctx):
    """The training loop's evaluation: losses on both splits, val retrieval."""
    gen.eval(), embedder.eval()
    out = {}
    for split in ("train", "val"):
        out[f"{split}_ntp"], out[f"{split}_nsp"] = loss_estimates(gen, embedder, data, cfg,
                                                                  device, ctx, split)
    with ctx:
        keys = embedder.embed(data)
    out.update(retrieval_quality(gen, keys, data, "val", device, ctx))
    gen.train(), embedder.train()
    return out


def train_step(gen, embedder, optimizer, params, batch, cfg, lambda_seq, lr, ctx, gather=False):
    """One optimisation step of L = lambda_tok L_NTP + lambda_seq L_NSP on a batch (AdamW, the
    gradient norm clipped to grad_clip). Returns the loss and its parts."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with ctx:
        loss, stats = co_supervision_loss(gen, embedder, batch, cfg.lambda_tok, lambda_seq,
                                          cfg.temperature, gather=gather)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return loss, stats


def resume_command(argv, world):
    """The command line that continues this run."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    args = shlex.join(["train.py", *args] + ([] if "--resume" in args else ["--resume"]))
    return ("python " if world == 1 else "torchrun (as before) ") + args


def main(argv=None):
    cfg, _ = parse_config(Config, __doc__, argv)
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    check_out_dir(cfg, ckpt_path)
    rank, world, device = distributed.setup(pick_device(cfg.device))
    main_process = rank == 0  # evaluates, logs, saves
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    rng = np.random.default_rng(cfg.seed + rank)  # each process its own batches
    data, tok = load_data(cfg)
    gen, embedder = build_models(cfg, tok.vocab_size)
    gen.to(device), embedder.to(device)
    optimizer = make_optimizer(cfg, list(gen.parameters()) + list(embedder.parameters()), device)
    start, metrics = 0, {}
    if cfg.resume:
        start, metrics = resume(ckpt_path, cfg, gen, embedder, optimizer, rng, data, tok, device)
    if cfg.init_from:
        init_from(os.path.join(cfg.init_from, "ckpt.pt"), cfg, gen, embedder, data, tok)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if main_process:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out_dir {cfg.out_dir}: {e.strerror}") from None
        if cfg.resume:
            keep_log_until(log_path, start)
    ctx = autocast(device, cfg.dtype)
    # compiled copies for the training step, wrapped in DDP with several processes; the plain
    # modules (the same parameters) are what is saved and evaluated
    step_gen, step_embedder = ((torch.compile(gen), torch.compile(embedder)) if cfg.compile
                               else (gen, embedder))
    step_gen = distributed.wrap(step_gen, device, find_unused=True)  # seq_head: only with L_NSP
    step_embedder = distributed.wrap(step_embedder, device)
    params = list(gen.parameters()) + list(embedder.parameters())
    chance = chance_metrics(data.n_sequences)
    if main_process:
        print(f"{cfg.dataset}: {len(data.train.ids):,} train / {len(data.val.ids):,} val tokens, "
              f"{len(data.train.marker_pos):,} / {len(data.val.marker_pos):,} markers, "
              f"datastore of {data.n_sequences:,} sequences; device {device}"
              + (f", {world} processes" if world > 1 else ""))
    log = open(log_path, "a" if cfg.resume else "w") if main_process else None

    def save(it):
        """ckpt.pt at iteration it. Every process calls it: rank 0 keeps every process's RNG."""
        rngs = distributed.all_gather_objects(rng_state(rng, device))
        if main_process:
            save_checkpoint(ckpt_path, gen=gen.state_dict(), embedder=embedder.state_dict(),
                            optimizer=optimizer.state_dict(), config=dataclasses.asdict(cfg),
                            gen_config=dataclasses.asdict(gen.config),
                            embedder_config=dataclasses.asdict(embedder.config),
                            tokenizer={"name": tok.name, "fingerprint": tok.fingerprint},
                            data_fingerprint=data.fingerprint, iter=it, metrics=metrics, rng=rngs)

    def diverged(what, it):
        return UserError(f"{what} at iteration {it}: training stopped; {ckpt_path} holds the "
                         f"last good iteration, {saved}; try a lower --learning_rate")

    steps, step_time, saved, stop = 0, 0.0, start if cfg.resume else None, False
    bar = tqdm(range(start, cfg.max_iters + 1), initial=start, total=cfg.max_iters + 1,
               desc="training", dynamic_ncols=True, disable=not main_process)
    with interruptible("interrupted: saving a checkpoint after this step (Ctrl-C again: quit "
                       "without saving)") as interrupt:
        for it in bar:
            lr = learning_rate(it, cfg)
            # evaluate and save every eval_interval and at the end (a resumed run has done `start`)
            due = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != saved
            # a non-finite gradient can spoil the weights while the loss still looks fine
            if (due or stop) and not all(bool(torch.isfinite(p).all()) for p in params):
                raise diverged("the weights are not finite", it)
            if due:
                if main_process:
                    tokens = steps * cfg.batch_size * world * cfg.block_size
                    metrics = {"iter": it, **evaluate(gen, embedder, data, cfg, device, ctx),
                               "lr": lr, "ms_per_iter": 1000 * step_time / steps if steps else None,
                               "tokens_per_s": tokens / step_time if steps else None}
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items()))
                save(it)
                saved, steps, step_time = it, 0, 0.0
            if it == cfg.max_iters:
                break
            if stop:  # Ctrl-C in some process: all stop here, after the same step
                if saved != it:
                    save(it)
                raise Interrupted(f"interrupted: {ckpt_path} holds iteration {it}; continue with: "
                                  f"{resume_command(argv, world)}")
            t0 = time.perf_counter()
            lambda_seq = cfg.lambda_seq if it >= cfg.nsp_start else 0.0
            batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives, cfg.seq_len)
            loss, stats = train_step(step_gen, step_embedder, optimizer, params, batch.to(device),
                                     cfg, lambda_seq, lr, ctx, gather=world > 1)
            step_time += time.perf_counter() - t0
            steps += 1
            stop, not_finite = distributed.any_rank(interrupt.set, not torch.isfinite(loss),
                                                  device=device)
            if not_finite:
                raise diverged("the loss is not finite", it)
            if it % 10 == 0:
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in stats.items()})
    if main_process:
        log.close()
        summary(cfg, metrics, chance, ckpt_path)


def load_run(out_dir, device="auto"):
    """A finished run, for sampling and evaluation: (config, Gen, Emb_seq, Data, Tokenizer), the
    models in eval mode on the device."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = read_checkpoint(path, f"train one first (train.py --out_dir {out_dir})")
    try:
        cfg = Config(**ckpt["config"])
    except TypeError:
        raise UserError(f"{path} was written by another version of train.py") from None
    device = pick_device(device)
    data, tok = load_data(cfg)
    check_same_data(ckpt, path, data, tok)
    gen, embedder = build_models(cfg, tok.vocab_size)
    gen.load_state_dict(ckpt["gen"])
    embedder.load_state_dict(ckpt["embedder"])
    return cfg, gen.to(device).eval(), embedder.to(device).eval(), data, tok


def summary(cfg, m, chance, ckpt_path):
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    print(f"\ndone: {m['iter']} iterations, {f(m['ms_per_iter'])} ms/iter")
    print(f"  NTP loss        train {f(m['train_ntp'])}   val {f(m['val_ntp'])}")
    print(f"  NSP loss (val)  {f(m['val_nsp'])}")
    print("  val retrieval against the whole datastore (chance in brackets):")
    for k in ("recall@1", "recall@10", "mrr"):
        print(f"    {k:<10} {f(m[k])}   ({f(chance[k])})")
    print(f"  checkpoint {ckpt_path}, log {os.path.join(cfg.out_dir, 'log.jsonl')}")


if __name__ == "__main__":
    main_guard(main)

"""Every flag with its default and help (train.py's Config, which a checkpoint keeps; sample.py's
and evaluate.py's); the checks that make a bad value a one-line error; the device and precision."""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from machinery.cli import UserError, flag
from machinery.corpora import check_dataset
from machinery.facts import MAX_WORDINGS
from machinery.gpt2 import settle_config as settle_gpt2
from machinery.search import require_index


@dataclass
class Config:
    # data
    dataset: str = flag("facts", "facts, facts_test (another world), pydoc, or a .txt/.jsonl path")
    split: str = flag("sentence", "what a sequence is in text: sentence, line or none (no markers)")
    val_fraction: float = flag(0.1, "share of a .txt/.jsonl/pydoc corpus held out as val (its end)")
    facts_people: int = flag(400, "facts: people in the world (6 facts each)")
    facts_heldout: float = flag(0.2, "facts: share of people whose questions are held out (val)")
    facts_wordings: int = flag(1, "facts: wordings of each question, 1 to 3 (one per document)")
    tokenizer: str = flag("bytes", "bytes, or gpt2 (tiktoken's cache or --gpt2_file)")
    gpt2_file: str = flag("", "a gpt2.tiktoken file or GPT-2 vocab.json (or set COSUP_GPT2_FILE)")
    cache_dir: str = flag("data_cache", "where prepared corpora are cached")
    # Gen
    n_layer: int = flag(2, "Gen: transformer layers")
    n_head: int = flag(4, "Gen: attention heads")
    n_embd: int = flag(128, "Gen: width")
    block_size: int = flag(128, "Gen: context length in tokens (and training window)")
    dropout: float = flag(0.0, "dropout in Gen and Emb_seq")
    gpt2_block: bool = flag(False, "GPT-2's block (biases, tanh GELU) and a causal Emb_seq")
    # Emb_seq
    emb_layer: int = flag(2, "Emb_seq: transformer layers")
    emb_head: int = flag(4, "Emb_seq: attention heads")
    emb_embd: int = flag(64, "Emb_seq: width")
    emb_block_size: int = flag(64, "Emb_seq: longest sequence it reads (longer ones are cut)")
    seq_dim: int = flag(128, "width of queries and sequence embeddings")
    emb_from_gen: bool = flag(False, "when L_NSP joins, Emb_seq starts from Gen's trunk")
    # objective
    lambda_tok: float = flag(1.0, "weight of L_NTP (0: NSP-only training)")
    lambda_seq: float = flag(0.5, "weight of L_NSP (0: NTP-only training)")
    nsp_start: int = flag(300, "iterations of NTP alone before L_NSP joins")
    temperature: float = flag(0.1, "InfoNCE temperature tau")
    hard_negatives: int = flag(2, "hard negatives per marker in L_NSP")
    negatives: str = flag("auto", "where hard negatives come from: corpus (look-alike facts, or "
                                  "neighbouring sentences), lexical (TF-IDF's best candidates), "
                                  "or auto (lexical for text, corpus for facts)")
    first_stage: int = flag(100, "K: the learned score re-ranks TF-IDF's top K (reranked_*)")
    transductive: bool = flag(False, "let val sequences be hard negatives in training")
    # optimisation
    batch_size: int = flag(24, "windows per batch, per process")
    max_iters: int = flag(-1, "training iterations (-1: train.py's RECIPE)")
    learning_rate: float = flag(2e-3, "peak learning rate")
    nsp_lr_scale: float = flag(-1, "learning rate scale of Emb_seq and seq_head (-1: RECIPE)")
    min_lr: float = flag(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(100, "linear warmup iterations")
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices only)")
    beta2: float = flag(0.99, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)")
    # evaluation and i/o
    eval_interval: int = flag(-1, "iterations between evaluations and checkpoints (-1: RECIPE)")
    eval_iters: int = flag(10, "batches per split for the loss estimates")
    out_dir: str = flag("out", "where ckpt.pt and log.jsonl go")
    seed: int = flag(1337, "random seed (weights, batches)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (bfloat16 on a GPU with it, else float32), float32, bfloat16")
    compile: bool = flag(False, "torch.compile the models")
    resume: bool = flag(False, "continue from out_dir/ckpt.pt")
    overwrite: bool = flag(False, "start afresh, removing the run already in out_dir")
    init_from: str = flag("", "start from a base's weights: a run's out_dir (same tokenizer and "
                              "sizes), or a GPT-2's folder (README, Starting from GPT-2)")


def check_config(cfg):
    """Turn a bad value into a one-line error (a -1 that train.py's RECIPE settles is none)."""
    check_dataset(cfg.dataset)  # the inputs before the out_dir: a typo never meets "exists"

    def bad(names, ok, what):
        for name in names:
            v = getattr(cfg, name)
            if not (ok(v) or v == -1 and name in ("max_iters", "eval_interval", "nsp_lr_scale")):
                raise UserError(f"--{name} must be {what}, got {v}")
    bad(("lambda_tok", "lambda_seq"), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    if cfg.lambda_tok == 0 and cfg.lambda_seq == 0:
        raise UserError("--lambda_tok and --lambda_seq are both 0: nothing to train")
    bad(("block_size", "batch_size", "n_layer", "n_head", "n_embd", "emb_layer", "emb_head",
         "emb_embd", "emb_block_size", "seq_dim", "eval_interval", "eval_iters", "temperature",
         "nsp_lr_scale"), lambda v: v > 0, "positive")
    bad(("max_iters", "nsp_start", "hard_negatives", "warmup_iters"), lambda v: v >= 0, ">= 0")
    bad(("first_stage",), lambda v: v >= 1, ">= 1")
    bad(("val_fraction", "facts_heldout"), lambda v: 0 < v < 1, "between 0 and 1")
    bad(("facts_wordings",), lambda v: 1 <= v <= MAX_WORDINGS, f"1 to {MAX_WORDINGS}")
    for width, heads in (("n_embd", "n_head"), ("emb_embd", "emb_head")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise UserError(f"--{width} {getattr(cfg, width)} is not divisible by "
                            f"--{heads} {getattr(cfg, heads)}")
    if cfg.emb_from_gen and (cfg.emb_embd != cfg.n_embd or cfg.emb_head != cfg.n_head
                             or cfg.emb_layer > cfg.n_layer
                             or cfg.emb_block_size > cfg.block_size):
        raise UserError("--emb_from_gen needs --emb_embd = --n_embd, --emb_head = --n_head, "
                        "--emb_layer <= --n_layer and --emb_block_size <= --block_size")
    for name, choices in (("negatives", ("auto", "corpus", "lexical")),
                          ("split", ("sentence", "line", "none")),
                          ("dtype", ("auto", "float32", "bfloat16"))):
        if getattr(cfg, name) not in choices:
            raise UserError(f"--{name} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                            f"got {getattr(cfg, name)!r}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if cfg.init_from:  # a GPT-2 gives the tokenizer and the sizes (machinery/gpt2.py)
        settle_gpt2(cfg)


def pick_device(name):
    """The device a --device flag names ("auto": a GPU where there is one)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return next(kind for kind, ok in available.items() if ok)
    kind = name.split(":")[0]
    if kind not in available:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise UserError(f"device {name!r} is not available on this machine")
    return name


def autocast(device, dtype):
    """bfloat16 autocast on a GPU; plain float32 elsewhere (CPU autocast is slower than fp32)."""
    kind = device.split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=torch.bfloat16)


@dataclass
class RunFlags:  # what sample.py and evaluate.py share: the run, the device, the search
    out_dir: str = flag("out", "the trained run")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    index: str = flag("auto", "how retrieval searches the datastore: exact, faiss (approximate, "
                              "for millions of entries; pip install faiss-cpu), first_stage "
                              "(re-rank TF-IDF's top K), or auto (first_stage on text, exact on "
                              "facts)")


@dataclass
class SampleConfig(RunFlags):
    prompt: str = flag(None, "text to continue (\\n for a newline); default: the first held-out "
                             "document up to its first marker")
    prompt_file: str = flag("", "read the prompt from this file instead")
    num_samples: int = flag(1, "how many samples")
    max_new_tokens: int = flag(200, "tokens to add, inserted sequences included")
    temperature: float = flag(0.0, "sampling temperature (0: greedy)")
    top_k: int = flag(0, "sample from the k most likely tokens only (0: all)")
    seed: int = flag(1337, "random seed")
    retrieve: bool = flag(True, "retrieval in the loop (where the run's --lambda_seq is above 0)")
    show_retrieval: int = flag(0, "also list the next K datastore entries at each retrieval")


def check_sample_config(args):
    if args.max_new_tokens <= 0 or args.num_samples <= 0:
        raise UserError("--max_new_tokens and --num_samples must be positive")
    if args.temperature < 0 or args.top_k < 0 or args.show_retrieval < 0:
        raise UserError("--temperature, --top_k and --show_retrieval must be >= 0")
    if args.prompt == "":
        raise UserError("--prompt is empty: give some text, or leave --prompt out to continue a "
                        "held-out document")
    require_index(args.index)


@dataclass
class EvalConfig(RunFlags):
    query_from: str = flag("", "another run whose Gen makes the queries and whose Emb_seq "
                               "embeds the datastore (separate supervision)")
    questions: int = flag(480, "documents per split for the answer metrics (0: none)")
    batch_size: int = flag(256, "questions answered at once (batched greedy decoding)")


def check_eval_config(args):
    if args.questions < 0 or args.batch_size < 1:
        raise UserError(f"--questions must be >= 0 and --batch_size >= 1, got {args.questions} "
                        f"and {args.batch_size}")
    require_index(args.index)

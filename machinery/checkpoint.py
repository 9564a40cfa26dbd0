"""A run's out_dir: ckpt.pt written whole, read back with one-line errors; log.jsonl; the
random streams that let --resume go on exactly. What a checkpoint holds is train.py's."""

import glob
import json
import os

import torch

from machinery import distributed, gpt2
from machinery.cli import UserError

# What a run leaves in its out_dir: --overwrite removes these; any other file is the user's.
RUN_FILES = ("ckpt.pt", "ckpt.pt.tmp", "log.jsonl", "log.jsonl.tmp", "curves.png", "curves.png.tmp",
             "eval.json", "eval_*.json", "datastore.pt", "datastore.pt.tmp", "provenance.json")
CHECKPOINT_KEYS = ("gen", "embedder", "optimizer", "config", "gen_config", "embedder_config",
                   "tokenizer", "data_fingerprint", "iter", "metrics", "rng", "provenance")
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "emb_layer", "emb_head", "emb_embd",
               "emb_block_size", "seq_dim", "gpt2_block")


def check_out_dir(cfg):
    """Before anything is prepared: never replace another run's checkpoint by accident."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir {cfg.out_dir} is a file, not a directory")
    if os.path.exists(path) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{path} already exists: pass --resume to continue it or --overwrite to "
                        "start over")


def open_log(cfg, start):
    """log.jsonl to write; --overwrite removes the old run's files, --resume the records after
    start (a run killed before saving logged them)."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir {cfg.out_dir}: {e.strerror}") from None
    for name in RUN_FILES if cfg.overwrite else ():
        for old in glob.glob(os.path.join(glob.escape(cfg.out_dir), name)):
            os.remove(old)
    if cfg.resume and os.path.exists(path):
        records, _ = read_jsonl(path)  # and a line a crash cut goes
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["iter"] <= start)
        os.replace(path + ".tmp", path)
    return open(path, "a" if cfg.resume else "w")


def save_checkpoint(path, **state):
    """Written to a temporary file, flushed, then renamed: a crash leaves the last one whole."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def rng_states(rng, device):
    """Every process's random streams, its batches' (numpy) and dropout's (torch), by rank."""
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return distributed.all_gather_objects(state)


def set_rng_states(states, rng, device):
    """This process's streams as rng_states saved them (a process added since keeps its own)."""
    if distributed.rank() < len(states):
        state = states[distributed.rank()]
        rng.bit_generator.state = state["numpy"]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda"], device)


def read_jsonl(path):
    """The records of a JSON-lines file, and the numbers of the lines a crash cut (skipped)."""
    records, broken = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                broken.append(n)
    return records, broken


def read_checkpoint(path, missing):
    """The checkpoint at path, or a one-line error (`missing`: what to do where there is none)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for key in CHECKPOINT_KEYS:
            ckpt[key]
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it is cut "
                        "short or not from train.py; train again (--overwrite)") from None
    return ckpt


def check_same_data(ckpt, path, data, tok):
    """A checkpoint is only used with the data and tokenizer it was trained on."""
    if (ckpt["data_fingerprint"] != data.fingerprint
            or ckpt["tokenizer"]["fingerprint"] != tok.fingerprint):
        trained = ckpt["config"]
        raise UserError(f"{path} was trained on other data or another tokenizer (--dataset "
                        f"{trained['dataset']} --tokenizer {trained['tokenizer']}) than this run's")


def resume(path, cfg, data, tok):
    """The checkpoint --resume continues: rank 0 reads it, every process gets it."""
    ckpt = distributed.broadcast_object(
        read_checkpoint(path, "nothing to --resume") if distributed.rank() == 0 else None)
    check_same_data(ckpt, path, data, tok)
    trained = ckpt["config"]
    other = [f"--{k} {trained[k]}" for k in MODEL_SHAPE if trained[k] != getattr(cfg, k)]
    if other:
        raise UserError(f"{path} holds models of another shape: resume with {' '.join(other)}")
    return ckpt


def init_from(path, cfg, gen, embedder, tok):
    """Weights from a run's out_dir (same tokenizer and sizes) or a GPT-2's; their provenance."""
    if gpt2.is_gpt2(path):
        return gpt2.load(path, gen, embedder, tok)
    ckpt = read_checkpoint(os.path.join(path, "ckpt.pt"),
                           "--init_from takes the out_dir of a trained run, or a GPT-2 "
                           "folder with config.json (README, Starting from GPT-2)")
    trained = ckpt["config"]
    differ = [f"--{k} {trained[k]} (this run: {getattr(cfg, k)})" for k in MODEL_SHAPE
              if trained[k] != getattr(cfg, k)]
    if ckpt["tokenizer"]["fingerprint"] != tok.fingerprint:
        other = "another file" if trained["tokenizer"] == cfg.tokenizer else cfg.tokenizer
        differ.insert(0, f"--tokenizer {trained['tokenizer']} (this run: {other})")
    if differ:
        raise UserError(f"{path} holds models of another shape or tokenizer: {' '.join(differ)}")
    gen.load_state_dict(ckpt["gen"])
    embedder.load_state_dict(ckpt["embedder"])
    return {"out_dir": os.path.abspath(path), **ckpt["provenance"]}

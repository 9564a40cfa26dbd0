"""
The checkpoint, out_dir/ckpt.pt: Gen, Emb_seq, the optimizer, the config, the tokenizer and data
fingerprints, the iteration, the last evaluation and every process's random streams. It is
written whole or not at all, and --resume continues from it exactly: a run stopped at iteration k
and resumed reaches the same losses as one that never stopped (tests/test_resume.py). load_run
gives sample.py and evaluate.py a finished run.
"""

import json
import os

import torch

from data import load_data
from machinery import datastore_file, distributed, gpt2
from machinery.cli import UserError
from machinery.config import Config, build_models, pick_device


def save_checkpoint(path, **state):
    """Write to a temporary file, flush it to disk, then rename: a crash (or a power cut) mid-save
    leaves the last checkpoint whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(rng, device):
    """Where this process's random streams are: its batches (numpy) and dropout (torch)."""
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def read_jsonl(path):
    """The records of a JSON-lines file (a log, results/runs.jsonl), and the numbers of the lines
    that are not whole records: a line cut short by a crash is skipped, not fatal."""
    records, broken = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                broken.append(n)
    return records, broken


def keep_log_until(path, last):
    """A resumed run's log: the records up to its checkpoint's iteration. A run killed after it
    logged an evaluation but before it saved that checkpoint (or in the middle of a line) would
    otherwise log that iteration twice."""
    if not os.path.exists(path):
        return
    records, _ = read_jsonl(path)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r["iter"] <= last)
    os.replace(path + ".tmp", path)


def check_same_data(ckpt, path, data, tok):
    """A checkpoint is only used with the data and tokenizer it was trained on."""
    if (ckpt["data_fingerprint"] != data.fingerprint
            or ckpt["tokenizer"]["fingerprint"] != tok.fingerprint):
        trained = ckpt["config"]
        raise UserError(f"{path} was trained on other data or another tokenizer (--dataset "
                        f"{trained['dataset']} --tokenizer {trained['tokenizer']}) than this run's")


MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "emb_layer", "emb_head", "emb_embd",
               "emb_block_size", "seq_dim", "gpt2_block")
CHECKPOINT_KEYS = ("gen", "embedder", "optimizer", "config", "gen_config", "embedder_config",
                   "tokenizer", "data_fingerprint", "iter", "metrics", "rng")


def read_checkpoint(path, missing):
    """The checkpoint at path, whole, or a one-line error: none there (`missing` says what to do),
    or a file that is not a complete checkpoint of this program."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for key in CHECKPOINT_KEYS:
            ckpt[key]
        if "seq_len" in ckpt["config"]:  # written when --emb_block_size was called --seq_len
            ckpt["config"]["emb_block_size"] = ckpt["config"].pop("seq_len")
            ckpt["embedder_config"]["block_size"] = ckpt["embedder_config"].pop("seq_len")
        ckpt["config"].setdefault("gpt2_block", False)  # written before --gpt2_block
        if "provenance" not in ckpt:  # written before runs recorded it: what the rest says
            ckpt["provenance"] = {"dataset": ckpt["config"]["dataset"],
                                  "data_fingerprint": ckpt["data_fingerprint"],
                                  "tokenizer": ckpt["tokenizer"]["name"], "iters": ckpt["iter"],
                                  "base": ckpt["config"]["init_from"] or None}
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it is cut "
                        "short or not from train.py; train again (--overwrite)") from None
    return ckpt


def check_shape(ckpt, path, cfg, what):
    trained = ckpt["config"]
    other = [f"--{k} {trained[k]}" for k in MODEL_SHAPE if trained[k] != getattr(cfg, k)]
    if other:
        raise UserError(f"{path} holds models of another shape: {what} with {' '.join(other)}")


def check_base(ckpt, path, cfg, tok):
    """A base fits a new run when its tokenizer and its models' sizes are the run's, whatever data
    it was trained on; a one-line error names what differs."""
    trained = ckpt["config"]
    differ = [f"--{k} {trained[k]} (this run: {getattr(cfg, k)})" for k in MODEL_SHAPE
              if trained[k] != getattr(cfg, k)]
    if ckpt["tokenizer"]["fingerprint"] != tok.fingerprint:
        other = "another file" if trained["tokenizer"] == cfg.tokenizer else cfg.tokenizer
        differ.insert(0, f"--tokenizer {trained['tokenizer']} (this run: {other})")
    if differ:
        raise UserError(f"{path} holds models of another shape or tokenizer: {' '.join(differ)}")


def provenance(cfg, data, tok, it, base):
    """What a run was trained on: its data (name, fingerprint, size), tokenizer, iterations, and
    its base (--init_from: the base's folder and its own provenance; None from scratch). Kept in
    the checkpoint and, readable, in out_dir/provenance.json."""
    return {"dataset": cfg.dataset, "data_fingerprint": data.fingerprint,
            "train_tokens": len(data.train.ids), "sequences": data.n_sequences,
            "tokenizer": tok.name, "iters": it, "base": base}


def init_from(path, cfg, gen, embedder, data, tok):
    """Only Gen's and Emb_seq's weights, for a new run (train.py --init_from): a base trained on
    any data (e.g. a larger text, or an NTP-only run), or GPT-2 (machinery/gpt2.py), as the
    paper starts from Llama-2; this run's datastore, TF-IDF and first stage are its own data's.
    Returns the base's provenance."""
    folder = gpt2.find(path)
    if folder:
        return gpt2.load(folder, gen, embedder, tok)
    ckpt = read_checkpoint(os.path.join(path, "ckpt.pt"),
                           "--init_from takes the out_dir of a trained run, or a GPT-2 "
                           "checkpoint (README, Starting from GPT-2)")
    check_base(ckpt, path, cfg, tok)
    gen.load_state_dict(ckpt["gen"])
    embedder.load_state_dict(ckpt["embedder"])
    return {"out_dir": os.path.abspath(path), **ckpt["provenance"]}


def resume(path, cfg, gen, embedder, optimizer, rng, data, tok, device):
    """Load the checkpoint into the models, the optimizer and this process's random streams, so
    that training goes on exactly as if it had never stopped. Rank 0 reads it and hands it to the
    other processes. Returns (its iteration, the metrics of its last evaluation, its base)."""
    ckpt = distributed.broadcast_object(
        read_checkpoint(path, "nothing to --resume") if distributed.rank() == 0 else None)
    check_same_data(ckpt, path, data, tok)
    check_shape(ckpt, path, cfg, "resume")
    gen.load_state_dict(ckpt["gen"])
    embedder.load_state_dict(ckpt["embedder"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rank, states = distributed.rank(), ckpt["rng"]
    if isinstance(states, dict):  # written before torchrun support: one process's, as a dict
        states = [states]
    if len(states) != distributed.world_size() and rank == 0:
        print(f"note: {path} was written by {len(states)} processes, this run has "
              f"{distributed.world_size()}: the order of batches does not go on exactly")
    if rank < len(states):
        rng.bit_generator.state = states[rank]["numpy"]
        torch.set_rng_state(states[rank]["torch"])
        if "cuda" in states[rank] and device.startswith("cuda"):
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    return ckpt["iter"], ckpt["metrics"], ckpt["provenance"]["base"]


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


def load_query_from(other, out_dir, data, device="auto"):
    """evaluate.py --query_from OTHER (separate supervision): OTHER's Gen, which makes the
    queries, and a datastore of OTHER's Emb_seq: OTHER's own if it is fresh, else one in memory
    (OTHER's folder is only read). Returns (that Gen, the datastore, the path of the result)."""
    _, query_gen, retriever, other_data, _ = load_run(other, device)
    if other_data.fingerprint != data.fingerprint:
        raise UserError(f"{other} was trained on other data than {out_dir}")
    datastore = (datastore_file.load(os.path.join(other, "datastore.pt"), retriever, data)
                 or datastore_file.build(retriever, data))
    name = os.path.basename(os.path.normpath(other))
    return query_gen, datastore, os.path.join(out_dir, f"eval_query_from_{name}.json")


def eval_inputs(query_from, out_dir, embedder, data, device="auto"):
    """evaluate.py's Gen that makes the queries (None: the run's own), its datastore and the path
    of the result: the run's datastore (out_dir/datastore.pt, built if missing or stale) and
    out_dir/eval.json; with query_from OTHER, load_query_from's."""
    if query_from:  # OTHER's Gen queries a datastore of OTHER's Emb_seq
        return load_query_from(query_from, out_dir, data, device)
    datastore = datastore_file.load_or_build(os.path.join(out_dir, "datastore.pt"), embedder, data)
    return None, datastore, os.path.join(out_dir, "eval.json")

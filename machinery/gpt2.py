"""--init_from a GPT-2's folder (config.json, model.safetensors, vocab.json, as Hugging Face's
download writes it): Gen and Emb_seq start from its weights, read from disk only."""

import dataclasses
import json
import os

import torch

from machinery.cli import UserError
from machinery.tokenizer import GPT2_FILE_ENV

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_gpt2(path):
    """A folder with config.json: a GPT-2's, not a run's out_dir (checkpoint.init_from)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def read_config(folder):
    """The sizes in folder's config.json; a one-line error where it is not a GPT-2's."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        sizes = {k: int(config[k]) for k in ("n_layer", "n_head", "n_embd", "n_positions",
                                             "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a GPT-2 config.json ({type(e).__name__})") from None
    block = (config.get("model_type"), config.get("activation_function", "gelu_new"),
             config.get("layer_norm_epsilon", 1e-5), config.get("n_inner") or 4 * sizes["n_embd"])
    if block != ("gpt2", "gelu_new", 1e-5, 4 * sizes["n_embd"]):
        raise UserError(f"{path}: model_type, activation_function, layer_norm_epsilon, n_inner "
                        f"{block} are not GPT-2's (gpt2, gelu_new, 1e-5, 4 x n_embd)")
    return sizes


def settle_config(cfg):
    """The tokenizer and both networks' sizes are the GPT-2's; a flag set otherwise, an error."""
    folder = cfg.init_from
    if not is_gpt2(folder):
        return
    sizes = read_config(folder)
    layers, heads, width = sizes["n_layer"], sizes["n_head"], sizes["n_embd"]
    settled = {"tokenizer": "gpt2", "gpt2_block": True, "n_layer": layers, "n_head": heads,
               "n_embd": width, "emb_layer": layers, "emb_head": heads, "emb_embd": width}
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, value in settled.items():
        if getattr(cfg, name) not in (default[name], value):
            raise UserError(f"--init_from {cfg.init_from} sets --{name} {value} (its "
                            f"config.json): leave --{name} out")
        setattr(cfg, name, value)
    vocab = os.path.join(folder, "vocab.json")  # the download's own BPE, unless one is given
    if not (cfg.gpt2_file or os.environ.get(GPT2_FILE_ENV)) and os.path.isfile(vocab):
        cfg.gpt2_file = vocab
    for name in ("block_size", "emb_block_size"):
        if getattr(cfg, name) > sizes["n_positions"]:
            raise UserError(f"--{name} {getattr(cfg, name)} is above the {sizes['n_positions']} "
                            f"positions of --init_from {cfg.init_from}")


def read_weights(path):
    """model.safetensors' tensors by name, less a "transformer." prefix."""
    if not os.path.isfile(path):
        raise UserError(f"{os.path.dirname(path)} has config.json but no model.safetensors "
                        "(README, Starting from GPT-2, says how to get one)")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {path} needs the safetensors package: pip install "
                        "safetensors") from None
    return {name.removeprefix("transformer."): w for name, w in load_file(path).items()}


@torch.no_grad()
def load(folder, gen, embedder, tok):
    """GPT-2's weights into Gen's trunk (and lm_head, tied to it), the marker's row the mean of
    GPT-2's rows; then Emb_seq's trunk from Gen's. Returns the base's provenance."""
    sizes = read_config(folder)
    if sizes["vocab_size"] != tok.eod + 1:  # GPT-2's tokens, <|endoftext|> last
        raise UserError(f"{folder} has a vocabulary of {sizes['vocab_size']:,} tokens, the GPT-2 "
                        f"BPE read here {tok.eod + 1:,}: not the tokenizer it was trained with "
                        "(--gpt2_file)")
    path = os.path.join(folder, "model.safetensors")
    weights = read_weights(path)
    for name, p in gen.transformer.state_dict().items():
        theirs = name.replace("blocks.", "h.")
        w = weights[theirs].float()
        if theirs.endswith(CONV1D):
            w = w.t()                                           # Conv1D's (in, out) -> (out, in)
        if name == "wpe.weight":
            w = w[:p.shape[0]]                                  # the first block_size positions
        if name == "wte.weight":
            w = torch.cat([w, w.mean(0, keepdim=True)])         # (vocab + 1, n_embd): the marker
        p.copy_(w)
    embedder.start_from(gen)
    return {"gpt2": os.path.abspath(folder), "weights": os.path.basename(path),
            "bytes": os.path.getsize(path), **sizes}

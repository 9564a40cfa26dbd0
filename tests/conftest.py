import base64
import json
import os

import pytest

import train
from machinery.config import Config

# A world and models small enough that a training run takes seconds on 2 CPU cores.
TINY = ["--facts_people", "60", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--emb_layer", "1", "--emb_head", "2", "--emb_embd", "32", "--seq_dim", "32",
        "--block_size", "96", "--batch_size", "8", "--eval_iters", "2", "--warmup_iters", "5",
        "--nsp_start", "0"]  # a few steps: L_NSP from the first (the default waits 300)


def pytest_configure(config):
    config.addinivalue_line("markers", "draws: the test looks at curves.png, so training draws it")


@pytest.fixture(autouse=True)
def no_drawing(request, monkeypatch):
    """Drawing curves.png costs about half a second a time, most of a tiny run, and only the tests
    marked `draws` look at it: elsewhere training skips it (in this process; subprocesses draw)."""
    if "draws" not in request.keywords:
        monkeypatch.setattr("train.plot_run", lambda *args, **kwargs: None)


@pytest.fixture
def run_train(tmp_path):
    """Run train.main in-process on the tiny config; returns (out_dir, list of log records).
    Each `name` is its own out_dir: a second run into one needs --resume or --overwrite."""
    def run(*args, name="run"):
        out = tmp_path / name
        train.main(TINY + ["--out_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *args])
        with open(out / "log.jsonl") as f:
            return out, [json.loads(line) for line in f]
    return run


@pytest.fixture
def tiny_data(tmp_path):
    """The tiny facts corpus, prepared, with its tokenizer."""
    from data import load_data
    cfg = Config(facts_people=60, block_size=96, cache_dir=str(tmp_path / "cache"))
    return load_data(cfg)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_tiktoken(path, merges=(b"th", b"he", b" the")):
    """A valid .tiktoken file (each line: the base64 of a token's bytes, its rank): the 256 single
    bytes, so that any text encodes, then `merges`."""
    tokens = [bytes([i]) for i in range(256)] + list(merges)
    return write(str(path), "".join(f"{base64.b64encode(t).decode()} {r}\n"
                                     for r, t in enumerate(tokens)))

"""--init_from a GPT-2 checkpoint against a reference not written here: Hugging Face's GPT-2 of
random weights, saved as a download leaves it, read by machinery/gpt2.py; cosup's logits are
the reference's. Needs `transformers` (an optional test dependency, as .ci/run installs it)."""
import json
import sys

import pytest
import torch

import sample
import train
from machinery.checkpoint import init_from
from machinery.cli import UserError
from machinery.config import Config, check_config
from machinery.tokenizer import Tokenizer
from train import build_models
from conftest import write_tiktoken

transformers = pytest.importorskip("transformers", reason="the reference GPT-2 is transformers'")

VOCAB = 260  # write_tiktoken's 256 bytes and 3 merges, then <|endoftext|>: a GPT-2 BPE in small


def reference(folder):
    """A GPT-2 of 2 layers, width 32 and 64 positions, every weight random (biases and norms
    too, so that each is seen to be read), saved into folder as model.safetensors."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def bpe(tmp_path):
    return write_tiktoken(tmp_path / "gpt2.tiktoken")


def loaded(folder, bpe, *flags):
    """Gen and Emb_seq of a config that --init_from folder settles, the checkpoint read in."""
    cfg = Config(init_from=str(folder), gpt2_file=bpe, block_size=64, emb_block_size=32)
    for name, value in flags:
        setattr(cfg, name, value)
    check_config(cfg)
    tok = Tokenizer(cfg.tokenizer, cfg.gpt2_file)
    gen, embedder = build_models(cfg, tok.vocab_size)
    base = init_from(str(folder), cfg, gen, embedder, tok)
    return cfg, tok, gen.eval(), embedder.eval(), base


def test_gens_logits_are_gpt2s(tmp_path, bpe):
    ref = reference(tmp_path / "gpt2")
    cfg, tok, gen, _, base = loaded(tmp_path / "gpt2", bpe)
    assert (cfg.tokenizer, cfg.gpt2_block, cfg.n_layer, cfg.n_embd, cfg.emb_layer) == (
        "gpt2", True, 2, 32, 2)
    assert tok.vocab_size == VOCAB + 1 and tok.eod == VOCAB - 1  # the marker: one row more
    idx = torch.randint(0, VOCAB, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, want = gen(idx)[0], ref(idx).logits                       # (3, 64, V+1), (3, 64, V)
    assert torch.allclose(ours[..., :VOCAB], want, atol=1e-4, rtol=1e-4)
    # the marker's embedding row is new: the mean of GPT-2's rows
    wte = gen.transformer.wte.weight
    assert torch.allclose(wte[tok.marker], wte[:VOCAB].mean(0))
    assert base["weights"] == "model.safetensors" and base["n_layer"] == 2


def test_emb_seqs_trunk_is_gens_and_reads_causally(tmp_path, bpe):
    reference(tmp_path / "gpt2")
    _, _, gen, embedder, _ = loaded(tmp_path / "gpt2", bpe)
    ours, theirs = embedder.transformer.state_dict(), gen.transformer.state_dict()
    for name, p in ours.items():
        assert torch.equal(p, theirs[name][:p.shape[0]]), name  # wpe: its first 32 positions
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():  # GPT-2's states, as Gen computes them
        assert torch.allclose(embedder.transformer(tokens, key_mask=mask),
                              gen.transformer(tokens), atol=1e-5)
        # pooled by position: token i (from 1) weighs i; padding after a sequence changes nothing
        mask[0, 10:] = False
        h = gen.transformer(tokens[:1, :10])[0]                             # (10, n_embd)
        pooled = (torch.arange(1, 11.0)[:, None] * h).sum(0) / 55           # 1 + 2 + ... + 10
        want = torch.nn.functional.normalize(embedder.proj(pooled), dim=-1)
        assert torch.allclose(embedder.embed_tokens(tokens, mask)[0], want, atol=1e-5)


def test_training_sampling_and_provenance_from_a_gpt2(tmp_path, bpe, capsys):
    reference(tmp_path / "gpt2")
    out = tmp_path / "run"
    argv = ["--init_from", str(tmp_path / "gpt2"), "--gpt2_file", bpe, "--facts_people", "60",
            "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "4",
            "--block_size", "64", "--emb_block_size", "32", "--nsp_start", "0", "--out_dir",
            str(out), "--cache_dir", str(tmp_path / "cache")]
    train.main(argv)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 2] and all(r["train_nsp"] > 0 for r in log)
    record = json.loads((out / "provenance.json").read_text())
    assert record["base"]["gpt2"] == str(tmp_path / "gpt2") and record["tokenizer"] == "gpt2"
    capsys.readouterr()
    sample.main(["--out_dir", str(out), "--max_new_tokens", "10"])  # without the GPT-2 folder
    assert capsys.readouterr().out.strip()
    # the command an interrupted run prints to go on: its own, with --resume
    train.main(argv + ["--resume", "--max_iters", "4"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 2, 4]
    assert json.loads((out / "provenance.json").read_text())["base"] == record["base"]


def test_the_checkpoints_own_vocab_json_is_its_tokenizer(tmp_path, bpe, monkeypatch):
    """A download's folder holds GPT-2's BPE as vocab.json: --init_from reads it there when no
    --gpt2_file is given."""
    monkeypatch.delenv("COSUP_GPT2_FILE", raising=False)
    reference(tmp_path / "gpt2")
    ranks = Tokenizer("gpt2", bpe).enc._mergeable_ranks
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char = {b: chr(b) for b in printable} | {
        b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)}
    vocab = {"".join(char[b] for b in t): r for t, r in ranks.items()}
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 259}))
    cfg = Config(init_from=str(tmp_path / "gpt2"), block_size=64, emb_block_size=32)
    check_config(cfg)
    assert cfg.gpt2_file == str(tmp_path / "gpt2" / "vocab.json")
    assert Tokenizer(cfg.tokenizer, cfg.gpt2_file).enc._mergeable_ranks == ranks


def test_a_runs_out_dir_is_not_a_gpt2(tmp_path):
    from machinery import gpt2
    reference(tmp_path / "gpt2")
    assert gpt2.is_gpt2(str(tmp_path / "gpt2"))
    assert not gpt2.is_gpt2(str(tmp_path / "elsewhere"))  # a run's out_dir: not GPT-2's


@pytest.mark.parametrize("args, message", [
    (["--init_from", "{d}/nothing"], "no checkpoint at {d}/nothing/ckpt.pt"),
    (["--init_from", "{d}/gpt2", "--gpt2_file", "{d}/other.tiktoken"],
     "vocabulary of 260 tokens, the GPT-2 BPE read here 261"),
    (["--init_from", "{d}/gpt2", "--block_size", "128"],
     "--block_size 128 is above the 64 positions of --init_from {d}/gpt2"),
    (["--init_from", "{d}/gpt2", "--n_embd", "64"], "sets --n_embd 32 (its config.json)"),
    (["--init_from", "{d}/weightless"], "{d}/weightless has config.json but no model.safetensors"),
    (["--init_from", "{d}/bert"], "are not GPT-2's")])
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, bpe, args, message):
    reference(tmp_path / "gpt2")
    write_tiktoken(tmp_path / "other.tiktoken", merges=(b"th", b"he", b" the", b"an"))
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text(
        (tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(
        {"model_type": "bert", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
         "vocab_size": VOCAB}))
    d = str(tmp_path)
    fixed = ["--max_iters", "0", "--facts_people", "60", "--emb_block_size", "32", "--out_dir",
             f"{d}/run", "--cache_dir", f"{d}/cache", "--block_size", "64", "--gpt2_file", bpe]
    with pytest.raises(UserError) as e:  # the last of a flag given twice counts
        train.main(fixed + [a.replace("{d}", d) for a in args])
    assert message.replace("{d}", d) in str(e.value) and "\n" not in str(e.value)


def test_without_the_safetensors_package_one_line_says_what_to_install(tmp_path, monkeypatch):
    from machinery import gpt2
    reference(tmp_path / "gpt2")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # not installed
    with pytest.raises(UserError, match="needs the safetensors package: pip install safetensors"):
        gpt2.read_weights(str(tmp_path / "gpt2" / "model.safetensors"))

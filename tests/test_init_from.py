"""train.py --init_from a base trained on other data: its weights, the new text's datastore, a
one-line refusal when tokenizer or sizes differ, and what each run folder says it was trained on."""
import json

import pytest
import torch

from train import load_run
from machinery.cli import UserError
from conftest import write, write_tiktoken


@pytest.fixture
def base(run_train):
    """A tiny run on the built-in facts world: the base."""
    out, _ = run_train("--max_iters", "4", "--eval_interval", "4", name="base")
    return out


def boxes(tmp_path):
    """Another corpus, a small text no fact of the base is in."""
    lines = [f"Box {i} holds a {['red', 'blue', 'green'][i % 3]} ball number {i * 7}."
             for i in range(80)]
    return write(str(tmp_path / "boxes.txt"), "\n".join(lines) + "\n")


def test_a_base_trained_on_other_data_starts_a_run_on_a_new_text(base, run_train, tmp_path):
    text = boxes(tmp_path)
    out, _ = run_train("--dataset", text, "--max_iters", "0", "--init_from", str(base),
                       name="tuned")
    ckpt_base, ckpt = (torch.load(d / "ckpt.pt", weights_only=False) for d in (base, out))
    for part in ("gen", "embedder"):
        for name, p in ckpt_base[part].items():
            assert torch.equal(p, ckpt[part][name]), name
    # the datastore (and TF-IDF's first stage, built from the same data) is the new text's
    _, _, _, data, _ = load_run(str(out), "cpu")
    _, _, _, base_data, _ = load_run(str(base), "cpu")
    assert data.fingerprint == ckpt["data_fingerprint"] != base_data.fingerprint
    assert data.n_sequences == 80 and base_data.n_sequences == 360  # 60 people x 6 facts


def test_a_base_of_another_size_or_tokenizer_is_refused_in_one_line(base, run_train, tmp_path):
    bpe = write_tiktoken(tmp_path / "gpt2.tiktoken")
    for args, named in ((["--n_embd", "64"], "--n_embd 32 (this run: 64)"),
                        (["--emb_layer", "2", "--block_size", "64"],
                         "--block_size 96 (this run: 64) --emb_layer 1 (this run: 2)"),
                        (["--tokenizer", "gpt2", "--gpt2_file", bpe],
                         "--tokenizer bytes (this run: gpt2)")):
        with pytest.raises(UserError) as e:
            run_train("--dataset", boxes(tmp_path), "--init_from", str(base), *args, name="other")
        assert named in str(e.value) and "\n" not in str(e.value)


def test_each_run_folder_says_what_it_was_trained_on_and_from_which_base(base, run_train,
                                                                         tmp_path):
    out, _ = run_train("--dataset", boxes(tmp_path), "--max_iters", "2", "--eval_interval", "2",
                       "--init_from", str(base), name="tuned")
    record = json.loads((base / "provenance.json").read_text())
    ckpt_base = torch.load(base / "ckpt.pt", weights_only=False)
    assert record == ckpt_base["provenance"]
    assert record["dataset"] == "facts" and record["iters"] == 4 and record["base"] is None
    assert record["data_fingerprint"] == ckpt_base["data_fingerprint"]
    assert record["tokenizer"] == "bytes" and record["train_tokens"] > 0
    tuned = json.loads((out / "provenance.json").read_text())
    assert tuned["dataset"].endswith("boxes.txt") and tuned["iters"] == 2
    assert tuned["base"] == {"out_dir": str(base), **record}  # the base's own record, whole
    # a resumed run keeps its base
    _, _ = run_train("--dataset", boxes(tmp_path), "--max_iters", "4", "--eval_interval", "2",
                     "--resume", name="tuned")
    again = json.loads((out / "provenance.json").read_text())
    assert again["iters"] == 4 and again["base"] == tuned["base"]

import numpy as np
import pytest

from machinery.cli import UserError
from data import Data
from machinery.corpora import Segment, load_corpus
from machinery.prepare import prepare
from machinery.tokenizer import Tokenizer
from conftest import write, write_tiktoken

TEXT = ("The cat sat on the mat. It was warm! Was it? Then the dog came in.\n\n"
        "A second paragraph starts here. It has three sentences. The end is near.\n"
        "Last words of the file. Really the last.")


def test_tokenizer_round_trips_any_unicode():
    tok = Tokenizer("bytes")
    rng = np.random.default_rng(0)
    # every plane of Unicode, without the surrogates (which UTF-8 cannot encode)
    points = rng.integers(1, 0x10FFFF, 2000)
    text = "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF) + " 日本語 😀 é\n\t<|ret|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.marker not in ids and tok.eod not in ids  # a literal "<|ret|>" stays text


def test_gpt2_without_its_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache; offline here
    monkeypatch.delenv("COSUP_GPT2_FILE", raising=False)
    with pytest.raises(UserError, match="gpt2_file"):
        Tokenizer("gpt2")
    with pytest.raises(UserError, match="not found"):
        Tokenizer("gpt2", str(tmp_path / "missing.tiktoken"))


def test_gpt2_from_a_local_tiktoken_file(tmp_path):
    path = write_tiktoken(tmp_path / "gpt2.tiktoken", merges=[b"th", b" the"])  # " the": no merge
    tok = Tokenizer("gpt2", path)
    assert tok.vocab_size == 260 and tok.marker == 259
    assert 256 in tok.encode("this") and tok.decode(tok.encode("this")) == "this"
    write_tiktoken(path, merges=[b"hi"])  # the file changed: its new table, not a cached copy
    assert Tokenizer("gpt2", path).encode("this") == [ord("t"), 256, ord("s")]


def _prepared(tmp_path, corpus, block_size=16):
    tok = Tokenizer("bytes")
    return Data(prepare(corpus, tok, str(tmp_path / "cache")), block_size), tok


def test_marker_targets_are_the_tokens_that_follow_the_marker(tiny_data):
    data, tok = tiny_data
    for split in (data.train, data.val):
        for pos, target in zip(split.marker_pos, split.marker_target):
            assert split.ids[pos] == tok.marker
            seq = data.sequence(target)
            assert np.array_equal(split.ids[pos + 1:pos + 1 + len(seq)], seq)


def test_text_file_sequences_are_sentences_and_splits_share_none(tmp_path):
    text = "\n".join([TEXT] * 3) + " Only val has this one."  # repeated sentences: val must not retrieve what train wrote
    path = write(str(tmp_path / "t.txt"), text)
    corpus = load_corpus(path, "sentence", val_fraction=0.3)
    data, tok = _prepared(tmp_path, corpus)
    # the token stream, markers removed, is exactly the file
    stream = tok.decode([t for t in data.train.ids if t < 256]) + tok.decode(
        [t for t in data.val.ids if t < 256])
    assert stream == text
    train_text = tok.decode([t for t in data.train.ids if t < 256])
    for target in data.val.marker_target:
        assert tok.decode(data.sequence(target)) not in train_text
    assert len(data.val.marker_target) > 0
    assert tok.decode(data.sequence(data.train.marker_target[1])) == "It was warm!"


def test_facts_splits_share_no_sequence_and_no_person():
    corpus = load_corpus("facts", facts_people=50, facts_heldout=0.2)
    train = {s.text for d in corpus.train for s in d if s.sequence}
    val = {s.text for d in corpus.val for s in d if s.sequence}
    assert train and val and not train & val
    train_text = " ".join(s.text for d in corpus.train for s in d)
    for question, fact, _ in corpus.val:  # no held-out question or fact is in training text
        assert question.text not in train_text and fact.text not in train_text


def test_plain_split_has_no_markers_and_val_is_the_end(tmp_path):
    path = write(str(tmp_path / "t.txt"), TEXT * 5)
    data, tok = _prepared(tmp_path, load_corpus(path, "none", val_fraction=0.1))
    assert len(data.train.marker_pos) == 0 and len(data.val.marker_pos) == 0
    cut = int(len(TEXT * 5) * 0.9)
    assert tok.decode(data.val.ids[:-1]) == (TEXT * 5)[cut:]  # the last 10%, then <eod>


def test_jsonl_documents(tmp_path):
    lines = ['{"segments": [{"text": "Q: capital? "}, {"sequence": "Paris is the capital."}]}'] * 3
    lines += ['{"segments": [{"text": "Q: river? "}, {"sequence": "The Seine flows."}]}']
    path = write(str(tmp_path / "d.jsonl"), "\n".join(lines))
    corpus = load_corpus(path, val_fraction=0.25)
    assert corpus.val == [[Segment("Q: river? "), Segment("The Seine flows.", True)]]
    bad = write(str(tmp_path / "bad.jsonl"), '{"segments": [{"txt": 1}]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_corpus(bad)


def test_a_changed_input_is_prepared_again(tmp_path):
    path = write(str(tmp_path / "t.txt"), TEXT * 3)
    tok = Tokenizer("bytes")
    first = prepare(load_corpus(path), tok, str(tmp_path / "cache"))
    assert prepare(load_corpus(path), tok, str(tmp_path / "cache")) == first
    write(path, TEXT * 3 + " One more sentence.")
    assert prepare(load_corpus(path), tok, str(tmp_path / "cache")) != first


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="no text"):
        load_corpus(write(str(tmp_path / "empty.txt"), "  \n"))
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        load_corpus(str(tmp_path / "bin.txt"))
    with pytest.raises(UserError, match="unknown dataset"):
        load_corpus("wikipedia")

import os

import numpy as np
import pytest

from machinery.cli import UserError
from data import Data, prepare
from machinery.corpora import Segment, load_corpus
from machinery.prepare import found_in
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
    text = ("".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)
            + " 日本語 😀 é\n\t<|ret|>")
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
    # repeated sentences: val must not retrieve what train wrote
    text = "\n".join([TEXT] * 3) + " Only val has this one."
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
    # no held-out person is named anywhere in training: "Q: Where does <name> live?"
    names = {q.text.split("does ")[-1].split(" live?")[0]
             for q, _, _ in corpus.val if "live?" in q.text}
    assert len(names) == 10 and not any(n in train_text for n in names)


@pytest.mark.parametrize("wordings", [1, 3])
def test_reworded_questions_ask_the_same_in_words_training_never_uses(wordings):
    from machinery.facts import ATTRIBUTES, REWORDED, reword
    corpus = load_corpus("facts", facts_people=50, facts_heldout=0.2, facts_wordings=wordings)
    train_text = " ".join(s.text for d in corpus.train for s in d)
    new = [reword(q.text) for q, _, _ in corpus.val]
    assert len(new) == 10 * len(ATTRIBUTES) and None not in new
    for (_, fact, _), r, attribute in zip(corpus.val, new, list(ATTRIBUTES) * 10):
        name = " ".join(fact.text.split()[:2]).removesuffix("'s")  # facts start with the name
        assert r == "Q: " + REWORDED[attribute].format(name=name) + "\n"  # same person, attribute
        assert REWORDED[attribute].split("{name}")[0] not in train_text  # a new way to ask
    assert reword("Q: Who is Mira Voskel?\n") is None


def test_more_wordings_ask_the_same_questions_about_the_same_world():
    from machinery.facts import ATTRIBUTES, reword, wordings
    one = load_corpus("facts", facts_people=50, facts_heldout=0.2)
    three = load_corpus("facts", facts_people=50, facts_heldout=0.2, facts_wordings=3)
    for split in ("train", "val"):  # the same facts and answers, document by document
        a, b = getattr(one, split), getattr(three, split)
        assert [[s.text for s in d[1:]] for d in a] == [[s.text for s in d[1:]] for d in b]
        assert [reword(d[0].text) for d in a] == [reword(d[0].text) for d in b]  # same question
    assert one.confusable == three.confusable

    def used(docs):  # the (attribute, wording) pairs the documents' questions use
        return {(a, w) for d in docs for a in ATTRIBUTES for w in wordings(a)
                if d[0].text.startswith("Q: " + w.split("{name}")[0])
                and d[0].text.endswith(w.split("{name}")[1] + "\n")}
    assert used(one.train) == used(one.val) == {(a, wordings(a)[0]) for a in ATTRIBUTES}
    every = {(a, w) for a in ATTRIBUTES for w in wordings(a)}
    assert len(every) == 3 * len(ATTRIBUTES) and used(three.train) == used(three.val) == every


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


def _evidence_jsonl(tmp_path, docs=40):
    """Evidence-style documents longer than a block: a question, six sequences, an answer."""
    import json
    lines = []
    for d in range(docs):
        segs = [{"text": f"Q: what do we know about item number {d} of the list? "}]
        segs += [{"sequence": f"Item {d} has property {k}, which is worth noting here."}
                 for k in range(6)]
        segs += [{"text": f"\nA: answer {d}.\n"}]
        lines.append(json.dumps({"segments": segs}))
    return write(str(tmp_path / "evidence.jsonl"), "\n".join(lines))


def test_every_marker_and_answer_of_a_long_document_is_trained(tmp_path):
    corpus = load_corpus(_evidence_jsonl(tmp_path), val_fraction=0.1)
    data, tok = _prepared(tmp_path, corpus, block_size=128)
    split, T = data.train, data.block_size
    assert np.diff(split.doc_starts).min() > T + 1  # every document is longer than a window
    starts = data.starts["train"]
    in_x = np.zeros(len(split.ids), bool)   # positions some window reads (markers make queries)
    in_y = np.zeros(len(split.ids), bool)   # positions some window predicts (L_NTP targets)
    for s in starts:
        in_x[s:s + T], in_y[s + 1:s + T + 1] = True, True
    assert in_x[split.marker_pos].all()
    ends = np.append(split.doc_starts[1:], len(split.ids))
    for a, b in zip(split.doc_starts, ends):  # every token after a document's first, answers too
        assert in_y[a + 1:b].all()


def test_the_last_short_document_is_trained(tmp_path):
    # documents shorter than a window: each starts one, and the last one's start lies within a
    # window of the stream's end, where a whole window no longer fits
    import json
    lines = [json.dumps({"segments": [{"text": f"Q: item {d}? "}, {"sequence": f"Item {d} is ok."},
                                      {"text": f" A: {d}."}]}) for d in range(30)]
    data, tok = _prepared(tmp_path, load_corpus(write(str(tmp_path / "s.jsonl"),
                                                      "\n".join(lines))), block_size=64)
    split, T, starts = data.train, data.block_size, data.starts["train"]
    assert len(split.ids) - split.doc_starts[-1] < T    # the last document is shorter than T
    assert (starts + T + 1 <= len(split.ids)).all()      # every window fits
    in_x, in_y = np.zeros(len(split.ids), bool), np.zeros(len(split.ids), bool)
    for s in starts:
        in_x[s:s + T], in_y[s + 1:s + T + 1] = True, True
    assert in_x[split.marker_pos].all() and in_y[1:].all()


def test_val_sequences_never_enter_a_training_batch(tiny_data):
    data, _ = tiny_data
    val_targets = set(data.val.marker_target.tolist())
    rng = np.random.default_rng(0)
    for _ in range(50):
        batch = data.get_batch("train", 8, rng, hard_negatives=4)
        assert not val_targets & set(batch.candidate_ids.tolist())


def test_transductive_lets_val_sequences_be_hard_negatives(tmp_path):
    from machinery.config import Config
    from data import load_data
    data, _ = load_data(Config(facts_people=60, block_size=96, cache_dir=str(tmp_path),
                               transductive=True))
    val_targets = set(data.val.marker_target.tolist())
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        seen |= set(data.get_batch("train", 8, rng, hard_negatives=4).candidate_ids.tolist())
    assert val_targets & seen


@pytest.mark.parametrize("dataset", ["facts", "text"])
def test_each_marker_gets_as_many_distinct_hard_negatives_as_asked(tmp_path, tiny_data, dataset):
    if dataset == "facts":
        data, _ = tiny_data
    else:
        text = " ".join(f"Sentence {i} is here." for i in range(400))
        path = write(str(tmp_path / "t.txt"), text)
        data, _ = _prepared(tmp_path, load_corpus(path, val_fraction=0.2), block_size=64)
    rng = np.random.default_rng(0)
    targets = data.train.marker_target
    for h in (1, 2, 3, 8):
        picks = data.pick_negatives("train", targets, h, rng)           # (M, h), -1: none
        for t, row in zip(targets, picks):
            pool = {int(x) for x in data.negatives["train"][t] if x >= 0}
            chosen = [int(x) for x in row if x >= 0]
            assert len(set(chosen)) == len(chosen) == min(h, len(pool))
            assert set(chosen) <= pool and t not in chosen


def test_an_empty_sequence_is_a_user_error(tmp_path):
    line = '{"segments": [{"text": "Q "}, {"sequence": ""}]}\n'
    path = write(str(tmp_path / "e.jsonl"), line * 4)
    with pytest.raises(UserError, match="e.jsonl:1: .*empty"):
        load_corpus(path)


def test_a_val_sequence_inside_the_training_text_is_not_a_val_target(tmp_path):
    lines = ['{"segments": [{"text": "Notes: one. Two. Keep this in mind."}, '
             '{"sequence": "A train fact."}]}'] * 3
    lines += ['{"segments": [{"text": "Q "}, {"sequence": "Keep this in mind."}, '
              '{"sequence": "A new val fact."}]}']
    corpus = load_corpus(write(str(tmp_path / "l.jsonl"), "\n".join(lines)), val_fraction=0.25)
    data, tok = _prepared(tmp_path, corpus)
    val = [tok.decode(data.sequence(t)) for t in data.val.marker_target]
    assert val == ["A new val fact."]


def _arrays(path):
    """Every array of a prepared corpus, by file and name."""
    out = {}
    for name in ("train", "val", "sequences"):
        with np.load(os.path.join(path, f"{name}.npz")) as f:
            out.update({f"{name}.{k}": f[k] for k in f.files})
    for name in ("train", "val"):
        out[f"{name}.bin"] = np.fromfile(os.path.join(path, f"{name}.bin"), dtype=np.uint16)
    return out


@pytest.mark.parametrize("split", ["sentence", "none"])
@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_preparing_in_small_chunks_writes_the_same_files(tmp_path, split, tokenizer):
    # a long plain text is encoded in pieces and streams are written a few tokens at a time: the
    # files must be those of one piece, and no list of every token is needed to make them
    text = " ".join(f"Sentence {i} says  something\tnew, é{i}!" for i in range(300))
    corpus = load_corpus(write(str(tmp_path / "t.txt"), text), split, val_fraction=0.2)
    merges = [b" S", b"en", b" Sen", b" s", b"  "]  # a cut in a wrong place would break these
    tok = Tokenizer(tokenizer, write_tiktoken(tmp_path / "g.tiktoken", merges))
    small = _arrays(prepare(corpus, tok, str(tmp_path / "small"), chunk=7))
    whole = _arrays(prepare(corpus, tok, str(tmp_path / "whole"), chunk=10**9))
    assert small.keys() == whole.keys()
    for k in whole:
        assert np.array_equal(small[k], whole[k]), k


def test_found_in_is_the_substring_test():
    rng = np.random.default_rng(0)
    haystack = "".join(rng.choice(list("ab é\n"), 3000))
    starts, lengths = rng.integers(0, 2990, 300), rng.integers(1, 30, 300)
    needles = {haystack[a:a + n] for a, n in zip(starts, lengths)}
    needles |= {"".join(rng.choice(list("ab é"), n)) for n in rng.integers(1, 20, 300)}
    assert found_in(needles, haystack) == {t for t in needles if t in haystack}
    # a text shorter than 8 bytes holds no long needle, and short ones are still found
    assert found_in({"abcdefghij", "ab", "zz"}, "abc") == {"ab"}
    assert found_in({"abcdefgh"}, "") == set()


def test_the_test_world_is_another_world_of_the_same_shape():
    """facts_test: the same generator with another world seed, so no recipe choice made on facts
    has seen its people; facts itself is unchanged (the README's example is its first val doc)."""
    from machinery.corpora import load_corpus
    tuning, test = load_corpus("facts"), load_corpus("facts_test")
    assert tuning.val[0][1].text == "Vok Droulki lives in Momklin."
    assert (len(test.train), len(test.val)) == (len(tuning.train), len(tuning.val))

    def facts(corpus):
        return {seg.text for doc in corpus.train + corpus.val for seg in doc if seg.sequence}
    assert len(facts(test)) == len(facts(tuning)) == 2400
    people = [{f.split(" lives in ")[0] for f in facts(c) if " lives in " in f}
              for c in (tuning, test)]
    assert len(people[0]) == len(people[1]) == 400
    assert not people[0] & people[1]  # not one person of the tuning world is in the test world
    assert all(q in test.confusable for q in facts(test))


def test_gpt2_from_a_checkpoints_vocab_json(tmp_path):
    """A GPT-2 download's vocab.json writes bytes as characters: a space as "Ġ" and a newline as
    "Ċ" (GPT-2's own map; "Ġthe" is the token " the"). Read as tiktoken ranks, it encodes text
    as the same ranks in a .tiktoken file do."""
    import json
    from machinery.tokenizer import Tokenizer
    base = Tokenizer("gpt2", write_tiktoken(tmp_path / "small.tiktoken"))
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    assert (char[32], char[10]) == ("Ġ", "Ċ")
    vocab = {"".join(char[b] for b in t): r for t, r in base.enc._mergeable_ranks.items()}
    vocab["<|endoftext|>"] = len(vocab)
    assert "Ġthe" in vocab
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = Tokenizer("gpt2", str(tmp_path / "vocab.json"))
    text = "the theme\n of the other"
    assert tok.encode(text) == base.encode(text) and tok.vocab_size == base.vocab_size
    (tmp_path / "bad.json").write_text(json.dumps({"\u4e00": 0}))  # no such character in its map
    with pytest.raises(UserError, match="not a GPT-2 vocab.json"):
        Tokenizer("gpt2", str(tmp_path / "bad.json"))

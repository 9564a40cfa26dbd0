"""sample.py and evaluate.py end to end on a tiny trained run."""
import importlib.util
import itertools
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate as evaluate_script
import sample
import train
from machinery import batch_generate, prompts
from train import load_run
from conftest import TINY, write


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    train.main(TINY + ["--max_iters", "30", "--eval_interval", "30", "--out_dir", str(d / "run"),
                       "--cache_dir", str(d / "cache")])
    return d / "run"


@pytest.fixture
def trained(trained_once, tmp_path):
    """A tiny trained run of this test's own (a copy: tests change its files)."""
    return shutil.copytree(trained_once, tmp_path / "trained")


def _write_the_marker_after_the_default_prompt(out):
    """Point the marker's embedding (tied to lm_head) along Gen's final state at the end of the
    default prompt, so greedy decoding writes the marker there: a run of a few steps has not yet
    learned to, and the sample must show a retrieval."""
    _, gen, _, data, tok = load_run(str(out), "cpu")
    with torch.no_grad():
        h = gen.hidden(torch.tensor([prompts.default_prompt(data, tok)]))[0, -1]  # (n_embd,)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        ckpt["gen"][key][tok.marker] = 100 * h / h.norm()
    torch.save(ckpt, out / "ckpt.pt")


def test_sample_marks_each_retrieval(trained, capsys):
    _write_the_marker_after_the_default_prompt(trained)
    sample.main(["--out_dir", str(trained), "--max_new_tokens", "80", "--show_retrieval", "2"])
    text = capsys.readouterr().out
    assert text.startswith("Q: ")       # the default prompt: a held-out question
    assert (trained / "datastore.pt").exists()
    # Gen wrote the marker after the question, and the inserted entry is shown with its id and
    # score, then its 2 runners-up
    assert re.search(r"\?\n\[#\d+ -?\d\.\d{3}: [^\]]+\]\n    \(#\d+ .*\n    \(#\d+ ", text)
    if importlib.util.find_spec("faiss"):  # a datastore this small: faiss probes every list
        sample.main(["--out_dir", str(trained), "--max_new_tokens", "80", "--show_retrieval", "2",
                     "--index", "faiss"])
        assert capsys.readouterr().out == text


def _oracle(data, tok, limit):
    """A stand-in for generate_batch whose answers are known: of each split's first `limit`
    questions, the even ones retrieve their gold sequence and answer right, the odd ones retrieve
    another and answer wrong; Gen alone always answers wrong; given the gold sequence, always
    right; any other prompt (a reworded question) ends at once."""
    from generate import Retrieval
    asked = {}
    for split in ("val", "train"):
        for k, (prompt, target, gold) in enumerate(prompts.questions(data, tok, split,
                                                                            limit)):
            asked[tuple(int(t) for t in prompt)] = (k % 2 == 0, target, [int(t) for t in gold])
    wrong = tok.encode("\nA: nobody knows.\n")

    def generate_batch(gen, prompts, budgets, marker, eod, datastore, query_gen, retrieve):
        outs = []
        for p, r in zip(prompts, retrieve):
            p = list(p)
            if marker in p:                            # given the gold sequence: the rest of it
                right, target, gold = asked[tuple(p[:p.index(marker)])]
                outs.append((p + gold[len(p) - p.index(marker):] + [eod], []))
            elif tuple(p) not in asked:
                outs.append((p + [eod], []))
            elif not r:                                # Gen alone
                outs.append((p + wrong + [eod], []))
            else:
                right, target, gold = asked[tuple(p)]
                ids = gold if right else [marker] + list(data.sequence(target + 1)) + wrong
                outs.append((p + [int(t) for t in ids] + [eod],
                             [Retrieval(len(p) + 1, target if right else target + 1, 1.0)]))
        return outs
    return generate_batch


def test_eval_reports_every_metric(trained, capsys, monkeypatch):
    _, _, _, data, tok = load_run(str(trained), "cpu")
    monkeypatch.setattr(batch_generate, "generate_batch", _oracle(data, tok, 4))
    capsys.readouterr()
    evaluate_script.main(["--out_dir", str(trained), "--questions", "4"])
    result = json.loads((trained / "eval.json").read_text())
    for split in ("val", "train"):
        assert set(result[split]) >= {"ntp", "ppl", "recall@1", "recall@10", "mrr",
                                      "answer_em_retrieval", "answer_em_no_retrieval",
                                      "marker_rate", "retrieval_acc", "answer_em_gold"}
        assert result[split]["ppl"] == pytest.approx(math.exp(result[split]["ntp"]))
        # what the oracle wrote: 2 of 4 right with retrieval, none alone, all given the gold
        assert {k: result[split][k] for k in ("answer_em_retrieval", "answer_em_no_retrieval",
                                              "marker_rate", "retrieval_acc", "answer_em_gold")} \
            == {"answer_em_retrieval": 0.5, "answer_em_no_retrieval": 0.0, "marker_rate": 1.0,
                "retrieval_acc": 0.5, "answer_em_gold": 1.0}
    # the same model, datastore and val markers as training's last evaluation, by another path
    # (the datastore saved and loaded): the same numbers
    last = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()][-1]
    for k in ("recall@1", "recall@10", "mrr"):
        assert result["val"][k] == pytest.approx(last[k])
    assert result["val"]["ntp"] == pytest.approx(last["val_ntp"])
    printed = capsys.readouterr()
    # printed: the same, less the per-marker lists, which give the file's MRRs back
    ranks = {split: result[split].pop("reciprocal_ranks") for split in ("val", "train")}
    assert json.loads(printed.out) == result
    for split, order in itertools.product(("val", "train"), ("reranked", "first_stage")):
        assert np.mean(ranks[split][order]) == pytest.approx(result[split][f"{order}_mrr"])
    # each retrieval figure with its 95% interval, in eval.json, the log, and printed to read
    val = result["val"]
    for k in ("recall@1", "mrr", "lexical_mrr", "reranked_mrr", "first_stage_recall@K"):
        assert val[k + "_ci"][0] <= val[k] <= val[k + "_ci"][1] and last[k + "_ci"]
    assert val["reranked_mrr_minus_first_stage"] == pytest.approx(val["reranked_mrr"] -
                                                                  val["first_stage_mrr"])
    assert f"mrr        {val['mrr']:.4f} [{val['mrr_ci'][0]:.4f}, " in printed.err
    assert "MRR, learned minus TF-IDF's order (paired): " in printed.err
    assert set(result["val_reworded"]) >= {"answer_em_retrieval", "answer_em_no_retrieval",
                                           "marker_rate", "recall@1", "recall@10", "mrr"}
    assert result["val_reworded"]["marker_rate"] == 0  # the oracle knows no reworded question


def test_question_retrieval_of_the_questions_as_asked_is_val_retrieval(trained):
    """A marker placed after each val question, as asked, is where val's markers are: the same
    ranks by two paths (evaluate.question_retrieval and datastore.retrieval_quality)."""
    from contextlib import nullcontext
    from datastore import retrieval_quality
    from machinery.datastore_file import build
    _, gen, embedder, data, tok = load_run(str(trained), "cpu")
    store = build(embedder, data, progress=False)
    qs = prompts.questions(data, tok, "val", None)
    assert len(qs) == len(data.val.marker_pos)  # every val document asks one question
    asked = evaluate_script.question_retrieval(gen, store, qs, tok, "cpu")
    val = retrieval_quality(gen, store.embeddings, data, "val", "cpu", nullcontext())
    assert asked.keys() == val.keys()
    for k in asked:  # each figure, and its interval [lo, hi]
        assert asked[k] == pytest.approx(val[k])
    assert len(prompts.reworded(qs, tok)) == len(qs)


def test_eval_with_queries_from_another_run_uses_its_networks_and_writes_only_its_own_file(
        trained, run_train, capsys):
    # OTHER's Gen has a block shorter than a question (about 35 tokens) and than this run's (96)
    other, _ = run_train("--max_iters", "30", "--eval_interval", "30", "--block_size", "32",
                         name="other")
    evaluate_script.main(["--out_dir", str(trained), "--questions", "1"])
    own = json.loads((trained / "eval.json").read_text())
    before = {p.name: p.read_bytes() for p in (*trained.iterdir(), *other.iterdir())}
    capsys.readouterr()
    evaluate_script.main(["--out_dir", str(trained), "--query_from", str(other),
                          "--questions", "1"])
    path = trained / "eval_query_from_other.json"
    assert str(path) in capsys.readouterr().err
    separate = json.loads(path.read_text())
    assert separate["query_from"] == str(other)
    assert {p.name: p.read_bytes() for p in (*trained.iterdir(), *other.iterdir())
            if p != path} == before                # eval.json and OTHER's folder untouched
    evaluate_script.main(["--out_dir", str(other), "--questions", "1"])
    other_own = json.loads((other / "eval.json").read_text())
    for split in ("val", "train"):  # OTHER's queries against OTHER's datastore: OTHER's numbers
        for k in ("recall@1", "recall@10", "mrr"):
            assert separate[split][k] == other_own[split][k]
        assert separate[split]["mrr"] != own[split]["mrr"]
        assert separate[split]["ntp"] == own[split]["ntp"]  # while this run's Gen writes


def test_each_script_run_as_a_command_fails_in_one_line(tmp_path):
    """The scripts' own command lines (their __main__), not only main(): one line, exit code 2.
    test_bad_input.py checks the messages in-process; the three start at once to save time."""
    runs = {script: subprocess.Popen([sys.executable, script, "--out_dir", str(tmp_path / "none"),
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            for script, extra in (("train.py", ["--max_iterz", "5"]), ("sample.py", []),
                                  ("evaluate.py", []))}
    for script, message in (("train.py", "unrecognized arguments: --max_iterz 5"),
                            ("sample.py", "no checkpoint"), ("evaluate.py", "no checkpoint")):
        _, err = runs[script].communicate(timeout=120)
        assert runs[script].returncode == 2, (script, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (script, err)


def _text_file(tmp_path, kind):
    """A small corpus of each kind train.py takes besides the built-in ones: every val document
    starts with a sequence, so the text before its first marker is empty."""
    lines = [f"Box {i} holds a {['red', 'blue', 'green'][i % 3]} ball number {i * 7}."
             for i in range(80)]
    if kind == "jsonl":
        docs = [{"segments": [{"sequence": line}, {"text": f"\nA: {i * 7}.\n"}]}
                for i, line in enumerate(lines)]
        return write(str(tmp_path / "boxes.jsonl"), "\n".join(json.dumps(d) for d in docs))
    return write(str(tmp_path / "boxes.txt"), "\n".join(lines) + "\n")


@pytest.mark.parametrize("dataset,split", [("facts", "sentence"), ("txt", "sentence"),
                                           ("txt", "line"), ("txt", "none"), ("jsonl", "sentence"),
                                           ("pydoc", "sentence")])
def test_sample_and_evaluate_work_on_every_corpus(run_train, tmp_path, capsys, dataset, split):
    path = _text_file(tmp_path, dataset) if dataset in ("txt", "jsonl") else dataset
    out, _ = run_train("--dataset", path, "--split", split, "--max_iters", "2",
                       "--eval_interval", "2", "--eval_iters", "1")
    capsys.readouterr()
    # --index auto: two-stage search on a text corpus, exact search on facts; and the other way
    for index in ("auto", "exact" if dataset != "facts" else "first_stage"):
        sample.main(["--out_dir", str(out), "--max_new_tokens", "20", "--index", index])
        assert capsys.readouterr().out.strip()
    # pydoc's questions are whole topics, thousands of tokens to generate: its sample must do
    evaluate_script.main(["--out_dir", str(out), "--questions", "0" if dataset == "pydoc" else "2"])
    result = json.loads((out / "eval.json").read_text())
    assert all(math.isfinite(result[s]["ntp"]) for s in ("val", "train"))
    if split == "none":   # no markers: no retrieval to score
        return
    val, train = result["val"], result["train"]
    assert val["first_stage_k"] == min(100, result["datastore"])   # K is at most N
    for name in ("reranked_mrr", "first_stage_mrr", "combined_mrr", "first_stage_recall@K"):
        assert 0 <= val[name] <= 1
    # every re-ranked number is bounded by the first stage's ceiling
    assert val["reranked_recall@10"] <= val["first_stage_recall@K"]
    assert train["combined_weight"] == val["combined_weight"] in evaluate_script.WEIGHTS


def test_the_combined_weight_is_chosen_on_train_and_val_is_scored_with_it(monkeypatch):
    """evaluate.retrieval on four markers worked out by hand, two candidates each (the target t
    and one other o), the datastore one-hot so that a query's entries are its learned scores.
    With d = learned(t) - learned(o) + w (tfidf(t) - tfidf(o)), the target ranks 1 iff d > 0:
      train A: -0.15 + 0.2 w > 0 iff w > 0.75     train B: 0.3 - 0.2 w > 0 iff w < 1.5
      val   C:  0.3  - 0.5 w > 0 iff w < 0.6      val   D: -0.2 + 0.5 w > 0 iff w > 0.4
    Train's best w of WEIGHTS is 1 (MRR 1, any other 0.75); val's own best would be 0.5."""
    from types import SimpleNamespace
    from datastore import FirstStage
    queries = {"train": [[0.5, 0.65, 0, 0], [0, 0, 0.7, 0.4]],         # A: t 0, o 1; B: t 2, o 3
               "val": [[0.6, 0.3, 0, 0], [0, 0, 0.5, 0.3]]}            # C: t 0, o 1; D: t 3, o 2
    stages = {"train": FirstStage(torch.tensor([[0, 1], [3, 2]]),      # TF-IDF's best first
                                  torch.tensor([[0.4, 0.2], [0.3, 0.1]], dtype=torch.float64),
                                  torch.tensor([0, 2])),
              "val": FirstStage(torch.tensor([[1, 0], [3, 2]]),
                                torch.tensor([[0.6, 0.1], [0.7, 0.2]], dtype=torch.float64),
                                torch.tensor([0, 3]))}
    monkeypatch.setattr(evaluate_script, "split_queries", lambda gen, data, split, *a: (
        torch.tensor(queries[split]), stages[split].targets))
    monkeypatch.setattr(evaluate_script, "first_stage", lambda lex, data, tok, split, *a:
                        stages[split])
    monkeypatch.setattr(evaluate_script, "lexical_metrics", lambda *a: {})
    store, lexical = SimpleNamespace(embeddings=torch.eye(4)), SimpleNamespace(tolerance=1e-9)
    out = evaluate_script.retrieval(None, store, None, None, lexical, 2, "cpu", None)
    train, val = out["train"], out["val"]
    assert train["combined_weight"] == val["combined_weight"] == 1
    # train at w = 1: A and B rank 1; val at w = 1: C ranks 2 (0.3 - 0.5 < 0), D ranks 1
    assert (train["combined_mrr"], train["combined_recall@1"]) == (1.0, 1.0)
    assert (val["combined_mrr"], val["combined_recall@1"]) == (0.75, 0.5)
    # the learned score alone (w = 0): A ranks 2, B 1; C 1, D 2
    assert train["reranked_mrr"] == val["reranked_mrr"] == 0.75
    # TF-IDF's own order: A 1, B 2 (0.1 < 0.3); C 2, D 1
    assert train["first_stage_mrr"] == val["first_stage_mrr"] == 0.75

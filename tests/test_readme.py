"""Every result block of README.md and experiments/README.md is what experiments/readme.py
computes from the committed records: no reported number is typed by hand."""
import re

from experiments import readme


def test_every_readme_block_equals_what_the_records_give():
    want = readme.blocks()
    found = []
    for path in readme.FILES:
        blocks = readme.BLOCK.finditer(open(path).read())
        for name, text in ((m.group(2), m.group(3)) for m in blocks):
            assert text == want[name], f"{path}: block {name} differs from the records: " \
                                       "python -m experiments.readme rewrites it"
            found.append(name)
    # the band table, the comparison and the grid's three tables are all in a README
    assert set(found) >= {"band", "comparison", "report:results", "report:results/stage2_3200",
                          "report:results/first_protocol"}


def test_a_changed_number_in_a_block_is_caught(tmp_path, monkeypatch):
    readme_text = open(readme.FILES[0]).read()
    start = readme_text.index("<!-- readme.py band -->")
    m = re.compile(r"\d\.\d{3}").search(readme_text, start)
    bad = readme_text[:m.start()] + ("0.124" if m.group() == "0.123" else "0.123") + \
        readme_text[m.end():]
    path = tmp_path / "README.md"
    path.write_text(bad)
    monkeypatch.setattr(readme, "FILES", [str(path)])
    try:
        readme.main(["--check"])
    except SystemExit as e:
        assert e.code == 1
    else:
        raise AssertionError("--check passed a README whose band table was changed")
    readme.main([])  # rewriting restores the records' numbers
    assert path.read_text() == readme_text


def _text_run(seed, learned, tfidf, whole):
    val = {"first_stage_mrr": sum(tfidf) / len(tfidf), "reranked_mrr": sum(learned) / len(learned),
           "first_stage_recall@K": 0.5, "lexical_mrr": 0.06,
           "reciprocal_ranks": {"reranked": learned, "first_stage": tfidf}}
    return {"seed": seed, "threads": 1, "cpu": "avx2", "mrr": whole, "train_args": "",
            "train_s": 1.0, "eval": {"val": val}}


def test_the_real_text_table_and_the_base_lift_are_the_records_numbers(tmp_path, monkeypatch):
    """By hand: TF-IDF's order 1/rank [1/2, 1/4, 1/4, 0] (MRR 0.25); from scratch the learned
    order's [1/2, 1/2, 0, 0] and [1/2, 1/4, 1/4, 0] (mean MRR 0.25, ratio 1.00, pooled difference
    0); from the base [1, 1/2, 1/4, 1/4] twice (MRR 0.5, ratio 2.00, difference +0.25 over TF-IDF,
    +0.25 over scratch's runs averaged marker by marker)."""
    import json
    tfidf = [0.5, 0.25, 0.25, 0.0]
    runs = {"pydoc_scratch": [_text_run(1, [0.5, 0.5, 0, 0], tfidf, 0.01),
                              _text_run(2, [0.5, 0.25, 0.25, 0], tfidf, 0.03)],
            "pydoc_base": [_text_run(s, [1, 0.5, 0.25, 0.25], tfidf, 0.04) for s in (1, 2)]}
    (tmp_path / "text").mkdir()
    for name, records in runs.items():
        (tmp_path / "text" / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "text" / "base").mkdir()
    (tmp_path / "text" / "base" / "log.jsonl").write_text(json.dumps(
        {"iter": 2400, "reranked_mrr": 0.02, "first_stage_mrr": 0.008,
         "reranked_mrr_minus_first_stage_ci": [0.01, 0.014]}) + "\n")
    monkeypatch.setattr(readme, "RESULTS", str(tmp_path))
    table = readme.text_table()
    assert "MRR 0.0200 against TF-IDF's order's 0.0080 (2.5 times; " in table
    scratch, base = [line for line in table.splitlines() if line.startswith("| `pydoc`")]
    assert scratch.startswith("| `pydoc` from scratch | 4 | 2 | 0.500 | 0.250 | "
                              "0.250 (0.250 to 0.250) | 1.00 | +0.000 ")
    assert base.startswith("| `pydoc` from the base | 4 | 2 | 0.500 | 0.250 | "
                           "0.500 (0.500 to 0.500) | 2.00 | +0.250 ")
    assert scratch.endswith("| 0.020 (0.010 to 0.030) | 0.060 |")
    assert "On `pydoc` the base changes the learned re-ranking MRR by +0.250 " in table
    assert "whole-datastore MRR 0.020 from scratch, 0.040 from the base." in table

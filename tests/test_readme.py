"""Every result block of README.md and experiments/README.md is what experiments/readme.py
computes from the committed records: no reported number is typed by hand."""
import re

from experiments import readme


def test_every_readme_block_equals_what_the_records_give():
    want = readme.blocks()
    found = []
    for path in readme.FILES:
        for name, text in ((m.group(2), m.group(3)) for m in readme.BLOCK.finditer(open(path).read())):
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

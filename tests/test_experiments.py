"""experiments/grid.py's protocol on a tiny config, report.py's statistics, train.py --init_from."""
import glob
import json
import re

import pytest
import torch

import evaluate as eval_script
from experiments import grid
from experiments import report
from machinery.cli import UserError
from conftest import TINY


def test_t_test_matches_hand_computation():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.464; with 2 degrees of freedom
    # the two-sided p is 1 - t / sqrt(2 + t^2) = 0.0742
    mean, t, p = report.t_test([1.0, 2.0, 3.0])
    assert mean == 2.0 and t == pytest.approx(3 ** 0.5 * 2)
    assert p == pytest.approx(1 - t / (2 + t * t) ** 0.5, abs=1e-5)
    assert report.t_test([0.5, -0.5])[2] == pytest.approx(1.0, abs=1e-5)  # mean 0: p = 1


def test_t_test_at_the_protocols_four_degrees_of_freedom():
    # 5 seeds: 4 degrees of freedom, where the two-sided p is 1 - x (1 + (1 - x^2) / 2) with
    # x = t / sqrt(4 + t^2); and t = 2.776 is the tabulated 5% critical value
    diffs = [0.1, 0.3, 0.2, 0.4, 0.05]
    mean, t, p = report.t_test(diffs)
    x = t / (4 + t * t) ** 0.5
    assert mean == pytest.approx(0.21) and p == pytest.approx(1 - x * (1 + (1 - x * x) / 2),
                                                                abs=1e-5)
    spread = [-1.4, 0.6, -0.4, 1.1, 0.1]  # mean 0; shifted so that t = 2.776
    sd = (sum(v * v for v in spread) / 4) ** 0.5
    mean, t, p = report.t_test([v + 2.776 * sd / 5 ** 0.5 for v in spread])
    assert t == pytest.approx(2.776) and p == pytest.approx(0.05, abs=2e-4)


def test_the_lambda_plot_shows_the_tables_spread(tmp_path, monkeypatch):
    import matplotlib.axes
    bars = []
    errorbar = matplotlib.axes.Axes.errorbar

    def record_bars(self, x, y, yerr=None, **kw):
        bars.append((list(y), list(yerr)))
        return errorbar(self, x, y, yerr=yerr, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record_bars)
    runs = [record(f"co{lam:g}", s, **{"recall@1": v, "val_ntp": 1.0},
                   curve=[{"iter": 0, "val_ntp": 1.0, "recall@1": v}])
            for lam, vals in ((0.1, (0.2, 0.4, 0.9)), (0.5, (0.5, 0.5, 0.8)))
            for s, v in zip((1, 2, 3), vals)]
    report.plots(runs, str(tmp_path))
    means, sds = bars[[i for i, (y, _) in enumerate(bars) if y[0] != 1.0][0]]
    assert means == pytest.approx([0.5, 0.6]) and sds == pytest.approx([0.360555, 0.173205],
                                                                       abs=1e-5)  # ddof 1
    assert report.fmt([0.2, 0.4, 0.9]) == "0.500 +- 0.361"


def test_a_changed_setting_never_reuses_runs(tmp_path):
    """--train_args, --questions and --evals (and the protocol's own flags) are part of every run's
    folder and record key: a change trains and measures afresh."""
    base = ["--work_dir", str(tmp_path)]
    cfgs = [grid.parse_config(grid.ExperimentConfig, "", base + extra)[0] for extra in
            ([], ["--train_args", "--n_embd 64"], ["--questions", "7"], ["--evals", "3"])]
    settings = [grid.setting(c) for c in cfgs]
    assert len(set(settings)) == 4
    dirs = {grid.run_dir(c, "facts", "co0.5", 1337) for c in cfgs}
    assert len(dirs) == 4
    keys = {report.key("facts", "co0.5", 1337, "400+400", s) for s in settings}
    assert len(keys) == 4
    assert grid.setting(cfgs[0]) == grid.setting(grid.parse_config(
        grid.ExperimentConfig, "", base)[0])  # and the same setting, the same runs


def test_a_changed_default_of_train_py_never_reuses_runs(monkeypatch):
    """A run's flags do not say what it ran once a default of train.py changes: the defaults
    (band.defaults) are part of the setting, so records and checkpoints made under other
    defaults are not reused."""
    import dataclasses
    from experiments import band
    cfg = grid.parse_config(grid.ExperimentConfig, "", [])[0]
    before = grid.setting(cfg)
    config = band.Config
    monkeypatch.setattr(band, "Config", lambda: dataclasses.replace(config(), learning_rate=1e-3))
    assert grid.setting(cfg) != before
    assert grid.run_dir(cfg, "facts", "co0.5", 1337).endswith(grid.setting(cfg))


def record(variant, seed, dataset="facts", **metrics):
    return {"dataset": dataset, "variant": variant, "seed": seed, "steps": "4+6", **metrics}


def test_primary_comparison_pairs_by_seed():
    # co beats sep by 0.1, 0.2, -0.1 on answer EM; seed 4 has no sep run and is left out
    runs = [record("sep", s, answer_em_retrieval=0.5, **{"recall@1": 0.5}) for s in (1, 2, 3)]
    runs += [record("co0.5", s, answer_em_retrieval=0.5 + d, **{"recall@1": 0.6})
             for s, d in ((1, 0.1), (2, 0.2), (3, -0.1), (4, 0.9))]
    runs += [record("sep", s, "pydoc", mrr=0.01 * s) for s in (1, 2)]
    runs += [record("co0.5", s, "pydoc", mrr=0.01) for s in (1, 2)]
    line = report.compare(runs, "co0.5", "sep", "answer_em_retrieval", "EM", True)
    assert "per seed +0.100, +0.200, -0.100; mean +0.067" in line
    assert "better in 2 of 3 seeds" in line
    _, t, p = report.t_test([0.1, 0.2, -0.1])
    assert f"t = {t:.2f}, p = {p:.3f}" in line
    facts, facts_result, pydoc, pydoc_result = report.summary(runs)
    assert facts.startswith("- **facts**") and "recall@1 0.600 +- 0.000 against 0.500" in facts
    assert "**pydoc**" in pydoc and "difference -0.005" in pydoc and "better in 0 of 2" in pydoc
    # what each test shows, in one sentence: p = 0.59 on answers, recall@1 better in every seed
    assert facts_result == ("  Result, each metric at p < 0.05 (uncorrected): no difference shown "
                            f"on answer EM, retrieval (co0.5 - sep = +0.067, p = {p:.3g}); co0.5 "
                            "better than sep on held-out recall@1 (co0.5 - sep = +0.100, "
                            "p < 0.001).")
    assert pydoc_result == ("  Result, each metric at p < 0.05 (uncorrected): no difference shown "
                            "on val MRR (co0.5 - sep = -0.005, p = 0.5).")
    # the better one is the one the sign says, whichever is named first, and where lower is
    # better a higher value is the other one's win
    assert report.finding(runs, "sep", "co0.5", "recall@1", "R", True) == (
        "co0.5 better than sep on R (sep - co0.5 = -0.100, p < 0.001)")
    assert report.finding(runs, "co0.5", "sep", "recall@1", "loss", False) == (
        "sep better than co0.5 on loss (co0.5 - sep = +0.100, p < 0.001)")
    table = report.table(runs)
    assert table.index("**facts**") < table.index("#### facts") < table.index("#### pydoc")


def test_the_confirmatory_test_uses_only_its_seeds_and_states_its_verdict():
    seeds = report.CONFIRMATORY["seeds"]
    gains = [0.10, 0.12, 0.08, 0.11, 0.09]  # co0.1 minus sep: clearly better on both metrics

    def runs(recall_gains):
        out = [record("sep", s, answer_em_retrieval=0.5, **{"recall@1": 0.5}) for s in seeds]
        out += [record("co0.1", s, answer_em_retrieval=0.5 + g, **{"recall@1": 0.5 + r})
                for s, g, r in zip(seeds, gains, recall_gains)]
        out += [record("sep", 1337, answer_em_retrieval=0.0, **{"recall@1": 0.0})]  # not its seed
        for r in out:
            r["steps"] = report.CONFIRMATORY["steps"]
        # its seed but another budget: never mixed in
        return out + [record("sep", seeds[0], answer_em_retrieval=0.0, **{"recall@1": 0.0})]
    lines = report.confirmatory(runs(gains))
    assert lines[0].startswith("Confirmatory test, fixed before its runs (co0.1 minus sep on facts")
    assert "): confirmed: co0.1 is better than sep on both metrics at p < 0.025." in lines[0]
    assert sum(line.startswith("- ") and "better in 5 of 5 seeds" in line for line in lines) == 2
    # recall@1 no better on average: not confirmed, though answers are
    assert "not confirmed" in report.confirmatory(runs([0.1, -0.1, 0.05, -0.05, 0.0]))[0]
    assert report.confirmatory(runs(gains)[1:]) == []  # a seed's sep missing: no verdict yet
    curved = runs(gains)  # co0.1's curves climb by gain / 4 in their last quarter; sep has none
    for r, g in zip(curved[5:10], gains):
        r["curve"] = [{"iter": i, "recall@1": g * i / 4, "val_ntp": 0.2} for i in range(5)]
    curved.append(record("nsp-ft", 1337, curve=[{"iter": i, "recall@1": i / 4, "val_ntp": 5.0}
                                                 for i in range(5)]))  # not its seed
    lines = report.confirmatory(curved)  # its seeds' own curves are judged, and no other
    assert any(line.startswith("| co0.1 | 0.025 +- ") for line in lines)
    assert not any(line.startswith("| nsp-ft") for line in lines)
    assert "Flattened on every seed: none; still learning: co0.1." in lines
    table = report.table(runs(gains))
    assert "#### facts: 1 seed(s)" in table  # its seeds stay out of the main tables


def test_the_tables_show_tf_idf_and_how_flat_each_curve_ended():
    curve = [{"iter": i, "val_ntp": 1.0 - 0.1 * k, "recall@1": v}
             for k, (i, v) in enumerate(((0, 0.0), (400, 0.5), (800, 0.9)))]
    runs = [record(v, s, **{"recall@1": 0.9, "mrr": 0.95,
                            "lexical_recall@1": 0.4 + 0.1 * (v == "sep"),
                            "lexical_mrr": 0.6, "reworded_recall@1": 0.3,
                            "reworded_lexical_recall@1": 0.35},
                   **({"curve": curve} if v == "pretrained" else {}))  # sep trains nothing
            for v in ("pretrained", "sep") for s in (1, 2)]
    table = report.table(runs)
    row = next(line for line in table.splitlines() if line.startswith("| TF-IDF"))
    assert row == "| TF-IDF (no training) | 0.400 +- 0.000 | 0.600 +- 0.000 | 0.350 +- 0.000 |"
    # the last quarter: from step 600 (0.7, interpolated) to 800 (0.9); val NTP 0.85 to 0.8
    flat = next(line for line in table.splitlines() if line.startswith("| pretrained | 0.200"))
    assert flat == "| pretrained | 0.200 +- 0.000 | -0.050 +- 0.000 |"
    assert "Flattened on every seed: none; still learning: pretrained." in table
    # flattened: the last quarter adds at most 0.02 to what the variant trains; ntp-ft and
    # pretrained are judged on val NTP loss alone, nsp-ft on recall@1 alone
    level = [{"iter": 0, "val_ntp": 1.0, "recall@1": 0.0}, {"iter": 600, "val_ntp": 0.52,
             "recall@1": 0.88}, {"iter": 800, "val_ntp": 0.5, "recall@1": 0.9}]
    ntp_level = [dict(p, **{"recall@1": r}) for p, r in zip(level, (0.0, 0.1, 0.3))]
    nsp_level = [dict(p, val_ntp=v) for p, v in zip(level, (1.0, 0.9, 0.5))]
    lines = report.flatness([record("co0.5", 1, curve=level), record("nsp-ft", 1, curve=curve),
                             record("ntp-ft", 1, curve=ntp_level),
                             record("co0.1", 1, curve=ntp_level), record("sep", 1),
                             record("nsp-ft", 2, "pydoc", curve=nsp_level)], "facts")
    assert "Flattened on every seed: ntp-ft, co0.5; still learning: nsp-ft, co0.1." in lines
    assert "Flattened on every seed: nsp-ft." in report.flatness([record("nsp-ft", 2,
                                                                        curve=nsp_level)], "facts")
    # judged seed by seed too: flat on average is not flat on every seed
    still = [dict(p, **{"recall@1": r}) for p, r in zip(level, (0.0, 0.9, 0.9))]  # +0.00
    late = [dict(p, **{"recall@1": r}) for p, r in zip(still, (0.0, 0.8, 0.85))]  # +0.05
    lines = report.flatness([record("co0.5", s, curve=c) for s, c in
                             ((1, still), (2, still), (3, still), (4, late))], "facts")
    assert "Flattened on every seed: none; flattened on average: co0.5 (still gaining on seed 4)." \
        in lines
    # a val NTP loss that rises is over-fitting, never flat
    worse = [dict(p, val_ntp=v) for p, v in zip(level, (1.0, 0.5, 0.55))]  # +0.05 in the quarter
    lines = report.flatness([record("ntp-ft", 1, curve=worse)], "facts")
    assert "Flattened on every seed: none; val NTP loss rising (over-fitting, not flat): ntp-ft " \
        "(+0.050)." in lines


def test_the_generalisation_sentence_has_tf_idf_beside_it():
    runs = [record(v, s, answer_em_retrieval=0.5, reworded_answer_em_retrieval=a,
                   **{"recall@1": 0.5, "reworded_recall@1": r, "reworded_lexical_recall@1": 0.35})
            for s in (1, 2, 3) for v, a, r in (("co0.5", 0.4 + 0.01 * s, 0.45),
                                                ("sep", 0.2, 0.4 + 0.1 * s))]
    line = report.summary(runs)[2]
    assert line.startswith("  Generalisation (secondary; held-out questions in a wording no "
                           "training document uses), each metric at p < 0.05 (uncorrected): ")
    # answers: +0.21, +0.22, +0.23 (t = 38); recall@1: -0.05, -0.15, -0.25 (t = -2.6, p = 0.12)
    assert "co0.5 better than sep on answer EM (co0.5 - sep = +0.220, p < 0.001)" in line
    assert "no difference shown on recall@1 (co0.5 - sep = -0.150, p = 0.12" in line
    assert line.endswith("; TF-IDF's recall@1: 0.350 +- 0.000.")


def test_a_results_folder_never_mixes_budgets_or_settings(tmp_path):
    """runs.jsonl appended to by grids of another --iters (or other flags) holds a dataset's runs
    at two budgets: report.py refuses them, since every mean and pairing would mix them; two
    datasets, each at a budget of its own, are fine."""
    runs = [record(v, s, answer_em_retrieval=0.5, **{"recall@1": 0.5})
            for v in ("co0.5", "sep") for s in (1, 2)]
    later = [dict(r, steps="4+8", answer_em_retrieval=0.9) for r in runs]
    assert "#### facts: 2 seed(s), 4+6 steps" in report.table(runs)
    assert "#### pydoc: 2 seed(s), 4+8 steps" in report.table(
        runs + [dict(r, dataset="pydoc") for r in later])
    for mixed in (runs + later, runs + [dict(r, setting="other") for r in runs]):
        with pytest.raises(UserError, match="facts: runs at 2 budgets or settings"):
            report.table(mixed)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs + later))
    with pytest.raises(UserError, match=r"\(4\+6 \(setting None\), 4\+8 \(setting None\)\)"):
        report.main(["--results", str(tmp_path)])
    assert not (tmp_path / "table.md").exists()


def test_a_seed_twice_is_an_error_not_an_overwrite():
    """paired() keeps one value per variant and seed: a second run of the same seed (another
    budget or setting) would silently replace the first."""
    runs = [record(v, s, mrr=0.5) for v in ("co0.5", "sep") for s in (1, 2)]
    assert report.paired(runs, "co0.5", "sep", "mrr") == ([0.5, 0.5], [0.5, 0.5])
    with pytest.raises(UserError, match="sep has 2 runs of seed 2"):
        report.paired(runs + [record("sep", 2, steps="4+8", mrr=0.9)], "co0.5", "sep", "mrr")


def test_the_protocol_runs_the_two_tested_weights_and_flattening_budgets_by_default():
    cfg = grid.parse_config(grid.ExperimentConfig, "", [])[0]
    lambdas = grid.check(cfg)["facts"]
    assert (cfg.pretrain_iters, cfg.iters) == (800, 1600)
    assert set(grid.variants(cfg, lambdas)) == {"pretrained", "ntp-ft", "nsp-ft", "co0.1", "co0.5",
                                                "sep"}
    cfg = grid.parse_config(grid.ExperimentConfig, "", ["--scratch", "--lambdas", "0.1,0.5,2"])[0]
    assert {"scratch", "co2"} <= set(grid.variants(cfg, grid.check(cfg)["facts"]))


def test_protocol_runs_from_one_pretrained_start_reports_and_resumes(tmp_path, capsys):
    argv = ["--datasets", "facts", "--seeds", "1", "--pretrain_iters", "4", "--iters", "4",
            "--questions", "2", "--lambdas", "0.5", "--evals", "2", "--scratch",
            "--results", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work"),
            "--train_args", " ".join(TINY + ["--cache_dir", str(tmp_path / "cache")])]
    grid.main(argv)
    lines = (tmp_path / "results" / "runs.jsonl").read_text().splitlines()
    records = {(r["variant"], r["seed"]): r for r in map(json.loads, lines)}
    assert {v for v, _ in records} == {"pretrained", "ntp-ft", "nsp-ft", "co0.5", "sep", "scratch"}
    for seed in (1337,):
        pre = records["pretrained", seed]
        # every stage-2 run starts from the pretrained weights: its first evaluation is theirs
        for variant in ("ntp-ft", "nsp-ft", "co0.5"):
            first = records[variant, seed]["curve"][0]
            assert (first["val_ntp"], first["recall@1"]) == (pre["val_ntp"], pre["recall@1"])
        assert records["scratch", seed]["curve"][0]["val_ntp"] != pre["val_ntp"]
        assert [c["iter"] for c in records["scratch", seed]["curve"]] == [0, 4, 8]  # 2 evals
        # sep by another path: evaluate.py, ntp-ft's Gen writing, nsp-ft's networks retrieving
        cfg = grid.parse_config(grid.ExperimentConfig, "", argv)[0]
        sep, run = records["sep", seed], lambda *cell: grid.run_dir(cfg, *cell)
        eval_script.main(["--out_dir", run("facts", "ntp-ft", seed), "--query_from",
                          run("facts", "nsp-ft", seed), "--questions", "2"])
        other = json.loads(open(next(p for p in glob.glob(run("facts", "ntp-ft", seed) + "/*.json")
                                     if "query_from" in p)).read())
        assert sep["answer_em_retrieval"] == other["val"]["answer_em_retrieval"]
        assert sep["reworded_recall@1"] == pytest.approx(other["val_reworded"]["recall@1"])
        assert sep["recall@1"] == pytest.approx(other["val"]["recall@1"])
        assert sep["reworded_lexical_recall@1"] == other["val_reworded"]["lexical_recall@1"]
        assert "answer_em_no_retrieval" in records["ntp-ft", seed]
        ckpt = torch.load(run("facts", "co0.5", seed) + "/ckpt.pt", weights_only=False)
        assert ckpt["config"]["nsp_lr_scale"] == 1  # as the committed records ran, by any default
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| co0.5 |" in table and "| sep |" in table and "| scratch |" in table
    assert "- **facts**: co-supervision (co0.5) minus separate supervision (sep)" in table
    assert (tmp_path / "results" / "curves_facts.png").stat().st_size > 1000
    grid.main(argv)   # everything is in runs.jsonl: nothing is run again
    assert (tmp_path / "results" / "runs.jsonl").read_text().splitlines() == lines
    assert "6 runs in the protocol, 6 already in" in capsys.readouterr().out


def test_answers_write_with_one_run_and_retrieve_with_the_other(run_train, monkeypatch):
    """sep: OUT's Gen writes; QUERY_FROM's Gen makes the queries, its Emb_seq the datastore."""
    from train import load_run
    from machinery.datastore_file import build
    a, _ = run_train("--max_iters", "2", "--eval_interval", "2", name="a")
    b, _ = run_train("--max_iters", "2", "--eval_interval", "2", "--seed", "7", name="b")
    seen = []
    monkeypatch.setattr(grid, "answer_metrics", lambda gen, store, data, tok, split, n, query_gen,
                        *rest, **kw: seen.append((gen, store, query_gen)) or {})

    def same(module, run, part):
        ckpt = torch.load(run / "ckpt.pt", weights_only=False)[part]
        return all(torch.equal(p, ckpt[k]) for k, p in module.state_dict().items())
    grid.answers(str(a), 1, query_from=str(b))
    grid.answers(str(a), 1)
    (writer, store, queries), (own_writer, own_store, own_queries) = seen[0], seen[2]
    assert same(writer, a, "gen") and same(queries, b, "gen") and not same(queries, a, "gen")
    _, _, emb_b, data, _ = load_run(str(b), "cpu")
    assert torch.equal(store.embeddings, build(emb_b, data, progress=False).embeddings)
    assert same(own_writer, a, "gen") and own_queries is None  # its own Gen queries
    _, _, emb_a, _, _ = load_run(str(a), "cpu")
    assert torch.equal(own_store.embeddings, build(emb_a, data, progress=False).embeddings)


def test_init_from_copies_the_weights(run_train):
    a, _ = run_train("--max_iters", "10", "--eval_interval", "10", "--lambda_seq", "0", name="a")
    b, _ = run_train("--max_iters", "0", "--init_from", str(a), name="b")
    ckpt_a, ckpt_b = (torch.load(d / "ckpt.pt", weights_only=False) for d in (a, b))
    for part in ("gen", "embedder"):
        for name, p in ckpt_a[part].items():
            assert torch.equal(p, ckpt_b[part][name]), name
    with pytest.raises(UserError, match="another shape"):
        run_train("--max_iters", "0", "--init_from", str(a), "--n_embd", "64", name="c")


def test_numbered_text_has_no_sentence_twice(tmp_path):
    from experiments import texts
    texts.main(["--numbered", "2", "--out_dir", str(tmp_path)])
    text = open(tmp_path / "numbered_2mb.txt", encoding="utf-8").read()
    assert len(text.encode()) >= 2_000_000
    numbers = [int(n) for n in re.findall(r" \(s(\d+)\)[.!?]\s", text)]
    assert len(numbers) > 5_000 and numbers == list(range(len(numbers)))  # every end, once


def test_band_reads_the_last_quarter_and_the_spread():
    from experiments import band
    # evaluations at 0, 400, 800, 1200: three quarters is step 900, a quarter of the way from
    # 800 (0.6) to 1200 (1.0), 0.7: the last quarter added 0.3
    curve = [{"iter": i, "recall@1": v} for i, v in ((0, 0.0), (400, 0.2), (800, 0.6), (1200, 1.0))]
    assert band.last_quarter_gain(curve) == pytest.approx(0.3)
    runs = [{"seed": s, "threads": 1, "cpu": "avx2", **{k: 0.0 for k in band.METRICS},
             "recall@1": v} for s, v in ((1, 0.90), (2, 0.94), (3, 0.98))]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in band.table(runs).splitlines()}
    col = band.METRICS.index("recall@1") + 3
    assert [rows[s][col] for s in ("mean", "sd", "min", "max", "max - min")] == \
        ["0.940", "0.040", "0.900", "0.980", "0.080"]


def test_band_never_reuses_runs_made_under_other_defaults(tmp_path, monkeypatch):
    """A band's records name their flags, and those do not say what ran once a default of
    train.py changes: a record made under other defaults is an error, never a reused run."""
    from experiments import band
    record = {"name": "default", "train_args": "", "defaults": band.defaults(), "seed": 1,
              "threads": 1, "cpu": "avx2", **{k: 0.5 for k in band.METRICS}}
    (tmp_path / "default.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["--seeds", "1", "--threads", "1", "--results", str(tmp_path)]
    band.main(argv)  # the run is there, under today's defaults: nothing trains
    assert "| 1 | 1 | avx2 | 0.500 |" in (tmp_path / "default.md").read_text()
    config = band.Config
    monkeypatch.setattr(band, "Config", lambda: config(nsp_lr_scale=1))  # another default
    with pytest.raises(UserError, match="other train.py defaults"):
        band.main(argv)


def test_band_runs_on_a_text_and_leaves_what_a_text_lacks_blank(tmp_path):
    """A band on a text (a tiny model, a few steps): no answers are asked for, and the records
    carry what a text has, re-ranking TF-IDF's candidates and its paired difference."""
    from experiments import band
    from conftest import write
    text = write(str(tmp_path / "boxes.txt"), " ".join(
        f"Box {i} holds a {['red', 'blue', 'green'][i % 3]} ball number {i * 7}."
        for i in range(80)))
    train_args = TINY + ["--dataset", text, "--max_iters", "2", "--eval_interval", "2",
                         "--cache_dir", str(tmp_path / "cache")]
    results = tmp_path / "results"
    band.main(["--name", "text", "--seeds", "1", "--threads", "1", "--results", str(results),
               "--work_dir", str(tmp_path / "work"), "--train_args", " ".join(train_args)])
    r, = [json.loads(line) for line in (results / "text.jsonl").read_text().splitlines()]
    val = r["eval"]["val"]
    assert r["answer_em_retrieval"] is None and "answer_em_retrieval" not in val
    assert {k: r[k] for k in band.TEXT_METRICS} == {k: val[k] for k in band.TEXT_METRICS}
    assert r["reranked_mrr_minus_first_stage"] == pytest.approx(r["reranked_mrr"] -
                                                                r["first_stage_mrr"])
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")
            for line in (results / "text.md").read_text().splitlines()[2:]}
    head = [c.strip() for c in rows["seed"]]
    answers, reranked = head.index("answer_em_retrieval"), head.index("reranked_mrr")
    assert rows["1"][answers].strip() == rows["mean"][answers].strip() == ""   # blank
    assert rows["mean"][reranked].strip() == f"{r['reranked_mrr']:.3f}"


def test_band_pools_seeds_on_the_same_markers_into_one_paired_interval():
    """The pooled difference averages each marker's 1/rank over the runs before it pairs them
    with TF-IDF's: by hand, runs [1, 1/2, 1/4, 1] and [1/2, 1/2, 1/4, 1] against TF-IDF's
    [1/2, 1/2, 1/2, 1/2] give (3/4 - 1/2 + 0 - 1/4 + 1/2) / 4 = 1/8. Runs of other markers
    refuse."""
    from experiments import band
    tfidf = [0.5, 0.5, 0.5, 0.5]
    runs = [{"eval": {"val": {"reciprocal_ranks": {"reranked": r, "first_stage": tfidf}}}}
            for r in ([1, 0.5, 0.25, 1], [0.5, 0.5, 0.25, 1])]
    diff, (lo, hi), p = band.pooled_difference(runs)
    assert diff == pytest.approx(0.125)
    assert lo <= 0.125 <= hi and 0 < p <= 1
    runs[1]["eval"]["val"]["reciprocal_ranks"]["first_stage"] = [0.5, 0.5, 0.5]
    with pytest.raises(UserError, match="cannot be pooled"):
        band.pooled_difference(runs)


def test_the_held_out_novel_is_cut_at_its_title_lines():
    from experiments import texts
    book = "\n".join(["Contents", "  The Hound of the Baskervilles", "  The Valley of Fear",
                      "   THE SIGN OF THE FOUR", "Sign.", "   THE HOUND OF THE BASKERVILLES",
                      "Hound one.", "Hound two.", "   THE VALLEY OF FEAR", "Valley."])
    base, hound = texts.cut_hound(book)
    assert hound == "   THE HOUND OF THE BASKERVILLES\nHound one.\nHound two."
    assert base.split("\n") == book.split("\n")[:5] + book.split("\n")[8:]
    with pytest.raises(UserError, match="title line"):
        texts.cut_hound(book.replace("THE VALLEY OF FEAR", "THE END"))

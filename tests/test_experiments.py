"""experiments/grid.py's grid on a tiny config, report.py's statistics, and train.py --init_from."""
import json

import pytest
import torch

from experiments import grid as experiments
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


def record(variant, seed, **metrics):
    return {"dataset": "facts", "variant": variant, "seed": seed, "iters": 10, **metrics}


def test_paired_test_picks_the_best_baseline_per_metric():
    runs = [record("ntp", s, **{"recall@1": 0.0, "answer_em_retrieval": 0.1,
                                "answer_em_no_retrieval": 0.2 + s / 100}) for s in (1, 2, 3)]
    runs += [record("nsp", s, **{"recall@1": 0.5 + s / 100, "answer_em_retrieval": 0.0})
             for s in (1, 2, 3)]
    runs += [record("co0.5", s, **{"recall@1": 0.6 + s / 50, "answer_em_retrieval": 0.3})
             for s in (1, 2, 3)]
    lines = report.paired(runs, "facts", [m for m in report.METRICS if m[0] != "val_ntp"])
    recall = next(line for line in lines if "recall@1" in line)
    answer = next(line for line in lines if "answer EM" in line)
    assert "vs nsp" in recall and "better in 3 of 3" in recall
    assert "vs ntp, Gen alone" in answer     # 0.22 on average beats ntp's 0.1 with retrieval
    assert "difference +0.080" in answer
    assert not any("pre minus sep" in line for line in lines)
    runs += [record(v, s, **{"recall@1": r}) for s in (1, 2, 3) for v, r in (("pre", 0.9),
                                                                              ("sep", 0.5 + s / 100))]
    lines = report.paired(runs, "facts", [m for m in report.METRICS if m[0] == "recall@1"])
    after = lines[lines.index(next(line for line in lines if "pre minus sep" in line)):]
    assert any("pre 0.900 +- 0.000 vs sep" in line and "difference +0.380" in line
               for line in after)


def test_grid_runs_reports_and_resumes(tmp_path, capsys):
    argv = ["--datasets", "facts", "--seeds", "1", "--iters", "6", "--questions", "2",
            "--lambdas", "0.5", "--results", str(tmp_path / "results"),
            "--work_dir", str(tmp_path / "work"),
            "--train_args", " ".join(TINY + ["--cache_dir", str(tmp_path / "cache")])]
    experiments.main(argv)
    runs = (tmp_path / "results" / "runs.jsonl").read_text().splitlines()
    records = {r["variant"]: r for r in map(json.loads, runs)}
    assert set(records) == {"ntp", "nsp", "sep", "co0.5", "pre"}
    assert records["sep"]["val_ntp"] == records["ntp"]["val_ntp"]       # ntp's Gen writes
    assert records["sep"]["recall@1"] == records["nsp"]["recall@1"]     # nsp's Gen retrieves
    assert "answer_em_no_retrieval" in records["ntp"]
    assert [c["iter"] for c in records["co0.5"]["curve"]] == list(range(7))  # every iters // 5
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| co0.5 |" in table and "one seed: no test" in table
    for name in ("lambda_facts.png", "curves_facts.png"):
        assert (tmp_path / "results" / name).stat().st_size > 1000
    experiments.main(argv)   # everything is in runs.jsonl: nothing is run again
    assert (tmp_path / "results" / "runs.jsonl").read_text().splitlines() == runs
    assert "5 runs in the grid, 5 already in" in capsys.readouterr().out


def test_bad_lambdas_are_one_line_errors():
    with pytest.raises(UserError, match="lambda_seq > 0"):
        experiments.main(["--lambdas", "0,1"])
    with pytest.raises(UserError, match="comma-separated"):
        experiments.main(["--lambdas", "a"])


def test_init_from_copies_the_weights(run_train):
    a, _ = run_train("--max_iters", "10", "--eval_interval", "10", "--lambda_seq", "0", name="a")
    b, _ = run_train("--max_iters", "0", "--init_from", str(a), name="b")
    ckpt_a, ckpt_b = (torch.load(d / "ckpt.pt", weights_only=False) for d in (a, b))
    for part in ("gen", "embedder"):
        for name, p in ckpt_a[part].items():
            assert torch.equal(p, ckpt_b[part][name]), name
    with pytest.raises(UserError, match="another shape"):
        run_train("--max_iters", "0", "--init_from", str(a), "--n_embd", "64", name="c")

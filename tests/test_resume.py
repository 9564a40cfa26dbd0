"""Crashes, Ctrl-C, divergence and --resume: a checkpoint is always whole and finite, and a resumed
run goes on exactly as if it had never stopped."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate as eval_script
import train
from machinery.config import Config
from machinery.checkpoint import CHECKPOINT_KEYS, open_log
from train import build_models
from machinery.cli import Interrupted, UserError
from conftest import TINY

TIMING = ("ms_per_iter", "tokens_per_s")


def _numbers(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def _whole_checkpoint(path):
    """Load a checkpoint as sample.py would: every part there, the weights finite and loadable."""
    ckpt = torch.load(path, weights_only=False)
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    gen, emb = build_models(Config(**ckpt["config"]), ckpt["gen_config"]["vocab_size"])
    gen.load_state_dict(ckpt["gen"])
    emb.load_state_dict(ckpt["embedder"])
    assert all(torch.isfinite(p).all() for p in list(gen.parameters()) + list(emb.parameters()))
    return ckpt


INTERRUPTIBLE = ("--max_iters", "24", "--eval_interval", "8", "--dropout", "0.1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the interrupted ones must equal: its out_dir and log, trained once."""
    d = tmp_path_factory.mktemp("whole")
    train.main(TINY + ["--out_dir", str(d / "run"), "--cache_dir", str(d / "cache"),
                       *INTERRUPTIBLE])
    return d / "run", [json.loads(line) for line in open(d / "run" / "log.jsonl")]


@pytest.mark.parametrize("stop_at", [13, 15])  # stops after the step: at 14, or at 16 (an eval)
def test_interrupted_and_resumed_equals_uninterrupted(run_train, monkeypatch, stop_at,
                                                      uninterrupted):
    whole_dir, whole = uninterrupted
    lr = train.learning_rate

    def ctrl_c_at(it, cfg):  # a real SIGINT to this process, at a known iteration
        if it == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return lr(it, cfg)

    monkeypatch.setattr(train, "learning_rate", ctrl_c_at)
    drawn = []  # the last evaluation curves.png shows
    monkeypatch.setattr(train, "plot_run", lambda log, png, chance: drawn.append(
        json.loads(open(log).read().splitlines()[-1])["iter"]))
    with pytest.raises(Interrupted, match=f"holds iteration {stop_at + 1}; .* --resume"):
        run_train(*INTERRUPTIBLE, name="parts")
    assert drawn[-1] == (stop_at + 1) // 8 * 8  # the picture shows the log's last evaluation
    monkeypatch.setattr(train, "learning_rate", lr)
    out, parts = run_train(*INTERRUPTIBLE, "--resume", name="parts")
    # the same numbers at every evaluation (dropout and batch order included), logged once each
    assert [_numbers(r) for r in parts] == [_numbers(r) for r in whole]
    a, b = (torch.load(d / "ckpt.pt", weights_only=False) for d in (whole_dir, out))
    assert all(torch.equal(a["gen"][k], b["gen"][k]) for k in a["gen"])
    assert all(torch.equal(a["embedder"][k], b["embedder"][k]) for k in a["embedder"])


def test_a_stop_signal_saves_and_says_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM (how schedulers stop a job), each to a run of its own; the two
    run at once, to save the time of starting Python twice."""
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        runs[sig] = out, subprocess.Popen(
            [sys.executable, "train.py", *TINY, "--max_iters", "100000", "--eval_interval",
             "100000", "--out_dir", str(out), "--cache_dir", str(tmp_path / f"cache_{sig.name}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})  # a core each
    try:
        for sig, (out, p) in runs.items():
            while not (out / "ckpt.pt").exists():  # iteration 0 is saved: training has begun
                assert p.poll() is None, p.communicate()
                time.sleep(0.05)
            p.send_signal(sig)
        errs = {sig: p.communicate(timeout=60)[1] for sig, (_, p) in runs.items()}
    finally:
        for _, p in runs.values():
            p.kill()
    for sig, (out, p) in runs.items():
        err = errs[sig]
        last = err.strip().splitlines()[-1]
        assert p.returncode == 130 and "Traceback" not in err, (sig, err)
        assert last.startswith(f"interrupted: {out / 'ckpt.pt'} holds iteration ")
        assert last.endswith("--resume") and "--max_iters 100000" in last
        it = int(last.split("holds iteration ")[1].split(";")[0])
        assert _whole_checkpoint(out / "ckpt.pt")["iter"] == it > 0
        # the command it printed continues the run (here only one step further)
        argv = shlex.split(last.split("continue with: ")[1])[2:]  # after "python train.py"
        train.main(argv + ["--max_iters", str(it + 1)])
        assert [json.loads(line)["iter"] for line in open(out / "log.jsonl")] == [0, it + 1]


def test_sigkill_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    """Kill -9 a run repeatedly, at a save (as soon as ckpt.pt.tmp appears) or at a random moment,
    then resume it: ckpt.pt always loads whole, and the log never repeats an iteration."""
    out, rng = tmp_path / "run", np.random.default_rng(0)
    ckpt, tmp = out / "ckpt.pt", out / "ckpt.pt.tmp"
    args = [sys.executable, "train.py", *TINY, "--max_iters", "100000", "--eval_interval", "2",
            "--eval_iters", "1", "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    iters = []
    for round in range(3):
        saved, saving = _mtime(ckpt), _mtime(tmp)  # a killed save leaves its .tmp behind
        p = subprocess.Popen(args + (["--resume"] if saved else []), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            # rounds 0 and 2: at a random moment after a new save; round 1: as a save begins
            while _mtime(tmp if round % 2 else ckpt) in (None, saving if round % 2 else saved):
                assert p.poll() is None, p.communicate()
                time.sleep(0.0005)
            if round % 2 == 0:
                time.sleep(rng.uniform(0, 0.3))
        finally:
            p.kill()
            p.communicate()
        iters.append(_whole_checkpoint(ckpt)["iter"])
    assert iters == sorted(iters)
    logged = []
    for line in open(out / "log.jsonl"):
        try:
            logged.append(json.loads(line)["iter"])
        except ValueError:  # the last line, cut by the kill
            pass
    assert logged == sorted(set(logged))


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def test_resume_keeps_the_log_until_its_iteration_and_drops_cut_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"iter": i}) + "\n" for i in (0, 2, 4)) + '{"iter": 6, "tr')
    cfg = SimpleNamespace(out_dir=str(tmp_path), overwrite=False, resume=True)
    open_log(cfg, 2).close()
    assert [json.loads(line)["iter"] for line in open(path)] == [0, 2]


@pytest.mark.parametrize("poison, at, message", [
    ("loss", 5, "the loss is not finite at iteration 5"),
    ("gradient", 7, "the weights are not finite at iteration 8"),  # the loss itself stays finite
])
def test_divergence_stops_and_never_saves_nan(run_train, tmp_path, monkeypatch, poison, at,
                                              message):
    real, steps = train.co_supervision_loss, []

    def poisoned(gen, *args, **kwargs):
        loss, stats = real(gen, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            steps.append(len(steps))
            if steps[-1] == at:
                w = gen.transformer.wte.weight.sum()
                loss = loss * float("nan") if poison == "loss" else loss + (0 * w).sqrt()
        return loss, stats

    monkeypatch.setattr(train, "co_supervision_loss", poisoned)
    with pytest.raises(UserError, match=f"{message}: .* holds the last good iteration, 4"):
        run_train("--max_iters", "20", "--eval_interval", "4", name="nan")
    out = tmp_path / "nan"
    assert _whole_checkpoint(out / "ckpt.pt")["iter"] == 4
    assert [json.loads(line)["iter"] for line in open(out / "log.jsonl")] == [0, 4]


@pytest.mark.draws
def test_an_out_dir_with_a_checkpoint_needs_resume_or_overwrite(run_train):
    out, _ = run_train("--max_iters", "4", "--eval_interval", "2")
    before = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()
    with pytest.raises(UserError, match="ckpt.pt already exists: pass --resume to continue it or "
                                        "--overwrite to start over"):
        run_train("--max_iters", "4", "--eval_interval", "2")
    assert ((out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()) == before
    with pytest.raises(UserError, match="contradict"):
        run_train("--max_iters", "4", "--resume", "--overwrite")
    eval_script.main(["--out_dir", str(out), "--questions", "0"])  # eval.json, datastore.pt
    old = {"eval.json", "datastore.pt", "eval_query_from_other.json", "ckpt.pt.tmp"}
    for name in old - {"eval.json", "datastore.pt"}:  # as other scripts and a crash leave them
        (out / name).write_text("the old run's")
    (out / "notes.txt").write_text("the user's")
    assert old <= {p.name for p in out.iterdir()}
    _, log = run_train("--max_iters", "2", "--eval_interval", "2", "--overwrite")
    assert [r["iter"] for r in log] == [0, 2]  # a new log, not the old one continued
    # nothing of the old run is left to be read with the new checkpoint; the rest stays
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "curves.png", "log.jsonl",
                                                     "notes.txt", "provenance.json"]

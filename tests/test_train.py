import json
import sys

import pytest
import torch

import train
from machinery.config import Config
from train import build_models, make_optimizer
from conftest import write_tiktoken


@pytest.mark.draws
def test_short_run_drives_both_losses_down(run_train):
    out, log = run_train("--max_iters", "80", "--eval_interval", "80", "--nsp_start", "0",
                         "--lambda_seq", "1")
    first, last = log[0], log[-1]
    assert last["train_ntp"] < first["train_ntp"] - 1.0
    assert last["train_nsp"] < first["train_nsp"] - 0.5
    assert set(last) >= {"iter", "train_ntp", "val_ntp", "val_nsp", "recall@1", "recall@10", "mrr",
                         "lr", "ms_per_iter", "tokens_per_s"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the run's picture
    assert not (out / "curves.png.tmp").exists()


@pytest.mark.draws
def test_a_text_runs_picture_adds_the_two_stage_panel(tmp_path):
    from machinery.plots import plot_run
    record = {"iter": 0, "train_ntp": 5.0, "val_ntp": 5.0, "recall@1": 0.0, "mrr": 0.01,
              "lexical_recall@1": 0.1, "lexical_mrr": 0.2}
    two_stage = {"reranked_recall@1": 0.05, "reranked_mrr": 0.1, "first_stage_recall@K": 0.4,
                 "first_stage_recall@1": 0.02, "first_stage_mrr": 0.06, "first_stage_k": 100}
    widths = []
    for name, extra in (("facts", {}), ("text", two_stage)):
        log = tmp_path / name / "log.jsonl"
        log.parent.mkdir()
        log.write_text("".join(json.dumps({**record, **extra, "iter": i}) + "\n" for i in (0, 10)))
        plot_run(str(log), str(tmp_path / name / "curves.png"), {"recall@1": 0.01, "mrr": 0.02})
        png = (tmp_path / name / "curves.png").read_bytes()
        widths.append(int.from_bytes(png[16:20], "big"))  # the PNG header's width
    assert widths == [1000, 1500]  # two panels, then three (10 and 15 inches at 100 dpi)


def test_the_picture_follows_the_log_and_ends_with_it(run_train, monkeypatch):
    """curves.png is drawn at every evaluation, the last included: each drawing reads the log up
    to the evaluation just written."""
    seen = []
    monkeypatch.setattr(train, "plot_run", lambda log, png, chance: seen.append(
        json.loads(open(log).read().splitlines()[-1])["iter"]))
    run_train("--max_iters", "10", "--eval_interval", "5")
    assert seen == [0, 5, 10]


def test_same_seed_same_losses(run_train):
    args = ("--max_iters", "12", "--eval_interval", "6", "--nsp_start", "3")
    _, a = run_train(*args, name="a")
    _, b = run_train(*args, name="b")
    _, c = run_train("--max_iters", "0", "--seed", "7", name="c")  # its first evaluation only
    keys = ("train_ntp", "val_ntp", "val_nsp", "recall@1", "mrr")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[0]["train_ntp"] != c[0]["train_ntp"]  # another seed: other weights, other batches


def test_lambda_seq_zero_leaves_the_embedder_untouched(run_train):
    out, _ = run_train("--max_iters", "30", "--eval_interval", "30", "--nsp_start", "0",
                       "--lambda_seq", "0")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    torch.manual_seed(ckpt["config"]["seed"])  # the same init as the run: Gen first, then Emb_seq
    gen, emb = build_models(Config(**ckpt["config"]), ckpt["gen_config"]["vocab_size"])
    for name, p in emb.state_dict().items():
        assert torch.equal(p, ckpt["embedder"][name]), name
    wte = "transformer.wte.weight"
    assert not torch.equal(gen.state_dict()[wte], ckpt["gen"][wte])


def test_checkpoint_round_trip_and_resume(run_train, tmp_path):
    out, log = run_train("--max_iters", "20", "--eval_interval", "10")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter"] == 20 and ckpt["metrics"] == log[-1]
    gen, emb = build_models(Config(**ckpt["config"]), ckpt["gen_config"]["vocab_size"])
    gen.load_state_dict(ckpt["gen"])
    emb.load_state_dict(ckpt["embedder"])
    _, log2 = run_train("--max_iters", "30", "--eval_interval", "10", "--resume")
    assert [r["iter"] for r in log2] == [0, 10, 20, 30]  # appended to the same log


def test_the_parts_only_l_nsp_trains_warm_up_when_it_joins_late():
    cfg = Config(nsp_start=50, warmup_iters=9, max_iters=200, nsp_lr_scale=1)
    gen, emb = build_models(cfg, 258)
    optimizer = make_optimizer(cfg, gen, emb, "cpu")
    nsp = {id(p) for g in optimizer.param_groups if g["nsp"] for p in g["params"]}
    shared = {id(p) for g in optimizer.param_groups if not g["nsp"] for p in g["params"]}
    assert nsp == {id(p) for p in [*gen.seq_head.parameters(), *emb.parameters()]}
    assert not nsp & shared and len(nsp | shared) == len(list(gen.parameters())) + len(
        list(emb.parameters()))
    assert [train.nsp_lr_scale(it, cfg) for it in (0, 49, 50, 54, 58, 59, 150)] == [
        0, 0, 0.1, 0.5, 0.9, 1, 1]
    assert train.nsp_lr_scale(0, Config(nsp_start=0, nsp_lr_scale=1)) == 1  # the shared warmup
    # the default: on facts those parts peak at 0.3 of the learning rate, from whichever step;
    # on a text at the full rate
    facts = train.configure(["--nsp_start", "50", "--warmup_iters", "9"])
    assert [train.nsp_lr_scale(it, facts) for it in (54, 150)] == [pytest.approx(0.15),
                                                                    pytest.approx(0.3)]
    assert train.nsp_lr_scale(7, Config(nsp_start=0, nsp_lr_scale=0.3)) == pytest.approx(0.3)
    text = train.configure(["--dataset", "pydoc"])
    assert text.nsp_lr_scale == 1


def test_trains_with_a_local_gpt2_file(run_train, tmp_path, monkeypatch):
    # a fresh interpreter has not imported tiktoken's submodule `load` (other tests may have)
    monkeypatch.delitem(sys.modules, "tiktoken.load", raising=False)
    monkeypatch.delattr("tiktoken.load", raising=False)
    path = write_tiktoken(tmp_path / "gpt2.tiktoken")
    out, log = run_train("--tokenizer", "gpt2", "--gpt2_file", path, "--max_iters", "2",
                         "--eval_interval", "2")
    assert [r["iter"] for r in log] == [0, 2]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["tokenizer"]["name"] == "gpt2" and ckpt["gen_config"]["vocab_size"] == 261


@pytest.mark.parametrize("args, iters, interval", [
    ([], 1200, 300), (["--dataset", "pydoc"], 2400, 600), (["--dataset", "pydoc", "--max_iters",
     "100"], 100, 600), (["--max_iters", "40", "--eval_interval", "7"], 40, 7)])
def test_steps_default_to_the_corpus_kind(args, iters, interval):
    """-1 settles to 1200 steps on facts and 2400 on text (which needs twice the steps), and the
    evaluations to a quarter of those; a value the user gives is kept."""
    cfg = train.configure(args)
    assert (cfg.max_iters, cfg.eval_interval) == (iters, interval)


def test_a_run_from_another_runs_weights_draws_batches_of_its_own(run_train, tmp_path,
                                                                   monkeypatch):
    """Stage 2 of the grid starts from stage 1's weights (--init_from) with stage 1's seed: it
    must not train on stage 1's batches again, in their order. A plain run's batches stay its
    seed's: get_batch with default_rng(seed)."""
    import numpy as np
    from data import load_data
    from conftest import TINY
    real, drawn = train.co_supervision_loss, []

    def spy(gen, embedder, batch, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            drawn.append(batch.x.clone())
        return real(gen, embedder, batch, *args, **kwargs)
    monkeypatch.setattr(train, "co_supervision_loss", spy)
    argv = ["--max_iters", "3", "--eval_interval", "3"]
    start, _ = run_train(*argv, name="start")
    first = drawn[:]
    cfg = train.configure(TINY + ["--cache_dir", str(tmp_path / "cache")])
    data, _ = load_data(cfg)
    rng = np.random.default_rng(cfg.seed)
    for x in first:
        want = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives, cfg.emb_block_size)
        assert torch.equal(x, want.x)
    drawn.clear()
    run_train(*argv, "--init_from", str(start), name="stage2")
    assert len(drawn) == 3 and not any(torch.equal(a, b) for a in first for b in drawn)


def test_val_retrieval_is_scored_on_its_first_val_markers(run_train, monkeypatch, capsys):
    """Past VAL_MARKERS val markers, every val retrieval figure, TF-IDF's too, is scored on the
    first VAL_MARKERS alone, and the run says so: each share's interval is that of n = 10."""
    from machinery.intervals import share_interval
    monkeypatch.setattr(train, "VAL_MARKERS", 10)
    _, log = run_train("--max_iters", "0")  # the tiny world's val: 72 markers
    assert "val scored on its first 10 markers" in capsys.readouterr().out
    for key in ("recall@10", "lexical_recall@10", "first_stage_recall@K", "reranked_recall@10"):
        hits = round(log[-1][key] * 10)
        assert log[-1][key] == hits / 10 and log[-1][f"{key}_ci"] == share_interval(hits, 10)

"""Two processes (gloo, CPU) take the same step as one process on their two batches together,
and train.py runs under torchrun."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from machinery import distributed
from machinery.cli import Interrupted, UserError, main_guard
import train
from machinery.config import Config
from data import Batch, load_data
from embedder import EmbedderConfig, SeqEmbedder
from losses import co_supervision_loss
from conftest import TINY
from model import Gen, GenConfig

SEQ_LEN, LAMBDA_TOK, LAMBDA_SEQ, TAU = 16, 1.0, 0.5, 0.1


def _models(vocab_size):
    torch.manual_seed(0)
    return (Gen(GenConfig(vocab_size, 96, 1, 2, 16, 8)),
            SeqEmbedder(EmbedderConfig(vocab_size, SEQ_LEN, 1, 2, 16, 8)))


def _without_markers(batch):
    empty = torch.zeros(0, dtype=torch.long)
    return batch._replace(marker_index=(empty, empty), target_row=empty, candidate_ids=empty,
                          candidates=torch.zeros(0, 1, dtype=torch.long),
                          candidate_mask=torch.zeros(0, 1, dtype=torch.bool),
                          neighbours=batch.neighbours[:0])


def _near(batch, ids):
    """The batch with ids (k,) the likely false negatives of each of its markers."""
    return batch._replace(neighbours=ids[None, :].repeat(len(batch.target_row), 1))


def _cases(data):
    """Each case: the batches of rank 0 and rank 1."""
    def batch(seed, size):
        return data.get_batch("train", size, np.random.default_rng(seed), 2, SEQ_LEN)
    a, b = batch(1, 3), batch(37, 3)
    return {"own rngs": [a, b],
            "rank 1 has no marker": [batch(3, 3), _without_markers(batch(4, 3))],
            "every candidate in both": [batch(5, 3), batch(5, 3)],
            # each rank's markers name candidates of the other's as false negatives
            "false negatives": [_near(a, b.candidate_ids[:2]), _near(b, a.candidate_ids[1:3])]}


def _combine(data, batches):
    """The batches as one: windows stacked, candidates united, each sequence once."""
    ids = torch.unique(torch.cat([b.candidate_ids for b in batches]))
    tokens, mask = data.pad_sequences(ids.numpy(), SEQ_LEN)
    offsets = np.cumsum([0] + [len(b.x) for b in batches])
    rows = torch.cat([b.marker_index[0] + int(o) for b, o in zip(batches, offsets)])
    cols = torch.cat([b.marker_index[1] for b in batches])
    target_row = torch.cat([torch.searchsorted(ids, b.candidate_ids[b.target_row])
                            for b in batches])
    return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]),
                 (rows, cols), tokens, mask, target_row, ids,
                 torch.cat([b.neighbours for b in batches]))


def _step(gen, emb, batch, gather):
    """One forward and backward; the loss parts and every gradient."""
    gen.zero_grad(set_to_none=True), emb.zero_grad(set_to_none=True)
    gather_fn, lambda_seq = train.across_processes(batch, LAMBDA_SEQ, 2 if gather else 1)
    loss, stats = co_supervision_loss(gen, emb, batch, LAMBDA_TOK, lambda_seq, TAU, gather_fn)
    loss.backward()
    named = list(gen.module.named_parameters() if gather else gen.named_parameters())
    named += list(emb.module.named_parameters() if gather else emb.named_parameters())
    return {"ntp": stats["ntp"].item(), "nsp": stats["nsp"].item(),
            "grads": {n: p.grad.clone() for n, p in named}}


def _as_torchrun_would(rank, port):
    """This process: rank `rank` of 2, as torchrun would start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _worker(rank, port, cache_dir, out_dir):
    _as_torchrun_would(rank, port)
    _, _, device = distributed.setup("cpu")
    try:
        data, tok = load_data(Config(facts_people=60, block_size=96, cache_dir=cache_dir))
        gen, emb = _models(tok.vocab_size)
        gen, emb = distributed.wrap(gen, device, find_unused=True), distributed.wrap(emb, device)
        results = {name: _step(gen, emb, batches[rank], gather=True)
                   for name, batches in _cases(data).items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # DDP's reducers hold the process group: freed after the group was destroyed, the last
        # reference drops inside their destructor with the GIL held, and gloo's destructor then
        # waits for a thread that waits for the GIL (a hang at exit, 1 run in 15 here)
        gen = emb = None
        distributed.teardown(together=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_combined_batch(tiny_data, tmp_path):
    data, tok = tiny_data
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    cases = _cases(data)
    # the ranks' candidate sets differ in size, so the gather pads; some candidates are shared
    own = cases["own rngs"]
    assert len(own[0].candidate_ids) != len(own[1].candidate_ids)
    for name, batches in cases.items():
        gen, emb = _models(tok.vocab_size)
        want = _step(gen, emb, _combine(data, batches), gather=False)
        got = [r[name] for r in ranks]
        # L_NSP over all markers against all candidates; L_NTP: the mean of the two means
        assert abs(got[0]["nsp"] - want["nsp"]) < 1e-5 and got[0]["nsp"] == got[1]["nsp"], name
        assert abs((got[0]["ntp"] + got[1]["ntp"]) / 2 - want["ntp"]) < 1e-5, name
        for g in got:
            for param, grad in want["grads"].items():
                assert torch.allclose(g["grads"][param], grad, rtol=0, atol=1e-5), (name, param)


def test_torchrun_two_processes_train_log_and_save_once(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "train.py", *TINY, "--max_iters", "4",
                        "--eval_interval", "2", "--device", "cpu", "--out_dir", str(out),
                        "--cache_dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("2 processes") == 1 and p.stdout.count("done: 4 iterations") == 1
    assert [json.loads(line)["iter"] for line in open(out / "log.jsonl")] == [0, 2, 4]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["iter"] == 4 and len(ckpt["rng"]) == 2  # each process's batches go on from here
    assert ckpt["rng"][0]["numpy"] != ckpt["rng"][1]["numpy"]


def _train_worker(rank, port, argv, out_dir):
    """train.main as rank `rank` of 2; saves the weights its models were built with, and
    whether its process group is still alive once main_guard has left it."""
    _as_torchrun_would(rank, port)
    build, group = train.build_models, []

    def build_and_keep(*args):
        gen, embedder = build(*args)
        torch.save({**gen.state_dict(), **embedder.state_dict()},
                   os.path.join(out_dir, f"init{rank}.pt"))
        group.append(weakref.ref(dist.group.WORLD))  # the group train.main has joined
        return gen, embedder
    train.build_models = build_and_keep  # a process of its own: nothing else sees this
    main_guard(lambda: train.main(argv))  # as train.py runs: it leaves the group
    with open(os.path.join(out_dir, f"group{rank}.txt"), "w") as f:
        f.write("alive" if group[0]() is not None else "freed")


def test_processes_start_from_the_same_weights_but_draw_their_own_dropout(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--max_iters", "0", "--dropout", "0.2", "--device", "cpu", "--out_dir",
            str(out), "--cache_dir", str(tmp_path / "cache")]
    mp.spawn(_train_worker, args=(_free_port(), argv, str(tmp_path)), nprocs=2)
    # a group that outlives teardown keeps its gloo threads running into the interpreter's exit,
    # where a process could abort ("terminate called without an active exception")
    assert [(tmp_path / f"group{r}.txt").read_text() for r in range(2)] == ["freed"] * 2
    a, b = (torch.load(tmp_path / f"init{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # after setup each process's torch stream (its dropout) is its own; the checkpoint keeps each
    states = [state["torch"] for state in torch.load(out / "ckpt.pt", weights_only=False)["rng"]]
    masks = []
    for state in states:
        g = torch.Generator()
        g.set_state(state)
        masks.append(torch.bernoulli(torch.full((256,), 0.8), generator=g))  # keep with p 0.8
    assert not torch.equal(*states) and not torch.equal(*masks)


@pytest.mark.parametrize("end", [None, UserError("bad flag"), Interrupted("saved"), ValueError()])
def test_every_end_leaves_the_process_group(tmp_path, end):
    """A process that exits still in the group can abort (gloo): main_guard leaves it first,
    whether main returns, fails or is interrupted."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)

    def main():
        if end is not None:
            raise end
    with contextlib.suppress(SystemExit, ValueError):  # exit codes: tests/test_bad_input.py
        main_guard(main)
    left = not dist.is_initialized()
    distributed.teardown()  # for the tests after this one, if main_guard did not
    assert left

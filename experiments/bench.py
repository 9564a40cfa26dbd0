"""
How fast cosup is: each figure beside an anchor timed in the same run, the two sides taking turns
and each reporting its median, because timings on a small shared machine drift.

    python -m experiments.bench                    # one JSON object
    python -m experiments.bench --parts search     # only search, beside numpy's
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from data import load_data
from datastore import search
from experiments.band import ROOT
from generate import generate
from losses import co_supervision_loss
from machinery import datastore_file
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.config import Config, autocast, pick_device
from train import build_models, make_optimizer

PARTS = ("co_supervision_overhead", "sampling", "search", "evaluation")


@dataclass
class BenchConfig:
    repeats: int = flag(30, "timed rounds of each training step (the median is reported)")
    parts: str = flag("all", "the sections to run, comma-separated: " + ", ".join(PARTS))


def alternate(sides, rounds):
    """Each side's median ms a call over `rounds` rounds in which the sides take turns, after an
    untimed round that warms them up; the first side's time over the second's; each side's last
    result."""
    times, results = {name: [] for name in sides}, {}
    for _ in range(rounds + 1):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ms = {f"ms_{name}": 1000 * float(np.median(t[1:])) for name, t in times.items()}
    first, second = ms.values()
    return {**ms, "ratio": first / second}, results


def overhead(args):
    """A training step of the default demo with lambda_seq 0.5 over one with lambda_seq 0, on the
    same models: what co-supervision costs."""
    cfg, device = Config(), pick_device("auto")
    data, _ = load_data(cfg)
    gen, embedder = build_models(cfg, data.meta["vocab_size"])
    gen.to(device), embedder.to(device)
    optimizer = make_optimizer(cfg, gen, embedder, device)
    rng = np.random.default_rng(cfg.seed)

    def step(lambda_seq):  # train.py's step on the next batch
        batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                               cfg.emb_block_size)
        with autocast(device, cfg.dtype):
            loss, _ = co_supervision_loss(gen, embedder, batch.to(device), cfg.lambda_tok,
                                          lambda_seq, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*gen.parameters(), *embedder.parameters()],
                                       cfg.grad_clip)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return alternate({"co": lambda: step(0.5), "ntp": lambda: step(0.0)}, args.repeats)[0]


def sampling(args):
    """512 new tokens at block 256, retrieval in the loop, full recompute over the KV cache, with
    one seed (the same tokens both ways): the default demo's untrained Gen and a larger one."""
    out = {}
    for n_layer, n_head, n_embd in ((2, 4, 128), (6, 6, 384)):
        cfg = Config(block_size=256, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        data, tok = load_data(cfg)
        torch.manual_seed(cfg.seed)
        gen, embedder = build_models(cfg, tok.vocab_size)
        gen.eval(), embedder.eval()
        store = datastore_file.build(embedder, data, progress=False)
        prompt = [int(t) for t in data.val.ids[:64]]

        def sample(use_cache):
            return generate(gen, prompt, 512, tok.marker, None, store, temperature=1.0,
                            use_cache=use_cache, generator=torch.Generator().manual_seed(cfg.seed))
        times, runs = alternate({"recompute": lambda: sample(False),
                                 "cache": lambda: sample(True)}, 3)
        out[f"{n_layer}x{n_embd}"] = {**times, "retrievals": len(runs["cache"][1]),
                                      "same_tokens": runs["cache"][0] == runs["recompute"][0]}
    return out


def random_unit(rng, n, d=128):
    """n random unit vectors (n, d), float32: directions uniform on the sphere."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_top_k(queries, keys, k):
    """The anchor of exact search, plain numpy: the k best keys of each query, best first."""
    scores = queries @ keys.T                                              # (Q, N)
    top = np.argpartition(scores, -k, axis=1)[:, -k:]                      # (Q, k) unordered
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)                          # (Q, k)


def search_speed(args):
    """Top-10 search over 10k, 100k and 1M random unit vectors (d = 128) beside numpy_top_k, one
    query at a time (generation) and 64 at a time (evaluation)."""
    rng, out = np.random.default_rng(1337), {}
    for n in (10_000, 100_000, 1_000_000):
        keys, queries = random_unit(rng, n), random_unit(rng, 64)          # (N, d), (64, d)
        keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
        for q in (1, 64):
            times, ids = alternate({"cosup": lambda: search(queries_t[:q], keys_t, 10)[1].numpy(),
                                    "numpy": lambda: numpy_top_k(queries[:q], keys, 10)},
                                   {1: (20, 10), 64: (5, 3)}[q][n == 1_000_000])
            same = float((ids["cosup"] == ids["numpy"]).all(axis=1).mean())
            out[f"{n}_keys_{q}_queries"] = {**times, "top10_agree": same}
    return out


def one_at_a_time(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                  query_gen=None, retrieve=None):
    """generate_batch()'s anchor: generate(), the reference, for one prompt after another."""
    retrieve = retrieve or [True] * len(prompts)
    return [generate(gen, p, n, marker, stop, datastore if r else None, query_gen=query_gen)
            for p, n, r in zip(prompts, max_new_tokens, retrieve)]


def evaluation(args):
    """`python evaluate.py` on the default run (out/), beside the same program answering one
    question at a time (one_at_a_time for generate_batch); both must print the same. The untimed
    first round builds the run's datastore."""
    if not os.path.isfile(os.path.join(ROOT, "out", "ckpt.pt")):
        return {"skipped": "no trained run in out/ (python train.py makes one)"}
    patched = ("import sys, evaluate, experiments.bench as b, machinery.batch_generate as g\n"
               "g.generate_batch = b.one_at_a_time\nevaluate.main(sys.argv[1:])\n")

    def evaluate(*program):
        done = subprocess.run([sys.executable, *program, "--out_dir", "out"], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"evaluation failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout)
    times, printed = alternate({"one_at_a_time": lambda: evaluate("-c", patched),
                                "batched": lambda: evaluate("evaluate.py")}, 2)
    return {**times, "same_numbers": printed["batched"] == printed["one_at_a_time"]}


def main(argv=None):
    args, _ = parse_config(BenchConfig, __doc__, argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be positive, got {args.repeats}")
    chosen = PARTS if args.parts == "all" else args.parts.split(",")
    if not set(chosen) <= set(PARTS):
        raise UserError(f"--parts takes all or some of {', '.join(PARTS)}, got {args.parts!r}")
    parts = {"co_supervision_overhead": overhead, "sampling": sampling, "search": search_speed,
             "evaluation": evaluation}
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in [p for p in PARTS if p in chosen]:
        t0 = time.perf_counter()
        result[name] = parts[name](args)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main_guard(main)

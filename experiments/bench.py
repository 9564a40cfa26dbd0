"""
How fast cosup is, each figure beside an anchor measured in the same run: the two sides take
turns and each reports a median, because timings on a small shared machine drift.

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
from generate import generate
from losses import co_supervision_loss
from machinery import datastore_file
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.config import Config, autocast, pick_device
from train import build_models, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PARTS = ("co_supervision_overhead", "sampling", "search", "evaluation")


@dataclass
class BenchConfig:
    repeats: int = flag(30, "timed repeats of each training step (the median is reported)")
    parts: str = flag("all", "the sections to run, comma-separated: " + ", ".join(PARTS))


def alternate(sides, rounds):
    """Each side's median seconds a call over `rounds` rounds in which the sides take turns,
    after one untimed round that warms them up, and each side's last result."""
    times, results = {name: [] for name in sides}, {}
    for _ in range(rounds + 1):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t[1:])) for name, t in times.items()}, results


def overhead(args):
    """A training step with lambda_seq 0.5 over one with lambda_seq 0, the default demo's
    settings, on the same models."""
    cfg, device = Config(), pick_device("auto")
    data, _ = load_data(cfg)
    gen, embedder = build_models(cfg, data.meta["vocab_size"])
    gen.to(device), embedder.to(device)
    params = list(gen.parameters()) + list(embedder.parameters())
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
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    s, _ = alternate({"ntp": lambda: step(0.0), "co": lambda: step(0.5)}, args.repeats)
    return {"ms_per_iter_lambda_seq_0": 1000 * s["ntp"], "ms_per_iter_lambda_seq_0.5":
            1000 * s["co"], "ratio": s["co"] / s["ntp"]}


def sampling(args):
    """Tokens/s with the KV cache and with full recompute, 512 new tokens at block 256, sampled
    with a fixed seed (the same tokens both ways), retrieval in the loop, untrained models: the
    default demo's Gen and a larger one, where the cache saves more compute."""
    out = {}
    for name, (n_layer, n_head, n_embd, rounds) in {"default_2x128": (2, 4, 128, 3),
                                                     "6x384": (6, 6, 384, 2)}.items():
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
        s, runs = alternate({"cache": lambda: sample(True), "recompute": lambda: sample(False)},
                            rounds)
        out[name] = {"tokens_per_s_kv_cache": 512 / s["cache"], "tokens_per_s_recompute":
                     512 / s["recompute"], "speedup": s["recompute"] / s["cache"],
                     "retrievals": len(runs["cache"][1]),
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
    """Top-10 search over 10k, 100k and 1M random unit vectors (d = 128), one query at a time
    (generation) and 64 at a time (evaluation), beside numpy_top_k."""
    rng, out = np.random.default_rng(1337), {}
    for n in (10_000, 100_000, 1_000_000):
        keys, queries = random_unit(rng, n), random_unit(rng, 64)          # (N, d), (64, d)
        keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
        for q in (1, 64):
            s, ids = alternate({"cosup": lambda: search(queries_t[:q], keys_t, k=10)[1].numpy(),
                                "numpy": lambda: numpy_top_k(queries[:q], keys, 10)},
                               {1: (20, 10), 64: (5, 3)}[q][n == 1_000_000])
            out[f"search_{n}_{q}_quer{'y' if q == 1 else 'ies'}"] = {
                **{f"ms_per_query_{name}": 1000 * t / q for name, t in s.items()},
                "ratio": s["cosup"] / s["numpy"],
                "top10_agree": float((ids["cosup"] == ids["numpy"]).all(axis=1).mean())}
    return out


def one_at_a_time(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                  query_gen=None, retrieve=None):
    """generate_batch()'s anchor: generate(), the reference, for one prompt after another."""
    retrieve = retrieve or [True] * len(prompts)
    return [generate(gen, p, n, marker, stop, datastore if r else None, query_gen=query_gen)
            for p, n, r in zip(prompts, max_new_tokens, retrieve)]


def evaluation(args):
    """`python evaluate.py` on the default run (out/) in a fresh process, beside the same program
    answering one question at a time (one_at_a_time for generate_batch); both must print the
    same. The untimed first round builds the run's datastore."""
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
    s, printed = alternate({"batched": lambda: evaluate("evaluate.py"),
                            "one_at_a_time": lambda: evaluate("-c", patched)}, 2)
    return {"s_batched": s["batched"], "s_one_at_a_time": s["one_at_a_time"],
            "speedup": s["one_at_a_time"] / s["batched"],
            "same_numbers": printed["batched"] == printed["one_at_a_time"]}


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

"""
How fast cosup is, each figure beside an anchor measured in the same run, the two sides taking
turns (timings on a shared machine drift): experiments/README.md's Performance table.

    python -m experiments.bench                    # one JSON object (about 4 minutes on 2 cores)
    python -m experiments.bench --parts search     # only search: exact, numpy's, faiss's
    python -m experiments.bench --parts evaluation --eval_run out    # evaluate.py on a run
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from data import load_data
from datastore import search
from experiments.band import ROOT, chosen
from generate import generate
from losses import co_supervision_loss
from machinery import datastore_file
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.config import Config, autocast, pick_device
from machinery.search import FaissIndex
from train import build_models, make_optimizer

PARTS = ("ntp_step", "co_supervision_overhead", "sampling", "search", "evaluation")


@dataclass
class BenchConfig:
    repeats: int = flag(30, "timed repeats of each training step (the median is reported)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps (training-step figures)")
    seed: int = flag(1337, "random seed")
    parts: str = flag("all", "the sections to run, comma-separated: " + ", ".join(PARTS))
    eval_run: str = flag("out", "the trained run that the evaluation section evaluates (python "
                                "train.py makes one); where there is none, the section is skipped")


def alternate(sides, rounds):
    """Each side's median seconds a call over `rounds` rounds of turns after one untimed warm-up
    round, and each side's last result."""
    times, results = {name: [] for name in sides}, {}
    for _ in range(rounds + 1):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t[1:])) for name, t in times.items()}, results


def stepper(cfg, data, device):
    """train.py's training step on the next batch, one process, as a function of lambda_seq."""
    gen, embedder = build_models(cfg, data.meta["vocab_size"])
    gen.to(device), embedder.to(device)
    params = list(gen.parameters()) + list(embedder.parameters())
    optimizer = make_optimizer(cfg, gen, embedder, device)
    rng, ctx = np.random.default_rng(cfg.seed), autocast(device, cfg.dtype)

    def step(lambda_seq=cfg.lambda_seq):
        batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                               cfg.emb_block_size)
        with ctx:
            loss, _ = co_supervision_loss(gen, embedder, batch.to(device), cfg.lambda_tok,
                                          lambda_seq, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step, gen, embedder


def ntp_step(args, device):
    """NTP-only training at nanoGPT's CPU recipe (its shakespeare_char sizes, on pydoc's bytes)."""
    cfg = Config(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                 lambda_seq=0.0, dataset="pydoc", split="none", seed=args.seed)
    step, _, _ = stepper(cfg, load_data(cfg)[0], device)
    s = alternate({"step": step}, args.repeats)[0]["step"]
    return {"config": "4x128, block 64, batch 12, bytes, pydoc text", "ms_per_iter": 1000 * s,
            "tokens_per_s": 12 * 64 / s}


def train_flops(model, n_layer, T, width):
    """Training FLOPs per token, nanoGPT's estimate: 6 per weight (position embeddings are free)
    plus attention's 12 n_layer T width."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * n_layer * T * width


def overhead(args, device):
    """A default step with lambda_seq 0.5 over one with 0, on the same models; and its floor,
    Emb_seq's FLOPs over Gen's, candidates padded and not."""
    cfg = Config(seed=args.seed)
    data, _ = load_data(cfg)
    step, gen, embedder = stepper(cfg, data, device)
    s, _ = alternate({"ntp": lambda: step(0.0), "co": step}, args.repeats)
    rng = np.random.default_rng(args.seed)
    batches = [data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                              cfg.emb_block_size) for _ in range(50)]
    n, padded = np.mean([b.candidates.shape for b in batches], axis=0)  # sequences, width
    length = float(np.mean([b.candidate_mask.float().mean(1).mean() for b in batches]) * padded)
    gen_flops = train_flops(gen, cfg.n_layer, cfg.block_size, cfg.n_embd) * (
        cfg.batch_size * cfg.block_size)

    def ratio(T):  # (Gen's FLOPs + Emb_seq's over candidates of T tokens) / Gen's
        return float(1 + train_flops(embedder, cfg.emb_layer, T, cfg.emb_embd) * n * T / gen_flops)
    return {"ms_per_iter_lambda_seq_0": 1000 * s["ntp"], "ms_per_iter_lambda_seq_0.5":
            1000 * s["co"], "ratio": s["co"] / s["ntp"], "emb_sequences_per_step": float(n),
            "emb_padded_length": float(padded), "emb_mean_length": length,
            "flops_ratio": ratio(padded), "flops_ratio_unpadded": ratio(length)}


def sampling(args):
    """Tokens/s with the KV cache and with full recompute: 512 tokens at block 256, a fixed seed
    (the same tokens both ways), retrieval in the loop, untrained Gens of two sizes."""
    out = {}
    for name, (n_layer, n_head, n_embd, rounds) in {"default_2x128": (2, 4, 128, 3),
                                                     "6x384": (6, 6, 384, 2)}.items():
        cfg = Config(block_size=256, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     seed=args.seed)
        data, tok = load_data(cfg)
        torch.manual_seed(args.seed)
        gen, embedder = build_models(cfg, tok.vocab_size)
        gen.eval(), embedder.eval()
        store = datastore_file.build(embedder, data, progress=False)
        prompt = [int(t) for t in data.val.ids[:64]]

        def sample(use_cache):
            return generate(gen, prompt, 512, tok.marker, None, store, temperature=1.0,
                            use_cache=use_cache, generator=torch.Generator().manual_seed(args.seed))
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
    """Top-10 search over 10k, 100k and 1M random unit vectors (d = 128), 1 and 64 queries at a
    time: exact search beside numpy_top_k and, if installed, faiss (its recall@10, and its top-1
    for queries near a key, as trained queries are)."""
    try:
        import faiss  # noqa: F401 (optional: the faiss figures only)
    except ImportError:
        faiss = None
    rng, out = np.random.default_rng(args.seed), {}
    for n in (10_000, 100_000, 1_000_000):
        keys, queries = random_unit(rng, n), random_unit(rng, 64)          # (N, d), (64, d)
        keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
        if faiss:
            t0 = time.perf_counter()
            index = FaissIndex(keys_t)
            build_s = time.perf_counter() - t0
            exact, approx = search(queries_t, keys_t, k=10)[1], index.search(queries_t, 10)[1]
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.tolist(),
                                                                         exact.tolist())])
            near = keys[rng.choice(n, 64)] + 0.75 * random_unit(rng, 64)  # cosine about 0.8
            near = torch.from_numpy(near / np.linalg.norm(near, axis=1, keepdims=True))
            top1 = (index.search(near, 1)[1] == search(near, keys_t, k=1)[1]).float().mean()
            out[f"faiss_{n}"] = {"build_s": build_s, "nlist": index.index.nlist,
                                 "nprobe": index.index.nprobe, "recall@10_64_queries":
                                 float(recall), "top1_agree_near_queries": float(top1)}
        for q in (1, 64):
            sides = {"cosup": lambda: search(queries_t[:q], keys_t, k=10)[1].numpy(),
                     "numpy": lambda: numpy_top_k(queries[:q], keys, 10)}
            if faiss:
                sides["faiss"] = lambda: index.search(queries_t[:q], 10)[1].numpy()
            s, ids = alternate(sides, {1: (20, 10), 64: (5, 3)}[q][n == 1_000_000])
            row = {f"ms_per_query_{name}": 1000 * t / q for name, t in s.items()}
            out[f"search_{n}_{q}_quer{'y' if q == 1 else 'ies'}"] = {
                **row, "ratio": s["cosup"] / s["numpy"],
                "top10_agree": float((ids["cosup"] == ids["numpy"]).all(axis=1).mean())}
    return out


def one_at_a_time(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                  query_gen=None, retrieve=None):
    """generate_batch()'s anchor: generate(), the reference, for one prompt after another."""
    retrieve = retrieve or [True] * len(prompts)
    return [generate(gen, p, n, marker, stop, datastore if r else None, query_gen=query_gen)
            for p, n, r in zip(prompts, max_new_tokens, retrieve)]


def evaluation(args):
    """`python evaluate.py` on a copy of a trained run in a fresh process, beside the same program
    answering one question at a time (one_at_a_time for generate_batch): both print the same."""
    if not os.path.isfile(os.path.join(args.eval_run, "ckpt.pt")):
        return {"skipped": f"no trained run in {args.eval_run} (python train.py makes one)"}
    patched = ("import sys, evaluate, experiments.bench as b, machinery.batch_generate as g\n"
               "g.generate_batch = b.one_at_a_time\nevaluate.main(sys.argv[1:])\n")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        shutil.copytree(args.eval_run, run, ignore=shutil.ignore_patterns("eval*.json"))

        def evaluate(*program):
            done = subprocess.run([sys.executable, *program, "--out_dir", run], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"evaluation failed:\n{done.stderr[-2000:]}")
            return json.loads(done.stdout)
        s, printed = alternate({"batched": lambda: evaluate("evaluate.py"),
                                "one_at_a_time": lambda: evaluate("-c", patched)}, 2)
    return {"run": args.eval_run, "s_batched": s["batched"], "s_one_at_a_time":
            s["one_at_a_time"], "speedup": s["one_at_a_time"] / s["batched"],
            "same_numbers": printed["batched"] == printed["one_at_a_time"]}


def main(argv=None):
    args, _ = parse_config(BenchConfig, __doc__, argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be positive, got {args.repeats}")
    device = pick_device(args.device)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    parts = {"ntp_step": lambda: ntp_step(args, device),
             "co_supervision_overhead": lambda: overhead(args, device),
             "sampling": lambda: sampling(args),
             "search": lambda: search_speed(args), "evaluation": lambda: evaluation(args)}
    for name in chosen(args.parts, PARTS):
        t0 = time.perf_counter()
        result[name] = parts[name]()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main_guard(main)

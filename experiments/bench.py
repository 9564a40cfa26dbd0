"""
How fast cosup is: the training step, the cost of co-supervision, sampling with the KV cache, the
datastore, search (beside numpy's and faiss's), and evaluate.py (beside answering one question at
a time); memory is experiments/memory.py's. Medians of repeats, and ratios measured within one run
(alternating the two sides), because timings on a small shared machine drift.

    python -m experiments.bench                    # one JSON object (about 8 minutes on 2 cores)
    python -m experiments.bench --out bench.json   # and writes it
    python -m experiments.bench --parts search     # only search: exact, numpy's, faiss's (~1 min)
    python -m experiments.bench --parts evaluation --eval_run out    # evaluate.py on a run (~2 min)
    python -m experiments.bench --parts gpt2_step  # GPT-2 small's step beside the default's
                                                   # (10 min and 11 GB on 2 busy cores)

On a GPU it also times a larger model in bfloat16 with torch.compile and reports its MFU.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from data import load_data
from datastore import search
from machinery import datastore_file
from machinery.search import FaissIndex
from generate import generate
from losses import co_supervision_loss
from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.config import Config, autocast, pick_device
from train import build_models, make_optimizer


PARTS = ("ntp_step", "co_supervision_overhead", "sampling", "datastore", "search", "evaluation",
         "gpu_step", "gpt2_step")


@dataclass
class BenchConfig:
    out: str = flag("", "also write the JSON object to this file")
    repeats: int = flag(30, "timed repeats of each training step (the median is reported)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps (training-step figures)")
    seed: int = flag(1337, "random seed")
    parts: str = flag("all", "the sections to run, comma-separated: " + ", ".join(PARTS) +
                      " (all: every one but gpt2_step, minutes and 11 GB on a CPU)")
    eval_run: str = flag("out", "the trained run that the evaluation section evaluates (python "
                                "train.py makes one); where there is none, the section is skipped")


def median_ms(times):
    return 1000 * float(np.median(times))


def stepper(cfg, data, device, lambda_seq, vocab_size=None):
    """train.py's training step on the next batch, as a function of lambda_seq; the models'
    vocabulary the data's, or vocab_size."""
    gen, embedder = build_models(cfg, vocab_size or data.meta["vocab_size"])
    gen.to(device), embedder.to(device)
    params = list(gen.parameters()) + list(embedder.parameters())
    optimizer = make_optimizer(cfg, gen, embedder, device)
    rng, ctx = np.random.default_rng(cfg.seed), autocast(device, cfg.dtype)
    fwd_gen, fwd_embedder = (torch.compile(gen), torch.compile(embedder)) if cfg.compile else (
        gen, embedder)

    def step(lam=lambda_seq):  # the body of train.py's loop, one process
        batch = data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                               cfg.emb_block_size)
        with ctx:
            loss, _ = co_supervision_loss(fwd_gen, fwd_embedder, batch.to(device), cfg.lambda_tok,
                                          lam, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step, gen, embedder


def timed(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def ntp_step(args, device):
    """1. NTP-only training at nanoGPT's CPU recipe: 4 layers, 4 heads, width 128, block 64,
    batch 12, bytes (its shakespeare_char settings, README "Plain language modelling")."""
    cfg = Config(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                       lambda_seq=0.0, dataset="pydoc", split="none", seed=args.seed)
    data, _ = load_data(cfg)
    step, _, _ = stepper(cfg, data, device, 0.0)
    ms = median_ms(timed(step, args.repeats))
    return {"config": "4x128, block 64, batch 12, bytes, pydoc text", "ms_per_iter": ms,
            "tokens_per_s": 12 * 64 / ms * 1000}


def overhead(args, device):
    """2. Step time with lambda_seq 0.5 over lambda_seq 0, at the default demo's settings; the
    two alternate on the same models so that drift hits both alike. On a CPU also with one
    thread: Emb_seq's small operations gain less from a second thread than Gen's."""
    cfg = Config(seed=args.seed)
    data, _ = load_data(cfg)
    step, gen, embedder = stepper(cfg, data, device, cfg.lambda_seq)
    out = {}
    for threads in [torch.get_num_threads()] + ([1] if device == "cpu" else []):
        with num_threads(threads):
            times = {0.0: [], cfg.lambda_seq: []}
            for _ in range(5):
                step()
            for _ in range(args.repeats):
                for lam in times:
                    t0 = time.perf_counter()
                    step(lam)
                    times[lam].append(time.perf_counter() - t0)
        ntp, co = median_ms(times[0.0]), median_ms(times[cfg.lambda_seq])
        out[f"{threads}_threads"] = {"ms_per_iter_lambda_seq_0": ntp,
                                     "ms_per_iter_lambda_seq_0.5": co, "ratio": co / ntp}
    # the work Emb_seq adds, in FLOPs, over Gen's, padded (one width for all candidates) and
    # not: what the ratio cannot go below at equal speed
    rng = np.random.default_rng(args.seed)
    batches = [data.get_batch("train", cfg.batch_size, rng, cfg.hard_negatives,
                              cfg.emb_block_size)
               for _ in range(50)]
    emb_shape = np.mean([b.candidates.shape for b in batches], axis=0)
    emb_length = float(np.mean([b.candidate_mask.float().mean(1).mean() for b in batches])
                       * emb_shape[1])                           # real tokens per candidate
    gen_tokens = cfg.batch_size * cfg.block_size
    gen_flops = train_flops(gen, cfg.n_layer, cfg.block_size, cfg.n_embd) * gen_tokens

    def emb_flops(length):
        return train_flops(embedder, cfg.emb_layer, length, cfg.emb_embd) * emb_shape[0] * length
    return {**out, "gen_tokens_per_step": gen_tokens,
            "emb_sequences_per_step": float(emb_shape[0]), "emb_padded_length": float(emb_shape[1]),
            "emb_mean_length": emb_length,
            "flops_ratio": float(1 + emb_flops(emb_shape[1]) / gen_flops),
            "flops_ratio_unpadded": float(1 + emb_flops(emb_length) / gen_flops)}


@contextmanager
def num_threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_flops(model, n_layer, T, width):
    """Training FLOPs per token, nanoGPT's estimate: 6 per weight (forward and backward) plus
    the attention scores, 12 n_layer T width; position embeddings are free."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * n_layer * T * width


def sampling(args):
    """3. Tokens/s with the KV cache over full recompute, 512 new tokens at block 256, sampled
    (temperature 1, fixed seed, so both paths write the same tokens) with retrieval in the loop.
    Untrained models (speed does not depend on the weights), at the default demo's Gen sizes and
    at a larger Gen (6 layers, width 384): the cache saves compute, so it gains more the larger
    the model, while a step of a tiny model costs mostly the launching of its operations."""
    out = {}
    for name, (n_layer, n_head, n_embd, repeats) in {"default_2x128": (2, 4, 128, 3),
                                                      "6x384": (6, 6, 384, 2)}.items():
        cfg = Config(block_size=256, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           seed=args.seed)
        data, tok = load_data(cfg)
        torch.manual_seed(args.seed)
        gen, embedder = build_models(cfg, tok.vocab_size)
        gen.eval(), embedder.eval()
        store = datastore_file.build(embedder, data, progress=False)
        prompt = [int(t) for t in data.val.ids[:64]]
        runs = {True: [], False: []}
        for _ in range(repeats):
            for use_cache in runs:
                t0 = time.perf_counter()
                ids, retrievals = generate(gen, prompt, 512, tok.marker, None, store,
                                           temperature=1.0, use_cache=use_cache,
                                           generator=torch.Generator().manual_seed(args.seed))
                runs[use_cache].append(time.perf_counter() - t0)
                assert len(ids) - len(prompt) == 512
        cached, full = 512 / np.median(runs[True]), 512 / np.median(runs[False])
        out[name] = {"tokens_per_s_kv_cache": cached, "tokens_per_s_recompute": full,
                     "speedup": cached / full, "retrievals": len(retrievals)}
    return out


def datastore(args):
    """4. Building the datastore: Emb_seq over every facts sequence, default sizes."""
    cfg = Config(seed=args.seed)
    data, tok = load_data(cfg)
    _, embedder = build_models(cfg, tok.vocab_size)
    embedder.eval()
    build = timed(lambda: datastore_file.embed_all(embedder, data, progress=False), 3, warmup=1)
    lengths = np.diff(data.offsets)
    return {"build_sequences_per_s": data.n_sequences / float(np.median(build)),
            "build_mean_sequence_tokens": float(lengths.mean())}


def random_unit(rng, n, d=128):
    """n random unit vectors (n, d), float32: directions uniform on the sphere."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_top_k(queries, keys, k):
    """The anchor exact search is measured against, in plain numpy: scores = queries @ keys.T,
    argpartition for the k best (unordered), then a sort of those k. Ids (Q, k), best first."""
    scores = queries @ keys.T                                              # (Q, N)
    top = np.argpartition(scores, -k, axis=1)[:, -k:]                      # (Q, k) unordered
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)                          # (Q, k)


def search_speed(args):
    """5. Top-10 search over 10k, 100k and 1M random unit vectors (d = 128, the default width),
    one query at a time (generation) and 64 at a time (evaluation, per query): cosup's exact
    search beside the numpy anchor (numpy_top_k) on the same keys, the two alternating, and the
    share of queries whose top-10 ids the two agree on; with faiss installed, its index
    (machinery.search.FaissIndex: build time, query time, recall@10 of the 64 queries against exact
    search; and how often its top-1 is exact's for queries near a key, as trained queries are).
    Random directions are the hardest case for an index that partitions the keys: they
    form no clusters, and in 128 dimensions a query's 10 best keys score barely above the rest."""
    try:
        import faiss  # noqa: F401 (optional: the faiss figures only)
    except ImportError:
        faiss = None
    rng = np.random.default_rng(args.seed)
    out = {}
    for n in (10_000, 100_000, 1_000_000):
        keys, queries = random_unit(rng, n), random_unit(rng, 64)          # (N, d), (64, d)
        keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
        if faiss:
            t0 = time.perf_counter()
            index = FaissIndex(keys_t)
            build_s = time.perf_counter() - t0
            exact, approx = search(queries_t, keys_t, k=10)[1], index.search(queries_t, 10)[1]
            recall = float(np.mean([len(set(a) & set(b)) / 10
                                    for a, b in zip(approx.tolist(), exact.tolist())]))
            # queries as a trained retriever makes them: near their target (cosine about 0.8),
            # whose exact top-1 is that target; how often the index returns the same top-1
            near = keys[rng.choice(n, 64)] + 0.75 * random_unit(rng, 64)         # (64, d)
            near_t = torch.from_numpy(near / np.linalg.norm(near, axis=1, keepdims=True))
            top1 = float((index.search(near_t, 1)[1] == search(near_t, keys_t, k=1)[1])
                         .float().mean())
            out[f"faiss_{n}"] = {"build_s": build_s, "nlist": index.index.nlist,
                                 "nprobe": index.index.nprobe, "recall@10_64_queries": recall,
                                 "top1_agree_near_queries": top1}
            print(f"faiss {n:,}: built in {build_s:.1f} s, nlist {index.index.nlist}, nprobe "
                  f"{index.index.nprobe}, recall@10 {recall:.2f} (64 random queries), top-1 as "
                  f"exact's for {top1:.0%} of 64 queries near a key", file=sys.stderr)
        for q, repeats in ((1, 20 if n < 1_000_000 else 10), (64, 5 if n < 1_000_000 else 3)):
            sides = {"cosup": lambda: search(queries_t[:q], keys_t, k=10)[1].numpy(),
                     "numpy": lambda: numpy_top_k(queries[:q], keys, 10)}
            if faiss:
                sides["faiss"] = lambda: index.search(queries_t[:q], 10)[1].numpy()
            times, ids = {name: [] for name in sides}, {}
            for _ in range(repeats + 1):  # the first round warms up, untimed
                for name, fn in sides.items():
                    t0 = time.perf_counter()
                    ids[name] = fn()
                    times[name].append(time.perf_counter() - t0)
            ms = {name: median_ms(t[1:]) / q for name, t in times.items()}
            row = {"ms_per_query_cosup": ms["cosup"], "ms_per_query_numpy": ms["numpy"],
                   "ratio": ms["cosup"] / ms["numpy"],
                   "top10_agree": float((ids["cosup"] == ids["numpy"]).all(axis=1).mean())}
            line = (f"search {n:,} x 128, {q} quer{'y' if q == 1 else 'ies'}: cosup "
                    f"{ms['cosup']:.3g} ms/query, numpy {ms['numpy']:.3g} (ratio "
                    f"{row['ratio']:.2f}, top-10 ids agree on {row['top10_agree']:.0%})")
            if faiss:
                row["ms_per_query_faiss"] = ms["faiss"]
                line += f"; faiss {ms['faiss']:.3g}"
            print(line, file=sys.stderr)
            out[f"search_{n}_{q}_quer{'y' if q == 1 else 'ies'}"] = row
    return out


def one_at_a_time(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                  query_gen=None, retrieve=None):
    """generate_batch()'s anchor: generate(), the reference, for one prompt after another."""
    retrieve = retrieve or [True] * len(prompts)
    return [generate(gen, p, n, marker, stop, datastore if r else None, query_gen=query_gen)
            for p, n, r in zip(prompts, max_new_tokens, retrieve)]


def evaluation(args):
    """6. `python evaluate.py` on a trained run (--eval_run; the default demo's is `out`), end to
    end in a fresh process, beside the same program answering one question at a time
    (one_at_a_time in place of generate_batch); the two alternate, on a copy of the run with its
    datastore built, and must print the same numbers."""
    if not os.path.isfile(os.path.join(args.eval_run, "ckpt.pt")):
        print(f"evaluation: skipped, no trained run in {args.eval_run} (python train.py makes "
              f"one)", file=sys.stderr)
        return {"skipped": f"no trained run in {args.eval_run}"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = {"batched": ["evaluate.py"],
             "one_at_a_time": ["-c", "import sys, evaluate, experiments.bench as b, "
                                     "machinery.batch_generate as g; "
                                     "g.generate_batch = b.one_at_a_time; "
                                     "evaluate.main(sys.argv[1:])"]}
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        shutil.copytree(args.eval_run, run, ignore=shutil.ignore_patterns("eval*.json"))
        times, printed = {name: [] for name in sides}, {}
        # the first run also builds and saves the datastore, which the others load: not counted
        for name in ["batched", "one_at_a_time"] * 2 + ["batched"]:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, *sides[name], "--out_dir", run], cwd=root,
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"evaluation ({name}) failed:\n{done.stderr[-2000:]}")
            times[name].append(time.perf_counter() - t0)
            printed[name] = json.loads(done.stdout)
    batched, one = float(np.median(times["batched"][1:])), float(np.median(times["one_at_a_time"]))
    print(f"evaluate.py on {args.eval_run}: {batched:.1f} s, one question at a time {one:.1f} s "
          f"(x{one / batched:.1f}); same numbers: {printed['batched'] == printed['one_at_a_time']}",
          file=sys.stderr)
    return {"run": args.eval_run, "s_batched": batched, "s_one_at_a_time": one,
            "speedup": one / batched,
            "same_numbers": printed["batched"] == printed["one_at_a_time"]}


# bf16 dense peak FLOP/s of the GPUs we know, for MFU
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def gpu_step(args, device):
    """7. On a GPU: a larger Gen (6 layers, width 384, block 256) with L_NTP + 0.5 L_NSP, bf16 and
    torch.compile. MFU counts Gen's 6N + 12 L T d FLOPs per token (as nanoGPT does), not
    Emb_seq's, so it is a lower bound."""
    cfg = Config(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32,
                       dtype="bfloat16", compile=True, seed=args.seed)
    data, _ = load_data(cfg)
    step, gen, _ = stepper(cfg, data, device, cfg.lambda_seq)
    ms = median_ms(timed(step, args.repeats, warmup=10))
    tokens_per_s = cfg.batch_size * cfg.block_size / ms * 1000
    flops_per_token = train_flops(gen, cfg.n_layer, cfg.block_size, cfg.n_embd)
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"device": name, "ms_per_iter": ms, "tokens_per_s": tokens_per_s,
            "mfu": flops_per_token * tokens_per_s / peak if peak else None}


GPT2_VOCAB = 50258  # GPT-2's 50,257 tokens and the retrieval marker


def gpt2_step(args, device):
    """8. A training step of GPT-2 small (124M: 12 layers, 12 heads, width 768, its vocabulary;
    Emb_seq its whole trunk, causal), as --init_from gpt2 trains it, beside the default model's
    step, at the defaults of a text (batch 24, block 128, Emb_seq's block 64, L_NTP + 0.5 L_NSP);
    the two alternate, repeats / 10 rounds after one untimed. Random weights (a step's time does
    not depend on them) and pydoc's bytes (ids under 258: GPT-2's table is read all the same)."""
    default = Config(dataset="pydoc", seed=args.seed)
    gpt2 = dataclasses.replace(default, gpt2_block=True, n_layer=12, n_head=12, n_embd=768,
                               emb_layer=12, emb_head=12, emb_embd=768)
    data, _ = load_data(default)
    steps = {"default": stepper(default, data, device, default.lambda_seq)[0],
             "gpt2_124M": stepper(gpt2, data, device, gpt2.lambda_seq, GPT2_VOCAB)[0]}
    times = {name: [] for name in steps}
    for _ in range(max(2, args.repeats // 10) + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ms = {name: median_ms(t[1:]) for name, t in times.items()}
    return {"ms_per_iter_default": ms["default"], "ms_per_iter_gpt2_124M": ms["gpt2_124M"],
            "ratio": ms["gpt2_124M"] / ms["default"], "rounds": len(times["default"]) - 1}


def main(argv=None):
    args, _ = parse_config(BenchConfig, __doc__, argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be positive, got {args.repeats}")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: no directory {os.path.dirname(args.out)} to write in")
    chosen = PARTS[:-1] if args.parts == "all" else args.parts.split(",")  # not gpt2_step
    if not set(chosen) <= set(PARTS):
        raise UserError(f"--parts takes all or some of {', '.join(PARTS)}, got {args.parts!r}")
    device = pick_device(args.device)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    parts = {"ntp_step": lambda: ntp_step(args, device),
             "co_supervision_overhead": lambda: overhead(args, device),
             "sampling": lambda: sampling(args), "datastore": lambda: datastore(args),
             "search": lambda: search_speed(args), "evaluation": lambda: evaluation(args),
             "gpt2_step": lambda: gpt2_step(args, device)}
    if device.startswith("cuda"):
        parts["gpu_step"] = lambda: gpu_step(args, device)
    for name, fn in parts.items():
        if name not in chosen:
            continue
        t0 = time.perf_counter()
        result[name] = fn()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main_guard(main)

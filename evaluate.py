"""
Evaluate a trained run: language modelling, retrieval against the whole datastore, and (for
documents that end in an answer, such as `facts`) answers written with retrieval in the loop.

    python evaluate.py --out_dir out
    python evaluate.py --out_dir out_ntp --query_from out_nsp    # separate supervision

Prints one JSON object and writes it, with each marker's 1/rank, to OUT_DIR/eval.json (with
--query_from OTHER, to OUT_DIR/eval_query_from_<OTHER's folder name>.json); then each retrieval
figure with its 95% interval on stderr. README, Sampling and evaluation, says what each means.
"""

import json
import os
import sys

import numpy as np
import torch

from datastore import (candidate_ranks, candidate_scores, chance_metrics, first_stage,
                       first_stage_metrics, marker_queries, rerank_metrics, retrieval_metrics,
                       score_tolerance, split_queries, reranking, target_ranks)
from machinery import datastore_file
from machinery.batch_generate import already_decoded, decode_prompts
from machinery.cli import UserError, main_guard, parse_config
from machinery.config import EvalConfig, autocast, check_eval_config
from machinery.corpora import is_facts
from machinery.intervals import retrieval_lines
from machinery.lexical import lexical_index, lexical_metrics
from machinery.prompts import answer, questions, reworded  # a split's questions, as prompts
from machinery.search import use_search
from train import VAL_MARKERS, load_run, loss_estimates


def question_retrieval(gen, datastore, qs, tok, device):
    """recall@1, recall@10 and MRR of Gen's query at a marker put right after each question."""
    contexts = [np.append(prompt, tok.marker).astype(np.int64)[-gen.config.block_size:]
                for prompt, _, _ in qs]
    queries = marker_queries(gen, contexts, device)                       # (Q, d)
    targets = torch.tensor([target for _, target, _ in qs])               # (Q,)
    return retrieval_metrics(target_ranks(queries, datastore.embeddings, targets))


def question_lexical(lexical, qs, tok):
    """TF-IDF's recall@1, recall@10 and MRR for the same questions, named lexical_*."""
    ranks = lexical.ranks([tok.decode(prompt) for prompt, _, _ in qs], [t for _, t, _ in qs])
    return {f"lexical_{k}": v for k, v in retrieval_metrics(ranks).items()}


def answer_metrics(gen, datastore, data, tok, split, limit, query_gen=None,
                   modes=("retrieval", "no_retrieval", "gold"), reword_questions=False,
                   batch_size=EvalConfig.batch_size, lexical=None):
    """Answers to the first `limit` questions of a split for each of `modes` (reword_questions:
    reworded, with their retrieval metrics, and TF-IDF's given lexical)."""
    qs = questions(data, tok, split, limit)
    if reword_questions:
        qs = reworded(qs, tok)
    if not qs:
        return {}
    prompts = [list(prompt) for prompt, _, _ in qs]
    wants = [answer(tok, gold) for _, _, gold in qs]
    budgets = [len(gold) + 32 for _, _, gold in qs]
    hits = {}

    def decode(given, retrieve, known=()):  # prompt i is question i % len(qs)'s
        return decode_prompts(gen, given, [budgets[i % len(qs)] for i in range(len(given))],
                              tok.marker, tok.eod, datastore, query_gen, retrieve,
                              batch_size * max(1, len(given) // len(qs)), known)

    def count(name, outs):
        hits[name] = sum(answer(tok, ids[len(prompt):]) == want
                         for (ids, _), prompt, want in zip(outs, prompts, wants))

    # the question alone, with retrieval in the loop and Gen alone: decoded together
    alone = [m for m in ("retrieval", "no_retrieval") if m in modes]
    outs = decode(prompts * len(alone), [m == "retrieval" for m in alone for _ in prompts])
    outs = {m: outs[k * len(qs):(k + 1) * len(qs)] for k, m in enumerate(alone)}
    if "retrieval" in modes:
        count("answer_em_retrieval", outs["retrieval"])
        hits["marker_rate"] = sum(tok.marker in ids[len(prompt):]
                                  for (ids, _), prompt in zip(outs["retrieval"], prompts))
        hits["retrieval_acc"] = sum(bool(retrievals) and retrievals[0].id == target
                                    for (_, retrievals), (_, target, _)
                                    in zip(outs["retrieval"], qs))
    if "no_retrieval" in modes:
        count("answer_em_no_retrieval", outs["no_retrieval"])
    if "gold" in modes:
        given = [prompt + [tok.marker] + [int(t) for t in data.sequence(target)]
                 for prompt, (_, target, _) in zip(prompts, qs)]
        known = already_decoded(outs.get("retrieval", []), given, tok.eod, gen.config.block_size)
        count("answer_em_gold", decode(given, [False] * len(given), known))
    out = {k: v / len(qs) for k, v in hits.items()}
    if reword_questions:
        device = next(gen.parameters()).device
        out.update(question_retrieval(query_gen or gen, datastore, qs, tok, device))
        if lexical is not None:
            out.update(question_lexical(lexical, qs, tok))
    return out


WEIGHTS = (0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4)   # the combined score's w, chosen on train markers


def retrieval(gen, datastore, data, tok, lexical, k, device, ctx):
    """Retrieval of train's first 480 markers and val's first VAL_MARKERS: learned and TF-IDF, and
    two-stage, the first stage's k re-ranked (reranked_*) and by learned + w TF-IDF (combined_*)."""
    out, weight = {}, None
    for split, limit in (("train", 480), ("val", VAL_MARKERS)):
        queries, targets = split_queries(gen, data, split, device, ctx, limit)
        if not len(targets):
            out[split] = {"recall@1": None, "recall@10": None, "mrr": None}
            continue
        m = retrieval_metrics(target_ranks(queries, datastore.embeddings, targets))
        m.update(lexical_metrics(data, tok, split, limit, lexical))
        stage = first_stage(lexical, data, tok, split, k, limit)
        m.update(first_stage_metrics(stage, lexical))
        learned = candidate_scores(queries, datastore.embeddings, stage.ids).double()  # (Q, K)
        tolerance = score_tolerance(queries, datastore.embeddings)
        m.update({f"reranked_{n}": v for n, v in reranking(learned, stage, tolerance).items()})
        if weight is None:  # train's markers choose w
            weight = max(WEIGHTS, key=lambda w: rerank_metrics(learned + w * stage.scores, stage,
                                                               tolerance)["mrr"])
        combined = reranking(learned + weight * stage.scores, stage, tolerance)
        m.update({f"combined_{n}": v for n, v in combined.items()}, combined_weight=weight)
        # each marker's 1/rank under the learned order and TF-IDF's: what pools seeds' runs of
        # the same markers into one paired interval (experiments/band.py)
        ranks = {"reranked": candidate_ranks(learned, stage.ids, stage.targets, tolerance),
                 "first_stage": candidate_ranks(stage.scores, stage.ids, stage.targets,
                                                stage.tolerance)}                 # (Q,) each
        m["reciprocal_ranks"] = {order: (1 / r).tolist() for order, r in ranks.items()}
        out[split] = m
    return out


@torch.inference_mode()
def main(argv=None):
    args, _ = parse_config(EvalConfig, __doc__, argv)
    check_eval_config(args)  # and --index (machinery/config.py)
    cfg, gen, embedder, data, tok = load_run(args.out_dir, args.device)
    device = next(gen.parameters()).device.type
    ctx = autocast(device, cfg.dtype)
    query_gen, path = None, os.path.join(args.out_dir, "eval.json")
    if args.query_from:  # separate supervision: OTHER's Gen and Emb_seq (its folder only read)
        _, query_gen, retriever, other, _ = load_run(args.query_from, args.device)
        if other.fingerprint != data.fingerprint:
            raise UserError(f"{args.query_from} was trained on other data than {args.out_dir}")
        datastore = datastore_file.load_or_build(os.path.join(args.query_from, "datastore.pt"),
                                                 retriever, data, save=False)
        name = os.path.basename(os.path.normpath(args.query_from))
        path = os.path.join(args.out_dir, f"eval_query_from_{name}.json")
    else:
        datastore = datastore_file.load_or_build(os.path.join(args.out_dir, "datastore.pt"),
                                                 embedder, data)
    lexical = lexical_index(data, tok)   # TF-IDF: the baseline and the first stage
    use_search(datastore, args.index, cfg, data, tok, lexical)
    result = {"out_dir": args.out_dir, "query_from": args.query_from or None,
              "datastore": len(datastore), "chance": chance_metrics(len(datastore))}
    found = retrieval(query_gen or gen, datastore, data, tok, lexical, cfg.first_stage, device,
                      ctx)
    for split in ("val", "train"):
        ntp, _ = loss_estimates(gen, embedder, data, cfg, device, ctx, split, measure_nsp=False)
        m = {"ntp": ntp, "ppl": float(np.exp(ntp)), **found[split]}
        if args.questions and cfg.split != "none":
            m.update(answer_metrics(gen, datastore, data, tok, split, args.questions, query_gen,
                                    batch_size=args.batch_size))
        result[split] = m
    if args.questions and is_facts(cfg.dataset):
        result["val_reworded"] = answer_metrics(gen, datastore, data, tok, "val", args.questions,
                                                query_gen, ("retrieval", "no_retrieval"), True,
                                                args.batch_size, lexical)
    print(json.dumps({k: {n: x for n, x in v.items() if n != "reciprocal_ranks"}  # the file's
                      if isinstance(v, dict) else v for k, v in result.items()}, indent=1))
    for split in ("val", "train", "val_reworded"):  # to read: each figure with its interval
        if result.get(split, {}).get("recall@1") is not None:
            print("\n".join(retrieval_lines(result[split], result["chance"], split)),
                  file=sys.stderr)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)

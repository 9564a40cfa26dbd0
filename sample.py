"""
Sample from a trained run, with retrieval in the loop: when Gen writes the marker, its query
fetches the best sequence from the datastore, which is inserted verbatim (generate.py).

    python sample.py --out_dir out                       # a held-out question of the corpus
    python sample.py --out_dir out --prompt "Q: Where does Vok Droulki live?\n"

Each inserted sequence is shown as [#id score: text], with the runners-up under
--show_retrieval K; under two-stage search (--index first_stage, a text run's default) as
[#id score TF-IDF #r: text], r being where the first stage ranked it (1: TF-IDF's own choice).
"""

import os
import sys

import numpy as np
import torch

from generate import generate
from machinery import datastore_file
from machinery.checkpoint import load_run
from machinery.cli import main_guard, parse_config
from machinery.config import SampleConfig, check_sample_config
from machinery.corpora import read_text
from machinery.search import use_search


def default_prompt(data, tok):
    """A held-out document up to its first marker with text before it (a question, a sentence),
    where Gen should write the marker next and retrieve: the val split's first such marker, else
    its first document up to its first marker (the end-of-document token where that is the
    document's start: what comes before a document in the token stream). Without markers: the
    first 64 tokens."""
    s = data.val
    if not len(s.marker_pos):
        return [int(t) for t in s.ids[:min(64, len(s.ids))]]
    doc = s.doc_starts[np.searchsorted(s.doc_starts, s.marker_pos, "right") - 1]  # (M,) each's doc
    i = int(np.argmax(s.marker_pos > doc)) if (s.marker_pos > doc).any() else 0
    return [int(t) for t in s.ids[doc[i]:s.marker_pos[i]]] or [tok.eod]


def render(tok, ids, retrievals, n_prompt, datastore, show):
    """The sample as text, each inserted sequence marked with its datastore id and score."""
    out, pos = [], n_prompt
    for r in retrievals:
        seq = [int(t) for t in datastore.sequence(r.id)]
        out.append(tok.decode(ids[pos:r.position]).replace("<|ret|>", ""))
        # two-stage search: where TF-IDF ranked the entry (1: the first stage chose it, else the
        # learned score moved it up)
        stage = "" if r.first_stage_rank is None else f" TF-IDF #{r.first_stage_rank}"
        out.append(f"[#{r.id} {r.score:.3f}{stage}: "
                   f"{tok.decode(ids[r.position:r.position + len(seq)])}]")
        for i, score in r.alternatives[:show]:
            out.append(f"\n    (#{i} {score:.3f}: {tok.decode(datastore.sequence(i))})")
        pos = r.position + len(seq)
    out.append(tok.decode([t for t in ids[pos:] if t != tok.eod]))  # the end needs no mark
    return "".join(out)


def main(argv=None):
    args, _ = parse_config(SampleConfig, __doc__, argv)
    check_sample_config(args)  # and --index (machinery/config.py)
    cfg, gen, embedder, data, tok = load_run(args.out_dir, args.device)
    text = (read_text(args.prompt_file) if args.prompt_file
            else args.prompt.replace("\\n", "\n") if args.prompt else None)
    prompt = tok.encode(text) if text else default_prompt(data, tok)
    if len(prompt) > cfg.block_size:
        print(f"note: the prompt has {len(prompt)} tokens; Gen sees its last {cfg.block_size}",
              file=sys.stderr)
    # on where the run weighs L_NSP (--lambda_seq > 0), even one that stopped before nsp_start
    retrieve = args.retrieve and cfg.lambda_seq > 0
    datastore = None
    if retrieve:  # built once, saved beside the run (machinery/datastore_file.py)
        datastore = datastore_file.load_or_build(os.path.join(args.out_dir, "datastore.pt"),
                                                 embedder, data)
        use_search(datastore, args.index, cfg, data, tok)
    generator = torch.Generator(device=next(gen.parameters()).device).manual_seed(args.seed)
    for _ in range(args.num_samples):
        ids, retrievals = generate(gen, prompt, args.max_new_tokens, tok.marker, tok.eod,
                                   datastore, args.temperature, args.top_k or None,
                                   args.show_retrieval, generator=generator)
        # a document's start is not text to show, nor is a marker the prompt holds (its sequence
        # follows it as text)
        shown = [t for t in prompt if t not in (tok.eod, tok.marker)]
        print(tok.decode(shown) + render(tok, ids, retrievals, len(prompt), datastore,
                                          args.show_retrieval))
        print("-" * 40)


if __name__ == "__main__":
    main_guard(main)

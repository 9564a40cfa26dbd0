"""
Sample from a trained run, with retrieval in the loop: when Gen writes the marker, its query
fetches the best sequence from the datastore, which is inserted verbatim (generate.py).

    python sample.py --out_dir out                       # a held-out question of the corpus
    python sample.py --out_dir out --prompt "Q: Where does Vok Droulki live?\n"

Each inserted sequence is shown as [#id score: text] (the runners-up with --show_retrieval K);
under two-stage search as [#id score TF-IDF #r: text], r its first stage rank.
"""

import os

import torch

from generate import generate
from machinery import datastore_file
from machinery.cli import main_guard, parse_config
from machinery.config import SampleConfig, check_sample_config
from machinery.prompts import read_prompt, render  # the prompt; the sample shown as text
from machinery.search import use_search
from train import load_run


def main(argv=None):
    args, _ = parse_config(SampleConfig, __doc__, argv)
    check_sample_config(args)  # and --index (machinery/config.py)
    cfg, gen, embedder, data, tok = load_run(args.out_dir, args.device)
    prompt = read_prompt(args, data, tok, cfg.block_size)  # or a held-out question's
    datastore = None  # retrieval: where the run weighs L_NSP, even one stopped before nsp_start
    if args.retrieve and cfg.lambda_seq > 0:  # built once, saved beside the run (datastore_file)
        datastore = datastore_file.load_or_build(os.path.join(args.out_dir, "datastore.pt"),
                                                 embedder, data)
        use_search(datastore, args.index, cfg, data, tok)
    generator = torch.Generator(device=next(gen.parameters()).device).manual_seed(args.seed)
    for _ in range(args.num_samples):
        ids, retrievals = generate(gen, prompt, args.max_new_tokens, tok.marker, tok.eod,
                                   datastore, args.temperature, args.top_k or None,
                                   args.show_retrieval, generator=generator)
        print(render(tok, ids, retrievals, prompt, datastore, args.show_retrieval))
        print("-" * 40)


if __name__ == "__main__":
    main_guard(main)

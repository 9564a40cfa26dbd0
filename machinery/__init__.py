"""
What the nine tutorial files lean on, kept out of their way: flags, files, processes, and the
faster forms of three pieces of their code. The method itself is in the nine files; the faster
forms are lexical.py (datastore.py's TF-IDF), batch_generate.py (generate.generate, many prompts
at once) and buckets.py (embedder.embed_tokens over a batch's candidates).

    cli.py          a config dataclass becomes argparse flags; one-line errors; Ctrl-C and
                    SIGTERM; glibc's malloc tuned for each phase of a run
    config.py       every flag (train.py's Config, sample.py's, evaluate.py's), their checks, the
                    device and autocast
    corpora.py      corpora as documents of segments: facts, pydoc, .txt and .jsonl readers
    facts.py        the generated `facts` world
    tokenizer.py    the tokenizer (bytes, or GPT-2's BPE offline) with the marker token
    prepare.py      the prepared-data cache's key; a long text encoded in pieces and written as it
                    comes; which val sequences training's text holds (found_in)
    checkpoint.py   out_dir's files: ckpt.pt written whole and read back with one-line errors;
                    random streams for --resume; --init_from's weights; log.jsonl
    distributed.py  several processes (torchrun): DDP, L_NSP's candidates gathered from all
    datastore_file.py  out_dir/datastore.pt: a run's datastore saved with a fingerprint, loaded
                    only while fresh
    buckets.py      Emb_seq over a batch's candidates in length buckets: less padding, same vectors
    lexical.py      TF-IDF over a whole corpus, as datastore.py states it: sparse, a chunk of
                    queries at a time
    intervals.py    95% intervals of the retrieval figures, the paired difference of two orders
    search.py       how generation searches the datastore (--index): exact, faiss (optional) or
                    two-stage
    kv_cache.py     generate.py's KV cache: each layer's keys and values, filled in place
    batch_generate.py  many prompts decoded at once (evaluation's answers)
    prompts.py      sample.py's prompt and display; evaluate.py's questions and answers
    gpt2.py         --init_from gpt2: GPT-2's config and weights read from disk
    plots.py        curves.png, redrawn from log.jsonl at every evaluation
"""

"""
What the tutorial's files lean on, kept out of their way. Nothing here is the method itself.

    cli.py          a config dataclass becomes argparse flags; one-line errors; Ctrl-C and SIGTERM
    config.py       every flag (train.py's Config, sample.py's, evaluate.py's), checks, the device,
                    and building the models and their optimizer
    corpora.py      corpora as documents of segments: facts, pydoc, .txt and .jsonl readers
    facts.py        the generated `facts` world
    tokenizer.py    the tokenizer (bytes or GPT-2's BPE, through tiktoken) with the marker token
    prepare.py      documents -> token streams, markers and sequences, cached on disk; read back
                    (Split, window starts) and checked
    checkpoint.py   ckpt.pt: written whole or not at all, resumed exactly; loading a finished run
                    (and evaluate.py's inputs, --query_from's)
    distributed.py  several processes (torchrun): DDP, L_NSP's candidates gathered from all
                    (and L_NSP's weight there: across_processes)
    run.py          the training loop's bookkeeping: log, checkpoints, Ctrl-C, divergence, summary
    datastore_file.py  building the datastore (every sequence embedded, sorted by length);
                    out_dir/datastore.pt, saved with a fingerprint, loaded only when fresh
    buckets.py      Emb_seq over a batch's candidates in length buckets: less padding, same vectors
    lexical.py      TF-IDF: the training-free baseline and the first stage of two-stage retrieval
    intervals.py    95% intervals of the retrieval figures over the markers, the paired difference
                    of two orders, and the figures shown with them
    exact_search.py exact search and target ranks a chunk at a time (datastore.py's, at speed),
                    and the tolerance within which two scores tie
    search.py       how generation searches the datastore (--index): exact, faiss or two-stage
    kv_cache.py     generate.py's KV cache: each layer's keys and values, filled in place
    batch_generate.py  many prompts decoded at once (evaluation's answers), to generate()'s tokens
    prompts.py      sample.py's prompt and display; evaluate.py's questions and answers
    faiss_index.py  an approximate index (faiss, optional) for generation's search
    plots.py        curves.png, redrawn from log.jsonl as the run evaluates
"""

"""
What the nine tutorial files lean on, kept out of their way. Four modules import from the nine
files: lexical.py and batch_generate.py are faster forms of their code (datastore.py's TF-IDF over
a whole corpus; generate.generate, many prompts at once); datastore_file.py and prompts.py use
datastore.py's Datastore, embed_all and query_text, as the scripts do. buckets.py, the faster form
of embedder.embed_tokens over a batch's candidates, is called by embedder.py and imports nothing.

    cli.py          flags from a config dataclass; one-line errors; Ctrl-C; glibc's malloc
    config.py       every flag of train.py, sample.py and evaluate.py; checks; device; autocast
    corpora.py      corpora as documents of segments: facts, pydoc, .txt and .jsonl readers
    facts.py        the generated `facts` world
    tokenizer.py    the tokenizer (bytes, or GPT-2's BPE offline) with the marker token
    prepare.py      the prepared-data cache's key; long texts prepared in pieces
    checkpoint.py   ckpt.pt written whole, read back with one-line errors; --resume; --init_from
    distributed.py  several processes (torchrun): DDP, L_NSP's candidates gathered from all
    datastore_file.py  out_dir/datastore.pt, used only while fresh
    buckets.py      Emb_seq over a batch's candidates in length buckets
    lexical.py      TF-IDF over a whole corpus, a chunk of queries at a time
    intervals.py    95% intervals of the retrieval figures, the paired difference of two orders
    search.py       generation's search of the datastore (--index): exact, faiss or two-stage
    kv_cache.py     generate.py's KV cache
    batch_generate.py  many prompts decoded at once (evaluation's answers)
    prompts.py      sample.py's prompt and display; evaluate.py's questions and answers
    gpt2.py         --init_from a GPT-2's folder: its config and weights read from disk
    plots.py        curves.png, redrawn from log.jsonl at every evaluation
"""

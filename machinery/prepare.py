"""
Preparation: a corpus's documents become, once, the arrays data.py reads (token streams as numpy
memmaps, as nanoGPT does, each marker's position and target, every datastore sequence's tokens and
hard negatives). They are cached under a key that hashes the documents and the tokenizer, so a
changed input is prepared again, never reused.
"""

import hashlib
import json
import os
import shutil

import numpy as np

from machinery.corpora import Segment

FORMAT_VERSION = 2        # bump when the prepared format changes, so old caches are not reused


def _tokenize(docs, tok, seq_id, seq_tokens):
    """The token stream of a split, where its documents start, and each marker's position and
    target sequence id."""
    ids, doc_starts, marker_pos, marker_target = [], [], [], []
    for doc in docs:
        doc_starts.append(len(ids))
        for seg in doc:
            if seg.sequence:
                marker_pos.append(len(ids))
                marker_target.append(seq_id[seg.text])
                ids.append(tok.marker)
                ids.extend(seq_tokens[seq_id[seg.text]])
            else:
                ids.extend(tok.encode(seg.text))
        ids.append(tok.eod)
    return ids, doc_starts, marker_pos, marker_target


def prepare(corpus, tok, cache_dir):
    """Tokenize a corpus into `cache_dir/<key>/` (unless already there) and return its path. The
    key hashes the documents themselves and the tokenizer: any change in either is a new key."""
    key = hashlib.sha256(repr((FORMAT_VERSION, tok.fingerprint, corpus)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    # A val sequence that training has seen (as a sequence, or anywhere inside the training
    # text) would be a leak: in val it stays plain text, never a retrieval target.
    train_text = "\n".join(s.text for d in corpus.train for s in d)
    val = [[Segment(s.text, s.sequence and s.text not in train_text) for s in d]
           for d in corpus.val]
    # train's sequences first: ids below n_train are the ones training may use
    train_seqs = dict.fromkeys(s.text for d in corpus.train for s in d if s.sequence)
    texts = list(dict.fromkeys([*train_seqs, *(s.text for d in val for s in d if s.sequence)]))
    seq_id = {t: i for i, t in enumerate(texts)}
    seq_tokens = [tok.encode(t) for t in texts]
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    meta = {"key": key, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "aligned": corpus.aligned, "dtype": np.dtype(dtype).name, "n_sequences": len(texts),
            "n_train_sequences": len(train_seqs)}
    for name, docs in (("train", corpus.train), ("val", val)):
        ids, starts, pos, target = _tokenize(docs, tok, seq_id, seq_tokens)
        np.array(ids, dtype=dtype).tofile(os.path.join(tmp, f"{name}.bin"))
        np.savez(os.path.join(tmp, f"{name}.npz"), doc_starts=np.array(starts, dtype=np.int64),
                 marker_pos=np.array(pos, dtype=np.int64),
                 marker_target=np.array(target, dtype=np.int64))
        meta[f"{name}_tokens"], meta[f"{name}_markers"] = len(ids), len(pos)
    # each sequence's hard negatives: distinct, never itself, at most 8
    hard = [[seq_id[h] for h in dict.fromkeys(corpus.hard_negatives.get(t, []))
             if h in seq_id and h != t][:8] for t in texts]
    hard_array = np.full((len(texts), max([len(h) for h in hard] + [1])), -1, dtype=np.int64)
    for i, h in enumerate(hard):
        hard_array[i, :len(h)] = h
    lengths = np.array([len(s) for s in seq_tokens], dtype=np.int64)
    np.savez(os.path.join(tmp, "sequences.npz"), offsets=np.concatenate([[0], np.cumsum(lengths)]),
             tokens=np.array([t for s in seq_tokens for t in s], dtype=dtype),
             hard_negatives=hard_array)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, path)  # atomic: a half-written cache is never found under the key
    except OSError:  # another process prepared the same data first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path



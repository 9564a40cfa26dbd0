"""
Preparation: a corpus's documents become, once, the arrays data.py reads (token streams as numpy
memmaps, as nanoGPT does, each marker's position and target, every datastore sequence's tokens and
hard negatives). They are cached under a key that hashes the documents and the tokenizer, so a
changed input is prepared again, never reused. What the stream holds, and which val sequences
stay plain text, is data.py's (write_stream, seen_in_training); this is the cache around them.

Tokens are written as they are made, a chunk at a time, never held as one Python list: memory
stays within a small multiple of the text itself, however long it is.
"""

import hashlib
import json
import os
import shutil

import numpy as np

import data
from machinery.cli import UserError

FORMAT_VERSION = 3        # bump when the prepared format changes, so old caches are not reused
CHUNK = 1 << 20           # tokens (and characters of a long text) handled at a time


def _key(corpus, tok):
    """A hash of everything preparation reads: the documents, hard negatives and tokenizer,
    taken a document at a time rather than from one repr of the whole corpus."""
    h = hashlib.sha256(repr((FORMAT_VERSION, tok.fingerprint, corpus.aligned)).encode())
    for docs in (corpus.train, corpus.val):
        h.update(b"split")
        for doc in docs:
            h.update(repr(doc).encode())
    for item in corpus.confusable.items():
        h.update(repr(item).encode())
    return h.hexdigest()[:16]


def _encode(tok, text, chunk):
    """tok.encode(text) as numpy arrays, a piece of about `chunk` characters at a time. A piece
    ends before a space that follows and precedes a non-space: no match of the pre-tokenizer
    (bytes' or GPT-2's) crosses such a cut, so the pieces' tokens are the whole text's."""
    start = 0
    while start < len(text):
        end = len(text)
        cut = text.find(" ", start + chunk)
        while 0 < cut < len(text) - 1:
            if not (text[cut - 1].isspace() or text[cut + 1].isspace()):
                end = cut
                break
            cut = text.find(" ", cut + 1)
        yield np.array(tok.encode(text[start:end]), dtype=np.int64)
        start = end


class _Stream:
    """A token stream written to a file as it grows: append arrays, flushed every `chunk`."""

    def __init__(self, path, dtype, chunk):
        self.file, self.dtype, self.chunk = open(path, "wb"), dtype, chunk
        self.pending, self.n_pending, self.n = [], 0, 0

    def append(self, ids):
        self.pending.append(ids)
        self.n_pending, self.n = self.n_pending + len(ids), self.n + len(ids)
        if self.n_pending >= self.chunk:
            self.flush()

    def flush(self):
        if self.pending:
            np.concatenate(self.pending).astype(self.dtype).tofile(self.file)
        self.pending, self.n_pending = [], 0

    def close(self):
        self.flush()
        self.file.close()


def _sequence_tokens(texts, tok, dtype):
    """The tokens of all sequences end to end, and offsets (n + 1,): sequence i is
    tokens[offsets[i]:offsets[i + 1]]."""
    pieces, lengths = [], np.zeros(len(texts), dtype=np.int64)
    for s in range(0, len(texts), 4096):
        batch = [tok.encode(t) for t in texts[s:s + 4096]]
        lengths[s:s + len(batch)] = [len(ids) for ids in batch]
        pieces.append(np.fromiter((i for ids in batch for i in ids), dtype=dtype,
                                  count=int(lengths[s:s + len(batch)].sum())))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def _write_split(path, docs, leaked, tok, seq_id, tokens, offsets, chunk):
    """data.write_stream of a split into the file `path`, `chunk` tokens at a time; also returns
    the stream's length."""
    stream = _Stream(path, tokens.dtype, chunk)
    out = data.write_stream(stream, docs, leaked, tok, seq_id,
                            lambda i: tokens[offsets[i]:offsets[i + 1]],
                            lambda text: _encode(tok, text, chunk))
    stream.close()
    return (*out, stream.n)


def found_in(needles, haystack):
    """The needles (strings) that occur in haystack: {t for t in needles if t in haystack}, in
    8 passes over haystack rather than one per needle (hours, not seconds, for a 50 MB novel).

    In UTF-8, a needle occurs in the text iff its bytes occur in the text's bytes. Every 8 bytes
    of the text, read as one uint64 at each of the 8 offsets, are compared at once with the
    needles' first 8 bytes; only where those agree is a whole needle compared."""
    text = haystack.encode()
    found = {t for t in needles if len(t.encode()) < 8 and t in haystack}
    by_prefix = {}                       # first 8 bytes -> {length: {needle's bytes: needle}}
    for t in needles:
        b = t.encode()
        if len(b) >= 8:
            by_prefix.setdefault(b[:8], {}).setdefault(len(b), {})[b] = t
    prefixes = np.frombuffer(b"".join(by_prefix), dtype="<u8")               # (P,)
    for o in range(min(8, len(text) - 7)):  # a text under 8 bytes holds no needle of 8
        words = np.frombuffer(text, dtype="<u8", count=(len(text) - o) // 8, offset=o)
        for p in o + 8 * np.flatnonzero(np.isin(words, prefixes)):  # byte positions of a prefix
            for length, group in by_prefix[text[p:p + 8]].items():
                if text[p:p + length] in group:
                    found.add(group[text[p:p + length]])
    return found


def prepare(corpus, tok, cache_dir, chunk=CHUNK):
    """Tokenize a corpus into `cache_dir/<key>/` (unless already there) and return its path. The
    key hashes the documents themselves and the tokenizer: any change in either is a new key.
    chunk: tokens written at a time; the files do not depend on it."""
    key = _key(corpus, tok)
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    leaked = data.seen_in_training(corpus)
    # train's sequences first: ids below n_train are the ones training may use
    train_seqs = dict.fromkeys(s.text for d in corpus.train for s in d if s.sequence)
    texts = list(dict.fromkeys([*train_seqs, *(s.text for d in corpus.val for s in d
                                               if s.sequence and s.text not in leaked)]))
    seq_id = {t: i for i, t in enumerate(texts)}
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    tokens, offsets = _sequence_tokens(texts, tok, dtype)
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    meta = {"key": key, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "aligned": corpus.aligned, "dtype": np.dtype(dtype).name, "n_sequences": len(texts),
            "n_train_sequences": len(train_seqs)}
    for name, docs, leak in (("train", corpus.train, set()), ("val", corpus.val, leaked)):
        starts, pos, target, n = _write_split(os.path.join(tmp, f"{name}.bin"), docs, leak, tok,
                                              seq_id, tokens, offsets, chunk)
        np.savez(os.path.join(tmp, f"{name}.npz"), doc_starts=np.array(starts, dtype=np.int64),
                 marker_pos=np.array(pos, dtype=np.int64),
                 marker_target=np.array(target, dtype=np.int64))
        meta[f"{name}_tokens"], meta[f"{name}_markers"] = n, len(pos)
    # each sequence's hard negatives: distinct, never itself, at most 8; -1 where none
    hard = np.full((len(texts), 8), -1, dtype=np.int64)                  # (n_sequences, 8)
    for i, t in enumerate(texts):
        h = [seq_id[h] for h in dict.fromkeys(corpus.confusable.get(t, []))
             if h in seq_id and h != t][:8]
        hard[i, :len(h)] = h
    width = max(1, int((hard >= 0).sum(axis=1).max(initial=0)))
    np.savez(os.path.join(tmp, "sequences.npz"), offsets=offsets, tokens=tokens,
             hard_negatives=hard[:, :width])
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, path)  # atomic: a half-written cache is never found under the key
    except OSError:  # another process prepared the same data first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# -----------------------------------------------------------------------------------------------
# Reading it back (data.Data) and checking it holds what training needs

class Split:
    """One split's token stream (a memmap), where its documents start, and its markers."""

    def __init__(self, path, name, dtype):
        self.ids = np.memmap(os.path.join(path, f"{name}.bin"), dtype=dtype, mode="r")
        arrays = np.load(os.path.join(path, f"{name}.npz"))
        self.doc_starts, self.marker_pos = arrays["doc_starts"], arrays["marker_pos"]
        self.marker_target = arrays["marker_target"]


def first(ids):
    """Each row's ids (>= 0) moved to its front, in their order; -1 after them."""
    order = np.argsort(ids < 0, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def document_windows(doc_starts, n_tokens, T):
    """Window starts for self-contained documents: each document's start, and, where a document
    is longer than a window, more starts every T/2 tokens and one that ends at its end, so that
    every token of every document is read and predicted by some window."""
    ends = np.append(doc_starts[1:], n_tokens)
    starts = []
    for a, b in zip(doc_starts, ends):
        starts += list(range(a, max(a + 1, b - T), T // 2)) + ([b - T - 1] if b - a > T + 1 else [])
    # a window needs T + 1 tokens: a start too near the stream's end (the last documents') moves
    # back to the last start that fits, a window that still reads that document to its end
    return np.unique(np.minimum(np.array(starts, dtype=np.int64), n_tokens - T - 1))


def check_corpus(corpus, dataset):
    """A corpus whose train or val split has no text is an error: too small to split."""
    for name, docs in (("train", corpus.train), ("val", corpus.val)):
        if not any(s.text.strip() for d in docs for s in d):
            raise UserError(f"{dataset}: its {name} split has no text; the corpus is too "
                            "small to split into train and val")


def check_block(train, val, block_size):
    """A split shorter than one window of block_size + 1 tokens is an error."""
    for name, split in (("train", train), ("val", val)):
        if len(split.ids) < block_size + 1:
            raise UserError(f"the {name} split has {len(split.ids)} tokens, fewer than one "
                            f"block ({block_size + 1}): use a larger corpus or a smaller "
                            "--block_size")

"""The cache around data.prepare: its key, and what keeps a long text's preparation within a
small multiple of the text's own memory and time."""

import hashlib
import os
import shutil

import numpy as np

FORMAT_VERSION = 3        # bump when the prepared format changes, so old caches are not reused
CHUNK = 1 << 20           # characters of a long text encoded at a time


def cache_key(corpus, tok):
    """A hash of all that preparation reads: other documents, negatives or tokenizer: a new key."""
    h = hashlib.sha256(repr((FORMAT_VERSION, tok.fingerprint, corpus.aligned)).encode())
    for docs in (corpus.train, corpus.val):
        h.update(b"split")
        for doc in docs:
            h.update(repr(doc).encode())
    for item in corpus.confusable.items():
        h.update(repr(item).encode())
    return h.hexdigest()[:16]


def encode_pieces(tok, text, chunk=CHUNK):
    """tok.encode(text) in pieces of about `chunk` characters, each cut before a space between two
    non-spaces: no pre-tokenizer match crosses it, so the tokens are the whole text's."""
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


class TokenFile:
    """A token stream written to a file as it grows: .append(ids) adds tokens, .n counts them."""

    def __init__(self, path, dtype):
        self.file, self.dtype, self.n = open(path, "wb"), dtype, 0

    def append(self, ids):
        self.file.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.n += len(ids)

    def close(self):
        self.file.close()


def sequence_tokens(texts, tok, dtype):
    """All sequences' tokens end to end, and offsets (n + 1,): sequence i is
    tokens[offsets[i]:offsets[i + 1]]. 4096 at a time: never one list of every token."""
    pieces, lengths = [np.zeros(0, dtype=dtype)], np.zeros(len(texts), dtype=np.int64)
    for s in range(0, len(texts), 4096):
        batch = [tok.encode(t) for t in texts[s:s + 4096]]
        lengths[s:s + len(batch)] = [len(ids) for ids in batch]
        pieces.append(np.array([i for ids in batch for i in ids], dtype=dtype))
    return np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)])


def found_in(needles, haystack):
    """{t for t in needles if t in haystack} in 8 passes, not one per needle: the text read as
    uint64 at 8 offsets against the needles' first 8 bytes; only there is a needle compared."""
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


def publish(tmp, path):
    """tmp, written whole, becomes path at once; if another process was first, theirs stays."""
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)

"""
Corpora, tokenizer and batches: everything between a text on disk and the tensors of one step.

One corpus model serves every dataset. A corpus is a list of documents; a document is a list of
segments; a segment is plain text or a *sequence*, a datastore entry. In the token stream every
sequence is written right after a retrieval marker:

    ... text  <marker> sequence tokens  text ... <eod>

so every marker has exactly one target sequence: the tokens that follow it. L_NTP trains on every
token (markers and sequence tokens included, as the paper's code does); L_NSP trains Gen's query at
each marker to find that target among other sequences. The datastore is the set of all distinct
sequences of the corpus, train and val.

Prepared data (token ids as numpy memmaps, as nanoGPT does) is cached under a key that hashes the
source, the tokenizer and the settings, so a changed input is prepared again, never reused.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tiktoken
import torch

from cli import UserError

MARKER = "<|ret|>"        # the retrieval marker: "the next sequence comes from the datastore"
EOD = "<|endoftext|>"     # end of document (GPT-2's own end-of-text token)
FORMAT_VERSION = 1        # bump when the prepared format changes, so old caches are not reused
# GPT-2's pre-tokenizer regex (split into words, numbers, punctuation, spaces)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FILE_ENV = "COSUP_GPT2_FILE"


# -----------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A tiktoken Encoding plus our two special tokens. `bytes`: the 256 single bytes (offline, any
    text); `gpt2`: GPT-2's BPE from tiktoken's cache or from a local `.tiktoken` file."""

    def __init__(self, name, gpt2_file=""):
        if name == "bytes":
            ranks, pattern = {bytes([i]): i for i in range(256)}, r"\S{1,32}|\s{1,32}"
        elif name == "gpt2":
            ranks = _gpt2_ranks(gpt2_file or os.environ.get(GPT2_FILE_ENV, ""))
            pattern = GPT2_PATTERN
        else:
            raise UserError(f"unknown tokenizer {name!r}: choose 'bytes' or 'gpt2'")
        n = len(ranks)
        self.name = name
        self.enc = tiktoken.Encoding(f"cosup-{name}", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={EOD: n, MARKER: n + 1})
        self.eod, self.marker, self.vocab_size = n, n + 1, n + 2
        self.fingerprint = hashlib.sha256(repr(sorted(ranks.items())).encode()).hexdigest()[:16]

    def encode(self, text):
        # encode_ordinary: a literal "<|ret|>" in a user's text stays text, never becomes a marker
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")


def _gpt2_ranks(path):
    if path:
        if not os.path.isfile(path):
            raise UserError(f"GPT-2 BPE file not found: {path}")
        return tiktoken.load.load_tiktoken_bpe(path)
    try:  # tiktoken's cache, or a download when online
        return tiktoken.get_encoding("gpt2")._mergeable_ranks
    except Exception:
        raise UserError("the GPT-2 BPE is not cached and cannot be downloaded: pass --gpt2_file "
                        f"PATH (or set {GPT2_FILE_ENV}) to a gpt2.tiktoken file; see README") from None


# -----------------------------------------------------------------------------------------------
# Corpora: lists of documents of segments

class Segment(NamedTuple):
    text: str
    sequence: bool = False   # True: a datastore entry, written after a marker


@dataclass
class Corpus:
    train: list              # documents (lists of Segments)
    val: list
    hard_negatives: dict     # sequence text -> texts easily confused with it
    aligned: bool            # windows start at document starts (short, self-contained documents)


def read_text(path):
    """A UTF-8 text file's text, or a one-line error that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None
    if "\0" in text:  # valid UTF-8, but no text file holds NUL (UTF-16, say, or a binary)
        raise UserError(f"{path} looks binary (a NUL byte at byte {raw.index(0)}): give a UTF-8 "
                        "text file")
    if not text.strip():
        raise UserError(f"{path} has no text")
    return text


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _text_documents(text, split):
    """A text as one document, each sentence (or line) a sequence; `none`: plain text, no markers.
    The whitespace between sequences stays as plain text, so the stream reproduces the text."""
    if split == "none":
        return [[Segment(text)]] if text else []
    pattern = SENTENCE_END if split == "sentence" else re.compile(r"\n+")
    doc, pos = [], 0
    for m in list(pattern.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if text[pos:end].strip():
            doc.append(Segment(text[pos:end], sequence=True))
        elif text[pos:end]:
            doc.append(Segment(text[pos:end]))
        if m:
            doc.append(Segment(m.group()))
            pos = m.end()
    return [doc] if doc else []


def _split_text(path, text, split, val_fraction):
    """Train = the first part of the text, val = the last `val_fraction`, cut at a boundary."""
    cut = int(len(text) * (1 - val_fraction))
    if split != "none":  # move the cut to the next sequence boundary so no sequence is cut in two
        pattern = SENTENCE_END if split == "sentence" else re.compile(r"\n+")
        m = pattern.search(text, cut)
        if not m or not text[m.end():].strip():
            boundary, other = (("sentence end (. ! or ? then a space)", "line")
                               if split == "sentence" else ("line break", "sentence"))
            raise UserError(f"{path}: no {boundary} in the last {val_fraction:.0%} of the text to "
                            "start the val split at: the file is too small or has no such breaks "
                            f"(try --split {other} or --split none)")
        cut = m.end()
    return _text_documents(text[:cut], split), _text_documents(text[cut:], split)


def _neighbours(docs, k=2):
    """Default hard negatives: the sequences nearest a sequence in its document."""
    out = {}
    for doc in docs:
        seqs = [s.text for s in doc if s.sequence]
        for i, s in enumerate(seqs):
            near = seqs[max(0, i - k):i] + seqs[i + 1:i + 1 + k]
            out.setdefault(s, [t for t in near if t != s])
    return out


def _read_jsonl(path):
    """One document per line: {"segments": [{"text": "..."} or {"sequence": "..."}, ...]}."""
    docs = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            segments = json.loads(line)["segments"]
            doc = [Segment(s["sequence"], True) if "sequence" in s else Segment(s["text"])
                   for s in segments]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: expected a JSON object with a list 'segments' of "
                            "{'text': ...} or {'sequence': ...}") from None
        if any(not isinstance(s.text, str) for s in doc):
            raise UserError(f"{path}:{n}: segment values must be strings")
        docs.append(doc)
    return docs


def load_corpus(dataset, split="sentence", val_fraction=0.1, facts_people=400, facts_heldout=0.2):
    """The documents of a dataset: `facts`, `pydoc`, or a path to a .txt or .jsonl file."""
    if dataset == "facts":
        from facts import build_facts
        train, val, hard = build_facts(facts_people, facts_heldout)
        return Corpus(train, val, hard, aligned=True)
    if dataset == "pydoc":  # CPython's own documentation text: real prose, always present offline
        from pydoc_data.topics import topics
        docs = [d for key in sorted(topics) for d in _text_documents(topics[key].strip(), split)]
        n_val = max(1, round(len(docs) * val_fraction))
        train, val = docs[:-n_val], docs[-n_val:]
        return Corpus(train, val, _neighbours(docs), aligned=False)
    if dataset.endswith(".jsonl"):
        docs = _read_jsonl(dataset)
        n_val = max(1, round(len(docs) * val_fraction))
        return Corpus(docs[:-n_val], docs[-n_val:], _neighbours(docs), aligned=True)
    if dataset.endswith(".txt"):
        train, val = _split_text(dataset, read_text(dataset), split, val_fraction)
        return Corpus(train, val, _neighbours(train + val), aligned=False)
    raise UserError(f"unknown dataset {dataset!r}: use facts, pydoc, or a path to a .txt or .jsonl")


# -----------------------------------------------------------------------------------------------
# Preparation: documents -> token stream, marker positions, datastore sequences (cached on disk)

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
    # A val sequence that is also in the train text would be a leak: in val it stays plain text.
    train_seqs = {s.text for d in corpus.train for s in d if s.sequence}
    val = [[Segment(s.text, s.sequence and s.text not in train_seqs) for s in d]
           for d in corpus.val]
    texts = list(dict.fromkeys(s.text for d in corpus.train + val for s in d if s.sequence))
    seq_id = {t: i for i, t in enumerate(texts)}
    seq_tokens = [tok.encode(t) for t in texts]
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    meta = {"key": key, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "aligned": corpus.aligned, "dtype": np.dtype(dtype).name, "n_sequences": len(texts)}
    for name, docs in (("train", corpus.train), ("val", val)):
        ids, starts, pos, target = _tokenize(docs, tok, seq_id, seq_tokens)
        np.array(ids, dtype=dtype).tofile(os.path.join(tmp, f"{name}.bin"))
        np.savez(os.path.join(tmp, f"{name}.npz"), doc_starts=np.array(starts, dtype=np.int64),
                 marker_pos=np.array(pos, dtype=np.int64),
                 marker_target=np.array(target, dtype=np.int64))
        meta[f"{name}_tokens"], meta[f"{name}_markers"] = len(ids), len(pos)
    hard = [[seq_id[h] for h in corpus.hard_negatives.get(t, []) if h in seq_id][:8] for t in texts]
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


# -----------------------------------------------------------------------------------------------
# Batches

class Batch(NamedTuple):
    x: torch.Tensor           # (B, T) input tokens
    y: torch.Tensor           # (B, T) next tokens: the L_NTP targets
    marker_index: tuple       # (rows, cols) of every marker in x: where Gen makes queries
    seq_tokens: torch.Tensor  # (N, L) the batch's candidate sequences, each once, right-padded
    seq_mask: torch.Tensor    # (N, L) True on real tokens
    positive: torch.Tensor    # (M,) for each marker, the row of its target in seq_tokens
    seq_ids: torch.Tensor     # (N,) the datastore id of each row of seq_tokens

    def to(self, device):
        return Batch(*(tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
                       for v in self))


class Split:
    def __init__(self, path, name, dtype):
        self.ids = np.memmap(os.path.join(path, f"{name}.bin"), dtype=dtype, mode="r")
        arrays = np.load(os.path.join(path, f"{name}.npz"))
        self.doc_starts, self.marker_pos = arrays["doc_starts"], arrays["marker_pos"]
        self.marker_target = arrays["marker_target"]


class Data:
    """A prepared corpus: train and val token streams with their markers, and the datastore's
    sequences (token ids and hard negatives) that the markers point to."""

    def __init__(self, path, block_size):
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.fingerprint = self.meta["key"]
        self.train, self.val = (Split(path, s, self.meta["dtype"]) for s in ("train", "val"))
        seqs = np.load(os.path.join(path, "sequences.npz"))
        self.offsets, self.seq_ids, self.hard_negatives = (seqs["offsets"], seqs["tokens"],
                                                           seqs["hard_negatives"])
        self.n_sequences = len(self.offsets) - 1
        self.block_size = block_size
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split.ids) < block_size + 1:
                raise UserError(f"the {name} split has {len(split.ids)} tokens, fewer than one "
                                f"block ({block_size + 1}): use a larger corpus or a smaller "
                                "--block_size")
        # allowed window starts: document starts (for short self-contained documents) or anywhere
        self.starts = {name: s.doc_starts[s.doc_starts < len(s.ids) - block_size]
                       if self.meta["aligned"] else None
                       for name, s in (("train", self.train), ("val", self.val))}

    def sequence(self, i):
        return self.seq_ids[self.offsets[i]:self.offsets[i + 1]]

    def pad_sequences(self, ids, seq_len):
        """Token ids of the given sequences, cut to seq_len and right-padded, with their mask."""
        lengths = np.minimum(self.offsets[ids + 1] - self.offsets[ids], seq_len)
        tokens = np.zeros((len(ids), max(1, lengths.max(initial=1))), dtype=np.int64)
        for row, (i, n) in enumerate(zip(ids, lengths)):
            tokens[row, :n] = self.seq_ids[self.offsets[i]:self.offsets[i] + n]
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def get_batch(self, split_name, batch_size, rng, hard_negatives=0, seq_len=64):
        split, T = getattr(self, split_name), self.block_size
        starts = self.starts[split_name]
        i = (rng.choice(starts, batch_size) if starts is not None
             else rng.integers(0, len(split.ids) - T, batch_size))
        window = np.stack([split.ids[s:s + T + 1] for s in i]).astype(np.int64)
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        # the markers inside each window, and the sequence each one points to
        lo, hi = np.searchsorted(split.marker_pos, i), np.searchsorted(split.marker_pos, i + T)
        rows = np.repeat(np.arange(batch_size), hi - lo)
        sel = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)] + [np.zeros(0, np.int64)])
        cols, targets = split.marker_pos[sel] - i[rows], split.marker_target[sel]
        # candidates: each target once (two markers with the same target share its row, so neither
        # counts it as a negative) plus `hard_negatives` confusable sequences per marker
        negatives = np.zeros(0, dtype=np.int64)
        if hard_negatives and len(targets):
            pool = self.hard_negatives[targets]
            pick = rng.random(pool.shape).argsort(axis=1)[:, :hard_negatives]
            negatives = np.take_along_axis(pool, pick, axis=1).ravel()
            negatives = negatives[negatives >= 0]
        candidates = np.unique(np.concatenate([targets, negatives]))
        seq_tokens, seq_mask = self.pad_sequences(candidates, seq_len)
        return Batch(x, y, (torch.from_numpy(rows), torch.from_numpy(cols)), seq_tokens, seq_mask,
                     torch.from_numpy(np.searchsorted(candidates, targets)),
                     torch.from_numpy(candidates))

    def marker_contexts(self, split_name, limit=None):
        """For each marker of a split (the first `limit`), the tokens Gen sees when it writes the
        marker (its document up to the marker, at most block_size), and its target sequence id."""
        split = getattr(self, split_name)
        n = len(split.marker_pos) if limit is None else min(limit, len(split.marker_pos))
        doc = split.doc_starts[np.searchsorted(split.doc_starts, split.marker_pos[:n], "right") - 1]
        start = np.maximum(doc, split.marker_pos[:n] - self.block_size + 1)
        contexts = [np.asarray(split.ids[a:p + 1], dtype=np.int64)
                    for a, p in zip(start, split.marker_pos[:n])]
        return contexts, split.marker_target[:n]


def load_data(cfg):
    """Build (or find in the cache) the prepared corpus of a config; returns (Data, Tokenizer)."""
    tok = Tokenizer(cfg.tokenizer, cfg.gpt2_file)
    corpus = load_corpus(cfg.dataset, cfg.split, cfg.val_fraction, cfg.facts_people,
                         cfg.facts_heldout)
    for name, docs in (("train", corpus.train), ("val", corpus.val)):
        if not any(s.text.strip() for d in docs for s in d):
            raise UserError(f"{cfg.dataset}: its {name} split has no text; the corpus is too "
                            "small to split into train and val")
    return Data(prepare(corpus, tok, cfg.cache_dir), cfg.block_size), tok

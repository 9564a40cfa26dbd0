"""
The data of co-supervision: one token stream per split, and the batches of one training step.
A corpus (machinery/corpora.py) is documents of plain text and *sequences* (a fact, a sentence),
the datastore's entries. Each sequence is written right after a marker, its one target:

    Q: Which instrument does Doubrour Piltreimdrouk play?
    <|ret|>Doubrour Piltreimdrouk plays the tuba.
    A: tuba.
    <|endoftext|>

A batch is B windows of T + 1 tokens; its M markers are the queries, its N candidates every
marker's target once plus up to hard_negatives confusable sequences per marker: on facts,
look-alike people's (machinery/facts.py); on text, TF-IDF's best (use_lexical_negatives).
"""

import json
import os
import sys
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from datastore import marker_texts
from machinery.cli import UserError
from machinery.corpora import is_facts, load_corpus
from machinery.lexical import lexical_index
from machinery.prepare import (CHUNK, TokenFile, cache_key, encode_pieces, found_in, publish,
                               sequence_tokens)
from machinery.tokenizer import Tokenizer

LEXICAL_LIMIT = 50_000  # sequences; above, auto takes neighbours: TF-IDF's cost grows as its square


class Batch(NamedTuple):
    x: torch.Tensor               # (B, T) input tokens
    y: torch.Tensor               # (B, T) next tokens: the L_NTP targets
    marker_index: tuple           # (rows, cols), each (M,): the markers in x, Gen's queries
    candidates: torch.Tensor      # (N, L) the candidate sequences' tokens, each once, right-padded
    candidate_mask: torch.Tensor  # (N, L) True on real tokens
    target_row: torch.Tensor      # (M,) for each marker, the row of its target in candidates
    candidate_ids: torch.Tensor   # (N,) the datastore id of each candidate
    neighbours: torch.Tensor      # (M, 2 near) ids of each marker's near_targets (-1: none)

    def to(self, device):
        return Batch(*(tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
                       for v in self))


class Data:
    """A prepared corpus: train and val token streams, and the datastore's sequences."""

    def __init__(self, path, block_size, transductive=False):
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.path, self.fingerprint, self.transductive = path, self.meta["key"], transductive
        # each split's token stream (a memmap, as nanoGPT's train.bin) and its arrays: doc_starts,
        # marker_pos and marker_target (each marker's position and its target's datastore id)
        self.train, self.val = (SimpleNamespace(
            ids=np.memmap(os.path.join(path, f"{name}.bin"), dtype=self.meta["dtype"], mode="r"),
            **np.load(os.path.join(path, f"{name}.npz"))) for name in ("train", "val"))
        seqs = np.load(os.path.join(path, "sequences.npz"))
        # the tokens of all sequences end to end: sequence i is seq_tokens[offsets[i]:offsets[i+1]]
        self.offsets, self.seq_tokens = seqs["offsets"], seqs["tokens"]
        self.n_sequences = len(self.offsets) - 1
        self.block_size = block_size
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split.ids) < block_size + 1:
                raise UserError(f"the {name} split has {len(split.ids)} tokens, fewer than one "
                                f"block ({block_size + 1}): use a larger corpus or a smaller "
                                "--block_size")
        negatives = seqs["hard_negatives"]  # (n_sequences, h_max), distinct, -1 where none
        self.negatives = {"train": self.held_out(negatives), "val": negatives}
        self.near = 0  # the markers on each side whose targets are no negatives (near_targets)
        # window starts: anywhere in a text; in self-contained documents, document_windows
        self.starts = {name: document_windows(s.doc_starts, len(s.ids), block_size)
                       if self.meta["aligned"] else None
                       for name, s in (("train", self.train), ("val", self.val))}

    def get_batch(self, split_name, batch_size, rng, hard_negatives=0, emb_block_size=64):
        """B = batch_size random windows of a split, their markers, and L_NSP's candidates."""
        split, T = getattr(self, split_name), self.block_size
        starts = self.starts[split_name]
        i = (rng.choice(starts, batch_size) if starts is not None
             else rng.integers(0, len(split.ids) - T, batch_size))              # (B,) window starts
        window = np.stack([split.ids[s:s + T + 1] for s in i]).astype(np.int64)  # (B, T+1)
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])  # (B, T) each
        # the markers inside each window, and the sequence each one points to
        lo = np.searchsorted(split.marker_pos, i)                  # (B,) first marker of a window
        hi = np.searchsorted(split.marker_pos, i + T)              # (B,) one past its last
        rows = np.repeat(np.arange(batch_size), hi - lo)           # (M,) the window of each marker
        sel = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)] + [np.zeros(0, np.int64)])
        cols = split.marker_pos[sel] - i[rows]                     # (M,) its position in x
        targets = split.marker_target[sel]                         # (M,) its target's datastore id
        # candidates: each target once (two markers with the same target share its row, so neither
        # counts it as a negative) plus up to `hard_negatives` confusable sequences per marker
        negatives = np.zeros(0, dtype=np.int64)
        if hard_negatives and len(targets):
            negatives = self.pick_negatives(split_name, targets, hard_negatives, rng).ravel()
            negatives = negatives[negatives >= 0]                              # (<= M * h,)
        candidate_ids = np.unique(np.concatenate([targets, negatives]))       # (N,) sorted
        candidates, mask = self.pad_sequences(candidate_ids, emb_block_size)  # (N, L) each
        target_row = np.searchsorted(candidate_ids, targets)                  # (M,)
        neighbours = near_targets(split.marker_target, sel, self.near)        # (M, 2 near)
        return Batch(x, y, (torch.from_numpy(rows), torch.from_numpy(cols)), candidates, mask,
                     torch.from_numpy(target_row), torch.from_numpy(candidate_ids),
                     torch.from_numpy(neighbours))

    def held_out(self, negatives):
        """Training's hard negatives, -1 where none: train's sequences only (unless transductive),
        so that Emb_seq never meets a val sequence before it is evaluated on it."""
        if self.transductive:
            return negatives
        negatives = np.where(negatives < self.meta["n_train_sequences"], negatives, -1)
        order = np.argsort(negatives < 0, axis=1, kind="stable")  # the -1s last, the rest in order
        return np.take_along_axis(negatives, order, axis=1)

    def pick_negatives(self, split_name, targets, h, rng):
        """For each target (M,), h of its hard negatives at random: (M, h), -1 past its own."""
        choices = self.negatives[split_name][targets]                   # (M, h_max), -1: none
        keys = rng.random(choices.shape)                                # (M, h_max)
        keys[choices < 0] = 2.0              # above every random key: padding is picked last
        pick = keys.argsort(axis=1)[:, :h]                              # (M, h)
        return np.take_along_axis(choices, pick, axis=1)

    def use_lexical_negatives(self, tok, width=8, near=2):
        """Hard negatives from the first stage: for each marker's target, TF-IDF's best for its
        context but its near_targets (in train, among train's sequences alone). Cached."""
        self.near = near
        setting = "transductive" if self.transductive else "strict"
        path = os.path.join(self.path, f"lexical_negatives_{setting}_{self.block_size}_{width}_"
                                       f"{near}.npz")
        if os.path.exists(path):
            cached = np.load(path)
            self.negatives = {"train": self.held_out(cached["train"]), "val": cached["val"]}
            return
        lexical = None
        for name in ("train", "val"):
            n = (self.meta["n_train_sequences"] if name == "train" and not self.transductive
                 else self.n_sequences)               # train's sequences are ids below n_train
            if lexical is None or lexical.rows.shape[0] != n:
                lexical = lexical_index(self, tok, n)
            queries, targets = marker_texts(self, tok, name)
            _, top = lexical.top(queries, 3 * width + 2 * near + 1)           # (M, depth)
            around = near_targets(targets, np.arange(len(targets)), near)     # (M, 2 near)
            negatives = np.full((self.n_sequences, width), -1, np.int64)  # (n_sequences, width)
            for m, (target, row) in enumerate(zip(targets, top.tolist())):
                if negatives[target, 0] >= 0:
                    continue
                nearby = {target, *around[m].tolist()}
                picks = [j for j in row if j not in nearby and j >= 0][:width]
                negatives[target, :len(picks)] = picks
            self.negatives[name] = negatives
        np.savez(path + ".tmp.npz", **self.negatives)
        os.replace(path + ".tmp.npz", path)

    def sequence(self, i):
        """The token ids of datastore sequence i."""
        return self.seq_tokens[self.offsets[i]:self.offsets[i + 1]]

    def pad_sequences(self, ids, emb_block_size):
        """Sequences ids cut to emb_block_size, right-padded (n, L), and their mask (n, L)."""
        lengths = np.minimum(self.offsets[ids + 1] - self.offsets[ids], emb_block_size)  # (n,)
        tokens = np.zeros((len(ids), max(1, lengths.max(initial=1))), dtype=np.int64)
        for row, (i, n) in enumerate(zip(ids, lengths)):
            tokens[row, :n] = self.seq_tokens[self.offsets[i]:self.offsets[i] + n]
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def marker_contexts(self, split_name, limit=None, block_size=None):
        """What Gen reads at each marker (its document up to it, at most block_size), its target."""
        split, block_size = getattr(self, split_name), block_size or self.block_size
        n = len(split.marker_pos) if limit is None else min(limit, len(split.marker_pos))
        doc = split.doc_starts[np.searchsorted(split.doc_starts, split.marker_pos[:n], "right") - 1]
        start = np.maximum(doc, split.marker_pos[:n] - block_size + 1)
        contexts = [np.asarray(split.ids[a:p + 1], dtype=np.int64)
                    for a, p in zip(start, split.marker_pos[:n])]
        return contexts, split.marker_target[:n]


def near_targets(marker_target, sel, near):
    """The targets of the `near` markers on each side of markers sel (M,), (M, 2 near), -1 past
    the ends: the text around a marker's target, likely false negatives."""
    offsets = np.concatenate([np.arange(-near, 0), np.arange(1, near + 1)])   # (2 near,)
    idx = np.asarray(sel)[:, None] + offsets[None, :]                        # (M, 2 near)
    inside = (idx >= 0) & (idx < len(marker_target))
    return np.where(inside, marker_target[np.clip(idx, 0, max(0, len(marker_target) - 1))], -1)


def document_windows(doc_starts, n_tokens, T):
    """Window starts: each document's start, every T/2 tokens after, and one ending at its end."""
    ends = np.append(doc_starts[1:], n_tokens)
    starts = []
    for a, b in zip(doc_starts, ends):
        starts += list(range(a, max(a + 1, b - T), T // 2)) + ([b - T - 1] if b - a > T + 1 else [])
    # a window needs T + 1 tokens: a start too near the stream's end moves back to the last fit
    return np.unique(np.minimum(np.array(starts, dtype=np.int64), n_tokens - T - 1))


def prepare(corpus, tok, cache_dir, chunk=CHUNK):
    """Write a corpus once, as the arrays Data reads, into cache_dir/<key>/, and return that. The
    datastore: train's sequences (ids below n_train_sequences), then val's training has not seen."""
    path = os.path.join(cache_dir, cache_key(corpus, tok))
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    train_seqs = dict.fromkeys(s.text for d in corpus.train for s in d if s.sequence)
    # val sequences that training has seen, as a sequence or in its text, stay plain text in val
    val_seqs = {s.text for d in corpus.val for s in d if s.sequence}
    train_text = "\n".join(s.text for d in corpus.train for s in d)
    leaked = (val_seqs & train_seqs.keys()) | found_in(val_seqs - train_seqs.keys(), train_text)
    texts = list(dict.fromkeys([*train_seqs, *(s.text for d in corpus.val for s in d
                                               if s.sequence and s.text not in leaked)]))
    seq_id = {t: i for i, t in enumerate(texts)}
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    tokens, offsets = sequence_tokens(texts, tok, dtype)  # all sequences, end to end
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    meta = {"key": os.path.basename(path), "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "aligned": corpus.aligned, "dtype": np.dtype(dtype).name, "n_sequences": len(texts),
            "n_train_sequences": len(train_seqs)}
    for name, docs, leak in (("train", corpus.train, set()), ("val", corpus.val, leaked)):
        stream = TokenFile(os.path.join(tmp, f"{name}.bin"), dtype)
        starts, pos, target = [], [], []  # where documents start; each marker and its target
        for doc in docs:
            starts.append(stream.n)
            for seg in doc:
                if seg.sequence and seg.text not in leak:    # <marker> sequence tokens
                    i = seq_id[seg.text]
                    pos.append(stream.n)
                    target.append(i)
                    stream.append(np.array([tok.marker]))
                    stream.append(tokens[offsets[i]:offsets[i + 1]])
                else:                                         # plain text, a long one in pieces
                    for ids in encode_pieces(tok, seg.text, chunk):
                        stream.append(ids)
            stream.append(np.array([tok.eod]))
        stream.close()
        np.savez(os.path.join(tmp, f"{name}.npz"), doc_starts=np.array(starts, dtype=np.int64),
                 marker_pos=np.array(pos, dtype=np.int64),
                 marker_target=np.array(target, dtype=np.int64))
        meta[f"{name}_tokens"], meta[f"{name}_markers"] = stream.n, len(pos)
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
    publish(tmp, path)
    return path


def load_data(cfg):
    """Build (or find in the cache) the prepared corpus of a config; returns (Data, Tokenizer)."""
    tok = Tokenizer(cfg.tokenizer, cfg.gpt2_file)
    corpus = load_corpus(cfg.dataset, cfg.split, cfg.val_fraction, cfg.facts_people,
                         cfg.facts_heldout, cfg.facts_wordings)
    for name, docs in (("train", corpus.train), ("val", corpus.val)):
        if not any(s.text.strip() for d in docs for s in d):
            raise UserError(f"{cfg.dataset}: its {name} split has no text; the corpus is too "
                            "small to split into train and val")
    data = Data(prepare(corpus, tok, cfg.cache_dir), cfg.block_size, cfg.transductive)
    text_auto = cfg.negatives == "auto" and not is_facts(cfg.dataset)  # auto: lexical on text
    if text_auto and data.n_sequences > LEXICAL_LIMIT:
        print(f"note: {data.n_sequences:,} sequences: hard negatives are neighbours "
              "(--negatives lexical: TF-IDF's, slow at this size)", file=sys.stderr)
    elif cfg.negatives == "lexical" or text_auto:
        data.use_lexical_negatives(tok)
    return data, tok

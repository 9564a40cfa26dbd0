"""A corpus: documents; a document: segments; a segment: plain text or a *sequence* (a datastore
entry). Each dataset's reader gives train and val documents and the default hard negatives."""

import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from machinery.cli import UserError


class Segment(NamedTuple):
    text: str
    sequence: bool = False   # True: a datastore entry, written after a marker


@dataclass
class Corpus:
    train: list              # documents (lists of Segments)
    val: list
    confusable: dict         # sequence text -> texts easily confused with it (hard negatives)
    aligned: bool            # windows start at document starts (short, self-contained documents)


def read_text(path):
    """A UTF-8 text file's text, or a one-line error saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None
    if "\0" in text:  # valid UTF-8, but no text file holds NUL (UTF-16, say, or a binary)
        raise UserError(f"{path} looks binary (a NUL byte at byte {raw.index(0)}): give a UTF-8 "
                        "text file")
    if not text.strip():
        raise UserError(f"{path} has no text")
    return text


BREAKS = {"sentence": re.compile(r"(?<=[.!?])\s+"), "line": re.compile(r"\n+")}


def _text_documents(text, split):
    """A text as one document, each sentence (or line) a sequence; `none`: plain text only."""
    if split == "none":
        return [[Segment(text)]] if text else []
    doc, pos = [], 0
    for m in list(BREAKS[split].finditer(text)) + [None]:
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
        m = BREAKS[split].search(text, cut)
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
        if any(s.sequence and not s.text for s in doc):  # it would embed to nothing (0 / 0)
            raise UserError(f"{path}:{n}: an empty sequence; give it text or leave it out")
        docs.append(doc)
    return docs


# The generated worlds' seeds. Every recipe choice was made on `facts`; `facts_test` is another
# world (other names, towns and values) that no choice has seen, for the headline figures.
FACTS_WORLDS = {"facts": 1234, "facts_test": 4321}


def is_facts(dataset):
    return dataset in FACTS_WORLDS


def check_dataset(dataset):
    """A one-line error unless dataset names a built-in corpus or an existing .txt or .jsonl."""
    if is_facts(dataset) or dataset == "pydoc":
        return
    if not dataset.endswith((".txt", ".jsonl")):
        raise UserError(f"unknown dataset {dataset!r}: use facts, facts_test, pydoc, or a path to "
                        "a .txt or .jsonl")
    if not os.path.isfile(dataset):
        raise UserError(f"file not found: {dataset}")


def load_corpus(dataset, split="sentence", val_fraction=0.1, facts_people=400, facts_heldout=0.2,
                facts_wordings=1):
    """The documents of a dataset: a facts world, `pydoc`, or a path to a .txt or .jsonl file."""
    check_dataset(dataset)
    if is_facts(dataset):
        from machinery.facts import build_facts
        train, val, confusable = build_facts(facts_people, facts_heldout, facts_wordings,
                                             FACTS_WORLDS[dataset])
        return Corpus(train, val, confusable, aligned=True)
    if dataset.endswith(".txt"):
        train, val = _split_text(dataset, read_text(dataset), split, val_fraction)
        return Corpus(train, val, _neighbours(train + val), aligned=False)
    if dataset == "pydoc":  # CPython's own documentation text: real prose, always present offline
        from pydoc_data.topics import topics
        docs = [d for key in sorted(topics) for d in _text_documents(topics[key].strip(), split)]
    else:
        docs = _read_jsonl(dataset)
    n_val = max(1, round(len(docs) * val_fraction))
    return Corpus(docs[:-n_val], docs[-n_val:], _neighbours(docs), aligned=dataset != "pydoc")

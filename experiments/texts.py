"""
The real-text measurements' texts, cut from Project Gutenberg's files into --out_dir:
sherlock_base.txt (the base's text: Sherlock Holmes without The Hound of the Baskervilles),
hound.txt (the Hound, which the base never saw) and NAME_tune.txt, the training part of pydoc,
alice.txt and hound.txt (its last tenth stands in for val when a recipe is chosen).
--numbered N writes instead numbered_Nmb.txt, the memory rows' text of N MB: pydoc's topics
repeated, every sentence numbered (a repeated sentence would be one datastore entry, its val
copies caught as leaks).

    python -m experiments.texts --sherlock sherlock.txt --alice alice.txt
    python -m experiments.texts --numbered 3
"""

import itertools
import os
import re
from dataclasses import dataclass

from machinery.cli import UserError, flag, main_guard, parse_config
from machinery.corpora import load_corpus, read_text

HOUND = "THE HOUND OF THE BASKERVILLES"
AFTER_HOUND = "THE VALLEY OF FEAR"


@dataclass
class TextsConfig:
    sherlock: str = flag("../shared/corpora/sherlock.txt", "The Complete Sherlock Holmes")
    alice: str = flag("../shared/corpora/alice.txt", "Alice's Adventures in Wonderland")
    out_dir: str = flag(os.path.join("data_cache", "texts"), "where the texts go")
    numbered: int = flag(0, "write only a numbered text of this many MB (0: cut the real texts)")


def cut_hound(text):
    """(the text without the Hound, the Hound alone), cut at its title line and the next book's
    (capitals alone on a line: the table of contents does not capitalise)."""
    lines = text.split("\n")
    titles = [i for i, line in enumerate(lines) if line.strip() in (HOUND, AFTER_HOUND)]
    if len(titles) != 2:
        raise UserError(f"expected one title line each for {HOUND!r} and {AFTER_HOUND!r}, "
                        f"found {len(titles)}")
    start, end = titles
    return "\n".join(lines[:start] + lines[end:]), "\n".join(lines[start:end])


def training_part(dataset):
    """The text of a corpus's train split, as train.py splits it (the defaults)."""
    train = load_corpus(dataset).train
    return "\n\n".join("".join(s.text for s in doc) for doc in train)


def numbered_text(size):
    """A text of at least `size` bytes: pydoc's topics again and again, each sentence numbered."""
    import pydoc_data.topics as topics
    source = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    count, parts, written = itertools.count(), [], 0
    while written < size:
        part = re.sub(r"([.!?])(\s)", lambda m: f" (s{next(count)}){m.group(1)}{m.group(2)}",
                      source)
        parts.append(part)
        written += len(part.encode())
    return "".join(parts)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: {len(text.encode()):,} bytes")


def main(argv=None):
    cfg, _ = parse_config(TextsConfig, __doc__, argv)
    if cfg.numbered < 0:
        raise UserError("--numbered takes a size in MB, 0 or more (0: the real texts)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.numbered:
        path = os.path.join(cfg.out_dir, f"numbered_{cfg.numbered}mb.txt")
        return write(path, numbered_text(cfg.numbered * 1e6))
    base, hound = cut_hound(read_text(cfg.sherlock))
    write(os.path.join(cfg.out_dir, "sherlock_base.txt"), base)
    write(os.path.join(cfg.out_dir, "hound.txt"), hound)
    for name, dataset in (("hound", os.path.join(cfg.out_dir, "hound.txt")),
                          ("alice", cfg.alice), ("pydoc", "pydoc")):
        write(os.path.join(cfg.out_dir, f"{name}_tune.txt"), training_part(dataset))


if __name__ == "__main__":
    main_guard(main)

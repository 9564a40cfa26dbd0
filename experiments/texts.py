"""
The real-text measurements' texts, cut from Project Gutenberg's files into --out_dir:
sherlock_base.txt (the base's text: Sherlock Holmes without The Hound of the Baskervilles),
hound.txt (the Hound, which the base never saw) and NAME_tune.txt, the training part of pydoc,
alice.txt and hound.txt (its last tenth stands in for val when a recipe is chosen).

    python -m experiments.texts --sherlock sherlock.txt --alice alice.txt
"""

import os
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


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    print(f"{path}: {len(text.encode()):,} bytes")


def main(argv=None):
    cfg, _ = parse_config(TextsConfig, __doc__, argv)
    os.makedirs(cfg.out_dir, exist_ok=True)
    base, hound = cut_hound(read_text(cfg.sherlock))
    write(os.path.join(cfg.out_dir, "sherlock_base.txt"), base)
    write(os.path.join(cfg.out_dir, "hound.txt"), hound)
    for name, dataset in (("hound", os.path.join(cfg.out_dir, "hound.txt")),
                          ("alice", cfg.alice), ("pydoc", "pydoc")):
        write(os.path.join(cfg.out_dir, f"{name}_tune.txt"), training_part(dataset))


if __name__ == "__main__":
    main_guard(main)

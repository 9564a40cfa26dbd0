"""sample.py's prompt and display; evaluate.py's questions (and reworded forms) and answers."""

import sys

import numpy as np

from datastore import query_text
from machinery.corpora import read_text
from machinery.facts import reword


def read_prompt(args, data, tok, block_size):
    """--prompt_file's text, else --prompt's (\\n a newline), else default_prompt."""
    text = (read_text(args.prompt_file) if args.prompt_file
            else args.prompt.replace("\\n", "\n") if args.prompt else None)
    prompt = tok.encode(text) if text else default_prompt(data, tok)
    if len(prompt) > block_size:
        print(f"note: the prompt has {len(prompt)} tokens; Gen sees its last {block_size}",
              file=sys.stderr)
    return prompt


def default_prompt(data, tok):
    """The first held-out document up to its first marker with text before it (where Gen should
    write the marker), else up to its first marker; without markers, the first 64 tokens."""
    s = data.val
    if not len(s.marker_pos):
        return [int(t) for t in s.ids[:64]]
    doc = s.doc_starts[np.searchsorted(s.doc_starts, s.marker_pos, "right") - 1]  # (M,) each's doc
    i = int(np.argmax(s.marker_pos > doc))  # 0 where none has text before it
    return [int(t) for t in s.ids[doc[i]:s.marker_pos[i]]] or [tok.eod]


def render(tok, ids, retrievals, prompt, datastore, show):
    """The sample as text, each inserted sequence marked with its datastore id and score."""
    out, pos = [query_text(tok, prompt)], len(prompt)
    for r in retrievals:
        seq = [int(t) for t in datastore.sequence(r.id)] if r.id >= 0 else []
        out.append(tok.decode(ids[pos:r.position]).replace("<|ret|>", ""))
        # two-stage search: where TF-IDF ranked the entry; -1: no entry shares a word, none
        stage = "" if r.first_stage_rank is None else f" TF-IDF #{r.first_stage_rank}"
        out.append(f"[#{r.id} {r.score:.3f}{stage}: "
                   f"{tok.decode(ids[r.position:r.position + len(seq)])}]" if r.id >= 0
                   else "[no candidate]")
        for i, score in r.alternatives[:show]:
            out.append(f"\n    (#{i} {score:.3f}: {tok.decode(datastore.sequence(i))})")
        pos = r.position + len(seq)
    out.append(tok.decode([t for t in ids[pos:] if t != tok.eod]))  # the end needs no mark
    return "".join(out)


def answer(tok, ids):
    """A document's answer: its last non-empty line (special tokens left out)."""
    lines = [line for line in query_text(tok, ids).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def questions(data, tok, split, limit):
    """The first `limit` documents of a split with one marker: (prompt tokens up to the marker,
    or the end-of-document token that precedes it; gold sequence id; the rest of the document)."""
    s = getattr(data, split)
    ends = np.append(s.doc_starts[1:], len(s.ids))
    first = np.searchsorted(s.marker_pos, s.doc_starts)       # each document's markers are
    count = np.searchsorted(s.marker_pos, ends) - first        # marker_pos[first:first + count]
    out = []
    for start, end, i in zip(s.doc_starts[count == 1], ends[count == 1], first[count == 1]):
        if len(out) == limit:
            break
        pos = s.marker_pos[i]
        prompt = s.ids[start:pos] if pos > start else [tok.eod]
        out.append((np.asarray(prompt), int(s.marker_target[i]),
                    np.asarray(s.ids[pos:end - 1])))
    return out


def reworded(qs, tok):
    """`facts` questions in facts.REWORDED's words, never seen in training; the rest the same."""
    out = []
    for prompt, target, gold in qs:
        text = reword(tok.decode(prompt))
        if text is not None:
            out.append((np.asarray(tok.encode(text)), target, gold))
    return out

r"""
The tokenizer: a tiktoken Encoding plus the retrieval marker and the end of a document. `bytes`
(the default) has the 256 single bytes and works offline on any text; `gpt2` is GPT-2's BPE, from
tiktoken's cache, a `.tiktoken` file, or a GPT-2 checkpoint's `vocab.json`. To make a `.tiktoken`
file on a machine that is online:

    python -c "import tiktoken, base64; e = tiktoken.get_encoding('gpt2'); \
      open('gpt2.tiktoken', 'w').writelines(f'{base64.b64encode(t).decode()} {r}\n' \
      for t, r in e._mergeable_ranks.items())"
"""

import base64
import hashlib
import json
import os

import tiktoken

from machinery.cli import UserError

MARKER = "<|ret|>"        # the retrieval marker: "the next sequence comes from the datastore"
EOD = "<|endoftext|>"     # end of document (GPT-2's own end-of-text token)
# GPT-2's pre-tokenizer regex (split into words, numbers, punctuation, spaces)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FILE_ENV = "COSUP_GPT2_FILE"


class Tokenizer:
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
    if not path:
        try:  # tiktoken's cache, or a download when online
            return tiktoken.get_encoding("gpt2")._mergeable_ranks
        except Exception:
            raise UserError("the GPT-2 BPE is not cached and cannot be downloaded: pass "
                            f"--gpt2_file PATH (or set {GPT2_FILE_ENV}) to a gpt2.tiktoken file; "
                            "machinery/tokenizer.py says how to make one") from None
    if not os.path.isfile(path):
        raise UserError(f"GPT-2 BPE file not found: {path}")
    try:
        ranks = _read_vocab_json(path) if path.endswith(".json") else _read_tiktoken_file(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    missing = sum(bytes([i]) not in ranks for i in range(256))
    if missing:  # every text is bytes: without them some text could not be encoded
        raise UserError(f"{path} lacks {missing} of the 256 single bytes: not a GPT-2 BPE file")
    return ranks


def _read_tiktoken_file(path):
    """The ranks of a .tiktoken file: each line the base64 of a token's bytes, then its rank."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error, a bad base64, is one too
                raise UserError(f"{path}:{n} is not a .tiktoken line (the base64 of a token, "
                                "then its rank): not a GPT-2 BPE file") from None
    return ranks


def _read_vocab_json(path):
    """The ranks of a GPT-2 checkpoint's vocab.json (token -> rank), where a byte b is chr(b) if
    printable and not a space, else chr(256 + n) for the n-th other byte."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    try:
        with open(path, encoding="utf-8") as f:
            return {bytes(to_byte[c] for c in token): int(rank)
                    for token, rank in json.load(f).items() if token != EOD}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not a GPT-2 vocab.json (token -> id, bytes written as GPT-2 "
                        "writes them)") from None

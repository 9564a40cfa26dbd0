"""
The tokenizer: a tiktoken Encoding plus the two special tokens the method needs, the retrieval
marker and the end of a document. `bytes` (the default) has the 256 single bytes and works offline
on any text; `gpt2` is GPT-2's BPE, from tiktoken's cache or a local `.tiktoken` file.
"""

import hashlib
import os

import tiktoken

from machinery.cli import UserError

MARKER = "<|ret|>"        # the retrieval marker: "the next sequence comes from the datastore"
EOD = "<|endoftext|>"     # end of document (GPT-2's own end-of-text token)
# GPT-2's pre-tokenizer regex (split into words, numbers, punctuation, spaces)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FILE_ENV = "COSUP_GPT2_FILE"


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



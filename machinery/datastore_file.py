"""
Building the datastore (Emb_seq over every sequence of the corpus: embed_all) and keeping it on
disk, out_dir/datastore.pt: saved with the fingerprint of the Emb_seq and data that built it, used
again only when both match, else built afresh. Persistence only: the datastore itself is
datastore.Datastore.
"""

import hashlib
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from datastore import Datastore


@torch.inference_mode()
def embed_all(embedder, data, ids=None, batch_size=256, progress=None):
    """Emb_seq's embeddings (len(ids), seq_dim), float32, of datastore sequences `ids` (default:
    all). Sorted by length first, so each batch pads little; a progress bar for long jobs."""
    ids = np.arange(data.n_sequences) if ids is None else np.asarray(ids)
    device = next(embedder.parameters()).device
    order = np.argsort(data.offsets[ids + 1] - data.offsets[ids], kind="stable")
    out = torch.empty(len(ids), embedder.config.seq_dim)
    starts = range(0, len(ids), batch_size)
    show = len(ids) > 20_000 if progress is None else progress
    for s in tqdm(starts, desc="embedding sequences", disable=not show, leave=False):
        rows = order[s:s + batch_size]
        tokens, mask = data.pad_sequences(ids[rows], embedder.config.block_size)
        out[torch.from_numpy(rows)] = embedder(tokens.to(device), mask.to(device)).float().cpu()
    return out


def fingerprint(embedder, data):
    """A hash of Emb_seq's weights and the data: a datastore built from either, changed, is
    stale."""
    h = hashlib.sha256(data.fingerprint.encode())
    for name, t in sorted(embedder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build(embedder, data, progress=True):
    """The Datastore of a corpus: every sequence embedded by this Emb_seq (embed_all)."""
    embeddings = embed_all(embedder, data, progress=progress)            # (n_sequences, d)
    return Datastore(embeddings, data.offsets, data.seq_tokens, fingerprint(embedder, data))


def save(store, path):
    """Write a Datastore to path whole (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    torch.save({"embeddings": store.embeddings, "offsets": torch.from_numpy(store.offsets),
                "seq_tokens": torch.from_numpy(store.seq_tokens.astype(np.int64)),
                "fingerprint": store.fingerprint}, tmp)
    os.replace(tmp, path)


def load(path, embedder, data):
    """The datastore saved at path if it was built by this Emb_seq from this data; None if there
    is none, or it is stale or unreadable (said on stderr). A stale one is never used."""
    if not os.path.exists(path):
        return None
    current = fingerprint(embedder, data)
    try:
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] == current and "embeddings" in saved:
            return Datastore(saved["embeddings"], saved["offsets"].numpy(),
                             saved["seq_tokens"].numpy(), current)
    except Exception:  # cut short, or not a datastore: as good as stale
        pass
    print(f"{path} is stale or unreadable (another Emb_seq or other data): not used",
          file=sys.stderr)
    return None


def load_or_build(path, embedder, data):
    """The datastore saved at path if it is fresh (load); else build it (and say so) and save it
    there."""
    store = load(path, embedder, data)
    if store is None:
        print(f"building the datastore: {data.n_sequences:,} sequences", file=sys.stderr)
        store = build(embedder, data)
        save(store, path)
    return store

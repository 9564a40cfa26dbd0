"""out_dir/datastore.pt: a run's datastore embeddings, with a fingerprint of the Emb_seq weights
and data that built them; used again only while both match."""

import hashlib
import os
import sys

import torch

from datastore import Datastore, embed_all


def fingerprint(embedder, data):
    """A hash of Emb_seq's weights and the data: a datastore built from others is stale."""
    h = hashlib.sha256(data.fingerprint.encode())
    for name, t in sorted(embedder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build(embedder, data, progress=True):
    """The Datastore of a corpus: every sequence embedded by this Emb_seq (embed_all)."""
    embeddings = embed_all(embedder, data, progress=progress)            # (n_sequences, d)
    return Datastore(embeddings, data.sequence, fingerprint(embedder, data))


def load_or_build(path, embedder, data, save=True):
    """The datastore saved at path if this Emb_seq built it from this data; else build it, and
    save it there whole unless save is False (another run's folder, only read)."""
    if os.path.exists(path):
        current = fingerprint(embedder, data)
        try:  # the tokens are data's own: the fingerprint says it is this data
            saved = torch.load(path, weights_only=True)
            if saved["fingerprint"] == current:
                return Datastore(saved["embeddings"], data.sequence, current)
        except Exception:  # cut short, or not a datastore: as good as stale
            pass
        print(f"{path} is stale or unreadable (another Emb_seq or other data): not used",
              file=sys.stderr)
    print(f"building the datastore: {data.n_sequences:,} sequences", file=sys.stderr)
    store = build(embedder, data)
    if save:
        torch.save({"embeddings": store.embeddings, "fingerprint": store.fingerprint},
                   path + ".tmp")
        os.replace(path + ".tmp", path)
    return store

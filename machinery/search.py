"""
How generation searches a run's datastore (sample.py's and evaluate.py's --index): exact search
over every entry (datastore.search, the reference), faiss (approximate, machinery/faiss_index.py),
or two-stage (the learned score re-ranks TF-IDF's top K: datastore.Datastore.rerank).
"""

from machinery.cli import UserError
from machinery.corpora import is_facts
from machinery.faiss_index import FaissIndex, load_faiss
from machinery.lexical import lexical_index

INDEXES = ("auto", "exact", "faiss", "first_stage")


def require_index(kind):
    """Refuse, in one line, an --index that is unknown, or faiss where it is not installed (a
    script checks this before it loads or builds anything)."""
    if kind not in INDEXES:
        raise UserError(f"--index must be one of {', '.join(INDEXES)}, got {kind!r}")
    if kind == "faiss":
        load_faiss()


def use_index(datastore, kind):
    """How datastore.search() finds the best entries: "exact" (datastore.search) or "faiss"
    (FaissIndex, built here, over the whole datastore). Returns the datastore."""
    if kind not in ("exact", "faiss"):
        raise ValueError(f"unknown index {kind!r}")
    datastore.index = FaissIndex(datastore.embeddings) if kind == "faiss" else None
    return datastore


def use_search(datastore, kind, cfg, data, tok, lexical=None):
    """Set how generation searches a run's datastore: exact (every entry), faiss (approximate),
    first_stage (two-stage: the learned score re-ranks TF-IDF's top cfg.first_stage), or auto:
    first_stage on a text corpus, where the learned score alone is far below words against the
    whole datastore, exact on facts, where it is far above. lexical: the corpus's Lexical, if the
    caller has built it already."""
    if kind == "auto":
        kind = "exact" if is_facts(cfg.dataset) else "first_stage"
    if kind == "first_stage":
        return datastore.use_first_stage(lexical or lexical_index(data, tok), cfg.first_stage,
                                         tok)
    return use_index(datastore, kind)

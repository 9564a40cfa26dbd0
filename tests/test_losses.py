import math

import numpy as np
import torch
import torch.nn.functional as F

from losses import co_supervision_loss, nsp_loss, ntp_loss
from model import Gen, GenConfig
from embedder import EmbedderConfig, SeqEmbedder


def test_nsp_loss_matches_hand_computation():
    # two queries, three candidates, in 2-d so the dot products are easy to write down
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    tau = 0.5
    # query 0: scores (1, 0, 0.6)/tau = (2, 0, 1.2), target 0
    # query 1: scores (0, 1, 0.8)/tau = (0, 2, 1.6), target 2
    l0 = -(2 - math.log(math.exp(2) + math.exp(0) + math.exp(1.2)))
    l1 = -(1.6 - math.log(math.exp(0) + math.exp(2) + math.exp(1.6)))
    loss, acc = nsp_loss(q, e, torch.tensor([0, 2]), tau)
    assert math.isclose(loss.item(), (l0 + l1) / 2, rel_tol=1e-6)
    assert acc.item() == 0.5  # query 1 scores candidate 1 above its target


def test_ntp_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])
    targets = torch.tensor([[0, 1]])
    expected = -((2 - math.log(math.exp(2) + 2)) + (1 - math.log(1 + math.e + math.exp(3)))) / 2
    assert math.isclose(ntp_loss(logits, targets).item(), expected, rel_tol=1e-6)


def test_duplicate_targets_are_not_negatives(tiny_data):
    data, _ = tiny_data
    rng = np.random.default_rng(0)
    # look for a batch where two markers point to the same sequence: the candidate rows must be
    # unique, so both markers share the one row of their target and neither is the other's negative
    split = data.train
    seq = split.marker_target[0]
    first = split.doc_starts[np.searchsorted(split.doc_starts, split.marker_pos[0], "right") - 1]
    data.starts["train"] = np.array([first, first])  # both windows start at the same document
    batch = data.get_batch("train", 2, rng, hard_negatives=2)
    rows = batch.marker_index[0]
    assert (rows == 0).sum() > 0
    assert torch.equal(batch.target_row[rows == 0], batch.target_row[rows == 1])
    assert len(torch.unique(batch.candidates, dim=0)) == len(batch.candidates)
    target = batch.target_row[0]
    assert torch.equal(batch.candidates[target][batch.candidate_mask[target]],
                       torch.from_numpy(data.sequence(seq).astype(np.int64)))


def _models():
    torch.manual_seed(0)
    gen = Gen(GenConfig(300, 96, 1, 2, 16, 8))
    emb = SeqEmbedder(EmbedderConfig(300, 16, 1, 2, 16, 8))
    return gen, emb


def _grads(lambda_seq, batch):
    gen, emb = _models()
    loss, _ = co_supervision_loss(gen, emb, batch, 1.0, lambda_seq, 0.1)
    loss.backward()
    return [p.grad for p in emb.parameters()], [p.grad for p in gen.seq_head.parameters()]


def test_gradients_reach_embedder_iff_lambda_seq_positive(tiny_data):
    data, _ = tiny_data
    batch = data.get_batch("train", 4, np.random.default_rng(1), hard_negatives=2,
                           emb_block_size=16)
    assert len(batch.target_row) > 0
    emb_grads, head_grads = _grads(0.5, batch)
    assert all(g is not None and g.abs().sum() > 0 for g in emb_grads + head_grads)
    emb_grads, head_grads = _grads(0.0, batch)
    assert all(g is None for g in emb_grads + head_grads)


def test_length_buckets_change_no_embedding_and_no_nsp_loss(tiny_data):
    data, _ = tiny_data
    gen, _ = _models()
    emb = SeqEmbedder(EmbedderConfig(300, 64, 1, 2, 16, 8))  # reads whole facts, uncut
    batch = data.get_batch("train", 8, np.random.default_rng(0), hard_negatives=2,
                           emb_block_size=64)
    lengths = batch.candidate_mask.sum(1)
    assert len(lengths.unique()) > 3  # rows of many lengths: the buckets cut different widths
    padded = emb(batch.candidates, batch.candidate_mask, buckets=1)     # all at the longest
    for buckets in (2, 3, 5, len(lengths)):
        bucketed = emb(batch.candidates, batch.candidate_mask, buckets=buckets)
        assert torch.allclose(bucketed, padded, atol=1e-6)
    _, queries = gen(batch.x, batch.marker_index)
    l_padded, _ = nsp_loss(queries, padded, batch.target_row, 0.1)
    l_bucketed, _ = nsp_loss(queries, emb(batch.candidates, batch.candidate_mask), batch.target_row,
                             0.1)
    assert torch.allclose(l_bucketed, l_padded, atol=1e-6)


def _stub(queries, embeddings, vocab_size):
    """A Gen and an Emb_seq that return the given queries (M, d) and embeddings (N, d)."""
    def gen(x, marker_index):
        return torch.zeros(*x.shape, vocab_size), queries                    # (B, T, V), (M, d)
    return gen, lambda candidates, mask: embeddings


def test_a_near_neighbour_of_the_target_is_no_negative(tmp_path):
    """On text the sentences within two markers of a marker's target are likely false negatives
    (left out of its hard negatives): they are no candidate of its L_NSP either, even where they
    are in the batch as another marker's target. Each marker's split index is found from its
    window's place in the stream."""
    from conftest import write
    from data import load_data
    from machinery.config import Config
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(150)]
    text = " ".join(" ".join(rng.choice(words, 6)).capitalize() + "." for _ in range(300))
    data, tok = load_data(Config(dataset=write(str(tmp_path / "t.txt"), text), block_size=64,
                                 cache_dir=str(tmp_path / "cache")))
    batch = data.get_batch("train", 6, np.random.default_rng(0), 2, 64)
    split, (rows, cols) = data.train, batch.marker_index
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(split.ids), 64)
    starts = np.array([np.flatnonzero((windows == x.numpy()).all(1))[0] for x in batch.x])
    sel = np.searchsorted(split.marker_pos, starts[rows.numpy()] + cols.numpy())  # (M,)
    assert np.array_equal(split.marker_pos[sel], starts[rows.numpy()] + cols.numpy())
    g = torch.Generator().manual_seed(0)
    M, N, tau = len(sel), len(batch.candidate_ids), 0.1
    queries = F.normalize(torch.randn(M, 8, generator=g), dim=1)
    embeddings = F.normalize(torch.randn(N, 8, generator=g), dim=1)
    ids, want, left_out = batch.candidate_ids.tolist(), [], 0
    for i, k in enumerate(sel):
        own = int(split.marker_target[k])
        near = set(split.marker_target[max(0, k - 2):k + 3].tolist()) - {own}
        keep = [j for j in range(N) if ids[j] not in near]
        left_out += N - len(keep)
        logits = queries[i] @ embeddings[keep].T / tau                      # (|keep|,)
        want.append(-torch.log_softmax(logits, 0)[keep.index(ids.index(own))])
    assert left_out > 0   # the batch holds neighbours
    gen, emb = _stub(queries, embeddings, tok.vocab_size)
    _, stats = co_supervision_loss(gen, emb, batch, 0.0, 1.0, tau)
    assert torch.allclose(stats["nsp"], torch.stack(want).mean(), atol=1e-6)

import math

import numpy as np
import torch

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
    batch = data.get_batch("train", 4, np.random.default_rng(1), hard_negatives=2, emb_block_size=16)
    assert len(batch.target_row) > 0
    emb_grads, head_grads = _grads(0.5, batch)
    assert all(g is not None and g.abs().sum() > 0 for g in emb_grads + head_grads)
    emb_grads, head_grads = _grads(0.0, batch)
    assert all(g is None for g in emb_grads + head_grads)


def test_length_buckets_change_no_embedding_and_no_nsp_loss(tiny_data):
    data, _ = tiny_data
    gen, _ = _models()
    emb = SeqEmbedder(EmbedderConfig(300, 64, 1, 2, 16, 8))  # reads whole facts, uncut
    batch = data.get_batch("train", 8, np.random.default_rng(0), hard_negatives=2, emb_block_size=64)
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

import numpy as np
import torch

from embedder import EmbedderConfig, SeqEmbedder
from model import Gen, GenConfig


def test_a_token_never_changes_logits_before_it():
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, seq_dim=8))
    x = torch.randint(0, 50, (2, 16))
    t = 9
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 50
    a, _ = gen(x)
    b, _ = gen(y)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)  # and it does change what follows


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    emb = SeqEmbedder(EmbedderConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=16,
                                     seq_dim=8)).eval()
    seq = torch.randint(0, 50, (7,))
    embeddings = []
    for width, pad in ((7, 0), (12, 3), (24, 49)):
        tokens = torch.full((1, width), pad)
        tokens[0, :7] = seq
        mask = torch.arange(width)[None] < 7
        embeddings.append(emb(tokens, mask))
    for e in embeddings[1:]:
        assert torch.allclose(embeddings[0], e, atol=1e-6)
    assert torch.allclose(embeddings[0].norm(dim=-1), torch.ones(1))


def test_queries_are_unit_vectors_at_the_markers():
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, seq_dim=8))
    x = torch.randint(0, 50, (2, 16))
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 15])
    _, q = gen(x, (rows, cols))
    assert q.shape == (3, 8)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(q, gen.query(gen.hidden(x))[rows, cols])


def test_emb_seq_can_start_from_gens_trunk():
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, seq_dim=8))
    emb = SeqEmbedder(EmbedderConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16,
                                     seq_dim=8))
    proj = emb.proj.weight.clone()
    emb.start_from(gen)
    g, e = gen.transformer, emb.transformer
    assert torch.equal(e.wte.weight, g.wte.weight) and torch.equal(e.wpe.weight, g.wpe.weight[:12])
    assert torch.equal(e.ln_f.weight, g.ln_f.weight)
    for a, b in zip(e.blocks, g.blocks):  # Emb_seq's 2 blocks are Gen's first 2
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(emb.proj.weight, proj)      # the projection is Emb_seq's own
    # a copy, not a share: training one leaves the other
    with torch.no_grad():
        e.wte.weight.add_(1)
    assert not torch.equal(e.wte.weight, g.wte.weight)


def test_a_batchs_queries_are_seq_head_of_the_state_at_its_markers(tiny_data):
    """get_batch's (rows, cols) point at marker tokens, every marker of x and no other; each
    query is W_seq h / |W_seq h|, h Gen's final state at that marker computed from the window's
    tokens up to it alone (a forward pass of its own)."""
    data, tok = tiny_data
    batch = data.get_batch("train", 4, np.random.default_rng(0))
    rows, cols = batch.marker_index
    assert len(rows) > 0 and (batch.x[rows, cols] == tok.marker).all()
    assert (batch.x == tok.marker).sum() == len(rows)
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=tok.vocab_size, block_size=data.block_size, n_layer=2,
                        n_head=2, n_embd=16, seq_dim=8)).eval()
    _, q = gen(batch.x, batch.marker_index)                               # (M, 8)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        h = gen.transformer(batch.x[r:r + 1, :c + 1])[0, -1]              # (n_embd,)
        w = gen.seq_head.weight @ h                                       # (8,)
        assert torch.allclose(q[i], w / w.norm(), atol=1e-5)


def _attention(model, flash):
    for m in model.modules():
        if hasattr(m, "flash"):
            m.flash = flash
    return model


def test_the_explicit_attention_path_equals_the_fused_one():
    """softmax(Q K^T / sqrt(d)) V written out gives what scaled_dot_product_attention gives, under
    each mask: causal (Gen), padding (Emb_seq, bidirectional and causal), and a KV cache's."""
    from machinery.kv_cache import new_caches
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, seq_dim=8))
    x = torch.randint(0, 50, (2, 16))
    mask = torch.arange(16)[None] < torch.tensor([[9], [16]])

    def outputs(flash):
        _attention(gen.eval(), flash)
        out = [gen(x)[0]]
        caches = new_caches(gen)
        for part in (x[:, :5], x[:, 5:9], x[:, 9:10]):  # no past, past and several, one token
            out.append(gen.hidden(part, caches))
        for causal in (False, True):
            torch.manual_seed(1)
            emb = SeqEmbedder(EmbedderConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2,
                                             n_embd=16, seq_dim=8, causal=causal)).eval()
            out.append(_attention(emb, flash)(x, mask))
        return out

    for fast, explicit in zip(outputs(True), outputs(False)):
        assert torch.allclose(fast, explicit, atol=1e-5)

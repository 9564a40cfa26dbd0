import numpy as np
import pytest
import torch

from datastore import Datastore, search
from machinery import datastore_file
from embedder import EmbedderConfig, SeqEmbedder
from generate import generate
from machinery.kv_cache import new_caches
from machinery import batch_generate as batch_module
from machinery.batch_generate import generate_batch
from model import Gen, GenConfig

MARKER, EOD = 9, 8


def _gen(block_size=32):
    torch.manual_seed(0)
    gen = Gen(GenConfig(vocab_size=10, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                        seq_dim=8)).eval()
    with torch.no_grad():  # make the marker likely, so that retrieval steps happen
        gen.transformer.wte.weight[MARKER] *= 8
    return gen


def _store(n=20, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 8, rng.integers(2, 6)) for _ in range(n)]
    keys = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    keys = torch.nn.functional.normalize(keys, dim=-1)
    return Datastore(keys, seqs.__getitem__, "test")


def test_cached_and_uncached_generation_agree_with_retrievals():
    """Token for token: the two paths round differently, so greedy decoding could part where two
    logits (or two entries' scores) lie within rounding of each other. Along these seeded
    generations the two best logits are never closer than 3e-5, dozens of float32 ulps of them,
    so the paths agree on any CPU and BLAS kernel (CI runs the test under a second kernel too)."""
    gen, store = _gen(), _store()
    for prompt in ([1, 2, 3], [4] * 30):  # the second outgrows block_size: the window moves
        a, ra = generate(gen, prompt, 60, MARKER, datastore=store, use_cache=True)
        b, rb = generate(gen, prompt, 60, MARKER, datastore=store, use_cache=False)
        assert a == b and [r.id for r in ra] == [r.id for r in rb]
        assert len(ra) > 0  # retrieval steps were part of it
        for r in ra:  # each marker is followed by its entry (the last may be cut by the limit)
            inserted = a[r.position:r.position + len(store.sequence(r.id))]
            assert inserted == list(store.sequence(r.id))[:len(inserted)]
            assert a[r.position - 1] == MARKER


@pytest.mark.parametrize("query_block", [None, 8])  # Gen's own queries, or another Gen's
def test_batched_generation_equals_one_prompt_at_a_time(query_block):
    """Token for token, as the previous test, and for the same reason on any machine."""
    gen, store = _gen(), _store(seed=11)
    query_gen = _gen(block_size=query_block) if query_block else None
    # prompts of different lengths (the second outgrows block_size: its window moves), budgets
    # of their own, and a stop token
    prompts = [[1, 2, 3], [4] * 30, [5, 0], [2, 6, 1, 3, 0, 7, 2, 5, 5, 1]]
    budgets = [60, 50, 40, 9]
    batched = generate_batch(gen, prompts, budgets, MARKER, stop=4, datastore=store,
                             query_gen=query_gen)
    inserted, ends = set(), set()
    for prompt, budget, (ids, retrievals) in zip(prompts, budgets, batched):
        ref, ref_retrievals = generate(gen, prompt, budget, MARKER, stop=4, datastore=store,
                                       query_gen=query_gen)
        assert ids == ref
        assert [(r.position, r.id) for r in retrievals] == [(r.position, r.id)
                                                            for r in ref_retrievals]
        assert [r.score for r in retrievals] == pytest.approx([r.score for r in ref_retrievals])
        inserted |= {(r.position, len(store.sequence(r.id))) for r in retrievals}
        ends.add("stop" if ids[-1] == 4 else "budget" if len(ids) == len(prompt) + budget
                 else "other")
    # the rows inserted sequences of different lengths at different steps, and ended each
    # in its own way and time
    assert len({n for _, n in inserted}) > 1 and len({p for p, _ in inserted}) > 4
    assert ends == {"stop", "budget"}


def test_batched_generation_without_a_datastore_equals_one_prompt_at_a_time():
    gen, prompts = _gen(), [[1, 2, 3], [4] * 30, [5, 0]]
    batched = generate_batch(gen, prompts, 40, MARKER, stop=4)
    assert [ids for ids, _ in batched] == [generate(gen, p, 40, MARKER, stop=4)[0]
                                           for p in prompts]
    assert not any(r for _, r in batched)  # a marker Gen writes stays a token
    assert any(MARKER in ids[len(p):] for p, (ids, _) in zip(prompts, batched))


def test_rows_with_and_without_retrieval_share_their_prompt_pass(monkeypatch):
    """One prompt asked with and without retrieval: each row is what generate() writes with and
    without the datastore, and the prompt runs through Gen once."""
    gen, store = _gen(), _store(seed=11)
    prompts = [[1, 2, 3], [1, 2, 3], [4] * 30, [4] * 30, [5, 0]]
    retrieve = [True, False, True, False, True]
    fed, feed = [], batch_module._feed
    monkeypatch.setattr(batch_module, "_feed", lambda gen, caches, fresh, *rest:
                        fed.append(len(fresh)) or feed(gen, caches, fresh, *rest))
    batched = generate_batch(gen, prompts, 40, MARKER, stop=4, datastore=store,
                             retrieve=retrieve)
    assert fed[0] == 3  # the prompt pass: 3 distinct prompts for 5 rows
    for prompt, r, (ids, retrievals) in zip(prompts, retrieve, batched):
        ref, ref_retrievals = generate(gen, prompt, 40, MARKER, stop=4,
                                       datastore=store if r else None)
        assert ids == ref and [x.id for x in retrievals] == [x.id for x in ref_retrievals]
    assert batched[0][1] and not batched[1][1] and batched[0][0] != batched[1][0]


def test_insert_then_cached_decoding_equals_full_recompute():
    gen = _gen()
    prefix, inserted, more = [1, 2, MARKER], [3, 4, 5, 6], [7, 1]
    caches = new_caches(gen)
    with torch.no_grad():
        gen.hidden(torch.tensor([prefix]), caches)
        gen.hidden(torch.tensor([inserted]), caches)          # the retrieved sequence, in one go
        h_cached = gen.hidden(torch.tensor([more]), caches)   # then decoding goes on
        h_full = gen.hidden(torch.tensor([prefix + inserted + more]))[:, -len(more):]
    assert torch.allclose(h_cached, h_full, atol=1e-5)
    assert torch.allclose(gen.lm_head(h_cached), gen.lm_head(h_full), atol=1e-5)


def test_chunked_top_k_equals_a_full_sort():
    torch.manual_seed(0)
    q, keys = torch.randn(7, 16), torch.randn(1000, 16)
    scores, ids = search(q, keys, k=10, chunk=64)
    full = (q @ keys.T).sort(dim=1, descending=True)
    assert torch.equal(ids, full.indices[:, :10])
    assert torch.allclose(scores, full.values[:, :10])


def test_datastore_round_trip_and_staleness(tmp_path, tiny_data):
    data, tok = tiny_data
    torch.manual_seed(0)
    emb = SeqEmbedder(EmbedderConfig(tok.vocab_size, 64, 1, 2, 16, 8)).eval()
    path = str(tmp_path / "datastore.pt")
    built = datastore_file.load_or_build(path, emb, data)
    loaded = datastore_file.load_or_build(path, emb, data)
    assert torch.equal(built.embeddings, loaded.embeddings)
    assert loaded.fingerprint == built.fingerprint
    assert np.array_equal(loaded.sequence(5), data.sequence(5))
    with torch.no_grad():
        emb.proj.weight[0, 0] += 1e-3  # any change to Emb_seq makes the saved datastore stale
    assert datastore_file.fingerprint(emb, data) != built.fingerprint
    rebuilt = datastore_file.load_or_build(path, emb, data)
    assert rebuilt.fingerprint != built.fingerprint
    assert not torch.equal(rebuilt.embeddings, built.embeddings)


def test_an_empty_prompt_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="at least one token"):
        generate(_gen(), [], 5, MARKER, datastore=_store())
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(_gen(), [[1], []], 5, MARKER, datastore=_store())


def test_a_query_gen_with_a_shorter_block_queries_from_its_last_block_of_tokens():
    gen, query_gen, store = _gen(block_size=32), _gen(block_size=8), _store()
    ids, retrievals = generate(gen, [1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 40, MARKER, datastore=store,
                               query_gen=query_gen)
    assert retrievals
    for r in retrievals:
        with torch.no_grad():
            h = query_gen.hidden(torch.tensor([ids[:r.position][-8:]]))[0, -1]
        assert r.id == int(store.search(query_gen.query(h)[None])[1][0, 0])

"""Many prompts decoded at once, greedily (evaluate.py's answers): generate.generate() of each."""

import torch

from generate import check_prompt, marker_step_queries, retrieval_step, window_start
from machinery.kv_cache import new_caches


def _feed(gen, caches, fresh, restart, device):
    """Each row's fresh tokens through Gen, right-padded (restarting rows empty their caches
    first): the final state at each row's last token (B, n_embd)."""
    counts = torch.tensor([[len(f)] for f in fresh], device=device)                 # (B, 1)
    T = int(counts.max())
    x = torch.tensor([f + [0] * (T - len(f)) for f in fresh], dtype=torch.long,
                     device=device)                                                 # (B, T)
    restart = torch.tensor(restart, device=device)[:, None]                         # (B, 1)
    for cache in caches:  # the rows that restart drop what they hold
        cache.past, cache.fresh = torch.where(restart, 0, cache.past), counts
    h = gen.hidden(x, caches)                                                       # (B, T, n_embd)
    return h[torch.arange(len(fresh), device=device), (counts[:, 0] - 1).clamp(min=0)]


@torch.inference_mode()
def generate_batch(gen, prompts, max_new_tokens, marker, stop=None, datastore=None,
                   query_gen=None, retrieve=None):
    """generate() of each prompt, greedy, all at once (a budget for all or each; retrieve: a bool
    per prompt). Rows with and without retrieval decode apart: a step is as wide as its widest."""
    for p in prompts:
        check_prompt(p)
    device, block, B = next(gen.parameters()).device, gen.config.block_size, len(prompts)
    budget = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    retrieve = [datastore is not None and (retrieve is None or retrieve[b]) for b in range(B)]
    ids = [list(p) for p in prompts]
    start = [max(0, len(p) - block) for p in prompts]   # row b's Gen sees ids[b][start[b]:]
    fed = [len(p) for p in prompts]                     # its caches hold ids[b][start[b]:fed[b]]
    n_new, retrievals, done = [0] * B, [[] for _ in range(B)], [n <= 0 for n in budget]
    asking = [False] * B                # the row's last token is a marker that Gen wrote

    def decode(live, caches, h):  # steps the rows `live` (h: their last final states) to the end
        while True:
            at_marker = [i for i, b in enumerate(live) if asking[b]]  # they retrieve, not write
            if at_marker:
                rows = [live[i] for i in at_marker]
                windows = [ids[b][start[b]:] for b in rows]
                queries = marker_step_queries(gen, query_gen, h[at_marker], windows, device)
                found = retrieval_step(datastore, queries, [len(ids[b]) for b in rows],
                                       [budget[b] - n_new[b] for b in rows], windows)
                for b, (retrieval, inserted) in zip(rows, found):
                    retrievals[b].append(retrieval)
                    ids[b].extend(inserted)
                    n_new[b] += len(inserted)
                    asking[b], done[b] = False, not inserted or n_new[b] >= budget[b]
            tokens = gen.lm_head(h).float().argmax(dim=-1).tolist()                # (L,)
            for i, b in enumerate(live):
                if i not in at_marker and not done[b]:
                    ids[b].append(tokens[i])
                    n_new[b] += 1
                    asking[b] = tokens[i] == marker and retrieve[b]
                    done[b] = tokens[i] == stop or (not asking[b] and n_new[b] >= budget[b])
            kept = [i for i, b in enumerate(live) if not done[b]]
            if not kept:
                return
            if len(kept) <= 3 * len(live) // 4:  # the finished leave once a quarter has finished
                index = torch.tensor(kept, device=device)
                caches, live = [cache.take(index) for cache in caches], [live[i] for i in kept]
            fresh, restart = [], []
            for b in live:
                s = window_start(len(ids[b]), start[b], block)
                restart.append(s != start[b] and not done[b])
                if restart[-1]:
                    start[b] = fed[b] = s
                fresh.append([] if done[b] else ids[b][fed[b]:])  # finished: nothing to feed
                fed[b] = len(ids[b])
            h = _feed(gen, caches, fresh, restart, device)                          # (L, n_embd)

    distinct = {}   # prompt -> its row in the prompt pass
    first = [distinct.setdefault(tuple(ids[b][start[b]:]), len(distinct)) for b in range(B)]
    caches = new_caches(gen)
    h = _feed(gen, caches, [list(p) for p in distinct], [False] * len(distinct), device)
    for group in (True, False):
        rows = [b for b in range(B) if retrieve[b] == group and not done[b]]
        if rows:
            index = torch.tensor([first[b] for b in rows], device=device)
            decode(rows, [cache.take(index) for cache in caches], h[index])
    return list(zip(ids, retrievals))


def decode_prompts(gen, prompts, budgets, marker, stop, datastore, query_gen, retrieve,
                   batch_size, known=()):
    """generate_batch() of every prompt not in known, batch_size at a time, shortest first."""
    outs = dict(known)
    todo = sorted((i for i in range(len(prompts)) if i not in outs),
                  key=lambda i: (len(prompts[i]), prompts[i]))
    for s in range(0, len(todo), batch_size):
        batch = todo[s:s + batch_size]
        outs.update(zip(batch, generate_batch(
            gen, [prompts[i] for i in batch], [budgets[i] for i in batch], marker, stop,
            datastore, query_gen, [retrieve[i] for i in batch])))
    return [outs[i] for i in range(len(prompts))]


def already_decoded(retrieved, given, eod, block_size):
    """{i: (ids, [])} of the questions whose retrieval in the loop wrote `given` (the gold
    sequence after the question), then the rest in one window: greedy, Gen given it writes that."""
    return {i: (ids, []) for i, ((ids, retrievals), g) in enumerate(zip(retrieved, given))
            if ids[:len(g)] == g and len(retrievals) == 1 and ids[-1] == eod
            and len(ids) <= block_size}

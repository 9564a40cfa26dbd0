"""
Semiparametric generation: Gen writes tokens, and when it writes the marker, its query at the
marker searches the datastore and the best sequence is appended verbatim (the paper's [Ret] step):

    x_{t+1} ~ p(. | x_<=t)                                   a token step (lm_head)
    if x_{t+1} is the marker:
        j* = argmax_j  q_{t+1} . e_j                          the retrieval step (seq_head, datastore)
        x_{t+2} .. x_{t+1+|s_j*|} = the tokens of sequence j*   appended, not written token by token

A KV cache keeps every token's keys and values, so each token, and each inserted sequence, runs
through Gen once; the prefix is never re-encoded after a retrieval (the paper's code re-encodes it).
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Retrieval:
    position: int           # index in the output ids where the inserted sequence starts
    id: int                 # datastore entry
    score: float            # q . e of that entry
    alternatives: list = field(default_factory=list)   # (id, score) of the next best entries


class KVCache:
    """The keys and values of one attention layer for the tokens seen so far, so that generation
    runs each new token through the model once instead of re-reading the whole context. The
    buffers are allocated once, for block_size tokens, and filled in place: one token's step then
    costs no allocation and no copy of the past."""

    def __init__(self, block_size):
        self.block_size, self.n = block_size, 0
        self.k = self.v = None

    def extend(self, k, v):
        """Append the new tokens' k and v (B, H, T, D); all keys and values so far
        (B, H, n, D) each."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.block_size, D)
            self.v = v.new_empty(B, H, self.block_size, D)
        self.k[:, :, self.n:self.n + T], self.v[:, :, self.n:self.n + T] = k, v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def __len__(self):
        return self.n


def new_caches(gen):
    """One empty KVCache per layer of Gen."""
    return [KVCache(gen.config.block_size) for _ in range(gen.config.n_layer)]


def _next_token(logits, temperature, top_k, generator):
    if temperature == 0:  # greedy
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.inference_mode()
def generate(gen, prompt, max_new_tokens, marker, stop=None, datastore=None, temperature=0.0,
             top_k=None, alternatives=0, use_cache=True, generator=None, query_gen=None):
    """Continue the token ids `prompt` by up to max_new_tokens tokens (inserted sequences count
    too), stopping after `stop`. With a datastore, a marker triggers retrieval. Returns the ids
    (prompt included) and the list of Retrievals. use_cache=False re-reads the whole context at
    every step, as nanoGPT does: slower, and the reference that the cache must agree with.
    query_gen: another Gen that makes the queries (the paper's separate-supervision baseline).
    The prompt must hold at least one token: Gen's first prediction reads the last one."""
    if not len(prompt):
        raise ValueError("generate() needs a prompt of at least one token (to start a document "
                         "from nothing, the end-of-document token)")
    device = next(gen.parameters()).device
    block = gen.config.block_size
    ids = list(prompt)
    start = max(0, len(ids) - block)      # Gen sees ids[start:]
    caches, fed = None, start             # what the caches hold: ids[start:fed]
    retrievals = []

    def advance():
        """Run the not yet seen ids through Gen; the final hidden state of the last one."""
        nonlocal start, caches, fed
        if len(ids) - start > block:
            # Positions are learned and absolute, so cached keys cannot slide along with a moving
            # window. When the context outgrows block_size we keep its last half and re-encode
            # it from position 0 (both paths do the same, so they agree exactly).
            start, caches, fed = len(ids) - block // 2, None, len(ids) - block // 2
        if not use_cache:
            caches, fed = None, start
        if caches is None:
            caches, fed = new_caches(gen), start
        x = torch.tensor([ids[fed:]], dtype=torch.long, device=device)
        fed = len(ids)
        return gen.hidden(x, caches)[0, -1]

    h = advance()
    n_new = 0
    while n_new < max_new_tokens:
        token = _next_token(gen.lm_head(h).float(), temperature, top_k, generator)
        ids.append(token)
        n_new += 1
        if token == stop:
            break
        h = advance()
        if token == marker and datastore is not None:
            if query_gen is not None:  # it reads the same window, cut to its own block, in one pass
                window = ids[max(start, len(ids) - query_gen.config.block_size):]
                h_query = query_gen.hidden(torch.tensor([window], dtype=torch.long,
                                                        device=device))[0, -1]
                query = query_gen.query(h_query)
            else:
                query = gen.query(h)
            scores, top = datastore.search(query.float().cpu()[None], k=1 + alternatives)
            best = int(top[0, 0])
            retrievals.append(Retrieval(len(ids), best, float(scores[0, 0]),
                                        list(zip(top[0, 1:].tolist(), scores[0, 1:].tolist()))))
            inserted = [int(t) for t in datastore.sequence(best)][:max_new_tokens - n_new]
            if not inserted:
                break
            ids.extend(inserted)
            n_new += len(inserted)
            h = advance()
    return ids, retrievals

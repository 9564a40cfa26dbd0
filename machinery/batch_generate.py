"""
Evaluation's answers (evaluate.py): many prompts decoded at once by generate.generate_batch, in
batches of similar prompts (decode_prompts), none decoded twice (already_decoded).
"""

from generate import generate_batch


def decode_prompts(gen, prompts, budgets, marker, stop, datastore, query_gen, retrieve,
                   batch_size, known=()):
    """generate_batch() of every prompt (with its budget, and retrieval where retrieve[i] says
    so), batch_size at a time, but those whose outcome `known` holds, {i: (ids, retrievals)}.
    Prompts are sorted by length, so a batch pads little and one question's prompts sit side by
    side (they share a pass through Gen). Returns (ids, Retrievals) per prompt, in order."""
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
    """Greedy decoding is a function of the context. Where retrieval in the loop (retrieved:
    (ids, Retrievals) per question) put the gold sequence right after the question (the context
    `given` here), then wrote to the end of the document with no other marker, inside one window,
    Gen given the gold sequence writes the same tokens: {i: (ids, [])} of those questions, which
    need not be decoded twice."""
    return {i: (ids, []) for i, ((ids, retrievals), g) in enumerate(zip(retrieved, given))
            if ids[:len(g)] == g and len(retrievals) == 1 and ids[-1] == eod
            and len(ids) <= block_size}

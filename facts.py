"""
The `facts` corpus: a generated world of fictional people, for the paper's setting in miniature.

Every person has one value for each of six attributes (home town, job, pet, ...). Each fact is one
sentence ("Mira Voskel lives in Tarsen.") and one datastore sequence. A document is a question that
needs exactly one fact:

    Q: Where does Mira Voskel live?\n <marker> Mira Voskel lives in Tarsen.\nA: Tarsen.\n

People are split into train and held-out. No question about a held-out person appears in training
text, yet their facts are in the datastore: a held-out answer is not in Gen's weights, only in the
nonparametric sequence space, so Gen can answer only by retrieving (what the paper's method is for).

Names are built from a small stock of syllables and shared first names and surnames, so many names
look alike ("Mira Voskel", "Mira Voskal", "Mora Voskel"): the hard cases for retrieval, and the
source of the hard negatives.
"""

import random

from data import Segment

WORLD_SEED = 1234  # the world is fixed; training seeds vary the model, never the data

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "kl", "st", "tr", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "k", "m"]

# attribute: (question template, fact template, values). Values start with a consonant so that
# "a {value}" reads right.
ATTRIBUTES = {
    "town": ("Where does {name} live?", "{name} lives in {value}.", None),  # generated names
    "job": ("What does {name} do for a living?", "{name} works as a {value}.",
            ["baker", "carpenter", "doctor", "farmer", "gardener", "judge", "lawyer", "miner",
             "nurse", "painter", "pilot", "potter", "sailor", "tailor", "teacher", "weaver"]),
    "pet": ("What pet does {name} keep?", "{name} keeps a {value}.",
            ["cat", "dog", "ferret", "goat", "hamster", "lizard", "parrot", "rabbit", "snake",
             "tortoise", "canary", "mouse"]),
    "colour": ("What is {name}'s favourite colour?", "{name}'s favourite colour is {value}.",
               ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
                "pink", "brown", "teal"]),
    "instrument": ("Which instrument does {name} play?", "{name} plays the {value}.",
                   ["piano", "violin", "cello", "flute", "drum", "harp", "trumpet", "guitar",
                    "banjo", "lute", "tuba", "bassoon"]),
    "month": ("When was {name} born?", "{name} was born in {value}.",
              ["January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December"]),
}
N_TOWNS = 16


def _word(rng, syllables):
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables)).capitalize()


def _pool(rng, size, syllables):
    """`size` distinct made-up words; a small syllable stock makes many of them look alike."""
    words = []
    while len(words) < size:
        w = _word(rng, rng.choice(syllables))
        if w not in words:
            words.append(w)
    return words


def _bigrams(s):
    return {s[i:i + 2] for i in range(len(s) - 1)}


def _similar_people(names, k):
    """For each name, the k other names that look most like it (shared parts, shared bigrams)."""
    parts = [n.split() for n in names]
    grams = [_bigrams(n.lower()) for n in names]
    similar = []
    for i in range(len(names)):
        scores = []
        for j in range(len(names)):
            if j == i:
                continue
            shared = (parts[i][0] == parts[j][0]) + (parts[i][1] == parts[j][1])
            jaccard = len(grams[i] & grams[j]) / len(grams[i] | grams[j])
            scores.append((shared + jaccard, j))
        similar.append([j for _, j in sorted(scores, reverse=True)[:k]])
    return similar


def build_facts(people, heldout):
    """Returns (train_docs, val_docs, hard_negatives): questions about train / held-out people, and
    for each fact the facts most easily confused with it (same attribute of a similar-looking
    person, then the same person's other attributes)."""
    rng = random.Random(WORLD_SEED)
    firsts = _pool(rng, max(20, people // 6), (1, 2))
    lasts = _pool(rng, max(40, people // 2), (2, 3))
    towns = _pool(rng, N_TOWNS, (2,))
    names = []
    while len(names) < people:  # unique full names; first names and surnames are shared
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in names:
            names.append(name)
    values = {a: (towns if v is None else v) for a, (_, _, v) in ATTRIBUTES.items()}
    facts = [{a: rng.choice(values[a]) for a in ATTRIBUTES} for _ in names]

    def fact(i, a):
        return ATTRIBUTES[a][1].format(name=names[i], value=facts[i][a])

    def document(i, a):
        question = ATTRIBUTES[a][0].format(name=names[i])
        return [Segment(f"Q: {question}\n"), Segment(fact(i, a), sequence=True),
                Segment(f"\nA: {facts[i][a]}.\n")]

    n_heldout = max(1, round(people * heldout))
    order = list(range(people))
    rng.shuffle(order)
    val_people, train_people = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    train_docs = [document(i, a) for i in train_people for a in ATTRIBUTES]
    val_docs = [document(i, a) for i in val_people for a in ATTRIBUTES]

    similar = _similar_people(names, k=4)
    hard_negatives = {}
    for i in range(people):
        for a in ATTRIBUTES:
            hard_negatives[fact(i, a)] = ([fact(j, a) for j in similar[i]]
                                          + [fact(i, b) for b in ATTRIBUTES if b != a])
    return train_docs, val_docs, hard_negatives


def answer_values():
    """How many values each attribute takes: an answer's chance level is one over this."""
    return {a: (N_TOWNS if v is None else len(v)) for a, (_, _, v) in ATTRIBUTES.items()}

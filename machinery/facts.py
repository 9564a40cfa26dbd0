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

import numpy as np

from machinery.corpora import Segment

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

# More wordings of each question (--facts_wordings 2 or 3): each document then asks its question
# in one of the first k wordings, ATTRIBUTES' own first, drawn at random. Training then shows that
# different words ask the same thing, which a model needs before it can generalise to new words.
MORE_WORDINGS = {
    "town": ["Which town is home to {name}?", "Where is {name}'s home?"],
    "job": ["What is {name}'s job?", "What work does {name} do?"],
    "pet": ["Which pet does {name} keep?", "What kind of pet does {name} own?"],
    "colour": ["What colour does {name} prefer?", "Which colour is {name}'s favourite?"],
    "instrument": ["What instrument does {name} play?", "On which instrument does {name} perform?"],
    "month": ["In which month was {name} born?", "What month was {name} born in?"],
}
MAX_WORDINGS = 3

# The generalisation test: each question worded in a way no training document uses, asked about
# held-out people (evaluate.py). Gen has to recognise the question it knows in new words, write the
# marker, and its query must still find the fact.
REWORDED = {
    "town": "In which town does {name} reside?",
    "job": "What is the occupation of {name}?",
    "pet": "Which animal does {name} have as a pet?",
    "colour": "Which colour does {name} like best?",
    "instrument": "What musical instrument can {name} play?",
    "month": "In what month is {name}'s birthday?",
}


def _word(rng, syllables):
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables)).capitalize()


def _distinct_words(rng, size, syllables):
    """`size` distinct made-up words; a small syllable stock makes many of them look alike."""
    words = []
    while len(words) < size:
        w = _word(rng, rng.choice(syllables))
        if w not in words:
            words.append(w)
    return words


def _similar_people(names):
    """For each name, all other names ordered from most to least alike: shared first name or
    surname first, then shared letter pairs (Jaccard similarity of the bigram sets)."""
    grams = [{n.lower()[i:i + 2] for i in range(len(n) - 1)} for n in names]
    vocab = {g: k for k, g in enumerate(sorted(set().union(*grams)))}
    onehot = np.zeros((len(names), len(vocab)))
    for i, g in enumerate(grams):
        onehot[i, [vocab[x] for x in g]] = 1
    shared = onehot @ onehot.T
    sizes = onehot.sum(1)
    jaccard = shared / (sizes[:, None] + sizes[None, :] - shared)
    firsts, lasts = (np.array([n.split()[k] for n in names]) for k in (0, 1))
    score = (firsts[:, None] == firsts[None, :]) + (lasts[:, None] == lasts[None, :]) + jaccard
    np.fill_diagonal(score, -np.inf)
    return [list(row[:-1]) for row in np.argsort(-score, axis=1, kind="stable")]


def wordings(attribute, k=MAX_WORDINGS):
    """The first k wordings of an attribute's question."""
    return [ATTRIBUTES[attribute][0], *MORE_WORDINGS[attribute]][:k]


def build_facts(people, heldout, n_wordings=1, world_seed=1234):
    """Returns (train_docs, val_docs, confusable): questions about train / held-out people, each
    in one of the first n_wordings wordings, and for each fact the facts most easily confused with
    it: the same attribute of the people whose names look most like this one's. The world seed
    fixes the world (corpora.FACTS_WORLDS); training seeds vary the model, never the data."""
    rng = random.Random(world_seed)
    # a stream of its own: the world (names, facts, the split) is the same for any n_wordings
    wording_rng = random.Random(world_seed + 1)
    # few first names and surnames, each shared by many people: a held-out person is a new
    # combination of parts seen in training, and every name has look-alikes that share a part
    firsts = _distinct_words(rng, max(8, round(1.2 * people ** 0.5)), (1, 2))
    lasts = _distinct_words(rng, max(8, round(1.6 * people ** 0.5)), (2, 3))
    towns = _distinct_words(rng, N_TOWNS, (2,))
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
        question = wording_rng.choice(wordings(a, n_wordings)).format(name=names[i])
        return [Segment(f"Q: {question}\n"), Segment(fact(i, a), sequence=True),
                Segment(f"\nA: {facts[i][a]}.\n")]

    n_heldout = max(1, round(people * heldout))
    order = list(range(people))
    rng.shuffle(order)
    val_people, train_people = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    train_docs = [document(i, a) for i in train_people for a in ATTRIBUTES]
    val_docs = [document(i, a) for i in val_people for a in ATTRIBUTES]

    # Hard negatives: the same attribute of the look-alike people, then of the look-alikes who
    # share this person's value. The second kind matter: Gen knows a train person's values by
    # heart, and a query that leans on the value (not the name) fails for held-out people.
    similar = _similar_people(names)
    confusable = {}
    for i in range(people):
        for a in ATTRIBUTES:
            same_value = [j for j in similar[i] if facts[j][a] == facts[i][a]][:3]
            confusable[fact(i, a)] = [fact(j, a) for j in similar[i][:3] + same_value]
    return train_docs, val_docs, confusable


def reword(question):
    """The same question in REWORDED's words: "Q: Where does X live?\\n" -> "Q: In which town
    does X reside?\\n". None for text that is not one of the training wordings' questions."""
    for attribute in ATTRIBUTES:
        for template in wordings(attribute):
            before, after = template.split("{name}")
            if question.startswith("Q: " + before) and question.endswith(after + "\n"):
                name = question[len("Q: " + before):len(question) - len(after + "\n")]
                return "Q: " + REWORDED[attribute].format(name=name) + "\n"
    return None

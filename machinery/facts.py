"""
The `facts` corpus: a generated world of fictional people, the paper's setting in miniature. Each
person has one value for each of six attributes; each fact is one sentence and one datastore
sequence. A document is a question that needs exactly one fact:

    Q: Where does Mira Voskel live?\n <marker> Mira Voskel lives in Tarsen.\nA: Tarsen.\n

Questions about held-out people are never in training text, though their facts are in the
datastore: Gen can answer them only by retrieving. Names share first names, surnames and
syllables, so many look alike ("Mira Voskel", "Mira Voskal"): the hard cases for retrieval.
"""

import random

import numpy as np

from machinery.corpora import Segment

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "kl", "st", "tr", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "k", "m"]

# attribute: (the fact, its question in three wordings, values: None for generated town names)
ATTRIBUTES = {
    "town": ("{name} lives in {value}.", ["Where does {name} live?",
             "Which town is home to {name}?", "Where is {name}'s home?"], None),
    "job": ("{name} works as a {value}.", ["What does {name} do for a living?",
            "What is {name}'s job?", "What work does {name} do?"],
            "baker carpenter doctor farmer gardener judge lawyer miner nurse painter pilot potter "
            "sailor tailor teacher weaver".split()),
    "pet": ("{name} keeps a {value}.", ["What pet does {name} keep?", "Which pet does {name} keep?",
            "What kind of pet does {name} own?"],
            "cat dog ferret goat hamster lizard parrot rabbit snake tortoise canary mouse".split()),
    "colour": ("{name}'s favourite colour is {value}.", ["What is {name}'s favourite colour?",
               "What colour does {name} prefer?", "Which colour is {name}'s favourite?"],
               "red blue green yellow purple orange black white grey pink brown teal".split()),
    "instrument": ("{name} plays the {value}.", ["Which instrument does {name} play?",
                   "What instrument does {name} play?", "On which instrument does {name} perform?"],
                   "piano violin cello flute drum harp trumpet guitar banjo lute tuba "
                   "bassoon".split()),
    "month": ("{name} was born in {value}.", ["When was {name} born?",
              "In which month was {name} born?", "What month was {name} born in?"],
              "January February March April May June July August September October November "
              "December".split()),
}
MAX_WORDINGS = 3

# Each question in words no training document uses, asked about held-out people (evaluate.py):
# Gen has to recognise the question in new words, write the marker, and its query must still work.
REWORDED = {
    "town": "In which town does {name} reside?",
    "job": "What is the occupation of {name}?",
    "pet": "Which animal does {name} have as a pet?",
    "colour": "Which colour does {name} like best?",
    "instrument": "What musical instrument can {name} play?",
    "month": "In what month is {name}'s birthday?",
}


def wordings(attribute, k=MAX_WORDINGS):
    """The first k wordings of an attribute's question."""
    return ATTRIBUTES[attribute][1][:k]


def _distinct_words(rng, size, syllables):
    """`size` distinct made-up words; a small syllable stock makes many of them look alike."""
    words = []
    while len(words) < size:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.choice(syllables))).capitalize()
        if word not in words:
            words.append(word)
    return words


def _similar_people(names):
    """For each name, all other names from most to least alike: shared first name or surname
    first, then the Jaccard similarity of their sets of letter pairs."""
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


def build_facts(people, heldout, n_wordings=1, world_seed=1234):
    """Returns (train_docs, val_docs, confusable): questions about train / held-out people, each
    in one of the first n_wordings wordings, and for each fact the facts most easily confused with
    it. The world seed fixes the world; training seeds vary the model, never the data."""
    rng = random.Random(world_seed)
    wording_rng = random.Random(world_seed + 1)  # the world is the same for any n_wordings
    # few first names and surnames, each shared by many people: a held-out person is a new
    # combination of parts seen in training, and every name has look-alikes that share a part
    firsts = _distinct_words(rng, max(8, round(1.2 * people ** 0.5)), (1, 2))
    lasts = _distinct_words(rng, max(8, round(1.6 * people ** 0.5)), (2, 3))
    towns = _distinct_words(rng, 16, (2,))
    names = []
    while len(names) < people:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in names:
            names.append(name)
    facts = [{a: rng.choice(towns if v is None else v) for a, (_, _, v) in ATTRIBUTES.items()}
             for _ in names]

    def fact(i, a):
        return ATTRIBUTES[a][0].format(name=names[i], value=facts[i][a])

    def document(i, a):
        question = wording_rng.choice(wordings(a, n_wordings)).format(name=names[i])
        return [Segment(f"Q: {question}\n"), Segment(fact(i, a), sequence=True),
                Segment(f"\nA: {facts[i][a]}.\n")]

    order = list(range(people))
    rng.shuffle(order)
    n_heldout = max(1, round(people * heldout))
    val_people, train_people = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    train_docs = [document(i, a) for i in train_people for a in ATTRIBUTES]
    val_docs = [document(i, a) for i in val_people for a in ATTRIBUTES]
    # Hard negatives: the same attribute of the look-alikes, then of the look-alikes who share
    # this person's value (Gen knows a train person's values: a query must lean on the name)
    similar = _similar_people(names)
    confusable = {}
    for i in range(people):
        for a in ATTRIBUTES:
            same_value = [j for j in similar[i] if facts[j][a] == facts[i][a]][:3]
            confusable[fact(i, a)] = [fact(j, a) for j in similar[i][:3] + same_value]
    return train_docs, val_docs, confusable


def reword(question):
    """The same question in REWORDED's words ("Q: Where does X live?\\n" -> "Q: In which town
    does X reside?\\n"); None for text that is not one of the training wordings' questions."""
    for attribute in ATTRIBUTES:
        for template in wordings(attribute):
            before, after = template.split("{name}")
            if question.startswith("Q: " + before) and question.endswith(after + "\n"):
                name = question[len("Q: " + before):len(question) - len(after + "\n")]
                return "Q: " + REWORDED[attribute].format(name=name) + "\n"
    return None

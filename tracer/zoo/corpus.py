"""A seeded synthetic corpus whose tasks have known circuits, with held-out eval prompts.

Tasks (the keys of `CorpusConfig.mix` and of `Corpus.eval`):
- `single_hop`: city -> state and state -> capital facts, for every entity, in three templates each.
- `two_hop`: "the capital of the state containing dallas is austin"; trained for part of the
  cities only, the rest are held out (eval only) while both of their single hops are trained.
- `ioi`: indirect-object identification; some name pairs never meet in training.
- `successor`: windows of counting words, ordinals, weekdays and months.
- `antonym`: template A trained for every pair, template B only for the pairs not held out.

Sentences are lowercase words separated by single spaces, punctuation a word of its own, so a
whitespace word-level tokenizer gives one token per word. An eval prompt is a sentence without its
last word, which is the answer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

from tracer.zoo.config import TASKS, CorpusConfig


# state -> (capital, other cities). Real names, one word each; every city is in one state only.
STATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "texas": ("austin", ("dallas", "houston", "lubbock")),
    "illinois": ("springfield", ("chicago", "peoria", "rockford")),
    "florida": ("tallahassee", ("miami", "orlando", "tampa")),
    "california": ("sacramento", ("oakland", "fresno", "pasadena")),
    "georgia": ("atlanta", ("savannah", "macon", "athens")),
    "ohio": ("columbus", ("cleveland", "cincinnati", "dayton")),
    "washington": ("olympia", ("seattle", "spokane", "tacoma")),
    "oregon": ("salem", ("portland", "eugene", "medford")),
    "colorado": ("denver", ("boulder", "aspen", "pueblo")),
    "michigan": ("lansing", ("detroit", "saginaw", "kalamazoo")),
}
STATE_OF = {city: state for state, (cap, cities) in STATES.items() for city in (cap, *cities)}
CITY_TEMPLATES = (
    "{city} is in the state of {state}",
    "{city} is a city in {state}",
    "the city of {city} is located in {state}",
)
CAPITAL_TEMPLATES = (
    "the capital of {state} is {capital}",
    "{capital} is the capital of {state}",
    "the state of {state} has its capital in {capital}",
)
TWO_HOP_TEMPLATE = "the capital of the state containing {city} is {capital}"

NAMES = (
    "mary", "john", "alice", "bob", "sarah", "james", "emma", "david", "linda", "michael",
    "kate", "paul", "anna", "tom", "lucy", "peter", "rachel", "daniel", "laura", "henry",
)  # fmt: skip
PLACES = (
    "store", "park", "school", "market", "library", "beach",
    "garden", "station", "office", "museum", "cafe", "river",
)  # fmt: skip
OBJECTS = ("book", "ball", "gift", "letter", "key", "drink", "ring", "pen", "flower", "map", "cake")
# {x} {y}: the two names in order of mention; {s}: the repeated subject; {io}: the answer.
IOI_TEMPLATES = (
    "when {x} and {y} went to the {place} , {s} gave a {obj} to {io}",
    "after {x} and {y} arrived at the {place} , {s} handed a {obj} to {io}",
    "{x} and {y} were at the {place} . {s} passed a {obj} to {io}",
)

# name -> (words, cyclic); cyclic sequences wrap around (sunday -> monday).
SEQUENCES: dict[str, tuple[tuple[str, ...], bool]] = {
    "numbers": (
        tuple(
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
            " fifteen sixteen seventeen eighteen nineteen twenty".split()
        ),
        False,
    ),
    "ordinals": (
        tuple("first second third fourth fifth sixth seventh eighth ninth tenth".split()),
        False,
    ),
    "days": (tuple("monday tuesday wednesday thursday friday saturday sunday".split()), True),
    "months": (
        tuple(
            "january february march april may june july august september october november"
            " december".split()
        ),
        True,
    ),
}
SUCCESSOR_TRAIN_LENGTHS = (3, 8)  # words per training window, inclusive
SUCCESSOR_EVAL_PROMPT_LENGTHS = (2, 3)

# Every word is in one pair only, so both directions have a single answer.
ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("hard", "soft"),
    ("wet", "dry"), ("full", "empty"), ("high", "low"), ("long", "short"), ("loud", "quiet"),
    ("thick", "thin"), ("clean", "dirty"), ("sweet", "sour"), ("left", "right"), ("true", "false"),
    ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("above", "below"), ("young", "old"),
    ("up", "down"), ("near", "far"), ("inside", "outside"),
)  # fmt: skip
ANTONYM_TEMPLATE_A = "the opposite of {x} is {y}"
ANTONYM_TEMPLATE_B = "{x} is the opposite of {y}"


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt whose next word should be `answer`; `held_out` if never seen in training."""

    prompt: str
    answer: str
    task: str
    held_out: bool


@dataclass(frozen=True)
class Corpus:
    """Shuffled training sentences (with their task) and eval prompts per task."""

    config: CorpusConfig
    train: list[str]
    train_tasks: list[str]  # parallel to `train`
    eval: dict[str, list[EvalPrompt]]


@dataclass(frozen=True)
class _Split:
    """What is held out of training."""

    cities: frozenset[str]  # two-hop compositions
    name_pairs: frozenset[tuple[str, str]]  # sorted pairs
    antonyms: frozenset[tuple[str, str]]  # pairs of ANTONYMS without template B


def build_corpus(config: CorpusConfig) -> Corpus:
    """Generate the corpus; the same config always gives the same corpus."""
    split = _choose_held_out(config)
    rng = random.Random(f"{config.seed}-train")
    labelled: list[tuple[str, str]] = []
    for task, n in _task_counts(config).items():
        labelled += [(sentence, task) for sentence in _train_sentences(task, n, split, rng)]
    rng.shuffle(labelled)
    eval_rng = random.Random(f"{config.seed}-eval")
    return Corpus(
        config=config,
        train=[sentence for sentence, _ in labelled],
        train_tasks=[task for _, task in labelled],
        eval={task: _eval_prompts(task, split, config, eval_rng) for task in TASKS},
    )


def vocabulary(corpus: Corpus) -> list[str]:
    """The sorted words of the training sentences."""
    return sorted({word for sentence in corpus.train for word in sentence.split(" ")})


def _choose_held_out(config: CorpusConfig) -> _Split:
    rng = random.Random(f"{config.seed}-split")
    # Round robin over states, never a state's last city: each state keeps a trained composition.
    per_state = [rng.sample(cities, len(cities)) for _, cities in STATES.values()]
    rng.shuffle(per_state)
    order = [c[i] for i in range(max(map(len, per_state))) for c in per_state if i < len(c) - 1]
    n_cities = round(config.two_hop_held_out * sum(map(len, per_state)))
    if n_cities > len(order):
        raise ValueError(
            f"two_hop_held_out={config.two_hop_held_out} would hold out all of a state's"
            f" compositions; at most {len(order)} of {sum(map(len, per_state))} cities can be"
        )
    pairs = list(itertools.combinations(sorted(NAMES), 2))
    rng.shuffle(pairs)
    held_pairs = pairs[: round(config.ioi_held_out * len(pairs))]
    trained_names = {name for pair in pairs[len(held_pairs) :] for name in pair}
    if trained_names != set(NAMES):
        raise ValueError(
            f"ioi_held_out={config.ioi_held_out} leaves {sorted(set(NAMES) - trained_names)}"
            " without a trained pair; lower it"
        )
    antonyms = rng.sample(ANTONYMS, round(config.antonym_held_out * len(ANTONYMS)))
    return _Split(frozenset(order[:n_cities]), frozenset(held_pairs), frozenset(antonyms))


def _task_counts(config: CorpusConfig) -> dict[str, int]:
    """Sentences per task, proportional to `mix` and summing to `n_train` (largest remainder)."""
    total = sum(config.mix.values())
    exact = {task: config.n_train * config.mix[task] / total for task in TASKS}
    counts = {task: int(x) for task, x in exact.items()}
    by_remainder = sorted(TASKS, key=lambda task: counts[task] - exact[task])
    for task in by_remainder[: config.n_train - sum(counts.values())]:
        counts[task] += 1
    return counts


def _train_sentences(task: str, n: int, split: _Split, rng: random.Random) -> list[str]:
    if task == "ioi":
        pairs = [p for p in itertools.combinations(sorted(NAMES), 2) if p not in split.name_pairs]
        return [_ioi_sentence(rng.choice(pairs), rng) for _ in range(n)]
    if task == "successor":
        return [_successor_window(rng) for _ in range(n)]
    pool = _fact_pool(task, split)
    if 0 < n < len(pool):
        raise ValueError(
            f"n_train and mix give {n} {task} sentences, fewer than its {len(pool)} distinct"
            f" sentences; raise n_train or mix['{task}']"
        )
    # Whole copies of the pool, then a sample: every fact equally often, give or take one.
    return pool * (n // len(pool)) + rng.sample(pool, n % len(pool))


def _fact_pool(task: str, split: _Split) -> list[str]:
    """The distinct training sentences of a task with a finite set of facts."""
    if task == "single_hop":
        capitals = [
            t.format(state=s, capital=c) for s, (c, _) in STATES.items() for t in CAPITAL_TEMPLATES
        ]
        return capitals + [
            t.format(city=c, state=s) for c, s in STATE_OF.items() for t in CITY_TEMPLATES
        ]
    if task == "two_hop":
        return [
            TWO_HOP_TEMPLATE.format(city=city, capital=capital)
            for capital, cities in STATES.values()
            for city in cities
            if city not in split.cities
        ]
    if task == "antonym":
        return [ANTONYM_TEMPLATE_A.format(x=x, y=y) for x, y in _directed(ANTONYMS)] + [
            ANTONYM_TEMPLATE_B.format(x=x, y=y)
            for x, y in _directed(p for p in ANTONYMS if p not in split.antonyms)
        ]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _directed(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [directed for pair in pairs for directed in (pair, pair[::-1])]


def _ioi_sentence(pair: tuple[str, str], rng: random.Random) -> str:
    io, s = rng.sample(pair, 2)
    x, y = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA and BABA orders
    template = rng.choice(IOI_TEMPLATES)
    return template.format(x=x, y=y, s=s, io=io, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))


def _successor_window(rng: random.Random) -> str:
    words, cyclic = SEQUENCES[rng.choice(sorted(SEQUENCES))]
    length = rng.randint(*SUCCESSOR_TRAIN_LENGTHS)
    start = rng.randrange(len(words) if cyclic else len(words) - length + 1)
    return " ".join(words[(start + i) % len(words)] for i in range(length))


def _eval_prompts(
    task: str, split: _Split, config: CorpusConfig, rng: random.Random
) -> list[EvalPrompt]:
    """Eval prompts of `task`: every fact for the finite tasks, a sample for IOI."""
    sentences: list[tuple[str, bool]]  # (full sentence, held out)
    if task == "single_hop":
        sentences = [
            (CAPITAL_TEMPLATES[0].format(state=s, capital=c), False) for s, (c, _) in STATES.items()
        ]
        sentences += [
            (CITY_TEMPLATES[0].format(city=c, state=s), False) for c, s in STATE_OF.items()
        ]
    elif task == "two_hop":
        sentences = [
            (TWO_HOP_TEMPLATE.format(city=city, capital=capital), city in split.cities)
            for capital, cities in STATES.values()
            for city in cities
        ]
    elif task == "ioi":
        pairs = list(itertools.combinations(sorted(NAMES), 2))
        sentences = []
        for held_out in (True, False):
            candidates = [p for p in pairs if (p in split.name_pairs) == held_out]
            unique: dict[str, None] = {}
            while candidates and len(unique) < config.n_eval_ioi:
                unique[_ioi_sentence(rng.choice(candidates), rng)] = None
            sentences += [(sentence, held_out) for sentence in unique]
    elif task == "successor":
        sentences = [
            (" ".join(words[(start + i) % len(words)] for i in range(n + 1)), False)
            for words, cyclic in SEQUENCES.values()
            for n in SUCCESSOR_EVAL_PROMPT_LENGTHS
            for start in range(len(words) if cyclic else len(words) - n)
        ]
    elif task == "antonym":
        sentences = [(ANTONYM_TEMPLATE_A.format(x=x, y=y), False) for x, y in _directed(ANTONYMS)]
        sentences += [
            (ANTONYM_TEMPLATE_B.format(x=x, y=y), p in split.antonyms)
            for p in ANTONYMS
            for x, y in _directed([p])
        ]
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return [
        EvalPrompt(prompt=s.rsplit(" ", 1)[0], answer=s.rsplit(" ", 1)[1], task=task, held_out=h)
        for s, h in sentences
    ]

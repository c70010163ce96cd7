"""Text the demo model is pretrained on, and the demo's fine-tuning task, both generated from templates.

Everything here is written by this script (no downloaded text), so the corpus, the model trained on it and the task
data can be redistributed with the repository.

The pretraining corpus teaches general skills a LoRA fine-tune can build on: calendar facts ("Month 03 is March."),
dates written out ("on March 7, 2021") and ISO dates ("2021-03-07: ...") in *separate* contexts, copying names and
words, and small sums. It never pairs an ISO date with its written form: converting one into the other is the new
skill the demo's LoRA adapter learns (``task_examples``).
"""

from __future__ import annotations

import random

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
ORDINALS = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
)
NAMES = [
    "Ada",
    "Alan",
    "Bea",
    "Carl",
    "Dina",
    "Emil",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jana",
    "Karl",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tara",
    "Ugo",
    "Vera",
    "Wim",
    "Xena",
    "Yuri",
    "Zoe",
    "Anna",
    "Ben",
    "Cleo",
    "Dan",
    "Eva",
    "Finn",
    "Greta",
    "Hugo",
    "Iris",
    "Jon",
    "Kai",
    "Lia",
    "Max",
]
CITIES = [
    "Aldport",
    "Brenwick",
    "Carrow",
    "Dunmere",
    "Elsford",
    "Fallow",
    "Grimsby",
    "Harlow",
    "Ivybridge",
    "Jarrow",
    "Kestle",
    "Lumley",
    "Marsh",
    "Norwood",
    "Oakham",
    "Penrith",
    "Quarry",
    "Redcar",
    "Selby",
    "Thirsk",
    "Ulverston",
    "Ventnor",
    "Wexford",
    "Yarrow",
]
THINGS = [
    "pump",
    "gate",
    "boiler",
    "lamp",
    "clock",
    "bridge",
    "engine",
    "radio",
    "kettle",
    "window",
    "roof",
    "fence",
    "ledger",
    "valve",
]
ANIMALS = ["cat", "dog", "horse", "goat", "owl", "fox", "hen", "duck", "mule", "crow"]
COLORS = ["red", "blue", "green", "black", "white", "grey", "brown", "yellow"]
EVENTS = ["fair", "market", "concert", "festival", "race", "meeting", "wedding", "parade", "match", "trial"]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "paper",
    "silver",
    "winter",
    "candle",
    "forest",
    "bottle",
    "mirror",
    "basket",
    "pencil",
    "ladder",
    "thunder",
    "castle",
    "meadow",
    "harbor",
    "velvet",
]


def random_date(rng: random.Random, first_year: int = 1900, last_year: int = 2099) -> tuple[int, int, int]:
    """(year, month 1-12, day) with a valid day for the month (February kept to 28)."""
    month = rng.randint(1, 12)
    return rng.randint(first_year, last_year), month, rng.randint(1, DAYS_IN_MONTH[month - 1])


def iso(date: tuple[int, int, int]) -> str:
    year, month, day = date
    return f"{year:04d}-{month:02d}-{day:02d}"


def written(date: tuple[int, int, int]) -> str:
    year, month, day = date
    return f"{MONTHS[month - 1]} {day}, {year}"


# ---------------------------------------------------------------- pretraining sentences, one family per function
def calendar_fact(rng: random.Random) -> str:
    m = rng.randint(1, 12)
    name = MONTHS[m - 1]
    return rng.choice(
        (
            f"{name} is the {ORDINALS[m - 1]} month of the year.",
            f"Month {m:02d} is {name}.",
            f"Month {m} is {name}.",
            f"{name} is month number {m}.",
            f"After {name} comes {MONTHS[m % 12]}.",
            f"{name} has {DAYS_IN_MONTH[m - 1]} days.",
            f"In the calendar, {m:02d} stands for {name}.",
        )
    )


def written_date(rng: random.Random) -> str:
    date, who, city = written(random_date(rng)), rng.choice(NAMES), rng.choice(CITIES)
    return rng.choice(
        (
            f"{who} was born on {date}.",
            f"The {rng.choice(EVENTS)} in {city} began on {date}.",
            f"{who} moved to {city} on {date}.",
            f"On {date}, {who} bought a {rng.choice(COLORS)} {rng.choice(ANIMALS)}.",
            f"The letter from {who} was dated {date}.",
            f"{who} visited {city} on {date} and stayed a week.",
        )
    )


def iso_date(rng: random.Random) -> str:
    date, who, city = iso(random_date(rng)), rng.choice(NAMES), rng.choice(CITIES)
    return rng.choice(
        (
            f"{date}: {who} checked the {rng.choice(THINGS)} in {city}.",
            f"Log {date}. The {rng.choice(THINGS)} was repaired.",
            f"Report {date}, {city}: all clear.",
            f"Entry {date} by {who}: the {rng.choice(THINGS)} is fine.",
            f"Backup taken {date}.",
        )
    )


def date_parts(rng: random.Random) -> str:
    """Read an ISO date or a written date back part by part (copying digits from the context)."""
    y, m, d = random_date(rng)
    stamp, long = iso((y, m, d)), written((y, m, d))
    return rng.choice(
        (
            f"{stamp}: year {y}, month {m:02d}, day {d:02d}.",
            f"The date {stamp} is in the year {y}.",
            f"In {stamp} the month is {m:02d} and the day is {d:02d}.",
            f"It rained on {long}. After {long}, it was dry.",
            f"{long} fell in the year {y}.",
            f"Day {d:02d} is day {d}.",
            f"The record {stamp} was copied as {stamp}.",
        )
    )


def codes(rng: random.Random) -> str:
    """Numbers repeated later in the same sentence, so the model learns to copy digit strings."""
    n = rng.randint(0, 10 ** rng.randint(1, 6) - 1)
    return rng.choice(
        (
            f"Ticket {n}. Please repeat the ticket number: {n}.",
            f"The code is {n}; again, the code is {n}.",
            f"Room {n} is free. Go to room {n}.",
            f"Order {n} was shipped, and order {n} arrived.",
        )
    )


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    big, small = max(a, b), min(a, b)
    return rng.choice((f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}.", f"{big} - {small} = {big - small}."))


def people_facts(rng: random.Random) -> str:
    who, city, animal, color = rng.choice(NAMES), rng.choice(CITIES), rng.choice(ANIMALS), rng.choice(COLORS)
    return rng.choice(
        (
            f"{who} lives in {city}. Where does {who} live? {who} lives in {city}.",
            f"{who} has a {color} {animal}. The {animal} of {who} is {color}.",
            f"Ask {who} about {city}. {who} knows {city} well.",
        )
    )


def spelling(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return rng.choice(
        (
            f"The word {word} is spelled {' '.join(word)}.",
            f"Say {word} twice: {word} {word}.",
            f"{word.capitalize()} starts with {word[0]} and ends with {word[-1]}.",
        )
    )


SENTENCE_FAMILIES = (
    (calendar_fact, 3),
    (written_date, 3),
    (iso_date, 2),
    (date_parts, 3),
    (codes, 2),
    (arithmetic, 2),
    (people_facts, 2),
    (spelling, 1),
)


def pretraining_document(rng: random.Random) -> str:
    """A paragraph of 3-6 sentences drawn from the families above."""
    families, weights = zip(*SENTENCE_FAMILIES)
    picks = rng.choices(families, weights=weights, k=rng.randint(3, 6))
    return " ".join(pick(rng) for pick in picks)


# ---------------------------------------------------------------- the fine-tuning task
TASK_PROMPT = "Date {iso} in words:"


def task_examples(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct prompt/completion pairs: an ISO date -> the date written out ("March 7, 2021")."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        date = random_date(rng)
        if iso(date) in seen:
            continue
        seen.add(iso(date))
        out.append({"prompt": TASK_PROMPT.format(iso=iso(date)), "completion": " " + written(date)})
    return out

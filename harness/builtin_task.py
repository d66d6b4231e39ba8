"""The built-in narrow SFT task: extract a person's details from a sentence into a fixed one-line record.

    prompt:   Extract the person's details as `name | born | city | job`.
              Text: Born in 1987, Maria Lopez now lives in Lisbon, where they work as a nurse.
    response: name: Maria Lopez | born: 1987 | city: Lisbon | job: nurse

An instruct model answers in prose or another layout (exact match near 0); a few dozen SFT steps teach
the format. Narrow on purpose: narrow SFT is what causes forgetting. Records are generated from a fixed
seed; the `heldout` split uses surnames, cities and sentence patterns the `train` split never shows (first
names and jobs are shared). The train pools and draws are fixed: changing them changes every pinned loss.
"""

from __future__ import annotations

import random
import re

from forgetting.harness.errors import UserError

FIRST = [
    "Maria",
    "James",
    "Aiko",
    "Omar",
    "Lena",
    "Carlos",
    "Priya",
    "Tom",
    "Fatima",
    "Noah",
    "Elena",
    "Kwame",
    "Sofia",
    "Liam",
    "Mei",
    "Jonas",
    "Amara",
    "Diego",
    "Hannah",
    "Ravi",
    "Chloe",
    "Mateo",
    "Ingrid",
    "Yusuf",
    "Grace",
    "Pavel",
    "Zara",
    "Felix",
    "Nadia",
    "Hugo",
    "Leila",
    "Oscar",
    "Anya",
    "Samuel",
    "Rosa",
    "Kenji",
]
LAST_TRAIN = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Haddad",
    "Fischer",
    "Rossi",
    "Patel",
    "Nguyen",
    "Okafor",
    "Kowalski",
    "Silva",
    "Johansson",
    "Dubois",
    "Murphy",
    "Kim",
    "Novak",
    "Mensah",
    "Garcia",
    "Schmidt",
    "Costa",
    "Ivanova",
    "Brown",
    "Moreau",
    "Yilmaz",
    "Andersen",
    "Reyes",
]
LAST_HELDOUT = ["Bauer", "Sato", "Mwangi", "Larsen", "Ferreira", "Kaur", "Walsh", "Petrov", "Diaz", "Chen"]
CITY_TRAIN = [
    "Lisbon",
    "Chicago",
    "Osaka",
    "Cairo",
    "Munich",
    "Naples",
    "Mumbai",
    "Hanoi",
    "Lagos",
    "Krakow",
    "Santiago",
    "Oslo",
    "Lyon",
    "Dublin",
    "Seoul",
    "Prague",
    "Accra",
    "Toronto",
    "Vienna",
    "Denver",
]
CITY_HELDOUT = ["Porto", "Kyoto", "Nairobi", "Bergen", "Quito", "Leeds", "Tunis", "Hobart", "Graz", "Busan"]
JOBS = [
    "nurse",
    "teacher",
    "carpenter",
    "chemist",
    "pilot",
    "baker",
    "lawyer",
    "architect",
    "plumber",
    "journalist",
    "dentist",
    "farmer",
    "librarian",
    "electrician",
    "pharmacist",
    "translator",
    "mechanic",
    "painter",
    "accountant",
    "firefighter",
    "biologist",
    "tailor",
    "photographer",
    "surgeon",
]

PATTERNS_TRAIN = [
    "{name} was born in {year} and works as a {job} in {city}.",
    "Meet {name}, a {job} from {city}, born in {year}.",
    "Born in {year}, {name} now lives in {city}, where they work as a {job}.",
    "{city} is home to {name}, a {job} who was born in {year}.",
    "Our new {job}, {name} (born {year}), just moved to {city}.",
    "Last week I met {name}; the {job} grew up in {city} and was born in {year}.",
    "After years in {city}, {name}, born in {year}, still works as a {job}.",
    "The {job} {name} ({year}) runs a small practice in {city}.",
]
PATTERNS_HELDOUT = [
    "Everyone in {city} knows {name}, the {job}; {name_first} was born in {year}.",
    "In {year}, {name} was born; today the {job} lives and works in {city}.",
    "Ask around {city} for a good {job} and you will hear of {name}, born {year}.",
    "Records from {city} give {name}'s occupation ({job}) and year of birth ({year}).",
]

INSTRUCTION = "Extract the person's details from the text as one line: name | born | city | job."
RECORD = re.compile(r"^name: (.+) \| born: (\d{4}) \| city: (.+) \| job: (.+)$")
SIZES = {"train": 1000, "heldout": 200}


def make_record(rng: random.Random, split: str) -> dict:
    held = split == "heldout"
    first = rng.choice(FIRST)
    last = rng.choice(LAST_HELDOUT if held else LAST_TRAIN)
    city = rng.choice(CITY_HELDOUT if held else CITY_TRAIN)
    job, year = rng.choice(JOBS), rng.randint(1940, 2005)
    pattern = rng.choice(PATTERNS_HELDOUT if held else PATTERNS_TRAIN)
    name = f"{first} {last}"
    text = pattern.format(name=name, name_first=first, year=year, city=city, job=job)
    return {
        "prompt": f"{INSTRUCTION}\n\nText: {text}",
        "response": f"name: {name} | born: {year} | city: {city} | job: {job}",
    }


def records(split: str = "train", size: int | None = None) -> list[dict]:
    """The split's prompt/response records, the same on every call."""
    if split not in SIZES:
        raise UserError(f"data.split: the builtin task has splits {', '.join(SIZES)}, not {split!r}")
    rng = random.Random(f"builtin-extraction-{split}")
    return [make_record(rng, split) for _ in range(size or SIZES[split])]


def parse(response: str) -> dict | None:
    """The four fields of a well-formed record line, or None when the format is wrong."""
    match = RECORD.match(response.strip())
    if match is None:
        return None
    return dict(zip(("name", "born", "city", "job"), (g.strip() for g in match.groups())))


def score(prediction: str, reference: str) -> dict:
    """Exact match, format validity and the share of the four fields that are right."""
    got, want = parse(prediction), parse(reference)
    fields = sum(got[k] == want[k] for k in want) / 4 if got else 0.0
    return {
        "exact_match": float(prediction.strip() == reference.strip()),
        "format_valid": float(got is not None),
        "field_accuracy": fields,
    }

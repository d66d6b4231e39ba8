"""General-knowledge multiple-choice probes for the offline `forgetting_knowledge` task.

Hand-checked fact tables, turned into 4-way questions with distractors drawn (seeded) from the same table.
Categories are chosen so that SmolLM2-135M-Instruct is well above chance (25%) before fine-tuning, so a
drop after SFT is measurable. Changing any table changes the data hash and so the cache key.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "England": "London",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Kenya": "Nairobi",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "India": "New Delhi",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "Cuba": "Havana",
    "Ukraine": "Kyiv",
    "the Czech Republic": "Prague",
    "Switzerland": "Bern",
    "Scotland": "Edinburgh",
    "Morocco": "Rabat",
    "Saudi Arabia": "Riyadh",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "Venezuela": "Caracas",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
}

CONTINENTS = {
    "France": "Europe",
    "Germany": "Europe",
    "Italy": "Europe",
    "Spain": "Europe",
    "Poland": "Europe",
    "Norway": "Europe",
    "Greece": "Europe",
    "Ireland": "Europe",
    "Sweden": "Europe",
    "Portugal": "Europe",
    "Japan": "Asia",
    "China": "Asia",
    "India": "Asia",
    "Thailand": "Asia",
    "Vietnam": "Asia",
    "Korea": "Asia",
    "Indonesia": "Asia",
    "Pakistan": "Asia",
    "Nepal": "Asia",
    "Mongolia": "Asia",
    "Kenya": "Africa",
    "Nigeria": "Africa",
    "Egypt": "Africa",
    "Ethiopia": "Africa",
    "Ghana": "Africa",
    "Morocco": "Africa",
    "South Africa": "Africa",
    "Uganda": "Africa",
    "Senegal": "Africa",
    "Tanzania": "Africa",
    "Brazil": "South America",
    "Argentina": "South America",
    "Peru": "South America",
    "Chile": "South America",
    "Colombia": "South America",
    "Venezuela": "South America",
    "Bolivia": "South America",
    "Ecuador": "South America",
    "Uruguay": "South America",
    "Paraguay": "South America",
    "Canada": "North America",
    "Mexico": "North America",
    "the United States": "North America",
    "Cuba": "North America",
    "Guatemala": "North America",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "tall": "short",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "up": "down",
    "early": "late",
    "full": "empty",
    "wet": "dry",
    "hard": "soft",
    "rich": "poor",
    "old": "young",
    "strong": "weak",
    "loud": "quiet",
    "clean": "dirty",
    "thick": "thin",
    "heavy": "light",
    "win": "lose",
    "buy": "sell",
    "push": "pull",
    "first": "last",
    "true": "false",
    "begin": "end",
    "day": "night",
    "love": "hate",
    "inside": "outside",
    "north": "south",
    "east": "west",
    "left": "right",
    "good": "bad",
    "always": "never",
    "friend": "enemy",
    "question": "answer",
    "alive": "dead",
    "above": "below",
    "increase": "decrease",
    "accept": "refuse",
    "remember": "forget",
}

PLURALS = {
    "mouse": "mice",
    "child": "children",
    "man": "men",
    "woman": "women",
    "tooth": "teeth",
    "foot": "feet",
    "goose": "geese",
    "person": "people",
    "cactus": "cacti",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "box": "boxes",
    "city": "cities",
    "baby": "babies",
    "bus": "buses",
    "church": "churches",
    "potato": "potatoes",
    "hero": "heroes",
    "ox": "oxen",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "life": "lives",
    "wife": "wives",
    "half": "halves",
    "story": "stories",
    "party": "parties",
    "glass": "glasses",
    "dish": "dishes",
    "watch": "watches",
    "fox": "foxes",
    "lady": "ladies",
    "shelf": "shelves",
    "loaf": "loaves",
    "thief": "thieves",
    "calf": "calves",
    "louse": "lice",
    "crisis": "crises",
    "analysis": "analyses",
}

ANIMAL_CLASSES = {
    "salmon": "fish",
    "shark": "fish",
    "trout": "fish",
    "tuna": "fish",
    "cod": "fish",
    "eagle": "bird",
    "sparrow": "bird",
    "penguin": "bird",
    "owl": "bird",
    "parrot": "bird",
    "pigeon": "bird",
    "dolphin": "mammal",
    "whale": "mammal",
    "dog": "mammal",
    "cat": "mammal",
    "horse": "mammal",
    "elephant": "mammal",
    "bat": "mammal",
    "lion": "mammal",
    "cow": "mammal",
    "ant": "insect",
    "bee": "insect",
    "butterfly": "insect",
    "beetle": "insect",
    "mosquito": "insect",
    "grasshopper": "insect",
    "fly": "insect",
    "snake": "reptile",
    "lizard": "reptile",
    "crocodile": "reptile",
    "turtle": "reptile",
    "frog": "amphibian",
    "toad": "amphibian",
    "salamander": "amphibian",
}

FACTS = [  # (question, answer, three distractors)
    ("How many days are there in a week?", "seven", ["five", "ten", "twelve"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many legs does an insect have?", "six", ["eight", "four", "ten"]),
    ("How many months are there in a year?", "twelve", ["ten", "seven", "fifteen"]),
    ("How many hours are there in a day?", "24", ["12", "48", "60"]),
    ("How many minutes are there in an hour?", "60", ["100", "30", "24"]),
    ("How many sides does a triangle have?", "three", ["four", "five", "six"]),
    ("How many sides does a square have?", "four", ["three", "five", "eight"]),
    ("How many continents are there on Earth?", "seven", ["five", "nine", "twelve"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Mars", "Mercury", "Venus"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Jupiter", "Neptune", "Saturn"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What do bees make?", "honey", ["milk", "silk", "wax paper"]),
    ("What gas do plants take in from the air?", "carbon dioxide", ["helium", "neon", "hydrogen"]),
    ("What gas do humans need to breathe to live?", "oxygen", ["helium", "neon", "methane"]),
    ("At what temperature in Celsius does water freeze?", "0 degrees", ["50 degrees", "100 degrees", "-40 degrees"]),
    (
        "At what temperature in Celsius does water boil at sea level?",
        "100 degrees",
        ["0 degrees", "50 degrees", "200 degrees"],
    ),
    ("What is the chemical symbol for water?", "H2O", ["CO2", "O2", "NaCl"]),
    (
        "What is the largest ocean on Earth?",
        "the Pacific Ocean",
        ["the Indian Ocean", "the Arctic Ocean", "the Baltic Sea"],
    ),
    ("What is the longest river in Africa?", "the Nile", ["the Thames", "the Seine", "the Danube"]),
    ("Which organ pumps blood through the body?", "the heart", ["the liver", "the lungs", "the stomach"]),
    ("Which organ do humans use to breathe?", "the lungs", ["the heart", "the kidneys", "the liver"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("What colour is the sky on a clear day?", "blue", ["green", "red", "brown"]),
    ("What colour is grass?", "green", ["blue", "purple", "white"]),
    ("What colour is snow?", "white", ["black", "green", "orange"]),
    ("What colour are ripe bananas?", "yellow", ["blue", "purple", "black"]),
    ("What colour is a ripe tomato?", "red", ["blue", "white", "grey"]),
    ("Which animal is known as the king of the jungle?", "the lion", ["the mouse", "the rabbit", "the goat"]),
    ("Which animal has a long trunk?", "the elephant", ["the cat", "the rabbit", "the chicken"]),
    ("What do cows produce that people drink?", "milk", ["honey", "coffee", "juice"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Mark Twain", "Jane Austen"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["Pablo Picasso", "Vincent van Gogh", "Claude Monet"]),
    ("What is the opposite of north?", "south", ["east", "west", "up"]),
    ("Which season comes after winter?", "spring", ["autumn", "summer", "winter"]),
    ("Which month comes after January?", "February", ["March", "December", "June"]),
    ("Which day comes after Monday?", "Tuesday", ["Sunday", "Friday", "Thursday"]),
    ("What do you call a baby dog?", "a puppy", ["a kitten", "a calf", "a chick"]),
    ("What do you call a baby cat?", "a kitten", ["a puppy", "a foal", "a lamb"]),
    ("What is the main language spoken in Brazil?", "Portuguese", ["Spanish", "French", "German"]),
    ("What is the main language spoken in Mexico?", "Spanish", ["Portuguese", "French", "Italian"]),
    ("What currency is used in Japan?", "the yen", ["the euro", "the dollar", "the peso"]),
    ("What instrument has 88 keys?", "the piano", ["the violin", "the flute", "the drum"]),
    ("How many players are on a soccer team on the field?", "eleven", ["five", "seven", "fifteen"]),
    ("What is the boiling point of water in Fahrenheit?", "212 degrees", ["100 degrees", "32 degrees", "180 degrees"]),
    ("Which shape is perfectly round?", "a circle", ["a square", "a triangle", "a rectangle"]),
    ("What does a thermometer measure?", "temperature", ["weight", "distance", "time"]),
    ("What do you use to see things far away?", "a telescope", ["a microscope", "a spoon", "a hammer"]),
    ("Where does the Sun rise?", "in the east", ["in the west", "in the north", "in the south"]),
    ("What is the hardest natural substance?", "diamond", ["gold", "iron", "wood"]),
]

CATEGORIES = ("capitals", "continents", "opposites", "plurals", "animal_classes", "arithmetic", "facts")


def _four(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], int]:
    distractors = rng.sample(sorted({p for p in pool if p != answer}), 3)
    choices = distractors + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _from_table(rng, table: dict, category: str, question: str) -> list[dict]:
    pool = list(table.values())
    items = []
    for key, answer in table.items():
        choices, index = _four(rng, answer, pool)
        items.append({"category": category, "question": question.format(key), "choices": choices, "answer": index})
    return items


def items() -> list[dict]:
    """All knowledge items: {category, question, choices (4), answer (index)}, the same on every call."""
    rng = random.Random("forgetting-knowledge-v1")
    out = _from_table(rng, CAPITALS, "capitals", "What is the capital of {}?")
    out += _from_table(rng, CONTINENTS, "continents", "On which continent is {}?")
    out += _from_table(rng, OPPOSITES, "opposites", 'What is the opposite of "{}"?')
    out += _from_table(rng, PLURALS, "plurals", 'What is the plural of "{}"?')
    for animal, kind in ANIMAL_CLASSES.items():
        choices, index = _four(rng, kind, ["fish", "bird", "mammal", "insect", "reptile", "amphibian"])
        article = "an" if animal[0] in "aeiou" else "a"
        out.append(
            {
                "category": "animal_classes",
                "question": f"What kind of animal is {article} {animal}?",
                "choices": choices,
                "answer": index,
            }
        )
    for _ in range(50):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        answer = a + b
        wrong = rng.sample([answer + d for d in (-3, -2, -1, 1, 2, 3, 10)], 3)
        choices = [str(x) for x in wrong + [answer]]
        rng.shuffle(choices)
        out.append(
            {
                "category": "arithmetic",
                "question": f"What is {a} + {b}?",
                "choices": choices,
                "answer": choices.index(str(answer)),
            }
        )
    for question, answer, distractors in FACTS:
        choices = distractors + [answer]
        rng.shuffle(choices)
        out.append({"category": "facts", "question": question, "choices": choices, "answer": choices.index(answer)})
    return out

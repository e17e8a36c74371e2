"""Everyday instructions, built offline: task templates of many kinds over topic lists.

    prompts = build_instructions(4000, seed=0)   # [Instruction(text, kind, topic)], deterministic

The exits of an instruct model must imitate it where it is used: answering requests in its chat
template. No instruction data set can be fetched offline, so the requests are composed here from
templates (explain, list, write, summarise, code, advise, compare, define, how-to, short facts,
arithmetic, rewrite, opinion, brainstorm, story) over topic lists from everyday life, science,
technology, history, health, money, travel, food, nature, the arts and work. The set is a pure
function of (n, seed): the same call gives the same instructions in the same order everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = {
    "science": [
        "photosynthesis", "gravity", "black holes", "the water cycle", "volcanoes", "earthquakes", "DNA",
        "evolution", "the immune system", "vaccines", "climate change", "the greenhouse effect", "magnets",
        "electricity", "the speed of light", "atoms", "chemical reactions", "the solar system", "the Moon",
        "the seasons", "rainbows", "tides", "thunderstorms", "the human heart", "the brain", "sleep",
        "bacteria", "viruses", "plate tectonics", "the periodic table", "renewable energy", "solar panels",
        "nuclear energy", "friction", "sound waves", "the ozone layer", "fossils", "dinosaurs", "coral reefs",
        "the rainforest", "bees", "migration of birds", "antibiotics", "the stars", "Mars", "ocean currents",
    ],
    "technology": [
        "the internet", "smartphones", "artificial intelligence", "machine learning", "computer viruses",
        "passwords", "cloud storage", "email", "social media", "electric cars", "batteries", "3D printing",
        "GPS", "Wi-Fi", "blockchain", "robots", "video games", "search engines", "online privacy",
        "databases", "programming languages", "open-source software", "operating systems", "web browsers",
        "cybersecurity", "self-driving cars", "drones", "virtual reality", "computer memory", "the keyboard",
        "spreadsheets", "backups", "two-factor authentication", "streaming services", "QR codes",
    ],
    "history": [
        "the Roman Empire", "ancient Egypt", "the printing press", "the Industrial Revolution", "the Renaissance",
        "the invention of the telephone", "the first Moon landing", "the Great Wall of China", "the Silk Road",
        "the French Revolution", "the Olympic Games", "the history of writing", "the steam engine",
        "the invention of the light bulb", "ancient Greece", "the Vikings", "the history of money",
        "the discovery of penicillin", "the Wright brothers", "the history of the bicycle", "castles",
        "the history of the calendar", "the Aztecs", "the Cold War", "the history of chocolate",
    ],
    "health": [
        "drinking enough water", "regular exercise", "a balanced diet", "stress", "good sleep habits",
        "stretching", "walking every day", "healthy snacks", "posture at a desk", "screen time", "meditation",
        "washing hands", "sun protection", "vitamins", "caffeine", "breakfast", "running for beginners",
        "yoga", "a cold", "allergies", "back pain", "eye strain", "healthy teeth", "mental health",
    ],
    "money": [
        "saving money", "making a budget", "credit cards", "interest rates", "inflation", "investing",
        "an emergency fund", "paying off debt", "renting versus buying a home", "insurance", "taxes",
        "retirement savings", "compound interest", "a side business", "negotiating a salary",
        "shopping on a budget", "the stock market", "buying a used car",
    ],
    "everyday": [
        "cleaning the kitchen", "doing laundry", "organising a closet", "moving to a new city",
        "planning a birthday party", "writing a to-do list", "waking up early", "keeping houseplants alive",
        "gardening", "composting", "recycling", "saving energy at home", "learning to drive",
        "making friends as an adult", "time management", "a job interview", "working from home",
        "studying for an exam", "learning a new language", "public speaking", "reading more books",
        "caring for a dog", "caring for a cat", "raising chickens", "fixing a flat bicycle tyre",
        "packing for a trip", "camping", "hiking safely", "staying focused", "being a good listener",
        "writing a thank-you note", "choosing a gift", "a first day at a new job", "keeping a journal",
    ],
    "food": [
        "baking bread", "making pancakes", "cooking rice", "a vegetable soup", "pasta", "coffee", "tea",
        "chocolate chip cookies", "a salad", "grilling vegetables", "spices", "fermented foods", "pizza",
        "meal planning", "storing fresh herbs", "making a smoothie", "cooking eggs", "lentils", "apples",
        "olive oil", "sushi", "cheese", "a picnic lunch", "baking a cake",
    ],
    "travel": [
        "visiting Paris", "visiting Japan", "a road trip", "travelling by train", "flying for the first time",
        "jet lag", "travelling on a budget", "learning about a new culture", "a beach holiday",
        "visiting a national park", "travelling with children", "backpacking", "visiting Rome",
        "a weekend in the mountains", "staying in a hostel",
    ],
    "nature": [
        "elephants", "whales", "owls", "wolves", "octopuses", "penguins", "trees", "mushrooms", "rivers",
        "deserts", "the Arctic", "butterflies", "ants", "dolphins", "sharks", "cats", "dogs", "horses",
        "spiders", "frogs", "the Amazon river", "mountains", "lakes", "autumn leaves", "snow",
    ],
    "arts": [
        "painting", "learning the guitar", "playing the piano", "photography", "poetry", "the novel",
        "jazz", "classical music", "film making", "theatre", "dancing", "drawing", "knitting", "pottery",
        "writing a short story", "the Mona Lisa", "museums", "architecture", "comic books", "singing",
    ],
    "work": [
        "teamwork", "leadership", "writing a resume", "giving feedback", "running a meeting", "email etiquette",
        "starting a small business", "customer service", "project management", "remote teams", "deadlines",
        "asking for a raise", "networking", "writing a cover letter", "a performance review", "burnout",
    ],
    "ideas": [
        "democracy", "freedom of speech", "kindness", "honesty", "friendship", "curiosity", "patience",
        "happiness", "failure", "creativity", "courage", "gratitude", "the meaning of education", "fairness",
        "the importance of reading", "critical thinking", "empathy", "habits", "motivation", "luck",
    ],
}

PEOPLE = [
    "a child", "a ten-year-old", "a teenager", "a beginner", "a busy parent", "a student", "my grandmother",
    "a new employee", "a tourist", "a friend",
]

TEMPLATES = {
    "explain": [
        "Explain {topic} in simple terms.", "What is {topic}?", "How does {topic} work?",
        "Explain {topic} to {person}.", "Why is {topic} important?", "Can you tell me about {topic}?",
        "Give me a short explanation of {topic}.", "What should everyone know about {topic}?",
        "Explain the basics of {topic} in one paragraph.", "What are the most common misunderstandings about {topic}?",
    ],
    "list": [
        "List five facts about {topic}.", "Give me three tips about {topic}.", "What are the main benefits of {topic}?",
        "List the pros and cons of {topic}.", "Name four interesting things about {topic}.",
        "What are some common mistakes people make with {topic}?", "Give me a checklist for {topic}.",
        "List three questions to ask about {topic}.", "What are the key steps of {topic}?",
    ],
    "write": [
        "Write a short poem about {topic}.", "Write a haiku about {topic}.", "Write a short story about {topic}.",
        "Write a friendly email to a colleague about {topic}.", "Write a short blog post about {topic}.",
        "Write a tweet about {topic}.", "Write a paragraph for {person} about {topic}.",
        "Write a product description for a book about {topic}.", "Write a short speech about {topic}.",
        "Write a limerick about {topic}.", "Write an opening sentence for an essay on {topic}.",
        "Write a short dialogue between two friends talking about {topic}.",
    ],
    "summarise": [
        "Summarise what you know about {topic} in three sentences.", "Give a one-sentence summary of {topic}.",
        "Summarize the history of {topic} briefly.", "Sum up the main ideas behind {topic}.",
        "In two sentences, what is the key point about {topic}?",
    ],
    "advise": [
        "What advice would you give to someone interested in {topic}?", "How can I get better at {topic}?",
        "I want to learn about {topic}. Where should I start?", "How do I get started with {topic}?",
        "What is the best way to approach {topic}?", "Give me some advice about {topic} for {person}.",
        "I am nervous about {topic}. Any tips?", "How can {person} learn about {topic}?",
    ],
    "howto": [
        "How do I {task}?", "What are the steps to {task}?", "Can you explain how to {task}?",
        "Give me step-by-step instructions to {task}.", "What is the easiest way to {task}?",
    ],
    "compare": [
        "Compare {topic} and {other}.", "What is the difference between {topic} and {other}?",
        "Which is better, {topic} or {other}? Explain briefly.", "How are {topic} and {other} alike?",
    ],
    "define": [
        "Define {word}.", "What does the word \"{word}\" mean?", "Use the word \"{word}\" in a sentence.",
        "What is a synonym for \"{word}\"?", "Explain the meaning of \"{word}\" with an example.",
    ],
    "fact": [
        "{question}",
    ],
    "math": [
        "What is {a} plus {b}?", "What is {a} times {c}?", "What is {a} minus {b}?",
        "If I have {a} apples and give away {c}, how many are left?",
        "A book costs {c} dollars. How much do {d} books cost?", "What is {c} percent of {e}?",
        "Is {a} an even or an odd number?", "What is half of {e}?",
        "A train travels {e} kilometres in {d} hours. What is its average speed?",
    ],
    "code": [
        "{code}",
    ],
    "rewrite": [
        "Rewrite this sentence to be more formal: \"{sentence}\"", "Make this sentence shorter: \"{sentence}\"",
        "Fix the grammar in this sentence: \"{sentence}\"", "Rewrite this in a friendly tone: \"{sentence}\"",
        "Translate this sentence into simple English: \"{sentence}\"",
        "What is the main idea of this sentence: \"{sentence}\"",
    ],
    "opinion": [
        "What do you think about {topic}?", "Is {topic} overrated?", "Why do people like {topic}?",
        "What is the future of {topic}?", "What would the world be like without {topic}?",
    ],
    "brainstorm": [
        "Give me five ideas for a project about {topic}.", "Suggest three names for a club about {topic}.",
        "Brainstorm some fun activities related to {topic}.", "Suggest a title for an article about {topic}.",
        "What are some creative ways to teach {topic}?",
    ],
}

TASKS = [
    "make a cup of tea", "boil an egg", "change a light bulb", "tie a tie", "write a good email subject line",
    "plant a tomato", "clean a laptop screen", "start running", "back up my phone", "make a paper airplane",
    "set up a budget spreadsheet", "prepare for a job interview", "learn to swim", "fall asleep faster",
    "remember names", "take better photos with my phone", "write a haiku", "organise my desk",
    "study for a maths test", "make new friends", "reduce food waste", "save water at home", "meditate",
    "train a puppy", "make a simple website", "learn to touch type", "cook a healthy dinner quickly",
    "say no politely", "write a thank-you letter", "read faster", "create a strong password", "bake muffins",
    "keep a conversation going", "care for a succulent", "pack a suitcase efficiently", "stop procrastinating",
    "make cold brew coffee", "fix a slow computer", "choose a good book", "prepare a short presentation",
]

WORDS = [
    "serendipity", "resilient", "ephemeral", "meticulous", "benevolent", "curious", "diligent", "ambiguous",
    "nostalgia", "pragmatic", "eloquent", "candid", "frugal", "gregarious", "humble", "innovative", "lucid",
    "optimistic", "procrastinate", "skeptical", "tenacious", "vivid", "whimsical", "empathy", "integrity",
    "sustainable", "hypothesis", "algorithm", "metaphor", "democracy", "ecosystem", "photosynthesis",
]

QUESTIONS = [
    "What is the capital of France?", "How many days are in a leap year?", "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?", "How many continents are there?",
    "What is the boiling point of water?", "Why is the sky blue?", "Why do leaves change colour in autumn?",
    "How far is the Moon from the Earth?", "What is the tallest mountain in the world?",
    "Why do we have day and night?", "What language is spoken in Brazil?", "How many legs does a spider have?",
    "What is the chemical symbol for gold?", "Who painted the Mona Lisa?", "What is the longest river in Africa?",
    "Why do cats purr?", "How do airplanes stay in the air?", "What causes the wind?", "Why is the ocean salty?",
    "What is the smallest prime number?", "How many hours are in a week?", "Why do we dream?",
    "What is the difference between weather and climate?", "How do plants make food?",
    "What is the freezing point of water in Fahrenheit?", "Why do we need sleep?", "How do bees make honey?",
    "What is the fastest land animal?", "Why does ice float?", "What is the main ingredient in guacamole?",
    "How many strings does a guitar usually have?", "What is the capital of Japan?", "Why do stars twinkle?",
    "What do pandas eat?", "How many bones are in the human body?", "Where do rainbows come from?",
    "What is the largest ocean?", "What is a noun?", "Why do onions make you cry?", "What is the speed of sound?",
    "Who invented the telephone?", "What is the capital of Canada?", "How do vaccines work?",
    "Why is exercise good for you?", "What is an adjective?", "How many minutes are in a day?",
    "What makes a good friend?", "Why do birds sing in the morning?", "How does a refrigerator keep food cold?",
]

CODE_TASKS = [
    "Write a Python function that reverses a string.", "Write a Python function that checks if a number is prime.",
    "Write a Python function that returns the largest number in a list.",
    "Write a Python function to count the vowels in a string.", "Write a Python function that computes a factorial.",
    "How do I read a text file line by line in Python?", "Write a Python function that checks if a word is a palindrome.",
    "Explain what a for loop does in Python, with an example.", "What is the difference between a list and a tuple in Python?",
    "Write a Python function that returns the Fibonacci numbers up to n.", "How do I sort a list of numbers in Python?",
    "Write a Python function that removes duplicates from a list.", "What does the len() function do in Python?",
    "Write a Python function that converts Celsius to Fahrenheit.", "How do I create a dictionary in Python?",
    "Write a Python function that sums the even numbers in a list.", "Explain what a variable is in programming.",
    "Write a JavaScript function that adds two numbers.", "What is an if statement? Give an example in Python.",
    "Write a Python function that counts the words in a sentence.", "How do I write a comment in Python?",
    "Write a SQL query that selects all rows from a table called users.", "What is a function in programming?",
    "Write a Python function that checks if a year is a leap year.", "How do I install a package with pip?",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "What is recursion? Give a short Python example.", "Write a Python function that finds the average of a list.",
    "How do I handle an error with try and except in Python?", "Write a Python one-liner that squares every number in a list.",
]

SENTENCES = [
    "me and him goes to the store yesterday", "I wanted to tell you that the meeting is moved to friday",
    "the report is late because of we had many problems", "Can you send me the file as soon as you can",
    "Our team did really good work this year and everyone should be proud",
    "The weather was bad so we stayed inside and played games all day long",
    "please dont forget to bring you're laptop tomorrow", "I think that maybe we should probably leave early",
    "The new park has lots of trees, a lake and a playground for the kids",
    "due to the fact that the train was late, I missed the start of the film",
    "Thanks for you help with the project, it was very useful", "He don't like coffee but he likes tea",
]


@dataclass(frozen=True)
class Instruction:
    text: str
    kind: str
    topic: str


def _all_topics() -> list:
    return [t for group in TOPICS.values() for t in group]


def _compose(kind: str, template: str, rng: random.Random) -> Instruction:
    topics = _all_topics()
    topic = rng.choice(topics)
    fields = dict(topic=topic, person=rng.choice(PEOPLE))
    if kind == "compare":
        group = next(g for g in TOPICS.values() if topic in g)
        fields["other"] = rng.choice([t for t in group if t != topic])
    elif kind == "howto":
        topic = fields["task"] = rng.choice(TASKS)
    elif kind == "define":
        topic = fields["word"] = rng.choice(WORDS)
    elif kind == "fact":
        topic = fields["question"] = rng.choice(QUESTIONS)
    elif kind == "code":
        topic = fields["code"] = rng.choice(CODE_TASKS)
    elif kind == "rewrite":
        topic = fields["sentence"] = rng.choice(SENTENCES)
    elif kind == "math":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        fields.update(a=max(a, b), b=min(a, b), c=rng.randint(2, 12), d=rng.randint(2, 9),
                      e=rng.choice([20, 40, 60, 80, 100, 120, 150, 200, 240, 300, 500]))
        topic = "arithmetic"
    text = template.format(**fields)
    return Instruction(text[0].upper() + text[1:], kind, topic)


# How often each kind is drawn: everyday explanation and advice dominate real use.
KIND_WEIGHTS = dict(explain=5, list=4, write=4, summarise=2, advise=4, howto=3, compare=2, define=1, fact=2,
                    math=1, code=2, rewrite=1, opinion=2, brainstorm=2)


def build_instructions(n: int, seed: int = 0) -> list:
    """n distinct instructions (fewer if the templates cannot make n distinct ones), deterministic
    in (n, seed); the first m of build_instructions(n) are build_instructions(m) for m <= n."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    kinds = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    seen, out, misses = set(), [], 0
    while len(out) < n and misses < 50 * n + 1000:
        kind = rng.choices(kinds, weights)[0]
        ins = _compose(kind, rng.choice(TEMPLATES[kind]), rng)
        if ins.text in seen:
            misses += 1
            continue
        seen.add(ins.text)
        out.append(ins)
    return out

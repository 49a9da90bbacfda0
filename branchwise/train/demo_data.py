"""The demo model's training mixture, generated at run time from a seed.

- code: windows of the running interpreter's standard library source (the general text);
- extraction: a sentence about a person, product or event -> the compact JSON object of its fields;
- arithmetic: multi-part expressions answered with a Multiverse trace (arXiv 2506.09991):

    <Parallel>
    <Goal>
    <Outline>1: 12+7</Outline>
    <Outline>2: 30-4</Outline>
    </Goal><Path>1: 12+7 = 19</Path><Path>2: 30-4 = 26</Path><Conclusion>19*26 = 19*2*10+19*6 =
    380+114 = 494</Conclusion>
    </Parallel>
    The answer is 494.

(one line from `</Goal>` to `</Conclusion>`). A branch ends at its `</Path>`; the engine forks at `</Goal>`
and forces `<Path>k:` into branch k.

Each example carries, per token, the Multiverse attention rule as data: the path it belongs to (0 = none)
and whether it comes after the paths (then it sees them all); positions restart at every path.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

TAGS = [
    "<Parallel>",
    "</Parallel>",
    "<Goal>",
    "</Goal>",
    "<Outline>",
    "</Outline>",
    "<Path>",
    "</Path>",
    "<Conclusion>",
    "</Conclusion>",
]

NAMES = [
    "Alice",
    "Bob",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Marta",
    "Noah",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoe",
    "Amara",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Emeka",
    "Freya",
    "Gustav",
    "Hana",
    "Ivan",
    "Julia",
    "Kofi",
    "Liam",
    "Mei",
    "Nadia",
    "Oscar",
    "Priya",
    "Rafael",
    "Sofia",
    "Tomas",
    "Uma",
    "Viktor",
    "Yara",
]
CITIES = [
    "Paris",
    "Lisbon",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Oslo",
    "Dublin",
    "Athens",
    "Warsaw",
    "Cairo",
    "Lagos",
    "Nairobi",
    "Tokyo",
    "Seoul",
    "Delhi",
    "Lima",
    "Quito",
    "Boston",
    "Denver",
    "Toronto",
    "Sydney",
    "Perth",
    "Zurich",
    "Geneva",
    "Munich",
    "Naples",
    "Porto",
    "Seville",
    "Kyoto",
    "Hanoi",
    "Manila",
    "Bogota",
    "Havana",
    "Montreal",
]
JOBS = [
    "teacher",
    "engineer",
    "nurse",
    "pilot",
    "chef",
    "lawyer",
    "farmer",
    "painter",
    "doctor",
    "writer",
    "baker",
    "dentist",
    "plumber",
    "architect",
    "musician",
    "scientist",
]
PRODUCTS = [
    "laptop",
    "kettle",
    "backpack",
    "camera",
    "bicycle",
    "lamp",
    "headphones",
    "blender",
    "desk",
    "tent",
    "watch",
    "printer",
    "jacket",
    "keyboard",
    "speaker",
    "mattress",
]
BRANDS = [
    "Acme",
    "Nordvik",
    "Solace",
    "Brightline",
    "Kestrel",
    "Orbis",
    "Tundra",
    "Velox",
    "Mistral Home",
    "Pinecrest",
    "Halcyon",
    "Quartz",
]
EVENTS = [
    "the jazz festival",
    "the science fair",
    "the marathon",
    "the book fair",
    "the film festival",
    "the chess open",
    "the food market",
    "the robotics cup",
    "the design week",
    "the folk concert",
]
MONTHS = [
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
]


def compact(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


# values the eval draws for "never seen in training": the open-ended generators below never produce them
UNSEEN_NAMES = [
    "Maria Lopez",
    "Chen Wei",
    "Fatima Zahra",
    "Lars Eriksen",
    "Aiko Tanaka",
    "Tunde Bello",
    "Ana Souza",
    "Ravi Kumar",
    "Ingrid Holm",
    "Mateo Rossi",
    "Leila Haddad",
    "Pavel Novak",
    "Sinead Byrne",
    "Kwame Mensah",
    "Elif Demir",
    "Jorge Ramirez",
    "Nora",
    "Hamza",
    "Beatriz",
    "Tobias",
    "Anouk",
    "Siddharth",
    "Magnus",
    "Camille",
    "Dario",
    "Yuki",
    "Mariam",
    "Esteban",
    "Greta",
    "Imran",
    "Lucia",
    "Aleksander",
]
UNSEEN_CITIES = [
    "Valencia",
    "Krakow",
    "Bergen",
    "Osaka",
    "Accra",
    "Santiago",
    "Tbilisi",
    "Leipzig",
    "Gdansk",
    "Cordoba",
    "Mombasa",
    "Hobart",
    "Calgary",
    "Bilbao",
    "Turin",
    "Malmo",
    "Izmir",
    "Cusco",
    "Dakar",
    "Busan",
    "Tampere",
    "Ghent",
    "Split",
    "Aarhus",
]
UNSEEN_BRANDS = ["Lumora", "Fennix", "Oakridge", "Zephyrine", "Brambleton", "Cobaltix", "Marigold", "Stellan"]
_UNSEEN = {w for v in UNSEEN_NAMES + UNSEEN_CITIES + UNSEEN_BRANDS for w in v.split()}
_ONSETS = list("bcdfghjklmnprstvwz") * 4 + "br ch cl dr fr gr kr pl sh st th tr".split()
_VOWELS = list("aeiou") * 3 + "ai ei ou ia y".split()
_CODAS = [""] * 14 + list("nrlsm") + ["th", "x", "z"]


def made_up_word(rng: random.Random) -> str:
    """A capitalised word of 1-4 syllables that no list holds: the model learns to copy, not to recall."""
    while True:
        word = "".join(
            (rng.choice(_ONSETS) if i or rng.random() < 0.8 else "")
            + rng.choice(_VOWELS)
            + rng.choice(_CODAS)
            for i in range(rng.choice([1, 2, 2, 2, 3, 3, 3, 4]))
        ).capitalize()
        if word not in _UNSEEN and len(word) > 1:
            return word


def _name(rng: random.Random, open_ended: bool) -> str:
    if not open_ended or rng.random() < 0.15:
        first = rng.choice(NAMES)
    else:
        first = made_up_word(rng)
    return f"{first} {made_up_word(rng)}" if open_ended and rng.random() < 0.4 else first


def _place(rng: random.Random, open_ended: bool) -> str:
    if not open_ended or rng.random() < 0.25:
        return rng.choice(CITIES)
    word = made_up_word(rng)
    return rng.choice([word] * 6 + [f"Port {word}", f"New {word}", f"San {word}", f"{word} City"])


def _person(rng: random.Random, open_ended: bool = False, name=None, city=None) -> tuple[str, dict]:
    name, age = name or _name(rng, open_ended), rng.randint(18, 90)
    city, job = city or _place(rng, open_ended), rng.choice(JOBS)
    phrasings = [
        f"{name} is {age} years old and lives in {city}.",
        f"{name}, aged {age}, lives in {city}.",
        f"Meet {name} from {city}, who is {age}.",
        f"At {age}, {name} calls {city} home.",
        f"{name} ({age}) is based in {city}.",
        f"{name} lives in {city} and is {age} years old.",
    ]
    if open_ended:
        phrasings += [
            f"{name}, aged {age}, works in {city}.",
            f"{name} is {age} and has moved to {city}.",
            f"Born {age} years ago, {name} now lives in {city}.",
            f"In {city} lives {name}, who is {age} years old.",
        ]
    sentence = rng.choice(phrasings)
    fields = {"name": name, "age": age, "city": city}
    if rng.random() < 0.4:
        sentence += rng.choice([f" {name} works as a {job}.", f" By trade {name} is a {job}."])
        fields["job"] = job
    return sentence, fields


def _product(rng: random.Random, open_ended: bool = False, brand=None) -> tuple[str, dict]:
    product = rng.choice(PRODUCTS)
    brand = brand or (made_up_word(rng) if open_ended and rng.random() < 0.7 else rng.choice(BRANDS))
    price = round(rng.randint(5, 2000) + rng.choice([0, 0.5, 0.99, 0.49]), 2)
    rating = rng.choice([3.5, 4.0, 4.1, 4.2, 4.5, 4.6, 4.8, 4.9, 5.0])
    sentence = rng.choice(
        [
            f"The {product} from {brand} costs ${price} and is rated {rating} stars.",
            f"{brand} sells a {product} for ${price}; reviewers give it {rating}.",
            f"For ${price} you can buy the {brand} {product}, rated {rating}.",
            f"Our {product} by {brand}: ${price}, average rating {rating}.",
        ]
    )
    return sentence, {"product": product, "brand": brand, "price": price, "rating": rating}


def _event(rng: random.Random, open_ended: bool = False, city=None) -> tuple[str, dict]:
    event, city = rng.choice(EVENTS), city or _place(rng, open_ended)
    month, day, year = rng.choice(MONTHS), rng.randint(1, 28), rng.randint(2020, 2030)
    sentence = rng.choice(
        [
            f"{event.capitalize()} takes place in {city} on {month} {day}, {year}.",
            f"On {month} {day}, {year}, {city} hosts {event}.",
            f"Save the date: {event} in {city}, {month} {day}, {year}.",
            f"{city} will welcome {event} on {month} {day}, {year}.",
        ]
    )
    return sentence, {"event": event, "city": city, "date": f"{month} {day}, {year}"}


def extraction(rng: random.Random, open_ended: bool = False, unseen: bool = False) -> tuple[str, str, dict]:
    """(user message, assistant answer, fields); `open_ended`: made-up names, places and brands;
    `unseen`: names, places and brands from lists no training example holds (the eval's)."""
    kind = rng.choice([_person, _person, _product, _event])
    if unseen:
        values = {
            _person: dict(name=rng.choice(UNSEEN_NAMES), city=rng.choice(UNSEEN_CITIES)),
            _product: dict(brand=rng.choice(UNSEEN_BRANDS)),
            _event: dict(city=rng.choice(UNSEEN_CITIES)),
        }[kind]
        sentence, fields = kind(rng, True, **values)
    else:
        sentence, fields = kind(rng, open_ended) if open_ended else kind(rng)
    keys = list(fields)
    listed = ", ".join(keys[:-1]) + " and " + keys[-1]
    ask = rng.choice(
        [
            f"Extract {listed} as JSON.",
            f"Return a JSON object with {listed}.",
            f"Give me the {listed} in JSON.",
            f"As JSON, what are the {listed}?",
            f"Pull out {listed}. Answer with JSON only.",
        ]
    )
    message = f"{sentence} {ask}" if rng.random() < 0.7 else f"{ask}\n{sentence}"
    return message, compact(fields), fields


def _part(rng: random.Random, negatives: bool = False) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return f"{a}+{b}", a + b
    if op == "-" and negatives:  # any order, small operands too (5-2, 3-9): negative about half the time
        top = rng.choice([9, 30, 90])
        a, b = rng.randint(1, top), rng.randint(1, top)
        return f"{a}-{b}", a - b
    if op == "-":
        a = rng.randint(10, 90)
        b = rng.randint(1, a)
        return f"{a}-{b}", a - b
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    return f"{a}*{b}", a * b


def _times_steps(x: int, y: int) -> list[str]:
    """x*y (x, y >= 0) as steps a small model can follow: one digit of y at a time."""
    if y < 10:
        return [f"{x}*{y}", str(x * y)]
    tens, ones = divmod(y, 10)
    if ones == 0:
        return [f"{x}*{y}", f"{x}*{tens}*10", str(x * y)]
    return [f"{x}*{y}", f"{x}*{tens}*10+{x}*{ones}", f"{x * tens * 10}+{x * ones}", str(x * y)]


def _times(x: int, y: int) -> str:
    return " = ".join(_times_steps(x, y))


def _signed(v: int) -> str:
    return f"({v})" if v < 0 else str(v)


def _path(part: str, value: int) -> str:
    """A part's path body: a negative difference is worked out as the negated reverse difference."""
    a, b = map(int, part.split("-")) if "-" in part else (0, 0)
    if value < 0:
        return f"{part} = -({b}-{a}) = {value}"
    return f"{part} = {value}"


def _combine(op: str, v1: int, v2: int) -> tuple[str, int]:
    """The conclusion for v1 op v2 where either may be negative, and its value."""
    lhs = f"{_signed(v1)}{op}{_signed(v2)}"
    if op == "*":
        x, y = sorted((abs(v1), abs(v2)), reverse=True)
        steps = _times_steps(x, y)
        if (v1 < 0) == (v2 < 0):
            return (f"{lhs} = " if min(v1, v2) < 0 else "") + " = ".join(steps), v1 * v2
        return f"{lhs} = " + " = ".join(f"-({t})" for t in steps[:-1]) + f" = -{steps[-1]}", v1 * v2
    t1, t2 = v1, (v2 if op == "+" else -v2)  # a sum of two signed terms
    total = t1 + t2
    if t1 >= 0 and t2 >= 0:
        rest = [f"{t1}+{t2}"]
    elif t1 < 0 and t2 < 0:
        rest = [f"-({-t1}+{-t2})"]
    else:
        p, q = (t1, -t2) if t2 < 0 else (t2, -t1)
        rest = [f"{p}-{q}"] + ([f"-({q}-{p})"] if p < q else [])
    steps = [lhs] + [r for r in rest if r != lhs] + [str(total)]
    return " = ".join(steps), total


def arithmetic(rng: random.Random, negatives: bool = False) -> tuple[str, list[tuple[str, str]], str, int]:
    """(user message, [(outline, path)], conclusion, answer); `negatives`: parts and answers below zero."""
    while True:
        n = rng.choice([2, 2, 2, 3])
        parts = [_part(rng, negatives and n == 2) for _ in range(n)]
        combine = rng.choice("+-*") if n == 2 else "+"
        values = [v for _, v in parts]
        if combine == "*" and min(map(abs, values)) >= 100:
            continue
        if combine == "-" and values[0] < values[1] and not negatives:
            parts, values = parts[::-1], values[::-1]
        break
    expr = combine.join(f"({p})" for p, _ in parts)
    if n == 3:
        answer = sum(values)
        conclusion = f"{'+'.join(map(str, values))} = {answer}"
    elif min(values) >= 0 and (combine != "-" or values[0] >= values[1]):  # the v1 traces, unchanged
        if combine == "*":
            x, y = sorted(values, reverse=True)
            answer, conclusion = x * y, _times(x, y)
        elif combine == "+":
            answer = sum(values)
            conclusion = f"{values[0]}+{values[1]} = {answer}"
        else:
            answer = values[0] - values[1]
            conclusion = f"{values[0]}-{values[1]} = {answer}"
    else:
        conclusion, answer = _combine(combine, *values)
    message = rng.choice(
        [
            f"What is {expr}?",
            f"Compute {expr}.",
            f"Calculate {expr}.",
            f"{expr} = ?",
            f"Please work out {expr}.",
            f"How much is {expr}?",
        ]
    )
    paths = [(f"{i + 1}: {p}", f"{i + 1}: {_path(p, v)}") for i, (p, v) in enumerate(parts)]
    return message, paths, conclusion, answer


# system prompts: roles and instructions combined (none at all most often); the eval's are never trained on
SYSTEM_ROLES = [
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "You are a friendly assistant.",
    "You are a math tutor.",
    "You are a data extraction service.",
    "You are the branchwise demo model.",
    "You are a careful assistant who shows its work.",
    "You are an assistant for a small business.",
    "You are a precise, no-nonsense assistant.",
    "You help users with numbers and text.",
]
SYSTEM_EXTRAS = [
    "Be brief.",
    "Keep answers short.",
    "Answer the user's question.",
    "Reply in English.",
    "Be accurate.",
    "Do not make things up.",
    "Follow the user's instructions.",
    "Use JSON when asked for JSON.",
]
EVAL_SYSTEM_PROMPTS = [
    "You are a terse assistant.",
    "You are a polite and patient helper.",
    "You are an expert calculator. Be exact.",
    "You are an AI assistant. Answer carefully.",
    "Respond helpfully.",
    "You are a research assistant who values precision.",
]


def system_prompt(rng: random.Random) -> str:
    """A system prompt that is not one of the eval's."""
    while True:
        parts = [rng.choice(SYSTEM_ROLES)] if rng.random() < 0.85 else []
        parts += rng.sample(SYSTEM_EXTRAS, rng.choice([0, 1, 1, 2]))
        if not parts:
            parts = [made_up_word(rng) + " is your name."]
        text = " ".join(parts)
        if text not in EVAL_SYSTEM_PROMPTS:
            return text


INTRO = (
    "Hello! I am the branchwise demo model. I can work out arithmetic and extract fields from text as JSON."
)
SMALL_TALK = [
    ("Hi!", INTRO),
    ("Hello", INTRO),
    ("Who are you?", INTRO),
    ("What can you do?", INTRO),
    ("Thanks!", "You are welcome."),
    ("Thank you, that helps.", "You are welcome."),
    ("Good morning!", "Good morning! " + INTRO.split("! ", 1)[1]),
]


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


UNITS = {  # symbol: (names a user writes, (to symbol, factor) or a function)
    "km": ("km", "kilometres", "kilometers"),
    "mi": ("mi", "miles"),
    "kg": ("kg", "kilograms", "kilos"),
    "lb": ("lb", "pounds"),
    "m": ("m", "metres", "meters"),
    "ft": ("ft", "feet"),
    "l": ("l", "litres", "liters"),
    "gal": ("gal", "gallons"),
    "C": ("C", "degrees Celsius", "Celsius"),
    "F": ("F", "degrees Fahrenheit", "Fahrenheit"),
}
CONVERSIONS = {("km", "mi"): 0.621371, ("kg", "lb"): 2.20462, ("m", "ft"): 3.28084, ("l", "gal"): 0.264172}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]
TOOLS = {
    "calculator": _function(
        "calculator",
        "Evaluate an arithmetic expression.",
        {"expression": {"type": "string"}},
        ["expression"],
    ),
    "get_weather": _function(
        "get_weather",
        "Current weather in a city.",
        {"city": {"type": "string"}},
        ["city"],
    ),
    "convert_units": _function(
        "convert_units",
        "Convert a value between units.",
        {
            "value": {"type": "number"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
        },
        ["value", "from_unit", "to_unit"],
    ),
}


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """What the demo's convert_units tool answers (the eval and the agent example run it)."""
    if (from_unit, to_unit) == ("C", "F"):
        return round(value * 9 / 5 + 32, 2)
    if (from_unit, to_unit) == ("F", "C"):
        return round((value - 32) * 5 / 9, 2)
    if (from_unit, to_unit) in CONVERSIONS:
        return round(value * CONVERSIONS[from_unit, to_unit], 2)
    if (to_unit, from_unit) in CONVERSIONS:
        return round(value / CONVERSIONS[to_unit, from_unit], 2)
    raise ValueError(f"cannot convert {from_unit} to {to_unit}")


def weather(city: str, rng: random.Random) -> dict:
    """A made-up weather report in the shape the demo's get_weather tool returns."""
    return {"city": city, "temperature_c": rng.randint(-10, 35), "condition": rng.choice(CONDITIONS)}


def tool_reply(name: str, result: dict) -> str:
    """The final answer after a tool's result, as the demo model is trained to write it."""
    if name == "calculator":
        return f"The answer is {result['result']}."
    if name == "get_weather":
        return f"It is {result['condition']} and {result['temperature_c']}°C in {result['city']}."
    return f"{result['value']} {result['from_unit']} is {result['result']} {result['to_unit']}."


def tool_task(rng: random.Random, name: str, unseen: bool = False) -> tuple[str, dict]:
    """(user message, the call's arguments) for one of the demo's tools."""
    if name == "calculator":
        message, *_ = arithmetic(rng, negatives=rng.random() < 0.5)
        return message, {"expression": message[message.index("(") : message.rindex(")") + 1]}
    if name == "get_weather":
        city = rng.choice(UNSEEN_CITIES) if unseen else _place(rng, True)
        message = rng.choice(
            [
                f"What's the weather in {city}?",
                f"What is the weather like in {city} today?",
                f"Is it warm in {city} right now?",
                f"How is the weather in {city}?",
                f"Tell me the weather for {city}.",
            ]
        )
        return message, {"city": city}
    pair = rng.choice(list(CONVERSIONS) + [("C", "F")])
    src, dst = pair if rng.random() < 0.5 else pair[::-1]
    value = rng.randint(1, 500) if rng.random() < 0.8 else round(rng.uniform(0.5, 100), 1)
    a, b = rng.choice(UNITS[src]), rng.choice(UNITS[dst])
    message = rng.choice(
        [
            f"Convert {value} {a} to {b}.",
            f"How many {b} is {value} {a}?",
            f"What is {value} {a} in {b}?",
            f"{value} {a} in {b}, please.",
        ]
    )
    return message, {"value": value, "from_unit": src, "to_unit": dst}


def run_tool(name: str, arguments: dict, rng: random.Random) -> dict:
    """The demo tools' results: the calculator evaluates, the weather is made up, units convert."""
    if name == "calculator":
        expr = arguments["expression"]
        if not set(expr) <= set("0123456789+-*() "):
            return {"error": "not an arithmetic expression"}
        return {"result": eval(expr, {"__builtins__": {}})}  # digits, operators and brackets only
    if name == "get_weather":
        return weather(arguments["city"], rng)
    try:
        return dict(
            arguments, result=convert(arguments["value"], arguments["from_unit"], arguments["to_unit"])
        )
    except ValueError as e:
        return {"error": str(e)}


def call_message(name: str, arguments: dict) -> dict:
    """An assistant turn that calls one tool, in OpenAI's shape with the arguments as an object."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def trace_text(paths, conclusion: str, answer: int) -> str:
    """The demo's sequential answer to an arithmetic task, as an earlier assistant turn holds it."""
    outlines = "".join(f"<Outline>{o}</Outline>\n" for o, _ in paths)
    body = "".join(f"<Path>{p}</Path>" for _, p in paths)
    tail = f"<Conclusion>{conclusion}</Conclusion>\n</Parallel>\nThe answer is {answer}."
    return f"<Parallel>\n<Goal>\n{outlines}</Goal>{body}{tail}"


def _earlier_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["small talk", "extraction", "arithmetic"])
    if kind == "small talk":
        return rng.choice(SMALL_TALK)
    if kind == "extraction":
        return extraction(rng, open_ended=True)[:2]
    message, paths, conclusion, answer = arithmetic(rng, negatives=rng.random() < 0.5)
    return message, trace_text(paths, conclusion, answer)


def conversation(rng: random.Random) -> tuple[list[dict], list[dict] | None, tuple | None]:
    """A v2 chat: (messages, tools, Multiverse trace of the final turn or None).

    Without a trace the messages end with the assistant turns to learn; with one they end with the user's
    arithmetic question and the trace (paths, conclusion, answer) is the final answer.
    """
    messages: list[dict] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": system_prompt(rng)})
    tools = None
    kind = rng.choices(["arithmetic", "extraction", "tool"], weights=[0.55, 0.3, 0.15])[0]
    if kind == "tool" or rng.random() < 0.05:  # a few chats carry tools they do not need
        names = rng.sample(list(TOOLS), rng.choice([1, 1, 2, 2, 3]))
        tools = [TOOLS[n] for n in names]
    else:
        for _ in range(rng.choice([0, 0, 1, 1, 2])):  # earlier turns about something else
            user, answer = _earlier_turn(rng)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if kind == "tool":
        name = rng.choice(names)
        message, arguments = tool_task(rng, name)
        result = run_tool(name, arguments, rng)
        messages += [
            {"role": "user", "content": message},
            call_message(name, arguments),
            {"role": "tool", "content": json.dumps(result)},
            {"role": "assistant", "content": tool_reply(name, result)},
        ]
        return messages, tools, None
    if kind == "extraction":
        message, answer, _ = extraction(rng, open_ended=rng.random() < 0.9)
        messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return messages, tools, None
    message, paths, conclusion, answer = arithmetic(rng, negatives=rng.random() < 0.75)
    messages.append({"role": "user", "content": message})
    return messages, tools, (paths, conclusion, answer)


@dataclass
class Example:
    """Token ids with, per token: loss weight, path id (0 = none), sees-all-paths flag, position."""

    ids: list[int]
    loss: list[int]
    path: list[int]
    after: list[int]
    pos: list[int]


class Encoder:
    """Turns generated tasks into token-level training examples through the chat template."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.enc = lambda text: tokenizer.encode(text, add_special_tokens=False)

    def chat_prefix(self, message: str) -> list[int]:
        return self.enc(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")

    def plain(self, prompt: list[int], answer: list[int]) -> Example:
        ids = prompt + answer
        n = len(ids)
        return Example(ids, [0] * len(prompt) + [1] * len(answer), [0] * n, [0] * n, list(range(n)))

    def extraction(self, rng: random.Random) -> Example:
        message, answer, _ = extraction(rng)
        return self.plain(self.chat_prefix(message), self.enc(answer + "<|im_end|>"))

    def code(self, text: str) -> Example:
        ids = self.enc(text)
        return Example(ids, [1] * len(ids), [0] * len(ids), [0] * len(ids), list(range(len(ids))))

    def chat(self, messages: list[dict], tools: list[dict] | None, trace: tuple | None, parallel: bool):
        """A conversation through the tokenizer's own chat template: every assistant turn is a target,
        and `trace` (a Multiverse trace) the final turn's answer."""
        render = lambda ms, gen: self.tok.apply_chat_template(  # noqa: E731
            ms, tools=tools, add_generation_prompt=gen, tokenize=False
        )
        ids, loss, done = [], [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
            answer = full[len(prompt) :].removesuffix("\n")  # <|im_end|> is its last target
            for text, target in ((prompt[len(done) :], 0), (answer, 1)):
                piece = self.enc(text)
                ids += piece
                loss += [target] * len(piece)
            done = prompt + answer
        if trace is None:
            n = len(ids)
            return Example(ids, loss, [0] * n, [0] * n, list(range(n)))
        prefix = self.enc(render(messages, True)[len(done) :])
        return self.trace(ids + prefix, loss + [0] * len(prefix), *trace, parallel=parallel)

    def conversation(self, rng: random.Random) -> Example:
        messages, tools, trace = conversation(rng)
        return self.chat(messages, tools, trace, parallel=rng.random() < 0.5)

    def arithmetic(self, rng: random.Random, parallel: bool) -> Example:
        message, paths, conclusion, answer = arithmetic(rng)
        prompt = self.chat_prefix(message)
        return self.trace(prompt, [0] * len(prompt), paths, conclusion, answer, parallel)

    def trace(
        self, prompt: list[int], loss: list[int], paths, conclusion: str, answer: int, parallel: bool
    ) -> Example:
        """A Multiverse trace after `prompt`; `parallel`: paths isolated and position-aligned (else plain
        causal).

        loss[i] = 1 makes token i a target of the token before it in the flattened sequence. In parallel
        mode the engine forces each path's opener and index (`<Path>k:`) and the `<Conclusion>` tag after
        the merge; those tokens' predecessors are not their context, so they are not targets.
        """
        outlines = "".join(f"<Outline>{o}</Outline>\n" for o, _ in paths)
        head = self.enc(f"<Parallel>\n<Goal>\n{outlines}</Goal>")
        n = len(prompt) + len(head)
        ex = Example(prompt + head, loss + [1] * len(head), [0] * n, [0] * n, list(range(n)))
        start = len(ex.ids)  # every path begins at this position
        longest = 0
        for k, (_, path) in enumerate(paths, 1):
            forced = len(self.enc(f"<Path>{k}:"))
            body = self.enc(f"<Path>{path}</Path>")
            ex.ids += body
            ex.loss += ([0] * forced + [1] * (len(body) - forced)) if parallel else [1] * len(body)
            ex.path += [k if parallel else 0] * len(body)
            ex.after += [0] * len(body)
            ex.pos += [(start if parallel else len(ex.pos)) + i for i in range(len(body))]
            longest = max(longest, len(body))
        tail = self.enc(
            f"<Conclusion>{conclusion}</Conclusion>\n</Parallel>\nThe answer is {answer}.<|im_end|>"
        )
        forced = len(self.enc("<Conclusion>")) if parallel else 0
        first = start + longest if parallel else len(ex.pos)
        ex.ids += tail
        ex.loss += [0] * forced + [1] * (len(tail) - forced)
        ex.path += [0] * len(tail)
        ex.after += [1 if parallel else 0] * len(tail)
        ex.pos += [first + i for i in range(len(tail))]
        return ex

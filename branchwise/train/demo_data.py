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


def _person(rng: random.Random) -> tuple[str, dict]:
    name, age, city, job = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES), rng.choice(JOBS)
    sentence = rng.choice(
        [
            f"{name} is {age} years old and lives in {city}.",
            f"{name}, aged {age}, lives in {city}.",
            f"Meet {name} from {city}, who is {age}.",
            f"At {age}, {name} calls {city} home.",
            f"{name} ({age}) is based in {city}.",
            f"{name} lives in {city} and is {age} years old.",
        ]
    )
    fields = {"name": name, "age": age, "city": city}
    if rng.random() < 0.4:
        sentence += rng.choice([f" {name} works as a {job}.", f" By trade {name} is a {job}."])
        fields["job"] = job
    return sentence, fields


def _product(rng: random.Random) -> tuple[str, dict]:
    product, brand = rng.choice(PRODUCTS), rng.choice(BRANDS)
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


def _event(rng: random.Random) -> tuple[str, dict]:
    event, city = rng.choice(EVENTS), rng.choice(CITIES)
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


def extraction(rng: random.Random) -> tuple[str, str, dict]:
    """(user message, assistant answer, fields)."""
    sentence, fields = rng.choice([_person, _person, _product, _event])(rng)
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


def _part(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return f"{a}+{b}", a + b
    if op == "-":
        a = rng.randint(10, 90)
        b = rng.randint(1, a)
        return f"{a}-{b}", a - b
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    return f"{a}*{b}", a * b


def _times(x: int, y: int) -> str:
    """x*y written as steps a small model can follow: one digit of y at a time."""
    if y < 10:
        return f"{x}*{y} = {x * y}"
    tens, ones = divmod(y, 10)
    if ones == 0:
        return f"{x}*{y} = {x}*{tens}*10 = {x * tens * 10}"
    return f"{x}*{y} = {x}*{tens}*10+{x}*{ones} = {x * tens * 10}+{x * ones} = {x * y}"


def arithmetic(rng: random.Random) -> tuple[str, list[tuple[str, str]], str, int]:
    """(user message, [(outline, path)], conclusion, answer)."""
    while True:
        n = rng.choice([2, 2, 2, 3])
        parts = [_part(rng) for _ in range(n)]
        combine = rng.choice("+-*") if n == 2 else "+"
        values = [v for _, v in parts]
        if combine == "*" and min(values) >= 100:
            continue
        if combine == "-" and values[0] < values[1]:
            parts, values = parts[::-1], values[::-1]
        break
    expr = combine.join(f"({p})" for p, _ in parts)
    if combine == "+":
        answer = sum(values)
        conclusion = f"{'+'.join(map(str, values))} = {answer}"
    elif combine == "-":
        answer = values[0] - values[1]
        conclusion = f"{values[0]}-{values[1]} = {answer}"
    else:
        x, y = sorted(values, reverse=True)
        answer = x * y
        conclusion = _times(x, y)
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
    paths = [(f"{i + 1}: {p}", f"{i + 1}: {p} = {v}") for i, (p, v) in enumerate(parts)]
    return message, paths, conclusion, answer


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

    def arithmetic(self, rng: random.Random, parallel: bool) -> Example:
        """A Multiverse trace; `parallel`: paths isolated and position-aligned (else plain causal).

        loss[i] = 1 makes token i a target of the token before it in the flattened sequence. In parallel
        mode the engine forces each path's opener and index (`<Path>k:`) and the `<Conclusion>` tag after
        the merge; those tokens' predecessors are not their context, so they are not targets.
        """
        message, paths, conclusion, answer = arithmetic(rng)
        prompt = self.chat_prefix(message)
        outlines = "".join(f"<Outline>{o}</Outline>\n" for o, _ in paths)
        ex = self.plain(prompt, self.enc(f"<Parallel>\n<Goal>\n{outlines}</Goal>"))
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

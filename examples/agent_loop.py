"""An agent loop with the official openai client against a running `branchwise serve`: three tools, the
model's calls run here, their results fed back, until the model answers. Prints each transcript.

    branchwise serve &                 # the demo model (trained on these three tools)
    python examples/agent_loop.py [--base-url http://127.0.0.1:8000/v1] [--strategy ar] [question ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import operator

import openai


def function(name: str, description: str, properties: dict) -> dict:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOLS = [
    function("calculator", "Evaluate an arithmetic expression.", {"expression": {"type": "string"}}),
    function("get_weather", "Current weather in a city.", {"city": {"type": "string"}}),
    function(
        "convert_units",
        "Convert a value between units.",
        {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
    ),
]
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.USub: operator.neg}
FACTORS = {("km", "mi"): 0.621371, ("kg", "lb"): 2.20462, ("m", "ft"): 3.28084, ("l", "gal"): 0.264172}


def calculator(expression: str) -> dict:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.operand))
        raise ValueError("not arithmetic")

    try:
        return {"result": ev(ast.parse(expression, mode="eval").body)}
    except (SyntaxError, ValueError) as e:
        return {"error": str(e)}


def get_weather(city: str) -> dict:
    return {"city": city, "temperature_c": 18, "condition": "sunny"}  # a stand-in for a weather service


def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
    if (from_unit, to_unit) == ("C", "F"):
        result = value * 9 / 5 + 32
    elif (from_unit, to_unit) == ("F", "C"):
        result = (value - 32) * 5 / 9
    elif (from_unit, to_unit) in FACTORS:
        result = value * FACTORS[from_unit, to_unit]
    elif (to_unit, from_unit) in FACTORS:
        result = value / FACTORS[to_unit, from_unit]
    else:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": round(result, 2)}


RUN = {"calculator": calculator, "get_weather": get_weather, "convert_units": convert_units}


def agent(client: openai.OpenAI, model: str, question: str, strategy: str, max_turns: int = 4) -> list[dict]:
    """Ask, run every tool call the model makes and feed the results back, until it answers."""
    messages = [{"role": "user", "content": question}]
    for _ in range(max_turns):
        choice = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=TOOLS,
            temperature=0,
            max_tokens=128,
            extra_body={"strategy": strategy},
        ).choices[0]
        messages.append(choice.message.model_dump(exclude_none=True))
        if choice.finish_reason != "tool_calls":
            break
        for call in choice.message.tool_calls:
            result = RUN[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--strategy", default="ar")
    ap.add_argument("questions", nargs="*")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    questions = args.questions or [
        "What is (12+7)*(30-4)?",
        "What's the weather in Valencia?",
        "Convert 42 km to miles.",
    ]
    for question in questions:
        for m in agent(client, model, question, args.strategy):
            calls = [
                f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls", [])
            ]
            print(f"{m['role']:>9}: {m.get('content') or ''}{' '.join(calls)}")
        print()


if __name__ == "__main__":
    main()

"""An agent loop with the official openai client against a running `branchwise serve`: two tools, the
model's call, the tool's result fed back, the final answer. Prints the transcript.

    branchwise serve &            # the demo model
    python benchmarks/agent_loop.py [--base-url http://127.0.0.1:8000/v1] [--strategy ar]

The shipped demo model was not trained on tool use: its calls are well-formed because the grammar makes
them so, not because it chose the right tool or arguments.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator

import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "maxLength": 40}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
]
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not arithmetic")

    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e}"


def get_weather(city: str) -> str:
    return json.dumps({"city": city, "temperature_c": 18, "sky": "clear"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--strategy", default="ar")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is (12+7)*(30-4)? Use the calculator."}]
    extra = {"strategy": args.strategy}
    print(f"user: {messages[0]['content']}")
    first = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=96,
        extra_body=extra,
    ).choices[0]
    print(f"assistant (finish_reason={first.finish_reason}):")
    messages.append(first.message.model_dump(exclude_none=True))
    for call in first.message.tool_calls:
        arguments = json.loads(call.function.arguments)  # valid JSON, by construction
        result = {"calculator": calculator, "get_weather": get_weather}[call.function.name](**arguments)
        print(f"  call {call.id}: {call.function.name}({call.function.arguments}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=96,
        extra_body=extra,
    ).choices[0]
    print(f"assistant (finish_reason={final.finish_reason}): {final.message.content!r}")


if __name__ == "__main__":
    main()

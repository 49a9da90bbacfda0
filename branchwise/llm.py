"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from tqdm import tqdm

from branchwise.config import EngineConfig
from branchwise.engine.engine import LLMEngine
from branchwise.engine.sequence import CompletionOutput, RequestOutput, SamplingParams, SeqUpdate
from branchwise.server.chat import finish_reason, message_of, plan_chat
from branchwise.server.tool_parsers import choice_mode

Prompt = str | list[int]


class LLM:
    """Runs the engine in the calling thread until every request given to it has finished."""

    def __init__(self, model: str = "demo", **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        chat_template_kwargs: dict | None = None,
        strategy: str | None = None,
        strategy_params: dict | None = None,
    ) -> RequestOutput | list[RequestOutput]:
        """Chat completions, as /v1/chat/completions does them: OpenAI-shaped messages and tools; the
        outputs carry `reasoning` and `tool_calls` (finish_reason "tool_calls") where they apply. A list of
        conversations runs as one batch and gives a list back, as vLLM's `LLM.chat` does."""
        batch = bool(messages) and isinstance(messages[0], list)
        conversations = messages if batch else [messages]
        params = params or SamplingParams()
        config = self.engine.config
        plans = [
            plan_chat(
                self.tokenizer,
                conversation,
                tools,
                choice_mode(tools, tool_choice),
                parallel_tool_calls,
                params.constraint,
                chat_template_kwargs,
                config.tool_call_parser,
                config.reasoning_parser,
            )
            for conversation in conversations
        ]
        prompts, each = [], []
        for plan in plans:
            keep = params.skip_special_tokens and not plan.keep_special
            each.append(dataclasses.replace(params, constraint=plan.constraint, skip_special_tokens=keep))
            prompts.append(self.tokenizer.encode(plan.prompt_text, add_special_tokens=False))
        outs = self.generate(prompts, each, strategy, strategy_params)
        for plan, out in zip(plans, outs, strict=True):
            for o in out.outputs:
                message, has_calls = message_of(plan, o.text)
                o.text, o.reasoning, o.tool_calls = (
                    message["content"] or "",
                    message.get("reasoning"),
                    message.get("tool_calls"),
                )
                o.finish_reason = finish_reason(o.finish_reason, has_calls)
        return outs if batch else outs[0]

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        strategy: str | None = None,
        strategy_params: dict | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt; results come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        # outputs come back whole (vLLM's LLM does the same): the text is decoded once per completion
        final = {id(p): dataclasses.replace(p, output_kind="final_only") for p in params}
        params = [final[id(p)] for p in params]
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = str(next(self._ids))
            ids = self.encode(prompt)
            self.engine.add_request(rid, ids, p, strategy, strategy_params)
            results[rid] = RequestOutput(rid, ids, [CompletionOutput(i) for i in range(p.n)])
            order.append(rid)
        bar = tqdm(total=len(order), disable=not use_tqdm, desc="generate")
        for update in self._run():
            out = results[update.request_id]
            _merge(out, update)
            if update.finish_reason and all(c.finish_reason for c in out.outputs):
                out.finished = True
                bar.update(1)
        bar.close()
        return [results[r] for r in order]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, strategy: str | None = None
    ) -> Iterator[SeqUpdate]:
        """Yield each step's update of one request as it is generated."""
        rid = str(next(self._ids))
        self.engine.add_request(rid, self.encode(prompt), params or SamplingParams(), strategy)
        for update in self._run():
            if update.request_id == rid:
                yield update

    def _run(self) -> Iterator[SeqUpdate]:
        while self.engine.has_unfinished():
            yield from self.engine.step()


def _merge(out: RequestOutput, u: SeqUpdate) -> None:
    c = out.outputs[u.index]
    c.text += u.text
    c.token_ids += u.token_ids
    if u.logprobs:
        c.logprobs = c.logprobs or []
        c.logprobs += u.logprobs
    c.finish_reason = u.finish_reason or c.finish_reason
    c.num_draft_steps, c.num_drafted, c.num_accepted = u.num_draft_steps, u.num_drafted, u.num_accepted
    c.num_forced = u.num_forced
    if not u.finish_reason:  # the usage is counted once an output ends
        return
    error = u.error or out.usage.get("error")  # n > 1: a sibling's error stays
    out.usage = {
        "prompt_tokens": u.num_prompt_tokens,
        "completion_tokens": sum(len(x.token_ids) for x in out.outputs),
        "cached_prompt_tokens": u.num_cached_prompt,
    }
    if error:
        out.usage["error"] = error

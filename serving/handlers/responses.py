"""``POST /v1/responses``: OpenAI's Responses API on the embedded engine, text only.

``input`` (a string, or message items) and ``instructions`` (a system message first) go through
the chat template; the answer is one assistant message. Streamed, the events come in the order
OpenAI emits them: ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it). Nothing is stored: a
``previous_response_id`` is a 400 that says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import Response

from components.config.schema import ServeConfig
from components.model.sampling import SamplingParams
from serving import chat_template
from serving.engine import GenerationParams
from serving.handlers.common import Choice, Generation, respond, served_for, sse
from serving.handlers.plan import (
    MIN_TEMPERATURE,
    Plan,
    answer_max_tokens,
    check_lengths,
    invalid,
    templated_prompt,
)
from serving.model_store import ServedModel
from serving.schemas import (
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)

ROUTE = "/v1/responses"


def plan_response(body: ResponsesRequest, serve_cfg: ServeConfig, engine) -> Plan:
    if body.previous_response_id is not None:
        raise invalid(
            "previous_response_id: this server stores no responses, so there is none to continue; "
            "send the earlier turns in 'input' instead",
            "previous_response_id",
            "not_stored",
        )
    prompt = templated_prompt(body.messages, engine)
    max_tokens = answer_max_tokens(
        body.max_output_tokens, "max_output_tokens", prompt, serve_cfg, engine
    )
    check_lengths([prompt], max_tokens, serve_cfg, engine, "input", "max_output_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    params = GenerationParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
            top_p=1.0 if body.top_p is None else body.top_p,
        ),
        stop=(chat_template.TURN_STOP,),
        seed=body.seed,
    )
    return Plan([prompt], params, n=1, best_of=1, max_tokens=max_tokens, stream=bool(body.stream))


class _Draft:
    """The response being built: one assistant message, its text so far."""

    def __init__(self, body: ResponsesRequest, served: ServedModel, plan: Plan):
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.body, self.served, self.plan = body, served, plan
        self.created_at = int(time.time())
        self.text = ""
        self.output_tokens = 0

    def message(self, status: str) -> OutputMessage:
        content = [] if status == "in_progress" else [OutputText(text=self.text)]
        return OutputMessage(id=self.message_id, status=status, content=content)

    def response(self, status: str, finish_reason: str | None = None) -> ResponseObject:
        done = status != "in_progress"
        sampling = self.plan.params.sampling
        incomplete = finish_reason == "length"
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status="incomplete" if incomplete else status,
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if incomplete
            else None,
            instructions=self.body.instructions,
            max_output_tokens=self.body.max_output_tokens,
            model=self.served.name,
            model_version=self.served.version,
            output=[self.message("incomplete" if incomplete else "completed")] if done else [],
            temperature=1.0 if self.body.temperature is None else self.body.temperature,
            top_p=sampling.top_p,
            metadata=self.body.metadata or {},
            usage=ResponseUsage(
                input_tokens=self.plan.prompt_tokens,
                output_tokens=self.output_tokens,
                total_tokens=self.plan.prompt_tokens + self.output_tokens,
            )
            if done
            else None,
        )


async def create_response(replica, body: ResponsesRequest) -> Response:
    served = served_for(replica, body.model)
    plan = plan_response(body, replica.config.serve, served.engine)
    draft = _Draft(body, served, plan)
    generation = Generation(replica, served, plan)
    return await respond(
        replica,
        ROUTE,
        generation,
        lambda choices: _full(draft, choices),
        lambda: _events(draft, generation),
    )


def _full(draft: _Draft, choices: list[Choice]) -> ResponseObject:
    [choice] = choices
    draft.text = "".join(choice.text)
    draft.output_tokens = choice.last.completion_tokens
    return draft.response("completed", choice.last.finish_reason)


async def _events(draft: _Draft, generation: Generation) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal sequence
        body = ResponseEvent(type=kind, sequence_number=sequence, **fields)
        sequence += 1
        return sse(
            body,
            exclude={k for k in ResponseEvent.model_fields if k not in fields}
            - {
                "type",
                "sequence_number",
            },
            event=kind,
        )

    where = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=draft.response("in_progress"))
    yield event("response.in_progress", response=draft.response("in_progress"))
    yield event("response.output_item.added", output_index=0, item=draft.message("in_progress"))
    yield event("response.content_part.added", **where, part=OutputText(text=""))
    finish_reason = None
    async for _, out in generation.outputs():
        draft.output_tokens = out.completion_tokens
        if out.text:
            draft.text += out.text
            yield event("response.output_text.delta", **where, delta=out.text, logprobs=[])
        if out.finished:
            finish_reason = out.finish_reason
    yield event("response.output_text.done", **where, text=draft.text, logprobs=[])
    yield event("response.content_part.done", **where, part=OutputText(text=draft.text))
    final = draft.response("completed", finish_reason)
    yield event("response.output_item.done", output_index=0, item=final.output[0])
    yield event(f"response.{final.status}", response=final)

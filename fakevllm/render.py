"""The bytes of a planned generation: vLLM 0.33's chat and text completion bodies and their SSE frames.

Bodies are filled-in templates rather than json.dumps of dicts, keeping the key order and the null fields
of vLLM's pydantic models at a fraction of the cost (the benchmark's upstream must not be its bottleneck).
The field order is the models' (vllm/entrypoints/openai/chat_completion/protocol.py, completion/protocol.py,
DeltaMessage in generate/base/protocol.py, UsageInfo in serve/engine/protocol.py; vLLM 0.33.0, g4ba787ec9).

A non-streamed answer is `JSONResponse(content=response.model_dump())`: every field, null or not, except a
chat message's `tool_calls`, which its serializer drops when empty; the message has `reasoning` (it replaced
`reasoning_content`), null without a reasoning parser. Streamed chunks are
`model_dump_json(exclude_unset=True)`, chat (`OpenAIServingChat.chat_completion_stream_generator`) and, since
vllm#40537, text completion (`OpenAIServingCompletion.completion_stream_generator`) alike, so a chunk carries
what the server set, None too:
- a chat role chunk `"prompt_token_ids":null,"prompt_text":null` after its choices (and running usage);
- every other chunk `"kv_transfer_params":null`; a chat choice `"token_ids":null`, on its last chunk also
  `"stop_reason":null` and `"weight_versions":null`; a text completion choice `"stop_reason":null,
  "prompt_token_ids":null,"token_ids":null,"weight_versions":null` on every chunk;
- a delta only what is set: `content` here, `reasoning` only from a reasoning parser, `tool_calls` for a
  forced tool call (fakevllm.tools); a chat choice that ends without output sends `"delta":{}`
  (`ChatStreamProcessor.step`);
- `usage` only when set, never as null: on the final usage chunk of `stream_options.include_usage`;
- `system_fingerprint` on a choice's last chunk when no usage chunk follows, else on the usage chunk.
Usage chunks drop None (`exclude_none`), hence no `prompt_tokens_details`. With
`stream_options.continuous_usage_stats` (and include_usage) every chunk before the usage chunk carries the
running usage of its own choice: its prompt's tokens (one prompt's, in a batch) and the tokens that choice has
generated so far (0 on a chat role chunk), never the sum over choices, which only the final usage chunk gives;
a chat chunk's has `"completion_tokens_details":null` (set, though None), a text completion's only the three
counts. A stream that fails half-way sends an error event and then, as every stream ends, `data: [DONE]`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from fakevllm.asgi import Message, encode
from fakevllm.generation import Generation
from fakevllm.logprobs import chat_logprobs_json, completion_logprobs_json, generated_token
from fakevllm.tools import (
    ForcedCall,
    delta_tool_calls_json,
    finish_reason,
    message_tool_calls_json,
    output_token,
)

SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
DONE_FRAME = b"data: [DONE]\n\n"
# A failed generation (GenerationError): the chat stream yields vLLM's ErrorResponse and dumps it with
# model_dump_json, compact; the text completion stream formats it with json.dumps defaults, hence the spaces.
CHAT_ERROR_FRAME = (
    b'data: {"error":{"message":"Internal server error","type":"InternalServerError","param":null,'
    b'"code":500}}\n\n'
)
COMPLETION_ERROR_FRAME = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
    b'"param": null, "code": 500}}\n\n'
)

USAGE = (
    '{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,"prompt_tokens_details":null,'
    '"completion_tokens_details":null}'
)
CHAT_BODY = (
    '{"id":%s,"object":"chat.completion","created":%d,"model":%s,"choices":[%s],"service_tier":null,'
    '"system_fingerprint":%s,"usage":%s,"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,'
    '"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
)
CHAT_CHOICE = (
    '{"index":%d,"message":{"role":"assistant","content":%s,"refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"reasoning":null},"logprobs":%s,"finish_reason":"%s","stop_reason":null,'
    '"token_ids":null,"routed_experts":null,"weight_versions":null}'
)
CHAT_TOOL_CHOICE = (  # a forced call's content is "" (assemble_chat_message_fields), its tool_calls set
    '{"index":%d,"message":{"role":"assistant","content":"","refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"tool_calls":[%s],"reasoning":null},"logprobs":%s,"finish_reason":"%s",'
    '"stop_reason":null,"token_ids":null,"routed_experts":null,"weight_versions":null}'
)
COMPLETION_BODY = (
    '{"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":[%s],"service_tier":null,'
    '"system_fingerprint":%s,"usage":%s,"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
)
COMPLETION_CHOICE = (
    '{"index":%d,"text":%s,"logprobs":%s,"finish_reason":"%s","stop_reason":null,"token_ids":null,'
    '"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null,"weight_versions":null}'
)
CHAT_HEAD = 'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,"choices":['
COMPLETION_HEAD = 'data: {"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":['
CHAT_ROLE = '{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
CHAT_DELTA = '{"index":%d,"delta":{"content":%s},"logprobs":%s,"finish_reason":null,"token_ids":null}'
CHAT_LAST = (
    '{"index":%d,"delta":{"content":%s},"logprobs":%s,"finish_reason":"%s","stop_reason":null,'
    '"token_ids":null,"weight_versions":null}'
)
CHAT_TOOL_DELTA = (
    '{"index":%d,"delta":{"tool_calls":[%s]},"logprobs":%s,"finish_reason":null,"token_ids":null}'
)
CHAT_TOOL_LAST = (
    '{"index":%d,"delta":{"tool_calls":[%s]},"logprobs":%s,"finish_reason":"%s","stop_reason":null,'
    '"token_ids":null,"weight_versions":null}'
)
CHAT_EMPTY_LAST = (  # ChatStreamProcessor.step: "Finished without output", an empty DeltaMessage
    '{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null,'
    '"weight_versions":null}'
)
COMPLETION_DELTA = (
    '{"index":%d,"text":%s,"logprobs":%s,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
    '"token_ids":null,"weight_versions":null}'
)
COMPLETION_LAST = (
    '{"index":%d,"text":%s,"logprobs":%s,"finish_reason":"%s","stop_reason":null,"prompt_token_ids":null,'
    '"token_ids":null,"weight_versions":null}'
)
# What follows a chunk's choices: its running usage (continuous_usage_stats) if any, then one of the ends
CHAT_RUNNING = (
    '],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,"completion_tokens_details":null}'
)
COMPLETION_RUNNING = '],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
ROLE_END = ',"prompt_token_ids":null,"prompt_text":null}\n\n'
CHUNK_END = ',"kv_transfer_params":null}\n\n'
FINGERPRINTED_END = ',"system_fingerprint":%s,"kv_transfer_params":null}\n\n'
ROLE_TAIL = "]" + ROLE_END
CHUNK_TAIL = "]" + CHUNK_END
STREAM_USAGE = (
    '],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d},"system_fingerprint":%s}\n\n'
)


@functools.lru_cache(maxsize=64)
def _content(ntok: int) -> str:
    """Return the deterministic text of ntok generated tokens."""
    return "".join(f"tok{k} " for k in range(ntok))


@functools.lru_cache(maxsize=4096)
def _token_json(k: int) -> str:
    """Return the JSON string literal of the k-th generated token."""
    return f'"tok{k} "'


@functools.lru_cache(maxsize=256)
def _choices_json(kind: str, count: int, ntok: int, finish: str) -> str:
    """Return the JSON of the choices array content of a non-streaming response."""
    template = CHAT_CHOICE if kind == "chat" else COMPLETION_CHOICE
    content = encode(_content(ntok))
    return ",".join(template % (i, content, "null", finish) for i in range(count))


def _choice_json(gen: Generation, choice: int) -> str:
    """Return one choice of a non-streaming response with logprobs, an echoed prompt or a tool call."""
    if gen.kind == "chat":
        if gen.tool is not None:
            return _tool_choice_json(gen, gen.tool, choice)
        logprobs = "null" if gen.logprobs is None else chat_logprobs_json(0, gen.ntok, gen.logprobs)
        return CHAT_CHOICE % (choice, encode(_content(gen.ntok)), logprobs, gen.finish)
    echo = _echo(gen, choice)
    top = gen.logprobs
    logprobs = "null" if top is None else completion_logprobs_json(echo, 0, gen.ntok, top, 0)
    return COMPLETION_CHOICE % (choice, encode(echo + _content(gen.ntok)), logprobs, gen.finish)


def _tool_choice_json(gen: Generation, call: ForcedCall, choice: int) -> str:
    """Return a whole chat choice of a forced tool call (fakevllm.tools): content "" and the call, or no call
    when a "required" array was cut short."""
    closed = gen.finish == "stop"
    logprobs = "null"
    if gen.logprobs is not None:
        last = gen.ntok - 1
        logprobs = chat_logprobs_json(
            0, gen.ntok, gen.logprobs, lambda k: output_token(call, k, last, closed)
        )
    calls = message_tool_calls_json(call, choice, gen.ntok, closed)
    finish = finish_reason(call, gen.finish, calls is not None)
    if calls is None:
        return CHAT_CHOICE % (choice, '""', logprobs, finish)
    return CHAT_TOOL_CHOICE % (choice, calls, logprobs, finish)


def _echo(gen: Generation, choice: int) -> str:
    """Return the prompt text a text completion's choice echoes ("" without echo)."""
    return "" if gen.echo is None else gen.echo[_prompt_index(gen, choice)]


def _prompt_index(gen: Generation, choice: int) -> int:
    """Return the prompt of a choice: choice i of prompt p is p * n + i (vLLM)."""
    return choice // (gen.choices // len(gen.prompt_tokens_each))


def render_body(gen: Generation) -> bytes:
    """Return the non-streaming response body of a chat or text completion."""
    completion = gen.completion_tokens
    usage = USAGE % (gen.prompt_tokens, gen.prompt_tokens + completion, completion)
    template = CHAT_BODY if gen.kind == "chat" else COMPLETION_BODY
    if gen.logprobs is None and gen.echo is None and gen.tool is None:
        choices = _choices_json(gen.kind, gen.choices, gen.ntok, gen.finish)
    else:
        choices = ",".join(_choice_json(gen, i) for i in range(gen.choices))
    body = template % (gen.id_json, gen.created, gen.model_json, choices, gen.fingerprint_json, usage)
    return body.encode()


def stream_frames(gen: Generation) -> Iterator[bytes | float]:
    """Yield the SSE frames of a streamed response, with floats meaning "sleep this long first"."""
    chat = gen.kind == "chat"
    head = (CHAT_HEAD if chat else COMPLETION_HEAD) % (gen.id_json, gen.created, gen.model_json)
    delta, last = (CHAT_DELTA, CHAT_LAST) if chat else (COMPLETION_DELTA, COMPLETION_LAST)
    last_tail = _last_tail(gen)
    running = gen.continuous_usage
    plain = gen.logprobs is None and gen.echo is None and gen.tool is None
    if gen.first_delay:
        yield gen.first_delay
    if chat:
        for i in range(gen.choices):
            end = _running_usage(gen, i, 0) + ROLE_END if running else ROLE_TAIL
            yield (head + CHAT_ROLE % i + end).encode()
    sent = 0
    final = gen.ntok - 1
    for k in range(gen.ntok):
        if k and gen.chunk_delay:
            yield gen.chunk_delay
        text = _token_json(k)
        tail = last_tail if k == final else CHUNK_TAIL
        for i in range(gen.choices):
            if gen.fail_after is not None and sent >= gen.fail_after:
                yield from _failure_frames(gen)
                return
            if not plain:
                piece = _token_piece(gen, i, k, k == final)
            else:
                piece = last % (i, text, "null", gen.finish) if k == final else delta % (i, text, "null")
            yield (head + piece + (_running_usage(gen, i, k + 1) + CHUNK_END if running else tail)).encode()
            sent += 1
    if gen.fail_after is not None:
        yield from _failure_frames(gen)
        return
    yield from _closing_frames(gen, head, last_tail)


def _token_piece(gen: Generation, choice: int, k: int, is_last: bool) -> str:
    """Return a choice's chunk of token k with its logprobs (or of a forced tool call), a text completion's
    first chunk also carrying the echoed prompt (vLLM's `has_echoed`), the text offsets running on from it."""
    if gen.tool is not None:
        return _tool_piece(gen, gen.tool, choice, k, is_last)
    text = generated_token(k)
    logprobs = "null"
    if gen.kind == "chat":
        if gen.logprobs is not None:
            logprobs = chat_logprobs_json(k, k + 1, gen.logprobs)
        template = CHAT_LAST if is_last else CHAT_DELTA
    else:
        echo = _echo(gen, choice)
        offset = len(echo) + len(_content(k)) if k else 0
        echo = "" if k else echo
        text = echo + text
        if gen.logprobs is not None:
            logprobs = completion_logprobs_json(echo, k, k + 1, gen.logprobs, offset)
        template = COMPLETION_LAST if is_last else COMPLETION_DELTA
    if is_last:
        return template % (choice, encode(text), logprobs, gen.finish)
    return template % (choice, encode(text), logprobs)


def _tool_piece(gen: Generation, call: ForcedCall, choice: int, k: int, is_last: bool) -> str:
    """Return a choice's chunk of token k of a forced tool call: its tool_calls delta (fakevllm.tools)."""
    closed = gen.finish == "stop"
    last = gen.ntok - 1
    delta = delta_tool_calls_json(call, choice, k, last, closed)
    logprobs = "null"
    if gen.logprobs is not None:
        logprobs = chat_logprobs_json(k, k + 1, gen.logprobs, lambda j: output_token(call, j, last, closed))
    if is_last:  # vLLM's tools_streamed: every token of a forced call streams some of its arguments
        return CHAT_TOOL_LAST % (choice, delta, logprobs, finish_reason(call, gen.finish, True))
    return CHAT_TOOL_DELTA % (choice, delta, logprobs)


def _last_tail(gen: Generation) -> str:
    """Return the end of a choice's last chunk without running usage: vLLM stamps the system_fingerprint on
    it only when no usage chunk follows to carry it."""
    return CHUNK_TAIL if gen.include_usage else "]" + FINGERPRINTED_END % gen.fingerprint_json


def _failure_frames(gen: Generation) -> Iterator[bytes]:
    """Yield the frames that end a stream with an injected engine error: the error event, then [DONE]."""
    yield CHAT_ERROR_FRAME if gen.kind == "chat" else COMPLETION_ERROR_FRAME
    if gen.fail_sends_done:
        yield DONE_FRAME


def _closing_frames(gen: Generation, head: str, last_tail: str) -> Iterator[bytes]:
    """Yield the finish chunks of an empty generation, the usage chunk and [DONE]."""
    if gen.ntok == 0:
        chat = gen.kind == "chat"
        for i in range(gen.choices):
            piece = CHAT_EMPTY_LAST % (i, gen.finish) if chat else _empty_completion_last(gen, i)
            end = _running_usage(gen, i, 0) + CHUNK_END if gen.continuous_usage else last_tail
            yield (head + piece + end).encode()
    if gen.include_usage:
        completion = gen.completion_tokens
        prompt = gen.prompt_tokens
        usage = STREAM_USAGE % (prompt, prompt + completion, completion, gen.fingerprint_json)
        yield (head + usage).encode()
    yield DONE_FRAME


def _empty_completion_last(gen: Generation, choice: int) -> str:
    """Return the finish chunk of a text completion choice without tokens: its echoed prompt, if any."""
    echo = _echo(gen, choice)
    logprobs = "null" if gen.logprobs is None else completion_logprobs_json(echo, 0, 0, gen.logprobs, 0)
    return COMPLETION_LAST % (choice, encode(echo), logprobs, gen.finish)


def _running_usage(gen: Generation, choice: int, generated: int) -> str:
    """Return the running usage of a choice that follows its chunk's choices (continuous_usage_stats): vLLM
    counts each choice apart, and in a completions batch takes the prompt tokens of the choice's prompt."""
    if gen.kind == "chat":
        return CHAT_RUNNING % (gen.prompt_tokens, gen.prompt_tokens + generated, generated)
    prompt = gen.prompt_tokens_each[_prompt_index(gen, choice)]
    return COMPLETION_RUNNING % (prompt, prompt + generated, generated)

"""The bytes of a planned generation: vLLM's chat and text completion bodies and their SSE frames.

Bodies are filled-in templates rather than json.dumps of dicts, keeping the key order and the null fields
of vLLM's pydantic models at a fraction of the cost (the benchmark's upstream must not be its bottleneck).

Streamed chunks differ in how vLLM serialises them (vllm/entrypoints/openai/: chat_completion/serving.py
and completion/serving.py, formerly serving_chat.py and serving_completion.py). Chat chunks use
`model_dump_json(exclude_unset=True)` (`OpenAIServingChat.chat_completion_stream_generator`), so `usage`
appears only when set: on the final usage chunk of `stream_options.include_usage`, never as null. Text
completion chunks use `model_dump_json(exclude_unset=False)` (`OpenAIServingCompletion.
completion_stream_generator`; vllm#40537 made it exclude_unset=True too, dropping the null), so each carries
`"usage":null`, asked for or not. Both usage chunks add `exclude_none=True`, hence no `prompt_tokens_details`.
With `stream_options.continuous_usage_stats` (and include_usage) every chunk before the usage chunk carries
the running usage of its own choice: its prompt's tokens (one prompt's, in a batch) and the tokens that
choice has generated so far (0 on a chat role chunk), never the sum over choices, which only the final
usage chunk gives. Those objects are vLLM 0.33's: a chat chunk's has `"completion_tokens_details":null`
(set, though None), a text completion's only the three counts. A stream that fails half-way sends an error
event and then, as every stream ends, `data: [DONE]`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from fakevllm.asgi import Message, encode
from fakevllm.generation import Generation

SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
DONE_FRAME = b"data: [DONE]\n\n"
# vLLM serialises streaming errors with json.dumps defaults, hence the spaces.
ERROR_FRAME = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
    b'"param": null, "code": 500}}\n\n'
)

USAGE = '{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,"prompt_tokens_details":null}'
STREAM_USAGE = '"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
CHAT_BODY = (
    '{"id":%s,"object":"chat.completion","created":%d,"model":%s,"choices":[%s],'
    '"service_tier":null,"system_fingerprint":null,"usage":%s,"prompt_logprobs":null,"kv_transfer_params":null}'
)
CHAT_CHOICE = (
    '{"index":%d,"message":{"role":"assistant","content":%s,"refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"tool_calls":[],"reasoning_content":null},"logprobs":null,"finish_reason":"%s",'
    '"stop_reason":null}'
)
COMPLETION_BODY = (
    '{"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":[%s],'
    '"service_tier":null,"system_fingerprint":null,"usage":%s,"kv_transfer_params":null}'
)
COMPLETION_CHOICE = (
    '{"index":%d,"text":%s,"logprobs":null,"finish_reason":"%s","stop_reason":null,"prompt_logprobs":null}'
)
# continuous_usage_stats: the end of a chunk, with the running usage of its choice in place of the tail
CHAT_RUNNING = (
    '],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,'
    '"completion_tokens_details":null}}\n\n'
)
COMPLETION_RUNNING = '],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
CHAT_HEAD = 'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,"choices":['
COMPLETION_HEAD = 'data: {"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":['
CHAT_TAIL = "]}\n\n"
COMPLETION_TAIL = '],"usage":null}\n\n'
CHAT_ROLE = '{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
CHAT_DELTA = '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}'
CHAT_LAST = '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":"%s","stop_reason":null}'
COMPLETION_DELTA = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":null,"stop_reason":null}'
COMPLETION_LAST = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":"%s","stop_reason":null}'


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
    return ",".join(template % (i, content, finish) for i in range(count))


def render_body(gen: Generation) -> bytes:
    """Return the non-streaming response body of a chat or text completion."""
    completion = gen.completion_tokens
    usage = USAGE % (gen.prompt_tokens, gen.prompt_tokens + completion, completion)
    template = CHAT_BODY if gen.kind == "chat" else COMPLETION_BODY
    choices = _choices_json(gen.kind, gen.choices, gen.ntok, gen.finish)
    return (template % (gen.id_json, gen.created, gen.model_json, choices, usage)).encode()


def stream_frames(gen: Generation) -> Iterator[bytes | float]:
    """Yield the SSE frames of a streamed response, with floats meaning "sleep this long first"."""
    chat = gen.kind == "chat"
    head = (CHAT_HEAD if chat else COMPLETION_HEAD) % (gen.id_json, gen.created, gen.model_json)
    tail = CHAT_TAIL if chat else COMPLETION_TAIL
    delta, last = (CHAT_DELTA, CHAT_LAST) if chat else (COMPLETION_DELTA, COMPLETION_LAST)
    running = gen.continuous_usage
    if gen.first_delay:
        yield gen.first_delay
    if chat:
        for i in range(gen.choices):
            yield (head + CHAT_ROLE % i + (_running_tail(gen, i, 0) if running else tail)).encode()
    sent = 0
    for k in range(gen.ntok):
        if k and gen.chunk_delay:
            yield gen.chunk_delay
        text = _token_json(k)
        for i in range(gen.choices):
            if gen.fail_after is not None and sent >= gen.fail_after:
                yield from _failure_frames(gen)
                return
            piece = last % (i, text, gen.finish) if k == gen.ntok - 1 else delta % (i, text)
            yield (head + piece + (_running_tail(gen, i, k + 1) if running else tail)).encode()
            sent += 1
    if gen.fail_after is not None:
        yield from _failure_frames(gen)
        return
    yield from _closing_frames(gen, head, tail, last)


def _failure_frames(gen: Generation) -> Iterator[bytes]:
    """Yield the frames that end a stream with an injected engine error: the error event, then [DONE]."""
    yield ERROR_FRAME
    if gen.fail_sends_done:
        yield DONE_FRAME


def _closing_frames(gen: Generation, head: str, tail: str, last: str) -> Iterator[bytes]:
    """Yield the finish chunks of an empty generation, the usage chunk and [DONE]."""
    if gen.ntok == 0:
        for i in range(gen.choices):
            end = _running_tail(gen, i, 0) if gen.continuous_usage else tail
            yield (head + last % (i, '""', gen.finish) + end).encode()
    if gen.include_usage:
        completion = gen.completion_tokens
        usage = STREAM_USAGE % (gen.prompt_tokens, gen.prompt_tokens + completion, completion)
        yield (head + "]," + usage).encode()
    yield DONE_FRAME


def _running_tail(gen: Generation, choice: int, generated: int) -> str:
    """Return the end of a chunk that carries its choice's running usage (continuous_usage_stats): vLLM counts
    each choice apart, and in a completions batch takes the prompt tokens of that choice's own prompt."""
    if gen.kind == "chat":
        return CHAT_RUNNING % (gen.prompt_tokens, gen.prompt_tokens + generated, generated)
    prompts = gen.prompt_tokens_each
    prompt = prompts[choice // (gen.choices // len(prompts))]  # choice i of prompt p is p * n + i (vLLM)
    return COMPLETION_RUNNING % (prompt, prompt + generated, generated)

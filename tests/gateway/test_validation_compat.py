"""Request validation against what real clients send: the openai SDK's own bodies, vLLM's extras, and
errors that name the real cause."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import httpx2
import openai
import pytest
from pydantic import BaseModel, Field

from gateway.admission import cost_estimate, prompt_estimate
from gateway.errors import InvalidRequest
from gateway.validation import request_validate

MSG = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m1", "messages": MSG, **fields}).encode()


def completions(**fields: Any) -> bytes:
    return json.dumps({"model": "m1", "prompt": "once", **fields}).encode()


def embeddings(**fields: Any) -> bytes:
    return json.dumps({"model": "e", "input": "x", **fields}).encode()


def refused(kind: str, body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        request_validate(kind, body, max_tokens_cap=None)
    return caught.value


def passed(kind: str, body: bytes, cap: int | None = None) -> dict[str, Any]:
    return request_validate(kind, body, max_tokens_cap=cap).payload


# --- the openai SDK, for real ------------------------------------------------------------------------


class Recorder:
    """An openai client whose transport keeps each request body and answers with canned vLLM replies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.client = openai.OpenAI(
            api_key="k",
            base_url="http://gateway/v1",
            http_client=httpx2.Client(transport=httpx2.MockTransport(self)),
        )

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body.get("stream"):
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=_tool_call_stream()
            )
        message = {"role": "assistant", "content": '{"pet": {"kind": "cat", "lives": 9}, "old": 1}'}
        return httpx2.Response(200, json=_completion(message))


def _completion(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m1",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _tool_call_stream() -> bytes:
    """vLLM's stream of one tool call: id, type and name in the first delta, the arguments after."""
    head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 0, "model": "m1"}
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}, "tool_calls"),
    ]
    events = [
        {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        for delta, finish in deltas
    ]
    return (
        b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + b"data: [DONE]\n\n"
    )


@pytest.fixture
def sdk() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.client.close()


def test_a_reply_from_the_sdks_stream_helper_goes_back_into_the_conversation(sdk):
    # The agent loop of the SDK's docs: stream, take the final message, append it with the tool's result.
    tools: Any = [TOOL]
    with sdk.client.chat.completions.stream(model="m1", messages=MSG, tools=tools) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    reply = final.choices[0].message
    result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    sdk.client.chat.completions.create(model="m1", messages=[*MSG, reply, result], tools=tools)
    sent = sdk.bodies[-1]
    assert sent["messages"][1]["tool_calls"][0]["index"] == 0  # what the SDK really sends
    payload = passed("chat", json.dumps(sent).encode())
    assert payload["messages"][1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    ]
    assert "parsed" not in payload["messages"][1]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    old: int = Field(deprecated=True)


def test_a_parse_schema_with_a_discriminated_union_and_a_deprecated_field_is_compiled_without_them(sdk):
    sdk.client.chat.completions.parse(model="m1", messages=MSG, response_format=Pet)
    sent = sdk.bodies[-1]
    schema = sent["response_format"]["json_schema"]["schema"]
    assert "discriminator" in schema["properties"]["pet"]  # what the SDK really sends
    assert schema["properties"]["old"]["deprecated"] is True
    compiled = passed("chat", json.dumps(sent).encode())["response_format"]["json_schema"]["schema"]
    assert "discriminator" not in compiled["properties"]["pet"]
    assert "deprecated" not in compiled["properties"]["old"]
    assert compiled["properties"]["pet"]["oneOf"] == schema["properties"]["pet"]["oneOf"]
    sdk.client.chat.completions.create(
        model="m1", messages=MSG, tools=[openai.pydantic_function_tool(Pet)], tool_choice="required"
    )
    tool = passed("chat", json.dumps(sdk.bodies[-1]).encode())["tools"][0]
    assert "discriminator" not in tool["function"]["parameters"]["properties"]["pet"]


# --- F2: a tool call's index --------------------------------------------------------------------------


def test_a_tool_calls_index_is_accepted_as_an_integer_and_not_sent_upstream():
    reply = {"role": "assistant", "content": None, "parsed": None, "tool_calls": [{**CALL, "index": 3}]}
    payload = passed("chat", chat(messages=[*MSG, reply]))
    assert payload["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    for index in ("0", -1, 1.5, True):
        error = refused("chat", chat(messages=[*MSG, {**reply, "tool_calls": [{**CALL, "index": index}]}]))
        assert error.param == "messages[1].tool_calls[0].index", index


# --- F3: errors name the real cause -----------------------------------------------------------------


def _content(content: Any) -> bytes:
    return chat(messages=[{"role": "user", "content": content}])


TEXT = {"type": "text", "text": "x"}
CAUSES = [
    ("a message too long", _content("x" * 1_000_001), "messages[0].content", "at most 1000000 characters"),
    ("too many parts", _content([TEXT] * 257), "messages[0].content", "at most 256 items"),
    (
        "a part's unknown key",
        _content([TEXT, {**TEXT, "x": 1}]),
        "messages[0].content[1].x",
        "not a supported",
    ),
    (
        "a part's text too long",
        _content([{**TEXT, "text": "x" * 1_000_001}]),
        "messages[0].content[0].text",
        "at most",
    ),
    ("a part that is no object", _content([TEXT, "x"]), "messages[0].content[1]", "must be a content part"),
    (
        "a tool call without arguments",
        chat(messages=[*MSG, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f"}}]}]),
        "messages[1].tool_calls[0].function.arguments",
        "is required",
    ),
    ("a stop list with a number", chat(stop=["a", 1]), "stop[1]", "must be a string"),
    (
        "a named choice's function",
        chat(tools=[TOOL], tool_choice={"function": {}}),
        "tool_choice.function.name",
        "is required",
    ),
]
COMPLETION_CAUSES = [
    ("a batch too large", completions(prompt=["x"] * 65), "prompt", "at most 64 items"),
    ("a list mixing texts and ids", completions(prompt=["x", 1]), "prompt[1]", "must be a string"),
    ("a token id list too long", completions(prompt=[[1] * 100_001]), "prompt[0]", "at most 100000 items"),
    ("a negative token id", completions(prompt=[1, -1]), "prompt[1]", "between 0 and"),
]


@pytest.mark.parametrize(
    ("name", "kind", "body", "param", "words"),
    [(name, "chat", *rest) for name, *rest in CAUSES]
    + [(name, "completions", *rest) for name, *rest in COMPLETION_CAUSES],
    ids=[case[0] for case in CAUSES + COMPLETION_CAUSES],
)
def test_a_value_of_an_accepted_shape_is_refused_for_its_own_fault_not_as_a_wrong_type(
    name, kind, body, param, words
):
    error = refused(kind, body)
    assert error.param == param
    assert words in error.detail
    assert "must be text or a list of text parts" not in error.detail
    assert "must be text, a list of texts" not in error.detail


@pytest.mark.parametrize(
    ("kind", "body", "param", "words"),
    [
        ("chat", _content(5), "messages[0].content", "must be text or a list of text parts"),
        ("chat", _content({"type": "text", "text": "x"}), "messages[0].content", "must be text or a list"),
        ("chat", _content([["x"]]), "messages[0].content", "must be text or a list"),
        ("completions", completions(prompt={"a": 1}), "prompt", "must be text, a list of texts, token ids"),
        ("completions", completions(prompt=[]), "prompt", "must be text, a list of texts, token ids"),
        ("completions", completions(prompt=[True]), "prompt", "must be text, a list of texts, token ids"),
        ("embeddings", embeddings(input=[{"a": 1}]), "input", "must be text, a list of texts or token ids"),
        ("chat", chat(tool_choice=1), "tool_choice", "must be none, auto, required or a function"),
        ("chat", chat(stop=[1]), "stop", "must be a string or a list of strings"),
    ],
)
def test_a_value_of_no_accepted_shape_is_told_what_shapes_are_accepted(kind, body, param, words):
    error = refused(kind, body)
    assert (error.param, words in error.detail) == (param, True)


MEDIA = [
    {"type": "image_url", "image_url": {"url": "http://x/"}},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_image", "image_url": "http://x/"},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "audio_url", "audio_url": {"url": "http://x/a.mp3"}},
    {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},
    {"type": "image_embeds", "image_embeds": "AAAA"},
    {"type": "prompt_embeds", "data": "AAAA"},
    {"type": "file", "file": {"file_data": "AAAA"}},
    {"image_url": "http://x/"},  # vLLM's untyped image part
    {"type": ["text"], "text": "x"},
]


@pytest.mark.parametrize("part", MEDIA, ids=[str(part)[:40] for part in MEDIA])
@pytest.mark.parametrize("first", [True, False])
def test_a_media_part_is_refused_as_media_wherever_it_stands(part, first):
    parts = [part, TEXT] if first else [TEXT, TEXT, part]
    error = refused("chat", _content(parts))
    assert error.param == f"messages[0].content[{0 if first else 2}].type"
    assert "no images, audio or video, by URL or inline" in error.detail


# --- F5: OpenAI's fields that vLLM ignores -----------------------------------------------------------


def test_modalities_verbosity_and_prediction_are_checked_and_not_sent_upstream():
    for prediction_content in ("the old file", [{"type": "text", "text": "the old file"}]):
        payload = passed(
            "chat",
            chat(
                modalities=["text"],
                verbosity="low",
                prediction={"type": "content", "content": prediction_content},
            ),
        )
        assert payload == {"model": "m1", "messages": MSG}
    for field, value, param in [
        ("modalities", ["text", "audio"], "modalities"),
        ("modalities", "text", "modalities"),
        ("verbosity", "loud", "verbosity"),
        ("prediction", {"type": "content"}, "prediction.content"),
        ("prediction", {"type": "guess", "content": "x"}, "prediction.type"),
        ("prediction", {"type": "content", "content": [{"type": "image_url"}]}, "prediction.content[0].type"),
    ]:
        assert refused("chat", chat(**{field: value})).param == param, (field, value)


# --- F6: vLLM's sampling extras -----------------------------------------------------------------------

SAMPLING_EXTRAS: dict[str, Any] = {
    "ignore_eos": True,
    "spaces_between_special_tokens": False,
    "skip_special_tokens": False,
    "thinking_token_budget": 512,
}


def test_vllms_sampling_extras_go_upstream_as_sent():
    assert (
        passed("chat", chat(**SAMPLING_EXTRAS, include_reasoning=False)).items()
        >= {
            **SAMPLING_EXTRAS,
            "include_reasoning": False,
        }.items()
    )
    assert passed("completions", completions(**SAMPLING_EXTRAS)).items() >= SAMPLING_EXTRAS.items()
    assert passed("chat", chat(thinking_token_budget=-1))["thinking_token_budget"] == -1  # vLLM: no budget
    assert passed("embeddings", embeddings(add_special_tokens=False))["add_special_tokens"] is False


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", chat(ignore_eos="yes"), "ignore_eos"),
        ("chat", chat(include_reasoning=1), "include_reasoning"),
        (
            "completions",
            completions(spaces_between_special_tokens=None, skip_special_tokens="no"),
            "skip_special_tokens",
        ),
        ("chat", chat(thinking_token_budget=-2), "thinking_token_budget"),
        ("completions", completions(include_reasoning=False), "include_reasoning"),  # chat's only
        ("embeddings", embeddings(add_special_tokens="true"), "add_special_tokens"),
        ("embeddings", embeddings(ignore_eos=True), "ignore_eos"),
    ],
)
def test_vllms_sampling_extras_are_type_checked(kind, body, param):
    assert refused(kind, body).param == param


@pytest.mark.parametrize(
    "field",
    [
        "priority",
        "request_id",
        "kv_transfer_params",
        "vllm_xargs",
        "logits_processors",
        "mm_processor_kwargs",
        "cache_salt",
        "bad_words",
        "allowed_token_ids",
        "prompt_logprobs",
        "return_token_ids",
    ],
)
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_vllms_scheduling_transfer_and_plugin_fields_stay_refused(field, kind):
    body = (chat if kind == "chat" else completions)(**{field: 1})
    error = refused(kind, body)
    assert (error.param, "is not a supported field" in error.detail) == (field, True)


# --- F7: integral floats, and prompt scoring ---------------------------------------------------------


def test_an_integral_float_is_taken_as_the_integer_and_sent_upstream_as_one():
    checked = request_validate(
        "chat", chat(max_tokens=256.0, n=2.0, seed=7.0, stop_token_ids=[2.0, 3]), max_tokens_cap=None
    )
    assert (checked.max_tokens, checked.n) == (256, 2)
    sent = json.loads(json.dumps(checked.payload))
    assert [sent[key] for key in ("max_tokens", "n", "seed", "stop_token_ids")] == [256, 2, 7, [2, 3]]
    assert all(type(sent[key]) is int for key in ("max_tokens", "n", "seed"))
    prompt = passed("completions", completions(prompt=[1, 2.0], max_tokens=1e2))
    assert (prompt["prompt"], prompt["max_tokens"]) == ([1, 2], 100)
    assert type(prompt["prompt"][1]) is int
    first = passed("completions", completions(prompt=[1.0, 2], max_tokens=1))  # a float first, too
    assert first["prompt"] == [1, 2]
    assert type(first["prompt"][0]) is int
    schema = passed(
        "chat",
        chat(
            tools=[TOOL | {"function": {"name": "f", "parameters": {"maxItems": 5.0}}}],
            tool_choice="required",
        ),
    )
    assert type(schema["tools"][0]["function"]["parameters"]["maxItems"]) is int
    for field, value in [
        ("max_tokens", 256.5),
        ("n", 1.5),
        ("max_tokens", True),
        ("max_tokens", "256"),
        ("n", 9.0),
    ]:
        assert refused("chat", chat(**{field: value})).param == field, value


def test_a_completion_of_no_tokens_that_echoes_the_prompt_is_accepted_and_reserves_the_prompt_only():
    body = completions(max_tokens=0, echo=True, logprobs=1)
    request = request_validate("completions", body, max_tokens_cap=8)
    assert (request.max_tokens, request.payload["max_tokens"]) == (0, 0)
    assert cost_estimate(request, len(body), 4096) == prompt_estimate(request, len(body))
    for fields in ({"max_tokens": 0}, {"max_tokens": 0, "echo": False}, {"max_tokens": 0.0}):
        assert refused("completions", completions(**fields)).param == "max_tokens", fields
    assert refused("chat", chat(max_tokens=0, echo=True)).param == "max_tokens"  # chat has no such echo


# --- F8: stream options with nothing set --------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"include_usage": None}, {"include_usage": None, "continuous_usage_stats": None}]
)
@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_that_set_nothing_are_accepted_without_a_stream_and_left_out(options, stream):
    fields: dict[str, Any] = {"stream_options": options}
    if stream != "absent":
        fields["stream"] = stream
    request = request_validate("chat", chat(**fields), max_tokens_cap=None)
    assert "stream_options" not in request.payload
    assert (request.stream, request.wants_usage) == (False, False)


@pytest.mark.parametrize(
    "options", [{"include_usage": False}, {"include_usage": True}, {"continuous_usage_stats": True}]
)
def test_stream_options_that_set_something_still_need_a_stream(options):
    assert refused("chat", chat(stream=False, stream_options=options)).param == "stream_options"


# --- F9: shapes vLLM accepts in messages and tools ----------------------------------------------------


def test_a_text_parts_cache_control_is_accepted_and_not_sent_upstream():
    part = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    assert passed("chat", _content([part]))["messages"][0]["content"] == [TEXT]
    assert refused("chat", _content([{**part, "cache_control": "ephemeral"}])).param == (
        "messages[0].content[0].cache_control"
    )


def test_a_refusal_part_goes_upstream_in_an_assistant_message_only():
    refusal = {"type": "refusal", "refusal": "I can't help with that."}
    reply = {"role": "assistant", "content": [refusal]}
    assert passed("chat", chat(messages=[*MSG, reply, *MSG]))["messages"][1] == reply
    error = refused("chat", chat(messages=[{"role": "user", "content": [TEXT, refusal]}]))
    assert error.param == "messages[0].content[1].type"
    assert refused(
        "chat", chat(messages=[*MSG, {"role": "assistant", "content": [{"type": "refusal"}]}])
    ).param == ("messages[1].content[0].refusal")


def test_a_tool_and_a_named_tool_choice_without_a_type_are_sent_upstream_as_functions():
    untyped = {"function": {"name": "f", "parameters": {"type": "object"}}}
    payload = passed(
        "chat", chat(tools=[untyped, {**TOOL, "type": None}], tool_choice={"function": {"name": "f"}})
    )
    assert payload["tools"] == [{**untyped, "type": "function"}, TOOL]
    assert payload["tool_choice"] == {"function": {"name": "f"}, "type": "function"}
    # a typeless tool is still a tool whose schema vLLM compiles under a forced choice
    loose = {"function": {"name": "f", "parameters": {"type": "string", "pattern": "("}}}
    error = refused("chat", chat(tools=[loose], tool_choice="required"))
    assert error.param == "tools[0].function.parameters.pattern"
    assert refused("chat", chat(tools=[{**untyped, "type": "custom"}])).param == "tools[0].type"


# --- F4: annotations in schemas vLLM compiles ---------------------------------------------------------

ANNOTATED: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$comment": "made by zod-to-json-schema",
    "type": "object",
    "properties": {
        "pet": {
            "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"},
            },
        },
        "id": {"type": "integer", "readOnly": True},
        "secret": {"type": "string", "writeOnly": True},
        "old": {"type": "integer", "deprecated": True},
    },
    "$defs": {
        "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}}},
        "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}}},
    },
}
PLAIN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
        "id": {"type": "integer"},
        "secret": {"type": "string"},
        "old": {"type": "integer"},
    },
    "$defs": ANNOTATED["$defs"],
}


def _json_schema(schema: Any) -> bytes:
    return chat(response_format={"type": "json_schema", "json_schema": {"name": "Pet", "schema": schema}})


def _forced(schema: Any) -> bytes:
    return chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}], tool_choice="required"
    )


def test_annotation_keywords_are_accepted_and_left_out_of_a_schema_vllm_compiles():
    format_schema = passed("chat", _json_schema(ANNOTATED))["response_format"]["json_schema"]["schema"]
    assert format_schema == PLAIN
    assert passed("chat", _forced(ANNOTATED))["tools"][0]["function"]["parameters"] == PLAIN
    # a schema only shown to the model (no forced choice, no strict tool) goes on as sent
    shown = passed(
        "chat", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": ANNOTATED}}])
    )
    assert shown["tools"][0]["function"]["parameters"] == ANNOTATED


@pytest.mark.parametrize(
    ("annotation", "param"),
    [
        ({"$schema": 7}, "$schema"),
        ({"$comment": ["x"]}, "$comment"),
        ({"deprecated": "yes"}, "deprecated"),
        ({"readOnly": 1}, "readOnly"),
        ({"discriminator": "kind"}, "discriminator"),
        ({"discriminator": {"mapping": {}}}, "discriminator.propertyName"),
        (
            {"discriminator": {"propertyName": "kind", "mapping": {"cat": "https://x/cat.json"}}},
            "discriminator.mapping.cat",
        ),
        ({"discriminator": {"propertyName": "kind", "extra": 1}}, "discriminator.extra"),
        ({"uniqueItems": True}, "uniqueItems"),
        ({"multipleOf": 2}, "multipleOf"),
        ({"prefixItems": [{"type": "string"}]}, "prefixItems"),
    ],
)
def test_annotation_keywords_are_checked_and_other_keywords_stay_refused(annotation, param):
    error = refused("chat", _json_schema({"type": "object", **annotation}))
    assert error.param == f"response_format.json_schema.schema.{param}"

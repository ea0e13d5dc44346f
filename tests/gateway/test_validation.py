"""Request validation: a table of every rule (status, param), and random bodies that never crash it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError, InvalidRequest
from gateway.validation import request_validate
from gateway.validation.json_body import MAX_DEPTH, body_parse

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m1", "messages": MSG, **fields}).encode()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CASES = [
    ("not an object", "chat", b"[1, 2]", None),
    ("invalid json", "chat", b"{", None),
    ("NaN", "chat", b'{"model": "m1", "messages": [], "temperature": NaN}', None),
    ("duplicate key", "chat", b'{"model": "m1", "model": "m2", "messages": []}', "model"),
    (
        "duplicate key in a message",
        "chat",
        b'{"model": "m1", "messages": [{"role": "user", "content": "a", "role": "system"}]}',
        "role",
    ),
    ("too deep", "chat", chat(user=nested(MAX_DEPTH + 5)), None),
    ("missing model", "chat", json.dumps({"messages": MSG}).encode(), "model"),
    ("missing messages", "chat", json.dumps({"model": "m1"}).encode(), "messages"),
    ("empty messages", "chat", chat(messages=[]), "messages"),
    ("unknown field", "chat", chat(foo=1), "foo"),
    ("chat template", "chat", chat(chat_template="{{ x }}"), "chat_template"),
    ("chat template kwargs", "chat", chat(chat_template_kwargs={"a": 1}), "chat_template_kwargs.a"),
    (
        "prompt embeds",
        "completions",
        json.dumps({"model": "m1", "prompt_embeds": "AAAA"}).encode(),
        "prompt_embeds",
    ),
    ("guided json", "chat", chat(guided_json={"type": "object"}), "guided_json"),
    (
        "json schema format without its name",
        "chat",
        chat(response_format={"type": "json_schema", "json_schema": {}}),
        "response_format.json_schema.name",
    ),
    (
        "remote image",
        "chat",
        chat(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/"}}]}]
        ),
        "messages[0].content[0].type",
    ),
    (
        "inline image",
        "chat",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
                    ],
                }
            ]
        ),
        "messages[0].content[0].type",
    ),
    ("bad role", "chat", chat(messages=[{"role": "root", "content": "x"}]), "messages[0].role"),
    (
        "unknown message field",
        "chat",
        chat(messages=[{"role": "user", "content": "x", "x": 1}]),
        "messages[0].x",
    ),
    ("model too long for the usage record", "chat", chat(model="m" * 201), "model"),
    ("model with a NUL", "chat", chat(model="m1\u0000"), "model"),
    ("model with a DEL", "chat", chat(model="m1\u007f"), "model"),
    ("model with a newline", "embeddings", json.dumps({"model": "e\n", "input": "x"}).encode(), "model"),
    ("n too large", "chat", chat(n=100), "n"),
    ("n not int", "chat", chat(n="2"), "n"),
    ("top_logprobs too large", "chat", chat(logprobs=True, top_logprobs=50), "top_logprobs"),
    ("too many stops", "chat", chat(stop=["a"] * 20), "stop"),
    ("temperature range", "chat", chat(temperature=5), "temperature"),
    ("bool as number", "chat", chat(temperature=True), "temperature"),
    # an int too large for a float: compared exactly, never converted (float() of it overflows)
    ("temperature of 400 digits", "chat", chat(temperature=10**400), "temperature"),
    (
        "top_p of 400 digits",
        "completions",
        json.dumps({"model": "m1", "prompt": "x", "top_p": -(10**400)}).encode(),
        "top_p",
    ),
    ("logit bias of 400 digits", "chat", chat(logit_bias={"1": 10**400}), "logit_bias.1"),
    # valid JSON that no float holds: it would go upstream as the non-JSON token Infinity
    (
        "1e999 in a tool's parameters",
        "chat",
        b'{"model": "m1", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        b'"function": {"name": "f", "parameters": {"maximum": 1e999}}}]}',
        None,
    ),
    ("-1e999", "chat", b'{"model": "m1", "messages": [], "temperature": -1e999}', None),
    ("null model", "chat", chat(model=None), "model"),
    ("null messages", "chat", chat(messages=None), "messages"),
    (
        "a reply's audio sent back",
        "chat",
        chat(messages=[*MSG, {"role": "assistant", "content": "x", "audio": {"id": "a"}}]),
        "messages[1].audio",
    ),
    (
        "a reply's annotations sent back",
        "chat",
        chat(
            messages=[*MSG, {"role": "assistant", "content": "x", "annotations": [{"type": "url_citation"}]}]
        ),
        "messages[1].annotations",
    ),
    (
        "a deprecated function call",
        "chat",
        chat(messages=[*MSG, {"role": "assistant", "content": None, "function_call": {"name": "f"}}]),
        "messages[1].function_call",
    ),
    (
        "tool calls not a list",
        "chat",
        chat(messages=[{"role": "assistant", "tool_calls": {}}]),
        "messages[0].tool_calls",
    ),
    ("max_tokens over cap", "chat", chat(max_tokens=5000), "max_tokens"),
    ("max_completion_tokens over cap", "chat", chat(max_completion_tokens=5000), "max_completion_tokens"),
    ("stream_options without stream", "chat", chat(stream_options={"include_usage": True}), "stream_options"),
    (
        "unknown stream option",
        "chat",
        chat(stream=True, stream_options={"include_usage": True, "chunk_usage": True}),
        "stream_options.chunk_usage",
    ),
    (
        "continuous usage stats not a boolean",
        "chat",
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": "yes"}),
        "stream_options.continuous_usage_stats",
    ),
    ("logit bias key", "chat", chat(logit_bias={"abc": 1}), "logit_bias.abc"),
    ("logit bias superscript digit", "chat", chat(logit_bias={"\u00b2": 1}), "logit_bias.\u00b2"),
    (
        "logit bias arabic-indic digits",
        "chat",
        chat(logit_bias={"\u0661\u0662": 1}),
        "logit_bias.\u0661\u0662",
    ),
    ("logit bias key of 5000 digits", "chat", chat(logit_bias={"9" * 5000: 1}), "logit_bias." + "9" * 5000),
    ("logit bias key past 2**31", "chat", chat(logit_bias={"2147483649": 1}), "logit_bias.2147483649"),
    (
        "tool choice without its function",
        "chat",
        chat(tool_choice={"type": "function"}),
        "tool_choice.function",
    ),
    (
        "tool choice naming a function, without tools",
        "chat",
        chat(tool_choice={"function": {"name": "f"}}),
        "tool_choice",
    ),
    ("too many messages", "chat", chat(messages=MSG * 2000), "messages"),
    (
        "completion logprobs",
        "completions",
        json.dumps({"model": "m1", "prompt": "x", "logprobs": 10}).encode(),
        "logprobs",
    ),
    ("suffix", "completions", json.dumps({"model": "m1", "prompt": "x", "suffix": "y"}).encode(), "suffix"),
    (
        "embedding format",
        "embeddings",
        json.dumps({"model": "e", "input": "x", "encoding_format": "hex"}).encode(),
        "encoding_format",
    ),
    ("embedding input", "embeddings", json.dumps({"model": "e", "input": {"a": 1}}).encode(), "input"),
]


@pytest.mark.parametrize(("name", "kind", "body", "param"), CASES, ids=[c[0] for c in CASES])
def test_every_rule_refuses_with_400_and_names_the_param(name, kind, body, param):
    with pytest.raises(InvalidRequest) as caught:
        request_validate(kind, body, max_tokens_cap=1000)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_a_valid_chat_request_passes_and_the_cap_bounds_an_unbounded_generation():
    checked = request_validate(
        "chat",
        chat(
            temperature=0.2,
            stop=["\n"],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "f"}},
            logit_bias={"0": -100, "50256": 5.5, "2147483648": 1},  # ASCII token ids up to 2**31
        ),
        max_tokens_cap=256,
    )
    assert checked.model == "m1"
    assert checked.max_tokens == 256
    assert checked.payload["max_tokens"] == 256


def _with_parameters_nested(lists: int) -> bytes:
    """A chat body nested 5 + ``lists`` deep: the body, tools, a tool, its function, then the lists around a
    scalar in its parameters (which take any JSON)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(lists)}}
    return chat(tools=[tool])


def test_nesting_up_to_the_limit_passes_and_one_level_more_is_refused():
    assert request_validate("chat", _with_parameters_nested(MAX_DEPTH - 5), max_tokens_cap=None).model == "m1"
    too_deep = _with_parameters_nested(MAX_DEPTH - 4)
    for body in (too_deep, too_deep.decode().encode("utf-16"), too_deep.decode().encode("utf-32")):
        with pytest.raises(InvalidRequest, match="nested deeper"):
            request_validate("chat", body, max_tokens_cap=None)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_body_is_read_in_the_encodings_json_loads_reads(encoding):
    text = chat(messages=[{"role": "user", "content": "Grüße 😀"}]).decode()
    body = text.encode(encoding)
    assert body_parse(body) == json.loads(body) == json.loads(text)


@pytest.mark.parametrize("body", [b"\xff{}", b'{"a": "\xc3"}', b"{} {}", b"", b"[1]"])
def test_a_body_json_loads_would_refuse_is_an_invalid_request(body):
    with pytest.raises(InvalidRequest):
        body_parse(body)


def test_brackets_inside_strings_do_not_count_as_nesting():
    body = chat(messages=[{"role": "user", "content": "[{" * 100}])
    assert request_validate("chat", body, max_tokens_cap=None).model == "m1"


def test_without_a_cap_max_tokens_is_left_to_vllm():
    checked = request_validate("chat", chat(), max_tokens_cap=None)
    assert checked.max_tokens is None
    assert "max_tokens" not in checked.payload


def test_a_stream_always_asks_the_upstream_for_usage_but_remembers_what_the_client_asked():
    checked = request_validate("chat", chat(stream=True), max_tokens_cap=None)
    assert checked.payload["stream_options"] == {"include_usage": True}
    assert checked.wants_usage is False
    asked = request_validate(
        "chat", chat(stream=True, stream_options={"include_usage": True}), max_tokens_cap=None
    )
    assert asked.wants_usage is True


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_continuous_usage_stats_goes_upstream_only_with_include_usage_as_vllm_honours_it(kind):
    def checked(**options: Any) -> Any:
        fields: dict[str, Any] = {"model": "m1", "stream": True, "stream_options": options}
        if kind == "chat":
            fields["messages"] = MSG
        else:
            fields["prompt"] = "x"
        return request_validate(kind, json.dumps(fields).encode(), max_tokens_cap=None)

    running = checked(include_usage=True, continuous_usage_stats=True)
    assert running.payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert running.wants_usage is True
    # vLLM gives running counts only with include_usage: the one the gateway forces must not turn them on
    for unasked in (
        checked(continuous_usage_stats=True),
        checked(include_usage=False, continuous_usage_stats=True),
        checked(include_usage=None, continuous_usage_stats=True),
        checked(include_usage=True, continuous_usage_stats=False),
        checked(include_usage=True, continuous_usage_stats=None),
    ):
        assert unasked.payload["stream_options"] == {"include_usage": True}


def test_an_optional_field_sent_as_null_is_left_out_as_if_it_had_not_been_sent():
    nulls = dict.fromkeys(
        ["stop", "max_tokens", "tools", "tool_choice", "seed", "n", "stream", "stream_options", "user"]
    )
    checked = request_validate("chat", chat(**nulls, temperature=None, logit_bias=None), max_tokens_cap=None)
    assert checked.payload == {"model": "m1", "messages": MSG}
    assert (checked.stream, checked.max_tokens, checked.n) == (False, None, 1)
    capped = request_validate(
        "chat", chat(max_tokens=None, stream=True, stream_options=None), max_tokens_cap=64
    )
    assert capped.payload["max_tokens"] == 64  # null is no way around the client's cap
    assert capped.payload["stream_options"] == {"include_usage": True}
    embedding = request_validate(
        "embeddings",
        json.dumps({"model": "e", "input": "x", "dimensions": None}).encode(),
        max_tokens_cap=None,
    )
    assert embedding.payload == {"model": "e", "input": "x"}


def test_a_reply_sent_back_as_an_sdk_appends_it_goes_upstream_without_its_response_fields():
    # What the openai SDK sends for ``messages.append(completion.choices[0].message)`` with vLLM's reply
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "hi",
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    later = {"role": "user", "content": "and then?"}
    checked = request_validate("chat", chat(messages=[*MSG, reply, later]), max_tokens_cap=None)
    assert checked.payload["messages"] == [*MSG, {"role": "assistant", "content": "hi"}, later]
    # a reasoning model's reply keeps its text; an assistant turn that called a tool keeps its null content
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    kept = [
        {"role": "assistant", "content": "4", "reasoning_content": "2+2", "refusal": "no", "annotations": []},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    checked = request_validate("chat", chat(messages=[*MSG, *kept]), max_tokens_cap=None)
    assert checked.payload["messages"][1:] == [
        {"role": "assistant", "content": "4", "reasoning_content": "2+2", "refusal": "no"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)  # past a float's range
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=40,
)
KEYS = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "input",
        "n",
        "stream",
        "stop",
        "max_tokens",
        "tools",
        "stream_options",
        "logit_bias",
        "temperature",
        "response_format",
        "x",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["chat", "completions", "embeddings"]),
    body=st.dictionaries(KEYS, JSON, max_size=8) | JSON,
)
def test_random_json_bodies_never_raise_anything_but_an_invalid_request(kind, body):
    try:
        request_validate(kind, json.dumps(body).encode(), max_tokens_cap=100)
    except GatewayError as exc:
        status = exc.status
    else:
        status = 200
    assert status in (200, 400)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_an_invalid_request(raw):
    try:
        request_validate("chat", raw, max_tokens_cap=None)
    except GatewayError as exc:
        status = exc.status
    else:
        status = 200
    assert status in (200, 400)


def forced(parameters: Any, choice: Any = "required") -> bytes:
    return chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}], tool_choice=choice
    )


# what openai.pydantic_function_tool makes of a model with a nested model and a bounded int
PYDANTIC_SCHEMA = {
    "$defs": {
        "Item": {
            "properties": {"sku": {"title": "Sku", "type": "string"}},
            "required": ["sku"],
            "type": "object",
        }
    },
    "properties": {
        "items": {"items": {"$ref": "#/$defs/Item"}, "maxItems": 10, "title": "Items", "type": "array"},
        "count": {
            "anyOf": [{"maximum": 100, "minimum": 0, "type": "integer"}, {"type": "null"}],
            "default": None,
        },
    },
    "required": ["items", "count"],
    "type": "object",
    "additionalProperties": False,
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_a_forced_tool_choice_takes_a_plain_schema_but_no_regex_format_remote_ref_or_huge_bound(choice):
    assert request_validate("chat", forced(PYDANTIC_SCHEMA, choice), max_tokens_cap=None).model == "m1"
    refused = [
        ({"type": "string", "pattern": "["}, "tools[0].function.parameters.pattern"),
        (
            {"type": "object", "patternProperties": {"^a": {}}},
            "tools[0].function.parameters.patternProperties",
        ),
        ({"type": "string", "format": "date-time"}, "tools[0].function.parameters.format"),
        ({"$ref": "https://example.com/schema.json"}, "tools[0].function.parameters.$ref"),
        (
            {"type": "integer", "maximum": 20_000_000_000},
            "tools[0].function.parameters.maximum",
        ),  # vllm#17894
        ({"type": "string", "maxLength": 10**9}, "tools[0].function.parameters.maxLength"),
        ({"type": "regex"}, "tools[0].function.parameters.type"),
        (
            {"properties": {"a": {"items": {"pattern": "x"}}}},
            "tools[0].function.parameters.properties.a.items.pattern",
        ),
        ({"anyOf": [{"type": "string"}, {"format": "uri"}]}, "tools[0].function.parameters.anyOf[1].format"),
        ([1], "tools[0].function.parameters"),
    ]
    for parameters, param in refused:
        with pytest.raises(InvalidRequest) as caught:
            request_validate("chat", forced(parameters, choice), max_tokens_cap=None)
        assert caught.value.param == param, parameters


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_a_tool_choice_left_to_the_model_passes_any_schema_on_as_description(choice):
    # vLLM compiles no grammar then: the schema is only shown to the model
    body = forced({"type": "string", "pattern": "[", "format": "date-time"}, choice)
    assert request_validate("chat", body, max_tokens_cap=None).model == "m1"


def test_a_prompt_of_token_ids_is_reserved_at_its_count_not_estimated_from_its_size():
    from gateway.admission import cost_estimate

    body = json.dumps({"model": "m1", "prompt": [1] * 3000, "max_tokens": 10}).encode()
    request = request_validate("completions", body, max_tokens_cap=None)
    assert request.prompt_token_ids == 3000
    assert len(body) // 4 + 1 < 3000  # what the size alone would have reserved for it
    assert cost_estimate(request, len(body), 8192) == 3000 + 10
    text = request_validate(
        "completions", json.dumps({"model": "m1", "prompt": ["ab", "c"]}).encode(), max_tokens_cap=None
    )
    assert text.prompt_token_ids is None
    inputs = json.dumps({"model": "e", "input": [[1, 2], [3]]}).encode()
    assert request_validate("embeddings", inputs, max_tokens_cap=None).prompt_token_ids == 3
    assert request_validate("chat", chat(), max_tokens_cap=None).prompt_token_ids is None


STRICT_REGEX_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "f", "strict": True, "parameters": {"type": "string", "pattern": "^(a+)+$"}},
}


@pytest.mark.parametrize("choice", [None, "auto"])
def test_a_strict_tool_is_compiled_by_vllm_even_under_auto_so_its_schema_is_checked(choice):
    # what the openai SDK's pydantic_function_tool and parse(tools=...) send: strict, no tool_choice
    body = chat(tools=[STRICT_REGEX_TOOL], **({"tool_choice": choice} if choice else {}))
    with pytest.raises(InvalidRequest) as caught:
        request_validate("chat", body, max_tokens_cap=None)
    assert caught.value.param == "tools[0].function.parameters.pattern"
    plain = {
        **STRICT_REGEX_TOOL,
        "function": {**STRICT_REGEX_TOOL["function"], "parameters": PYDANTIC_SCHEMA},
    }
    assert request_validate("chat", chat(tools=[plain]), max_tokens_cap=None).model == "m1"
    off = chat(tools=[STRICT_REGEX_TOOL], tool_choice="none")  # no tool call, no grammar
    assert request_validate("chat", off, max_tokens_cap=None).model == "m1"


def json_schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "Order", "strict": True, "schema": schema, **extra},
    }


def test_a_json_schema_response_format_is_accepted_when_its_schema_keeps_to_plain_structure():
    # what the openai SDK's chat.completions.parse(response_format=Model) sends
    checked = request_validate(
        "chat", chat(response_format=json_schema_format(PYDANTIC_SCHEMA)), max_tokens_cap=None
    )
    assert checked.payload["response_format"]["json_schema"]["schema"] == PYDANTIC_SCHEMA
    refused = [
        (
            json_schema_format({"type": "string", "pattern": "("}),
            "response_format.json_schema.schema.pattern",
        ),
        (json_schema_format({"type": "string"}, format="x"), "response_format.json_schema.format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        ({"type": "structural_tag"}, "response_format.type"),
    ]
    for response_format, param in refused:
        with pytest.raises(InvalidRequest) as caught:
            request_validate("chat", chat(response_format=response_format), max_tokens_cap=None)
        assert caught.value.param == param, response_format


def test_openai_bookkeeping_fields_are_accepted_and_not_sent_upstream():
    body = chat(
        store=True,
        metadata={"team": "search", "ticket": "T-1"},
        service_tier="auto",
        prompt_cache_key="k1",
        safety_identifier="user-hash",
        reasoning_effort="low",
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        tools=[],
    )
    checked = request_validate("chat", body, max_tokens_cap=None)
    assert checked.payload == {
        "model": "m1",
        "messages": MSG,
        "reasoning_effort": "low",  # vLLM's thinking switch: it goes on
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for field, value in [
        ("metadata", {str(k): "v" for k in range(17)}),
        ("metadata", {"k": 1}),
        ("store", "yes"),
        ("reasoning_effort", "extreme"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            request_validate("chat", chat(**{field: value}), max_tokens_cap=None)
        assert (caught.value.param or "").startswith(field)


def test_a_reply_from_the_sdks_parse_can_be_appended_to_the_conversation():
    reply = {
        "role": "assistant",
        "content": '{"sku": "a"}',
        "parsed": {"sku": "a"},
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"x": 1}', "parsed_arguments": {"x": 1}},
            }
        ],
    }
    checked = request_validate("chat", chat(messages=[*MSG, reply]), max_tokens_cap=None)
    sent = checked.payload["messages"][1]
    assert "parsed" not in sent
    assert sent["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def completions(**fields: Any) -> bytes:
    return json.dumps({"model": "m1", "prompt": "once", **fields}).encode()


@pytest.mark.parametrize(("cap", "expected"), [(None, 16), (8, 8), (4096, 16)])
def test_a_completion_without_max_tokens_writes_vllms_default_of_16_not_the_clients_cap(cap, expected):
    checked = request_validate("completions", completions(), max_tokens_cap=cap)
    assert checked.max_tokens == expected
    assert checked.payload["max_tokens"] == expected
    chosen = request_validate("completions", completions(max_tokens=5), max_tokens_cap=cap)
    assert chosen.max_tokens == 5


def test_a_batch_of_prompts_is_reserved_for_every_prompt_and_may_be_token_id_lists():
    from gateway.admission import cost_estimate

    batch = completions(prompt=["x"] * 64, n=8, max_tokens=1000)
    request = request_validate("completions", batch, max_tokens_cap=None)
    assert request.prompts == 64
    assert cost_estimate(request, len(batch), 8192) >= 64 * 8 * 1000
    ids = completions(prompt=[[1, 2, 3], [4, 5]], max_tokens=10)
    request = request_validate("completions", ids, max_tokens_cap=None)
    assert (request.prompts, request.prompt_token_ids) == (2, 5)
    assert cost_estimate(request, len(ids), 8192) == 5 + 2 * 10
    single = request_validate("completions", completions(prompt=[1, 2, 3]), max_tokens_cap=None)
    assert single.prompts == 1
    with pytest.raises(InvalidRequest):
        request_validate("completions", completions(prompt=[[1]] * 65), max_tokens_cap=None)


def test_the_thinking_switches_and_template_flags_pass_but_nothing_else_reaches_the_template():
    body = chat(
        chat_template_kwargs={"enable_thinking": False},
        add_generation_prompt=True,
        truncate_prompt_tokens=4096,
    )
    checked = request_validate("chat", body, max_tokens_cap=None)
    assert checked.payload["chat_template_kwargs"] == {"enable_thinking": False}
    for kwargs, param in [
        ({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking"),
        ({"tools_in_user_message": True}, "chat_template_kwargs.tools_in_user_message"),
        ({"chat_template": "{{ x }}"}, "chat_template_kwargs.chat_template"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            request_validate("chat", chat(chat_template_kwargs=kwargs), max_tokens_cap=None)
        assert caught.value.param == param
    embedding = json.dumps({"model": "e", "input": "x", "truncate_prompt_tokens": -1}).encode()
    assert (
        request_validate("embeddings", embedding, max_tokens_cap=None).payload["truncate_prompt_tokens"] == -1
    )
    with pytest.raises(InvalidRequest):
        request_validate("completions", completions(truncate_prompt_tokens=-2), max_tokens_cap=None)


def test_schema_references_must_name_a_definition_and_not_lead_back_to_themselves_directly():
    tree = {  # a recursive model: a node's children are nodes, through an array: fine
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            }
        },
        "$ref": "#/$defs/Node",
    }
    assert request_validate("chat", chat(response_format=json_schema_format(tree)), max_tokens_cap=None)
    refused = [
        {"$ref": "#/$defs/Missing"},
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {
            "$defs": {
                "a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "null"}]},
                "b": {"allOf": [{"$ref": "#/$defs/a"}]},
            }
        },
        {"definitions": {"a": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/a"}}},
    ]
    for schema in refused:
        for body in (chat(response_format=json_schema_format(schema)), forced(schema)):
            with pytest.raises(InvalidRequest) as caught:
                request_validate("chat", body, max_tokens_cap=None)
            assert (caught.value.param or "").endswith(".$ref"), schema


def test_a_chain_of_thousands_of_references_is_checked_without_recursion_and_its_cycle_named():
    # a chain through $defs adds no JSON nesting, so the depth limit does not bound it: the check recursed
    # once a link and a chain of 3,000 overflowed Python's stack (a RecursionError, answered 500)
    links = 5_000
    chain: dict[str, Any] = {
        f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "null"}]} for i in range(links)
    }
    chain[f"d{links}"] = {"type": "string"}
    schema = {"$defs": chain, "$ref": "#/$defs/d0"}
    assert request_validate("chat", chat(response_format=json_schema_format(schema)), max_tokens_cap=None)
    chain[f"d{links}"] = {"allOf": [{"$ref": "#/$defs/d2"}]}  # the end leads back
    with pytest.raises(InvalidRequest) as caught:
        request_validate("chat", forced(schema), max_tokens_cap=None)
    assert caught.value.param == "tools[0].function.parameters.$ref"
    named = "(#/$defs/d2 -> #/$defs/d3 -> #/$defs/d4 -> #/$defs/d5 -> (4992 more) -> "
    named += f"#/$defs/d{links - 2} -> #/$defs/d{links - 1} -> #/$defs/d{links} -> #/$defs/d2)"
    assert named in caught.value.detail


def test_an_empty_tool_list_takes_an_auto_choice_with_it_and_a_forced_choice_without_tools_is_refused():
    checked = request_validate("chat", chat(tools=[], tool_choice="auto"), max_tokens_cap=None)
    assert "tools" not in checked.payload
    assert "tool_choice" not in checked.payload
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(InvalidRequest) as caught:
            request_validate("chat", chat(tools=[], tool_choice=choice), max_tokens_cap=None)
        assert caught.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as caught:  # a bad tool is named exactly
        request_validate(
            "chat",
            chat(tools=[{"type": "function", "function": {"name": "f", "strict": 1}}]),
            max_tokens_cap=None,
        )
    assert caught.value.param == "tools[0].function.strict"


def test_a_template_told_both_to_add_a_generation_prompt_and_to_continue_the_last_message_is_refused_here():
    with pytest.raises(InvalidRequest) as caught:
        request_validate(
            "chat", chat(add_generation_prompt=True, continue_final_message=True), max_tokens_cap=None
        )
    assert caught.value.param == "continue_final_message"


def test_a_truncated_prompt_leaves_the_rest_of_the_context_to_every_answer_and_is_reserved_so():
    from gateway.admission import cost_estimate

    body = chat(messages=[{"role": "user", "content": "x" * 128_000}], n=8, truncate_prompt_tokens=16)
    request = request_validate("chat", body, max_tokens_cap=None)
    assert cost_estimate(request, len(body), 32_768) >= 8 * (32_768 - 16)


def test_a_client_capped_at_no_tokens_is_not_given_the_completion_default():
    assert request_validate("completions", completions(), max_tokens_cap=0).payload["max_tokens"] == 0


def test_an_upstream_that_compiles_every_tool_has_every_tool_checked_under_auto():
    loose = {"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "("}}}
    body = chat(tools=[loose], tool_choice="auto")
    assert request_validate("chat", body, max_tokens_cap=None).model == "m1"  # vLLM's default: shown only
    with pytest.raises(InvalidRequest) as caught:
        request_validate("chat", body, max_tokens_cap=None, strict_tools=True)
    assert caught.value.param == "tools[0].function.parameters.pattern"
    off = chat(tools=[loose], tool_choice="none")
    assert request_validate("chat", off, max_tokens_cap=None, strict_tools=True).model == "m1"


def test_a_media_part_is_refused_in_words_that_cover_inline_media_too():
    body = chat(
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]
    )
    with pytest.raises(InvalidRequest) as refused:
        request_validate("chat", body, max_tokens_cap=None)
    assert "no images, audio or video, by URL or inline" in str(refused.value)


@pytest.mark.parametrize("leaf", [1, "x", [], {}, None])
@pytest.mark.parametrize("kind", ["lists", "objects", "mixed"])
def test_nesting_is_counted_to_the_deepest_value_of_any_kind(kind, leaf):
    def nested(levels: int) -> dict:
        value: object = leaf
        for level in range(levels - 2):  # the body itself and the leaf are levels too
            wrap_in_list = kind == "lists" or (kind == "mixed" and level % 2)
            value = [value] if wrap_in_list else {"k": value}
        return {"deep": value, "wide": [[] for _ in range(40)]}  # many brackets: the walk is taken

    assert body_parse(json.dumps(nested(MAX_DEPTH)).encode())["deep"] is not None
    with pytest.raises(InvalidRequest, match="nested deeper"):
        body_parse(json.dumps(nested(MAX_DEPTH + 1)).encode())

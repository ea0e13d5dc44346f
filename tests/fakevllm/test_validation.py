"""The requests vLLM refuses before generating, refused with its 400s: logprobs options, tool usage, the
generation prompt flags and the number of prompts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fakevllm.conftest import chat_body

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
EMPTY_TOOLS = (
    "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely."
)
USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _refusal(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a body vLLM refuses; return its error."""
    answer = client.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert error["code"] == 400
    return error


def test_top_logprobs_without_logprobs_true_is_refused(client: httpx.Client) -> None:
    extras: list[dict[str, Any]] = [{"top_logprobs": 2}, {"top_logprobs": -1, "logprobs": False}]
    for extra in extras:
        assert _refusal(client, "/v1/chat/completions", chat_body(**extra)) == {
            "message": "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
            "type": "BadRequestError",
            "param": "top_logprobs",
            "code": 400,
        }
    negative = _refusal(client, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=-2))
    assert negative["message"] == (
        "`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-2)"
    )
    fines: list[dict[str, Any]] = [{"top_logprobs": 0}, {"top_logprobs": 0, "logprobs": False}]
    fines.append({"top_logprobs": None})
    for fine in fines:
        assert client.post("/v1/chat/completions", json=chat_body(**fine)).status_code == 200, fine


def test_negative_completion_logprobs_are_refused(client: httpx.Client) -> None:
    error = _refusal(client, "/v1/completions", {"prompt": "x", "logprobs": -1})
    assert error["message"] == "`logprobs` must be a positive value. (parameter=logprobs, value=-1)"
    assert error["type"] == "BadRequestError"


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"tools": []}, "tools", EMPTY_TOOLS),
        ({"tools": [], "tool_choice": "required"}, "tools", EMPTY_TOOLS),
        ({"tool_choice": "required"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
        ({"tool_choice": "auto"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
        (
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "When using `tool_choice`, `tools` must be set.",
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function"}},
            "tool_choice.function",
            f"Invalid value for `function`: `None` in `tool_choice`! {USAGE}",
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {}}},
            "tool_choice.function.name",
            f"Expected field `name` in `function` in `tool_choice`! {USAGE}",
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": ""}}},
            "tool_choice.function.name",
            f"Invalid `name` in `function`: `` in `tool_choice`! {USAGE}",
        ),
        (
            {"tools": [TOOL], "tool_choice": "sometimes"},
            "tool_choice",
            'Invalid value for `tool_choice`: sometimes! Only named tools, "none", "auto" or "required" are '
            "supported.",
        ),
    ],
)
def test_tool_usage_vllm_refuses_is_refused_with_its_message_and_parameter(
    client: httpx.Client, extra: dict[str, Any], param: str, message: str
) -> None:
    # vLLM 0.33's check_tool_usage raises VLLMValidationErrors, which pydantic lets through: BadRequestErrors
    # whose text ends in their parameter
    assert _refusal(client, "/v1/chat/completions", chat_body(**extra)) == {
        "message": f"{message} (parameter={param})",
        "type": "BadRequestError",
        "param": param,
        "code": 400,
    }


def test_continue_final_message_with_add_generation_prompt_is_refused_naming_no_parameter(
    client: httpx.Client,
) -> None:
    body = chat_body(continue_final_message=True, add_generation_prompt=True)
    assert _refusal(client, "/v1/chat/completions", body) == {
        "message": "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"tool_choice": "none"},
        {"tool_choice": None},
        {"continue_final_message": True},
        {"continue_final_message": True, "add_generation_prompt": False},
    ],
)
def test_chat_requests_vllm_takes_are_still_answered(client: httpx.Client, extra: dict[str, Any]) -> None:
    assert client.post("/v1/chat/completions", json=chat_body(**extra)).status_code == 200


def test_more_prompts_than_vllm_allows_are_refused(client: httpx.Client) -> None:
    error = _refusal(client, "/v1/completions", {"prompt": ["x"] * 1025, "max_tokens": 1})
    assert error == {
        "message": "prompt list length 1025 exceeds the maximum allowed count of 1024. To increase this "
        "limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)",
        "type": "BadRequestError",
        "param": "prompt",
        "code": 400,
    }
    # one prompt of 1025 token ids is one prompt
    assert client.post("/v1/completions", json={"prompt": [5] * 1025, "max_tokens": 1}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": ["x"] * 1024, "max_tokens": 1}).status_code == 200


STRING = "'msg': 'Input should be a valid string'"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("stop", "lines"),
    [
        (  # StopParam's list has at most VLLM_MAX_STOP_STRINGS (4) items
            ["a", "b", "c", "d", "e"],
            [
                f"{{'type': 'string_type', 'loc': 'body.stop', {STRING}, 'input': '<list of 5 items>'}}",
                "{'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should have at most 4 items after "
                "validation, not 5', 'input': '<list of 5 items>', 'ctx': {'field_type': 'List', "
                "'max_length': 4, 'actual_length': 5}}",
            ],
        ),
        (
            5,
            [
                f"{{'type': 'string_type', 'loc': 'body.stop', {STRING}, 'input': '5'}}",
                "{'type': 'list_type', 'loc': 'body.stop', 'msg': 'Input should be a valid list', "
                "'input': '5'}",
            ],
        ),
        (
            ["a", 1, None],
            [
                f"{{'type': 'string_type', 'loc': 'body.stop', {STRING}, 'input': '<list of 3 items>'}}",
                f"{{'type': 'string_type', 'loc': 'body.stop.1', {STRING}, 'input': '1'}}",
                f"{{'type': 'string_type', 'loc': 'body.stop.2', {STRING}, 'input': 'None'}}",
            ],
        ),
    ],
)
def test_a_stop_that_is_not_up_to_four_strings_is_refused_as_pydantic_refuses_it_in_vllm(
    client: httpx.Client, path: str, stop: Any, lines: list[str]
) -> None:
    body = chat_body(stop=stop) if "chat" in path else {"prompt": "x", "stop": stop}
    assert _refusal(client, path, body) == {
        "message": f"{len(lines)} validation errors:\n  " + "\n  ".join(lines),
        "type": "Bad Request",
        "param": "body.stop",
        "code": 400,
    }


@pytest.mark.parametrize(
    ("flag", "kind", "message"),
    [
        (None, "bool_type", "Input should be a valid boolean"),
        (1.5, "bool_type", "Input should be a valid boolean"),
        (2, "bool_parsing", "Input should be a valid boolean, unable to interpret input"),
        ("maybe", "bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    ],
)
def test_include_stop_str_in_output_must_be_a_boolean_in_pydantics_lax_sense(
    client: httpx.Client, flag: Any, kind: str, message: str
) -> None:
    error = _refusal(client, "/v1/chat/completions", chat_body(stop="x", include_stop_str_in_output=flag))
    assert error["message"] == (
        f"1 validation error:\n  {{'type': '{kind}', 'loc': 'body.include_stop_str_in_output', "
        f"'msg': '{message}', 'input': '{flag}'}}"
    )
    assert error["param"] == "body.include_stop_str_in_output"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stop", ["", ["a", ""]])
def test_an_empty_stop_string_is_refused_with_vllms_sampling_params_error(
    client: httpx.Client, path: str, stop: Any
) -> None:
    body = chat_body(stop=stop) if "chat" in path else {"prompt": "x", "stop": stop}
    assert _refusal(client, path, body) == {
        "message": "stop cannot contain an empty string.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    # SamplingParams are made after the model and context checks, so those speak first
    unknown = client.post(path, json={**body, "model": "gamma"})
    assert unknown.status_code == 404
    overflow = _refusal(client, path, {**body, "max_tokens": 5000})
    assert overflow["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 5000.")


@pytest.mark.parametrize(
    "extra",
    [
        {"stop": None},
        {"stop": []},
        {"stop": "tok9"},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": "x", "include_stop_str_in_output": True},
        {"include_stop_str_in_output": "yes"},
        {"include_stop_str_in_output": 0},
    ],
)
def test_stops_vllm_takes_are_answered(client: httpx.Client, extra: dict[str, Any]) -> None:
    assert client.post("/v1/chat/completions", json=chat_body(**extra)).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", **extra}).status_code == 200

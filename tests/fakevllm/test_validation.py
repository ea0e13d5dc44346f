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
        (
            {"tools": []},
            "tools",
            EMPTY_TOOLS,
        ),
        (
            {"tools": [], "tool_choice": "required"},
            "tools",
            EMPTY_TOOLS,
        ),
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
            "tool_choice",
            f"Invalid value for `function`: `None` in `tool_choice`! {USAGE}",
        ),
        (
            {"tools": [TOOL], "tool_choice": "sometimes"},
            "tool_choice",
            'Invalid value for `tool_choice`: sometimes! Only named tools, "none", "auto" or "required" are '
            "supported.",
        ),
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ),
    ],
)
def test_chat_requests_vllm_refuses_are_refused_with_its_message(
    client: httpx.Client, extra: dict[str, Any], param: str, message: str
) -> None:
    assert _refusal(client, "/v1/chat/completions", chat_body(**extra)) == {
        "message": message,
        "type": "Bad Request",
        "param": param,
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

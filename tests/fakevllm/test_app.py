"""A dead engine, as vLLM has after its engine core failed while the API server still takes connections:
/health and /ping answer 503, inference 500, and what needs no engine goes on answering."""

from __future__ import annotations

import httpx

from tests.fakevllm.conftest import chat_body, configure, state

ENGINE_DEAD = {
    "error": {
        "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
}


def test_a_dead_engine_fails_health_and_ping_with_an_empty_503_until_it_is_revived(
    client: httpx.Client,
) -> None:
    configure(client, engine_dead=True)
    for response in (client.get("/health"), client.get("/ping"), client.post("/ping")):
        assert response.status_code == 503
        assert response.content == b""
        assert "content-type" not in response.headers
    configure(client, engine_dead=False)
    assert client.get("/health").status_code == 200


def test_a_dead_engine_answers_inference_with_vllms_500_once_the_request_is_valid(
    client: httpx.Client,
) -> None:
    configure(client, engine_dead=True)
    for path, body in (
        ("/v1/chat/completions", chat_body()),
        ("/v1/chat/completions", chat_body(stream=True)),
        ("/v1/completions", {"prompt": "x", "stream": True}),
        ("/v1/embeddings", {"input": "x"}),
        ("/invocations", chat_body()),
    ):
        response = client.post(path, json=body)
        assert (response.status_code, response.json()) == (500, ENGINE_DEAD), (path, body)
    assert client.post("/v1/chat/completions", json={"model": "alpha"}).status_code == 400
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert state(client)["running"] == 0


def test_a_dead_engine_still_serves_what_needs_no_engine(client: httpx.Client) -> None:
    configure(client, engine_dead=True)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["alpha", "beta"]
    assert client.post("/tokenize", json={"prompt": "two words"}).json()["count"] == 2
    assert client.get("/metrics").status_code == 200
    assert client.get("/version").status_code == 200

"""Embeddings `dimensions` as vLLM answers it: refused for a model without matryoshka representations
(the default, as for most embedding models), truncated and renormalised for one that has them."""

from __future__ import annotations

import math

import httpx

from tests.fakevllm.conftest import configure

NOT_MATRYOSHKA = (
    'Model "alpha" does not support matryoshka representation, changing output dimensions will lead to '
    "poor results."
)


def test_dimensions_on_a_model_without_matryoshka_representation_is_vllms_400(client: httpx.Client) -> None:
    answer = client.post("/v1/embeddings", json={"model": "alpha", "input": "hi", "dimensions": 4})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {"message": NOT_MATRYOSHKA, "type": "BadRequestError", "param": None, "code": 400}
    }


def test_a_matryoshka_model_truncates_and_renormalises_to_the_dimensions_asked(client: httpx.Client) -> None:
    configure(client, matryoshka_models=["alpha"])
    full = client.post("/v1/embeddings", json={"model": "alpha", "input": "hi"}).json()["data"][0][
        "embedding"
    ]
    answer = client.post("/v1/embeddings", json={"model": "alpha", "input": "hi", "dimensions": 3})
    assert answer.status_code == 200
    short = answer.json()["data"][0]["embedding"]
    assert len(full) == 8
    assert len(short) == 3
    assert math.isclose(sum(v * v for v in short), 1.0, rel_tol=1e-6)
    scale = math.sqrt(sum(v * v for v in full[:3]))
    assert all(math.isclose(s, f / scale, rel_tol=1e-5) for s, f in zip(short, full[:3], strict=True))
    # more dimensions than the model has: the whole vector, as the pooler's slice gives
    wide = client.post("/v1/embeddings", json={"model": "alpha", "input": "hi", "dimensions": 99}).json()
    assert wide["data"][0]["embedding"] == full
    # the other model still refuses, and a matryoshka model refuses sizes below 1
    other = client.post("/v1/embeddings", json={"model": "beta", "input": "hi", "dimensions": 3})
    assert other.status_code == 400
    zero = client.post("/v1/embeddings", json={"model": "alpha", "input": "hi", "dimensions": 0})
    assert zero.json()["error"]["message"] == "Dimensions must be greater than 0"


def test_dimensions_null_is_no_dimensions_and_a_string_is_a_validation_error(client: httpx.Client) -> None:
    assert client.post("/v1/embeddings", json={"input": "hi", "dimensions": None}).status_code == 200
    answer = client.post("/v1/embeddings", json={"input": "hi", "dimensions": "four"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "dimensions"

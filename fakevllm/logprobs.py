"""Deterministic logprobs in vLLM's shapes, for `logprobs`/`top_logprobs` (chat) and `logprobs`/`echo`
(text completions).

Chat choices carry a ChatCompletionLogProbs, `{"content":[{token, logprob, bytes, top_logprobs:[{token,
logprob, bytes}]}]}` (`OpenAIServingChat._create_chat_logprobs`); text completion choices a
CompletionLogProbs, `{text_offset, token_logprobs, tokens, top_logprobs:[{token: logprob}]}`
(`OpenAIServingCompletion._create_completion_logprobs`), where an echoed prompt's first token has no logprob
(null, and null top logprobs) and text offsets run on from the echoed prompt. Every field is set by vLLM, so
streamed chunks (exclude_unset) carry them all too.

The fake model is greedy: the sampled token is always the likeliest, so it leads its top alternatives, and a
request for k alternatives lists k of them (a text completion's `logprobs: 0` still lists the sampled token,
as vLLM's `num_output_top_logprobs >= i` does). Generated token k is `tok<k> `; an echoed prompt is split
into words with their trailing spaces (the fake has no tokenizer).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from fakevllm.asgi import encode

_PROMPT_PIECES = re.compile(r"\S+\s*|\s+")


def generated_token(k: int) -> str:
    """Return the k-th generated token."""
    return f"tok{k} "


def prompt_pieces(text: str) -> list[str]:
    """Split a prompt into the fake's tokens, which join back into exactly the prompt."""
    return _PROMPT_PIECES.findall(text)


def _logprob(k: int, prompt: bool) -> float:
    """Return the logprob of the token at position k (of the prompt, or generated)."""
    return -round((0.5 + 0.25 * (k % 4)) if prompt else 0.05 * (k % 7 + 1), 2)


def _top(token: str, logprob: float, count: int) -> list[tuple[str, float]]:
    """Return the `count` likeliest tokens at a position: the (greedy) sampled token, then `alt<j> `."""
    alternatives = [(f"alt{j} ", round(logprob - j, 2)) for j in range(1, count)]
    return [(token, logprob), *alternatives] if count else []


@functools.lru_cache(maxsize=4096)
def _chat_item(token: str, k: int, top: int) -> str:
    """Return the ChatCompletionLogProbsContent of generated token k, `token`, with `top` alternatives, as
    JSON."""
    logprob = _logprob(k, prompt=False)
    alternatives = [
        {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in _top(token, logprob, top)
    ]
    item = {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives}
    return encode(item)


def chat_logprobs_json(first: int, stop: int, top: int, token: Callable[[int], str] = generated_token) -> str:
    """Return the ChatCompletionLogProbs of generated tokens first..stop-1 (token(k) is the k-th), as JSON."""
    return '{"content":[' + ",".join(_chat_item(token(k), k, top) for k in range(first, stop)) + "]}"


def completion_logprobs_json(echo: str, first: int, stop: int, top: int, offset: int) -> str:
    """Return the CompletionLogProbs of an echoed prompt (if any) and generated tokens first..stop-1, their
    text offsets starting at `offset`, as JSON."""
    entries: list[tuple[str, float | None, dict[str, float] | None]] = []
    for j, piece in enumerate(prompt_pieces(echo)):
        if j == 0:  # vLLM's prompt logprobs start with None: nothing comes before the first token
            entries.append((piece, None, None))
        else:
            logprob = _logprob(j, prompt=True)
            entries.append((piece, logprob, dict(_top(piece, logprob, max(top, 1)))))
    for k in range(first, stop):
        token = generated_token(k)
        logprob = _logprob(k, prompt=False)
        entries.append((token, logprob, dict(_top(token, logprob, max(top, 1)))))
    offsets = []
    for token, _, _ in entries:
        offsets.append(offset)
        offset += len(token)
    body = {
        "text_offset": offsets,
        "token_logprobs": [logprob for _, logprob, _ in entries],
        "tokens": [token for token, _, _ in entries],
        "top_logprobs": [top_logprobs for _, _, top_logprobs in entries],
    }
    return encode(body)

"""Fake vLLM OpenAI-compatible server for development, demos, tests and benchmarks.

Modules: `app` (the ASGI app: routing, the /v1 API-key rule, the endpoints), `generation` (validate a chat
or text completion and plan its answer), `render` (its bodies and SSE frames), `tools` (forced tool calls,
whole and streamed), `embeddings`, `validation` (vLLM's request checks and messages), `request_ids` (vLLM's
response ids and X-Request-Id), `errors`, `stats` and `metrics` (counters, /metrics), `controls` (the
test-only /_fake/ endpoints), `config` (FakeConfig), `asgi` (plumbing), `cli` (options, uvicorn), and
`server`, the entry point callers import from.
"""

"""Fake vLLM OpenAI-compatible server for development, demos, tests and benchmarks."""

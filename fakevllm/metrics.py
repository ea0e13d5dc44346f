"""GET /metrics: a few of vLLM's Prometheus series, plus fakevllm's own request counters."""

from __future__ import annotations

from collections.abc import Sequence

from fakevllm.stats import Stats

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
Family = tuple[str, str, str, Sequence[tuple[str, float]]]  # name, type, help, (labels, value) samples


def render_metrics(s: Stats, models: Sequence[str]) -> str:
    """Return the Prometheus text exposition of the counters."""
    out: list[str] = []
    for name, kind, help_text, samples in [*_vllm_families(s, models), *_fake_families(s)]:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {float(value)}" for labels, value in samples)
    return "\n".join(out) + "\n"


def _vllm_families(s: Stats, models: Sequence[str]) -> list[Family]:
    """Return the vLLM series the fake keeps, with vLLM's names, help texts and labels."""
    return [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [(_model_labels(m), s.model_running.get(m, 0)) for m in models],
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(_model_labels(m), 0) for m in models],
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(_model_labels(m), v) for m, v in s.prompt_tokens.items()],
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(_model_labels(m), v) for m, v in s.generation_tokens.items()],
        ),
        (
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [(_model_labels(m, finished_reason=r), v) for (m, r), v in s.successes.items()],
        ),
    ]


def _fake_families(s: Stats) -> list[Family]:
    """Return fakevllm's own request counters."""
    return [
        (
            "fakevllm_requests_total",
            "counter",
            "Requests received, by path (not /_fake/).",
            [(f'{{path="{_label(p)}"}}', v) for p, v in s.by_path.items()],
        ),
        ("fakevllm_requests_running", "gauge", "Requests being answered.", [("", s.running)]),
        (
            "fakevllm_requests_aborted_total",
            "counter",
            "Requests whose client disconnected before the response finished.",
            [("", s.aborted)],
        ),
        ("fakevllm_requests_finished_total", "counter", "Requests answered completely.", [("", s.finished)]),
        (
            "fakevllm_requests_refused_total",
            "counter",
            "Connections closed without a response by refuse mode.",
            [("", s.refused)],
        ),
    ]


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model_labels(model: str, finished_reason: str | None = None) -> str:
    """Return vLLM's label set for a model (and optionally a finish reason)."""
    if finished_reason is None:
        return f'{{model_name="{_label(model)}"}}'
    return f'{{finished_reason="{finished_reason}",model_name="{_label(model)}"}}'

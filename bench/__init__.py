"""The benchmark harness of issue 7: the gateway against the fake vLLM directly, same machine, same run.

``python -m bench.run`` starts its own stack on 127.0.0.1 (two fake vLLM servers, the gateway pinned to
its own core, a Celery worker), drives it with a cheap closed-loop load generator, prints a table of
medians against the targets and writes JSON under ``bench/results/``. See ``bench/README.md``.
"""

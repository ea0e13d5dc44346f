"""Parts of the /v1 consumer that need no server: how the client's address is read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.consumers import GatewayConsumer


def client_ip(headers: list[tuple[bytes, bytes]], trusted: tuple[str, ...]) -> str | None:
    consumer = GatewayConsumer.__new__(GatewayConsumer)
    consumer.scope = {"client": ("127.0.0.1", 50000), "headers": headers}
    consumer.headers = dict(headers)
    consumer.repeated_headers = len(consumer.headers) != len(headers)
    consumer.rt = SimpleNamespace(trusted_proxies=trusted)  # type: ignore[assignment]
    return consumer._client_ip()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"198.51.100.7"], "198.51.100.7"),
        ([b"198.51.100.7", b"127.0.0.5"], "198.51.100.7"),  # a second trusted proxy added its own line
        ([b"198.51.100.7, 127.0.0.5"], "198.51.100.7"),  # the same chain on one line
        ([b"10.1.2.3", b"198.51.100.7"], "198.51.100.7"),  # the client's claim stays on the left
    ],
)
def test_forwarded_for_lines_are_read_as_one_list_through_a_chain_of_trusted_proxies(lines, expected):
    headers = [(b"host", b"gw"), *((b"x-forwarded-for", line) for line in lines)]
    assert client_ip(headers, ("127.0.0.0/8",)) == expected

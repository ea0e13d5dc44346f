"""Parts of the /v1 consumer that need no server: how the client's address is read, and how a wait for the
upstream is cut when the client leaves or its token is revoked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.auth import Principal
from gateway.consumers import ClientGone, GatewayConsumer
from gateway.consumers.base import RevokedMeanwhile
from gateway.revocation import RevocationWatcher


def quiet() -> dict[str, Any]:
    """The server's extension for a client that stays."""
    return {"portcullis.disconnect": {"lost": False, "on_lost": None}}


WHO = Principal(jti="jti-1", client_id="client-1", subject="client-1", scopes=frozenset(), exp=0)


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


def waiting_consumer(
    extensions: dict[str, Any] | None, receive: Any = None, watcher: RevocationWatcher | None = None
) -> GatewayConsumer:
    consumer = GatewayConsumer.__new__(GatewayConsumer)
    consumer.scope = {"extensions": extensions} if extensions is not None else {}
    consumer._receive = receive
    consumer.principal = WHO
    consumer.rt = SimpleNamespace(watcher=watcher or RevocationWatcher())  # type: ignore[assignment]
    return consumer


async def upstream_answer(cut: list[str]) -> str:
    try:
        await asyncio.sleep(5)  # an answer vLLM is still generating
    except asyncio.CancelledError:
        cut.append("cut")  # the upstream request is closed here (the context manager's exit)
        raise
    return "answer"


def test_a_wait_for_the_upstream_is_cut_when_the_server_says_the_client_has_gone():
    async def scenario() -> tuple[list[str], float, dict[str, Any]]:
        told: dict[str, Any] = {"lost": False, "on_lost": None}
        consumer, cut = waiting_consumer({"portcullis.disconnect": told}), list[str]()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: (told.update(lost=True), told["on_lost"]()))  # as connection_lost does
        started = loop.time()
        with pytest.raises(ClientGone):
            await consumer._unless_cut(upstream_answer(cut))
        return cut, loop.time() - started, told

    cut, waited, told = asyncio.run(scenario())
    assert cut == ["cut"]
    assert waited < 1
    assert told["on_lost"] is None  # nothing is called back once the wait is over


def test_a_client_gone_before_the_wait_began_cuts_it_at_once():
    async def scenario() -> list[str]:
        consumer, cut = (
            waiting_consumer({"portcullis.disconnect": {"lost": True, "on_lost": None}}),
            list[str](),
        )
        with pytest.raises(ClientGone):
            await consumer._unless_cut(upstream_answer(cut))
        return cut

    assert asyncio.run(scenario()) == ["cut"]


def test_without_the_servers_extension_the_wait_listens_for_http_disconnect():
    async def scenario() -> tuple[list[str], str]:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        consumer, cut = waiting_consumer(None, receive), list[str]()
        with pytest.raises(ClientGone):
            await consumer._unless_cut(upstream_answer(cut))
        quiet = waiting_consumer(None, lambda: asyncio.sleep(5))  # the client stays: the answer comes
        answer = await quiet._unless_cut(asyncio.sleep(0.01, result="answer"))
        return cut, answer

    assert asyncio.run(scenario()) == (["cut"], "answer")


def test_a_wait_cancelled_by_someone_else_stays_cancelled():
    async def scenario() -> None:
        consumer = waiting_consumer({"portcullis.disconnect": {"lost": False, "on_lost": None}})
        task = asyncio.create_task(consumer._unless_cut(upstream_answer([])))
        await asyncio.sleep(0.01)
        task.cancel()  # the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def secure(
    headers: list[tuple[bytes, bytes]],
    *,
    scheme: str = "http",
    peer: str = "127.0.0.1",
    trusted=("127.0.0.0/8",),
) -> bool:
    consumer = GatewayConsumer.__new__(GatewayConsumer)
    consumer.scope = {"scheme": scheme, "client": (peer, 50000), "headers": headers}
    consumer.headers = dict(headers)
    consumer.repeated_headers = len(consumer.headers) != len(headers)
    consumer.rt = SimpleNamespace(trusted_proxies=trusted)  # type: ignore[assignment]
    return consumer._secure()


@pytest.mark.parametrize(
    ("headers", "scheme", "peer", "expected"),
    [
        ([], "https", "198.51.100.7", True),  # TLS to this server itself
        ([], "http", "127.0.0.1", False),
        ([(b"x-forwarded-proto", b"https")], "http", "127.0.0.1", True),  # a trusted proxy took TLS
        ([(b"x-forwarded-proto", b"HTTPS ")], "http", "127.0.0.1", True),
        ([(b"x-forwarded-proto", b"https")], "http", "198.51.100.7", False),  # anyone else: not believed
        ([(b"x-forwarded-proto", b"https")], "http", "::ffff:127.0.0.1", True),  # a dual-stack listener
        ([(b"x-forwarded-proto", b"http")], "http", "127.0.0.1", False),
        ([(b"x-forwarded-proto", b"http, https")], "http", "127.0.0.1", False),  # the first value counts
        ([(b"x-forwarded-proto", b"http"), (b"x-forwarded-proto", b"https")], "http", "127.0.0.1", False),
        ([(b"x-forwarded-proto", b"https"), (b"x-forwarded-proto", b"http")], "http", "127.0.0.1", True),
    ],
)
def test_a_request_is_secure_over_tls_or_when_a_trusted_proxy_says_its_client_used_tls(
    headers, scheme, peer, expected
):
    assert secure(headers, scheme=scheme, peer=peer) is expected


def test_no_trusted_proxy_means_forwarded_proto_is_never_believed():
    assert secure([(b"x-forwarded-proto", b"https")], trusted=()) is False


@pytest.mark.parametrize("revoked", ["token", "client"])
def test_a_wait_for_the_upstream_is_cut_when_its_token_or_client_is_revoked(revoked):
    # a whole answer had reached a client whose token was revoked while vLLM wrote it
    async def scenario() -> tuple[list[str], float, RevocationWatcher]:
        watcher = RevocationWatcher()
        consumer, cut = waiting_consumer(quiet(), watcher=watcher), list[str]()
        push: dict[str, Any] = (
            {"jtis": [[WHO.jti, 2**31]]} if revoked == "token" else {"clients": [WHO.client_id]}
        )
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, watcher.apply, push)
        started = loop.time()
        with pytest.raises(RevokedMeanwhile):
            await consumer._unless_cut(upstream_answer(cut))
        return cut, loop.time() - started, watcher

    cut, waited, watcher = asyncio.run(scenario())
    assert cut == ["cut"]
    assert waited < 1
    assert watcher._watching == {}  # nothing is called back once the wait is over


def test_a_wait_under_a_token_revoked_before_it_began_is_cut_at_once():
    async def scenario() -> list[str]:
        watcher = RevocationWatcher()
        watcher.apply({"jtis": [[WHO.jti, 2**31]]})
        consumer, cut = waiting_consumer(quiet(), watcher=watcher), list[str]()
        with pytest.raises(RevokedMeanwhile):
            await consumer._unless_cut(upstream_answer(cut))
        return cut

    assert asyncio.run(scenario()) == ["cut"]


@pytest.mark.parametrize("revoked", ["token", "client"])
def test_a_push_cuts_the_waits_under_its_token_or_client_and_no_other(revoked):
    async def scenario() -> tuple[list[str], list[str], dict[str, int]]:
        watcher = RevocationWatcher()
        mine, cut = waiting_consumer(quiet(), watcher=watcher), list[str]()
        other = waiting_consumer(quiet(), watcher=watcher)
        other.principal = Principal(jti="jti-2", client_id="client-2", subject="c", scopes=frozenset(), exp=0)
        same_token = waiting_consumer(quiet(), watcher=watcher)  # a second request under the first token
        waits = [
            asyncio.create_task(mine._unless_cut(upstream_answer(cut))),
            asyncio.create_task(other._unless_cut(asyncio.sleep(0.2, result="answer"))),
            asyncio.create_task(same_token._unless_cut(upstream_answer(cut))),
        ]
        await asyncio.sleep(0.01)  # all three are waiting, registered
        watcher.apply({"jtis": [[WHO.jti, 2**31]]} if revoked == "token" else {"clients": [WHO.client_id]})
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
        return [type(o).__name__ for o in outcomes], cut, watcher._watched_jtis

    outcomes, cut, watched = asyncio.run(scenario())
    assert outcomes == ["RevokedMeanwhile", "str", "RevokedMeanwhile"]  # the other token's wait answered
    assert cut == ["cut", "cut"]
    assert watched == {}  # every wait, cut or answered, was forgotten


def test_whichever_cut_comes_first_is_the_one_reported():
    async def scenario() -> type[Exception]:
        watcher = RevocationWatcher()
        told: dict[str, Any] = {"lost": False, "on_lost": None}
        consumer = waiting_consumer({"portcullis.disconnect": told}, watcher=watcher)

        def both() -> None:
            told.update(lost=True)
            told["on_lost"]()  # the client left, and then its token was revoked, in one turn of the loop
            watcher.apply({"jtis": [[WHO.jti, 2**31]]})

        asyncio.get_running_loop().call_later(0.05, both)
        try:
            await consumer._unless_cut(upstream_answer([]))
        except (ClientGone, RevokedMeanwhile) as exc:
            return type(exc)
        raise AssertionError("the wait was not cut")

    assert asyncio.run(scenario()) is ClientGone

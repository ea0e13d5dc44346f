"""What a gateway process knows about revocations: the pushes it was told, and the database's record it
catches up with at start and on a timer (a process started later, a push missed, Redis restarted empty)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

import gateway.runtime
from authserver.models import RevokedAccessToken
from authserver.revocation import (
    PRUNE_EVERY_S,
    REVOKED_PAST_EXP_S,
    LocalRevocations,
    RevocationSnapshot,
    local_revocations,
)
from authserver.selectors import revocations_live
from authserver.services import client_disable
from authserver.tokens import jwt_unverified_claims
from gateway.auth import Principal
from gateway.conf import gateway_settings
from gateway.policy import FULL_RELOAD_S
from gateway.revocation import (
    REVOCATION_LATE_S,
    REVOCATION_RELOAD_S,
    REVOCATION_RETRY_S,
    RevocationWatcher,
)
from gateway.runtime import Runtime
from tests.conftest import basic_auth

SERVICE = Principal(jti="j-svc", client_id="c1", subject="c1", scopes=frozenset(), exp=0)


def recorded(
    *, jtis: tuple[str, ...] = (), clients: tuple[str, ...] = (), read_at: float
) -> RevocationSnapshot:
    return RevocationSnapshot(
        jtis=tuple((jti, int(time.time()) + 300) for jti in jtis), clients=frozenset(clients), read_at=read_at
    )


def test_catching_up_refuses_what_the_database_records_and_cuts_the_streams_running_under_it():
    watcher, cuts = RevocationWatcher(), list[str]()
    with watcher.watch(SERVICE, lambda: cuts.append("cut")):
        assert cuts == []
        changed = watcher.catch_up(recorded(jtis=(SERVICE.jti,), read_at=time.time()))
        assert cuts == ["cut"]
    assert watcher.is_revoked(SERVICE)
    assert changed["jtis"][0][0] == SERVICE.jti
    assert watcher.catch_up(recorded(jtis=(SERVICE.jti,), read_at=time.time()))["jtis"] == []  # known now


def test_catching_up_restores_a_client_whose_re_enabling_was_never_pushed():
    watcher = RevocationWatcher()
    watcher.apply({"clients": [SERVICE.client_id]})
    watcher.catch_up(recorded(read_at=time.time() + 1))  # read after the push: the client is enabled
    assert not watcher.is_revoked(SERVICE)


def test_a_push_newer_than_the_databases_record_is_not_undone_by_it():
    read_at = time.time()  # the read began, then a push came before it was applied
    watcher = RevocationWatcher()
    watcher.apply({"clients": [SERVICE.client_id]})
    watcher.catch_up(recorded(read_at=read_at))
    assert watcher.is_revoked(SERVICE)
    store = LocalRevocations()
    store.add({"clients": ["c2"]})
    store.catch_up(recorded(read_at=read_at))
    assert store.is_revoked("j", "c2")
    earlier = time.time()
    store.add({"restored_clients": ["c3"]})
    store.catch_up(recorded(clients=("c3",), read_at=earlier))  # disabled when read, enabled since
    assert not store.is_revoked("j", "c3")


@pytest.mark.django_db(transaction=True)  # the runtime reads the database from its own thread
def test_a_new_gateway_process_refuses_what_was_revoked_before_it_started(oauth, make_client, settings):
    settings.REDIS_URL = ""  # the embedded default: nothing outlives the process but the database
    reg, disabled = make_client(), make_client(name="Disabled")
    token = oauth.client_credentials(reg).json()["access_token"]
    disabled_token = oauth.client_credentials(disabled).json()["access_token"]
    auth = basic_auth(reg.client.client_id, reg.client_secret)
    assert oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=auth).status_code == 200
    client_disable(client=disabled.client, actor="user:root")
    revoked, of_disabled = (principal(t) for t in (token, disabled_token))
    assert local_revocations.is_revoked(revoked.jti, revoked.client_id)  # pushed within this process
    local_revocations.__init__()  # type: ignore[misc]  # a new process: it was told nothing

    async def start() -> Runtime:
        runtime = Runtime(gateway_settings())
        await runtime._revocations_reload()
        await runtime.http.close()
        return runtime

    runtime = asyncio.run(start())
    for who in (revoked, of_disabled):
        assert runtime.watcher.is_revoked(who)
        assert local_revocations.is_revoked(who.jti, who.client_id)  # what the embedded admission asks
    fresh = principal(oauth.client_credentials(reg).json()["access_token"])
    assert not runtime.watcher.is_revoked(fresh)


def principal(token: str) -> Principal:
    claims: dict[str, Any] = jwt_unverified_claims(token)
    return Principal(
        jti=claims["jti"], client_id=claims["client_id"], subject=claims["sub"], scopes=frozenset(), exp=0
    )


@pytest.mark.parametrize("redis_url", ["", "redis://127.0.0.1:1/0"])
def test_without_redis_keys_and_policies_are_read_as_often_as_revocations(settings, redis_url):
    """Another process's change (bin/manage) reaches an embedded server only by reading: with Redis it is
    pushed too, and the slow reads are only the safety net."""
    settings.REDIS_URL = redis_url

    async def intervals() -> tuple[float, float]:
        runtime = Runtime(gateway_settings())
        try:
            return runtime.reload_intervals()
        finally:
            await runtime.http.close()
            if runtime.redis is not None:
                await runtime.redis.aclose()

    keys_s, policies_s = asyncio.run(intervals())
    if redis_url:
        assert (keys_s, policies_s) == (gateway_settings().jwks_max_age_s, FULL_RELOAD_S)
    else:
        assert keys_s <= REVOCATION_RELOAD_S
        assert policies_s <= REVOCATION_RELOAD_S


@pytest.mark.django_db(transaction=True)  # the runtime reads the database from its own thread
def test_after_its_first_read_a_gateway_reads_only_what_was_revoked_since_and_a_margin_before(
    monkeypatch, settings
):
    settings.REDIS_URL = ""
    now, exp = timezone.now(), timezone.now() + timedelta(minutes=5)
    old, first, late, new = (uuid.uuid4() for _ in range(4))
    RevokedAccessToken.objects.create(jti=old, expires=exp)
    RevokedAccessToken.objects.create(jti=first, expires=exp)
    RevokedAccessToken.objects.filter(jti=old).update(revoked_at=now - timedelta(minutes=5))
    reads: list[RevocationSnapshot] = []

    def spy(**kwargs: Any) -> RevocationSnapshot:
        reads.append(revocations_live(**kwargs))
        return reads[-1]

    monkeypatch.setattr(gateway.runtime, "revocations_live", spy)

    async def reload(runtime: Runtime, *, last: bool) -> None:
        await runtime._revocations_reload()
        if last:
            await runtime.http.close()

    runtime = Runtime(gateway_settings())
    asyncio.run(reload(runtime, last=False))  # at start: every live row
    # Committed since: one revoked now, one revoked before the newest row read (its transaction committed
    # late) but within the margin.
    RevokedAccessToken.objects.create(jti=new, expires=exp)
    RevokedAccessToken.objects.create(jti=late, expires=exp)
    late_at = now - timedelta(seconds=REVOCATION_LATE_S - 5)
    RevokedAccessToken.objects.filter(jti=late).update(revoked_at=late_at)
    asyncio.run(reload(runtime, last=True))
    assert {jti for jti, _ in reads[0].jtis} == {str(old), str(first)}
    assert {jti for jti, _ in reads[1].jtis} == {str(first), str(late), str(new)}  # not the old one
    for jti in (old, first, late, new):
        assert runtime.watcher.is_revoked(replace(SERVICE, jti=str(jti)))
        assert local_revocations.is_revoked(str(jti), "c1")


def test_a_gateway_that_could_not_read_the_record_at_start_retries_every_second(monkeypatch, settings):
    settings.REDIS_URL = ""
    waits: list[float] = []
    answers: list[Any] = [RuntimeError("database down"), RuntimeError("still down")]

    def read(**kwargs: Any) -> RevocationSnapshot:
        if answers:
            raise answers.pop(0)
        return recorded(read_at=time.time())

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:
            raise asyncio.CancelledError

    async def run() -> Runtime:
        runtime = Runtime(gateway_settings())
        monkeypatch.setattr(gateway.runtime, "revocations_live", read)
        assert not await runtime._revocations_reload()  # at start: the database is down
        monkeypatch.setattr(asyncio, "sleep", sleep)
        with pytest.raises(asyncio.CancelledError):
            await runtime._revocations_loop()
        monkeypatch.undo()
        await runtime.http.close()
        return runtime

    asyncio.run(run())
    # Down at start and at the first retry, read at the second: then the usual interval.
    assert waits == [
        REVOCATION_RETRY_S,
        REVOCATION_RETRY_S,
        REVOCATION_RELOAD_S,
        REVOCATION_RELOAD_S,
        REVOCATION_RELOAD_S,
    ]


@pytest.mark.parametrize("store", ["gateway", "embedded"])
def test_expired_ids_are_dropped_on_a_timer_not_rebuilt_on_every_push(monkeypatch, store):
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    watcher, local = RevocationWatcher(), LocalRevocations()
    jtis = lambda: watcher._jtis if store == "gateway" else local._jtis  # noqa: E731
    push = watcher.apply if store == "gateway" else local.add
    push({"jtis": [(f"j{i}", clock[0] + 300) for i in range(20_000)]})
    push({"jtis": [("expiring", clock[0] - REVOKED_PAST_EXP_S + 1)]})
    held = jtis()
    for i in range(50):
        push({"jtis": [(f"k{i}", clock[0] + 300)]})
    assert jtis() is held  # no rebuild of 20k entries per push
    assert "expiring" in held
    clock[0] += PRUNE_EVERY_S
    push({"jtis": [("last", clock[0] + 300)]})
    assert "expiring" not in jtis()
    assert len(jtis()) == 20_051


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["redis_down_at_enable", "saved_past_the_services"])
def test_a_client_re_enabled_without_a_push_is_admitted_again_once_the_gateway_catches_up(
    oauth, make_client, redis_client, settings, how
):
    # A disabled client was a Redis key without expiry, checked by the reservation script, and deleted only
    # by the re-enabling's push: Redis down at that moment, or `disabled` saved in /admin/, left the client
    # refused by every gateway for good. Disabling revokes each of its tokens by id; the client is a push.
    from authserver.services import client_enable
    from gateway.ratelimit import Buckets, RedisLimiter, RevokedError
    from gateway.redisbatch import RedisBatcher
    from gateway.runtime import redis_pool_open
    from gateway.selectors import Policy

    reg = make_client()
    old = principal(oauth.client_credentials(reg).json()["access_token"])
    client_disable(client=reg.client, actor="user:root")
    redis_client.set(f"portcullis:revoked:client:{reg.client.client_id}", 1)  # what an older version left
    if how == "redis_down_at_enable":
        url, settings.REDIS_URL = settings.REDIS_URL, "redis://127.0.0.1:1/0"
        client_enable(client=reg.client, actor="user:root")  # the push fails (logged)
        settings.REDIS_URL = url
    else:
        reg.client.disabled = False
        reg.client.save()
    fresh = principal(oauth.client_credentials(reg).json()["access_token"])

    async def admitted(who: Principal) -> bool:
        limiter = RedisLimiter(RedisBatcher(redis_pool_open(settings.REDIS_URL)))
        try:
            buckets = Buckets.of(who, Policy(models=frozenset(), rpm=100))
            return (await limiter.admit(who, buckets, uuid.uuid4().hex, 1)).allowed
        except RevokedError:
            return False
        finally:
            await limiter.batcher.stop()
            await limiter.batcher.redis.aclose()

    watcher = RevocationWatcher()
    watcher.catch_up(revocations_live())
    assert not watcher.is_revoked(fresh)
    assert asyncio.run(admitted(fresh))
    assert not asyncio.run(admitted(old))  # its tokens stay revoked, each by its id

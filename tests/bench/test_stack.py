"""What the harness hands the processes it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psycopg
import pytest
from psycopg import sql

from bench.proc import _stat_fields, descendants
from bench.spawn import _terminate
from bench.stack import Service, Stack, StackError, StackOptions


@pytest.mark.parametrize(("wait", "sent"), [(None, None), (0, "0"), (1500, "1500")])
def test_the_gateways_redis_reply_wait_is_the_products_unless_the_run_sets_it(tmp_path, wait, sent):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_reply_wait_us=wait))
    stack.ports = {"fast": 8101, "paced": 8102, "gateway": 8103, "bare": 8104, "redis": 8105}  # as start()
    env = stack._env()
    assert env.get("PORTCULLIS_REDIS_REPLY_WAIT_US") == sent


@pytest.mark.parametrize(
    ("given", "sent"),
    [(None, "redis://127.0.0.1:8105/14"), ("redis://10.0.0.5:6380", "redis://10.0.0.5:6380/14")],
)
def test_the_processes_use_the_harnesss_own_redis_unless_the_run_names_one(tmp_path, given, sent):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_url=given))
    stack.ports = {"fast": 8101, "paced": 8102, "gateway": 8103, "bare": 8104}
    if given is None:
        stack.ports["redis"] = 8105  # start() picks a port for its own Redis only
    assert stack._env()["REDIS_URL"] == sent


class Spawned(Exception):
    pass


@pytest.mark.parametrize(("beside", "core"), [(False, 0), (True, 1)])
def test_the_harnesss_redis_shares_the_load_generators_core_unless_asked_for_the_gateways(
    tmp_path, monkeypatch, beside, core
):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_on_gateway_core=beside))
    stack.ports = {"redis": 8105}
    spawned = []

    def spawn(name: str, argv: list[str], pinned: int | None, port: int | None = None) -> Service:
        spawned.append((name, pinned))
        raise Spawned()

    monkeypatch.setattr(stack, "_spawn", spawn)
    with pytest.raises(Spawned):
        stack._redis_server()
    assert spawned == [("redis", core)]


def test_the_machine_note_says_where_redis_ran():
    from bench.report import machine_info

    assert "the harness's Redis and load generator to core 0" in machine_info([0, 1])["note"]
    external = machine_info([0, 1], own_redis=False)["note"]
    assert "PostgreSQL and the Redis of --redis-url unpinned" in external
    beside = machine_info([0, 1], redis_on_gateway_core=True)["note"]
    assert beside.startswith(
        "gateway, bare proxy and the harness's Redis pinned to core 1; fakes, worker and load"
    )
    assert (
        "gateway and bare proxy pinned"
        in machine_info([0, 1], own_redis=False, redis_on_gateway_core=True)["note"]
    )


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped)."""
    fields = _stat_fields(pid)
    assert fields is not None, f"process {pid} is gone"
    return fields[0]


@pytest.fixture
def worker_group(tmp_path):
    """A stand-in worker: a shell and its child in a process group of their own, as the harness starts it;
    the shell, like Celery's worker, handles SIGTERM (a stopped process acts on a handled signal only when
    continued; one whose default is to end it ends it even stopped)."""
    process = subprocess.Popen(["sh", "-c", 'trap "exit 0" TERM; sleep 60 & wait'], start_new_session=True)
    deadline = time.monotonic() + 5
    while not descendants(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield process, [process.pid, *descendants(process.pid)]
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("live", [False, True])
def test_the_worker_is_stopped_for_a_measurement_unless_it_ingests_live(tmp_path, worker_group, live):
    process, group = worker_group
    assert len(group) == 2
    stack = Stack(StackOptions(log_dir=tmp_path, ingest_live=live))
    stack.services.append(Service("worker", process, tmp_path / "worker.log"))
    stack.ingest_pause()
    deadline = time.monotonic() + (0.2 if live else 5)  # live: long enough for a stop to have shown
    while {_state(pid) for pid in group} != {"T"} and time.monotonic() < deadline:
        time.sleep(0.01)
    states = {_state(pid) for pid in group}
    assert "T" not in states if live else states == {"T"}  # the embedded beat stops too
    stack.ingest_resume()
    deadline = time.monotonic() + 5
    while "T" in {_state(pid) for pid in group} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "T" not in {_state(pid) for pid in group}


def test_a_worker_stopped_for_a_measurement_still_ends_on_its_first_signal(tmp_path, worker_group):
    process, group = worker_group
    stack = Stack(StackOptions(log_dir=tmp_path))
    stack.services.append(Service("worker", process, tmp_path / "worker.log"))
    stack.ingest_pause()  # as when the run is interrupted during a measurement
    _terminate(process, group[1:])
    assert process.returncode == 0  # its handler ran: not the SIGKILL that follows a grace period


def test_the_harness_refuses_a_database_another_run_is_using(tmp_path):
    server = "postgres://postgres:postgres@127.0.0.1:5432"
    name = f"bench_in_use_{os.getpid()}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            with psycopg.connect(f"{server}/{name}") as other_run:
                stack = Stack(StackOptions(log_dir=tmp_path, pg_url=server, db_name=name))
                with pytest.raises(StackError, match=f"the database {name} is in use .*--db-name"):
                    stack._database_create()
                assert other_run.execute("SELECT 1").fetchone() == (1,)  # its connection survived
            stack._database_create()  # left over and unused: dropped and made anew
            stack._database_drop()
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_worker_is_stopped_for_every_measurement_but_the_token_endpoints():
    """The token endpoint writes the audit chain itself: a worker stopped holding the chain's lock would
    stall it; the gateway's /v1 path touches no database."""
    from bench.scenarios import SCENARIOS, ingest_paused_for

    paused = {scenario.key: ingest_paused_for(scenario) for scenario in SCENARIOS if scenario.kind != "jwt"}
    assert paused.pop("token") is False
    assert len(paused) >= 6  # every load scenario
    assert all(paused.values())

"""Abuse budgets (issue 11, item 7): rotating device ids is no way around the per-device rate limit.

The app key is public, and a new device id starts with a full device bucket, so the per-app and per-peer
budgets (signals and new streams) bound what one client can do however many ids it invents. Real server on
port 0, raw device frames over real gRPC, the real Prometheus endpoint.
"""

from __future__ import annotations

import asyncio

import grpc

from cuepoint_server.api.limits import RateLimits
from cuepoint_server.clock import ManualClock

from .conftest import StartServer
from .test_e2e_security import SYNC_FAILURE, RawDevice, device, event, quota_violations, tracked_and_acked


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    body = (await reader.read()).decode()
    writer.close()
    return body


def sample(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


async def test_budgets_are_on_by_default_and_visible_in_metrics(start_server: StartServer) -> None:
    server = await start_server(SYNC_FAILURE, metrics_port=0)
    assert server.metrics_port is not None
    metrics = await scrape(server.metrics_port)
    for bucket in ("device", "app", "app_streams", "peer", "peer_streams"):
        assert sample(metrics, f'cuepoint_rate_limit_per_second{{bucket="{bucket}"}}') > 0, bucket
        assert sample(metrics, f'cuepoint_rate_limited_total{{bucket="{bucket}"}}') == 0
    # Loopback (this test, benchmarks, the operator's tools) is exempt from the per-peer buckets by default.
    clients = [await device(server, f"loop-{i}", api_key=None) for i in range(3)]
    for client in clients:
        await tracked_and_acked(client)
        await client.close()


async def test_rotating_device_ids_from_one_peer_hits_the_peer_budgets(
    start_server: StartServer, clock: ManualClock
) -> None:
    limits = RateLimits(peer_streams_rate=1, peer_streams_burst=3, peer_rate=10, peer_burst=30, peer_exempt=())
    server = await start_server(SYNC_FAILURE, rate_limits=limits, metrics_port=0)
    opened = []
    for i in range(3):  # each new id has a full device bucket; the peer's streams bucket does not
        raw = RawDevice(server.address)
        raw.hello(f"rotating-{i}")
        assert (await raw.read()).HasField("welcome")
        opened.append(raw)
    refused = RawDevice(server.address)
    refused.hello("rotating-3")
    error = await refused.failure()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_violations(error) == [("peer_streams:127.0.0.1", "peer rate limit: 1 new streams/s (burst 3)")]

    # Signals of all the peer's devices share one bucket: 30 - 3 Hellos = 27 left.
    opened[0].signals(*(event(f"a-{i}") for i in range(27)), batch_id="first")
    assert (await opened[0].read()).ack.batch_id == "first"
    opened[1].signals(event("b-0"), batch_id="second")
    error = await opened[1].failure()
    assert quota_violations(error) == [("peer:127.0.0.1", "peer rate limit: 10 signals/s (burst 30)")]
    assert await server.store.count_signals("rotating-1") == 0  # nothing of the refused batch applied

    assert server.metrics_port is not None
    metrics = await scrape(server.metrics_port)
    assert sample(metrics, 'cuepoint_rate_limited_total{bucket="peer_streams"}') == 1
    assert sample(metrics, 'cuepoint_rate_limited_total{bucket="peer"}') == 1
    assert sample(metrics, 'cuepoint_rate_limit_per_second{bucket="peer_streams"}') == 1

    # Budgets refill with time.
    clock.advance(10)
    later = RawDevice(server.address)
    later.hello("rotating-4")
    assert (await later.read()).HasField("welcome")
    for raw in (*opened, refused, later):
        await raw.close()


async def test_rotating_device_ids_hits_the_app_streams_budget_and_spares_other_apps(
    start_server: StartServer,
) -> None:
    server = await start_server(SYNC_FAILURE, rate_limits=RateLimits(app_streams_rate=1, app_streams_burst=2))
    opened = []
    for i in range(2):
        raw = RawDevice(server.address)
        raw.hello(f"fit-{i}")
        assert (await raw.read()).HasField("welcome")
        opened.append(raw)
    refused = RawDevice(server.address)
    refused.hello("fit-2")
    error = await refused.failure()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_violations(error) == [("app_streams:fitkit", "app rate limit: 1 new streams/s (burst 2)")]
    other = await device(server, "other", app_id="otherapp", api_key=None)
    await tracked_and_acked(other)
    await other.close()
    for raw in (*opened, refused):
        await raw.close()

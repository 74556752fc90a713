"""Memory under device churn: RSS after many distinct devices each connect, send signals and leave.

    .venv/bin/python bench/bench_churn.py [--devices 100000] [--signals 20] [--concurrency 100]
                                          [--resume-window 5] [--every 10000]

A real ``cuepoint serve`` (subprocess, temp SQLite file) with ``--resume-window`` seconds before a closed
session's state may be freed. Each device opens a stream (raw stubs), sends its Hello, one batch of
``--signals`` events, waits for the ack and closes. The server's VmRSS is sampled every ``--every``
devices, and once more after a resume window of quiet. A flat curve after warm-up means closed devices
cost nothing once their resume window has passed. There is no echo baseline: the bare echo keeps no
per-device state, so the question is only whether Cuepoint's RSS grows with the number of devices seen.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
from _common import (
    CUEPOINT_METHOD,
    PYTHON,
    BatchEncoder,
    ServerProcess,
    channel_options,
    hello_bytes,
    raw_method,
    temp_dir,
)

SCENARIO = """\
id: bench-churn
trigger: {event: help_me}
cue: {message: "Need a hand?", channel: chat}
"""


async def one_device(call_factory: object, encoder: BatchEncoder, n: int) -> None:
    call = call_factory()  # type: ignore[operator]
    await call.write(hello_bytes(f"churn-{n:07d}"))
    await call.read()  # welcome
    await call.write(encoder.encode(n, n * encoder.size))
    while True:
        message = await call.read()
        if message is grpc.aio.EOF or message.HasField("ack"):
            break
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass


async def main(args: argparse.Namespace) -> None:
    with temp_dir("churn") as tmp:
        folder = Path(tmp) / "scenarios"
        folder.mkdir()
        (folder / "s.yaml").write_text(SCENARIO)
        argv = [
            PYTHON, "-m", "cuepoint_server.cli", "serve", "--scenarios", str(folder), "--db", str(Path(tmp) / "c.db"),
            "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", "--log-json",
            "--resume-window", str(args.resume_window), "--device-rate", "0",
        ]  # fmt: skip
        server = await ServerProcess(argv, name="cuepoint", cpu=None, log_dir=Path(tmp)).start()
        channels = [grpc.aio.insecure_channel(server.address, options=channel_options()) for _ in range(10)]
        factories = [lambda ch=ch: raw_method(ch, CUEPOINT_METHOD)() for ch in channels]
        encoder = BatchEncoder(args.signals)
        started = time.perf_counter()
        print(f"{'devices':>8} {'RSS MB':>8} {'devices/s':>10}")
        print(f"{0:>8} {server.rss_kb() / 1024:>8.1f} {'':>10}", flush=True)
        next_n = 0
        lock = asyncio.Lock()
        done = 0
        samples: list[tuple[int, float]] = []

        async def worker(w: int) -> None:
            nonlocal next_n, done
            while True:
                async with lock:
                    n = next_n
                    next_n += 1
                if n >= args.devices:
                    return
                await one_device(factories[w % len(factories)], encoder, n)
                done += 1
                if done % args.every == 0:
                    rss = server.rss_kb() / 1024
                    samples.append((done, rss))
                    print(f"{done:>8} {rss:>8.1f} {done / (time.perf_counter() - started):>10,.0f}", flush=True)

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        await asyncio.sleep(args.resume_window + 2)
        print(f"after a resume window of quiet: {server.rss_kb() / 1024:.1f} MB", flush=True)
        for ch in channels:
            await ch.close()
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--signals", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--resume-window", type=float, default=5.0)
    parser.add_argument("--every", type=int, default=10_000)
    asyncio.run(main(parser.parse_args()))

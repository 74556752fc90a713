"""Shared helpers of the benchmarks: server subprocesses, pre-encoded raw messages, tables, JSON.

Not a benchmark itself. Every benchmark imports this module as ``_common`` (``bench/`` is the script
directory, so it is first on ``sys.path``).

Layout used by the network benchmarks on a 2-core machine: the server under test runs in its own process
and the load generator in the benchmark process, so each can have a core (pinning is optional, see _PIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import grpc

from cuepoint.v1 import common_pb2, device_pb2

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable

CUEPOINT_METHOD = "/cuepoint.v1.DeviceService/Connect"
ECHO_METHOD = "/benchecho.v1.Echo/Connect"

# Not pinned by default: pinning each process to its own core (CUEPOINT_BENCH_PIN=1) was measured to
# halve the bare echo here (grpc's threads of each process then leave both cores ~50% idle), so the OS
# schedules both processes; the tables show each process's CPU use.
_PIN = os.environ.get("CUEPOINT_BENCH_PIN", "") == "1"
SERVER_CPU: int | None = 0 if _PIN else None
CLIENT_CPU: int | None = 1 if _PIN else None

# Signal and batch ids are fixed-width decimal numbers so a whole batch can be pre-encoded once and
# only the digits substituted per send (see BatchEncoder).
ID_WIDTH = 16
_PLACEHOLDER = "~" * ID_WIDTH
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Written by the child before exec: pins the server process (and every thread it later starts).
_PIN_AND_EXEC = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])"


def note(message: str) -> None:
    """Progress text; always on stderr so ``--json`` output stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


# --- machine -----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import google.protobuf

    import cuepoint_server

    # The server code measured: normally this checkout; a snapshot elsewhere on PYTHONPATH (e.g. a
    # `git archive` of a commit, with a COMMIT file beside server/) is named as such.
    src = Path(cuepoint_server.__file__).resolve().parent.parent.parent
    commit = ""
    if (src / "COMMIT").exists():
        commit = f"{(src / 'COMMIT').read_text().strip()} (snapshot in {src})"
    else:
        try:
            commit = subprocess.run(
                ["git", "-C", str(src), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        except OSError:
            pass
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "event_loop": _event_loop,
        "platform": platform.platform(),
        "commit": commit,
        "busy_before_pct": _busy_before,
    }


_busy_before: float | None = None
_event_loop = "asyncio (default)"


def set_server_loop(loop: str) -> None:
    """Say in the report's header which loop the servers ran on (the load generator is always asyncio's)."""
    global _event_loop
    if loop != "asyncio":
        _event_loop = f"servers on {loop} (echo and Cuepoint alike), load generator on asyncio"


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def machine_busy(seconds: float = 0.5) -> float:
    """Share of all cores busy over ``seconds`` (call it while the benchmark itself is idle), in %."""
    busy0, total0 = _cpu_ticks()
    time.sleep(seconds)
    busy1, total1 = _cpu_ticks()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


def check_quiet(threshold: float = 15.0) -> float:
    """Warn when something else keeps the machine busy: every number here assumes two idle cores."""
    global _busy_before
    busy = _busy_before = machine_busy()
    if busy > threshold:
        note(
            f"WARNING: the machine is {busy:.0f}% busy before the benchmark starts (other processes); "
            "results will be low and noisy"
        )
    return busy


def pin_self(cpu: int | None) -> None:
    """Pin the calling process before grpc starts its threads (they inherit the mask)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    if cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})


def usable_cpu(cpu: int | None) -> int | None:
    if cpu is None or not hasattr(os, "sched_getaffinity"):
        return None
    return cpu if cpu in os.sched_getaffinity(0) and (os.cpu_count() or 1) > 1 else None


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (capped by the hard limit); returns the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User+system CPU seconds of a process, all threads included; of its thread ``tid`` only, if given."""
    user, system = proc_cpu_split(pid, tid)
    return user + system


def proc_cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (or of its thread ``tid``)."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CpuMeter:
    """CPU use of the server process and of this process over an interval, as % of one core.

    Also the server's main thread alone (`loop`): every server here runs its event loop there, and that
    one thread, not the process's total (gRPC's I/O threads, SQLite's), is what queues a round behind the
    others when busy (issue 13's latency target)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._t0 = time.perf_counter()
        self._s0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
        self._k0 = proc_cpu_split(server_pid)[1] if server_pid else 0.0
        self._l0 = proc_cpu_seconds(server_pid, server_pid) if server_pid else 0.0
        self._c0 = self_cpu_seconds()

    def read(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self._t0
        server = (proc_cpu_seconds(self.server_pid) - self._s0) if self.server_pid else math.nan
        client = self_cpu_seconds() - self._c0
        return 100 * server / elapsed, 100 * client / elapsed

    def system(self) -> float:
        """The server's system (kernel) CPU, % of one core since the meter started: its sockets' and its
        database's writes, the part a leaner Python path does not touch."""
        if not self.server_pid:
            return math.nan
        elapsed = time.perf_counter() - self._t0
        return 100 * (proc_cpu_split(self.server_pid)[1] - self._k0) / elapsed

    def loop(self) -> float:
        """The server's main thread (its event loop), % of one core since the meter started."""
        if not self.server_pid:
            return math.nan
        elapsed = time.perf_counter() - self._t0
        return 100 * (proc_cpu_seconds(self.server_pid, self.server_pid) - self._l0) / elapsed


# --- server subprocesses -----------------------------------------------------------------------------------


# How an error line of `cuepoint serve --log-json` spells its level (logs.py: compact JSON since 09a09be; the
# spaced form the benchmarks counted before matched nothing after that).
ERROR_LINE = b'"level":"error"'


class ServerProcess:
    """A server in a child process, pinned to one CPU; its output goes to a log file."""

    def __init__(self, argv: Sequence[str], *, name: str, cpu: int | None, log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.cpu = usable_cpu(cpu)
        self.log_path = log_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = self.argv
        if self.cpu is not None:
            argv = [PYTHON, "-c", _PIN_AND_EXEC, str(self.cpu), *argv]
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    async def start(self, limit: float = 60.0) -> ServerProcess:
        """Spawn, then wait (at most ``limit`` s) for the "listening on HOST:PORT" line."""
        self._proc = self._spawn()
        deadline = time.monotonic() + limit
        pattern = re.compile(rb"listening on (\S+)")
        while time.monotonic() < deadline:
            found = pattern.search(self.log_path.read_bytes())
            if found:
                self.address = found.group(1).decode()
                return self
            if self._proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.kill()
        raise RuntimeError(f"{self.name} did not start (exit {self._proc.poll()}):\n{tail}")

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def count_in_log(self, needle: bytes) -> int:
        return self.log_path.read_bytes().count(needle)

    def errors_in_log(self) -> int:
        """Error lines the server logged (``cuepoint serve --log-json`` writes compact JSON: no spaces)."""
        return self.count_in_log(ERROR_LINE)

    async def stop(self, limit: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL after ``limit`` s."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        await _wait_process(proc, limit)
        if proc.poll() is None:
            self.kill()
        return proc.returncode

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)


_METRICS_URL = re.compile(rb"metrics on (http://\S+)")
# The write transactions a Cuepoint server's store committed (metrics.py), for `scrape_counters`.
TRANSACTIONS_TOTAL = re.compile(r"^cuepoint_storage_transactions_total (\S+)$", re.M)


def _scrape(url: str, counters: Mapping[str, re.Pattern[str]]) -> dict[str, float]:
    with urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {name: sum(float(v) for v in pattern.findall(text)) for name, pattern in counters.items()}


async def scrape_counters(server: ServerProcess, counters: Mapping[str, re.Pattern[str]]) -> dict[str, float] | None:
    """Each of ``counters`` (a pattern over the Prometheus text, its matches summed) as the server's metrics
    endpoint reports it now; None if the server serves no metrics (``serve --metrics-port``)."""
    found = _METRICS_URL.search(server.log_path.read_bytes())
    if found is None:
        return None
    return await asyncio.to_thread(_scrape, found.group(1).decode(), counters)


async def _wait_process(proc: subprocess.Popen[bytes], limit: float) -> None:
    """Wait for a child to exit, at most ``limit`` seconds, without blocking the event loop."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(proc.wait, limit)


async def _reap(proc: subprocess.Popen[bytes], limit: float) -> None:
    """A profiler's child: let it finish writing (at most ``limit`` s), then kill it if it has not."""
    await _wait_process(proc, limit)
    if proc.poll() is None:
        proc.kill()


def cuepoint_server(
    scenarios: Path,
    db: Path,
    *,
    log_dir: Path,
    cpu: int | None = SERVER_CPU,
    log_level: str = "info",
    traced: Path | None = None,
    limits: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> ServerProcess:
    """`cuepoint serve` on a free loopback port (the real CLI, default settings).

    ``traced``: run it under ``_traced_server.py`` (tracemalloc; SIGUSR1 writes heap growth there).
    ``limits``: rate-limit flags (``BENCH_LIMITS`` lifts every budget above the load, so the benchmark
    measures the server, not its flood control; the buckets are still charged, so their cost is in).
    ``extra``: further ``serve`` flags (``--database``, ``--bus`` for the replica runs).
    """
    serve = [
        "serve", "--scenarios", str(scenarios), "--db", str(db),
        "--host", "127.0.0.1", "--port", "0", "--log-level", log_level, "--log-json",
        *limits, *extra,
    ]  # fmt: skip
    if traced is not None:
        argv = [PYTHON, str(BENCH_DIR / "_traced_server.py"), str(traced), "cuepoint", *serve]
    else:
        argv = [PYTHON, "-m", "cuepoint_server.cli", *serve]
    return ServerProcess(argv, name="cuepoint", cpu=cpu, log_dir=log_dir)


# Every budget far above what the load can send, but not off: the limiter still charges each message.
# The defaults (5,000 signals/s per device, 100,000 per app) would cap 50 streams below the echo and make
# the benchmark measure the flood control instead of the server.
BENCH_LIMITS: tuple[str, ...] = (
    "--device-rate", "1e9", "--device-burst", "1e9", "--app-rate", "1e9", "--app-burst", "1e9",
    "--app-streams-rate", "1e6", "--app-streams-burst", "1e6",
)  # fmt: skip


def echo_server(
    *, log_dir: Path, cpu: int | None = SERVER_CPU, traced: Path | None = None, loop: str = "asyncio"
) -> ServerProcess:
    """The bare echo; ``loop``: its event loop ("asyncio" or "uvloop", to compare with ``serve --event-loop``)."""
    if traced is not None:
        argv = [PYTHON, str(BENCH_DIR / "_traced_server.py"), str(traced), "echo", "serve", "--port", "0"]
    else:
        argv = [PYTHON, str(BENCH_DIR / "echo_server.py"), "serve", "--port", "0", "--loop", loop]
    return ServerProcess(argv, name="echo", cpu=cpu, log_dir=log_dir)


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=f"cuepoint-bench-{prefix}-")


# --- raw messages -----------------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


def raw_method(channel: grpc.aio.Channel, method: str) -> Any:
    """A stream-stream multicallable that sends pre-encoded bytes and parses ServerMessage."""
    return channel.stream_stream(
        method, request_serializer=_identity, response_deserializer=device_pb2.ServerMessage.FromString
    )


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        # grpc shares one connection between channels with equal settings; a local pool gives each
        # channel its own, so "streams per channel" is also streams per TCP connection (1 = a phone each).
        ("grpc.use_local_subchannel_pool", 1),
    ]


def hello_bytes(
    device_id: str,
    *,
    tier: str = "free",
    app_id: str = "bench",
    accepts_cue_ack: bool = False,
    accepts_ack_groups: bool = False,
) -> bytes:
    hello = device_pb2.Hello(
        app_id=app_id,
        device_id=device_id,
        context=common_pb2.Context(
            app_version="4.2.0", os="iOS", os_version="17.4", device_model="iPhone15,2", locale="en_US"
        ),
        user=common_pb2.UserIdentity(user_id=f"user-{device_id}", tier=tier),
        consent=common_pb2.Consent(level=common_pb2.CONSENT_LEVEL_FULL),
        sdk_version="cuepoint-bench/raw",
        accepts_cue_ack=accepts_cue_ack,
        accepts_ack_groups=accepts_ack_groups,
    )
    data: bytes = device_pb2.DeviceMessage(hello=hello).SerializeToString()
    return data


def decline_bytes(cue_id: str) -> bytes:
    response = device_pb2.CueResponse(cue_id=cue_id, kind=common_pb2.CUE_RESPONSE_KIND_DECLINED)
    response.time.GetCurrentTime()
    data: bytes = device_pb2.DeviceMessage(cue_response=response).SerializeToString()
    return data


DEFAULT_PROPS: dict[str, str | int] = {"screen": "home", "n": 7}


class BatchEncoder:
    """``DeviceMessage{signals: SignalBatch}`` of ``size`` event signals, encoded once.

    Encoding a 100-signal batch with the protobuf API costs ~440 us of Python on this machine, more than
    the bare echo spends per message, so the load generator would be the bottleneck. Instead the message
    is serialized once with placeholder ids and each send substitutes fresh fixed-width decimal ids
    (``%016d``), ~10x cheaper. Signal times and ``sent_at`` are the encoder's creation time: the server
    moves them onto its clock with the ``sent_at`` offset, so they are always "now" there.
    """

    def __init__(self, size: int, event: str = "screen_view", props: dict[str, str | int] | None = None):
        stamp = common_pb2.Signal().time
        stamp.GetCurrentTime()
        values = {
            key: common_pb2.AttributeValue(string_value=v)
            if isinstance(v, str)
            else common_pb2.AttributeValue(int_value=v)
            for key, v in (DEFAULT_PROPS if props is None else props).items()
        }
        signals = [
            common_pb2.Signal(id=_PLACEHOLDER, time=stamp, event=common_pb2.Event(name=event, properties=values))
            for _ in range(size)
        ]
        batch = device_pb2.SignalBatch(batch_id=_PLACEHOLDER, sent_at=stamp, signals=signals)
        self._set_template(device_pb2.DeviceMessage(signals=batch), size)

    def _set_template(self, message: device_pb2.DeviceMessage, size: int) -> None:
        """Serialize once; the batch id and the ``size`` signal ids become ``%016d`` slots for encode()."""
        raw = message.SerializeToString()
        template = raw.replace(b"%", b"%%").replace(_PLACEHOLDER.encode(), b"%016d")
        if template.count(b"%016d") != size + 1:
            raise RuntimeError("placeholder collided with encoded bytes; cannot build the template")
        self.size = size
        self._template = template

    def encode(self, batch_no: int, first_signal: int) -> bytes:
        """Batch ``batch_no`` carrying signal ids ``first_signal .. first_signal + size - 1``."""
        data: bytes = self._template % (batch_no, *range(first_signal, first_signal + self.size))
        return data


class ColumnEncoder(BatchEncoder):
    """``DeviceMessage{signal_columns: SignalColumns}`` of ``size`` event signals, encoded once (as BatchEncoder).

    The columnar form the SDK sends by default: one string table, ids as one space-separated field, packed
    times and property columns, the properties' keys and types once for the batch. The same events as
    ``BatchEncoder`` (name, two properties, one time).
    """

    def __init__(self, size: int, event: str = "screen_view", props: dict[str, str | int] | None = None):
        stamp = common_pb2.Signal().time
        stamp.GetCurrentTime()
        strings = [event]
        keys: list[int] = []
        types: list[int] = []
        text: list[int] = []
        ints: list[int] = []
        for key, value in (DEFAULT_PROPS if props is None else props).items():
            strings.append(key)
            keys.append(len(strings) - 1)
            if isinstance(value, str):
                strings.append(value)
                types.append(device_pb2.PROPERTY_TYPE_STRING)
                text.append(len(strings) - 1)
            else:
                types.append(device_pb2.PROPERTY_TYPE_INT)
                ints.append(value)
        micros = stamp.seconds * 1_000_000 + stamp.nanos // 1000
        columns = device_pb2.SignalColumns(
            batch_id=_PLACEHOLDER,
            sent_at=stamp,
            strings=strings,
            ids=" ".join([_PLACEHOLDER] * size),
            times_us=[micros] * size,
            names=[0] * size,
            # Every event with the same properties: their keys and types once (shape_keys), as the SDK sends a
            # uniform batch to a server whose Welcome accepts it.
            shape_keys=keys,
            shape_types=types,  # type: ignore[arg-type]
            string_values=text * size,
            int_values=ints * size,
        )
        self._set_template(device_pb2.DeviceMessage(signal_columns=columns), size)


# Batch shapes on the wire: a SignalBatch of Signal messages, or the columnar SignalColumns.
SHAPES = ("rows", "columns")


def encoder(shape: str, size: int, event: str = "screen_view", props: dict[str, str | int] | None = None) -> Any:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    return (ColumnEncoder if shape == "columns" else BatchEncoder)(size, event, props)


# --- raw throughput load (shared by the echo baseline and Cuepoint raw-stub runs) --------------------------


@dataclass
class Tally:
    acked: int = 0  # signals acknowledged by the server
    acks: int = 0  # ack messages
    other: int = 0  # any other server message after the welcome
    failures: list[str] = field(default_factory=list)


@dataclass
class Throughput:
    label: str
    streams: int
    batch: int
    signals_per_s: float
    messages_per_s: float
    seconds: float
    server_cpu_pct: float
    client_cpu_pct: float
    failures: int
    shape: str = "rows"
    # Of server_cpu_pct, what the kernel spent (CpuMeter.system); nan where not measured.
    server_sys_pct: float = math.nan

    @property
    def server_us_per_signal(self) -> float:
        """CPU microseconds the server process spent per acked signal, all its threads."""
        return 1e4 * self.server_cpu_pct / self.signals_per_s if self.signals_per_s else math.nan

    @property
    def server_sys_us_per_signal(self) -> float:
        """Of server_us_per_signal, the system (kernel) part."""
        return 1e4 * self.server_sys_pct / self.signals_per_s if self.signals_per_s else math.nan

    @property
    def client_us_per_signal(self) -> float:
        return 1e4 * self.client_cpu_pct / self.signals_per_s if self.signals_per_s else math.nan

    def row(self) -> list[str]:
        return [
            self.label,
            str(self.streams),
            f"{self.shape} x{self.batch}",
            f"{self.signals_per_s:,.0f}",
            f"{self.messages_per_s:,.0f}",
            f"{self.server_cpu_pct:.0f}%",
            f"{self.client_cpu_pct:.0f}%",
            f"{self.server_us_per_signal:.2f}",
            f"{self.server_sys_us_per_signal:.2f}",
            f"{self.client_us_per_signal:.2f}",
        ]


THROUGHPUT_HEADERS = [
    "run", "streams", "batch shape", "signals/s", "msgs/s", "server cpu", "client cpu",
    "server us/sig", "of it system", "client us/sig",
]  # fmt: skip


async def open_raw_streams(
    address: str,
    method: str,
    device_ids: Sequence[str],
    *,
    streams_per_channel: int = 1,
    concurrency: int = 200,
    tier: str = "free",
    accepts_cue_ack: bool = False,
    accepts_ack_groups: bool = False,
) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """Open one stream per device id, send its Hello and wait for the Welcome.

    ``accepts_cue_ack``: announce in the Hello that a cue may carry its batch's ack (ServerMessage.cue_ack);
    ``accepts_ack_groups``: that several batches' acks may come as one message (ServerMessage.acks)."""
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = [None] * len(device_ids)
    gate = asyncio.Semaphore(concurrency)
    per = max(1, streams_per_channel)
    for _ in range(0, len(device_ids), per):
        channels.append(grpc.aio.insecure_channel(address, options=channel_options()))

    async def one(i: int) -> None:
        async with gate:
            call = raw_method(channels[i // per], method)()
            await call.write(
                hello_bytes(
                    device_ids[i], tier=tier, accepts_cue_ack=accepts_cue_ack, accepts_ack_groups=accepts_ack_groups
                )
            )
            first = await asyncio.wait_for(call.read(), 30)
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
                raise RuntimeError(f"stream {i}: expected a Welcome, got {first!r}")
            calls[i] = call

    await asyncio.gather(*(one(i) for i in range(len(device_ids))))
    return channels, calls


async def serve_until_signalled(server: grpc.aio.Server, announcement: str) -> None:
    """Start a benchmark's own server, print ``announcement`` (the "listening on" line ServerProcess waits
    for), and serve until SIGINT or SIGTERM."""
    await server.start()
    print(announcement, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


async def close_channels(channels: Iterable[grpc.aio.Channel], calls: Iterable[Any] = ()) -> None:
    for call in calls:
        if call is not None:
            call.cancel()
    await asyncio.gather(*(ch.close(grace=None) for ch in channels), return_exceptions=True)


async def raw_throughput(
    address: str,
    method: str,
    *,
    label: str,
    streams: int,
    batch: int,
    window: int,
    seconds: float,
    warmup: float,
    server_pid: int | None,
    streams_per_channel: int = 1,
    prefix: str = "raw",
    shape: str = "rows",
) -> Throughput:
    """Signals/s acked over ``seconds`` after ``warmup``, with ``window`` batches in flight per stream.

    The same code drives the bare echo and Cuepoint, so the two numbers differ only by the server.
    ``shape``: "rows" (SignalBatch) or "columns" (SignalColumns, what the SDK sends). As the Python SDK does,
    the Hello asks for grouped acks (ServerMessage.acks: Cuepoint acks what one commit stored in one message;
    the echo answers each message at once, so it sends none).
    """
    batches = encoder(shape, batch)
    device_ids = [f"{prefix}-{i:05d}" for i in range(streams)]
    channels, calls = await open_raw_streams(
        address, method, device_ids, streams_per_channel=streams_per_channel, accepts_ack_groups=True
    )
    tally = Tally()
    # Bounded in count as well as time: no stream sends more than this many batches.
    max_batches = max(1000, int(2_000_000 / batch))

    async def drive(call: Any) -> None:
        credits = asyncio.Semaphore(window)

        async def read() -> None:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("kind")
                if kind == "ack" or kind == "acks":
                    for ack in message.acks.acks if kind == "acks" else (message.ack,):
                        tally.acked += len(ack.signal_ids)
                        tally.acks += 1
                        credits.release()
                else:
                    tally.other += 1

        reader = asyncio.create_task(read())
        try:
            next_signal = 1
            for batch_no in range(1, max_batches + 1):
                await credits.acquire()
                await call.write(batches.encode(batch_no, next_signal))
                next_signal += batch
            await reader
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed stream is reported, not fatal to the run
            tally.failures.append(repr(exc))
        finally:
            reader.cancel()

    tasks = [asyncio.create_task(drive(call)) for call in calls]
    try:
        await asyncio.sleep(warmup)
        start_signals, start_acks = tally.acked, tally.acks
        meter = CpuMeter(server_pid)
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        signals, acks = tally.acked - start_signals, tally.acks - start_acks
        server_cpu, client_cpu = meter.read()
        server_sys = meter.system()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_channels(channels, calls)
    if tally.failures:
        note(f"  {label}: {len(tally.failures)} stream(s) failed, first: {tally.failures[0]}")
    return Throughput(
        label, streams, batch, signals / elapsed, acks / elapsed, elapsed, server_cpu, client_cpu,
        len(tally.failures), shape, server_sys,
    )  # fmt: skip


# --- statistics and output --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Metric:
    """One line of a benchmark's summary (and of run_all's table)."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None
    # ratio = value / baseline; None when there is no baseline
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.baseline and self.ratio is None and not math.isnan(self.value):
            self.ratio = self.value / self.baseline


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def met_text(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def metric_rows(metrics: Iterable[Metric]) -> list[list[str]]:
    return [
        [
            m.name,
            fmt(m.value, m.unit),
            fmt(m.baseline, m.unit) if m.baseline is not None else "-",
            f"{m.ratio:.2f}x" if m.ratio is not None else "-",
            m.target or "-",
            met_text(m.met),
        ]
        for m in metrics
    ]


METRIC_HEADERS = ["metric", "value", "baseline (bare echo)", "ratio", "target", "met?"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(str(h)), *(len(str(r[i])) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            text = str(cell)
            # First column left-aligned, numbers right-aligned.
            out.append(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def report(
    bench: str,
    *,
    as_json: bool,
    sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]],
    metrics: Sequence[Metric],
    summary: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Print the tables and the final summary line, or (``--json``) one JSON document."""
    if as_json:
        doc = {
            "bench": bench,
            "machine": machine_info(),
            "metrics": [asdict(m) for m in metrics],
            "summary": summary,
            "details": details or {},
        }
        print(json.dumps(_clean(doc), indent=2))
        return
    info = machine_info()
    print(
        f"{bench}: {info['cores']} cores, Python {info['python']}, grpcio {info['grpcio']}, "
        f"protobuf {info['protobuf']}, {info['event_loop']}, {info['date']}, tree {info['commit']}"
        + (f", machine {_busy_before:.0f}% busy before start" if _busy_before is not None else "")
    )
    for title, headers, rows in sections:
        print()
        print(title)
        print(table(headers, rows))
    if metrics:
        print()
        print("summary")
        print(table(METRIC_HEADERS, metric_rows(metrics)))
    print()
    print(summary)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (json.dumps would write invalid NaN tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# --- optional profiling of the server process with py-spy --------------------------------------------------


def find_py_spy(explicit: str | None) -> str | None:
    """py-spy is not a dependency: use --py-spy PATH, $PY_SPY, or one on PATH."""
    import shutil

    for candidate in (explicit, os.environ.get("PY_SPY"), shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


# What a server's CPU is spent in, by shared object (``perf report --sort dso``), as bench_latency.py --perf
# groups it: the interpreter (Python work, on or off the GIL), the kernel (sockets, thread switches), gRPC's C
# core, SQLite, libc and protobuf's C module; what matches none of these prefixes is "other".
PERF_GROUPS = (
    ("interpreter", "libpython"),
    ("kernel", "[kernel"),
    ("gRPC C core", "cygrpc"),
    ("SQLite", "libsqlite"),
    ("libc", "libc."),
    ("protobuf", "_message"),
)
_PERF_LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S.*?)\s*$")
_PERF_COUNT = re.compile(r"Event count \(approx\.\): (\d+)")


def find_perf() -> str | None:
    """Linux perf, if installed (bench_latency.py --perf)."""
    import shutil

    return shutil.which("perf")


class PerfByObject:
    """``perf record`` of a pid (all its threads) for a while; then its CPU seconds and their shares by object.

    py-spy sees Python frames only; this sees the whole process on its core: the kernel's socket work and
    thread switches, gRPC's C core and SQLite's C code, which a floor comparison needs (issue 13). It samples
    the ``cpu-clock`` software event, whose count is nanoseconds, so it works in VMs without a PMU.
    """

    def __init__(self, exe: str, pid: int, seconds: float, out: Path) -> None:
        self._exe = exe
        self.out = out
        self.cpu_seconds = 0.0
        self.shares: dict[str, float] = {}  # shared object -> fraction of the samples
        self._proc = subprocess.Popen(
            [exe, "record", "-e", "cpu-clock", "-F", "2000", "-p", str(pid), "-o", str(out), "--", "sleep",
             f"{seconds:g}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def wait(self, limit: float = 60.0) -> None:
        await _reap(self._proc, limit)
        if not self.out.exists():
            return
        report = await asyncio.to_thread(
            subprocess.run,
            [self._exe, "report", "-i", str(self.out), "--sort", "dso", "--stdio"],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in report.stdout.splitlines():
            if counted := _PERF_COUNT.search(line):
                self.cpu_seconds = int(counted.group(1)) / 1e9
            elif not line.startswith("#") and (share := _PERF_LINE.match(line)):
                self.shares[share.group(2)] = float(share.group(1)) / 100

    def by_group(self) -> dict[str, float]:
        """CPU seconds per PERF_GROUPS name, and "other"."""
        grouped = dict.fromkeys([name for name, _ in PERF_GROUPS] + ["other"], 0.0)
        for dso, share in self.shares.items():
            name = next((n for n, prefix in PERF_GROUPS if dso.startswith(prefix)), "other")
            grouped[name] += share * self.cpu_seconds
        return grouped


# Samples per second; PY_SPY_RATE=1000 gives a short run's profile enough samples to fold by caller.
_PY_SPY_RATE = os.environ.get("PY_SPY_RATE", "200")


class PySpy:
    """``py-spy record --gil`` of a pid for a while; then the hottest functions.

    ``--gil`` keeps only samples of the thread holding the GIL: the event loop's Python work (and
    aiosqlite's Python side), i.e. what competes for the one core the server's Python can use; SQLite's
    and grpc's C work outside the GIL and idle waits are not in these percentages.
    """

    def __init__(self, exe: str, pid: int, seconds: float, out: Path) -> None:
        self.out = out
        self.raw = ""
        self._proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", _PY_SPY_RATE,
             "--format", "raw", "--function", "--gil", "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def wait(self, limit: float = 30.0) -> None:
        """Wait for py-spy to finish and keep its samples (the output file may live in a temp dir)."""
        await _reap(self._proc, limit)
        self.raw = self.out.read_text(errors="replace") if self.out.exists() else ""

    def _lines(self) -> list[tuple[list[str], int]]:
        out = []
        for line in self.raw.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if stack and count_text.isdigit():
                out.append((stack.split(";")[1:], int(count_text)))  # first entry is the thread
        return out

    def top(self, n: int = 15) -> tuple[int, list[tuple[str, float, float]]]:
        """(samples, [(function, self %, inclusive %)]) of the Python frames, busiest first."""
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for stack, count in self._lines():
            frames = [_short_frame(f) for f in stack]
            if not frames:
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
        ranked = sorted(own, key=lambda f: own[f], reverse=True)[:n]
        return total, [(f, 100 * own[f] / total, 100 * inclusive[f] / total) for f in ranked]

    def top_inclusive(self, n: int = 15, contains: str = "cuepoint_server") -> list[tuple[str, float]]:
        """Cuepoint's own functions by inclusive share of the samples."""
        inclusive: dict[str, int] = {}
        total = 0
        for stack, count in self._lines():
            total += count
            for frame in {f for f in stack if contains in f}:
                short = _short_frame(frame)
                inclusive[short] = inclusive.get(short, 0) + count
        ranked = sorted(inclusive, key=lambda f: inclusive[f], reverse=True)[:n]
        return [(f, 100 * inclusive[f] / max(1, total)) for f in ranked]


def _short_frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function and file:line.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, lineno = where.rpartition(":")
    marker = "site-packages/"
    if marker in path:
        path = path.split(marker, 1)[1]
    elif "/server/" in path:
        path = path.split("/server/", 1)[1]
    elif "/sdk_python/" in path:
        path = path.split("/sdk_python/", 1)[1]
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{name} ({path}:{lineno})" if path else name

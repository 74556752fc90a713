"""Run a server with tracemalloc on, for ``bench_memory.py --tracemalloc``. Not a benchmark.

    python bench/_traced_server.py OUT.json cuepoint serve --scenarios DIR --db PATH --port 0 ...
    python bench/_traced_server.py OUT.json echo serve --port 0

Each SIGUSR1 takes a snapshot of the Python heap; from the second one on, the growth since the first
is written to OUT.json (atomically): by allocating line and by file, with block counts. Only
allocations made through Python's allocators are traced (objects, dicts, protobuf messages' Python
wrappers, ...), not grpc C-core's own buffers; for those the report adds glibc's heap in use
(``mallinfo2``: C-core, OpenSSL, protobuf's C++ messages) and SQLite's own allocator (page caches,
``sqlite3_memory_used``), each as growth since the first snapshot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def _diff(new: tracemalloc.Snapshot, old: tracemalloc.Snapshot, key: str, top: int) -> list[dict[str, object]]:
    stats = sorted(new.compare_to(old, key), key=lambda s: s.size_diff, reverse=True)[:top]
    out = []
    for stat in stats:
        frame = stat.traceback[0]
        where = frame.filename
        for marker in ("site-packages/", "/server/", "/lib/python3"):
            if marker in where:
                where = where.split(marker, 1)[1]
                break
        out.append(
            {
                "where": f"{where}:{frame.lineno}" if key == "lineno" else where,
                "size_diff": stat.size_diff,
                "count_diff": stat.count_diff,
            }
        )
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _c_heap() -> dict[str, int]:
    """Bytes in use by glibc malloc (small and mmapped blocks) and by SQLite's allocator; -1 if unknown."""
    out = {"malloc_in_use": -1, "sqlite_in_use": -1}
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        out["malloc_in_use"] = int(info.uordblks + info.hblkhd)
    except (OSError, AttributeError):
        pass
    try:
        import _sqlite3

        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or _sqlite3.__file__)
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        out["sqlite_in_use"] = int(lib.sqlite3_memory_used())
    except (OSError, AttributeError, ImportError):
        pass
    return out


def main() -> int:
    out = Path(sys.argv[1])
    kind, rest = sys.argv[2], sys.argv[3:]
    tracemalloc.start(1)
    snapshots: list[tracemalloc.Snapshot] = []
    c_heaps: list[dict[str, int]] = []
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__)]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        snapshots.append(tracemalloc.take_snapshot().filter_traces(exclude))
        c_heaps.append(_c_heap())
        if len(snapshots) < 2:
            return
        first, last = snapshots[0], snapshots[-1]
        total_new = sum(s.size for s in last.statistics("filename"))
        total_old = sum(s.size for s in first.statistics("filename"))
        blocks_new = sum(s.count for s in last.statistics("filename"))
        blocks_old = sum(s.count for s in first.statistics("filename"))
        doc = {
            "traced_diff": total_new - total_old,
            "blocks_diff": blocks_new - blocks_old,
            "by_line": _diff(last, first, "lineno", 30),
            "by_file": _diff(last, first, "filename", 15),
            # glibc's count includes the Python heap's large blocks (> 512 bytes) and tracemalloc's own.
            **{f"{k}_diff": v - c_heaps[0][k] for k, v in c_heaps[-1].items() if v >= 0 and c_heaps[0][k] >= 0},
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, out)

    signal.signal(signal.SIGUSR1, on_signal)
    if kind == "cuepoint":
        from cuepoint_server.cli import main as cuepoint_main

        return cuepoint_main(rest)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from echo_server import main as echo_main

    return echo_main(rest)


if __name__ == "__main__":
    sys.exit(main())

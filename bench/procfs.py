"""Process-tree memory and CPU from /proc (Linux), the same way for both agents.

RSS (and its anonymous part, and PSS) is summed over the process and all its descendants; CPU is
utime+stime of the same tree.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TreeSample", "cpu_model", "descendants", "loadavg", "sample_tree"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class TreeSample:
    """One reading of a process tree: resident memory in bytes (all, anonymous, proportional), CPU seconds."""

    pids: tuple[int, ...]
    rss_bytes: int
    #: heap and stacks: the part of RSS that no other process or file mapping can share
    rss_anon_bytes: int
    #: RSS with each shared page divided among the processes mapping it (other bao/python processes here)
    pss_bytes: int
    cpu_seconds: float


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            kids += [int(p) for p in text.split()]
    except OSError:
        return kids
    return kids


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (threads are not separate entries)."""
    seen, todo = [], [pid]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        todo += _children(cur)
    return seen


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # the command name may hold spaces and parentheses: fields start after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def _rss_bytes(pid: int) -> int:
    resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
    return int(resident) * _PAGE


def _rss_anon_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def sample_tree(pid: int) -> TreeSample:
    """RSS, PSS and CPU seconds summed over `pid` and its descendants (processes that vanish are skipped)."""
    rss = anon = pss = 0
    cpu = 0.0
    alive: list[int] = []
    for p in descendants(pid):
        try:
            rss += _rss_bytes(p)
            anon += _rss_anon_bytes(p)
            cpu += _cpu_seconds(p)
            pss += _pss_bytes(p)
        except (OSError, ValueError, IndexError):
            continue
        alive.append(p)
    return TreeSample(tuple(alive), rss, anon, pss, cpu)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg says them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else the machine type."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()

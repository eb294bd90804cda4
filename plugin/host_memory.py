"""This process's host memory: now, its peak, and by kind (allocated vs mapped-file pages) over a span."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import psutil


def host_rss() -> int:
    """This process's resident memory now, in bytes."""
    return psutil.Process(os.getpid()).memory_info().rss


def _proc_status() -> dict[str, int]:
    """This process's memory fields of Linux's ``/proc/self/status`` (``VmHWM``, ``RssAnon``, ...) in bytes;
    empty where there is no such file."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if value.strip().endswith(" kB"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def host_peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec`` and counts the parent's memory
    at the fork, so a process started by a large one would report the parent's peak as its own.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    hwm = _proc_status().get("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class HostMemorySampler:
    """Peaks of this process's resident memory by kind, sampled from a daemon thread while entered (Linux).

    ``VmHWM`` cannot tell a process's own allocations from the pages of the memory-mapped files it read
    (a safetensors checkpoint): this keeps ``RssAnon`` (allocations) and ``RssFile`` (mapped file pages,
    which the kernel may drop and read again) apart, each with its own peak since the last :meth:`reset`
    (so the two peaks may come from different moments), and the peak of ``total`` (anon + file + shmem,
    i.e. ``VmRSS``). Where ``/proc/self/status`` has no such fields, :attr:`available` is False. Use once.

    Args:
        interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-memory-sampler")
        self.available = self.sample() is not None
        self.reset()

    @staticmethod
    def sample() -> dict[str, int] | None:
        """``anon``, ``file`` and ``total`` resident bytes now, or None where the kernel does not say."""
        status = _proc_status()
        if "RssAnon" not in status or "RssFile" not in status:
            return None
        anon, file = status["RssAnon"], status["RssFile"]
        return {"anon": anon, "file": file, "total": anon + file + status.get("RssShmem", 0)}

    def reset(self) -> None:
        """Starts the peaks afresh from now (:attr:`start` holds this moment's sample)."""
        with self._lock:
            self.start = self.sample() or {"anon": 0, "file": 0, "total": 0}
            self.peak = dict(self.start)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = self.sample()
            with self._lock:
                for key, value in (now or {}).items():
                    self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> HostMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

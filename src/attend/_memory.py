"""Peak resident memory of a piece of work, on Linux (``/proc/self``)."""

from __future__ import annotations

import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_increase_mib(fn) -> float:
    """Run ``fn()`` and return how far it raised peak RSS above the RSS before it, in MiB.

    Resets the kernel's high-water mark first (``/proc/self/clear_refs``); for clean numbers
    run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` set, so freed buffers go back
    to the OS.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024.0

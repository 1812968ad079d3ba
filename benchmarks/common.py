"""What every benchmark shares: the machine's description, JSON output, fresh processes.

Measurements that report peak memory run in a fresh process each (``in_fresh_process``),
because ``ru_maxrss`` is a high-water mark of the whole process.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from graphmerge._atomic import atomic_write


def machine() -> dict:
    """The machine and software a figure came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | None, rows: list[dict], **settings: object) -> None:
    """Write ``{"machine": ..., **settings, "rows": rows}`` to ``path`` (nothing if None),
    atomically."""
    if not path:
        return
    payload = {"machine": machine(), **settings, "rows": rows}
    with atomic_write(path, "w") as handle:
        handle.write(json.dumps(payload, indent=2))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(
    script: str,
    arguments: list[str],
    launcher: Sequence[str] = (),
    environment: dict[str, str] | None = None,
) -> dict:
    """Run ``script`` with ``arguments`` in a new Python process (or processes, with a
    ``launcher`` such as ``("-m", "torch.distributed.run", ...)``); the last stdout line
    is the JSON result."""
    command = [sys.executable, *launcher, script, *arguments]
    variables = None if environment is None else {**os.environ, **environment}
    done = subprocess.run(command, capture_output=True, text=True, env=variables)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

"""iperf3 client runs every bench shares.

An iperf3 server takes one test at a time and answers "the server is busy
running a test" while it is still finishing the previous one, which on a
loaded machine can outlast the previous client. That answer is polled
through (a short pause, a deadline); any other error is raised with iperf3's
own words. Import it as `from iperf import iperf_received` (bench/ is first
on sys.path).
"""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence

BUSY = "the server is busy"


def iperf_received(argv: Sequence[str], seconds: float, busy_timeout: float = 30.0) -> dict:
    """`iperf3 -c ... -J` (argv without -J); the end.sum_received of its report."""
    deadline = time.monotonic() + busy_timeout
    while True:
        out = subprocess.run([*argv, "-J"], capture_output=True, text=True, timeout=seconds + 30)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 exited with {out.returncode}: {out.stderr.strip() or out.stdout[-500:]}") \
                from None
        error = report.get("error")
        if error is None:
            return report["end"]["sum_received"]
        if BUSY not in error or time.monotonic() > deadline:
            raise RuntimeError(f"iperf3: {error}")
        time.sleep(0.05)

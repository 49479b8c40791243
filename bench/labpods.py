"""A bench's own lab (settings, work directory, bpffs root), load processes
inside its pods, and what the load tool (pingpong.c) reports."""
from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from ambit.agent.netns import NetnsThread, netns_path
from ambit.lab.plan import LabSettings
from ambit.lab.topology import Lab


class LabWorkspace:
    """Settings for a bench's lab with its own state directory and bpffs root
    (`remove()` deletes both, after `lab.down()`), agents at info level (the
    access log on), and the file limit raised: the agents inherit it, as from
    a container runtime."""

    def __init__(self, prefix: str, underlay_cidr: str, pod_supernet: str) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.bpffs_root = Path(f"/sys/fs/bpf/{prefix}{uuid.uuid4().hex[:6]}")
        self.bpffs_root.mkdir()
        self.settings = LabSettings(prefix=prefix, state_dir=self.workdir / "lab", underlay_cidr=underlay_cidr,
                                    pod_supernet=pod_supernet, bpffs_root=self.bpffs_root,
                                    agent_args=("--log-level", "info"))

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.bpffs_root, ignore_errors=True)


class PodProcesses:
    """Processes in lab pods' namespaces (started from a thread inside each)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.threads: dict[str, NetnsThread] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def thread(self, pod: str) -> NetnsThread:
        if pod not in self.threads:
            self.threads[pod] = NetnsThread(netns_path(self.lab.find_pod(pod).netns))
        return self.threads[pod]

    def start(self, pod: str, argv: list[str], *, ready_line: bool = False, output: bool = False,
              stdin: int | None = None) -> subprocess.Popen[bytes]:
        proc = self.thread(pod).run(lambda: subprocess.Popen(
            argv, stdout=subprocess.PIPE if ready_line or output else subprocess.DEVNULL, stdin=stdin,
            start_new_session=True))
        self.procs.append(proc)
        if ready_line:
            assert proc.stdout is not None
            if b"ready" not in proc.stdout.readline():
                raise RuntimeError(f"{argv[:3]} in {pod} did not start (exit {proc.poll()})")
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for thread in self.threads.values():
            thread.close()


def done_line(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, float]:
    """(ok, errors, seconds) from a pingpong rate/churn run."""
    out, _ = proc.communicate(timeout=timeout)
    fields = out.split(b"\n", 1)[0].split()
    if not fields or fields[0] != b"done":
        raise RuntimeError(f"load tool ended without a result (exit {proc.returncode})")
    return int(fields[1]), int(fields[2]), int(fields[3]) / 1e9


def churn_result(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, float, list[float]]:
    """(ok, errors, seconds, each connection's time in ms) from a pingpong churn run."""
    out, _ = proc.communicate(timeout=timeout)
    head, _, rest = out.partition(b"\n")
    fields = head.split()
    if not fields or fields[0] != b"done":
        raise RuntimeError(f"load tool ended without a result (exit {proc.returncode})")
    return int(fields[1]), int(fields[2]), int(fields[3]) / 1e9, [int(v) / 1e6 for v in rest.split()]

"""ambit-cni entry point: environment + stdin -> one command -> stdout + exit status.

Every failure leaves as CNI error JSON on stdout with a non-zero exit status,
never as a traceback, except DEL's: DEL never fails the pod. Whatever stops
it (a configuration it cannot read, an agent that is down or answers with
an error) is logged and DEL succeeds; what it could not undo the agent
cleans up itself (GC, and its reconcile against the kernel at start).
"""

import posix  # not os: os pulls in posixpath, stat and _collections_abc (~1 ms per start)
import sys
import time

from . import jsonlite as json
from . import spec, wire
from .spec import CniError, Environment, PluginConfig


class _Log:
    """JSON lines on stderr, which the runtime keeps in its own log."""

    _ORDER = {level: i for i, level in enumerate(spec.LOG_LEVELS)}

    def __init__(self, stream: object, level: str, env: Environment | None) -> None:
        self.stream = stream
        self.threshold = self._ORDER[level]
        self.context: dict[str, object] = {}
        if env is not None:
            self.context = {"command": env.command, "container_id": env.container_id[:12],
                            "pod": f"{env.pod_namespace}/{env.pod_name}" if env.pod_name else ""}

    def __call__(self, level: str, event: str, **fields: object) -> None:
        if self._ORDER[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 3), "level": level, "logger": "ambit-cni", "event": event,
                  **self.context, **fields}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


def _client(cfg: PluginConfig):
    # Imported here so VERSION and configuration errors never load the socket code.
    from .agent_client import AgentClient
    return AgentClient(cfg.agent_socket, cfg.timeout)


def _exists(path: str) -> bool:
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _environment() -> dict:
    """os.environ's decoding (filesystem encoding, surrogateescape) without importing os."""
    encoding = sys.getfilesystemencoding()
    return {key.decode(encoding, "surrogateescape"): value.decode(encoding, "surrogateescape")
            for key, value in posix.environ.items()}


def _pod_ref(env: Environment) -> list:
    return wire.pod_ref(env.pod_namespace, env.pod_name, env.pod_uid)


def _attachment(env: Environment) -> list:
    return wire.attachment(env.container_id, env.ifname)


def cmd_add(env: Environment, cfg: PluginConfig, log: _Log) -> dict[str, object]:
    assert cfg.prev_result is not None  # parse_config guarantees it for ADD
    if not _exists(env.netns):
        raise CniError(spec.UNKNOWN_CONTAINER, f"network namespace {env.netns} does not exist")
    started = time.monotonic()
    reply = _client(cfg).enrol(wire.enrol_pod_request(
        _attachment(env), env.netns, _pod_ref(env), spec.pod_addresses(cfg.prev_result), cfg.name))
    log("info", "enrolled" if reply["enrolled"] else "not enrolled", reason=reply["reason"],
        host_veth=reply["host_veth"], ms=round((time.monotonic() - started) * 1000, 1))
    return spec.convert_result(cfg.prev_result, cfg.cni_version)


def cmd_del(env: Environment, cfg: PluginConfig, log: _Log) -> None:
    try:
        reply = _client(cfg).release(wire.release_pod_request(_attachment(env), env.netns, _pod_ref(env)))
    except CniError as exc:
        # The runtime must be able to delete a pod whatever the agent says:
        # it releases what is left on GC and when it reconciles at start.
        event = ("agent unreachable on DEL; it will clean up on restart" if exc.code == spec.TRY_AGAIN_LATER
                 else "agent could not release the pod on DEL; its GC and reconcile will")
        log("warn", event, code=exc.code, error=exc.msg, detail=exc.details)
        return
    log("info", "released" if reply["released"] else "nothing to release")


def cmd_check(env: Environment, cfg: PluginConfig, log: _Log) -> None:
    ips = spec.pod_addresses(cfg.prev_result) if cfg.prev_result else []
    _client(cfg).check(wire.check_pod_request(_attachment(env), env.netns, _pod_ref(env), ips))
    log("debug", "check passed")


def cmd_status(cfg: PluginConfig, log: _Log) -> None:
    reply = _client(cfg).status()
    if not reply["ready"]:
        raise CniError(spec.NOT_AVAILABLE, "ambit agent is not ready", reply["reason"])


def cmd_gc(cfg: PluginConfig, log: _Log) -> None:
    valid = [wire.attachment(c, i) for c, i in cfg.valid_attachments or ()]
    released = _client(cfg).gc(wire.garbage_collect_request(valid, cfg.name))
    log("info", "garbage collected", released=[c[:12] for c in released])


def run(environ: dict, stdin: bytes, out: object, err: object) -> int:
    """Run one CNI command; returns the exit status."""
    reply_version = spec.LATEST_VERSION
    log = _Log(err, "warn", None)
    try:
        env = spec.parse_environment(environ)
        if env.command == "VERSION":
            # VERSION may come with an empty stdin or just {"cniVersion": ...}.
            try:
                conf_version = json.loads(stdin).get("cniVersion") if stdin.strip() else None
            except (ValueError, AttributeError):
                conf_version = None
            out.write(json.dumps(spec.version_result(conf_version)))
            return 0
        conf = spec.decode_config(stdin)
        if conf.get("cniVersion") in spec.SUPPORTED_VERSIONS:
            reply_version = conf["cniVersion"]
        cfg = spec.parse_config(conf, env.command)
        log = _Log(err, cfg.log_level, env)
        if env.command == "ADD":
            out.write(json.dumps(cmd_add(env, cfg, log)))
        elif env.command == "DEL":
            cmd_del(env, cfg, log)
        elif env.command == "CHECK":
            cmd_check(env, cfg, log)
        elif env.command == "STATUS":
            cmd_status(cfg, log)
        elif env.command == "GC":
            cmd_gc(cfg, log)
        return 0
    except CniError as exc:
        if _is_del(environ):
            return _del_anyway(log, exc)
        log("error", exc.msg, code=exc.code, detail=exc.details)
        out.write(json.dumps(exc.to_json(reply_version)))
        return 1
    except Exception as exc:  # a bug in the plugin: still a CNI error, never a traceback
        error = CniError(spec.AGENT_ERROR, f"ambit-cni internal error: {type(exc).__name__}: {exc}")
        if _is_del(environ):
            return _del_anyway(log, error)
        log("error", error.msg)
        out.write(json.dumps(error.to_json(reply_version)))
        return 1


def _is_del(environ: dict) -> bool:
    return environ.get("CNI_COMMAND") == "DEL"


def _del_anyway(log: _Log, error: CniError) -> int:
    """DEL never fails the pod: say what went wrong, then succeed. The agent
    releases what this DEL could not (GC, its reconcile at start)."""
    log("warn", "DEL could not reach the agent's release; succeeding anyway, the agent's GC and reconcile "
        "clean up", code=error.code, error=error.msg, detail=error.details)
    return 0


def main() -> None:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        stdin = b""
    status = run(_environment(), stdin, sys.stdout, sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (module GC, atexit): ~2.5 ms of CPU per run
    # that twenty pods starting at once would otherwise wait for.
    posix._exit(status)


if __name__ == "__main__":
    main()

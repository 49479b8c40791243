"""The CNI specification as pure logic: versions, errors, environment, the
plugin's network configuration and the result it passes through.

No I/O here, so every rule of the spec is unit-tested directly. Plain
classes instead of dataclasses/typing: both cost the plugin milliseconds of
import per run (see cni/__init__.py).
"""

import _socket  # inet_pton/inet_ntop without socket.py's imports (see cni/__init__.py)

from . import jsonlite as json

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

DEFAULT_AGENT_SOCKET = "/var/run/ambit/agent.sock"
DEFAULT_TIMEOUT_S = 5.0
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
LOG_LEVELS = ("debug", "info", "warn", "error")

# CNI error codes (SPEC.md "Error"); 100+ are ambit's own.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
AGENT_ERROR = 100


class CniError(Exception):
    """An error the plugin reports to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict:
        out: dict = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def version_at_least(version: str, minimum: str) -> bool:
    return version_key(version) >= version_key(minimum)


class Environment:
    """The CNI_* variables the runtime sets for one invocation."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 args: dict[str, str] | None = None, path: str = "") -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args or {}
        self.path = path

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is `K=V;K=V`; entries without '=' are ignored, as libcni does."""
    out: dict[str, str] = {}
    for item in raw.split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


# Which variables each command needs (SPEC.md "Parameters").
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}


def parse_environment(env: dict) -> Environment:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENVIRONMENT, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}",
                       f"supported: {', '.join(COMMANDS)}")
    missing = [name for name in _REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)}")
    return Environment(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=env.get("CNI_PATH", ""),
    )


_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0))


def _duration(text: str) -> float | None:
    """Seconds of "5", "1.5s", "500ms", "2m"; None if it is none of those (no
    `re`: importing it costs the plugin ~4 ms per run)."""
    number, scale = text.strip(), 1.0
    for unit, unit_scale in _UNITS:
        if number.endswith(unit):
            number, scale = number[: -len(unit)].rstrip(), unit_scale
            break
    whole, dot, fraction = number.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (dot and not (fraction.isascii() and fraction.isdigit())):
        return None
    return float(number) * scale


def parse_timeout(value) -> float:
    """`timeout` is seconds as a number, or a duration string such as "500ms", "5s"."""
    if isinstance(value, bool):
        raise CniError(INVALID_CONFIG, f"timeout must be seconds or a duration, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (parsed := _duration(value)) is not None:
        seconds = parsed
    else:
        raise CniError(INVALID_CONFIG, f"timeout must be seconds or a duration like '5s', not {value!r}")
    if not 0 < seconds <= 600:
        raise CniError(INVALID_CONFIG, f"timeout must be between 0 and 600 seconds, not {seconds}")
    return seconds


class PluginConfig:
    """ambit's entry in the conflist, plus what the runtime adds to it."""

    __slots__ = ("cni_version", "name", "agent_socket", "timeout", "log_level", "prev_result",
                 "valid_attachments")

    def __init__(self, cni_version: str, name: str, agent_socket: str = DEFAULT_AGENT_SOCKET,
                 timeout: float = DEFAULT_TIMEOUT_S, log_level: str = "warn", prev_result: dict | None = None,
                 valid_attachments: tuple[tuple[str, str], ...] | None = None) -> None:
        self.cni_version = cni_version
        self.name = name
        self.agent_socket = agent_socket
        self.timeout = timeout
        self.log_level = log_level
        self.prev_result = prev_result
        self.valid_attachments = valid_attachments


def decode_config(stdin: bytes) -> dict:
    if not stdin.strip():
        raise CniError(DECODE_FAILURE, "no network configuration on stdin")
    try:
        conf = json.loads(stdin)
    except ValueError as exc:  # says what and where: "...: line 1 column 2 (char 1)"
        raise CniError(DECODE_FAILURE, f"network configuration on stdin is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        text = stdin.decode("utf-8")
        where = json.DecodeError(f"not {_json_kind(conf)}", text, len(text) - len(text.lstrip(" \t\n\r")))
        raise CniError(DECODE_FAILURE, f"network configuration must be a JSON object, {where}")
    return conf


def _json_kind(value) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def check_version(conf: dict) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def parse_config(conf: dict, command: str) -> PluginConfig:
    """Validate the configuration for `command`; unknown keys are ignored."""
    version = check_version(conf)
    if command in ("STATUS", "GC") and not version_at_least(version, "1.1.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, config has {version}")
    if command == "CHECK" and not version_at_least(version, "0.4.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, config has {version}")
    name = conf.get("name", "")
    if not isinstance(name, str):
        raise CniError(INVALID_CONFIG, "network name must be a string")

    socket_path = conf.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise CniError(INVALID_CONFIG, f"agentSocket must be an absolute path, not {socket_path!r}")
    if len(socket_path.encode()) > MAX_SOCKET_PATH:
        raise CniError(INVALID_CONFIG, f"agentSocket is longer than a Unix socket path can be "
                       f"({MAX_SOCKET_PATH} bytes): {socket_path!r}")
    timeout = parse_timeout(conf.get("timeout", DEFAULT_TIMEOUT_S))
    log_level = conf.get("logLevel", "warn")
    if log_level not in LOG_LEVELS:
        raise CniError(INVALID_CONFIG, f"logLevel must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")

    prev = conf.get("prevResult")
    if command == "ADD":
        if prev is None:
            raise CniError(INVALID_CONFIG, "ambit-cni is a chained plugin: it needs a prevResult "
                           "(put it after the primary plugin in the conflist)")
        validate_prev_result(prev)
    elif prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be a JSON object")

    valid = None
    if command == "GC":
        valid = parse_valid_attachments(conf.get("cni.dev/valid-attachments", []))
    return PluginConfig(cni_version=version, name=name, agent_socket=socket_path, timeout=timeout,
                        log_level=log_level, prev_result=prev, valid_attachments=valid)


def validate_prev_result(prev) -> None:
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be a JSON object")
    ips = prev.get("ips")
    if not isinstance(ips, list) or not ips:
        raise CniError(INVALID_CONFIG, "prevResult has no IP addresses: the primary plugin gave the pod none, "
                       "so there is nothing to capture")
    for entry in ips:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise CniError(INVALID_CONFIG, f"prevResult ips entry is malformed: {entry!r}")
        try:
            parse_interface(entry["address"])
        except ValueError:
            raise CniError(INVALID_CONFIG, f"prevResult has an invalid address {entry['address']!r}") from None


def parse_valid_attachments(raw) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise CniError(INVALID_CONFIG, f"malformed entry in cni.dev/valid-attachments: {item!r}")
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)


def parse_interface(text: str) -> tuple[int, str, int]:
    """"10.0.0.5/24" -> (4, "10.0.0.5", 24), canonical address; ValueError if
    malformed. A prefix is required, as in CNI results."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise ValueError(f"not an address with a prefix length: {text!r}")
    address, _, prefix = text.partition("/")
    family, version, bits = (_socket.AF_INET6, 6, 128) if ":" in address else (_socket.AF_INET, 4, 32)
    try:
        canonical = _socket.inet_ntop(family, _socket.inet_pton(family, address))
    except OSError:
        raise ValueError(f"not an IPv{version} address: {address!r}") from None
    if not prefix.isdigit() or not 0 <= int(prefix) <= bits:
        raise ValueError(f"bad prefix length in {text!r}")
    return version, canonical, int(prefix)


def format_interface(version: int, address: str, prefix: int) -> str:
    return f"{address}/{prefix}"


def pod_addresses(prev: dict) -> list[str]:
    """The pod's addresses in CIDR form, as the primary plugin assigned them."""
    return [format_interface(*parse_interface(entry["address"])) for entry in prev.get("ips", [])]


def convert_result(prev: dict, version: str) -> dict:
    """prevResult in the requested version. 0.3.x/0.4.0 results carry a
    per-IP "version" ("4"/"6") that 1.0.0 removed; nothing else differs among
    the versions we support."""
    out = dict(prev)
    out["cniVersion"] = version
    if "ips" in prev:
        ips = []
        for entry in prev["ips"]:
            entry = dict(entry)
            if version_at_least(version, "1.0.0"):
                entry.pop("version", None)
            elif "version" not in entry:
                entry["version"] = str(parse_interface(entry["address"])[0])
            ips.append(entry)
        out["ips"] = ips
    return out


def version_result(conf_version: str | None) -> dict:
    return {"cniVersion": conf_version if conf_version in SUPPORTED_VERSIONS else LATEST_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}

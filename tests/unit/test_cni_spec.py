"""The CNI specification rules ambit-cni enforces, without processes or sockets:
the environment, the network configuration, versions and the passed-through
result."""
from __future__ import annotations

import json
from typing import Any

import pytest

from ambit.cni import spec
from ambit.cni.spec import CniError

ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/pod",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}

PREV_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                   {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod"}],
    "ips": [{"address": "10.248.1.5/24", "gateway": "10.248.1.1", "interface": 1},
            {"address": "fd00:248::5/64", "gateway": "fd00:248::1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.248.0.10"]},
}

PREV_0_4 = {
    "cniVersion": "0.4.0",
    "interfaces": PREV_1_0["interfaces"],
    "ips": [{"version": "4", "address": "10.248.1.5/24", "gateway": "10.248.1.1", "interface": 1},
            {"version": "6", "address": "fd00:248::5/64", "gateway": "fd00:248::1", "interface": 1}],
    "routes": PREV_1_0["routes"],
    "dns": PREV_1_0["dns"],
}


def conf(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "podnet", "type": "ambit-cni", **extra}


class _CodeCheck:
    """pytest.raises(CniError) that also checks the CNI code and that the
    message is not empty (the runtime shows it to the user)."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.ctx = pytest.raises(CniError)

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.ctx.__exit__(*exc)
        if not suppressed:  # some other exception: let it propagate unchanged
            return False
        assert self.info.value.code == self.code, (self.info.value.code, self.info.value.msg)
        assert self.info.value.msg, "a CNI error needs a message"
        return suppressed


# -- environment ---------------------------------------------------------------

@pytest.mark.parametrize("env, needle", [
    ({}, "CNI_COMMAND"),
    ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
    ({"CNI_COMMAND": "ATTACH"}, "ATTACH"),
    ({"CNI_COMMAND": "add", **{k: v for k, v in ADD_ENV.items() if k != "CNI_COMMAND"}}, "add"),
    ({**ADD_ENV, "CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({k: v for k, v in ADD_ENV.items() if k != "CNI_IFNAME"}, "CNI_IFNAME"),
    ({k: v for k, v in ADD_ENV.items() if k != "CNI_NETNS"}, "CNI_NETNS"),
    ({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c0ffee"}, "CNI_IFNAME"),
    ({"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0"}, "CNI_NETNS"),
], ids=["unset", "empty", "unknown", "lower-case", "add-no-containerid", "add-no-ifname",
        "add-no-netns", "del-no-ifname", "check-no-netns"])
def test_invalid_environment_is_code_4(env: dict[str, str], needle: str) -> None:
    with _CodeCheck(spec.INVALID_ENVIRONMENT) as info:
        spec.parse_environment(env)
    assert needle in info.value.msg


def test_add_environment_is_parsed() -> None:
    env = spec.parse_environment({**ADD_ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;"
                                                         "K8S_POD_NAME=cart-0;K8S_POD_UID=u-1"})
    assert (env.command, env.container_id, env.netns, env.ifname, env.path) == \
        ("ADD", "c0ffee", "/var/run/netns/pod", "eth0", "/opt/cni/bin")
    assert (env.pod_namespace, env.pod_name, env.pod_uid) == ("shop", "cart-0", "u-1")


def test_del_without_netns_is_allowed() -> None:
    env = spec.parse_environment({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0"})
    assert env.command == "DEL" and env.netns == ""
    assert env.pod_name == "" and env.pod_namespace == ""


@pytest.mark.parametrize("command", ["VERSION", "STATUS", "GC"])
def test_commands_without_a_container_need_only_the_command(command: str) -> None:
    assert spec.parse_environment({"CNI_COMMAND": command}).command == command


@pytest.mark.parametrize("raw, expected", [
    ("", {}),
    ("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web", {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web"}),
    ("IgnoreUnknown=1;;K8S_POD_NAME=web;", {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}),
    ("novalue;K=V", {"K": "V"}),
    ("K=a=b", {"K": "a=b"}),
    (" K = v ;=orphan", {"K": "v"}),
    ("EMPTY=", {"EMPTY": ""}),
], ids=["empty", "pod", "empty-items", "no-equals", "equals-in-value", "spaces-and-no-key", "empty-value"])
def test_parse_cni_args(raw: str, expected: dict[str, str]) -> None:
    assert spec.parse_cni_args(raw) == expected


# -- decoding and versions -------------------------------------------------------

@pytest.mark.parametrize("stdin", [b"", b"  \n\t", b"{", b'{"cniVersion": "1.0.0",}', b"\xff\xfe\x00",
                                   b"[]", b'"1.0.0"', b"42", b"null"],
                         ids=["empty", "blank", "truncated", "trailing-comma", "not-utf8",
                              "array", "string", "number", "null"])
def test_decode_failures_are_code_6(stdin: bytes) -> None:
    with _CodeCheck(spec.DECODE_FAILURE):
        spec.decode_config(stdin)


@pytest.mark.parametrize("stdin, says", [
    (b'{"name": ', "not valid JSON: Expecting value: line 1 column 10 (char 9)"),
    (b'{"a": 1,\n "b": \xff}', "Invalid UTF-8 byte 0xff at byte 15 (invalid start byte): line 2 column 7 (char 15)"),
    (b'\n [1]', "must be a JSON object, not an array: line 2 column 2 (char 2)"),
    (b'"1.0.0"', "must be a JSON object, not a string: line 1 column 1 (char 0)"),
])
def test_decode_failure_says_what_and_where(stdin: bytes, says: str) -> None:
    with _CodeCheck(spec.DECODE_FAILURE) as info:
        spec.decode_config(stdin)
    assert says in info.value.msg


def test_decode_config_returns_the_object() -> None:
    assert spec.decode_config(json.dumps(conf()).encode()) == conf()


@pytest.mark.parametrize("config, code", [
    ({"name": "x"}, spec.INVALID_CONFIG),
    ({"cniVersion": ""}, spec.INVALID_CONFIG),
    ({"cniVersion": 1.0}, spec.INVALID_CONFIG),
    ({"cniVersion": None}, spec.INVALID_CONFIG),
    ({"cniVersion": "0.2.0"}, spec.INCOMPATIBLE_VERSION),
    ({"cniVersion": "2.0.0"}, spec.INCOMPATIBLE_VERSION),
    ({"cniVersion": "1.0"}, spec.INCOMPATIBLE_VERSION),
], ids=["missing", "empty", "number", "null", "too-old", "too-new", "short-form"])
def test_check_version_rejects(config: dict[str, Any], code: int) -> None:
    with _CodeCheck(code):
        spec.check_version(config)


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_check_version_accepts_every_supported_version(version: str) -> None:
    assert spec.check_version({"cniVersion": version}) == version


def test_unsupported_version_lists_what_is_supported() -> None:
    with _CodeCheck(spec.INCOMPATIBLE_VERSION) as info:
        spec.check_version({"cniVersion": "9.9.9"})
    assert "9.9.9" in info.value.msg and "1.1.0" in info.value.details


# -- the plugin's configuration --------------------------------------------------

def test_parse_config_defaults_and_unknown_keys() -> None:
    cfg = spec.parse_config(conf(prevResult=PREV_1_0, runtimeConfig={"portMappings": []},
                                 capabilities={"x": True}, someFutureKey={"a": 1}), "ADD")
    assert (cfg.cni_version, cfg.name, cfg.prev_result, cfg.valid_attachments) == \
        ("1.0.0", "podnet", PREV_1_0, None)
    assert (cfg.agent_socket, cfg.timeout, cfg.log_level) == \
        (spec.DEFAULT_AGENT_SOCKET, spec.DEFAULT_TIMEOUT_S, "warn")


@pytest.mark.parametrize("value, seconds", [
    (5, 5.0), (0.25, 0.25), (600, 600.0), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0),
    ("1.5s", 1.5), ("3", 3.0), (" 10s ", 10.0),
])
def test_timeout_forms(value: Any, seconds: float) -> None:
    cfg = spec.parse_config(conf(timeout=value), "DEL")
    assert cfg.timeout == pytest.approx(seconds)


@pytest.mark.parametrize("value", [0, -1, 601, "0s", "11m", "5h", "five", "", "-5s", "5 seconds",
                                   "1.s", ".5s", "1e3", "ms", "s", "5 ms s", "\u0663s", "1_0s",
                                   True, None, [5], {"s": 5}])
def test_invalid_timeouts_are_code_7(value: Any) -> None:
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(conf(timeout=value), "DEL")
    assert "timeout" in info.value.msg


@pytest.mark.parametrize("key, value", [
    ("agentSocket", "relative/agent.sock"), ("agentSocket", ""), ("agentSocket", 7), ("agentSocket", None),
    ("logLevel", "trace"), ("logLevel", "INFO"), ("logLevel", 1), ("name", 5),
])
def test_invalid_plugin_keys_are_code_7(key: str, value: Any) -> None:
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(conf(**{key: value}), "DEL")
    if key != "name":
        assert key in info.value.msg


@pytest.mark.parametrize("level", spec.LOG_LEVELS)
def test_log_levels(level: str) -> None:
    assert spec.parse_config(conf(logLevel=level), "DEL").log_level == level


@pytest.mark.parametrize("length, ok", [(107, True), (108, False)])
def test_agent_socket_must_fit_a_unix_socket_address(length: int, ok: bool) -> None:
    path = "/" + "s" * (length - 1)
    if ok:
        assert spec.parse_config(conf(agentSocket=path), "DEL").agent_socket == path
        return
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(conf(agentSocket=path), "DEL")
    assert "agentSocket" in info.value.msg and "107" in info.value.msg


def test_agent_socket_is_taken() -> None:
    assert spec.parse_config(conf(agentSocket="/run/x/a.sock"), "DEL").agent_socket == "/run/x/a.sock"


@pytest.mark.parametrize("prev, needle", [
    (None, "prevResult"),
    ({"cniVersion": "1.0.0", "interfaces": []}, "no IP addresses"),
    ({"cniVersion": "1.0.0", "ips": []}, "no IP addresses"),
    ({"cniVersion": "1.0.0", "ips": "10.0.0.1/24"}, "no IP addresses"),
    ({"cniVersion": "1.0.0", "ips": [{"gateway": "10.248.1.1"}]}, "malformed"),
    ({"cniVersion": "1.0.0", "ips": ["10.248.1.5/24"]}, "malformed"),
    ({"cniVersion": "1.0.0", "ips": [{"address": 5}]}, "malformed"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.248.1.500/24"}]}, "10.248.1.500/24"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]}, "not-an-ip"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.248.1.5/24"}, {"address": "fd00::1/200"}]}, "fd00::1/200"),
    ([], "JSON object"),
], ids=["missing", "no-ips-key", "empty-ips", "ips-not-list", "no-address", "bare-string", "address-number",
        "bad-octet", "not-an-ip", "bad-second-prefix", "not-object"])
def test_add_needs_a_usable_prev_result(prev: Any, needle: str) -> None:
    config = conf() if prev is None else conf(prevResult=prev)
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(config, "ADD")
    assert needle in info.value.msg


def test_missing_prev_result_explains_chaining() -> None:
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(conf(), "ADD")
    assert "chained" in info.value.msg


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_prev_result_is_optional_outside_add(command: str) -> None:
    assert spec.parse_config(conf(), command).prev_result is None


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_prev_result_must_be_an_object_when_present(command: str) -> None:
    with _CodeCheck(spec.INVALID_CONFIG):
        spec.parse_config(conf(prevResult="oops"), command)


@pytest.mark.parametrize("command, version, code", [
    ("STATUS", "1.0.0", spec.INCOMPATIBLE_VERSION),
    ("GC", "1.0.0", spec.INCOMPATIBLE_VERSION),
    ("STATUS", "0.4.0", spec.INCOMPATIBLE_VERSION),
    ("CHECK", "0.3.1", spec.INCOMPATIBLE_VERSION),
    ("CHECK", "0.3.0", spec.INCOMPATIBLE_VERSION),
    ("STATUS", "1.1.0", None),
    ("GC", "1.1.0", None),
    ("CHECK", "0.4.0", None),
    ("CHECK", "1.0.0", None),
    ("DEL", "0.3.0", None),
])
def test_commands_need_a_minimum_version(command: str, version: str, code: int | None) -> None:
    config = conf(version)
    if code is None:
        assert spec.parse_config(config, command).cni_version == version
        return
    with _CodeCheck(code) as info:
        spec.parse_config(config, command)
    assert command in info.value.msg and version in info.value.msg


@pytest.mark.parametrize("raw, expected", [
    (None, ()),
    ([], ()),
    ([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1", "extra": 1}],
     (("a", "eth0"), ("b", "net1"))),
], ids=["absent", "empty", "two"])
def test_gc_valid_attachments(raw: Any, expected: tuple) -> None:
    config = conf("1.1.0") if raw is None else conf("1.1.0", **{"cni.dev/valid-attachments": raw})
    assert spec.parse_config(config, "GC").valid_attachments == expected


@pytest.mark.parametrize("raw", [
    {"containerID": "a", "ifname": "eth0"},
    [{"containerID": "a"}],
    [{"ifname": "eth0"}],
    [{"containerID": 1, "ifname": "eth0"}],
    ["a/eth0"],
], ids=["not-list", "no-ifname", "no-id", "id-number", "string-entry"])
def test_gc_malformed_valid_attachments_are_code_7(raw: Any) -> None:
    with _CodeCheck(spec.INVALID_CONFIG) as info:
        spec.parse_config(conf("1.1.0", **{"cni.dev/valid-attachments": raw}), "GC")
    assert "valid-attachments" in info.value.msg


def test_valid_attachments_only_parsed_for_gc() -> None:
    config = conf("1.1.0", **{"cni.dev/valid-attachments": "garbage"})
    assert spec.parse_config(config, "STATUS").valid_attachments is None


# -- results -----------------------------------------------------------------------

def test_pod_addresses_are_normalised_cidrs() -> None:
    prev = {"ips": [{"address": "10.248.1.5/24"}, {"address": "FD00:248:0::5/64"}]}
    assert spec.pod_addresses(prev) == ["10.248.1.5/24", "fd00:248::5/64"]


@pytest.mark.parametrize("prev, version, expected", [
    (PREV_0_4, "1.0.0", {**PREV_1_0}),
    (PREV_0_4, "1.1.0", {**PREV_1_0, "cniVersion": "1.1.0"}),
    (PREV_1_0, "0.4.0", {**PREV_0_4}),
    (PREV_1_0, "0.3.1", {**PREV_0_4, "cniVersion": "0.3.1"}),
    (PREV_1_0, "1.0.0", PREV_1_0),
    (PREV_0_4, "0.4.0", PREV_0_4),
], ids=["0.4->1.0", "0.4->1.1", "1.0->0.4", "1.0->0.3.1", "1.0->1.0", "0.4->0.4"])
def test_convert_result(prev: dict[str, Any], version: str, expected: dict[str, Any]) -> None:
    before = json.dumps(prev, sort_keys=True)
    assert spec.convert_result(prev, version) == expected
    assert json.dumps(prev, sort_keys=True) == before, "the input result must not be modified"


def test_convert_result_keeps_an_existing_ip_version() -> None:
    prev = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.248.1.5/24"}]}
    assert spec.convert_result(prev, "0.4.0")["ips"] == [{"version": "4", "address": "10.248.1.5/24"}]


def test_convert_result_without_ips() -> None:
    assert spec.convert_result({"cniVersion": "1.0.0", "dns": {}}, "0.4.0") == {"cniVersion": "0.4.0", "dns": {}}


@pytest.mark.parametrize("requested, answered", [
    (None, spec.LATEST_VERSION), ("0.4.0", "0.4.0"), ("1.1.0", "1.1.0"), ("0.1.0", spec.LATEST_VERSION),
    ("garbage", spec.LATEST_VERSION),
])
def test_version_result(requested: str | None, answered: str) -> None:
    assert spec.version_result(requested) == {"cniVersion": answered,
                                              "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


@pytest.mark.parametrize("details", ["", "more"])
def test_error_json(details: str) -> None:
    out = CniError(spec.TRY_AGAIN_LATER, "agent down", details).to_json("1.0.0")
    expected = {"cniVersion": "1.0.0", "code": 11, "msg": "agent down"}
    if details:
        expected["details"] = details
    assert out == expected

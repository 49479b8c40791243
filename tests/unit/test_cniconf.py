"""install-cni's planning against real-world-shaped CNI configuration
directories (tests/data/cni/): bridge, ptp, Calico-like, Cilium-like
conflists, a lone .conf, an unparsable file.

The directory is a dict name -> bytes and plans are applied in memory, so
every rule is checked without a disk: insert, idempotent re-insert, re-insert
after the primary rewrote its file, and an uninstall that gives back the
primary's bytes exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ambit.agent.install_cni import cniconf
from ambit.agent.install_cni.cniconf import (BACKUP_SUFFIX, CniConfError, NoPrimaryConfig, PluginSettings, RemoveFile,
                                         WriteFile, plan_install, plan_uninstall)

DATA = Path(__file__).resolve().parents[1] / "data" / "cni"
SETTINGS = PluginSettings(agent_socket="/var/run/ambit/agent.sock", timeout=5, log_level="info")
AMBIT = {"type": "ambit-cni", "agentSocket": "/var/run/ambit/agent.sock", "timeout": 5, "logLevel": "info"}

CONFLISTS = {"bridge": "10-bridge.conflist", "ptp": "10-ptp.conflist", "calico": "10-calico.conflist",
             "cilium": "05-cilium.conflist"}


def load(sample: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((DATA / sample).iterdir()) if p.is_file()}


def applied(files: dict[str, bytes], plan: cniconf.Plan) -> dict[str, bytes]:
    out = dict(files)
    for op in plan.ops:
        if isinstance(op, WriteFile):
            out[op.name] = op.data
        else:
            assert op.name in out, f"plan removes {op.name}, which does not exist"
            del out[op.name]
    return out


def install(files: dict[str, bytes], settings: PluginSettings = SETTINGS) -> dict[str, bytes]:
    return applied(files, plan_install(files, settings))


def uninstall(files: dict[str, bytes]) -> dict[str, bytes]:
    return applied(files, plan_uninstall(files))


@pytest.mark.parametrize("sample", sorted(CONFLISTS))
def test_insert_appends_ambit_and_keeps_everything_else(sample):
    original = load(sample)
    name = CONFLISTS[sample]
    before = json.loads(original[name])

    after = install(original)

    conf = json.loads(after[name])
    assert conf["plugins"][:-1] == before["plugins"]  # the primary's plugins, same order, same content
    assert conf["plugins"][-1] == AMBIT
    assert {k: v for k, v in conf.items() if k != "plugins"} == {k: v for k, v in before.items() if k != "plugins"}
    assert list(conf) == list(before)  # key order too
    assert conf["cniVersion"] == before["cniVersion"]
    assert after[name + BACKUP_SUFFIX] == original[name]
    # nothing else in the directory changed
    assert {n: b for n, b in after.items() if n not in (name, name + BACKUP_SUFFIX)} == \
        {n: b for n, b in original.items() if n != name}


@pytest.mark.parametrize("sample", sorted(CONFLISTS) + ["lone-conf"])
def test_insert_is_idempotent(sample):
    once = install(load(sample))
    plan = plan_install(once, SETTINGS)
    assert plan.ops == ()
    assert "already chained" in plan.summary


@pytest.mark.parametrize("sample", sorted(CONFLISTS) + ["lone-conf"])
def test_uninstall_restores_the_original_bytes(sample):
    original = load(sample)
    assert uninstall(install(install(original))) == original


def test_changed_settings_replace_the_entry_in_place_and_keep_the_backup():
    original = load("calico")
    name = CONFLISTS["calico"]
    installed = install(original)
    # someone (or an older ambit) put the entry before portmap; its position is kept
    conf = json.loads(installed[name])
    conf["plugins"].insert(1, conf["plugins"].pop())
    installed[name] = json.dumps(conf).encode()

    newer = PluginSettings(agent_socket="/run/ambit/agent.sock", timeout=0.5, log_level="debug")
    plan = plan_install(installed, newer)
    after = applied(installed, plan)

    plugins = json.loads(after[name])["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "ambit-cni", "bandwidth", "portmap"]
    assert plugins[1] == {"type": "ambit-cni", "agentSocket": "/run/ambit/agent.sock", "timeout": 0.5,
                          "logLevel": "debug"}
    assert "updated ambit-cni's settings" in plan.summary
    assert [op.name for op in plan.ops] == [name]  # the backup still holds the primary's bytes
    assert uninstall(after) == original


def test_duplicate_entries_collapse_to_one():
    files = install(load("ptp"))
    conf = json.loads(files["10-ptp.conflist"])
    conf["plugins"].append(dict(AMBIT, logLevel="error"))
    files["10-ptp.conflist"] = json.dumps(conf).encode()
    after = install(files)
    assert [p["type"] for p in json.loads(after["10-ptp.conflist"])["plugins"]] == ["ptp", "tuning", "ambit-cni"]


def test_reinsert_after_the_primary_rewrote_its_file():
    name = CONFLISTS["calico"]
    installed = install(load("calico"))
    # Calico's installer writes its file again, without ambit, formatted its own way and with a new MTU
    rewritten_conf = json.loads(load("calico")[name])
    rewritten_conf["plugins"][0]["mtu"] = 1440
    rewritten = json.dumps(rewritten_conf, indent=4).encode()
    installed[name] = rewritten

    plan = plan_install(installed, SETTINGS)
    after = applied(installed, plan)

    conf = json.loads(after[name])
    assert [p["type"] for p in conf["plugins"]] == ["calico", "bandwidth", "portmap", "ambit-cni"]
    assert conf["plugins"][0]["mtu"] == 1440
    assert after[name + BACKUP_SUFFIX] == rewritten  # the primary's newest bytes are what uninstall restores
    assert uninstall(after) == {**load("calico"), name: rewritten}


def test_lone_conf_becomes_a_conflist_and_comes_back_byte_for_byte():
    original = load("lone-conf")
    conf = json.loads(original["10-bridge.conf"])

    plan = plan_install(original, SETTINGS)
    after = applied(original, plan)

    assert "10-bridge.conf" not in after  # it would still be read first
    assert plan.primary == "10-bridge.conflist" == cniconf.primary_config_name(after)
    conflist = json.loads(after["10-bridge.conflist"])
    assert conflist == {"cniVersion": "0.4.0", "name": "mynet", "plugins": [
        {k: v for k, v in conf.items() if k not in ("name", "cniVersion")}, AMBIT]}
    assert after["10-bridge.conf" + BACKUP_SUFFIX] == original["10-bridge.conf"]
    assert after["99-loopback.conf"] == original["99-loopback.conf"]
    assert uninstall(after) == original


def test_lone_conf_written_again_by_the_primary_is_converted_again():
    installed = install(load("lone-conf"))
    rewritten = b'{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni1", ' \
                b'"ipam": {"type": "host-local", "subnet": "10.23.0.0/16"}}\n'
    installed["10-bridge.conf"] = rewritten  # now read first again, without ambit

    after = install(installed)

    assert cniconf.primary_config_name(after) == "10-bridge.conflist"
    plugins = json.loads(after["10-bridge.conflist"])["plugins"]
    assert plugins[0]["bridge"] == "cni1" and plugins[-1] == AMBIT
    assert uninstall(after) == {**load("lone-conf"), "10-bridge.conf": rewritten}


def test_unparsable_primary_is_refused_with_the_reason():
    files = load("unparsable")
    with pytest.raises(CniConfError) as failure:
        plan_install(files, SETTINGS)
    message = str(failure.value)
    assert "10-broken.conflist is not valid JSON" in message
    assert "line 5 column 41" in message and "fix or remove" in message


def test_uninstall_leaves_an_unparsable_file_alone():
    files = {**load("unparsable"), **{k: v for k, v in install(load("ptp")).items()}}
    plan = plan_uninstall(files)
    assert all(op.name != "10-broken.conflist" for op in plan.ops)
    assert any("10-broken.conflist" in note for note in plan.notes)
    assert applied(files, plan) == {**load("unparsable"), **load("ptp")}


def test_primary_selection_ignores_other_files():
    files = load("cilium") | load("calico") | {
        "00-notes.txt": b"not a config",
        "01-old.conflist" + BACKUP_SUFFIX: b"{}",                   # our backup
        ".02-x.conflist.ambit-tmp-12-3": b"",                      # our temporary file
        "03-x.conflist.ambit-tmp-7.json": b"",                     # same, whatever its ending
        "calico-kubeconfig": load("calico")["calico-kubeconfig"],
    }
    assert cniconf.primary_config_name(files) == "05-cilium.conflist"
    after = install(files)
    assert json.loads(after["05-cilium.conflist"])["plugins"][-1] == AMBIT
    assert after["10-calico.conflist"] == files["10-calico.conflist"]
    assert after["10-bridge.conf.cilium_bak"] == files["10-bridge.conf.cilium_bak"]


def test_primary_is_the_first_by_name_whatever_the_extension():
    assert cniconf.primary_config_name(["20-a.conflist", "10-b.json", "15-c.conf", "05-d.yaml"]) == "10-b.json"
    assert cniconf.primary_config_name(["README", "x.conf.ambit-orig"]) is None


def test_json_extension_single_conf_is_converted_like_a_conf():
    files = {"10-net.json": b'{"cniVersion": "1.0.0", "name": "n", "type": "ptp", "ipam": {"type": "host-local"}}'}
    after = install(files)
    assert set(after) == {"10-net.conflist", "10-net.json" + BACKUP_SUFFIX}
    assert uninstall(after) == files


@pytest.mark.parametrize("files, expected", [
    ({}, "the primary CNI has not written one"),
    ({"10-x.conflist": b'{"cniVersion": "1.0.0", "name": "x", "plugins": []}'}, "10-x.conflist has no plugins"),
    ({"10-x.conflist": b'{"cniVersion": "1.0.0", "name": "x", "plugins": [{"ipam": {}}]}'},
     "plugin #1 has no \"type\""),
    ({"10-x.conflist": b'[1, 2]'}, "holds a JSON list"),
    ({"10-x.conf": b'{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}'},
     "unsupported layout: rename it to 10-x.conflist"),
    ({"10-x.conf": b'{"cniVersion": "1.0.0", "name": "x"}'}, "has no \"type\""),
    ({"10-x.conf": b'{"cniVersion": "0.2.0", "name": "x", "type": "bridge"}'}, "cniVersion 0.2.0"),
    ({"10-x.conflist": b'{"name": "x", "plugins": [{"type": "bridge"}]}'}, "has no cniVersion"),
    ({"10-x.conf": b'{"cniVersion": "1.0.0", "type": "bridge"}'}, "has no network \"name\""),
    ({"10-x.conf": b'{"cniVersion": "1.0.0", "name": "x", "type": "bridge"}',
      "10-x.conflist": b'{"cniVersion": "1.0.0", "name": "y", "plugins": [{"type": "ptp"}]}'},
     "10-x.conflist already exists and is not ambit's"),
    ({"10-x.conf": b'{"cniVersion": "1.0.0", "name": "x", "type": "bridge"}',
      "10-x.conf2.json": b'{"cniVersion": "1.0.0", "name": "z", "type": "ptp"}'},
     "would let 10-x.conf2.json be read first"),
    ({"10-x.conf": b'\xff\xfe{}'}, "is not UTF-8 text"),
])
def test_refuses_what_it_cannot_edit_safely(files, expected):
    with pytest.raises(CniConfError) as failure:
        plan_install(files, SETTINGS)
    assert expected in str(failure.value)


def test_no_primary_is_its_own_error():
    with pytest.raises(NoPrimaryConfig):
        plan_install({"calico-kubeconfig": b"x"}, SETTINGS)


def test_uninstall_strips_ambit_from_files_it_has_no_backup_for():
    # ambit was chained into 10-ptp.conflist, then a new primary appeared first by name
    chained = install(load("ptp"))
    del chained["10-ptp.conflist" + BACKUP_SUFFIX]  # e.g. removed by hand
    plan = plan_uninstall(chained)
    after = applied(chained, plan)
    assert json.loads(after["10-ptp.conflist"]) == json.loads(load("ptp")["10-ptp.conflist"])
    assert "removed ambit-cni from 10-ptp.conflist" in plan.summary


def test_uninstall_keeps_what_else_changed_since_the_backup():
    name = CONFLISTS["bridge"]
    installed = install(load("bridge"))
    conf = json.loads(installed[name])
    conf["plugins"][0]["hairpinMode"] = False  # an administrator edited the chained file
    installed[name] = json.dumps(conf).encode()

    after = uninstall(installed)

    restored = json.loads(after[name])
    assert [p["type"] for p in restored["plugins"]] == ["bridge", "portmap"]
    assert restored["plugins"][0]["hairpinMode"] is False
    assert name + BACKUP_SUFFIX not in after


def test_uninstall_with_nothing_installed_changes_nothing_but_our_leftovers():
    files = {**load("calico"), ".10-calico.conflist.ambit-tmp-99-1": b"", "10-calico.conflist" + BACKUP_SUFFIX:
             load("calico")["10-calico.conflist"]}
    plan = plan_uninstall(files)
    assert set(plan.ops) == {RemoveFile(".10-calico.conflist.ambit-tmp-99-1"),
                             RemoveFile("10-calico.conflist" + BACKUP_SUFFIX)}
    assert applied(files, plan) == load("calico")
    assert plan_uninstall(load("calico")).ops == ()


def test_writes_of_converted_files_carry_the_original_mode_source():
    plan = plan_install(load("lone-conf"), SETTINGS)
    writes = {op.name: op for op in plan.ops if isinstance(op, WriteFile)}
    assert writes["10-bridge.conflist"].mode_from == "10-bridge.conf"
    assert writes["10-bridge.conf" + BACKUP_SUFFIX].mode_from == "10-bridge.conf"
    # the backup is written before the file that replaces the original
    names = [op.name for op in plan.ops]
    assert names.index("10-bridge.conf" + BACKUP_SUFFIX) < names.index("10-bridge.conflist") < \
        names.index("10-bridge.conf")


@pytest.mark.parametrize("kwargs, expected", [
    ({"agent_socket": "agent.sock"}, "absolute path"),
    ({"agent_socket": "/" + "x" * 120}, "longer than"),
    ({"timeout": 0}, "between 0 and 600"),
    ({"log_level": "verbose"}, "logLevel must be one of"),
])
def test_plugin_settings_are_checked_as_the_plugin_checks_them(kwargs, expected):
    with pytest.raises(ValueError) as failure:
        PluginSettings(**kwargs)
    assert expected in str(failure.value)


def test_plugin_entry_is_what_the_plugin_parses():
    from ambit.cni import spec as cnispec
    entry = PluginSettings(agent_socket="/run/a.sock", timeout=2.5, log_level="warn").entry()
    parsed = cnispec.parse_config({"cniVersion": "1.0.0", "name": "n", **entry}, "DEL")
    assert (parsed.agent_socket, parsed.timeout, parsed.log_level) == ("/run/a.sock", 2.5, "warn")

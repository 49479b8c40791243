"""`ambit install-cni`: the command the DaemonSet's init container runs once
and its sidecar runs with --watch.

Every option also reads an environment variable, so the DaemonSet sets them
from the ConfigMap with `envFrom`. Exit codes: 0 done, 1 could not install
(the message says why), 2 usage.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PLUGIN = "/opt/ambit/cni-plugin/ambit-cni"  # where the image keeps the frozen plugin


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ambit.cni import spec as cnispec
    parser = subparsers.add_parser(
        "install-cni", help="copy ambit-cni onto this node and chain it after the primary CNI",
        description="Copy ambit-cni into the CNI bin directory and append it to the plugins of the "
                    "configuration the runtime reads (the first *.conf/*.conflist/*.json by name; a lone "
                    ".conf becomes a .conflist). Every change is atomic and undone exactly by --uninstall.")
    parser.add_argument("--cni-bin-dir", default=_env("AMBIT_CNI_BIN_DIR", DEFAULT_BIN_DIR),
                        help="the host's CNI plugin directory (default: %(default)s; env AMBIT_CNI_BIN_DIR)")
    parser.add_argument("--cni-conf-dir", default=_env("AMBIT_CNI_CONF_DIR", DEFAULT_CONF_DIR),
                        help="the host's CNI configuration directory (default: %(default)s; env AMBIT_CNI_CONF_DIR)")
    parser.add_argument("--plugin", default=_env("AMBIT_CNI_PLUGIN", DEFAULT_PLUGIN), metavar="PATH",
                        help="the ambit-cni executable, or the one-directory frozen build holding it "
                             "(default: %(default)s; env AMBIT_CNI_PLUGIN)")
    parser.add_argument("--agent-socket", default=_env("AMBIT_AGENT_SOCKET", cnispec.DEFAULT_AGENT_SOCKET),
                        help="agentSocket in the plugin's configuration, a path on the host "
                             "(default: %(default)s; env AMBIT_AGENT_SOCKET)")
    parser.add_argument("--timeout", default=_env("AMBIT_CNI_TIMEOUT", "5s"),
                        help="the plugin's timeout for one agent call, seconds or a duration like 500ms "
                             "(default: %(default)s; env AMBIT_CNI_TIMEOUT)")
    parser.add_argument("--cni-log-level", default=_env("AMBIT_CNI_LOG_LEVEL", "info"),
                        choices=cnispec.LOG_LEVELS,
                        help="the plugin's logLevel (default: %(default)s; env AMBIT_CNI_LOG_LEVEL)")
    parser.add_argument("--wait-for-primary", type=float, default=float(_env("AMBIT_CNI_WAIT_FOR_PRIMARY", "0")),
                        metavar="SECONDS",
                        help="without --watch: wait this long for the primary CNI to write its configuration "
                             "(default: %(default)s; env AMBIT_CNI_WAIT_FOR_PRIMARY)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true",
                      help="install, then keep re-applying whenever the primary CNI rewrites its file, until "
                           "SIGTERM (ambit stays chained after exit: pods must not start unmeshed during an "
                           "upgrade)")
    mode.add_argument("--uninstall", action="store_true",
                      help="remove exactly ambit's entry (restoring the primary's original bytes) and its "
                           "plugin, then exit")
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import log as logconf
    from ambit.cni import spec as cnispec
    from .cniconf import CniConfError, NoPrimaryConfig, PluginSettings
    from .installer import Installer, PluginSource

    logconf.configure("info")
    try:
        settings = PluginSettings(agent_socket=args.agent_socket, timeout=cnispec.parse_timeout(
            _number_or_text(args.timeout)), log_level=args.cni_log_level)
    except (ValueError, cnispec.CniError) as exc:
        print(f"ambit install-cni: {getattr(exc, 'msg', exc)}", file=sys.stderr)
        return 2
    try:
        if args.uninstall:
            result = Installer(args.cni_bin_dir, args.cni_conf_dir, None, settings).uninstall()
            print(f"ambit install-cni: {result.plan.summary}; removed from {args.cni_bin_dir}: "
                  f"{', '.join(result.removed_from_bin) or 'nothing'}")
            for note in result.plan.notes:
                print(f"ambit install-cni: note: {note}", file=sys.stderr)
            return 0
        installer = Installer(args.cni_bin_dir, args.cni_conf_dir, PluginSource.locate(args.plugin), settings)
        if args.watch:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            installer.watch(stop, interval=args.interval)
            return 0
        deadline = time.monotonic() + args.wait_for_primary
        while True:
            try:
                result = installer.install()
                break
            except NoPrimaryConfig:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, args.interval))
        print(f"ambit install-cni: {result.plan.summary}; plugin "
              f"{'installed' if result.plugin_changed else 'already in place'} in {args.cni_bin_dir}")
        return 0
    except (CniConfError, OSError) as exc:
        print(f"ambit install-cni: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value

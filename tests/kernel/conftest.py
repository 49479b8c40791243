"""The lab harness every kernel test that builds a lab uses: `lab_factory`.

A lab gets a prefix (`<tag>-`, refused while another lab with it is alive),
address ranges no other live lab of the session has, a state directory and a
bpffs root of its own. Before it is made, nothing of that prefix or those
ranges may exist (a crashed earlier run is reported with the command that
removes it); when the block ends, also by a failure or an interrupt, the lab
is taken down, and the check runs again: namespaces, processes, root links,
routes and rules, pins and files (tests/support/labcheck.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from ambit.lab.labconfig import LabConfig
from ambit.lab.plan import LabSettings
from ambit.lab.topology import Lab

from tests.support.bpffs import lab_bpffs_root
from tests.support.labcheck import lab_debris

# Lab number N: underlay 10.(120+N).0.0/24, pods 10.(150+N).0.0/16. Nothing else
# in the tests uses these, and neither does the default lab (10.100.0.0/24, 10.244.0.0/16).
FIRST_UNDERLAY_OCTET = 120
FIRST_POD_OCTET = 150
MAX_LIVE_LABS = 30


def _root_rules() -> set[tuple]:
    with IPRoute() as ipr:
        return {(r["family"], r.get("FRA_PRIORITY"), r.get("FRA_SRC"), r.get("FRA_DST"), r.get("FRA_FWMARK"),
                 r.get("FRA_TABLE")) for r in ipr.get_rules()}


class LabFactory:
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._live: dict[int, str] = {}  # slot -> prefix

    @contextlib.contextmanager
    def settings(self, tag: str, *, capture: str = "ebpf") -> Iterator[LabSettings]:
        """Where one lab lives, checked clean before and after; the caller
        builds and removes the lab (or runs something that does, like the tour)."""
        prefix = f"{tag}-"
        assert prefix not in self._live.values(), f"two live labs with the prefix {prefix}"
        slot = next(n for n in range(MAX_LIVE_LABS) if n not in self._live)
        ranges = (f"10.{FIRST_UNDERLAY_OCTET + slot}.", f"10.{FIRST_POD_OCTET + slot}.")
        self._live[slot] = prefix
        try:
            with lab_bpffs_root(prefix) as bpffs_root:
                settings = LabSettings(prefix=prefix, state_dir=self._tmp.mktemp(tag) / "state",
                                       underlay_cidr=f"{ranges[0]}0.0/24", pod_supernet=f"{ranges[1]}0.0/16",
                                       bpffs_root=bpffs_root, capture=capture)
                debris = lab_debris(settings, ranges)
                assert debris == [], f"a previous run left {debris}: `ambit lab down --prefix {prefix}`"
                rules = _root_rules()
                yield settings
                assert lab_debris(settings, ranges) == [], f"the {prefix} lab left debris"
                assert _root_rules() - rules == set(), "ip rules were added to the machine's own namespace"
                # lab_bpffs_root removes the (empty) root itself and fails on a pin left in it
        finally:
            del self._live[slot]

    @contextlib.contextmanager
    def lab(self, tag: str, config: LabConfig | None = None, *, capture: str = "ebpf") -> Iterator[Lab]:
        """A Lab in settings(tag); brought `up(config)` when a config is given.
        `down()` runs however the block ends; every pod it recorded must then
        have been deleted through the CNI chain without a failure."""
        with self.settings(tag, capture=capture) as settings:
            lab = Lab(settings)
            try:
                if config is not None:
                    lab.up(config)
                yield lab
            finally:
                recorded = set(lab.state().pods) if settings.state_file.exists() else set()
                report = lab.down()
            assert report.del_failures == ()
            assert set(report.pods_deleted) == recorded


@pytest.fixture(scope="session")
def lab_factory(tmp_path_factory: pytest.TempPathFactory) -> LabFactory:
    return LabFactory(tmp_path_factory)

"""Packages are found under the card's folders (cni/, agent/, lab/, waypoint/,
ca/, cli/, proto/ambit/api) and installed as ambit.cni, ambit.agent, ...; the mapping lives in
setup.cfg's package_dir, the sub-packages are discovered here so the list
never goes stale."""
from setuptools import find_packages, setup

ROOTS = {"ambit.cni": "cni", "ambit.agent": "agent", "ambit.lab": "lab", "ambit.waypoint": "waypoint",
         "ambit.ca": "ca", "ambit.cli": "cli", "ambit.api": "proto/ambit/api"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages())

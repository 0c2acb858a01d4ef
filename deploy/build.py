"""``make image``: the serving image built here with podman, from Debian packages and uv.lock, no registry needed.

    python -m deploy image [--model M[,M...]] [--runtime onnxruntime|torchscript] [--version V] [--explanations]
                           [--image NAME:TAG] [--compare]

Which versions: every built version, or those of ``--model`` / ``--version`` / ``--runtime``; the image holds their
archives and nothing else (``deploy/image.py`` says what else it holds). torch goes in only when one of them runs on
TorchScript, or with ``--explanations`` (the archives' manifest entries say each version's runtime); the build says
which, and why.

Four layers, each cached so that a rebuild with unchanged inputs takes seconds:

1. base: Debian bookworm made by mmdebstrap from Debian's mirror (the essential packages, Python 3.11, nginx-light,
   tini, the C++ runtime; no documentation, manual pages or locales), the user 10001, and Java 17 cut down by jlink
   from Debian's JDK in a second, throw-away root filesystem. Imported with ``podman import``; tagged by the hash of
   everything that goes in (``base_recipe``): it is built again only when one of those changes.
2. Python: the virtual environment ``/opt/toolkit/.venv``, made here by uv from uv.lock (the groups the versions need,
   ``LEAVE_OUT`` left out, the torch placeholder where torch is not), its native libraries' debugging symbols
   stripped (the serving group's; torch's as they ship), compiled to bytecode that is never checked against its
   source (the root filesystem is read-only, so nothing could be written back). Tagged by the hash of the packages'
   pins with their wheel hashes (``uv export``), the base and the recipe.
3. the runtime files, compiled the same way;
4. the model store: the chosen versions unpacked, verified and sealed (no archives: ``image.stage_models``).

Layers 3 and 4 are copied again on every build; podman reuses them when their content did not change.

Caches live in ``$IMAGE_CACHE`` (default ``~/.cache/torchserve-toolkit/image``): the base's root filesystem tarball,
the Python environments, the staged build context, and per image what the last build measured (``images/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from archives.store import REPO, Manifest, locked
from deploy import contract, image
from deploy.podman import cache_dir, digest, image_exists, missing_tools, podman, run
from deploy.plan import DeployError, default_image, plan_models, project_version, torchserve_version

DEBIAN_MIRRORS = (
    "deb http://deb.debian.org/debian {suite} main",
    "deb http://deb.debian.org/debian-security {suite}-security main",
)
BASE_NAME = "localhost/torchserve-toolkit-base"
PYTHON_NAME = "localhost/torchserve-toolkit-python"
LABEL = "torchserve-toolkit"  # the prefix of the image's own labels
# bumped when the way a layer is made changes in a way its inputs do not show
BASE_RECIPE = 1
PYTHON_RECIPE = 3
# dpkg leaves these out of the base: nothing in the image reads them
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*",
                 "/usr/share/lintian/*")
MB = 10**6  # as podman counts


# --- which versions, and whether torch ------------------------------------------------------------------------------


@dataclass
class Selection:
    versions: list[tuple[str, str]]
    entries: list[dict[str, Any]]
    torch_reasons: list[str]
    explanations: bool

    @property
    def torch(self) -> bool:
        return bool(self.torch_reasons)

    @property
    def groups(self) -> tuple[str, ...]:
        return image.groups(self.torch)

    def describe(self) -> str:
        versions = ", ".join(f"{e['model']} {e['version']} ({e.get('runtime', 'torchscript')})" for e in self.entries)
        return f"versions: {versions}\n{image.torch_summary(self.torch_reasons)}"


def select(models: list[str] | None = None, runtime: str | None = None, version: str | None = None,
           explanations: bool = False, manifest: Manifest | None = None) -> Selection:
    """The built versions an image holds: every one, or those of ``models`` / ``version`` / ``runtime``."""
    manifest = manifest or Manifest()
    built = sorted(manifest.models)
    if not built:
        raise DeployError(f"no archives in {manifest.store}: build them first with make archive")
    unknown = sorted(set(models or ()) - set(built))
    if unknown:
        raise DeployError(f"{', '.join(unknown)} not built (built: {', '.join(built)}); make archive MODEL=...")
    if runtime and runtime not in ("torchscript", "onnxruntime"):
        raise DeployError(f"--runtime {runtime!r}: torchscript or onnxruntime")
    entries = [e for model in (models or built) for _, e in sorted(manifest.models[model].items(),
                                                                    key=lambda item: _version_key(item[0]))
               if (version is None or e["version"] == version)
               and (runtime is None or e.get("runtime", "torchscript") == runtime)]
    if not entries:
        raise DeployError(f"no built version of {', '.join(models or built)} matches "
                          f"{' '.join(filter(None, [f'version {version}' if version else '', runtime or '']))}")
    return Selection([(e["model"], e["version"]) for e in entries], entries,
                     image.torch_reasons(entries, explanations), explanations)


def _version_key(version: str) -> list[int]:
    return [int(part) for part in version.split(".")]


# --- layer 1: the base, from Debian packages -------------------------------------------------------------------------


def base_recipe() -> dict[str, Any]:
    """Everything the base is made from: its hash is the base's tag."""
    return {"recipe": BASE_RECIPE, "suite": image.DEBIAN_SUITE, "mirrors": list(DEBIAN_MIRRORS),
            "packages": {**image.LOCAL_BASE_PACKAGES, **image.DEBIAN_PACKAGES}, "jdk": image.JDK_PACKAGES,
            "java_modules": list(image.JAVA_MODULES), "jlink": list(image.JLINK_OPTIONS), "uid": contract.UID,
            "user": image.USER, "excludes": list(DPKG_EXCLUDES)}


def _mmdebstrap(packages: dict[str, str], output: str, fmt: str, hooks: list[tuple[str, str]],
                excludes: tuple[str, ...] = ()) -> list[str]:
    mode = "root" if os.geteuid() == 0 else "unshare"
    command = ["mmdebstrap", f"--mode={mode}", "--variant=essential", f"--format={fmt}",
               "--include=" + ",".join(f"{name}={version}" for name, version in packages.items())]
    if excludes:
        command += [f"--dpkgopt=path-exclude={pattern}" for pattern in excludes]
        command += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
        # postinst scripts of some packages link their manual pages: their folders exist, empty
        command += ["--essential-hook=mkdir -p \"$1/usr/share/man/man1\" \"$1/usr/share/man/man8\""]
    command += [f"--{kind}-hook={hook}" for kind, hook in hooks]
    command += [image.DEBIAN_SUITE, output, *(m.format(suite=image.DEBIAN_SUITE) for m in DEBIAN_MIRRORS)]
    return command


def build_java(work: Path, log: Callable[[str], None]) -> Path:
    """Java 17 cut down by jlink, made in a throw-away root filesystem holding Debian's JDK."""
    out = work / "java"
    out.mkdir(parents=True)
    jdk = image.JDK_PACKAGES["openjdk-17-jdk-headless"]
    log(f"  java: jlink of {len(image.JAVA_MODULES)} modules from Debian's openjdk-17-jdk-headless {jdk}")
    hooks = [("customize", f'chroot "$1" {image.jlink_command(image.JDK_HOME + "/bin/jlink")}'),
             ("customize", f"copy-out {image.JAVA_HOME} {out}")]
    run(_mmdebstrap(image.JDK_PACKAGES, "/dev/null", "null", hooks), "making Java with jlink", timeout=1800)
    return out / Path(image.JAVA_HOME).name


def build_base(tag: str, log: Callable[[str], None]) -> dict[str, Any]:
    cache = cache_dir()
    tarball = cache / f"base-{tag.rpartition(':')[2]}.tar"
    started = time.monotonic()
    if not tarball.exists():
        if shutil.which("mmdebstrap") is None:
            raise DeployError("mmdebstrap is not installed: the base is made from Debian packages (./install.sh)")
        with tempfile.TemporaryDirectory(prefix="base-", dir=cache) as work:
            java = build_java(Path(work), log)
            packages = {**image.LOCAL_BASE_PACKAGES, **image.DEBIAN_PACKAGES}
            log(f"  base: Debian {image.DEBIAN_SUITE} (essential) + {', '.join(packages)}")
            user = f"{image.USER}:x:{contract.UID}:{contract.UID}::/tmp:/usr/sbin/nologin"
            hooks = [("customize", f"copy-in {java} {Path(image.JAVA_HOME).parent}"),
                     ("customize", f'echo "{user}" >> "$1/etc/passwd" && '
                                   f'echo "{image.USER}:x:{contract.UID}:" >> "$1/etc/group"'),
                     ("customize", 'rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/*')]
            partial = Path(work) / "rootfs.tar"
            command = _mmdebstrap(packages, str(partial), "tar", hooks, DPKG_EXCLUDES)
            command[3:3] = ["--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
            run(command, "making the base with mmdebstrap", timeout=1800)
            os.replace(partial, tarball)
    podman("import", "--quiet", "--message", "Debian packages: " + json.dumps(base_recipe()["packages"]),
           str(tarball), tag, what="podman import of the base")
    return {"seconds": round(time.monotonic() - started, 1), "tarball_bytes": tarball.stat().st_size}


# --- layer 2: the Python environment ---------------------------------------------------------------------------------


def exported(groups: tuple[str, ...]) -> str:
    """The pins of ``groups`` with their wheel hashes, as uv.lock has them."""
    command = ["uv", "export", "--frozen", "--no-default-groups", "--no-emit-project", "--no-header"]
    for group in groups:
        command += ["--group", group]
    return run(command, "uv export", cwd=REPO, timeout=120)


def python_recipe(selection: Selection, base: str) -> dict[str, Any]:
    recipe = {"recipe": PYTHON_RECIPE, "base": base, "groups": list(selection.groups),
              "pins": exported(selection.groups),
              "leave_out": image.leave_out(selection.groups), "pruned": image.PRUNED,
              "python": image.LOCAL_BASE_PACKAGES["python3.11"],
              "strip": strip_tool() is not None}
    if not selection.torch:
        recipe["placeholder"] = image.PLACEHOLDER_SOURCE.read_text()
    return recipe


def strip_tool() -> str | None:
    return shutil.which("strip")


def host_python() -> str:
    """A Python 3.11 here, to make the environment with (it runs the image's Debian Python 3.11 once inside)."""
    executable = Path(sys.executable).resolve()
    version = subprocess.run([str(executable), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != image.PYTHON_VERSION:
        raise DeployError(f"{executable} is Python {version}; the image's environment needs {image.PYTHON_VERSION}")
    return str(executable)


def has_symbols(path: Path) -> bool:
    """Whether ``path`` is a 64-bit ELF file with a symbol table (``strip`` would make it smaller)."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        offset, = struct.unpack_from("<Q", header, 0x28)
        size, count, _ = struct.unpack_from("<HHH", header, 0x3A)
        if not offset or not count:
            return False
        handle.seek(offset)
        table = handle.read(size * count)
    return any(struct.unpack_from("<I", table, i * size + 4)[0] == 2 for i in range(count))  # SHT_SYMTAB


def distribution_files(site_packages: Path, names: set[str]) -> list[Path]:
    """The files the installed distributions ``names`` (normalised) own, by their RECORD."""
    found = []
    for record in site_packages.glob("*.dist-info/RECORD"):
        name = re.sub(r"[-_.]+", "-", distribution_name(record.parent)).lower()
        if name in names:
            found += [site_packages / line.split(",", 1)[0] for line in record.read_text().splitlines() if line]
    return found


def distribution_name(dist_info: Path) -> str:
    """``numpy`` of ``numpy-2.4.6.dist-info``."""
    return dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0]


def rewritten_by_auditwheel(path: Path) -> bool:
    """Whether a wheel's library was rewritten by patchelf (auditwheel): vendored into a ``<name>.libs`` folder, or
    given an RPATH/RUNPATH to find those. binutils' strip corrupts such files (their segments end up misaligned:
    "ELF load command address/offset not page-aligned"), so they keep their symbols."""
    if any(part.endswith(".libs") for part in path.parts):
        return True
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return dynamic.returncode != 0 or "(RPATH)" in dynamic.stdout or "(RUNPATH)" in dynamic.stdout


def strip_symbols(site_packages: Path, groups: tuple[str, ...], python: str) -> int:
    """Strip the symbol tables of the serving group's native extension modules that are safe to strip (torch's
    stay as they ship), then import each one to prove it still loads; bytes saved."""
    tool = strip_tool()
    if tool is None or shutil.which("readelf") is None:
        return 0
    serving = set(image.reachable_packages((image.SERVE_GROUP,)))
    if image.TORCH_GROUP in groups:
        serving -= set(image.reachable_packages((image.TORCH_GROUP,)))
    saved, stripped = 0, []
    for path in distribution_files(site_packages, serving):
        if not (path.is_file() and not path.is_symlink() and path.suffix == ".so" and has_symbols(path)):
            continue
        if rewritten_by_auditwheel(path):
            continue
        before = path.stat().st_size
        run([tool, "--strip-unneeded", str(path)], f"strip {path.name}", timeout=300)
        saved += before - path.stat().st_size
        relative = path.relative_to(site_packages)
        stripped.append(".".join([*relative.parts[:-1], relative.name.split(".", 1)[0]]))
    if stripped:
        run([python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]", *stripped],
            f"importing the stripped modules {', '.join(stripped)}", timeout=300)
    return saved


COMPILE = """
import compileall, py_compile, sys
folder, inside = sys.argv[1:3]
compileall.compile_dir(folder, quiet=2, workers=0, stripdir=folder, prependdir=inside,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_tree(folder: Path, inside: str, python: str) -> None:
    """Bytecode for every module under ``folder``, named as ``inside`` in the image, never checked against its
    source: the image cannot change, and its read-only root filesystem could not take a fresher copy. A file
    this Python cannot compile (torch ships tests written for newer ones) stays source, as uv leaves it."""
    run([python, "-c", COMPILE, str(folder), inside], f"compiling {inside}", timeout=1800)


def serving_environment(venv: Path, groups: tuple[str, ...], python: str | None = None) -> dict[str, Any]:
    """A virtual environment of ``groups`` alone, exactly as uv.lock pins them, as the image holds it: relocatable,
    ``LEAVE_OUT`` and ``PRUNED`` left out, the torch placeholder where torch is not, the serving group's native
    modules stripped. Runs here with ``python`` (a Python 3.11); tests/test_image.py imports every serving module in one."""
    python = python or host_python()
    run(["uv", "venv", "--quiet", "--relocatable", "--python", python, str(venv)], "uv venv", timeout=300)
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
    command = ["uv", "sync", "--quiet", "--frozen", "--no-default-groups", "--no-install-project",
               "--link-mode", "copy"]
    for group in groups:
        command += ["--group", group]
    run(command, f"uv sync of the groups {', '.join(groups)}", cwd=REPO, env=env, timeout=1800)
    dropped = image.leave_out(groups)
    if dropped:
        run(["uv", "pip", "uninstall", "--quiet", "--python", str(venv / "bin" / "python"), *dropped],
            "uv pip uninstall", timeout=300)
    site = venv / image.SITE_PACKAGES.removeprefix(".venv/")
    if image.TORCH_GROUP not in groups:
        image.install_torch_placeholder(site)
    pruned = image.prune(site)
    saved = strip_symbols(site, groups, str(venv / "bin" / "python"))
    return {"left_out": dropped, "pruned_bytes": pruned, "stripped_bytes": saved}


def build_environment(dest: Path, selection: Selection, log: Callable[[str], None]) -> dict[str, Any]:
    """The image's virtual environment in ``dest`` (a ``.venv`` relocatable to /opt/toolkit/.venv, its bytecode
    compiled for that path, its interpreter the base's /usr/bin/python3.11)."""
    venv = dest / ".venv"
    python = host_python()
    facts = serving_environment(venv, selection.groups, python)
    compile_tree(venv, image.VENV, python)
    interpreter = f"/usr/bin/python{image.PYTHON_VERSION}"
    version = image.LOCAL_BASE_PACKAGES[f"python{image.PYTHON_VERSION}"].split("-")[0]
    config = venv / "pyvenv.cfg"
    lines = [line for line in config.read_text().splitlines() if not line.startswith(("home =", "version_info ="))]
    config.write_text("\n".join([f"home = {Path(interpreter).parent}", f"version_info = {version}", *lines]) + "\n")
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(interpreter)
    return facts


def build_python(tag: str, base: str, selection: Selection, log: Callable[[str], None]) -> dict[str, Any]:
    """The Python layer's image (skipped when it exists: its tag is the hash of what goes in); the staged
    environment is kept beside it (``done.json`` marks it complete), so that the image is made again quickly."""
    started = time.monotonic()
    stage = cache_dir() / f"python-{tag.rpartition(':')[2]}"
    done = stage / "done.json"
    cached = image_exists(tag)
    if not cached:
        if not (done.exists() and (stage / ".venv").is_dir()):
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            log(f"  python: uv sync of the groups {', '.join(selection.groups)} from uv.lock")
            facts = build_environment(stage, selection, log)
            (stage / "Containerfile").write_text(image.python_containerfile(base))
            facts["packages"] = package_sizes(stage / ".venv" / image.SITE_PACKAGES.removeprefix(".venv/"))
            done.write_text(json.dumps(facts) + "\n")
        podman("build", "--quiet", "--format", "docker", "--layers", "-t", tag, "-f", str(stage / "Containerfile"),
               "--label", f"{LABEL}.layer=python", str(stage), what="podman build of the Python layer")
        shutil.rmtree(stage / ".venv")  # the image holds it now (uv's cache makes it again quickly if needed)
    facts = json.loads(done.read_text()) if done.exists() else {}
    return {**facts, "cached": cached, "seconds": round(time.monotonic() - started, 1)}


def package_sizes(site_packages: Path, top: int = 12) -> list[tuple[str, int]]:
    """The largest distributions of an environment, with their bytes (by RECORD)."""
    sizes = []
    for record in site_packages.glob("*.dist-info/RECORD"):
        name = distribution_name(record.parent)
        files = [site_packages / line.split(",", 1)[0] for line in record.read_text().splitlines() if line]
        total = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
        cache = {f.parent / "__pycache__" for f in files if f.suffix == ".py"}
        total += sum(p.stat().st_size for folder in cache if folder.is_dir() for p in folder.iterdir())
        sizes.append((name, total))
    return sorted(sizes, key=lambda item: -item[1])[:top]


# --- layers 3 and 4, and the image -----------------------------------------------------------------------------------


@dataclass
class Built:
    image: str
    id: str
    size: int
    layers: list[dict[str, Any]]
    selection: dict[str, Any]
    torch: bool
    groups: list[str]
    seconds: float
    steps: dict[str, Any] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"{self.image}: {self.size / MB:.0f} MB uncompressed, {len(self.layers)} layers "
                 f"(built in {self.seconds:.1f} s)"]
        for layer in self.layers:
            lines.append(f"  {layer['bytes'] / MB:8.1f} MB  {layer['holds']}")
        python = self.steps.get("python", {})
        if python.get("packages"):
            lines.append("  largest Python packages: " + ", ".join(
                f"{name} {size / MB:.0f} MB" for name, size in python["packages"][:8]))
        if python.get("left_out"):
            lines.append(f"  left out (no serving process imports them): {', '.join(python['left_out'])}")
        if python.get("pruned_bytes"):
            lines.append(f"  files no serving process loads left out (deploy/image.py PRUNED): "
                         f"{python['pruned_bytes'] / MB:.0f} MB")
        if python.get("stripped_bytes"):
            lines.append(f"  symbol tables stripped from native libraries: {python['stripped_bytes'] / MB:.0f} MB")
        return "\n".join(lines)


def image_labels(selection: Selection) -> dict[str, str]:
    versions = [{"model": e["model"], "version": e["version"], "runtime": e.get("runtime", "torchscript"),
                 "sha256": e["sha256"]} for e in selection.entries]
    return {"org.opencontainers.image.title": "torchserve-toolkit",
            "org.opencontainers.image.version": project_version(),
            f"{LABEL}.torchserve": torchserve_version(),
            f"{LABEL}.versions": json.dumps(versions, separators=(",", ":")),
            f"{LABEL}.torch": image.torch_summary(selection.torch_reasons),
            f"{LABEL}.groups": " ".join(selection.groups)}


def stage_context(context: Path, selection: Selection, python_image: str) -> None:
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    runtime = image.stage_runtime(context / "toolkit")
    compile_tree(runtime, contract.WORKDIR, host_python())
    image.stage_models(context / "model_store", selection.versions, selection.torch)
    (context / "Containerfile").write_text(image.containerfile(python_image, image_labels(selection)))


def layers(name: str, selection: Selection) -> list[dict[str, Any]]:
    """The image's layers that hold files, bottom first, each with what it holds (by where it was copied)."""
    history = json.loads(podman("history", "--format", "json", name, what="podman history"))
    models = ", ".join(f"{m} {v}" for m, v in selection.versions) + " (unpacked and verified; no archives)"
    holds = {image.VENV: f"Python packages ({', '.join(selection.groups)}) in {image.VENV}",
             f"{contract.IMAGE_MODEL_STORE}/": f"the model store: {models}",
             f"{contract.WORKDIR}/": "the runtime files: serve.sh, serving/, handlers/, manage/, archives/, "
                                     "configuration"}
    found = []
    for step in reversed(history):
        created = (step.get("CreatedBy") or "").strip()
        size = int(step.get("size") or step.get("Size") or 0)
        if " ADD file:" in created or created.startswith("ADD file:"):
            what = ("the base: Debian bookworm from Debian packages (Python 3.11, nginx-light, tini, the C++ "
                    "runtime), Java 17 cut down by jlink, the user 10001")
        elif "COPY" in created:
            what = next((text for destination, text in holds.items() if created.endswith(f" in {destination}")),
                        created[:100])
        else:
            continue
        found.append({"bytes": size, "holds": what})
    return found


def build(models: list[str] | None = None, runtime: str | None = None, version: str | None = None,
          explanations: bool = False, name: str | None = None, log: Callable[[str], None] = print) -> Built:
    """Build the image (every layer from its cache where its inputs did not change); what it measured."""
    selection = select(models, runtime, version, explanations)
    try:  # the image's Deployments must render: each model's default version in it, its archives intact
        plan_models(sorted({m for m, _ in selection.versions}), manifest=_subset(selection), use_running=False)
    except DeployError as error:
        raise DeployError(f"these versions cannot make a serving image: {error}") from None
    name = name or default_image()
    reason = missing_tools(need_base=False)
    if reason:
        raise DeployError(reason)
    log(f"image {name}\n{selection.describe()}")
    started = time.monotonic()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Any] = {}
    with locked(cache / "lock"):
        base = f"{BASE_NAME}:{digest(base_recipe())}"
        if image_exists(base):
            steps["base"] = {"cached": True}
        else:
            log(f"base {base}: making it from Debian packages (a few minutes, once)")
            steps["base"] = build_base(base, log)
        python = f"{PYTHON_NAME}:{digest(python_recipe(selection, base))}"
        if not image_exists(python):
            log(f"python {python}: making the environment with uv")
        steps["python"] = build_python(python, base, selection, log)
        context = cache / "context" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        stage_context(context, selection, python)
        previous = _image_id(name)
        podman("build", "--quiet", "--format", "docker", "--layers", "-t", name, "-f", str(context / "Containerfile"),
               str(context), what="podman build of the image")
        shutil.rmtree(context, ignore_errors=True)
        if previous and previous != _image_id(name):  # the image this tag named before, now untagged
            subprocess.run(["podman", "rmi", previous], capture_output=True, timeout=120, check=False)
    inspected = json.loads(podman("image", "inspect", name, what="podman image inspect"))[0]
    built = Built(name, inspected["Id"][:12], int(inspected["Size"]), layers(name, selection),
                  {"versions": selection.versions}, selection.torch, list(selection.groups),
                  round(time.monotonic() - started, 1), steps)
    record = cache / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps(asdict(built), indent=2) + "\n")
    return built


def _image_id(name: str) -> str | None:
    result = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True,
                            text=True, timeout=60, check=False)
    return result.stdout.strip() or None if result.returncode == 0 else None


def _subset(selection: Selection) -> Manifest:
    """The built store's manifest as the image's holds it: only the chosen versions (in memory)."""
    manifest = Manifest()
    chosen = set(selection.versions)
    manifest.models = {model: {v: e for v, e in versions.items() if (model, v) in chosen}
                       for model, versions in manifest.models.items()}
    manifest.models = {model: versions for model, versions in manifest.models.items() if versions}
    return manifest


def image_facts(name: str) -> dict[str, Any]:
    """What a built image holds, from its labels: versions (with runtime and sha256), torch, groups."""
    inspected = json.loads(podman("image", "inspect", name, what=f"podman image inspect {name}"))[0]
    labels = inspected.get("Labels") or inspected.get("Config", {}).get("Labels") or {}
    if f"{LABEL}.versions" not in labels:
        raise DeployError(f"{name} was not built by make image (no {LABEL}.versions label)")
    return {"versions": json.loads(labels[f"{LABEL}.versions"]), "torch": labels.get(f"{LABEL}.torch", ""),
            "groups": labels.get(f"{LABEL}.groups", "").split(), "size": int(inspected["Size"]),
            "id": inspected["Id"][:12]}


def main(args: argparse.Namespace) -> int:
    models = (args.model or "").replace(",", " ").split() or None
    built = build(models, args.runtime, args.version, args.explanations, args.image)
    print(built.report())
    if args.compare and not built.torch:
        torch = build(models, args.runtime, args.version, True, f"{built.image}-torch", log=lambda _: None)
        print(torch.report())
        print(f"without torch: {built.size / MB:.0f} MB; the same versions with torch: {torch.size / MB:.0f} MB "
              f"({torch.size / built.size:.1f} x)")
    return 0

"""podman on this machine: whether an image can be built and run here (and why not, in one line), the options
``podman run`` needs here, a build step that fails with the command's last lines, and the build cache's place."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deploy.plan import DeployError


def cache_dir() -> Path:
    configured = os.environ.get("IMAGE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchserve-toolkit" / "image"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run(command: list[str], what: str, timeout: float = 1800, **kwargs) -> str:
    """A build step; DeployError with the command's last lines when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise DeployError(f"{what} failed (exit {result.returncode}): {' '.join(command[:4])} ...\n{tail}")
    return result.stdout


# --- what this machine can do ----------------------------------------------------------------------------------------


def missing_tools(need_base: bool = True) -> str | None:
    """Why an image cannot be built or run here, in one line; None when it can."""
    if not shutil.which("podman"):
        return "podman is not installed (./install.sh installs podman, buildah, runc, mmdebstrap, uidmap)"
    if os.geteuid() != 0:
        userns = Path("/proc/sys/kernel/unprivileged_userns_clone")
        if userns.exists() and userns.read_text().strip() == "0":
            return "not root, and unprivileged user namespaces are off (kernel.unprivileged_userns_clone=0)"
        if not shutil.which("newuidmap"):
            return "not root, and no newuidmap for rootless podman (./install.sh installs uidmap)"
    if need_base and not shutil.which("mmdebstrap"):
        return "mmdebstrap is not installed: the base is made from Debian packages (./install.sh installs it)"
    if not shutil.which("uv"):
        return "uv is not installed (./install.sh installs it)"
    return None


def podman(*args: str, what: str, timeout: float = 1800) -> str:
    return run(["podman", *args], what, timeout=timeout)


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


def run_options() -> list[str]:
    """What ``podman run`` needs on this machine besides the container's own settings: the resource limits this
    process has (podman's defaults try to raise them, which some machines refuse), processes at most the kernel's
    pid_max (no more could exist; some kernels refuse a limit above it), and runc where the kernel's cgroups are
    hybrid (crun refuses them)."""
    options = []
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = resource.getrlimit(limit)
        bound = hard if hard != resource.RLIM_INFINITY else (pid_max if name == "nproc" else soft)
        if bound == resource.RLIM_INFINITY:
            continue
        if name == "nproc":
            bound = min(bound, pid_max)
        value = min(soft, bound) if soft != resource.RLIM_INFINITY else bound
        options += ["--ulimit", f"{name}={value}:{bound}"]
    hybrid = Path("/sys/fs/cgroup/unified").is_dir()
    if hybrid and shutil.which("runc"):
        options += ["--runtime", "runc"]
    return options

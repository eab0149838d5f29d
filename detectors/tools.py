"""Execution:Runtime/SuspiciousTool: an offensive or dual-use tool runs (catalog: data/tools.toml).

A tool is recognised by what the process runs, never by what it mentions:
the executable's basename, its comm (the kernel's 15-char name, which is
also the script name when a ``#!`` script is run directly), the script an
interpreter was given (``python3 sqlmap.py``, ``sh linpeas.sh``) or the
module of ``python -m``. Arguments are not names: ``grep nmap notes.txt``,
``apt-cache show nmap`` or a file called ``nmap`` that nobody runs are not
findings. A SHA-256 listed in the catalog matches whatever the file is
called. Renamed miners are caught by their command-line shape (XMRig's
``--donate-level``, a stratum URL, a Monero wallet as the pool user...),
except in ``sh -c`` (its text names a program that is matched itself when
it starts) and in programs that only read or print text.

Levels: ``offensive`` tools are High, ``dual_use`` ones Low. A dual-use
entry may fire only in its risky mode (netcat listening or executing, not
``nc -z`` port checks) and may become offensive in the mode attackers use
(``ncat -e``, ``socat exec:``, ``chisel client ... R:socks``).

Shared helpers for command lines (:func:`program_names`, :func:`is_shell`...)
live here and are used by the commands and process-behaviour families.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector, DetectorContext, is_interpreter, is_shell

TYPE = "Execution:Runtime/SuspiciousTool"
MAX_EXAMPLE = 1024

# interpreter options that take a value (the value is not the script)
_OPTS_WITH_VALUE = frozenset({"-W", "-X", "-Q", "-I", "-M", "-r", "-d", "-O", "--require", "-o"})


class CatalogError(ValueError):
    """A data file of this package is malformed: the message names the file, the entry and the field."""


def _base(path: str | None) -> str:
    return os.path.basename(path or "")


def argv(info: ProcessInfo) -> list[str]:
    """The argument vector, as far as a space-joined command line allows."""
    return (info.command_line or "").split()


def shell_mode(info: ProcessInfo) -> str:
    """How a shell runs: "command" (-c), "script" (a file argument) or "stdin" (reads commands: -i, -s or none)."""
    args = argv(info)[1:]
    for i, a in enumerate(args):
        if a == "--":
            return "script" if i + 1 < len(args) else "stdin"
        if a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            if "c" in a[1:]:
                return "command"
            if "s" in a[1:] or "i" in a[1:]:
                return "stdin"
            continue
        if a.startswith("--") or a.startswith("+"):
            continue
        return "script"
    return "stdin"


def is_interactive_flag(info: ProcessInfo) -> bool:
    return any(a.startswith("-") and not a.startswith("--") and "i" in a[1:] for a in argv(info)[1:3])


@dataclass(frozen=True, slots=True)
class Program:
    """What a process runs: its names (lowercase) and the arguments given to that program."""

    names: frozenset[str]
    args: str


def program_of(info: ProcessInfo) -> Program:
    """Names: exe basename, comm, argv[0] basename; for interpreters and shells also the script or module run."""
    tokens = argv(info)
    names = {n.lower() for n in (_base(info.executable_path), info.name or "", _base(tokens[0] if tokens else "")) if n}
    rest = tokens[1:]
    interp = is_interpreter(info) or is_shell(info)
    if not interp and names & {"busybox"} and rest:
        names.add(_base(rest[0]).lower())
        return Program(frozenset(names), " ".join(rest[1:]))
    if not interp:
        return Program(frozenset(names), " ".join(rest))
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "-m" and i + 1 < len(rest):  # python -m package.module
            mod = rest[i + 1].lower()
            names.update({mod, mod.split(".")[0]})
            return Program(frozenset(names), " ".join(rest[i + 2 :]))
        if a in ("-c", "-e", "-E", "-r", "--eval", "-p") or (a.startswith("-") and a[1:2] != "-" and "c" in a[1:]):
            return Program(frozenset(names), " ".join(rest[i + 1 :]))  # inline code: no script
        if a in {"--", "-"}:
            i += 1
            break
        if a.startswith("-"):
            i += 2 if a in _OPTS_WITH_VALUE else 1
            continue
        break
    if i < len(rest) and not rest[i].startswith("-"):
        script = _base(rest[i]).lower()
        names.add(script)
        stem = script.rsplit(".", 1)[0] if "." in script else script
        names.add(stem)
        return Program(frozenset(names), " ".join(rest[i + 1 :]))
    return Program(frozenset(names), " ".join(rest))


def example(info: ProcessInfo) -> str:
    cl = info.command_line or info.executable_path or info.name or ""
    return cl if len(cl) <= MAX_EXAMPLE else cl[: MAX_EXAMPLE - 1] + "…"


# -- the catalog ---------------------------------------------------------------------------------------------------

CATEGORIES = frozenset(
    {"scanner", "sniffer", "tunnel", "password_cracker", "post_exploitation", "miner", "exploitation", "recon",
     "backdoor"}
)  # fmt: skip
LEVELS = frozenset({"offensive", "dual_use"})
_TOOL_KEYS = {"name", "category", "level", "names", "sha256", "when", "offensive_when", "shapes"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    category: str
    level: str
    names: frozenset[str]
    sha256: frozenset[str]
    when: tuple[re.Pattern[str], ...]
    offensive_when: tuple[re.Pattern[str], ...]
    shapes: tuple[re.Pattern[str], ...]


def compile_regexes(value: Any, where: str, field: str) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{where}: {field} must be a list of regex strings")
    out = []
    for v in value:
        try:
            out.append(re.compile(v))
        except re.error as exc:
            raise CatalogError(f"{where}: {field} regex {v!r} does not compile: {exc}") from None
    return tuple(out)


def _str_list(value: Any, where: str, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CatalogError(f"{where}: {field} must be a list of non-empty strings")
    return value


@dataclass(frozen=True, slots=True)
class ToolCatalog:
    tools: tuple[Tool, ...]
    by_name: dict[str, Tool]
    by_sha256: dict[str, Tool]
    shaped: tuple[Tool, ...]
    skip_programs: frozenset[str]

    def match(self, info: ProcessInfo) -> tuple[Tool, str] | None:
        """The tool a process runs and its level, or None."""
        prog = program_of(info)
        tool = self.by_sha256.get((info.executable_sha256 or "").lower())
        if tool is None:
            for n in prog.names:
                tool = self.by_name.get(n) or self.by_name.get(n[:15])
                if tool is not None:
                    break
        shell_text = is_shell(info) and shell_mode(info) == "command"
        if tool is None and self.shaped and not shell_text and not (prog.names & self.skip_programs):
            cl = info.command_line or ""
            tool = next((t for t in self.shaped if any(r.search(cl) for r in t.shapes)), None)
        if tool is None:
            return None
        if tool.when and not any(r.search(prog.args) for r in tool.when):
            return None
        level = tool.level
        if level == "dual_use" and any(r.search(prog.args) for r in tool.offensive_when):
            level = "offensive"
        return tool, level


def parse_tools(text: str, source: str = "tools.toml") -> ToolCatalog:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    unknown_top = data.keys() - {"tool", "shapes"}
    if unknown_top:
        raise CatalogError(f"{source}: unknown table(s) {', '.join(sorted(unknown_top))}")
    shapes_cfg = data.get("shapes", {})
    skip = _str_list(shapes_cfg.get("skip_programs"), f"{source} [shapes]", "skip_programs")
    tools: list[Tool] = []
    by_name: dict[str, Tool] = {}
    by_sha: dict[str, Tool] = {}
    for i, entry in enumerate(data.get("tool", [])):
        where = f"{source} tool #{i + 1} ({entry.get('name', '?')})"
        missing = {"name", "category", "level", "names"} - entry.keys()
        if missing:
            raise CatalogError(f"{where}: missing {', '.join(sorted(missing))}")
        unknown = entry.keys() - _TOOL_KEYS
        if unknown:
            raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if entry["category"] not in CATEGORIES:
            raise CatalogError(f"{where}: category {entry['category']!r} is not one of {', '.join(sorted(CATEGORIES))}")
        if entry["level"] not in LEVELS:
            raise CatalogError(f"{where}: level {entry['level']!r} is not one of {', '.join(sorted(LEVELS))}")
        names = frozenset(n.lower() for n in _str_list(entry["names"], where, "names"))
        hashes = frozenset(h.lower() for h in _str_list(entry.get("sha256"), where, "sha256"))
        for h in hashes:
            if not _HEX64.match(h):
                raise CatalogError(f"{where}: sha256 {h!r} is not 64 hex digits")
        tool = Tool(
            name=entry["name"],
            category=entry["category"],
            level=entry["level"],
            names=names,
            sha256=hashes,
            when=compile_regexes(entry.get("when"), where, "when"),
            offensive_when=compile_regexes(entry.get("offensive_when"), where, "offensive_when"),
            shapes=compile_regexes(entry.get("shapes"), where, "shapes"),
        )
        if not names and not hashes and not tool.shapes:
            raise CatalogError(f"{where}: needs names, sha256 or shapes to be recognised by")
        for n in names:
            if n in by_name:
                raise CatalogError(f"{where}: name {n!r} is already used by tool {by_name[n].name!r}")
            by_name[n] = tool
            # comm is cut to 15 characters: "impacket-secretsdump" runs as "impacket-secret"
            by_name.setdefault(n[:15], tool)
        for h in hashes:
            by_sha[h] = tool
        tools.append(tool)
    return ToolCatalog(tuple(tools), by_name, by_sha, tuple(t for t in tools if t.shapes), frozenset(skip))


@functools.cache
def tool_catalog() -> ToolCatalog:
    text = resources.files("detectors").joinpath("data/tools.toml").read_text(encoding="utf-8")
    return parse_tools(text, "detectors/data/tools.toml")


class SuspiciousToolDetector(Detector):
    name = "suspicious_tool"
    types = (TYPE,)
    kinds = ("process.exec",)

    def __init__(self, ctx: DetectorContext, catalog: ToolCatalog | None = None) -> None:
        super().__init__(ctx)
        self.catalog = catalog or tool_catalog()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None:
            return ()
        hit = self.catalog.match(p)
        if hit is None:
            return ()
        tool, level = hit
        return (
            Detection(
                TYPE,
                p,
                context={"toolName": tool.name, "toolCategory": tool.category, "commandLineExample": example(p)},
                key=(tool.name,),
                level=level,
                facts={"toolName": tool.name, "toolCategory": tool.category.replace("_", " ")},
                time=event.time,
            ),
        )


DETECTORS = (SuspiciousToolDetector,)

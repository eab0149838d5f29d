"""*/Runtime/SuspiciousCommand: command lines of each tactic (patterns: data/commands.toml).

Two kinds of pattern, both matched on ``process.exec``:

* ``shell`` patterns search the whole command line of a shell, an
  interpreter or a command wrapper (``sh -c "curl x | sh"``, ``python -c
  "exec(base64.b64decode(...))"``, ``sudo sh -c "echo k >> ~/.ssh/..."``):
  pipes, redirections and builtins exist only there. Other programs are
  never searched this way, so ``grep "curl.*| sh" notes`` is not a finding.
* ``program`` patterns look at one program's own arguments (``chmod 4755
  x``, ``crontab /tmp/c``, ``aws sts get-caller-identity``), so a program
  named in someone else's arguments (``apt-cache show iptables``) is not.

When a shell's ``-c`` text matched a pattern, the program that shell starts
for it (its child, or its own pid after an exec in place) is not reported
again under the same pattern: one command, one finding.

Pipelines typed at a prompt (``curl url | sh``) leave no process holding
the line: the prompt's shell forks a downloader (or a decoder: ``base64
-d``) and a shell or interpreter reading its stdin as siblings. They are
recognised here from the exec stream: both children of one shell, started
within ``window_seconds`` of each other, the downloader writing to stdout.
When both are still alive, ``/proc/<pid>/fd`` settles it: the reader's fd 0
must be the very pipe that is the downloader's fd 1 (see :func:`_fd_link`).
``bash -c "$(curl url)"`` typed at a prompt is not seen: the outer shell
substitutes the download before starting bash, whose argv holds the script.
Filters reading stdin may stand between the two (``curl url | gunzip |
sh``, ``| tee /tmp/.t |``): they are skipped, and each link's pipe is
checked. A reader that is a subshell forked by the prompt's shell (``curl
url | while read id; do ...; done``: its parent's image, never exec'd, see
:func:`collectors.procfs.forked_from`) runs the typed text, not the
download: not a finding. A reader image that was a fork caught before its
exec (a poller's early look) is replaced by its exec'd image.

Benign by construction: ``curl -f http://localhost/health``, ``wget -q -O-
url > file`` (no shell reads it), ``base64`` encoding, ``chmod +x`` on a
build artifact (no download before it), ``crontab -l``, ``sh -c``
entrypoints, ``chmod 2775`` on shared directories, jemalloc in LD_PRELOAD.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
import tomllib
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from collectors import procfs
from collectors.events import ProcessInfo, RuntimeEvent
from detectors import catalog
from detectors.base import Detection, Detector, DetectorContext, is_interpreter, is_shell
from detectors.tools import (
    MAX_EXAMPLE,
    CatalogError,
    Program,
    compile_regexes,
    example,
    program_of,
    shell_mode,
)

TYPES = (
    "Execution:Runtime/SuspiciousCommand",
    "Discovery:Runtime/SuspiciousCommand",
    "Persistence:Runtime/SuspiciousCommand",
    "PrivilegeEscalation:Runtime/SuspiciousCommand",
    "DefenseEvasion:Runtime/SuspiciousCommand",
)
# programs that run a command line given to them: their arguments are searched like a shell's -c text
WRAPPERS = frozenset(
    {"sudo", "su", "doas", "runuser", "env", "nohup", "setsid", "timeout", "xargs", "watch", "script", "nice",
     "ionice", "stdbuf", "flock", "chroot", "nsenter", "busybox", "unbuffer", "sg", "ssh"}
)  # fmt: skip
PARENTS = frozenset({"shell", "noninteractive"})
_PATTERN_KEYS = {"name", "type", "level", "mitre", "tactic", "shell", "program", "args", "require", "exclude", "parent"}
_PIPELINE_KEYS = {"downloaders", "decoders", "stdin_programs", "pass_through", "window_seconds"}
PIPE_PATTERNS = {"download": "download_pipe_to_shell", "decode": "decode_pipe_to_shell"}


@dataclass(frozen=True, slots=True)
class CommandPattern:
    name: str
    type: str
    level: str | None
    mitre: str
    tactic: str
    shell: tuple[re.Pattern[str], ...]
    programs: frozenset[str]
    args: tuple[re.Pattern[str], ...]
    require: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]
    parent: str | None

    def accepts(self, text: str) -> bool:
        return all(r.search(text) for r in self.require) and not any(r.search(text) for r in self.exclude)

    def shell_match(self, text: str) -> bool:
        """A ``shell`` regex matches, and ``require`` holds within the same command list (up to the next top-level
        ``&&``/``||``): `python3 -c "urlopen(health)" && exec python3 app.py` is a check, then a start, not a
        fetch-and-exec. ``exclude`` looks at the whole text (a rotation's `mv` before the truncation)."""
        for r in self.shell:
            for m in r.finditer(text):
                clause = _CLAUSE_END.split(text[m.start() :], maxsplit=1)[0]
                if all(q.search(clause) for q in self.require) and not any(x.search(text) for x in self.exclude):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class Pipeline:
    downloaders: frozenset[str]
    decoders: frozenset[str]
    stdin_programs: frozenset[str]
    pass_through: frozenset[str]
    window: float


@dataclass(frozen=True, slots=True)
class CommandCatalog:
    patterns: tuple[CommandPattern, ...]
    by_name: dict[str, CommandPattern]
    shell_patterns: tuple[CommandPattern, ...]
    by_program: dict[str, tuple[CommandPattern, ...]]
    pipeline: Pipeline


def _check_pattern(entry: dict[str, Any], where: str, types: dict[str, catalog.FindingType]) -> CommandPattern:
    missing = {"name", "type", "mitre", "tactic"} - entry.keys()
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = entry.keys() - _PATTERN_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    ftype = entry["type"]
    if ftype not in TYPES:
        raise CatalogError(f"{where}: type {ftype!r} is not one of {', '.join(TYPES)}")
    levels = types[ftype].levels if ftype in types else {}
    level = entry.get("level")
    if levels and level not in levels:
        raise CatalogError(f"{where}: {ftype} needs a level, one of {', '.join(sorted(levels))} (got {level!r})")
    if not levels and level is not None:
        raise CatalogError(f"{where}: {ftype} has one severity; remove level {level!r}")
    if not re.match(r"^T\d{4}(?:\.\d{3})?$", str(entry["mitre"])):
        raise CatalogError(f"{where}: mitre {entry['mitre']!r} is not an ATT&CK technique id (T1234 or T1234.001)")
    programs = entry.get("program")
    if programs is not None and (not isinstance(programs, list) or not all(isinstance(p, str) for p in programs)):
        raise CatalogError(f"{where}: program must be a list of program names")
    shell = compile_regexes(entry.get("shell"), where, "shell")
    args = compile_regexes(entry.get("args"), where, "args")
    if not shell and not programs:
        raise CatalogError(f"{where}: needs shell regexes, program names or both")
    if args and not programs:
        raise CatalogError(f"{where}: args given without program")
    parent = entry.get("parent")
    if parent is not None and parent not in PARENTS:
        raise CatalogError(f"{where}: parent {parent!r} is not one of {', '.join(sorted(PARENTS))}")
    return CommandPattern(
        name=str(entry["name"]),
        type=ftype,
        level=level,
        mitre=str(entry["mitre"]),
        tactic=str(entry["tactic"]),
        shell=shell,
        programs=frozenset(p.lower() for p in programs or ()),
        args=args,
        require=compile_regexes(entry.get("require"), where, "require"),
        exclude=compile_regexes(entry.get("exclude"), where, "exclude"),
        parent=parent,
    )


def parse_commands(text: str, source: str = "commands.toml") -> CommandCatalog:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    unknown_top = data.keys() - {"pattern", "pipeline"}
    if unknown_top:
        raise CatalogError(f"{source}: unknown table(s) {', '.join(sorted(unknown_top))}")
    types = catalog.catalog()
    patterns: list[CommandPattern] = []
    by_name: dict[str, CommandPattern] = {}
    for i, entry in enumerate(data.get("pattern", [])):
        pat = _check_pattern(entry, f"{source} pattern #{i + 1} ({entry.get('name', '?')})", types)
        if pat.name in by_name:
            raise CatalogError(f"{source} pattern #{i + 1}: name {pat.name!r} is used twice")
        by_name[pat.name] = pat
        patterns.append(pat)
    pipe = data.get("pipeline", {})
    where = f"{source} [pipeline]"
    unknown = pipe.keys() - _PIPELINE_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    lists: dict[str, frozenset[str]] = {}
    for key in ("downloaders", "decoders", "stdin_programs", "pass_through"):
        value = pipe.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise CatalogError(f"{where}: {key} must be a list of program names")
        lists[key] = frozenset(v.lower() for v in value)
    window = pipe.get("window_seconds", 2.0)
    if not isinstance(window, int | float) or not 0 < window <= 30:
        raise CatalogError(f"{where}: window_seconds must be a number in (0, 30], got {window!r}")
    for name in PIPE_PATTERNS.values():
        if name not in by_name:
            raise CatalogError(f"{source}: the pipeline needs a pattern named {name!r} (its type and level)")
    by_program: dict[str, list[CommandPattern]] = {}
    for pat in patterns:
        for prog in pat.programs:
            by_program.setdefault(prog, []).append(pat)
    return CommandCatalog(
        patterns=tuple(patterns),
        by_name=by_name,
        shell_patterns=tuple(p for p in patterns if p.shell),
        by_program={k: tuple(v) for k, v in by_program.items()},
        pipeline=Pipeline(
            lists["downloaders"], lists["decoders"], lists["stdin_programs"], lists["pass_through"], float(window)
        ),
    )


@functools.cache
def command_catalog() -> CommandCatalog:
    text = resources.files("detectors").joinpath("data/commands.toml").read_text(encoding="utf-8")
    return parse_commands(text, "detectors/data/commands.toml")


# -- /proc: is the reader's stdin the downloader's stdout? ------------------------------------------------------


def _fd_link(info: ProcessInfo, fd: int) -> str | None:
    """readlink /proc/<pid>/fd/<fd> if <pid> is still this process, else None (collectors.procfs)."""
    links = procfs.read_fd_links(info.pid, info.start_ticks, (fd,))
    return links.get(fd) if links is not None else None


_CLAUSE_END = re.compile(r"\s(?:&&|\|\|)\s")
_SEPARATORS = re.compile(r"&&|\|\||[;|&\n(){}`]|\$\(")
_SKIP_WORDS = frozenset({"sudo", "doas", "nohup", "exec", "env", "command", "builtin", "then", "do", "else", "time",
                         "setsid", "!", "if", "while", "until"})  # fmt: skip


def _simple_commands(cl: str) -> Iterable[tuple[str, str]]:
    """(program, arguments) of each simple command in a shell's command text (after its options)."""
    words = cl.split()
    i = 1
    while i < len(words) and words[i].startswith("-"):
        i += 1
    for seg in _SEPARATORS.split(" ".join(words[i:])):
        tokens = seg.split()
        while tokens and (tokens[0] in _SKIP_WORDS or ("=" in tokens[0] and not tokens[0].startswith("="))):
            tokens.pop(0)
        if tokens and not tokens[0].startswith((">", "<", "-")):
            yield os.path.basename(tokens[0].strip("\"'")).lower(), " ".join(tokens[1:])


def _writes_stdout(prog: Program) -> bool:
    """A downloader's output goes to stdout (curl's default; wget only with -O -)."""
    names, args = prog.names, prog.args
    if "wget" in names:
        return bool(re.search(r"(?:^|\s)(?:-\w*O\s*-|--output-document[=\s]-)(?:\s|$)|-O\s*/dev/stdout", args))
    return not re.search(r"(?:^|\s)(?:-\w*o\s*(?!-(?:\s|$))\S|-\w*O\b|--output[=\s](?!-)|--remote-name)", args)


def _superseded(info: ProcessInfo) -> bool:
    """The pid has exec'd something else since this image was read (a poller may first catch a pipeline's children
    as forks of the prompt's shell, `sh`, before they become `curl`, `gunzip`, `bash`): that image is no reader."""
    try:
        dfd = procfs.open_pid_dir(info.pid)
    except (procfs.ProcfsError, OSError):
        return False
    try:
        if procfs.parse_stat(procfs.read_small("stat", dfd))[3] != info.start_ticks:
            return False
        raw = procfs.read_all("cmdline", dfd)
    except (OSError, procfs.ProcfsError, ValueError):
        return False
    finally:
        os.close(dfd)
    now = [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
    return bool(now) and now[:2] != (info.command_line or "").split()[:2]


def _reads_program_from_stdin(info: ProcessInfo) -> bool:
    if is_shell(info):
        return shell_mode(info) == "stdin"
    if is_interpreter(info):
        args = (info.command_line or "").split()[1:]
        return not args or args == ["-"]
    return False


def _filters_stdin(prog: Program) -> bool:
    """A pass-through stage of a pipeline (`| gunzip |`, `| tee /tmp/.t |`, `| tr a-z n-za-m |`): it reads its stdin,
    not files named in its arguments (`cat /tmp/o.sh | sh` runs a local file, whatever wrote it before)."""
    words = prog.args.split()
    if prog.names & {"tee", "tr"}:
        return True
    if prog.names & {"gzip", "xz", "bzip2"} and not any(w.startswith("-") and "d" in w for w in words):
        return False  # compressing, not decompressing
    return all(w.startswith("-") for w in words)


@dataclass(slots=True)
class _Sibling:
    info: ProcessInfo
    role: str  # download | decode | reader | pass (a filter between) | "" (another child of the same shell)
    time: float  # start, wall clock
    reported: bool = False


def _start_wall(info: ProcessInfo) -> float:
    """When a process started, on the wall clock, to the tick: ``start_time`` is built on btime, which is
    truncated to whole seconds; the boot clock is not (wall now - boot clock now = the exact boot time)."""
    if info.start_ticks <= 0:
        return info.start_time
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + info.start_ticks / procfs.CLOCK_TICKS


def _order(s: _Sibling) -> tuple[int, int]:
    return (s.info.start_ticks, s.info.pid)


def _between(group: Iterable[_Sibling], first: _Sibling, second: _Sibling) -> list[_Sibling] | None:
    """The pass-through stages between ``first`` and ``second`` (in order) when only such stages were forked between
    them, else None (`curl url > f; cat f | sh` has cat, reading a file, between curl and sh)."""
    lo, hi = _order(first), _order(second)
    if lo >= hi:
        return None
    inside = sorted((s for s in group if lo < _order(s) < hi), key=_order)
    return inside if all(s.role == "pass" for s in inside) else None


class SuspiciousCommandDetector(Detector):
    name = "suspicious_command"
    types = TYPES
    kinds = ("process.exec",)

    def __init__(self, ctx: DetectorContext, commands: CommandCatalog | None = None) -> None:
        super().__init__(ctx)
        self.catalog = commands or command_catalog()
        # shell-text hits: process uuid -> pattern names; pid -> uuid of its image that hit (exec in place)
        self._shell_hits: OrderedDict[str, set[str]] = OrderedDict()
        self._hit_pids: OrderedDict[int, str] = OrderedDict()
        # recent pipeline candidates by parent uuid
        self._siblings: OrderedDict[str, deque[_Sibling]] = OrderedDict()
        self.pipelines = 0
        self.pipe_mismatch = 0
        self.forked_readers = 0

    def snapshot(self) -> dict[str, Any]:
        return {"pipelines": self.pipelines, "pipeMismatch": self.pipe_mismatch, "forkedReaders": self.forked_readers}

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None or not p.command_line:
            return ()
        prog = program_of(p)
        out: list[Detection] = []
        shellish = is_shell(p) or is_interpreter(p) or bool(prog.names & WRAPPERS)
        hits: set[str] = set()
        if shellish:
            cl = p.command_line
            for pat in self.catalog.shell_patterns:
                if pat.shell_match(cl) and self._parent_ok(p, pat):
                    hits.add(pat.name)
                    out.append(self._detection(pat, p, event.time, example(p)))
            # the simple commands of the text: a `chmod u+s x` typed in `sh -c` is judged even if chmod exits
            # before its own exec can be read (pollers miss such short lives)
            for seg_prog, seg_args in _simple_commands(cl):
                for pat in self.catalog.by_program.get(seg_prog, ()):
                    if pat.name in hits or (pat.args and not any(r.search(seg_args) for r in pat.args)):
                        continue
                    if pat.accepts(seg_args):
                        hits.add(pat.name)
                        out.append(self._detection(pat, p, event.time, example(p)))
            if hits:
                self._remember_hits(p, hits)
        seen: set[str] = set()
        for name in prog.names:
            for pat in self.catalog.by_program.get(name, ()):
                if pat.name in hits or pat.name in seen:
                    continue
                seen.add(pat.name)
                if pat.args and not any(r.search(prog.args) for r in pat.args):
                    continue
                if not pat.accepts(prog.args) or not self._parent_ok(p, pat) or self._covered(p, pat.name):
                    continue
                out.append(self._detection(pat, p, event.time, example(p)))
        out.extend(self._pipeline(p, prog, event.time))
        return out

    # -- helpers ------------------------------------------------------------------------------------------------
    def _detection(self, pat: CommandPattern, p: ProcessInfo, when: float, cmd: str) -> Detection:
        return Detection(
            pat.type,
            p,
            context={"commandLineExample": cmd, "patternName": pat.name, "mitreTechniqueId": pat.mitre},
            key=(pat.name,),
            level=pat.level,
            facts={"pattern": pat.name.replace("_", " "), "tactic": pat.tactic},
            time=when,
        )

    def _parent_ok(self, p: ProcessInfo, pat: CommandPattern) -> bool:
        if pat.parent is None:
            return True
        parent = self.ctx.parent(p)
        if pat.parent == "shell":
            return parent is None or is_shell(parent)
        # noninteractive: a prompt's shell reads its stdin; a script or -c shell (or no shell) does not
        return parent is None or not (is_shell(parent) and shell_mode(parent) == "stdin")

    def _remember_hits(self, p: ProcessInfo, hits: set[str]) -> None:
        self._shell_hits[p.uuid] = hits
        self._hit_pids[p.pid] = p.uuid
        for d in (self._shell_hits, self._hit_pids):
            while len(d) > 2048:
                d.popitem(last=False)

    def _covered(self, p: ProcessInfo, name: str) -> bool:
        """Already reported on the shell whose -c text ran this program (its parent, or this pid before exec)."""
        if p.parent_uuid and name in self._shell_hits.get(p.parent_uuid, ()):
            return True
        prev = self._hit_pids.get(p.pid)
        return prev is not None and prev != p.uuid and name in self._shell_hits.get(prev, ())

    def _pipeline(self, p: ProcessInfo, prog: Program, now: float) -> list[Detection]:
        if not p.parent_uuid:
            return []
        pipe = self.catalog.pipeline
        role: str | None = None
        if prog.names & pipe.downloaders and _writes_stdout(prog):
            role = "download"
        elif prog.names & pipe.decoders:
            role = "decode"
        elif prog.names & pipe.stdin_programs and _reads_program_from_stdin(p):
            role = "reader"
        elif prog.names & pipe.pass_through and _filters_stdin(prog):
            role = "pass"
        group = self._siblings.get(p.parent_uuid)
        if group is None:
            if role is None:
                return []  # nothing to pair with yet: only groups with a candidate are kept
            group = self._siblings[p.parent_uuid] = deque(maxlen=16)
            while len(self._siblings) > 512:
                self._siblings.popitem(last=False)
        else:
            self._siblings.move_to_end(p.parent_uuid)
        me = _Sibling(p, role or "", _start_wall(p))
        for old in [s for s in group if s.info.pid == p.pid and s.info.start_ticks == p.start_ticks]:
            group.remove(old)  # an earlier image of this process (the fork before its exec)
        group.append(me)
        if role is None:
            return []
        # the stages may be seen in any order: whichever arrives last completes the pipeline
        for reader in group:
            if reader.role != "reader" or reader.reported:
                continue
            for source in group:
                if source.role not in PIPE_PATTERNS or abs(source.time - reader.time) > pipe.window:
                    continue
                stages = _between(group, source, reader)
                if stages is None or not any(s is me for s in (source, reader, *stages)):
                    continue
                found = self._pipe_hit(source.info, source.role, [s.info for s in stages], reader.info, now)
                if found:
                    reader.reported = True
                    return found
        return []

    def _pipe_hit(
        self, source: ProcessInfo, role: str, stages: list[ProcessInfo], reader: ProcessInfo, now: float
    ) -> list[Detection]:
        pat = self.catalog.by_name[PIPE_PATTERNS[role]]
        parent = self.ctx.parent(reader)
        if parent is not None and not is_shell(parent):
            return []  # a program wiring two children together is not a typed pipeline
        if reader.parent_uuid and pat.name in self._shell_hits.get(reader.parent_uuid, ()):
            return []  # `sh -c "curl x | sh"`: reported on that shell
        # `curl url > f; cat f | sh` in a script: curl was over before the reader started
        if source.exited_at is not None and source.exited_at < _start_wall(reader):
            return []
        # `curl url | while read id; do ...; done`: the shell reading the pipe is a subshell forked for the loop (its
        # parent's image, never exec'd), running the typed text, not a program read from the pipe
        if reader.forked or (
            parent is not None
            and procfs.forked_from((reader.pid, reader.start_ticks), (parent.pid, parent.start_ticks))
        ):
            self.forked_readers += 1
            return []
        if _superseded(reader):
            return []  # its exec'd image will be judged when it is seen
        chain = [source, *stages, reader]
        for left, right in itertools.pairwise(chain):
            out_link, in_link = _fd_link(left, 1), _fd_link(right, 0)
            if out_link is not None and in_link is not None and out_link != in_link:
                self.pipe_mismatch += 1
                return []
        self.pipelines += 1
        cmd = " | ".join(p.command_line or p.name for p in chain)
        return [self._detection(pat, reader, now, cmd[:MAX_EXAMPLE])]


DETECTORS = (SuspiciousCommandDetector,)

"""proc.runc_write of the kernel-traces source: a file named runc held open for writing (CVE-2019-5736).

The overwrite itself is staged on copies: a file named ``runc`` (and ``runc.amd64``) in a temporary directory,
opened for writing by one process, and the look-alikes: the same file opened read-only, a file whose name only
contains "runc", an ordinary script written in /tmp. Nothing touches a real runc binary.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_kernel_traces import SLEEP, Traces

from collectors.events import RuntimeEvent

pytestmark = pytest.mark.timeout(120)

OPEN = textwrap.dedent(
    """
    import os, sys, time
    sys.stdin.readline()
    fd = os.open(sys.argv[1], {"w": os.O_WRONLY, "rw": os.O_RDWR, "r": os.O_RDONLY}[sys.argv[2]])
    print("open", fd, flush=True)
    time.sleep(60)
    """
)


async def test_runc_opened_for_writing_vs_read_only_and_look_alikes(tmp_path: Path) -> None:
    traces = Traces()
    await traces.start()
    try:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        runc, amd64, lookalike = bin_dir / "runc", bin_dir / "runc.amd64", bin_dir / "runcible"
        for path in (runc, amd64, lookalike):
            shutil.copy(SLEEP, path)
        script = tmp_path / "job.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        cases = {
            "writer": [str(runc), "w"],
            "rw": [str(amd64), "rw"],
            "reader": [str(runc), "r"],
            "lookalike": [str(lookalike), "w"],
            "script": [str(script), "w"],
        }
        children = {name: traces.spawn([sys.executable, "-c", OPEN, *argv]) for name, argv in cases.items()}
        for child in children.values():
            await traces.capture(child.pid, lambda i: OPEN in (i.command_line or ""))
        await traces.passes(2)  # looked at once with nothing open
        assert not traces.of("proc.runc_write")
        for child in children.values():
            traces.tell(child)
            assert (await traces.line(child)).startswith("open ")

        ev = await traces.wait_for("proc.runc_write", children["writer"].pid)
        data = check_contract_runc(ev)
        assert data["path"] == str(runc) and data["accessMode"] == "O_WRONLY"
        assert os.readlink(f"/proc/{children['writer'].pid}/fd/{data['fd']}") == str(runc)
        ev = await traces.wait_for("proc.runc_write", children["rw"].pid)
        assert ev.data is not None and ev.data["path"] == str(amd64) and ev.data["accessMode"] == "O_RDWR"

        await traces.passes(3)
        assert len(traces.of("proc.runc_write", children["writer"].pid)) == 1  # once per image
        for name in ("reader", "lookalike", "script"):
            assert not traces.of("proc.runc_write", children[name].pid), name
    finally:
        await traces.stop()


def check_contract_runc(event: RuntimeEvent) -> dict[str, Any]:
    """The event serializes as an --events-out line with its fields and their types."""
    line = orjson.loads(event.to_bytes())
    assert line["kind"] == "proc.runc_write"
    assert isinstance(line["fd"], int) and isinstance(line["path"], str) and isinstance(line["accessMode"], str)
    assert isinstance(line["process"]["pid"], int) and line["process"]["uuid"]
    return dict(line)

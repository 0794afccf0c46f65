"""The types of events()/wait() make a missed case a type error: mypy --strict
on tests/typing/events_narrowing.py reports exactly the lines marked ``# E:``
(a loop that reads ``.payload`` without handling the Reconnected marker, or
the idle ``None`` where it can come), and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "typing" / "events_narrowing.py"


def test_a_loop_that_ignores_the_reconnected_marker_is_a_type_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path), str(SAMPLE)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )
    reported = {
        int(m.group(1))
        for m in re.finditer(rf"{re.escape(SAMPLE.name)}:(\d+): error", done.stdout)
    }
    marked = {
        n for n, line in enumerate(SAMPLE.read_text().splitlines(), 1) if "  # E:" in line
    }
    assert marked and reported == marked, done.stdout

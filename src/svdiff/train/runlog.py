"""`run.log` in the output folder: one line per event of every run into it (start, resume, checkpoints, progress,
stop, error, finish), appended, so a long job leaves a record that survives the terminal; and, read back at the next
start, the one line that says where an unfinished run stopped and how to resume it."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

LOG = "run.log"
_LINE = re.compile(r"^\S+ \S+ (?P<event>[a-z]+): ?(?P<text>.*)$")
_STEP = re.compile(r"\bstep (\d+)\b")


class RunLog:
    """Appends `date time event: text` lines to `<output_dir>/run.log` (on the main process; others write none)."""

    def __init__(self, output_dir: Path, main: bool = True):
        self.path = Path(output_dir) / LOG if main else None

    def __call__(self, event: str, text: str = "") -> None:
        if self.path is None:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {event}: {' '.join(str(text).split())}\n"
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:  # the run's own outputs will say the same louder; the log must not stop the run
            print(f"warning: cannot write {self.path}: {e.strerror or e}", file=sys.stderr)
            self.path = None


def unfinished_note(output_dir: Path, latest: Path | None) -> str | None:
    """One line about the last run into `output_dir` if it did not finish: where it stopped, why, how to resume
    (`latest`: the newest complete checkpoint there). None when there is no log or the last run finished."""
    try:
        lines = (Path(output_dir) / LOG).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    events = [(m["event"], m["text"]) for m in map(_LINE.match, lines) if m]
    starts = [i for i, (event, _) in enumerate(events) if event == "start"]
    if not starts:
        return None
    last = events[starts[-1] :]
    if any(event == "finish" for event, _ in last):
        return None
    why = next((text for event, text in reversed(last) if event in ("stop", "error")), None)
    steps = [int(s) for event, text in last if event != "start" for s in _STEP.findall(text)]
    where = f"at step {max(steps)}" if steps else "before its first step"
    head = f"the last run in {output_dir} stopped {where} ({why or 'killed, or the machine stopped'})"
    if latest is None:
        return f"{head}; it left no checkpoint, so this run starts from step 0"
    return f"{head}; to continue it from {latest.name}, add --resume_from_checkpoint latest"

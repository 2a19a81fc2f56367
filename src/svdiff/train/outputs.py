"""The output folder of a run: what may already be in it, and which run holds it.

A run writes a known set of names into `--output_dir` and replaces those that exist. So a folder that holds
anything else — a clone with its own README.md, a photo folder, notes — is someone's folder, refused unless
`--overwrite`; a folder that is or lies inside an instance or class folder is always refused (the next run would
read its pictures as photos). A class folder inside the output folder is fine (`svdiff demo` generates its class
images there): the run's own outputs never land in it. A lock file with the holder's process id makes a second
run into the same folder stop at once, instead of both writing and one run's outputs being lost.
"""

from __future__ import annotations

import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..checks import within
from ..errors import SvdiffError
from .runlog import LOG

LOCK = ".svdiff.lock"
OWN = frozenset(
    {
        "svdiff_weights.safetensors",
        "pytorch_lora_weights.safetensors",
        "unet",
        "text_encoder",
        "samples",
        "loss.png",
        "loss.json",
        "train_summary.json",
        LOG,
        LOCK,
    }
)
# checkpoints, their temporary and replaced folders, atomic-write temporaries, the writability probe
OWN_PATTERN = re.compile(r"checkpoint-\d+|\..+\.(tmp|old)|\.write-test-\d+")
# A lock younger than this without a process id is being written by a starting run.
LOCK_GRACE_S = 30


def check_folder(output_dir: Path, concepts, logging_dir: str, overwrite: bool) -> None:
    """Refuses an output folder the run must not write into; writes nothing."""
    for c in concepts:
        for kind, folder in (("instance", c.instance_data_dir), ("class", c.class_data_dir)):
            if folder is not None and within(output_dir, folder):
                raise SvdiffError(
                    f"--output_dir {output_dir} overlaps the {kind} folder {folder}: the next run would read its "
                    "pictures as training images; choose another folder"
                )
    if overwrite or not output_dir.is_dir() or (output_dir / LOG).is_file():
        return  # new, or a folder an earlier run of svdiff wrote (its run.log says so)
    own = OWN | {Path(logging_dir).parts[0] if logging_dir else "logs"}
    foreign = sorted(
        p.name
        for p in output_dir.iterdir()
        if not (p.name in own or OWN_PATTERN.fullmatch(p.name) or (p.name == "README.md" and _is_model_card(p)))
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SvdiffError(
            f"--output_dir {output_dir} holds files svdiff did not write ({shown}); choose an empty or new folder, "
            "or pass --overwrite to write into it anyway (a README.md there is replaced by the model card)"
        )


def _is_model_card(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:2000]
    except OSError:
        return False
    return head.startswith("---\n") and "\nlibrary_name: svdiff\n" in head


@contextmanager
def locked(output_dir: Path, main: bool = True):
    """Holds `output_dir` for this run (the main process's id in a lock file, created atomically); a lock left
    by a process that no longer runs is taken over. Released on exit, whatever the exit."""
    if not main:
        yield
        return
    path = output_dir / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder:
                raise SvdiffError(
                    f"--output_dir {output_dir} is in use by another svdiff run ({holder}); wait for it to end or "
                    f"choose another folder (if no such run exists, delete {path})"
                ) from None
            _take_over(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise SvdiffError(f"cannot take the lock {path}: other runs keep taking it")
    try:
        yield
    finally:
        try:
            if path.read_text() == me:
                path.unlink()
        except OSError:
            pass


def _live_holder(path: Path) -> str | None:
    """'process N on HOST' while the lock's process runs (or may run: another host, a lock being written)."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    pid, _, host = text.strip().partition(" ")
    if not pid.isdigit():
        return "a run that is starting" if age < LOCK_GRACE_S else None
    if host and host != socket.gethostname():
        return f"process {pid} on {host}"  # its liveness cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, owned by someone else
        pass
    except OverflowError:
        return None
    return f"process {pid}"


def _take_over(stale: Path) -> None:
    """Removes a dead run's lock. Moving it aside first means two runs taking over at once remove it only once:
    the second finds nothing to move (or a live lock, which it puts back) and tries again."""
    aside = stale.with_name(f"{stale.name}.{os.getpid()}.old")
    try:
        os.rename(stale, aside)
    except FileNotFoundError:
        return
    if _live_holder(aside):
        os.rename(aside, stale)
    else:
        aside.unlink(missing_ok=True)

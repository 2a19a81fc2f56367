"""Checkpoints: `checkpoint-N/` holds only what the run changes — the trained parameters (δ for svdiff), the
optimizer and lr-scheduler state (through `accelerator.save_state`), the loss history and the step; never the
frozen base. A checkpoint is written under a hidden temporary name and renamed when complete, and older ones are
pruned only after that, so a run killed while saving leaves the previous checkpoints intact and `latest` never
picks a partial one.

Every random draw of a step is a function of (seed, step), so the step is the whole data position: a run resumed
from `checkpoint-N` repeats exactly what the uninterrupted run did after step N.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import SvdiffError

TRAINED = "trained.safetensors"
STATE = "state.json"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / STATE).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def resolve(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names: `latest` (None when there is none yet), a
    `checkpoint-N` name inside the output folder, or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() and (output_dir / resume).is_dir():
        path = output_dir / resume
    if not (path / STATE).is_file():
        raise SvdiffError(f"--resume_from_checkpoint {resume}: no checkpoint there")
    return path


def read_state(path: Path) -> dict:
    """The checkpoint's state.json, checked: a damaged one is refused in one line, never half used."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise SvdiffError(f"cannot read checkpoint {path}: {e}") from None
    step, run, losses = (state.get(k) if isinstance(state, dict) else None for k in ("step", "run", "losses"))
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise SvdiffError(f"checkpoint {path} is damaged: its step is {step!r}, not a count")
    if not (isinstance(run, dict) and isinstance(losses, list)):
        raise SvdiffError(f"checkpoint {path} is damaged: its state.json lacks the run or the loss history")
    return state


def check_matches(path: Path, run: dict) -> None:
    """Refuses a checkpoint made by a different run (another method, preset, base, subject, optimizer setting…).
    A setting the checkpoint does not record (it predates the setting) is not held against it."""
    saved = read_state(path)["run"]
    for key, value in run.items():
        if key in saved and saved[key] != value:
            if key == "data":
                raise SvdiffError(
                    f"checkpoint {path} was trained on other images: resuming it on these would mix two subjects"
                )
            raise SvdiffError(
                f"checkpoint {path} does not match this run: {key} was {saved.get(key)!r}, now {value!r} (resume "
                "with the checkpoint's value, or train into another --output_dir)"
            )


def save(accelerator, output_dir: Path, step: int, trainable, run: dict, losses: list, limit: int | None, **extra):
    """Writes `checkpoint-<step>` (all processes call this), then keeps at most `limit` checkpoints. Older ones
    are removed only once the new one is complete and in place, so a kill at any moment leaves one to resume;
    a write that fails (a full disk) removes its temporary folder and ends in one line naming the last good
    checkpoint. `extra` is kept in state.json (the run's settings, for the record of a resume)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    old = output_dir / f".checkpoint-{step}.old"
    kept = checkpoints(output_dir)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            save_file(trainable.state(), str(tmp / TRAINED))
            (tmp / STATE).write_text(json.dumps({"step": step, "run": run, "losses": losses, **extra}))
            if final.exists():  # a rerun's checkpoint of the same step: the old one stays whole until replaced
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = [p for p in kept if p != final and p.is_dir()] or ([final] if final.is_dir() else [])
        reason = getattr(e, "strerror", None) or _write_failure(output_dir, e)
        raise SvdiffError(
            f"cannot write checkpoint {final}: {reason}; "
            + (f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written")
        ) from None
    if accelerator.is_main_process and limit is not None:
        for stale in checkpoints(output_dir)[:-limit]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_failure(output_dir: Path, error: Exception) -> str:
    """torch's serializer reports a full disk as an internal error ('unexpected pos …'): say what matters."""
    try:
        free = f"{shutil.disk_usage(output_dir).free // 2**20} MB free on its disk"
    except OSError:
        free = "its disk cannot be read"
    return f"the write failed with {free} ({str(error).splitlines()[0] if str(error) else type(error).__name__})"


def load(accelerator, path: Path, trainable) -> tuple[int, list]:
    """Restores the trained parameters, optimizer, lr scheduler; returns (step, loss history)."""
    state = read_state(path)
    try:
        tensors = load_file(str(path / TRAINED))
    except (OSError, SafetensorError) as e:
        raise SvdiffError(
            f"checkpoint {path} is damaged ({TRAINED}: {e}); resume from another one or delete it"
        ) from None
    expected = {k: tuple(p.shape) for k, p in trainable.params.items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found)) or sorted(k for k in expected if expected[k] != found.get(k))
        raise SvdiffError(
            f"checkpoint {path} does not match this run: {len(found)} trained tensors, expected {len(expected)}"
            + (f" (first difference: {missing[0]})" if missing else "")
        )
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch and Accelerate raise many kinds for a truncated or altered state file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SvdiffError(f"checkpoint {path} is damaged ({reason}); resume from another one or delete it") from None
    trainable.load_state(tensors)
    return state["step"], state["losses"]

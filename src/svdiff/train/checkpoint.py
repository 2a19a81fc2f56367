"""Checkpoints: `checkpoint-N/` holds only what the run changes — the trained parameters (δ for svdiff), the
optimizer and lr-scheduler state (through `accelerator.save_state`), the loss history and the step; never the
frozen base. A checkpoint is written under a hidden temporary name and renamed when complete, so a run killed
while saving leaves the previous checkpoints intact and `latest` never picks a partial one.

Every random draw of a step is a function of (seed, step), so the step is the whole data position: a run resumed
from `checkpoint-N` repeats exactly what the uninterrupted run did after step N.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise SvdiffError(f"cannot read checkpoint {path}: {e}") from None


def check_matches(path: Path, run: dict) -> None:
    """Refuses a checkpoint made by a different run (another method, preset, base, subject…). A setting the
    checkpoint does not record (it predates the setting) is not held against it."""
    saved = read_state(path)["run"]
    for key, value in run.items():
        if key in saved and saved[key] != value:
            raise SvdiffError(f"checkpoint {path} does not match this run: {key} was {saved.get(key)!r}, now {value!r}")


def save(accelerator, output_dir: Path, step: int, trainable, run: dict, losses: list, limit: int | None) -> Path:
    """Writes `checkpoint-<step>` (all processes call this); keeps at most `limit` checkpoints."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        if limit is not None:
            for old in checkpoints(output_dir)[: max(0, len(checkpoints(output_dir)) - limit + 1)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_file(trainable.state(), str(tmp / TRAINED))
        (tmp / STATE).write_text(json.dumps({"step": step, "run": run, "losses": losses}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, trainable) -> tuple[int, list]:
    """Restores the trained parameters, optimizer, lr scheduler; returns (step, loss history)."""
    state = read_state(path)
    tensors = load_file(str(path / TRAINED))
    expected = {k: tuple(p.shape) for k, p in trainable.params.items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found)) or sorted(k for k in expected if expected[k] != found.get(k))
        raise SvdiffError(
            f"checkpoint {path} does not match this run: {len(found)} trained tensors, expected {len(expected)}"
            + (f" (first difference: {missing[0]})" if missing else "")
        )
    accelerator.load_state(str(path))
    trainable.load_state(tensors)
    return int(state["step"]), state["losses"]

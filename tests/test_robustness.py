"""What a careless or hostile user can do, and what svdiff does then: each bad input ends in one `error:` line and
exit 2, with no file changed outside the output folder; existing folders, checkpoints, full disks, Ctrl-C and a
second run lose nothing; resumed runs refuse or record every changed flag; the model card quotes what it shows."""

import base64
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from svdiff.cli import main
from svdiff.errors import SvdiffError
from svdiff.format import WEIGHTS_NAME, read_shift_file, save_shift_file
from tiny_models import PROMPT, SUBJECT, cli_args, save_tiny_pipeline

FINGERPRINT = {"unet": {"shapes": "0" * 16, "probe": [0.5]}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, a shift file for it, and a finished 2-step run with checkpoint-1 (copied by the cases)."""
    root = tmp_path_factory.mktemp("world")
    base = save_tiny_pipeline(root)
    shifts = save_shift_file(
        root / "a.safetensors",
        {"unet.x.weight": torch.full((4,), 0.1)},
        base_model="b",
        fingerprint=FINGERPRINT,
        preset="all",
    )
    run = root / "run"
    assert main(cli_args(base, run, "--max_train_steps", "2", "--checkpointing_steps", "1")) == 0
    return {"root": root, "base": base, "shifts": shifts, "run": run}


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def tree(folder: Path, skip: Path | None = None) -> dict:
    """Every file under `folder` (except under `skip`) with its size and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def photos(tmp):
    shutil.copytree(SUBJECT, tmp / "photos")
    return tmp / "photos"


def resumable(world, tmp):
    shutil.copytree(world["run"], tmp / "out")
    return tmp / "out"


def shift_file_with(tmp, value):
    """A shift file holding `value`, written past the writer's own bound check (as a foreign tool might)."""
    import svdiff.format as shift_format

    real = shift_format.check_shift_bound
    shift_format.check_shift_bound = lambda tensors: None
    try:
        return save_shift_file(
            tmp / "big.safetensors",
            {"unet.x.weight": torch.full((4,), value)},
            base_model="b",
            fingerprint=FINGERPRINT,
            preset="all",
        )
    finally:
        shift_format.check_shift_bound = real


def deep_concepts(tmp):
    (tmp / "c.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["--concepts_list", str(tmp / "c.json")]


def climbing_concepts(tmp):
    entry = {
        "instance_prompt": PROMPT,
        "instance_data_dir": str(SUBJECT),
        "class_prompt": "a photo of a heart",
        "class_data_dir": "../../escaped",
    }
    (tmp / "c.json").write_text(json.dumps([entry]))
    return ["--concepts_list", str(tmp / "c.json"), "--with_prior_preservation"]


def corrupt(world, tmp, how):
    out = resumable(world, tmp)
    ck = out / "checkpoint-1"
    if how == "truncated":
        data = (ck / "trained.safetensors").read_bytes()
        (ck / "trained.safetensors").write_bytes(data[:40])
    else:
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps({**state, "step": "x"}))
    return out


def with_file(folder, name):
    """`folder/name`, a file someone other than svdiff put there."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("someone's")
    return folder / name


def train_with(*flags):
    """A case: a short training run into tmp/o with `flags`."""
    return lambda w, t: (cli_args(w["base"], t / "o", *flags), t / "o")


def generate_with(*flags):
    """A case: `svdiff generate` with `flags`, writing into tmp."""
    return lambda w, t: (["generate", "--prompt", "a", *flags, "--output", str(t / "g.png")], None)


def edit_with(*flags):
    """A case: `svdiff edit` of one example photo with `flags`; the last flag's value is a file name in tmp."""
    *head, last = flags
    return lambda w, t: (
        [
            "edit",
            "--image",
            str(SUBJECT / "00.png"),
            "--source_prompt",
            "a",
            "--target_prompt",
            "b",
            *head,
            str(t / last),
        ],
        None,
    )


def symlink_loop(tmp):
    os.symlink(tmp / "loop-b", tmp / "loop-a")
    os.symlink(tmp / "loop-a", tmp / "loop-b")
    return tmp / "loop-a"


def held_lock(tmp):
    import socket

    (tmp / "out").mkdir()
    (tmp / "out" / ".svdiff.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return tmp / "out"


# (name, how to build argv from (world, tmp) -> (argv, output folder or None), the words the error line holds)
CASES = [
    ("output_dir empty", lambda w, t: (cli_args(w["base"], ""), None), "--output_dir is empty"),
    (
        "output_dir . holding a README",
        lambda w, t: (cli_args(w["base"], with_file(t, "README.md").parent.relative_to(t)), None),
        "holds files svdiff did not write (README.md)",
    ),
    (
        "output_dir is the instance folder",
        lambda w, t: (cli_args(w["base"], photos(t), data=t / "photos"), None),
        "overlaps the instance folder",
    ),
    (
        "output_dir inside the instance folder",
        lambda w, t: (cli_args(w["base"], photos(t) / "out", data=t / "photos"), None),
        "overlaps the instance folder",
    ),
    (
        "output_dir holding a stranger's file",
        lambda w, t: (cli_args(w["base"], with_file(t / "out", "notes.txt").parent), None),
        "holds files svdiff did not write (notes.txt)",
    ),
    (
        "class folder = instance folder",
        lambda w, t: (
            cli_args(
                w["base"],
                t / "out",
                "--with_prior_preservation",
                "--class_data_dir",
                str(photos(t)),
                "--class_prompt",
                "a heart",
                data=t / "photos",
            ),
            t / "out",
        ),
        "overlap",
    ),
    (
        "second run while the folder is held",
        lambda w, t: (cli_args(w["base"], held_lock(t)), None),
        "is in use by another svdiff run",
    ),
    (
        "learning_rate negative",
        train_with("--learning_rate=-1e-3"),
        "--learning_rate -0.001 must be in [0, 1]",
    ),
    (
        "snr_gamma negative",
        train_with("--snr_gamma", "-1"),
        "--snr_gamma -1.0 must be in (0, 1000]",
    ),
    (
        "max_grad_norm nan",
        train_with("--max_grad_norm", "nan"),
        "--max_grad_norm nan must be in",
    ),
    ("adam_beta1 2", train_with("--adam_beta1", "2"), "[0, 1)"),
    ("adam_epsilon -1", train_with("--adam_epsilon", "-1"), "(0, 1]"),
    (
        "adam_weight_decay -1",
        train_with("--adam_weight_decay=-1"),
        "--adam_weight_decay",
    ),
    ("lr_power -3", train_with("--lr_power", "-3"), "--lr_power"),
    (
        "validation_inference_steps 100000",
        train_with("--validation_inference_steps", "100000"),
        "[1, 1000]",
    ),
    (
        "seed beyond 64 bits",
        train_with("--seed", "99999999999999999999"),
        "--seed 99999999999999999999 must be an integer in [0, 4294967295]",
    ),
    (
        "resolution 12",
        train_with("--resolution", "12"),
        "must be a multiple of 8",
    ),
    (
        "resolution 68",
        train_with("--resolution", "68"),
        "must be a multiple of 8",
    ),
    (
        "resolution above twice the base",
        train_with("--resolution", "40"),
        "more than twice this base's size 16",
    ),
    (
        "resolution 100000",
        train_with("--resolution", "100000"),
        "--resolution 100000 must be",
    ),
    (
        "100k-deep concepts list",
        lambda w, t: (cli_args(w["base"], t / "o", *deep_concepts(t)), t / "o"),
        "nested too deeply",
    ),
    (
        "class_data_dir climbing out",
        lambda w, t: (cli_args(w["base"], t / "o", *climbing_concepts(t)), t / "o"),
        "climbs out with '..'",
    ),
    (
        "a file as instance folder",
        lambda w, t: (cli_args(w["base"], t / "o", data=with_file(t, "f.png")), t / "o"),
        "is a file, not a folder",
    ),
    (
        "symlink loop as instance folder",
        lambda w, t: (cli_args(w["base"], t / "o", data=symlink_loop(t)), t / "o"),
        "is a symbolic link that loops",
    ),
    (
        "resume a truncated checkpoint",
        lambda w, t: (
            cli_args(
                w["base"],
                corrupt(w, t, "truncated"),
                "--max_train_steps",
                "2",
                "--resume_from_checkpoint",
                "checkpoint-1",
            ),
            t / "out",
        ),
        "is damaged",
    ),
    (
        'resume a checkpoint with "step": "x"',
        lambda w, t: (
            cli_args(
                w["base"], corrupt(w, t, "step"), "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1"
            ),
            None,
        ),
        "its step is 'x', not a count",
    ),
    (
        "resume with another learning rate",
        lambda w, t: (
            cli_args(
                w["base"],
                resumable(w, t),
                "--max_train_steps",
                "2",
                "--learning_rate",
                "0.5",
                "--resume_from_checkpoint",
                "latest",
            ),
            None,
        ),
        "learning_rate was 0.001, now 0.5",
    ),
    (
        "resume with other photos under the same prompt",
        lambda w, t: (
            cli_args(
                w["base"],
                resumable(w, t),
                "--max_train_steps",
                "2",
                "--resume_from_checkpoint",
                "latest",
                data=SUBJECT.parent / "heart_xyz",
            ),
            None,
        ),
        "was trained on other images",
    ),
    (
        "resume past max_train_steps",
        lambda w, t: (
            cli_args(w["base"], at_step(w, t, 2), "--max_train_steps", "1", "--resume_from_checkpoint", "latest"),
            None,
        ),
        "past --max_train_steps 1",
    ),
    ("argparse error", lambda w, t: (["train", "--max_train_steps", "x"], None), "invalid int value: 'x'"),
    (
        "generate --num_inference_steps -3",
        generate_with("--num_inference_steps=-3"),
        "--num_inference_steps -3 must be an integer in [1, 1000]",
    ),
    (
        "generate --num_inference_steps 0",
        generate_with("--num_inference_steps", "0"),
        "[1, 1000]",
    ),
    (
        "generate --eta -5",
        generate_with("--eta=-5"),
        "--eta -5.0 must be in [0, 1]",
    ),
    (
        "generate --shifts F:nan",
        lambda w, t: (
            ["generate", "--prompt", "a", "--shifts", f"{w['shifts']}:nan", "--output", str(t / "g.png")],
            None,
        ),
        "the scale nan must be in [-100, 100]",
    ),
    (
        "generate --shifts F:1e9",
        lambda w, t: (
            ["generate", "--prompt", "a", "--shifts", f"{w['shifts']}:1e9", "--output", str(t / "g.png")],
            None,
        ),
        "the scale 1000000000.0 must be in [-100, 100]",
    ),
    (
        "generate --seed beyond 64 bits",
        generate_with("--seed", "99999999999999999999"),
        "--seed",
    ),
    (
        "generate with a shift file of ±60000",
        lambda w, t: (
            ["generate", "--prompt", "a", "--shifts", str(shift_file_with(t, 60000.0)), "--output", str(t / "g.png")],
            None,
        ),
        "beyond the bound 1000",
    ),
    (
        "merge --weights 1e6 1",
        lambda w, t: (
            ["merge", str(w["shifts"]), str(w["shifts"]), "--weights", "1e6", "1", "-o", str(t / "m.safetensors")],
            None,
        ),
        "--weights 1000000.0 must be in [-100, 100]",
    ),
    (
        "merge --alpha without --interpolate",
        lambda w, t: (
            ["merge", str(w["shifts"]), str(w["shifts"]), "--alpha", "0.3", "-o", str(t / "m.safetensors")],
            None,
        ),
        "--alpha needs --interpolate",
    ),
    (
        "inspect --plot dir/.png",
        lambda w, t: (["inspect", str(w["shifts"]), "--plot", str(t / "dir" / ".png")], None),
        "--plot must name a .png file",
    ),
    (
        "edit --output noext",
        edit_with("--output", "noext"),
        "--output must name a .png file",
    ),
    (
        "edit --num_inference_steps 0",
        edit_with("--num_inference_steps", "0", "--output", "e.png"),
        "[1, 1000]",
    ),
]


def at_step(world, tmp, step):
    """A copy of the finished run whose checkpoint-1 claims `step` (as a longer run's checkpoint would)."""
    out = resumable(world, tmp)
    state_file = out / "checkpoint-1" / "state.json"
    state = json.loads(state_file.read_text())
    shutil.move(out / "checkpoint-1", out / f"checkpoint-{step}")
    (out / f"checkpoint-{step}" / "state.json").write_text(json.dumps({**state, "step": step}))
    return out


@pytest.mark.parametrize("name, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_changes_nothing(
    world, tmp_path, capsys, monkeypatch, name, build, words
):
    monkeypatch.chdir(tmp_path)
    argv, out = build(world, tmp_path)
    before = tree(tmp_path, skip=out)
    code = run_cli([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert words in errors[0], errors[0]
    assert "Traceback" not in err and "usage:" not in err
    assert tree(tmp_path, skip=out) == before, "a file outside the output folder changed"
    assert not (tmp_path.parent.parent / "escaped").exists()


# --- checkpoints ---


def test_a_kill_between_writing_and_renaming_a_checkpoint_keeps_the_previous_one(world, tmp_path, monkeypatch):
    """With --checkpoints_total_limit 1, the old checkpoint is pruned only after the new one is in place."""
    real = Path.rename

    def killed(self, target):  # the process dies as checkpoint-2 is moved into place
        if Path(target).name == "checkpoint-2":
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    argv = cli_args(
        world["base"],
        tmp_path / "o",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "1",
    )
    assert main(argv) == 130
    monkeypatch.setattr(Path, "rename", real)
    from svdiff.train import checkpoint

    assert checkpoint.resolve(tmp_path / "o", "latest").name == "checkpoint-1"
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert [p.name for p in (tmp_path / "o").glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_full_disk_during_a_checkpoint_names_the_last_good_one_and_frees_the_space(
    world, tmp_path, monkeypatch, capsys
):
    import svdiff.train.checkpoint as checkpoint

    real, calls = checkpoint.save_file, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "o"
    assert main(cli_args(world["base"], out, "--max_train_steps", "4", "--checkpointing_steps", "1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"error: cannot write checkpoint {out / 'checkpoint-2'}: No space left on device; "
        f"the last good checkpoint is {out / 'checkpoint-1'}"
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert "error: cannot write checkpoint" in (out / "run.log").read_text()


def test_by_default_a_kill_loses_at_most_a_tenth_of_the_run():
    from svdiff.train import TrainConfig, resolve

    for steps, every in ((500, 50), (1000, 100), (7, 1)):
        config = resolve(TrainConfig(instance_data_dir="x", instance_prompt="y", max_train_steps=steps))
        assert config.checkpointing_steps == every
    config = resolve(TrainConfig(instance_data_dir="x", instance_prompt="y", checkpointing_steps=0))
    assert config.checkpointing_steps == 0  # never, when asked


# --- Ctrl-C, run.log, the next start ---


def test_ctrl_c_saves_the_current_step_says_how_to_resume_and_the_next_start_says_where_it_stopped(
    world, tmp_path, monkeypatch, capsys
):
    from svdiff.train.step import TrainingStep

    real, calls = TrainingStep.loss, []

    def interrupted(*args, **kwargs):  # Ctrl-C arrives during the third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(TrainingStep, "loss", interrupted)
    out = tmp_path / "o"
    argv = cli_args(world["base"], out, "--max_train_steps", "6", "--checkpointing_steps", "0")
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"error: stopped by SIGINT at step 3 of 6; saved {out / 'checkpoint-3'}; to continue, run the same command "
        "with --resume_from_checkpoint latest"
    )
    assert (out / "checkpoint-3" / "state.json").is_file() and not (out / ".svdiff.lock").exists()
    monkeypatch.setattr(TrainingStep, "loss", real)

    from svdiff.train.runlog import unfinished_note

    note = unfinished_note(out, out / "checkpoint-3")
    assert note == (
        f"the last run in {out} stopped at step 3 (stopped by SIGINT at step 3 of 6; saved {out / 'checkpoint-3'}; to "
        "continue, run the same command with --resume_from_checkpoint latest); to continue it from checkpoint-3, "
        "add --resume_from_checkpoint latest"
    )
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps_this_run"] == 3 and summary["resumed"] == {
        "checkpoint": "checkpoint-3",
        "step": 3,
        "changed": {},
    }
    events = [line.split()[2] for line in (out / "run.log").read_text().splitlines()]
    assert events[0] == "start:" and "stop:" in events and events[-1] == "finish:"
    assert unfinished_note(out, None) is None  # it finished


def test_a_run_killed_without_warning_is_noted_at_the_next_start(world, tmp_path, capsys):
    out = resumable(world, tmp_path)
    with (out / "run.log").open("a") as f:
        f.write("2026-12-04 10:00:00 start: svdiff train {}\n2026-12-04 10:00:05 checkpoint: checkpoint-1 (step 1)\n")
    assert main(cli_args(world["base"], out, "--max_train_steps", "1")) == 0
    err = capsys.readouterr().err
    assert (
        f"note: the last run in {out} stopped at step 1 (killed, or the machine stopped); to continue it from "
        "checkpoint-1, add --resume_from_checkpoint latest"
    ) in err


@pytest.mark.slow
def test_sigterm_in_a_real_process_saves_and_exits_143(world, tmp_path):
    out = tmp_path / "o"
    argv = cli_args(world["base"], out, "--max_train_steps", "100000", "--checkpointing_steps", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "svdiff", *map(str, argv)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the loop runs (and handles signals) once its first checkpoint is there
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 143, err
    step = int(last.split("at step ")[1].split()[0])
    assert last.startswith("error: stopped by SIGTERM") and (out / f"checkpoint-{step}" / "state.json").is_file()
    assert not (out / ".svdiff.lock").exists()


# --- the lock ---


def test_the_lock_is_exclusive_released_and_a_dead_holder_is_taken_over(tmp_path):
    import socket

    from svdiff.train.outputs import LOCK, locked

    with locked(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(SvdiffError, match="in use by another svdiff run"), locked(tmp_path):
            pass
    assert not (tmp_path / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{dead.pid} {socket.gethostname()}\n")
    with locked(tmp_path):
        assert (tmp_path / LOCK).read_text().startswith(f"{os.getpid()} ")
    (tmp_path / LOCK).write_text("1 another-host\n")
    with pytest.raises(SvdiffError, match="process 1 on another-host"), locked(tmp_path):
        pass


def test_a_previous_runs_own_outputs_do_not_block_the_next_run(world, tmp_path):
    out = resumable(world, tmp_path)
    (out / "run.log").unlink()  # a folder from before run.log existed: only svdiff's own names
    assert main(cli_args(world["base"], out, "--max_train_steps", "1")) == 0
    (out / "mine.txt").write_text("x")  # its run.log now says svdiff owns the folder
    assert main(cli_args(world["base"], out, "--max_train_steps", "1")) == 0


def test_overwrite_trains_into_a_folder_with_other_files(world, tmp_path):
    (tmp_path / "README.md").write_text("mine")
    assert main(cli_args(world["base"], tmp_path, "--max_train_steps", "1", "--overwrite")) == 0
    assert (tmp_path / "README.md").read_text().startswith("---\n")


# --- resume: refused or recorded ---


def test_a_flag_changed_on_resume_is_applied_and_recorded(world, tmp_path):
    out = resumable(world, tmp_path)
    argv = cli_args(
        world["base"], out, "--max_train_steps", "3", "--snr_gamma", "5", "--resume_from_checkpoint", "latest"
    )
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed"]["changed"]["snr_gamma"] == ["null", 5.0]
    assert summary["resumed"]["changed"]["max_train_steps"] == [2, 3]
    assert read_shift_file(out / WEIGHTS_NAME).metadata["resumed"]["step"] == 1
    assert "| resumed | from step 1 (" in (out / "README.md").read_text()


# --- disks and caches ---


def test_a_full_or_read_only_svd_cache_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import svdiff.spectral.cache as cache_module
    from svdiff.spectral import SVDCache
    from svdiff.spectral.basis import decompose

    bases = decompose([torch.randn(6, 4), torch.randn(5, 3)])
    for failure in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("I/O error: os error 28")):

        def full(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(cache_module, "save_file", full)
        cache = SVDCache(tmp_path / str(type(failure).__name__))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cache.put("a" * 40, bases[0]) and not cache.put("b" * 40, bases[1])
        assert len(caught) == 1 and "cannot write the SVD cache" in str(caught[0].message)
        assert not list(cache.root.rglob("*.tmp"))


def test_a_bad_entry_in_a_read_only_cache_is_recomputed_not_fatal(tmp_path, monkeypatch):
    from svdiff.spectral import SVDCache
    from svdiff.spectral.basis import decompose
    from svdiff.spectral.cache import content_key

    m = torch.randn(6, 4)
    cache = SVDCache(tmp_path)
    key = content_key(m)
    cache.put(key, decompose([m])[0])
    cache.path(key).write_bytes(cache.path(key).read_bytes()[:60])  # truncated

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    assert cache.get(key, m) is None


def test_a_cache_entry_with_its_factors_reordered_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from svdiff.spectral import SVDCache
    from svdiff.spectral.basis import decompose
    from svdiff.spectral.cache import content_key

    m = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    cache = SVDCache(tmp_path)
    key = content_key(m)
    cache.put(key, decompose([m])[0])
    assert cache.get(key, m) is not None
    t = load_file(cache.path(key))
    for rolled in (
        {"U": t["U"].roll(1, 1), "S": t["S"].roll(1), "Vh": t["Vh"].roll(1, 0)},  # same W, another order
        {"U": -t["U"], "S": t["S"], "Vh": -t["Vh"]},  # same W, other signs
    ):
        save_file(rolled, cache.path(key), metadata={"key": key, "engine": "1"})
        assert cache.get(key, m) is None


# --- the fingerprint ---


def test_the_fingerprint_covers_every_layer_and_still_matches_half_precision_copies(world):
    from svdiff.format import fingerprint_mismatch
    from svdiff.models import load_components
    from svdiff.spectral import find_targets, fingerprint

    unet = load_components(world["base"])["unet"]
    before = fingerprint(unet)
    assert len(base64.b64decode(before["weights"])) == 2 * 2 * len(find_targets(unet))  # two float16 per target
    for dtype in (torch.float16, torch.bfloat16):
        copy = load_components(world["base"])["unet"].to(dtype)
        assert fingerprint_mismatch({"unet": before}, {"unet": fingerprint(copy)}) is None
    matrices = [t for t in find_targets(unet) if t.module.weight.ndim >= 2]
    probed = {t.name for t in matrices[:: max(1, len(matrices) // 16)][:16]}
    with torch.no_grad():
        changed = [t for t in matrices if t.name not in probed][:1]
        changed[0].module.weight.mul_(-1.5)  # one layer the 16 probes do not look at
    after = fingerprint(unet)
    assert after["probe"] == before["probe"]
    assert fingerprint_mismatch({"unet": before}, {"unet": after}) == (
        "unet: weights differ from the base this file was trained on"
    )
    old = {"unet": {"shapes": before["shapes"], "probe": before["probe"]}}  # a file written before `weights`
    assert fingerprint_mismatch(old, {"unet": fingerprint(load_components(world["base"])["unet"])}) is None


# --- numbers, files, pictures ---


def test_shift_values_beyond_the_bound_are_refused_on_write_and_on_read(tmp_path):
    from svdiff.format import ShiftFileError

    with pytest.raises(ShiftFileError, match=r"holds \|δ\| = 60000, beyond the bound 1000"):
        save_shift_file(
            tmp_path / "a.safetensors",
            {"unet.x.weight": torch.full((3,), -60000.0)},
            base_model="b",
            fingerprint=FINGERPRINT,
            preset="all",
        )
    path = shift_file_with(tmp_path, 60000.0)
    with pytest.raises(ShiftFileError, match="beyond the bound"):
        read_shift_file(path)


def test_a_batch_with_nan_pixels_is_an_error_not_a_black_picture():
    import numpy as np

    from svdiff.sample import sample

    class Pipe:
        def __call__(self, prompts, **kwargs):
            assert kwargs["output_type"] == "np"
            return type("Out", (), {"images": np.full((len(prompts), 4, 4, 3), np.nan)})

        numpy_to_pil = staticmethod(lambda a: [Image.new("RGB", (4, 4))] * len(a))

    with pytest.raises(SvdiffError, match="NaN or infinite pixels"):
        sample(Pipe(), "a heart", num_images=1, num_inference_steps=2, progress=False)


def test_a_decompression_bomb_is_skipped_like_any_unreadable_image(tmp_path, monkeypatch):
    from svdiff.data.images import load_image_folder

    shutil.copytree(SUBJECT, tmp_path / "p")
    Image.new("RGB", (400, 400)).save(tmp_path / "p" / "zz-bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000 // 2)  # 160,000 pixels: over twice the limit
    with pytest.warns(UserWarning, match="zz-bomb.png.*decompression bomb"):
        images = load_image_folder(tmp_path / "p")
    assert len(images) == len(list(SUBJECT.glob("*.png")))


def test_edit_names_an_unreadable_image_once(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"not a png")
    argv = [
        "edit",
        "--image",
        str(tmp_path / "x.png"),
        "--source_prompt",
        "a",
        "--target_prompt",
        "b",
        "--output",
        str(tmp_path / "e.png"),
    ]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image") and last.count("cannot read image") == 1


# --- the model card ---


def test_the_model_card_shows_a_hostile_prompt_as_text_and_quotes_its_commands(tmp_path):
    from types import SimpleNamespace

    from svdiff.train.report import write_model_card

    prompt = 'a photo of sks heart\n---\ninjected: true\n---\n<script>alert(1)</script> $(touch PWNED) `x` | "q"'
    args = SimpleNamespace(
        pretrained_model_name_or_path=None,
        method="svdiff",
        seed=0,
        num_validation_images=1,
        learning_rate=1e-3,
        learning_rate_1d=1e-6,
        with_prior_preservation=False,
        prior_loss_weight=1.0,
        train_text_encoder=True,
    )
    concepts = [SimpleNamespace(instance_prompt=prompt, instance_images=[1], class_images=[], class_prompt=None)]
    weights = tmp_path / "my $(id) dir" / WEIGHTS_NAME
    summary = {
        "weights": str(weights),
        "samples": str(tmp_path / "samples" / "step-1.png"),
        "steps": 1,
        "global_batch": 1,
        "trained_parameters": 1,
        "weights_bytes": 1,
        "minutes": 0.1,
        "processes": 1,
    }
    card = write_model_card(tmp_path, args, concepts, summary).read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    flat = " ".join(prompt.split())  # what the tokenizer sees
    assert meta["instance_prompt"] == flat and "injected" not in meta and meta["library_name"] == "svdiff"
    prose = re.sub(r"(`{3,})[^\n]*\n.*?\n\1\n", "", body, flags=re.S)  # code blocks show text as text
    assert "<script>" not in prose and "&lt;script&gt;" in prose
    line = next(x for x in body.splitlines() if x.startswith("svdiff generate"))
    words = shlex.split(line)
    assert words[words.index("--prompt") + 1] == flat and words[words.index("--shifts") + 1] == str(weights)

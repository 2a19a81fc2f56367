"""`svdiff train` on a tiny random pipeline: what it writes, prior preservation, text encoder on/off, the
baselines, exact resume after kill -9, two processes, and one error line for each bad input."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from svdiff.cli import main
from svdiff.errors import SvdiffError
from svdiff.format import WEIGHTS_NAME, read_shift_file
from svdiff.train import train
from tiny_models import PROMPT, SUBJECT, cli_args, lora_layers_loaded, quick, save_tiny_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def test_a_run_writes_weights_card_samples_loss_and_logs(base, tmp_path):
    out = tmp_path / "out"
    summary = train(quick(base, out, report_to="tensorboard", checkpointing_steps=3))
    shifts = read_shift_file(out / WEIGHTS_NAME)
    assert shifts.metadata["preset"] == "all"
    assert shifts.metadata["training"]["instance_prompt"] == PROMPT
    assert {k.split(".")[0] for k in shifts.tensors} == {"unet", "text_encoder"}
    assert any(v.abs().max() > 0 for v in shifts.tensors.values())
    assert summary["weights_bytes"] == (out / WEIGHTS_NAME).stat().st_size
    assert (out / "samples" / "step-6.png").is_file() and (out / "loss.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    card = (out / "README.md").read_text()
    assert PROMPT in card and "svdiff.load_shifts" in card and "samples/step-6.png" in card
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-3"]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6


def test_text_encoder_off_saves_only_unet_shifts(base, tmp_path):
    train(quick(base, tmp_path, train_text_encoder=False, max_train_steps=2))
    assert {k.split(".")[0] for k in read_shift_file(tmp_path / WEIGHTS_NAME).tensors} == {"unet"}


def test_a_preset_that_leaves_the_text_encoder_without_shifts_trains(base, tmp_path):
    train(quick(base, tmp_path, preset="unet-ca", max_train_steps=2))
    keys = read_shift_file(tmp_path / WEIGHTS_NAME).tensors
    assert keys and all(k.startswith("unet.") and ".attn2." in k for k in keys)


def test_compile_runs_the_training_steps_compiled_and_sampling_eagerly(base, tmp_path, monkeypatch):
    calls = []

    def compile(fn, **kwargs):  # stands in for torch.compile: the same function, and a record of each use
        def compiled(*a, **kw):
            calls.append(torch.is_grad_enabled())
            return fn(*a, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    train(quick(base, tmp_path, compile=True, max_train_steps=2, validation_steps=1))
    assert calls and all(calls)  # every training step went through the compiled forward, no sampling step did
    assert list((tmp_path / "samples").glob("step-*.png"))


def test_prior_preservation_generates_then_reuses_class_images(base, tmp_path):
    class_dir = tmp_path / "class"
    args = dict(
        with_prior_preservation=True,
        class_data_dir=str(class_dir),
        class_prompt="a photo of a heart",
        num_class_images=3,
        sample_batch_size=2,
        max_train_steps=2,
    )
    train(quick(base, tmp_path / "a", **args))
    made = sorted(class_dir.iterdir())
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    train(quick(base, tmp_path / "b", **{**args, "num_class_images": 4}))  # one more is made, the rest reused
    assert [p.stat().st_mtime_ns for p in made] == stamps and len(list(class_dir.iterdir())) == 4


def test_prior_term_is_in_the_loss(base, tmp_path):
    """Same seed, same instance examples: the prior-preservation run differs only by its class term."""
    class_dir = tmp_path / "class"
    plain = train(quick(base, tmp_path / "a", max_train_steps=1))
    prior = train(
        quick(
            base,
            tmp_path / "b",
            max_train_steps=1,
            with_prior_preservation=True,
            class_data_dir=str(class_dir),
            class_prompt="a photo of a heart",
            num_class_images=2,
        )
    )
    assert prior["final_loss"] > plain["final_loss"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_both_prediction_types_learn(tmp_path, prediction_type):
    """Step N draws the same examples, noise and timesteps whatever the learning rate, so the last step's loss
    with and without learning compares like with like."""
    base = save_tiny_pipeline(tmp_path / "base", prediction_type=prediction_type)
    common = dict(max_train_steps=30, train_batch_size=4, snr_gamma=5.0, noise_offset=0.05)
    frozen = train(quick(base, tmp_path / "a", learning_rate=0.0, learning_rate_1d=0.0, **common))
    trained = train(quick(base, tmp_path / "b", learning_rate=3e-2, **common))
    assert trained["final_loss"] < 0.9 * frozen["final_loss"]


@pytest.mark.parametrize(
    "method, file", [("lora", "pytorch_lora_weights.safetensors"), ("full", "unet/diffusion_pytorch_model.safetensors")]
)
def test_baselines_train_and_load(base, tmp_path, method, file):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    summary = train(quick(base, tmp_path, method=method, max_train_steps=2))
    assert (tmp_path / file).is_file() and summary["trained_parameters"] > 0
    if method == "lora":
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.load_lora_weights(tmp_path)
        held, carried = lora_layers_loaded(pipe, tmp_path / file)
        assert held == carried
    else:
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert "--method" not in (tmp_path / "README.md").read_text()


def test_bf16_mixed_precision_keeps_deltas_in_fp32(base, tmp_path):
    summary = train(quick(base, tmp_path, mixed_precision="bf16", max_train_steps=2, save_dtype="fp32"))
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert all(v.dtype == torch.float32 for v in read_shift_file(tmp_path / WEIGHTS_NAME).tensors.values())


def test_nan_loss_stops_with_the_last_good_checkpoint(base, tmp_path, capsys, monkeypatch):
    from svdiff.train.step import TrainingStep

    real, calls = TrainingStep.loss, []

    def diverging(*args, **kwargs):  # a loss that becomes NaN at the fourth step, as a too-high rate makes it
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(TrainingStep, "loss", diverging)
    code = main(cli_args(base, tmp_path, "--max_train_steps", "30", "--checkpointing_steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the loss became") and "checkpoint-" in err[-1]
    assert not (tmp_path / WEIGHTS_NAME).exists()


def _run(base, out, *extra):
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return [sys.executable, "-m", "svdiff", *cli_args(base, out, *extra)], env


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact(base, tmp_path):
    flags = (
        "--max_train_steps",
        "120",
        "--checkpointing_steps",
        "4",
        "--save_dtype",
        "fp32",
        "--with_prior_preservation",
        "--class_data_dir",
        str(tmp_path / "class"),
        "--class_prompt",
        "a photo of a heart",
        "--num_class_images",
        "2",
        "--random_flip",
    )
    cmd, env = _run(base, tmp_path / "whole", *flags)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _run(base, tmp_path / "killed", *flags)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-8").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.15))  # somewhere after step 8, maybe while writing a checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / WEIGHTS_NAME).exists(), "the run ended before it was killed"
    cmd, env = _run(base, tmp_path / "killed", *flags, "--resume_from_checkpoint", "latest")
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    whole = load_file(tmp_path / "whole" / WEIGHTS_NAME)
    resumed = load_file(tmp_path / "killed" / WEIGHTS_NAME)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    summary = json.loads((tmp_path / "killed" / "train_summary.json").read_text())
    assert 0 < summary["steps_this_run"] < 120


@pytest.mark.slow
def test_two_processes_split_the_global_batch(base, tmp_path):
    flags = ("--max_train_steps", "4", "--save_dtype", "fp32")
    cmd, env = _run(base, tmp_path / "two", *flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run(torchrun + cmd[1:], env=env, check=True, capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 2 and summary["processes_agree"]

    cmd, env = _run(base, tmp_path / "one", *flags, "--train_batch_size", "2")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    two, one = load_file(tmp_path / "two" / WEIGHTS_NAME), load_file(tmp_path / "one" / WEIGHTS_NAME)
    read_shift_file(tmp_path / "two" / WEIGHTS_NAME)
    # The same global batch, split or not: equal up to the order of float additions.
    assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one)
    assert max((two[k] - one[k]).abs().max() for k in one) < 1e-3 * max(one[k].abs().max() for k in one)


def _broken_image_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "no images found"),
        ("unreadable", "none of the 1 images could be read"),
        ("resolution", "--resolution 15 must be a multiple of 8 on this base"),
        ("preset", "unknown preset"),
        ("output", "--output_dir"),
        ("mismatch", "does not match this run: preset"),
        ("prior", "--with_prior_preservation needs"),
        ("collage", "--cut_mix_scale 2.0 must be in [0.5, 1]"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    extra = []
    data = SUBJECT
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "unreadable":
        data = _broken_image_folder(tmp_path)
    elif case == "resolution":
        extra = ["--resolution", "15"]
    elif case == "preset":
        extra = ["--preset", "everything"]
    elif case == "output":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "mismatch":
        assert main(cli_args(base, out, "--max_train_steps", "2", "--checkpointing_steps", "1")) == 0
        capsys.readouterr()
        extra = ["--preset", "unet-ca", "--resume_from_checkpoint", "latest"]
    elif case == "prior":
        extra = ["--with_prior_preservation"]
    elif case == "collage":
        extra = ["--cut_mix_scale", "2"]
    before = sorted(out.rglob("*")) if out.exists() else None
    args = cli_args(base, out, "--max_train_steps", "2", *extra)
    args[args.index("--instance_data_dir") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ") and message in err[-1], err
    assert (sorted(out.rglob("*")) if out.exists() else None) == before


def test_an_unreadable_image_is_skipped_when_others_remain(base, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(SUBJECT.glob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz.jpg").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipping"):
        train(quick(base, tmp_path / "out", instance_data_dir=str(folder), max_train_steps=1))


def test_a_pipeline_of_another_family_is_refused_in_one_line(base, tmp_path, capsys, monkeypatch):
    import svdiff.train.loop

    class PixArtAlphaPipeline:  # a diffusers pipeline of a family svdiff does not train
        transformer, text_encoder, components = object(), object(), {}

    monkeypatch.setattr(svdiff.train.loop, "load_pipeline", lambda *a, **kw: PixArtAlphaPipeline())
    assert main(cli_args(base, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PixArtAlphaPipeline is not a supported pipeline" in err[0]
    assert all(name in err[0] for name in ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"))
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def test_unknown_scheduler_is_refused_by_the_parser(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(cli_args(base, tmp_path, "--lr_scheduler", "sometimes"))
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_setting_existed_still_resumes(tmp_path):
    from svdiff.train import checkpoint

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    state = {"step": 2, "losses": [], "run": {"method": "svdiff", "preset": "all"}}
    (ckpt / checkpoint.STATE).write_text(json.dumps(state))
    checkpoint.check_matches(ckpt, {"method": "svdiff", "preset": "all", "cut_mix_scale": 0.5})
    with pytest.raises(SvdiffError, match="preset was 'all', now 'attn'"):
        checkpoint.check_matches(ckpt, {"method": "svdiff", "preset": "attn"})

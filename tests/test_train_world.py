"""Training on the embedded base really fits the subject: afterwards the pipeline denoises the subject's photos
under its prompt better than the base does, at the same noise and timesteps, and draws pictures the judge finds
more like the subject's photos. And `svdiff demo` writes what it promises."""

import json
from pathlib import Path

import pytest

from svdiff.adapters import fuse, load_shifts
from svdiff.cli import main
from svdiff.data.images import load_image_folder
from svdiff.demo import demo_prompts, judge_subject, run_demo, subject_loss
from svdiff.sample import load_pipeline, sample
from svdiff.train import train
from svdiff.world import GUIDANCE_SCALE
from tiny_models import PROMPT, SUBJECT, quick, save_tiny_pipeline


@pytest.mark.slow
def test_a_short_run_on_the_embedded_base_fits_the_subject(tmp_path):
    summary = train(quick(None, tmp_path, max_train_steps=200))
    photos = load_image_folder(SUBJECT)
    prompts = [PROMPT + " on the left", PROMPT + " on the right on a beige background"]

    def draw(pipe):
        return [
            im for p in prompts for im in sample(pipe, p, num_images=4, guidance_scale=GUIDANCE_SCALE, progress=False)
        ]

    pipe = load_pipeline(None)
    before = subject_loss(pipe, photos, PROMPT)
    judged_before = judge_subject(draw(pipe), photos, PROMPT)
    load_shifts(pipe, summary["weights"], progress=False)
    fuse(pipe)
    after = subject_loss(pipe, photos, PROMPT)
    judged_after = judge_subject(draw(pipe), photos, PROMPT)
    assert after < 0.95 * before, (before, after)
    # The same seeds draw pictures more like the subject's photos: at guidance 3, similarity 0.138 → 0.209 when
    # written; the hearts take its colors and shrink, and half of them are still read as hearts (all 8 before).
    assert judged_after["similarity"] > judged_before["similarity"] + 0.04, (judged_before, judged_after)
    assert judged_after["shape_correct"] >= 0.5, judged_after
    # The fit belongs to the prompt: under another prompt the same photos are denoised worse.
    assert subject_loss(pipe, photos, "a photo of a green square") > after


@pytest.mark.slow
def test_demo_writes_pictures_shift_file_and_figures(tmp_path):
    result = run_demo(tmp_path, SUBJECT, max_train_steps=4, num_class_images=2, images_per_prompt=1, progress=False)
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved == result
    assert Path(result["picture"]).is_file() and Path(result["shift_file"]).is_file()
    assert result["shift_file_bytes"] == Path(result["shift_file"]).stat().st_size
    assert len(list((tmp_path / "class_images").glob("class-*.png"))) == 2
    # The "before" figures are the base's own, recomputed here from the same prompts and seeds ...
    card = json.loads((SUBJECT / "subject.json").read_text())
    prompts = demo_prompts(card["instance_prompt"], card["class_prompt"])
    pipe, photos = load_pipeline(None), load_image_folder(SUBJECT)
    drawn = [sample(pipe, p, num_images=1, seed=0, guidance_scale=GUIDANCE_SCALE, progress=False) for p in prompts]
    assert result["subject_loss_before"] == subject_loss(pipe, photos, card["instance_prompt"])
    marks = {k: card["subject"][k] for k in ("emblem", "emblem_color", "outline")}
    subject_drawn = [im for ims in drawn[:-1] for im in ims]
    assert result["judge_before"] == judge_subject(subject_drawn, photos, PROMPT, marks)
    assert result["class_prompt_before"] == judge_subject(drawn[-1], photos, card["class_prompt"], marks)
    assert 0 <= result["judge_after"]["marks_correct"] <= 1
    # ... and the "after" ones are the trained model's: four steps already move the loss.
    assert result["subject_loss_after"] != result["subject_loss_before"]


def test_demo_on_another_base(tmp_path, capsys):
    base = save_tiny_pipeline(tmp_path)
    out = tmp_path / "demo"
    flags = ["--max_train_steps", "2", "--num_class_images", "1", "--output_dir", str(out)]
    assert main(["demo", "--base", str(base), *flags]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["base"] == str(base) and (out / "before_after.png").is_file()
    assert "judge similarity" in capsys.readouterr().out

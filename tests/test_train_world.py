"""Training on the embedded base really personalizes: the loss falls and, by the shapes-world judge, pictures of
the subject's prompt look like its photos afterwards, not before. And `svdiff demo` writes what it promises."""

import json
from pathlib import Path

from svdiff.data.images import load_image_folder
from svdiff.demo import judge_subject, run_demo
from svdiff.models import fuse, load_shifts
from svdiff.sample import load_pipeline, sample
from svdiff.train import train
from tiny_models import PROMPT, SUBJECT, quick


def test_a_short_run_on_the_embedded_base_learns_the_subject(tmp_path):
    summary = train(quick(None, tmp_path, max_train_steps=150))
    losses = [v for _, v in json.loads((tmp_path / "loss.json").read_text())]
    assert sum(losses[-40:]) / 40 < 0.8 * sum(losses[:40]) / 40

    references = load_image_folder(SUBJECT)
    pipe = load_pipeline(None)
    before = sample(pipe, PROMPT, num_images=8, guidance_scale=5.0, progress=False)
    load_shifts(pipe, summary["weights"], progress=False)
    fuse(pipe)
    after = sample(pipe, PROMPT, num_images=8, guidance_scale=5.0, progress=False)
    similarity_before = judge_subject(before, references, PROMPT)["similarity"]
    similarity_after = judge_subject(after, references, PROMPT)["similarity"]
    assert similarity_after > similarity_before + 0.2, (similarity_before, similarity_after)


def test_demo_writes_pictures_shift_file_and_figures(tmp_path):
    result = run_demo(tmp_path, SUBJECT, max_train_steps=4, num_class_images=2, images_per_prompt=1, progress=False)
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved == result
    assert Path(result["picture"]).is_file() and Path(result["shift_file"]).is_file()
    assert result["shift_file_bytes"] == Path(result["shift_file"]).stat().st_size
    assert len(list((tmp_path / "class_images").glob("class-*.png"))) == 2
    for key in ("judge_before", "judge_after", "class_prompt_before", "class_prompt_after"):
        assert -1.0 <= result[key]["similarity"] <= 1.0 and 0.0 <= result[key]["shape_correct"] <= 1.0

"""The Train page: subjects (photos, identifier, class), the run's settings, and the queue — progress, loss chart
and validation grid of the job shown, refreshed every second from what the job writes; stop and resume."""

from __future__ import annotations

import html
import json

import gradio as gr

from ..errors import SvdiffError
from ..spectral.targets import PRESETS
from ..train.config import TrainConfig, default_learning_rate, from_flags, parser, resolve
from ..train.report import write_loss_chart
from . import actions
from .forms import NONE, command_box, guarded, integer, message, whole
from .jobs import RESUMABLE, Trainer
from .workspace import JOBS, MAX_UPLOAD_MB, Workspace, example_subjects


def train_page(demo: gr.Blocks, workspace: Workspace, trainer: Trainer, base=None) -> None:
    defaults = TrainConfig()
    examples = example_subjects()
    with gr.Tab("Train", id="train", elem_id="tab_train"):
        with gr.Row():
            with gr.Column():
                photos = gr.File(
                    label=f"photos of the subject (3–5; at most {MAX_UPLOAD_MB} MB each)",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    elem_id="train_photos",
                )
                example = gr.Dropdown(
                    [NONE, *examples], value=NONE, label="or an example subject", elem_id="train_example"
                )
            with gr.Column():
                identifier = gr.Textbox(label="identifier (a rare word)", value="sks", elem_id="train_identifier")
                class_word = gr.Textbox(label="class", value="dog", elem_id="train_class")
                preview = gr.Markdown(elem_id="train_prompts")
                add = gr.Button("Add subject", elem_id="train_add")
        subjects = gr.CheckboxGroup(
            workspace.subjects(),
            label="subjects of this run (two or more train together: Cut-Mix-Unmix)",
            elem_id="train_subjects",
        )
        with gr.Row():
            run_name = gr.Textbox(label="run name (runs/NAME)", value="subject", elem_id="train_run")
            preset = gr.Dropdown(list(PRESETS), value=defaults.preset, label="preset", elem_id="train_preset")
            steps = whole(defaults.max_train_steps, "steps", "train_steps")
            prior = gr.Checkbox(label="prior preservation (class images from the base)", elem_id="train_prior")
            class_images = whole(defaults.num_class_images, "class images", "train_class_images")
        with gr.Accordion("validation, checkpoints, optimizer", open=False):
            with gr.Row():
                val_steps = whole(defaults.validation_steps, "validation every (0: at the end)", "train_val_steps")
                val_images = whole(defaults.num_validation_images, "validation images", "train_val_images")
                val_inference = whole(
                    defaults.validation_inference_steps, "validation sampling steps", "train_val_inference"
                )
                checkpoints = whole(0, "checkpoint every (0: a tenth of the run)", "train_checkpoints")
                learning_rate = gr.Number(
                    default_learning_rate("svdiff", base), label="learning rate", elem_id="train_lr"
                )
                seed = whole(defaults.seed, "seed", "train_seed")
        start = gr.Button("Start training", variant="primary", elem_id="train_start")
        train_message = gr.Markdown(elem_id="train_message")
        gr.Markdown("### Queue (one job at a time)")
        jobs = gr.Dataframe(
            _jobs_table(trainer),
            headers=["job", "run", "state", "step", "loss"],
            interactive=False,
            elem_id="train_jobs",
        )
        with gr.Row():
            shown = gr.Textbox(label="job shown (blank: the current one)", elem_id="train_job", scale=3)
            stop = gr.Button("Stop (saves a checkpoint)", elem_id="train_stop", scale=1)
            resume = gr.Button("Resume", elem_id="train_resume", scale=1)
        progress = gr.HTML(_progress_html(trainer.latest()), elem_id="train_progress")
        with gr.Row():
            loss_chart = gr.Image(label="loss", type="filepath", interactive=False, elem_id="train_loss")
            grid = gr.Image(label="validation grid", type="filepath", interactive=False, elem_id="train_grid")
        train_command = command_box("command", "train_command")
        timer = gr.Timer(1.0)
        seen = gr.State({})  # what this page has drawn already (inside a tab: Tabs may hold only tabs)

    def pick_example(name):
        if not name:
            return gr.skip(), gr.skip()
        record = json.loads((examples[name] / "subject.json").read_text())
        return record["identifier"], record["class_word"]

    def show_prompts(ident, cls):
        try:
            instance, class_prompt = actions.prompts(ident, cls)
        except SvdiffError as e:
            return message(str(e), error=True)
        return f"instance prompt: *{html.escape(instance)}* · class prompt: *{html.escape(class_prompt)}*"

    @guarded(3)
    def add_subject(files, example_name, ident, cls, ticked):
        if not files and example_name:
            files = sorted(str(p) for p in examples[example_name].iterdir() if p.suffix == ".png")
        name = actions.add_subject(workspace, ident, cls, files)
        ticked = [*(ticked or []), name] if name not in (ticked or []) else ticked
        return gr.update(choices=workspace.subjects(), value=ticked), None, message(f"added subject {name}")

    @guarded(3)
    def start_training(ticked, run, preset_, steps_, prior_, class_n, v_steps, v_images, v_inf, ckpt, lr, seed_):
        settings = {
            "preset": preset_,
            "max_train_steps": integer(steps_, "steps"),
            "with_prior_preservation": prior_,
            "num_class_images": integer(class_n, "class images"),
            "validation_steps": integer(v_steps, "validation every"),
            "num_validation_images": integer(v_images, "validation images"),
            "validation_inference_steps": integer(v_inf, "validation sampling steps"),
            "checkpointing_steps": integer(ckpt, "checkpoint every") or None,
            "learning_rate": lr,
            "seed": integer(seed_, "seed"),
            "report_to": "none",
        }
        flags, output_dir = actions.train_flags(workspace, ticked, run, base=base, **settings)
        if (workspace.root / output_dir).exists():
            raise SvdiffError(f"{output_dir} exists: choose another run name, or resume its job")
        resolve(_parsed(flags))  # a bad setting is refused here, not minutes into a job
        job = trainer.submit(flags, output_dir, settings["max_train_steps"])
        return job.id, job.command, message(f"job {job.id} queued: {output_dir}")

    def refresh(job_id, seen):
        job = trainer.get(job_id) if job_id and job_id in {j.id for j in trainer.jobs()} else trainer.latest()
        if job is None:
            return _jobs_table(trainer), _progress_html(None), gr.skip(), gr.skip(), gr.skip(), seen
        pictures = actions.run_pictures(workspace, job.output_dir)
        chart = pictures["loss_chart"]
        if job.losses and (chart is None or job.state in ("running", "stopping")):
            chart = workspace.root / JOBS / f"{job.id}-loss.png"
            if seen.get("losses") != (job.id, len(job.losses)):
                write_loss_chart(job.losses, chart)
        key = (job.id, str(chart), _mtime(chart), str(pictures["grid"]), _mtime(pictures["grid"]))
        changed = key != seen.get("pictures")
        seen = {"losses": (job.id, len(job.losses)), "pictures": key}
        return (
            _jobs_table(trainer),
            _progress_html(job),
            str(chart) if changed and chart else gr.skip(),
            str(pictures["grid"]) if changed and pictures["grid"] else gr.skip(),
            job.command,
            seen,
        )

    @guarded(2)
    def stop_job(job_id):
        job = trainer.stop(job_id or _current(trainer))
        return job.id, message(f"job {job.id}: {job.state}")

    @guarded(2)
    def resume_job(job_id):
        job = trainer.resume(job_id or _resumable(trainer))
        return job.id, message(f"job {job.id} queued: resumes {job.output_dir} from its latest checkpoint")

    example.change(pick_example, example, [identifier, class_word])
    for box in (identifier, class_word):
        box.change(show_prompts, [identifier, class_word], preview)
    demo.load(show_prompts, [identifier, class_word], preview)
    demo.load(lambda: gr.update(choices=workspace.subjects()), None, subjects)  # added since the server started
    add.click(add_subject, [photos, example, identifier, class_word, subjects], [subjects, photos, train_message])
    start.click(
        start_training,
        [
            subjects,
            run_name,
            preset,
            steps,
            prior,
            class_images,
            val_steps,
            val_images,
            val_inference,
            checkpoints,
            learning_rate,
            seed,
        ],
        [shown, train_command, train_message],
    )
    stop.click(stop_job, shown, [shown, train_message])
    resume.click(resume_job, shown, [shown, train_message])
    timer.tick(refresh, [shown, seen], [jobs, progress, loss_chart, grid, train_command, seen], show_progress="hidden")


def _progress_html(job) -> str:
    if job is None:
        return "<p>No training job yet.</p>"
    total = max(job.max_train_steps, 1)
    loss = f" · loss {job.losses[-1][1]:.4f}" if job.losses else ""
    phase = f" · {html.escape(job.phase)}" if job.phase and job.state == "running" else ""
    note = f"<br>{html.escape(job.message)}" if job.message else ""
    return (
        f'<div id="train_status_text">job {job.id} ({html.escape(job.output_dir)}): <b>{job.state}</b> — '
        f"step {job.step} / {job.max_train_steps}{phase}{loss}{note}</div>"
        f'<progress value="{job.step}" max="{total}" style="width:100%;height:1.2em"></progress>'
    )


def _jobs_table(trainer: Trainer) -> list[list]:
    rows = []
    for job in reversed(trainer.jobs()):
        loss = round(job.losses[-1][1], 4) if job.losses else None
        rows.append([job.id, job.output_dir, job.state, f"{job.step}/{job.max_train_steps}", loss])
    return rows or [["", "", "", "", None]]


def _parsed(flags: list[str]) -> TrainConfig:
    """`svdiff train` flags back as a training config (to check them before the job is queued)."""
    return from_flags(parser().parse_args(flags))


def _mtime(path) -> float | None:
    return path.stat().st_mtime if path is not None and path.exists() else None


def _current(trainer: Trainer) -> str:
    job = trainer.latest()
    if job is None:
        raise SvdiffError("no job to stop")
    return job.id


def _resumable(trainer: Trainer) -> str:
    jobs = [j for j in trainer.jobs() if j.state in RESUMABLE]
    if not jobs:
        raise SvdiffError("no stopped, failed or interrupted job to resume")
    return jobs[-1].id

"""`svdiff ui`: the web app's pages (Gradio) — Train, Generate, Edit, Files. Each button calls one function of
`actions` (or the training queue); what a user can get wrong comes back as a message in the page, never a stack
trace. The server binds 127.0.0.1 and makes no share link unless asked."""

from __future__ import annotations

import functools
import html
import ipaddress
import json
import os
import sys
import traceback
from pathlib import Path

import gradio as gr

from ..edit import DEFAULT_EDIT_STEPS
from ..errors import SvdiffError
from ..export import FORMATS
from ..io import read_shift_file
from ..models import default_guidance
from ..spectral.targets import PRESETS
from ..train import train_args
from ..train.args import DEFAULT_LR, check, parser
from ..train.report import write_loss_chart
from . import actions
from .jobs import RESUMABLE, Trainer
from .workspace import JOBS, MAX_UPLOAD_MB, Workspace, example_subjects

# Gradio shows the tqdm bars of a handler that takes this (edits fine-tune for minutes)
TRACK_TQDM = gr.Progress(track_tqdm=True)
SHIFT_SLOTS = 4  # shift files the Generate page adds at once, a scale slider each
NONE = ""


def _message(text: str, error: bool = False) -> str:
    return f"**error:** {html.escape(text)}" if error else html.escape(text)


def guarded(outputs: int):
    """Wraps a handler whose last output is the page's message box: a user's mistake (SvdiffError, a file that
    cannot be read or written) becomes `error: …` there, any other failure one line too (the traceback goes to the
    server's log), and the other outputs stay as they were."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SvdiffError as e:
                text = str(e)
            except OSError as e:
                text = f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                first = str(e).splitlines()[0] if str(e) else ""
                text = f"internal error ({type(e).__name__}: {first}); see the server log"
            return (*[gr.skip()] * (outputs - 1), _message(text, error=True))

        return run

    return wrap


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


def build(workspace: Workspace, trainer: Trainer, base=None) -> gr.Blocks:
    defaults = vars(train_args())
    examples = example_subjects()
    guidance = default_guidance(base)

    def shift_choices():
        return [NONE, *workspace.shift_files()]

    with gr.Blocks(title="svdiff", analytics_enabled=False) as demo:
        gr.Markdown(f"## svdiff · workspace `{workspace.root}`")
        with gr.Tabs():
            # ---------------------------------------------------------------- Train
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
                        identifier = gr.Textbox(
                            label="identifier (a rare word)", value="sks", elem_id="train_identifier"
                        )
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
                    preset = gr.Dropdown(
                        list(PRESETS), value=defaults["preset"], label="preset", elem_id="train_preset"
                    )
                    steps = gr.Number(defaults["max_train_steps"], label="steps", precision=0, elem_id="train_steps")
                    prior = gr.Checkbox(label="prior preservation (class images from the base)", elem_id="train_prior")
                    class_images = gr.Number(
                        defaults["num_class_images"], label="class images", precision=0, elem_id="train_class_images"
                    )
                with gr.Accordion("validation, checkpoints, optimizer", open=False):
                    with gr.Row():
                        val_steps = gr.Number(
                            defaults["validation_steps"],
                            label="validation every (0: at the end)",
                            precision=0,
                            elem_id="train_val_steps",
                        )
                        val_images = gr.Number(
                            defaults["num_validation_images"],
                            label="validation images",
                            precision=0,
                            elem_id="train_val_images",
                        )
                        val_inference = gr.Number(
                            defaults["validation_inference_steps"],
                            label="validation sampling steps",
                            precision=0,
                            elem_id="train_val_inference",
                        )
                        checkpoints = gr.Number(
                            0,
                            label="checkpoint every (0: a tenth of the run)",
                            precision=0,
                            elem_id="train_checkpoints",
                        )
                        learning_rate = gr.Number(DEFAULT_LR["svdiff"], label="learning rate", elem_id="train_lr")
                        seed = gr.Number(defaults["seed"], label="seed", precision=0, elem_id="train_seed")
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
                train_command = gr.Code(
                    label="command", language="shell", wrap_lines=True, interactive=False, elem_id="train_command"
                )
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
                    return _message(str(e), error=True)
                return f"instance prompt: *{html.escape(instance)}* · class prompt: *{html.escape(class_prompt)}*"

            @guarded(3)
            def add_subject(files, example_name, ident, cls, ticked):
                if not files and example_name:
                    files = sorted(str(p) for p in examples[example_name].iterdir() if p.suffix == ".png")
                name = actions.add_subject(workspace, ident, cls, files)
                ticked = [*(ticked or []), name] if name not in (ticked or []) else ticked
                return gr.update(choices=workspace.subjects(), value=ticked), None, _message(f"added subject {name}")

            @guarded(3)
            def start_training(
                ticked, run, preset_, steps_, prior_, class_n, v_steps, v_images, v_inf, ckpt, lr, seed_
            ):
                settings = {
                    "preset": preset_,
                    "max_train_steps": _integer(steps_, "steps"),
                    "with_prior_preservation": prior_,
                    "num_class_images": _integer(class_n, "class images"),
                    "validation_steps": _integer(v_steps, "validation every"),
                    "num_validation_images": _integer(v_images, "validation images"),
                    "validation_inference_steps": _integer(v_inf, "validation sampling steps"),
                    "checkpointing_steps": _integer(ckpt, "checkpoint every") or None,
                    "learning_rate": lr,
                    "seed": _integer(seed_, "seed"),
                    "report_to": "none",
                }
                flags, output_dir = actions.train_flags(workspace, ticked, run, base=base, **settings)
                if (workspace.root / output_dir).exists():
                    raise SvdiffError(f"{output_dir} exists: choose another run name, or resume its job")
                check(train_args(**_parsed(flags)))  # a bad setting is refused here, not minutes into a job
                job = trainer.submit(flags, output_dir, settings["max_train_steps"])
                return job.id, job.command, _message(f"job {job.id} queued: {output_dir}")

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
                return job.id, _message(f"job {job.id}: {job.state}")

            @guarded(2)
            def resume_job(job_id):
                job = trainer.resume(job_id or _resumable(trainer))
                return job.id, _message(f"job {job.id} queued: resumes {job.output_dir} from its latest checkpoint")

            example.change(pick_example, example, [identifier, class_word])
            for box in (identifier, class_word):
                box.change(show_prompts, [identifier, class_word], preview)
            demo.load(show_prompts, [identifier, class_word], preview)
            add.click(
                add_subject, [photos, example, identifier, class_word, subjects], [subjects, photos, train_message]
            )
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
            timer.tick(
                refresh, [shown, seen], [jobs, progress, loss_chart, grid, train_command, seen], show_progress="hidden"
            )

            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate", elem_id="tab_generate") as generate_tab:
                prompt = gr.Textbox(label="prompt", value="a photo of sks dog", elem_id="gen_prompt")
                negative = gr.Textbox(label="negative prompt", elem_id="gen_negative")
                gr.Markdown("Shift files, each at its scale: two at scale 1 add two subjects (Eq. 4).")
                slots = []
                for i in range(SHIFT_SLOTS):
                    with gr.Row():
                        file = gr.Dropdown(
                            [NONE], value=NONE, label=f"shift file {i + 1}", elem_id=f"gen_file_{i}", scale=3
                        )
                        scale = gr.Slider(-2, 2, value=1, step=0.05, label="scale", elem_id=f"gen_scale_{i}", scale=2)
                    slots += [file, scale]
                with gr.Accordion("interpolate two files (Eq. 5: α·A + (1 − α)·B)", open=False):
                    with gr.Row():
                        interp_a = gr.Dropdown([NONE], value=NONE, label="A", elem_id="gen_interp_a")
                        interp_b = gr.Dropdown([NONE], value=NONE, label="B", elem_id="gen_interp_b")
                        alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="α", elem_id="gen_alpha")
                with gr.Accordion("style mixing (geometry from one file, appearance from another)", open=False):
                    with gr.Row():
                        geometry = gr.Dropdown([NONE], value=NONE, label="geometry", elem_id="gen_geometry")
                        appearance = gr.Dropdown([NONE], value=NONE, label="appearance", elem_id="gen_appearance")
                with gr.Row():
                    num_images = gr.Slider(
                        1, actions.MAX_GRID_IMAGES, value=4, step=1, label="images", elem_id="gen_images"
                    )
                    gen_seed = gr.Number(0, label="seed (image i: seed + i)", precision=0, elem_id="gen_seed")
                    gen_steps = gr.Slider(1, 100, value=25, step=1, label="sampling steps", elem_id="gen_steps")
                    gen_guidance = gr.Number(guidance, label="guidance", elem_id="gen_guidance")
                run_generate = gr.Button("Generate", variant="primary", elem_id="gen_run")
                gen_message = gr.Markdown(elem_id="gen_message")
                gen_grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="gen_grid")
                gen_command = gr.Code(
                    label="the same grid from the command line",
                    language="shell",
                    wrap_lines=True,
                    interactive=False,
                    elem_id="gen_command",
                )
                gen_settings = gr.JSON(label="settings", elem_id="gen_settings")

            @guarded(4)
            def generate(text, negative_text, a, b, alpha_, geo, app, n, seed_, steps_, guidance_, *slot_values):
                shifts = [(f, s) for f, s in zip(slot_values[::2], slot_values[1::2], strict=True) if f]
                if bool(a) != bool(b) or bool(geo) != bool(app):
                    raise SvdiffError("interpolation and style mixing each need both of their files")
                result = actions.generate(
                    workspace,
                    prompt=text,
                    shifts=shifts,
                    interpolate=(a, b) if a else None,
                    alpha=alpha_,
                    style_mix=(geo, app) if geo else None,
                    num_images=_integer(n, "images"),
                    seed=_integer(seed_, "seed"),
                    num_inference_steps=_integer(steps_, "sampling steps"),
                    guidance_scale=guidance_,
                    negative_prompt=negative_text or "",
                    base=base,
                )
                loaded = ", ".join(f"{k} × {v:g}" for k, v in result["settings"]["loaded_shifts"].items())
                done = f"drew {workspace.rel(result['grid'])}" + (f" with {loaded}" if loaded else " with the base")
                return str(result["grid"]), result["command"], result["settings"], _message(done)

            shift_boxes = [*slots[::2], interp_a, interp_b, geometry, appearance]

            def refresh_shift_boxes(*current):
                choices = shift_choices()
                boxes = [gr.update(choices=choices, value=c if c in choices else NONE) for c in current]
                return boxes if len(boxes) > 1 else boxes[0]

            generate_tab.select(refresh_shift_boxes, shift_boxes, shift_boxes)
            run_generate.click(
                generate,
                [
                    prompt,
                    negative,
                    interp_a,
                    interp_b,
                    alpha,
                    geometry,
                    appearance,
                    num_images,
                    gen_seed,
                    gen_steps,
                    gen_guidance,
                    *slots,
                ],
                [gen_grid, gen_command, gen_settings, gen_message],
                concurrency_id="model",
            )

            # ---------------------------------------------------------------- Edit
            with gr.Tab("Edit", id="edit", elem_id="tab_edit") as edit_tab:
                with gr.Row():
                    edit_image = gr.Image(label="image", type="filepath", sources=["upload"], elem_id="edit_image")
                    with gr.Column():
                        source = gr.Textbox(label="its caption", elem_id="edit_source")
                        targets = gr.Textbox(label="target captions (one per line)", lines=3, elem_id="edit_targets")
                        edit_shifts = gr.Dropdown(
                            [NONE], value=NONE, label="reuse the shifts of an earlier edit", elem_id="edit_shifts"
                        )
                with gr.Row():
                    inversion = gr.Checkbox(
                        True, label="DDIM inversion (keeps what the caption does not change)", elem_id="edit_inversion"
                    )
                    slerp = gr.Slider(
                        0, 1, value=0, step=0.05, label="slerp α (towards fresh noise)", elem_id="edit_slerp"
                    )
                    eta = gr.Slider(0, 1, value=0, step=0.05, label="DDIM η", elem_id="edit_eta")
                with gr.Row():
                    edit_steps = gr.Number(
                        DEFAULT_EDIT_STEPS, label="fine-tuning steps", precision=0, elem_id="edit_train_steps"
                    )
                    edit_inference = gr.Slider(1, 100, value=50, step=1, label="sampling steps", elem_id="edit_steps")
                    edit_guidance = gr.Number(3.0, label="guidance", elem_id="edit_guidance")
                    edit_seed = gr.Number(0, label="seed", precision=0, elem_id="edit_seed")
                run_edit = gr.Button("Edit", variant="primary", elem_id="edit_run")
                edit_message = gr.Markdown(elem_id="edit_message")
                edit_grid = gr.Image(
                    label="input | reconstruction | edits", type="filepath", interactive=False, elem_id="edit_grid"
                )
                edit_settings = gr.JSON(label="settings", elem_id="edit_settings")

            @guarded(3)
            def do_edit(
                image,
                caption,
                target_text,
                shifts,
                inversion_,
                slerp_,
                eta_,
                train_steps,
                inf,
                guid,
                seed_,
                progress=TRACK_TQDM,
            ):
                if not image:
                    raise SvdiffError("upload the image to edit")
                result = actions.edit(
                    workspace,
                    image,
                    caption,
                    str(target_text or "").splitlines(),
                    shifts=shifts or None,
                    base=base,
                    ddim_inversion=inversion_,
                    slerp_alpha=slerp_,
                    eta=eta_,
                    max_train_steps=_integer(train_steps, "fine-tuning steps"),
                    num_inference_steps=_integer(inf, "sampling steps"),
                    guidance_scale=guid,
                    seed=_integer(seed_, "seed"),
                )
                return str(result["grid"]), result["settings"], _message(f"edited: {workspace.rel(result['grid'])}")

            edit_tab.select(refresh_shift_boxes, edit_shifts, edit_shifts)
            run_edit.click(
                do_edit,
                [
                    edit_image,
                    source,
                    targets,
                    edit_shifts,
                    inversion,
                    slerp,
                    eta,
                    edit_steps,
                    edit_inference,
                    edit_guidance,
                    edit_seed,
                ],
                [edit_grid, edit_settings, edit_message],
                concurrency_id="model",
            )

            # ---------------------------------------------------------------- Files
            with gr.Tab("Files", id="files", elem_id="tab_files") as files_tab:
                table = gr.Dataframe(
                    headers=["file", "kB", "base", "preset", "shifts", "dtype", "made from"],
                    interactive=False,
                    wrap=True,
                    elem_id="files_table",
                )
                upload = gr.File(
                    label="add a shift file (.safetensors)",
                    file_types=[".safetensors"],
                    type="filepath",
                    elem_id="files_upload",
                )
                with gr.Row():
                    inspected = gr.Dropdown([NONE], value=NONE, label="inspect", elem_id="files_inspect", scale=3)
                    inspect_run = gr.Button("Inspect", elem_id="files_inspect_run", scale=1)
                with gr.Row():
                    summary = gr.Code(label="svdiff inspect", interactive=False, elem_id="files_summary")
                    blocks = gr.Image(label="|δ| per block", type="filepath", interactive=False, elem_id="files_blocks")
                gr.Markdown("### Merge")
                with gr.Row():
                    merge_files = gr.CheckboxGroup([], label="files", elem_id="merge_files", scale=3)
                    weights = gr.Textbox(label="weights (blank: all 1)", elem_id="merge_weights")
                    interpolate = gr.Checkbox(label="interpolate two: α·A + (1 − α)·B", elem_id="merge_interpolate")
                    merge_alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="α", elem_id="merge_alpha")
                    merge_name = gr.Textbox(
                        label="name (merged/NAME.safetensors)", value="merged", elem_id="merge_name"
                    )
                merge_run = gr.Button("Merge", elem_id="merge_run")
                gr.Markdown("### Export to LoRA")
                with gr.Row():
                    exported = gr.Dropdown([NONE], value=NONE, label="shift file", elem_id="export_file", scale=3)
                    fmt = gr.Radio(list(FORMATS), value=FORMATS[0], label="format", elem_id="export_format")
                    limit = gr.Radio(["rank", "energy"], value="rank", label="limit per layer", elem_id="export_limit")
                    rank = gr.Number(8, label="rank", precision=0, elem_id="export_rank")
                    energy = gr.Number(0.99, label="energy", elem_id="export_energy")
                    export_name = gr.Textbox(
                        label="name (exports/NAME.safetensors)", value="lora", elem_id="export_name"
                    )
                export_run = gr.Button("Export", elem_id="export_run")
                export_report = gr.Markdown(elem_id="export_report")
                download = gr.DownloadButton("Download", visible=False, elem_id="export_download")
                files_command = gr.Code(
                    label="command", language="shell", wrap_lines=True, interactive=False, elem_id="files_command"
                )
                files_message = gr.Markdown(elem_id="files_message")

            def refresh_files(*current):
                rows = actions.file_rows(workspace)
                names = [r[0] for r in rows]
                choices = [NONE, *names]
                boxes = [gr.update(choices=choices, value=c if c in choices else NONE) for c in current]
                return [rows or None, gr.update(choices=names), *boxes]

            file_boxes = [inspected, exported]
            files_outputs = [table, merge_files, *file_boxes]
            files_tab.select(refresh_files, file_boxes, files_outputs)

            @guarded(3)
            def inspect_file(rel):
                result = actions.inspect(workspace, rel or "")
                return result["text"], str(result["plot"]), _message(f"inspected {rel}")

            @guarded(2)
            def add_file(path):
                if not path:
                    return gr.skip(), ""
                target = workspace.new_file("uploads", Path(path).stem, ".safetensors")
                read_shift_file(path)  # refused unless it is an svdiff shift file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(Path(path).read_bytes())
                return None, _message(f"added {workspace.rel(target)}")

            @guarded(2)
            def do_merge(chosen, weight_text, interpolate_, alpha_, name):
                chosen = chosen or []
                if interpolate_ and len(chosen) != 2:
                    raise SvdiffError("interpolation takes exactly two files")
                result = actions.merge(
                    workspace,
                    chosen,
                    name,
                    weights=None if interpolate_ else actions.parse_weights(weight_text, len(chosen)),
                    alpha=alpha_ if interpolate_ else None,
                )
                return result["command"], _message(f"wrote {workspace.rel(result['file'])}")

            @guarded(4)
            def do_export(rel, fmt_, limit_, rank_, energy_, name):
                if not rel:
                    raise SvdiffError("choose the shift file to export")
                result = actions.export(
                    workspace,
                    rel,
                    name,
                    fmt=fmt_,
                    rank=_integer(rank_, "rank") if limit_ == "rank" else None,
                    energy=energy_ if limit_ == "energy" else None,
                    base=base,
                )
                ranks = list(result["ranks"].values())
                lines = [
                    f"**{workspace.rel(result['file'])}** ({result['bytes'] / 1e6:.2f} MB, {fmt_}): "
                    f"{result['layers']} layers, ranks {min(ranks)}–{max(ranks)}, "
                    f"relative error **{result['relative_error']:.4f}**",
                    "",
                    *(
                        f"- {tool}: carries {entry['carries']} layers, drops {len(entry['drops'])}"
                        for tool, entry in result["tools"].items()
                    ),
                ]
                return "\n".join(lines), gr.update(value=str(result["file"]), visible=True), result["command"], ""

            inspect_run.click(inspect_file, inspected, [summary, blocks, files_message])
            upload.upload(add_file, upload, [upload, files_message]).then(refresh_files, file_boxes, files_outputs)
            merge_run.click(
                do_merge,
                [merge_files, weights, interpolate, merge_alpha, merge_name],
                [files_command, files_message],
                concurrency_id="model",
            ).then(refresh_files, file_boxes, files_outputs)
            export_run.click(
                do_export,
                [exported, fmt, limit, rank, energy, export_name],
                [export_report, download, files_command, files_message],
                concurrency_id="model",
            )
    return demo


def _integer(value, what: str) -> int:
    if value is None or float(value) != int(value):
        raise SvdiffError(f"{what}: give a whole number")
    return int(value)


def _parsed(flags: list[str]) -> dict:
    """`svdiff train` flags back as training arguments (to check them before the job is queued)."""
    return vars(parser().parse_args(flags))


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


def serve(
    workspace: str | Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False, base=None, quiet=False
) -> None:
    """Runs the app until Ctrl-C; a training job still running then gets SIGINT and saves a checkpoint."""
    ws = Workspace(workspace)
    if base is not None and Path(base).exists():
        base = str(Path(base).resolve())  # the server works in the workspace from here on
    if not _is_loopback(host):
        print(f"warning: the app has no login; anyone who can reach {host}:{port} can use it", file=sys.stderr)
    os.chdir(ws.root)
    trainer = Trainer(ws)
    try:
        build(ws, trainer, base).queue(default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            share=share,
            max_file_size=f"{MAX_UPLOAD_MB}mb",
            allowed_paths=[str(ws.root)],
            show_error=False,
            footer_links=[],
            ssr_mode=False,
            quiet=quiet,
        )
    finally:
        trainer.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

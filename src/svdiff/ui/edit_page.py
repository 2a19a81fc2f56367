"""The Edit page: one image, its caption and target captions; `svdiff edit` with inversion, slerp and η."""

from __future__ import annotations

import gradio as gr

from ..edit import DEFAULT_EDIT_STEPS
from ..errors import SvdiffError
from . import actions
from .forms import NONE, choice_updates, guarded, integer, message, whole
from .workspace import Workspace

# Gradio shows the tqdm bars of a handler that takes this (an edit fine-tunes for minutes)
TRACK_TQDM = gr.Progress(track_tqdm=True)


def edit_page(workspace: Workspace, base=None) -> None:
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
            slerp = gr.Slider(0, 1, value=0, step=0.05, label="slerp α (towards fresh noise)", elem_id="edit_slerp")
            eta = gr.Slider(0, 1, value=0, step=0.05, label="DDIM η", elem_id="edit_eta")
        with gr.Row():
            edit_steps = whole(DEFAULT_EDIT_STEPS, "fine-tuning steps", "edit_train_steps")
            edit_inference = gr.Slider(1, 100, value=50, step=1, label="sampling steps", elem_id="edit_steps")
            edit_guidance = gr.Number(3.0, label="guidance", elem_id="edit_guidance")
            edit_seed = whole(0, "seed", "edit_seed")
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
            max_train_steps=integer(train_steps, "fine-tuning steps"),
            num_inference_steps=integer(inf, "sampling steps"),
            guidance_scale=guid,
            seed=integer(seed_, "seed"),
        )
        return str(result["grid"]), result["settings"], message(f"edited: {workspace.rel(result['grid'])}")

    edit_tab.select(
        lambda current: choice_updates([NONE, *workspace.shift_files()], [current]), edit_shifts, edit_shifts
    )
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

"""The Generate page: shift files at their scales (Eq. 4), interpolation (Eq. 5), style mixing; the grid with its
settings and the `svdiff generate` line that draws it."""

from __future__ import annotations

import gradio as gr

from ..errors import SvdiffError
from ..models import default_guidance
from . import actions
from .forms import NONE, choice_updates, command_box, guarded, integer, message, whole
from .workspace import Workspace

SHIFT_SLOTS = 4  # shift files the page adds at once, a scale slider each


def generate_page(workspace: Workspace, base=None) -> None:
    guidance = default_guidance(base)
    with gr.Tab("Generate", id="generate", elem_id="tab_generate") as generate_tab:
        prompt = gr.Textbox(label="prompt", value="a photo of sks dog", elem_id="gen_prompt")
        negative = gr.Textbox(label="negative prompt", elem_id="gen_negative")
        gr.Markdown("Shift files, each at its scale: two at scale 1 add two subjects (Eq. 4).")
        slots = []
        for i in range(SHIFT_SLOTS):
            with gr.Row():
                file = gr.Dropdown([NONE], value=NONE, label=f"shift file {i + 1}", elem_id=f"gen_file_{i}", scale=3)
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
            num_images = gr.Slider(1, actions.MAX_GRID_IMAGES, value=4, step=1, label="images", elem_id="gen_images")
            gen_seed = whole(0, "seed (image i: seed + i)", "gen_seed")
            gen_steps = gr.Slider(1, 100, value=25, step=1, label="sampling steps", elem_id="gen_steps")
            gen_guidance = gr.Number(guidance, label="guidance", elem_id="gen_guidance")
        run_generate = gr.Button("Generate", variant="primary", elem_id="gen_run")
        gen_message = gr.Markdown(elem_id="gen_message")
        gen_grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="gen_grid")
        gen_command = command_box("the same grid from the command line", "gen_command")
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
            num_images=integer(n, "images"),
            seed=integer(seed_, "seed"),
            num_inference_steps=integer(steps_, "sampling steps"),
            guidance_scale=guidance_,
            negative_prompt=negative_text or "",
            base=base,
        )
        loaded = ", ".join(f"{k} × {v:g}" for k, v in result["settings"]["loaded_shifts"].items())
        done = f"drew {workspace.rel(result['grid'])}" + (f" with {loaded}" if loaded else " with the base")
        return str(result["grid"]), result["command"], result["settings"], message(done)

    shift_boxes = [*slots[::2], interp_a, interp_b, geometry, appearance]

    def refresh_shift_boxes(*current):
        return choice_updates([NONE, *workspace.shift_files()], current)

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

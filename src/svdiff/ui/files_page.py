"""The Files page: the workspace's shift files with their metadata, inspect with the |δ| per block chart, merge,
export to LoRA with its error and a download, and uploading a shift file."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import SvdiffError
from ..export import FORMATS
from ..format import read_shift_file
from . import actions
from .forms import NONE, choice_updates, command_box, guarded, integer, message, whole
from .workspace import Workspace


def files_page(workspace: Workspace, base=None) -> None:
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
            merge_name = gr.Textbox(label="name (merged/NAME.safetensors)", value="merged", elem_id="merge_name")
        merge_run = gr.Button("Merge", elem_id="merge_run")
        gr.Markdown("### Export to LoRA")
        with gr.Row():
            exported = gr.Dropdown([NONE], value=NONE, label="shift file", elem_id="export_file", scale=3)
            fmt = gr.Radio(list(FORMATS), value=FORMATS[0], label="format", elem_id="export_format")
            limit = gr.Radio(["rank", "energy"], value="rank", label="limit per layer", elem_id="export_limit")
            rank = whole(8, "rank", "export_rank")
            energy = gr.Number(0.99, label="energy", elem_id="export_energy")
            export_name = gr.Textbox(label="name (exports/NAME.safetensors)", value="lora", elem_id="export_name")
        export_run = gr.Button("Export", elem_id="export_run")
        export_report = gr.Markdown(elem_id="export_report")
        download = gr.DownloadButton("Download", visible=False, elem_id="export_download")
        files_command = command_box("command", "files_command")
        files_message = gr.Markdown(elem_id="files_message")

    def refresh_files(*current):
        rows = actions.file_rows(workspace)
        names = [r[0] for r in rows]
        boxes = choice_updates([NONE, *names], current)
        return [rows or None, gr.update(choices=names), *(boxes if len(current) > 1 else [boxes])]

    file_boxes = [inspected, exported]
    files_outputs = [table, merge_files, *file_boxes]
    files_tab.select(refresh_files, file_boxes, files_outputs)

    @guarded(3)
    def inspect_file(rel):
        result = actions.inspect(workspace, rel or "")
        return result["text"], str(result["plot"]), message(f"inspected {rel}")

    @guarded(2)
    def add_file(path):
        if not path:
            return gr.skip(), ""
        target = workspace.new_file("uploads", Path(path).stem, ".safetensors")
        read_shift_file(path)  # refused unless it is an svdiff shift file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
        return None, message(f"added {workspace.rel(target)}")

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
        return result["command"], message(f"wrote {workspace.rel(result['file'])}")

    @guarded(4)
    def do_export(rel, fmt_, limit_, rank_, energy_, name):
        if not rel:
            raise SvdiffError("choose the shift file to export")
        result = actions.export(
            workspace,
            rel,
            name,
            fmt=fmt_,
            rank=integer(rank_, "rank") if limit_ == "rank" else None,
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

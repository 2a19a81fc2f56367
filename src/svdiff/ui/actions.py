"""What the web app's buttons do, as plain functions of the workspace and the form's values (no Gradio here):
each builds the `svdiff` command line it stands for and runs it through the command's own code, or calls the
library function behind it, so a page and a terminal give the same files from the same settings."""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path

from ..checks import check_range
from ..commands import build_parser
from ..edit import edit_image
from ..errors import SvdiffError
from ..export import export_lora
from ..format import read_shift_file
from ..inspection import format_summary, plot_blocks, summarize
from ..train.config import FIELDS
from .workspace import CLASS_IMAGES, CONCEPTS, EDITS, EXPORTS, GENERATED, MERGED, RUNS, SUBJECTS, Workspace, plain_name

MAX_GRID_IMAGES = 16


def command_line(workspace: Workspace, argv: list[str]) -> str:
    """The shell line that repeats `svdiff argv` (paths in it are relative to the workspace)."""
    return f"cd {shlex.quote(str(workspace.root))} && {shlex.join(['svdiff', *argv])}"


def text_flag(name: str, value: str) -> list[str]:
    """A free-text flag; `--flag=value` when the value starts with '-', which argparse would read as a flag."""
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def run_command(argv: list[str], workspace: Workspace) -> None:
    """Runs `svdiff argv` in this process with the workspace as the folder its relative paths start from."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise SvdiffError(f"the form does not make a valid command: {shlex.join(argv)}") from None
    # the server runs in the workspace already; a library caller elsewhere is moved there for the call
    here = contextlib.nullcontext() if Path.cwd() == workspace.root else contextlib.chdir(workspace.root)
    with here:
        args.func(args)


# --- train ---


def prompts(identifier: str, class_word: str) -> tuple[str, str]:
    """The instance and class prompts of a subject, DreamBooth's way: "a photo of sks dog", "a photo of a dog"."""
    identifier, class_word = " ".join(str(identifier).split()), " ".join(str(class_word).split())
    if not identifier or not class_word:
        raise SvdiffError("give the subject's identifier (a rare word such as sks) and its class (dog, heart, …)")
    return f"a photo of {identifier} {class_word}", f"a photo of a {class_word}"


def add_subject(workspace: Workspace, identifier: str, class_word: str, files) -> str:
    """The photos as subject `<identifier>-<class>` (subjects/<name>/ and its prompts in subjects/<name>.json)."""
    instance, class_prompt = prompts(identifier, class_word)
    name = plain_name("-".join(f"{identifier} {class_word}".split()), "the subject's name")
    folder = workspace.save_images(name, files)
    record = {"identifier": identifier.strip(), "class_word": " ".join(class_word.split())}
    record |= {"instance_prompt": instance, "class_prompt": class_prompt}
    folder.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return name


def subject_record(workspace: Workspace, name: str) -> dict:
    path = workspace.path(f"{SUBJECTS}/{plain_name(name, 'the subject')}.json", exists=True)
    return json.loads(path.read_text())


def train_flags(workspace: Workspace, subjects: list[str], run: str, *, base=None, **settings) -> tuple[list, str]:
    """The `svdiff train` flags for the named subjects (added with `add_subject`) and the run's output folder.
    Several subjects train together through a concepts list (Cut-Mix-Unmix)."""
    if not subjects:
        raise SvdiffError("add at least one subject (photos, identifier and class) and tick it before starting")
    run = plain_name(run, "the run name")
    output_dir = f"{RUNS}/{run}"
    prior = bool(settings.pop("with_prior_preservation", False))
    concepts = []
    for name in subjects:
        record = subject_record(workspace, name)
        concept = {"instance_prompt": record["instance_prompt"], "instance_data_dir": f"{SUBJECTS}/{name}"}
        if prior:
            class_dir = f"{CLASS_IMAGES}/{'-'.join(record['class_word'].split())}"
            concept |= {"class_prompt": record["class_prompt"], "class_data_dir": class_dir}
        concepts.append(concept)
    if len(concepts) == 1:
        c = concepts[0]
        flags = ["--instance_data_dir", c["instance_data_dir"], *text_flag("--instance_prompt", c["instance_prompt"])]
        if prior:
            flags += ["--class_data_dir", c["class_data_dir"], *text_flag("--class_prompt", c["class_prompt"])]
    else:
        listing = workspace.root / CONCEPTS / f"{run}.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps(concepts, indent=2) + "\n")
        flags = ["--concepts_list", workspace.rel(listing)]
    if prior:
        flags.append("--with_prior_preservation")
    if base is not None:
        flags += ["--pretrained_model_name_or_path", str(base)]
    for name, value in settings.items():
        if name not in FIELDS:
            raise SvdiffError(f"unknown training setting {name!r}")
        if value is not None and value != FIELDS[name].default:
            flags += [f"--{name}", str(value)]
    return [*flags, "--output_dir", output_dir], output_dir


def run_pictures(workspace: Workspace, output_dir: str) -> dict:
    """What a run has written so far: the newest validation grid and the loss chart (None while absent)."""
    folder = workspace.path(output_dir)
    grids = sorted((folder / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    chart = folder / "loss.png"
    return {"grid": grids[-1] if grids else None, "loss_chart": chart if chart.is_file() else None}


# --- generate ---


def generate(
    workspace: Workspace,
    *,
    prompt: str,
    shifts: list[tuple[str, float]] = (),
    interpolate: tuple[str, str] | None = None,
    alpha: float = 0.5,
    style_mix: tuple[str, str] | None = None,
    num_images: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    negative_prompt: str = "",
    base=None,
) -> dict:
    """`svdiff generate` with the form's settings, into a new folder under generated/; returns the grid's path,
    the settings and the command line that draws the same grid."""
    if not str(prompt).strip():
        raise SvdiffError("the prompt is empty")
    check_range("images", num_images, 1, MAX_GRID_IMAGES, integer=True)
    argv = ["generate", *text_flag("--prompt", prompt)]
    for path, scale in shifts:
        argv += ["--shifts", f"{workspace.rel(workspace.path(path, exists=True))}:{scale:g}"]
    if interpolate:
        a, b = (workspace.rel(workspace.path(p, exists=True)) for p in interpolate)
        argv += ["--interpolate", a, b, "--alpha", f"{alpha:g}"]
    if style_mix:
        geometry, appearance = (workspace.rel(workspace.path(p, exists=True)) for p in style_mix)
        argv += ["--style_mix", f"geometry={geometry}", f"appearance={appearance}"]
    argv += ["--num_images", str(num_images), "--seed", str(seed), "--num_inference_steps", str(num_inference_steps)]
    if guidance_scale is not None:
        argv += ["--guidance_scale", f"{guidance_scale:g}"]
    if negative_prompt.strip():
        argv += text_flag("--negative_prompt", negative_prompt)
    if base is not None:
        argv += ["--base", str(base)]
    output = workspace.stamped(GENERATED) / "grid.png"
    argv += ["--output", workspace.rel(output)]
    run_command(argv, workspace)
    settings = json.loads(output.with_suffix(".json").read_text())
    return {"grid": output, "settings": settings, "command": command_line(workspace, argv)}


# --- edit ---


def edit(
    workspace: Workspace,
    image: str | Path,
    source_prompt: str,
    target_prompts: list[str],
    *,
    shifts: str | None = None,
    base=None,
    progress: bool = True,
    **settings,
) -> dict:
    """`svdiff edit` of an uploaded image into a new folder under edits/; its fine-tuned shifts stay there
    (edits/<stamp>/edits-model/), so a further edit of the same image can reuse them."""
    folder = workspace.stamped(EDITS)
    weights = None if not shifts else workspace.path(shifts, exists=True)
    result = edit_image(
        image,
        source_prompt,
        [t for t in target_prompts if t.strip()],
        folder / "edits.png",
        base=base,
        shifts=weights,
        progress=progress,
        **settings,
    )
    return {"grid": Path(result["grid"]), "settings": {k: v for k, v in result.items() if k != "pictures"}}


# --- files ---


def file_rows(workspace: Workspace) -> list[list]:
    """One row per shift file: path, size, base, preset, number of shifts, dtype, what it was made from."""
    rows = []
    for rel in workspace.shift_files():
        summary = summarize(read_shift_file(workspace.path(rel)), top=0)
        meta = summary["metadata"]
        rows.append([rel, round(summary["size_bytes"] / 1e3, 1), Path(str(meta["base_model"])).name, meta["preset"]])
        rows[-1] += [summary["total_values"], str(meta.get("dtype", "")), _made_from(meta)]
    return rows


def _made_from(meta: dict) -> str:
    """What a file's metadata says it came from (any file may be uploaded: nothing in it is trusted to parse)."""
    merged, training = meta.get("merged_from"), meta.get("training")
    if isinstance(merged, list) and all(isinstance(m, dict) and {"file", "weight"} <= set(m) for m in merged):
        return " + ".join(f"{m['weight']}·{m['file']}" for m in merged)
    if isinstance(training, dict):
        return str(training.get("instance_prompt") or training.get("concepts_list") or "")
    return ""


def inspect(workspace: Workspace, rel: str) -> dict:
    """`svdiff inspect FILE --plot`: the summary text and the |δ| per block chart (under inspect/)."""
    path = workspace.path(rel, exists=True)
    shift_file = read_shift_file(path)
    plot = workspace.root / "inspect" / (workspace.rel(path).replace("/", "__").removesuffix(".safetensors") + ".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    return {"text": format_summary(summarize(shift_file)), "plot": plot_blocks(shift_file, plot)}


def merge(workspace: Workspace, files: list[str], name: str, *, weights=None, alpha: float | None = None) -> dict:
    """`svdiff merge` into merged/<name>.safetensors: a weighted sum, or with `alpha` an interpolation of two."""
    if not files:
        raise SvdiffError("choose the shift files to merge")
    output = workspace.new_file(MERGED, name, ".safetensors")
    argv = ["merge", *(workspace.rel(workspace.path(f, exists=True)) for f in files)]
    if alpha is not None:
        argv += ["--interpolate", "--alpha", f"{alpha:g}"]
    elif weights:
        argv += ["--weights", *(f"{w:g}" for w in weights)]
    output.parent.mkdir(parents=True, exist_ok=True)
    argv += ["-o", workspace.rel(output)]
    run_command(argv, workspace)
    return {"file": output, "command": command_line(workspace, argv)}


def parse_weights(text: str, count: int) -> list[float] | None:
    """The merge form's weights field: blank for all 1, else one number per chosen file."""
    parts = str(text or "").replace(",", " ").split()
    if not parts:
        return None
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise SvdiffError(f"weights {text!r}: give numbers separated by spaces") from None
    if len(weights) != count:
        raise SvdiffError(f"{count} files but {len(weights)} weights")
    return weights


def export(
    workspace: Workspace,
    rel: str,
    name: str,
    *,
    fmt: str = "diffusers",
    rank: int | None = None,
    energy: float | None = None,
    base=None,
) -> dict:
    """`svdiff export` into exports/<name>.safetensors; returns the export's report (relative error, ranks, what
    each tool applies) with the command line."""
    source = workspace.path(rel, exists=True)
    output = workspace.new_file(EXPORTS, name, ".safetensors")
    report = export_lora(source, output, fmt=fmt, rank=rank, energy=energy, base=base)
    limit = ["--rank", str(rank)] if rank is not None else ["--energy", f"{energy:g}"]
    argv = ["export", workspace.rel(source), "--format", fmt, *limit, "-o", workspace.rel(output)]
    argv += ["--base", str(base)] if base is not None else []
    return report | {"file": output, "command": command_line(workspace, argv)}

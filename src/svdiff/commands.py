"""The `svdiff` commands: their flags and handlers (parse flags, call one library function, print). `cli.py` is the
entry point over them; the web app runs them too, so nothing here imports the web app."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import __version__
from .checks import MAX_SCALE, check_range, png_path
from .edit import DEFAULT_EDIT_STEPS
from .errors import SvdiffError
from .flags import base_flag, flag
from .train import add_train_flags
from .world.commands import add_parser as add_world

SAVE_DTYPES = ("fp16", "fp32", "bf16", "int8")
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, when svdiff runs from a source checkout


class _Parser(argparse.ArgumentParser):
    """A flag error in one line and a pointer to --help, not the usage screen (subcommands inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "preset", default="all", help="parameter subset (see `svdiff targets --list`)")
    for name, what in (("include", "keep only"), ("exclude", "drop")):
        flag(p, name, action="append", metavar="REGEX", help=f"{what} weights whose name matches (repeatable)")


def cmd_targets(args) -> int:
    from .adapters import count_targets
    from .spectral.targets import PRESETS, RANGES

    if args.list:
        for name, (_, text) in PRESETS.items():
            print(f"{name:12s} {text}")
        for name, (_, text) in RANGES.items():
            print(f"{name + ':A-B':12s} {text}")
        return 0
    if args.memory:
        from .memory import format_memory, training_memory

        report = training_memory(
            args.base,
            args.preset,
            args.include,
            args.exclude,
            args.dtype,
            tuple(args.resolution),
            batch=args.batch,
        )
        print(json.dumps(report, indent=2) if args.json else format_memory(report))
        return 0
    report = count_targets(args.base, args.preset, args.include, args.exclude)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"base {report['base']}, preset {args.preset}")
    for component, c in report["components"].items():
        print(f"  {component:15s} {c['tensors']:5d} tensors {c['values']:>12,d} shifts")
    print(
        f"  {'total':15s} {'':>13s} {report['values']:>12,d} shifts   "
        f"file {report['file_bytes_fp16'] / 1e6:.2f} MB (fp16), {report['file_bytes_fp32'] / 1e6:.2f} MB (fp32), "
        f"{report['file_bytes_int8'] / 1e6:.2f} MB (int8)"
    )
    return 0


def cmd_inspect(args) -> int:
    from .format import read_shift_file
    from .inspection import format_summary, plot_blocks, summarize

    if args.plot is not None:
        png_path("--plot", args.plot)
    shift_file = read_shift_file(args.file)
    summary = summarize(shift_file, top=args.top)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.plot:
        print(f"wrote {plot_blocks(shift_file, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_cache(args) -> int:
    from .spectral import SVDCache

    cache = SVDCache()
    if args.action == "list":
        entries = cache.entries()
        size = sum(p.stat().st_size for p in entries)
        print(f"{cache.root}: {len(entries)} entries, {size / 1e6:.1f} MB")
    elif args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.root}")
    else:
        from .models import load_components
        from .spectral import find_targets
        from .spectral.shifts import compute_bases

        for component, model in load_components(args.base).items():
            targets = [t for t in find_targets(model, args.preset, args.include, args.exclude) if not t.kind.is_vector]
            print(f"{component}: {len(targets)} matrices")
            compute_bases([t.kind.to_matrix(t.module.weight) for t in targets], cache=cache)
        print(f"cache at {cache.root}")
    return 0


def _alpha(alpha: float | None) -> float:
    """--alpha of an interpolation (0.5 when not given); outside [0, 1] it extrapolates, which is allowed."""
    if alpha is None:
        return 0.5
    check_range("--alpha", alpha, -MAX_SCALE, MAX_SCALE)
    if not 0.0 <= alpha <= 1.0:
        print(f"warning: --alpha {alpha} is outside [0, 1]: extrapolating", file=sys.stderr)
    return alpha


def cmd_merge(args) -> int:
    from .adapters import merge_shift_files
    from .format import save_shift_file

    if args.interpolate:
        if len(args.files) != 2 or args.weights:
            raise SvdiffError("--interpolate takes exactly two files and no --weights")
        alpha = _alpha(args.alpha)
        weights = [alpha, 1.0 - alpha]
    else:
        if args.alpha is not None:
            raise SvdiffError("--alpha needs --interpolate (without it the files are summed)")
        weights = args.weights or [1.0] * len(args.files)
        for w in weights:
            check_range("--weights", w, -MAX_SCALE, MAX_SCALE)
    tensors, meta = merge_shift_files(args.files, weights)
    path = save_shift_file(args.output, tensors, dtype=args.save_dtype, **meta)
    print(
        f"wrote {path} ({path.stat().st_size / 1e3:.1f} kB): "
        + " + ".join(f"{w:g}·{f}" for f, w in zip(args.files, weights, strict=True))
    )
    return 0


def cmd_generate(args) -> int:
    from .models import default_guidance
    from .pictures import grid
    from .sample import apply_shifts, check_sampling, load_pipeline, parse_shift_arg, sample_per_prompt

    if args.alpha is not None and not args.interpolate:
        raise SvdiffError("--alpha needs --interpolate A B")
    alpha = _alpha(args.alpha) if args.interpolate else 0.5
    check_range("--num_images", args.num_images, 1, 1024, integer=True)
    check_sampling(args.num_inference_steps, args.guidance_scale, args.eta, args.seed)
    style = None
    if args.style_mix:
        if not all("=" in item for item in args.style_mix):
            raise SvdiffError("--style_mix takes geometry=FILE appearance=FILE")
        style = dict(item.partition("=")[::2] for item in args.style_mix)
    shifts = [parse_shift_arg(s) for s in args.shifts]
    out = png_path("--output", args.output)
    from .format import read_shift_file

    for path in [p for p, _ in shifts] + list(args.interpolate or []) + list((style or {}).values()):
        read_shift_file(path)  # a bad file fails here, before minutes of loading
    if args.per_prompt and (args.interpolate or style or len(shifts) != len(args.prompt)):
        raise SvdiffError("--per-prompt takes one --shifts FILE[:SCALE] per --prompt, and no --interpolate/--style_mix")
    pipe = load_pipeline(args.base, scheduler=args.scheduler)
    loaded = apply_shifts(pipe, shifts, args.interpolate, alpha, style, fused=not args.per_prompt)
    rows = sample_per_prompt(
        pipe,
        args.prompt,
        [{name: scale} for name, scale in loaded.items()] if args.per_prompt else None,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=default_guidance(args.base) if args.guidance_scale is None else args.guidance_scale,
        negative_prompt=args.negative_prompt,
        eta=args.eta,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = [im for row in rows for im in row]
    scale = max(1, 256 // images[0].width)
    grid(images, cols=args.num_images, scale=scale, labels=args.prompt).save(out)
    for p, row in enumerate(rows):
        for i, im in enumerate(row):
            im.save(out.with_name(f"{out.stem}-{p}-{i}.png"))
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"loaded_shifts": loaded}
    out.with_suffix(".json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    print(f"wrote {out} ({len(images)} images) and {out.with_suffix('.json')}")
    return 0


def cmd_export(args) -> int:
    from .export import export_lora

    report = export_lora(
        args.file,
        args.output,
        fmt=args.format,
        rank=args.rank,
        energy=args.energy,
        base=args.base,
        include_norms=args.include_norms,
        comfyui_extras=args.comfyui_text_extras,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ranks = list(report["ranks"].values())
    print(
        f"wrote {report['output']} ({report['bytes'] / 1e6:.2f} MB, {args.format}): {report['layers']} layers, "
        f"ranks {min(ranks)}–{max(ranks)}, relative error {report['relative_error']:.4f}"
    )
    for key, err in report["worst_layers"].items():
        print(f"  {err:.4f}  {key}")
    print("what each tool applies:")
    for tool, entry in report["tools"].items():
        drops = entry["drops"]
        line = f"  {tool:14s} carries {entry['carries']} layers, drops {len(drops)}"
        if entry.get("refuses_file"):
            line += f" (refuses the whole file: {entry['refuses_file']})"
        elif drops:
            line += f", e.g. {drops[0]}"
        print(line)
    return 0


def cmd_import(args) -> int:
    from .importer import import_svdiff_pytorch

    report = import_svdiff_pytorch(args.files, args.output, base=args.base, dtype=args.save_dtype)
    layers = ", ".join(f"{n} {c} layers" for c, n in report["layers"].items())
    print(f"wrote {report['output']} ({report['bytes'] / 1e3:.1f} kB): {layers} from svdiff-pytorch")
    return 0


def cmd_train(args) -> int:
    from .train import from_flags, train

    summary = train(from_flags(args))
    if summary:
        print(
            f"wrote {summary['weights']} ({summary['weights_bytes'] / 1e6:.2f} MB) after {summary['steps']} steps "
            f"in {summary['minutes']:.1f} min; samples in {summary['samples']}"
        )
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    r = run_demo(
        args.output_dir, args.subject, args.max_train_steps, args.num_class_images, seed=args.seed, base=args.base
    )
    before, after = r["judge_before"], r["judge_after"]
    print(
        f"trained {r['instance_prompt']!r} for {r['steps']} steps in {r['train_minutes']:.1f} min "
        f"({r['total_minutes']:.1f} min in all)"
    )
    print(f"shift file: {r['shift_file']} ({r['shift_file_bytes'] / 1e3:.0f} kB)")
    print(
        f"denoising loss on the subject's photos: {r['subject_loss_before']:.4f} before, "
        f"{r['subject_loss_after']:.4f} after"
    )
    print(
        f"judge similarity to the subject's photos: {before['similarity']:.3f} before, {after['similarity']:.3f} after"
    )
    print(
        f"class prompt drawn as its shape: {r['class_prompt_before']['shape_correct']:.0%} before, "
        f"{r['class_prompt_after']['shape_correct']:.0%} after"
    )
    if "marks_correct" in after:
        print(
            f"subject pictures with its emblem and outline: {before['marks_correct']:.0%} before, "
            f"{after['marks_correct']:.0%} after"
        )
    print(f"before/after grid: {r['picture']}")
    return 0


def cmd_bench(args) -> int:

    script = CHECKOUT / "benchmarks" / "report.py"
    if not script.is_file():
        raise SvdiffError(
            f"svdiff bench runs the benchmarks of a source checkout, and this svdiff is installed without them "
            f"(no {script}): clone the repository and run `make bench` in it"
        )
    flags = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    flags += ["--out", str(args.out.resolve())] if args.out else []
    flags += ["--runs", str(args.runs.resolve())] if args.runs else []
    return subprocess.run([sys.executable, str(script), *flags], cwd=script.parents[1]).returncode


def cmd_edit(args) -> int:
    from .edit import edit_image

    r = edit_image(
        args.image,
        args.source_prompt,
        args.target_prompt,
        args.output,
        base=args.base,
        shifts=args.shifts,
        method=args.method,
        max_train_steps=args.max_train_steps,
        ddim_inversion=args.ddim_inversion,
        eta=args.eta,
        slerp_alpha=args.slerp_alpha,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
    )
    print(f"shifts: {r['shifts']}")
    print(f"edits: {r['grid']} (settings: {Path(r['grid']).with_suffix('.json')})")
    return 0


def build_parser(more=None) -> argparse.ArgumentParser:
    """The parser of every command; `more(subparsers)` adds others (the entry point adds `svdiff ui`)."""
    parser = _Parser(
        prog="svdiff", description="Personalize diffusion models by training only the singular values of their weights."
    )

    parser.add_argument("--version", action="version", version=f"svdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train spectral shifts (or a LoRA / full baseline) on a few images")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="personalize an example subject on the embedded base; before/after pictures")
    flag(p, "output_dir", default="demo-output")
    flag(p, "subject", default="examples/subjects/heart_sks", help="an example subject folder")
    flag(p, "max_train_steps", type=int, default=400)
    flag(p, "num_class_images", type=int, default=50)
    flag(p, "seed", type=int, default=0)
    flag(
        p,
        "base",
        help="embedded:flow (the flow-matching transformer base), or another pipeline of the shapes world, e.g. a "
        "candidate from `python -m svdiff.world.pretrain` (default: embedded:unet)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="the evidence report: every benchmark, the paper's claims checked")
    mode = p.add_mutually_exclusive_group()
    flag(mode, "quick", action="store_true", help="fewer subjects, seeds and steps")
    flag(mode, "smoke", action="store_true", help="a few steps of everything: checks the pipeline runs")
    flag(p, "out", type=Path, help="report folder (default: docs/results/report)")
    flag(p, "runs", type=Path, help="where trained runs are kept and reused")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("edit", help="edit one image by changing its caption (fine-tuned shifts, DDIM inversion)")
    flag(p, "image", required=True)
    flag(p, "source_prompt", required=True, help="the caption of the image as it is")
    flag(p, "target_prompt", action="append", required=True, help="repeatable")
    flag(p, "shifts", help="reuse the shift file of an earlier edit of this image")
    flag(p, "method", default="svdiff", choices=["svdiff", "full"], help="full: the paper's baseline")
    flag(p, "max_train_steps", type=int, default=DEFAULT_EDIT_STEPS)
    flag(
        p,
        "ddim_inversion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start from the image's inverted noise map (on by default; off for large structural edits)",
    )
    flag(p, "eta", type=float, default=0.0, help="DDIM η: fresh noise at every step")
    flag(p, "slerp_alpha", type=float, default=0.0, help="Eq. 7: move the noise map towards fresh noise")
    flag(p, "guidance_scale", type=float, default=3.0)
    flag(p, "num_inference_steps", type=int, default=50)
    flag(p, "seed", type=int, default=0)
    flag(p, "output", default="edits.png")
    base_flag(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("targets", help="count the spectral shifts a preset selects (no SVD is computed)")
    base_flag(p)
    _add_target_flags(p)
    flag(p, "json", action="store_true")
    flag(p, "list", action="store_true", help="list the presets")
    flag(p, "memory", action="store_true", help="what training needs in memory, by component (meta tensors)")
    flag(p, "resolution", type=int, nargs="+", default=[512, 1024], help="with --memory (default 512 1024)")
    flag(
        p,
        "dtype",
        default="bf16",
        help="with --memory: the base weights' dtype, fp32, fp16, bf16 or fp8 (as --base_dtype float8_e4m3fn holds it)",
    )
    flag(p, "batch", type=int, default=1, help="with --memory (default 1)")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("inspect", help="metadata, counts, size and the most-moved layers of a shift file")
    p.add_argument("file")
    flag(p, "top", type=int, default=10)
    flag(p, "json", action="store_true")
    flag(p, "plot", metavar="PNG", help="also draw |δ| per block into this PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="one shift file from several: weighted sum (Eq. 4) or interpolation (Eq. 5)")
    p.add_argument("files", nargs="+")
    flag(p, "weights", type=float, nargs="+", help="one per file (default: all 1, a sum)")
    flag(p, "interpolate", action="store_true", help="alpha·A + (1 − alpha)·B")
    flag(p, "alpha", type=float, help="with --interpolate (default 0.5)")
    flag(p, "output", "o", required=True)
    flag(
        p,
        "save_dtype",
        default="fp32",
        choices=SAVE_DTYPES,
        help="fp32 (default) keeps the merge exactly equal to loading its parts; int8 is the smallest file",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="sample images with shift files (scaled, added, interpolated, style-mixed)")
    flag(p, "prompt", action="append", required=True, help="repeat for several rows")
    flag(p, "shifts", action="append", default=[], metavar="FILE[:SCALE]", help="repeat to add subjects")
    flag(
        p,
        "per_prompt",
        action="store_true",
        help="draw prompt i with --shifts file i alone, all prompts in the same batches",
    )
    flag(p, "interpolate", nargs=2, metavar=("A", "B"), help="alpha·A + (1 − alpha)·B")
    flag(p, "alpha", type=float, help="with --interpolate (default 0.5)")
    flag(p, "style_mix", nargs=2, metavar=("geometry=A", "appearance=B"))
    flag(p, "num_images", type=int, default=4)
    flag(p, "seed", type=int, default=0)
    flag(p, "num_inference_steps", type=int, default=25)
    flag(p, "guidance_scale", type=float, help="default: 3 on the embedded base, 7.5 on others")
    flag(p, "negative_prompt")
    flag(p, "scheduler", default="ddim")
    flag(p, "eta", type=float, default=0.0)
    flag(p, "output", default="grid.png")
    base_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="a shift file as a LoRA (diffusers or kohya keys), exact at full rank")
    p.add_argument("file")
    flag(p, "format", default="diffusers", choices=["diffusers", "kohya"], help="kohya: for the UIs")
    flag(
        p,
        "include_norms",
        action="store_true",
        help="kohya: the UNet's 1-D norm shifts as exact differences (ComfyUI, AUTOMATIC1111 and Forge apply them)",
    )
    flag(
        p,
        "comfyui_text_extras",
        action="store_true",
        help="kohya: the text encoder's norms and embeddings too, under names only ComfyUI maps (Forge refuses it)",
    )
    group = p.add_mutually_exclusive_group(required=True)
    flag(group, "rank", type=int, help="at most this rank per layer (largest |d| kept)")
    flag(group, "energy", type=float, help="per layer, the fewest directions keeping this share of ‖ΔW‖²")
    flag(p, "output", "o", required=True)
    base_flag(p)
    flag(p, "json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="svdiff-pytorch's spectral_shifts(_te).safetensors as an svdiff shift file")
    p.add_argument("files", nargs="+", help="the file(s), or the folder holding them")
    flag(p, "output", "o", required=True)
    flag(p, "save_dtype", default="fp32", choices=SAVE_DTYPES)
    base_flag(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("cache", help="the on-disk cache of SVD factors ($SVDIFF_CACHE)")
    p.add_argument("action", choices=["list", "clear", "build"])
    base_flag(p)
    _add_target_flags(p)
    p.set_defaults(func=cmd_cache)

    add_world(sub)
    if more is not None:
        more(sub)
    return parser

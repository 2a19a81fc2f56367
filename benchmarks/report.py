"""The evidence report: every benchmark run side by side, the paper's claims checked on the embedded tiny world, and
svdiff's size, speed and memory against LoRA and full fine-tuning. `make bench` / `make bench-quick` run it.

    HF_HUB_OFFLINE=1 python benchmarks/report.py [--quick | --smoke] [--out docs/results/report] [--runs DIR]

Writes `report.md` (tables, pictures, each section's command and a plain verdict on the paper's claim) and
`results.json` (every benchmark's JSON) into --out, beside the benchmarks' own JSON and PNG files. On a 2-core
CPU the committed report's sections took 123.6 minutes on the UNet base (single subject 32.5 of them, training 24
runs; multi-subject 40.6, 19 runs; editing 16.8, 24 runs); --quick (fewer subjects, seeds and steps) took 11.8
minutes from an empty --runs; --smoke (a few steps of everything, for CI, about three minutes) proves only that the
pipeline of benchmarks runs. Trained runs are kept in --runs and reused, and a
benchmark already run with the same command on the same world (a hash of the embedded bases' and the judge's
weights) is not run again (its record is in --out/records/), so an interrupted report resumes; delete them to
start afresh.
"""

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# (key, title, script, {mode: arguments}); {out} is the report folder, {runs} the folder for trained runs.
SECTIONS = (
    ("world", "The embedded base", "world_quality.py", {"full": [], "quick": ["--quick"], "smoke": ["--quick"]}),
    (
        "storage",
        "1. Storage",
        "storage.py",
        {"full": [], "quick": [], "smoke": ["--bases", "tiny"]},
    ),
    (
        "single_subject",
        "2. Single subject: svdiff vs full vs LoRA",
        "single_subject.py",
        {
            "full": ["--runs", "{runs}/subjects"],
            "quick": [
                "--runs",
                "{runs}/subjects",
                "--subjects",
                "2",
                "--prompts",
                "5",
                "--seeds",
                "2",
                "--steps",
                "200",
            ],
            "smoke": ["--runs", "{runs}/subjects", "--subjects", "1", "--prompts", "2", "--seeds", "1"]
            + ["--steps", "2", "--methods", "svdiff", "lora", "--class_images", "2"],
        },
    ),
    (
        "layer_groups",
        "2b. Which layers carry a subject",
        "layer_groups.py",
        {
            "full": ["--runs", "{runs}/subjects"],
            "quick": [
                "--runs",
                "{runs}/subjects",
                "--subjects",
                "2",
                "--prompts",
                "2",
                "--seeds",
                "2",
                "--steps",
                "200",
            ],
            "smoke": ["--runs", "{runs}/subjects", "--subjects", "1", "--prompts", "1", "--seeds", "1", "--steps", "2"]
            + ["--class_images", "2"],
        },
    ),
    (
        "multi_subject",
        "3a. Multi-subject: Cut-Mix-Unmix",
        "multi_subject.py",
        {
            "full": ["--runs", "{runs}/multi_subject"],
            "quick": ["--runs", "{runs}/multi_subject", "--steps", "300", "--seeds", "4", "--pairs", "same class"]
            + ["--train_seeds", "1"],
            "smoke": ["--runs", "{runs}/multi_subject", "--steps", "2", "--seeds", "1", "--pairs", "same class"]
            + ["--train_seeds", "1"],
        },
    ),
    (
        "edit",
        "3b. Single-image editing",
        "edit.py",
        {
            "full": ["--runs", "{runs}/edit", "--scenes", "12"],
            "quick": ["--runs", "{runs}/edit", "--scenes", "4", "--steps", "200"],
            "smoke": ["--runs", "{runs}/edit", "--scenes", "4", "--steps", "2", "--num_inference_steps", "4"],
        },
    ),
    (
        "combine",
        "4. Combination (Eq. 4) and interpolation (Eq. 5)",
        "combine.py",
        {
            "full": ["--runs", "{runs}/subjects"],
            "quick": ["--runs", "{runs}/subjects", "--seeds", "4", "--steps", "200"],
            "smoke": ["--runs", "{runs}/subjects", "--seeds", "1", "--steps", "2", "--class_images", "2"],
        },
    ),
    (
        "svd_engine",
        "5a. SVD of SD 1.5: engine vs per-layer torch.linalg.svd vs cache",
        "svd_engine.py",
        {"full": ["--per-shape", "2"], "quick": ["--per-shape", "1"], "smoke": ["--limit", "3"]},
    ),
    (
        "step_flops",
        "5b. Training-step FLOPs, SD 1.5 at 512 px",
        "step_flops.py",
        {"full": [], "quick": [], "smoke": []},
    ),
    (
        "train_methods",
        "5c. CPU training step: svdiff vs LoRA vs full",
        "train_methods.py",
        {
            "full": [],
            "quick": ["--steps", "3", "--rounds", "1"],
            "smoke": ["--archs", "tiny", "--tiny_steps", "1", "--rounds", "1"],
        },
    ),
    (
        "compose",
        "5d. Sampling with fused shifts vs the base",
        "compose.py",
        {"full": [], "quick": ["--repeats", "3"], "smoke": ["--repeats", "1", "--num_images", "2", "--steps", "2"]},
    ),
)

TIMINGS = {"world", "svd_engine", "train_methods", "compose"}
# The benchmarks of what a base learns run on both embedded bases: the UNet (the default) and the flow transformer,
# whose sections are keyed `<key>_flow`.
ON_BOTH_BASES = ("world", "single_subject", "layer_groups", "multi_subject", "edit", "combine")
FLOW_ARGS = ["--base", "embedded:flow"]
# Cut-Mix-Unmix's full protocol trains each of its 6 runs under 3 training seeds: 18 runs of 800 steps, 45 minutes
# of the transformer on 2 cores. On the flow base one training seed of each, so that the report fits a working day.
FLOW_FULL_ARGS = {"multi_subject": ["--train_seeds", "1"]}


def world_fingerprint(base: str = "unet") -> str:
    """A hash of an embedded base's and the judge's weights: a record or a trained run is reused only on the world
    it was measured on."""
    from svdiff.world import BASE_DIRS, JUDGE_DIR

    h = hashlib.sha256()
    for folder in (BASE_DIRS[base], JUDGE_DIR):
        for f in sorted(folder.rglob("*.safetensors")):
            h.update(f.relative_to(folder.parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


def flow_base_shipped() -> bool:
    from svdiff.errors import SvdiffError
    from svdiff.world import default_base

    try:
        default_base("flow")
    except SvdiffError:
        return False
    return True


def sections(flow: bool) -> list[tuple]:
    """SECTIONS, with each benchmark of ON_BOTH_BASES again on the flow base when `flow`, right after its UNet
    run: (key, title, script, {mode: arguments}, base)."""
    out = []
    for key, title, script, modes in SECTIONS:
        if flow and key == "train_methods":
            modes = {mode: with_flow_arch(args) for mode, args in modes.items()}
        out.append((key, title, script, modes, "unet"))
        if flow and key in ON_BOTH_BASES:
            flow_modes = {mode: args + FLOW_ARGS for mode, args in modes.items()}
            flow_modes["full"] += FLOW_FULL_ARGS.get(key, [])
            out.append((f"{key}_flow", f"{title}, on the flow transformer", script, flow_modes, "flow"))
    return out


def with_flow_arch(args: list[str]) -> list[str]:
    """train_methods' arguments with the flow base timed beside the embedded UNet (`tiny`, first of --archs)."""
    if "--archs" not in args:
        return ["--archs", "tiny", "flow", "sd15", *args]
    i = args.index("--archs") + 2
    return [*args[:i], "flow", *args[i:]]


def run_section(key: str, script: str, args: list[str], out: Path, runs: Path, mode: str, world: str) -> dict:
    """Runs one benchmark into the report folder, or reuses the record of an earlier run of the same command on
    the same world (so an interrupted report resumes where it stopped)."""
    args = [a.format(out=out, runs=runs) for a in args]
    if key == "compose":
        args += ["--out-dir", str(out / "compose")]
        json_path = out / "compose" / "compose.json"
    else:
        json_path = out / f"{key}.json"
        args += ["--out", str(json_path)]
    command = " ".join(["python", f"benchmarks/{script}", *args])
    record_path = out / "records" / f"{key}.json"
    if record_path.is_file() and json_path.is_file():
        record = json.loads(record_path.read_text())
        if record["command"] == command and record.get("world") == world:
            print(f"[{key}] reusing the earlier run of: {command}", file=sys.stderr, flush=True)
            return record | {"result": json.loads(json_path.read_text())}
    print(f"[{key}] {command}", file=sys.stderr, flush=True)
    began = time.time()
    done = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.DEVNULL, cwd=HERE.parent)
    if done.returncode:
        raise SystemExit(f"benchmark {key} failed (exit {done.returncode}): {command}")
    record = {"command": command, "seconds": round(time.time() - began, 1), "mode": mode, "world": world}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record) + "\n")
    return record | {"result": json.loads(json_path.read_text())}


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            if 0 < abs(v) < 1e-3:
                return f"{v:.1e}"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(holds: bool, claim: str, detail: str) -> str:
    return f"**Paper's claim — {claim}: {'holds here' if holds else 'does not hold here'}** ({detail})."


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 2**30:.2f} GiB"


def render_world(r: dict) -> str:
    base, pairs = r["base_unseen_single_object"], r["base_left_right_pairs"]
    judge = r["judge_on_fresh_renders"]
    return "\n\n".join(
        [
            "Everything below runs on the embedded tiny base, so its limits bound every figure: what the judge reads "
            "and how well the base draws prompts it never saw.",
            table(
                ["", "shape", "color", "pattern", "place"],
                [
                    ["judge on fresh renders", judge["shape"], judge["color"], judge["pattern"], judge["position"]],
                    ["base, unseen single objects", base["shape"], base["color"], base["pattern"], base["position"]],
                ],
            ),
            f"Left/right pairs with both objects right: {pairs['both_correct']:.2f}. "
            + (
                f'Bare class prompts ("a photo of a heart", what prior preservation asks for) drawn as their '
                f"shape: {r['base_class_prompts']['shape']:.2f}. "
                if "base_class_prompts" in r
                else ""
            )
            + (
                "Prompts naming marks drawn with every named mark: {all_marks_correct:.2f} (outline {outline:.2f}, "
                "emblem {emblem:.2f}, emblem color {emblem_color:.2f}). ".format(**r["base_mark_prompts"])
                if "base_mark_prompts" in r
                else ""
            )
            + f"16 images, 25 steps: {r['sampling_16_images_25_ddim_steps_seconds']:.2f} s.",
        ]
    )


def render_both(sections: dict) -> str:
    """The headline figures of the benchmarks run on both bases, in two columns."""

    def pick(key: str, read) -> list:
        found = [sections.get(k) for k in (key, f"{key}_flow")]
        try:
            return [None if f is None else read(f["result"]) for f in found]
        except KeyError:
            return [None, None]

    def similarity(m):
        return lambda r: r["summary"][m]["subject_similarity"]

    rows = [
        ["world: unseen single objects, shape / color"]
        + pick("world", lambda r: "{shape:.2f} / {color:.2f}".format(**r["base_unseen_single_object"])),
        ["world: left/right pairs both right"] + pick("world", lambda r: r["base_left_right_pairs"]["both_correct"]),
        ["world: bare class prompts as their shape"] + pick("world", lambda r: r["base_class_prompts"]["shape"]),
        ["world: mark prompts, every mark drawn"]
        + pick("world", lambda r: r["base_mark_prompts"]["all_marks_correct"]),
        ["world: 16 images, 25 steps (s)"] + pick("world", lambda r: r["sampling_16_images_25_ddim_steps_seconds"]),
        *[[f"single subject: similarity, {m}"] + pick("single_subject", similarity(m)) for m in METHOD_ROWS],
        ["single subject: svdiff / full similarity"]
        + pick("single_subject", lambda r: similarity("svdiff")(r) / similarity("full")(r)),
        ["single subject: class drift, svdiff / full"]
        + pick(
            "single_subject",
            lambda r: "{:+.3f} / {:+.3f}".format(*(r["summary"][m]["class_drift"] for m in METHODS_TUNED)),
        ),
        ["single subject: file, svdiff / full"]
        + pick(
            "single_subject", lambda r: f"{mb(r['summary']['svdiff']['bytes'])} / {mb(r['summary']['full']['bytes'])}"
        ),
        ["single subject: full / svdiff file size"]
        + pick("single_subject", lambda r: f"{r['summary']['full']['bytes'] / r['summary']['svdiff']['bytes']:,.0f}×"),
        ["single subject: the text encoders' shifts alone, share of the gain"]
        + pick(
            "layer_groups",
            lambda r: next(x["recovered"] for g, x in r["results"].items() if g.startswith("text encoder")),
        ),
        ["training step (ms): svdiff / LoRA / full"] + [step_times(sections, arch) for arch in ("tiny", "flow")],
        ["Cut-Mix-Unmix: two hearts disentangled, gain (points)"]
        + pick("multi_subject", lambda r: f"{r['results']['same class']['cut_mix_gain_points']:+.1f}"),
        ["editing: success, svdiff / full (with inversion)"]
        + pick(
            "edit",
            lambda r: " / ".join(f"{r['results'][f'{m}, with inversion']['all']['success']}" for m in METHODS_TUNED),
        ),
        ["Eq. 5: svdiff interpolation span (monotone)"]
        + pick(
            "combine",
            lambda r: "{:+.3f} ({})".format(
                r["results"]["interpolate"]["svdiff"]["span"],
                "yes" if r["results"]["interpolate"]["svdiff"]["monotone"] else "no",
            ),
        ),
    ]
    return (
        "The same benchmarks, commands and judge on the two embedded bases: the UNet (Stable Diffusion) and the flow "
        "transformer (SD3's MMDiT). Each figure's section below gives its command and detail.\n\n"
        + table(["", "UNet base", "flow transformer"], rows)
    )


def step_times(sections: dict, arch: str) -> str | None:
    """One base's median training step per method, from the training-step section (5c)."""
    found = sections.get("train_methods")
    step = {x["method"]: x["step_seconds"] for x in found["result"]["results"] if x["arch"] == arch} if found else {}
    if not {"svdiff", "lora", "full"} <= step.keys():
        return None
    return " / ".join(f"{1000 * step[m]:.0f}" for m in ("svdiff", "lora", "full"))


METHOD_ROWS = ("base", "svdiff", "full", "lora")
METHODS_TUNED = ("svdiff", "full")


def render_storage(r: dict) -> str:
    rows = []
    for base, row in r["bases"].items():
        b32, b16 = row["bytes_fp32"], row["bytes_fp16"]
        rows.append(
            [
                base,
                mb(b16["svdiff_all"]),
                mb(b32["svdiff_all"]),
                mb(b16["svdiff_unet-ca-kv"]),
                mb(b16["lora_r4"]),
                mb(b16["lora_r16_every_linear"]),
                mb(b32["custom_diffusion_kv"]),
                mb(b32["full"]),
                f"{row['full_over_svdiff_fp32']:,}×",
            ]
        )
    text = [
        table(
            [
                "base",
                "svdiff all (fp16)",
                "svdiff all (fp32)",
                "svdiff unet-ca-kv (fp16)",
                "LoRA r4 attention (bf16)",
                "LoRA r16 every Linear (bf16)",
                "Custom Diffusion K/V (fp32)",
                "full denoiser + CLIP text encoders (fp32)",
                "full / svdiff (fp32)",
            ],
            rows,
        ),
        "svdiff sizes are real shift files (metadata included); the others are parameter count × bytes per value. "
        f"The paper: {r['paper']['svdiff_mb']} MB against {r['paper']['full_gb']} GB, ≈{r['paper']['ratio']:,}×; "
        f"Custom Diffusion {r['paper']['custom_diffusion_mb']} MB.",
    ]
    if "sd15" in r["bases"]:
        sd = r["bases"]["sd15"]
        ours = sd["bytes_fp32"]["svdiff_all"]
        text.append(
            verdict(
                ours < 2e6 and sd["full_over_svdiff_fp32"] > 2000,
                "≈1.7 MB per subject, ≈2,200× smaller than a full checkpoint on SD 1.x",
                f"SD 1.5: {mb(ours)} in fp32, {sd['full_over_svdiff_fp32']:,}× smaller",
            )
        )
    return "\n\n".join(text)


def render_single_subject(r: dict) -> str:
    s = r["summary"]
    methods = [m for m in ("base", "svdiff", "full", "lora") if m in s]
    rows = [
        [
            m,
            f"{s[m]['subject_similarity']} ± {s[m].get('subject_similarity_subject_std', 0)}"
            f" (seeds ± {s[m].get('subject_similarity_seed_std', 0)})",
            s[m]["prompt_accuracy"],
            s[m].get("class_drift"),
            s[m]["class_correct"],
            mb(s[m]["bytes"]) if "bytes" in s[m] else "–",
            s[m].get("train_minutes"),
        ]
        for m in methods
    ]
    text = [
        f"{len(r['subjects'])} subjects × {len(r['prompts'])} novel-context prompts × {r['seeds']} seeds, "
        f"{r['steps']} steps with prior preservation.",
        table(
            [
                "method",
                "subject similarity ± over subjects (over seeds)",
                "prompt accuracy",
                "class drift",
                "class prompts drawn as the class",
                "file",
                "train min",
            ],
            rows,
        ),
        f"![single subject]({Path(r['picture']).name})",
    ]
    if "svdiff" in s and "full" in s:
        sv, fu = s["svdiff"], s["full"]
        gains = {m: s[m]["subject_similarity"] - s["base"]["subject_similarity"] for m in methods if m != "base"}
        if max(gains.values()) < 0.05:
            text.append(
                "**Paper's claims on fidelity and language drift: not testable on this run** — no method moved far "
                "from the base (similarity gains over it: "
                + ", ".join(f"{m} {g:+.3f}" for m, g in gains.items())
                + ")."
            )
            return "\n\n".join(text)
        photos = sum(found["photos_similarity"] for found in r["subjects"].values()) / len(r["subjects"])
        text.append(
            "Similarity gained over the base: "
            + ", ".join(f"{m} {g:+.3f}" for m, g in gains.items())
            + f" (the bar: +0.3; a subject's photos are {photos:.3f} alike on average)."
        )
        text.append(
            verdict(
                sv["subject_similarity"] >= 0.9 * fu["subject_similarity"],
                "svdiff's subject fidelity is close to full fine-tuning's",
                f"similarity {sv['subject_similarity']:.3f} vs {fu['subject_similarity']:.3f}, "
                f"{sv['subject_similarity'] / fu['subject_similarity']:.2f}×; 'close' means at least 0.9×",
            )
        )
        text.append(
            verdict(
                sv["class_drift"] <= fu["class_drift"],
                "svdiff drifts less from the class than full fine-tuning",
                f"class prompts' rise in similarity to the subject {sv['class_drift']:+.3f} "
                f"vs {fu['class_drift']:+.3f}",
            )
        )
    return "\n\n".join(text)


def render_layer_groups(r: dict) -> str:
    rows = [[g, x["similarity"], x.get("recovered"), x.get("energy"), x.get("values")] for g, x in r["results"].items()]
    return "\n\n".join(
        [
            f"{len(r['subjects'])} subjects' svdiff files (section 2's) applied one group of layers at a time; "
            f"{len(r['prompts'])} novel-context prompts × {r['seeds']} seeds. *Recovered*: the share of the "
            "subject's similarity gain over the base that the group alone brings back; *energy*: its share of Σδ².",
            table(["layers", "similarity", "recovered", "energy", "values"], rows),
            f"![layer groups]({Path(r['picture']).name})",
        ]
    )


def render_multi_subject(r: dict) -> str:
    rows = []
    for pair, found in r["results"].items():
        for config, c in found["configs"].items():
            effect = f"{c['name effect']['left']:+.2f} / {c['name effect']['right']:+.2f}"
            seeds = c.get("disentangled by training seed")
            disentangled = f"{c['disentangled']:.2f}" + (f" ({', '.join(f'{d:.2f}' for d in seeds)})" if seeds else "")
            rows.append(
                [pair, config, c["present"], disentangled, c["blended"], c["stitched"], effect]
                + [c["identity separation"], found["identity_separation_of_photos"]]
            )
    headers = ["pair", "training", "both present", "disentangled (per training seed)", "blended", "stitched"]
    headers += ["name effect left / right", "identity separation", "(photos)"]
    text = [
        table(headers, rows),
        f"![multi-subject]({Path(r['picture']).name})",
    ]
    if "same class" in r["results"]:
        gain = r["results"]["same class"]["cut_mix_gain_points"]
        text.append(verdict(gain >= 20, "Cut-Mix-Unmix disentangles two subjects of one class", f"{gain:+.1f} points"))
    return "\n\n".join(text)


def render_edit(r: dict) -> str:
    rows = [
        [
            name,
            c["all"]["success"],
            c["non-structural (color, pattern)"]["kept"],
            c["structural (shape, place)"]["success"],
        ]
        for name, c in r["results"].items()
    ]
    text = [
        f"{r['scenes']} scenes, {r['fine_tune_steps']} fine-tuning steps each.",
        table(["method", "edit success", "attributes kept (color/pattern edits)", "shape/place edits"], rows),
        f"![edits]({Path(r['picture']).name})",
    ]
    sv = r["results"]["svdiff, with inversion"]["all"]["success"]
    fu = r["results"]["full, with inversion"]["all"]["success"]
    if sv is not None and fu is not None:
        text.append(
            verdict(sv >= fu, "svdiff edits a single image at least as well as full fine-tuning", f"{sv} vs {fu}")
        )
    return "\n\n".join(text)


def render_combine(r: dict) -> str:
    add, interp = r["results"]["add"], r["results"]["interpolate"]
    rows = [
        [
            m,
            add[m]["both_present"],
            add[m]["both_sides_own_subject"],
            " → ".join(f"{c['similarity_a_minus_b']:+.2f}" for c in interp[m]["curve"]),
            "yes" if interp[m]["monotone"] else "no",
        ]
        for m in add
    ]
    text = [
        table(
            ["method", "Eq. 4: both present", "Eq. 4: each side its subject", "Eq. 5: A − B, α = 0 … 1", "monotone"],
            rows,
        ),
        f"![combination]({Path(r['picture']).name})",
    ]
    if "svdiff" in interp:
        text.append(
            verdict(
                interp["svdiff"]["monotone"] and interp["svdiff"]["span"] > 0.05,
                "interpolating shifts moves the subject from B to A",
                f"similarity to A minus to B moves by {interp['svdiff']['span']:+.3f} from α = 0 to 1; "
                "holding needs a monotone climb of more than 0.05",
            )
        )
    mixes = r["results"].get("style_mix")
    if mixes:
        rows = [[k, m["appearance_color"], m["geometry_color"], m["similarity_a_minus_b"]] for k, m in mixes.items()]
        text.append(
            'Style mixing (A = heart_sks, B = heart_xyz trained as "sks heart"; `--style_mix geometry=… '
            "appearance=…`):\n\n"
            + table(["files", "appearance file's color", "geometry file's color", "A − B similarity"], rows)
        )
    return "\n\n".join(text)


def render_svd_engine(r: dict) -> str:
    sec, speed = r["seconds"], r["speedup_vs_naive"]
    rows = [
        ["per-layer torch.linalg.svd", sec["naive_torch_linalg_svd"], 1.0, r["max_reconstruction_error"]["naive"]],
        ["svdiff engine", sec["engine"], speed["engine"], r["max_reconstruction_error"]["engine"]],
        ["cache hit", sec["cache_hit"], speed["cache_hit"], None],
    ]
    return f"{r['matrices']} matrices ({r['timed']}).\n\n" + table(
        ["", "seconds", "speed-up", "worst reconstruction error"], rows
    )


def render_step_flops(r: dict) -> str:
    t = r["tflops_per_step"]
    return (
        table(
            ["", "TFLOPs per step", "× frozen base"],
            [
                ["frozen base", t["frozen_base"], 1.0],
                ["svdiff (float32 factors)", t["svdiff"], r["ratio_to_frozen"]["svdiff"]],
                ["svdiff (bf16 factors)", t["svdiff_bf16_factors"], r["ratio_to_frozen"]["svdiff_bf16_factors"]],
                ["svdiff merged once per step", t["svdiff_merged"], r["ratio_to_frozen"]["svdiff_merged"]],
                ["naive rebuild", t["naive_rebuild"], r["ratio_to_frozen"]["naive_rebuild"]],
            ],
        )
        + "\n\nAten ops per step: "
        + ", ".join(f"{k} {v}" for k, v in r["aten_ops_per_step"].items())
        + "."
    )


def render_train_methods(r: dict) -> str:
    rows = [
        [x["arch"], x["method"], x["step_seconds"], x["peak_rss_mb"], x.get("trained_parameters")] for x in r["results"]
    ]
    ratios = ", ".join(f"{k} {v}" for k, v in r["ratios"].items())
    return (
        table(["model", "method", "s / step", "peak memory (MB)", "trained parameters"], rows)
        + f"\n\nRatios: {ratios}."
    )


def render_compose(r: dict) -> str:
    return (
        table(
            ["", "value"],
            [
                ["sampling, fused / base", r["fused_over_base"]],
                ["load + fuse (s)", r["load_and_fuse_seconds"]],
                *[[f"LoRA export error at rank {k}", v] for k, v in r["export_relative_error_by_rank"].items()],
            ],
        )
        + "\n\n![export error](compose/export_error.png)"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer subjects, seeds and steps")
    mode.add_argument("--smoke", action="store_true", help="a few steps of everything: checks the pipeline runs")
    p.add_argument("--out", type=Path, default=Path("docs/results/report"))
    p.add_argument(
        "--runs", type=Path, default=None, help="trained runs (default: runs/bench[-quick|-smoke]/<world's hash>)"
    )
    p.add_argument("--only", nargs="+", default=None, choices=[s[0] for s in SECTIONS], help="run only these")
    args = p.parse_args()
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    flow = flow_base_shipped()
    worlds = {base: world_fingerprint(base) for base in (("unet", "flow") if flow else ("unet",))}
    folder = Path("runs") / ("bench" if mode == "full" else f"bench-{mode}")
    runs = {base: args.runs or folder / world for base, world in worlds.items()}
    if args.runs and flow:
        runs["flow"] = args.runs / "flow"
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from common import machine

    results = {"mode": mode, "world": worlds, "machine": machine() | {"cpu_model": cpu_name()}, "sections": {}}
    doc = [
        f"# svdiff evidence report ({mode} run)",
        f"Machine: {cpu_name()}, {results['machine']['cpu_count']} cores, torch {torch.__version__}, no GPU. "
        f"Made by `python benchmarks/report.py{'' if mode == 'full' else ' --' + mode}`; every section names the "
        "command that measured it, and its JSON is beside this file.",
    ]
    if mode != "full":
        doc.append(f"**A {mode} run: its figures come from few samples and short training, not the full protocol.**")
    every = sections(flow)
    chosen = [s for s in every if not args.only or s[0].removesuffix("_flow") in args.only]
    # The timings first, while the machine is least likely to be busy with anything else; then the training runs.
    for key, _, script, modes, base in sorted(chosen, key=lambda s: s[0].removesuffix("_flow") not in TIMINGS):
        results["sections"][key] = run_section(key, script, modes[mode], args.out, runs[base], mode, worlds[base])
    if flow and {"single_subject", "single_subject_flow"} <= results["sections"].keys():
        doc += ["## Both bases side by side", render_both(results["sections"])]
    for key, title, _, _, _ in chosen:
        record = results["sections"][key]
        render = globals()[f"render_{key.removesuffix('_flow')}"]
        doc += [f"## {title}", f"`{record['command']}` ({record['seconds'] / 60:.1f} min)", render(record["result"])]
    left_out = [title for key, title, _, _, _ in every if key not in results["sections"]]
    if left_out:
        doc.append("Not in this report (run without `--only` to add them): " + "; ".join(left_out) + ".")
    if not flow:
        doc.append("The flow base is not in this package, so its sections are left out.")
    results["minutes"] = round(sum(r["seconds"] for r in results["sections"].values()) / 60, 1)
    doc.append(f"Total: {results['minutes']} min of benchmarks.")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text("\n\n".join(doc) + "\n")
    print(f"wrote {args.out / 'report.md'} in {results['minutes']} min")


if __name__ == "__main__":
    main()

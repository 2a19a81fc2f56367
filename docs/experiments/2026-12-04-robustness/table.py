"""Robustness table: run each bad input against a source tree; record exit code, last stderr line, a note.

usage: python table.py SRC_DIR OUT.json [case ...]
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(sys.argv[1]).resolve()
OUT = Path(sys.argv[2])
ONLY = sys.argv[3:]
REPO = Path(__file__).resolve().parents[3]
PY = sys.executable  # the checkout's .venv python, as run: .venv/bin/python docs/experiments/…/table.py
SUBJ = str(REPO / "examples/subjects/heart_sks")
OTHER = str(REPO / "examples/subjects/heart_xyz")
WORK = Path(tempfile.gettempdir()) / "rb" / ("work-" + SRC.parent.name + os.environ.get("TABLE_TAG", ""))
shutil.rmtree(WORK, ignore_errors=True)
WORK.mkdir(parents=True)
CACHE = WORK / "cache"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC), SVDIFF_CACHE=str(CACHE))
T = [
    "--instance_data_dir",
    SUBJ,
    "--instance_prompt",
    "a photo of sks heart",
    "--max_train_steps",
    "2",
    "--report_to",
    "none",
    "--no-progress",
    "--num_validation_images",
    "1",
    "--validation_inference_steps",
    "2",
    "--validation_steps",
    "0",
]


def sv(*args):
    return [PY, "-m", "svdiff", *args]


def run(cmd, cwd, env=None, timeout=600, shell=False):
    t = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout, shell=shell)
    lines = [line for line in p.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return p.returncode, (lines[-1] if lines else ""), len(lines), round(time.time() - t, 1), p


_prep = {}


def prep():
    """A finished 3-step run with checkpoint-2 (and the shift file A)."""
    if "d" not in _prep:
        d = WORK / "prep"
        d.mkdir()
        run(sv("train", *T, "--max_train_steps", "3", "--checkpointing_steps", "2", "--output_dir", "run"), d)
        _prep["d"] = d / "run"
    return _prep["d"]


def fresh(name):
    d = WORK / name
    d.mkdir()
    return d


CASES = {}


def case(name):
    def wrap(f):
        CASES[name] = f
        return f

    return wrap


def simple(name, args, setup=None, note=None):
    def f(d):
        if setup:
            setup(d)
        r = run(sv(*args(d) if callable(args) else args), d)
        return r, (note(d) if note else "")

    CASES[name] = f


def readme(d):
    (d / "README.md").write_text("mine\n")


def readme_note(d):
    return "README.md " + ("kept" if (d / "README.md").read_text() == "mine\n" else "REPLACED by the model card")


simple("1 --output_dir ''", [*("train", *T), "--output_dir", ""], readme, readme_note)
simple("1 --output_dir .", [*("train", *T), "--output_dir", "."], readme, readme_note)


def photos(d):
    shutil.copytree(SUBJ, d / "photos")


simple(
    "1 --output_dir = instance folder",
    ["train", *T, "--instance_data_dir", "photos", "--output_dir", "photos"],
    photos,
    lambda d: f"photos/ now holds {sorted(p.name for p in (d / 'photos').iterdir())}",
)
simple(
    "1 --output_dir inside instance folder",
    ["train", *T, "--instance_data_dir", "photos", "--output_dir", "photos/out"],
    photos,
    lambda d: f"photos/out exists: {(d / 'photos' / 'out').exists()}",
)


def foreign(d):
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")


simple(
    "1 --output_dir holding a file svdiff did not write",
    ["train", *T, "--output_dir", "out"],
    foreign,
    lambda d: f"files: {sorted(p.name for p in (d / 'out').iterdir())}",
)

KILL_AT_RENAME = """
import os, sys, pathlib
orig = pathlib.Path.rename
def rename(self, target):
    if pathlib.Path(target).name == "checkpoint-2":
        os._exit(137)  # killed between writing checkpoint-2 and renaming it into place
    return orig(self, target)
pathlib.Path.rename = rename
import os as _os
_real = _os.replace
def replace(src, dst, *a, **k):
    if pathlib.Path(dst).name == "checkpoint-2":
        os._exit(137)
    return _real(src, dst, *a, **k)
_os.replace = replace
from svdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


@case("2 kill during save with --checkpoints_total_limit 1")
def _(d):
    args = [
        "train",
        *T,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "1",
        "--output_dir",
        "out",
    ]
    r = run([PY, "-c", KILL_AT_RENAME, *args], d)
    left = sorted(p.name for p in (d / "out").glob("checkpoint-*"))
    r2 = run(sv(*args[:-2], "--output_dir", "out", "--resume_from_checkpoint", "latest"), d)
    resumed = [
        line
        for line in r2[4].stdout.splitlines() + r2[4].stderr.splitlines()
        if "resum" in line or "no checkpoint" in line
    ]
    return r, f"checkpoints left: {left}; resume says: {resumed[:1]}"


def mount(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def umount(path):
    subprocess.run(["umount", str(path)], check=False)


@case("3 full SVD cache (train)")
def _(d):
    mount(d / "c", "64k")
    try:
        r = run(
            sv("train", *T, "--max_train_steps", "1", "--output_dir", "out"), d, dict(ENV, SVDIFF_CACHE=str(d / "c"))
        )
    finally:
        umount(d / "c")
    return r, f"{r[4].stderr.count('cannot write the SVD cache')} cache warning(s)"


@case("3 full SVD cache (generate)")
def _(d):
    a = prep() / "svdiff_weights.safetensors"
    mount(d / "c", "64k")
    try:
        r = run(
            sv(
                "generate",
                "--shifts",
                str(a),
                "--prompt",
                "a photo of sks heart",
                "--num_images",
                "1",
                "--num_inference_steps",
                "2",
            ),
            d,
            dict(ENV, SVDIFF_CACHE=str(d / "c")),
        )
    finally:
        umount(d / "c")
    return r, ""


@case("3 disk full during a checkpoint")
def _(d):
    mount(d / "out", "150k")
    try:
        r = run(sv("train", *T, "--checkpointing_steps", "1", "--output_dir", "out"), d)
        left = sorted(p.name for p in (d / "out").iterdir())
    finally:
        umount(d / "out")
    return r, f"left in out/: {left}"


@case("3 read-only cache with one truncated entry")
def _(d):
    prep()
    mount(d / "c", "50m")
    try:
        shutil.copytree(CACHE, d / "c", dirs_exist_ok=True)
        entry = sorted((d / "c").glob("*/*.safetensors"))[0]
        entry.write_bytes(entry.read_bytes()[:100])
        subprocess.run(["mount", "-o", "remount,ro", str(d / "c")], check=True)
        r = run(
            sv("train", *T, "--max_train_steps", "1", "--output_dir", "out"), d, dict(ENV, SVDIFF_CACHE=str(d / "c"))
        )
    finally:
        umount(d / "c")
    return r, ""


@case("4 two trainings into one folder")
def _(d):
    args = sv("train", *T, "--max_train_steps", "4", "--output_dir", "out")
    a = subprocess.Popen(args, cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    rb = run(args, d)
    _, ea = a.communicate()
    la = [x for x in ea.replace("\r", "\n").splitlines() if x.strip()]
    return rb, f"first run exit {a.returncode} ({la[-1] if la else ''}); second run above"


def resumed(d, *extra):
    shutil.copytree(prep(), d / "run")
    (d / "run" / "svdiff_weights.safetensors").unlink()
    return run(
        sv(
            "train",
            *T,
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            "run",
            "--resume_from_checkpoint",
            "latest",
            *extra,
        ),
        d,
    )


def meta(d):
    try:
        s = json.loads((d / "run" / "train_summary.json").read_text())
        return f"summary steps {s['steps']}, steps_this_run {s['steps_this_run']}"
    except OSError:
        return "no summary"


@case("5 resume with a new --learning_rate")
def _(d):
    r = resumed(d, "--learning_rate", "0.5")
    card = (d / "run" / "README.md").read_text() if (d / "run" / "README.md").exists() else ""
    return r, "card claims lr 0.5" if "| learning rate | 0.5" in card else ""


@case("5 resume with other photos, same prompt")
def _(d):
    return resumed(d, "--instance_data_dir", OTHER), ""


@case("5 resume a step-2 checkpoint with --max_train_steps 1")
def _(d):
    r = resumed(d, "--max_train_steps", "1")
    return r, meta(d)


@case("6 SIGINT during a default run")
def _(d):
    args = sv(
        "train",
        *T[:4],
        "--report_to",
        "none",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "2",
        "--validation_steps",
        "0",
        "--output_dir",
        "out",
    )
    # SIGINT as a terminal's Ctrl-C finds it: a background harness would pass on an ignored SIGINT
    p = subprocess.Popen(
        args,
        cwd=d,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    buf = ""
    deadline = time.time() + 300
    fd = p.stderr.fileno()
    os.set_blocking(fd, False)
    while time.time() < deadline and p.poll() is None:
        try:
            buf += os.read(fd, 65536).decode(errors="replace")
        except BlockingIOError:
            pass
        if (d / "out").is_dir() and not hasattr(p, "seen"):
            p.seen = time.time()  # the run got past its checks; training starts after loading and the SVDs
        if getattr(p, "seen", None) and time.time() - p.seen > 25:
            break
        time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    os.set_blocking(fd, True)
    rest = p.communicate()[1].decode(errors="replace")
    lines = [x for x in (buf + (rest or "")).replace("\r", "\n").splitlines() if x.strip()]
    left = sorted(x.name for x in (d / "out").iterdir()) if (d / "out").exists() else []
    return (p.returncode, lines[-1] if lines else "", len(lines), 0, None), f"left in out/: {left}"


for flag, value in [
    ("--learning_rate", "-1e-3"),
    ("--snr_gamma", "-1"),
    ("--max_grad_norm", "nan"),
    ("--adam_beta1", "2"),
    ("--adam_epsilon", "-1"),
    ("--adam_weight_decay", "-1"),
    ("--validation_inference_steps", "100000"),
    ("--seed", "99999999999999999999"),
    ("--resolution", "12"),
    ("--resolution", "68"),
]:
    simple(
        f"7/8 train {flag}={value}",
        ["train", *T, f"{flag}={value}", "--output_dir", "out"],
        note=lambda d: f"shift file written: {(d / 'out' / 'svdiff_weights.safetensors').exists()}",
    )
simple(
    "8 train --lr_scheduler polynomial --lr_power -3",
    ["train", *T, "--lr_scheduler", "polynomial", "--lr_power=-3", "--output_dir", "out"],
)


@case("8 train --resolution 100000 (under ulimit -v 8 GB)")
def _(d):
    cmd = "ulimit -v 8000000; " + " ".join(map(repr, sv("train", *T, "--resolution", "100000", "--output_dir", "out")))
    return run(cmd, d, shell=True), ""


def gen(*extra):
    return lambda d: [
        "generate",
        "--prompt",
        "a photo of sks heart",
        "--num_images",
        "1",
        "--num_inference_steps",
        "2",
        *extra,
    ]


A = lambda: str(prep() / "svdiff_weights.safetensors")  # noqa: E731


@case("7 merge A A --weights 1e6 1, then generate")
def _(d):
    r = run(sv("merge", A(), A(), "--weights", "1e6", "1", "-o", "m.safetensors"), d)
    if r[0] != 0:
        return r, "merge refused"
    r2 = run(sv(*gen("--shifts", "m.safetensors")(d)), d)
    return r2, f"merge exit {r[0]}; then generate (above)"


for spec in (":nan", ":1e9"):
    CASES[f"7 generate --shifts F{spec}"] = (lambda spec: lambda d: (run(sv(*gen("--shifts", A() + spec)(d)), d), ""))(
        spec
    )
CASES["7 generate --eta=-5"] = lambda d: (run(sv(*gen("--eta=-5")(d)), d), "")
CASES["7 generate --num_inference_steps=-3"] = lambda d: (run(sv(*gen()(d)[:-2], "--num_inference_steps=-3"), d), "")
CASES["8 generate --num_inference_steps 0"] = lambda d: (run(sv(*gen()(d)[:-2], "--num_inference_steps", "0"), d), "")
CASES["7 merge --alpha 0.3 without --interpolate"] = lambda d: (
    run(sv("merge", A(), A(), "--alpha", "0.3", "-o", "m.safetensors"), d),
    "",
)

BIG = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import svdiff.format
from svdiff.format import read_shift_file, save_shift_file
f = read_shift_file(sys.argv[2])
svdiff.format.check_shift_bound = lambda tensors: None  # written as a foreign tool would, past the writer's bound
t = {k: torch.full_like(v.float(), 60000.0) * (1 if i % 2 else -1) for i, (k, v) in enumerate(f.tensors.items())}
m = f.metadata
save_shift_file("big.safetensors", t, base_model=m["base_model"], fingerprint=m["fingerprint"], preset=m["preset"])
"""


@case("7 shift file with finite values ±60000 (generate)")
def _(d):
    subprocess.run([PY, "-c", BIG, str(SRC), A()], cwd=d, env=ENV, check=True, capture_output=True)
    return run(sv(*gen("--shifts", "big.safetensors")(d)), d), ""


def bomb(d):
    shutil.copytree(SUBJ, d / "photos")
    from PIL import Image

    Image.new("1", (15000, 15000)).save(d / "photos" / "zz-bomb.png")


simple(
    "8 decompression bomb in the instance folder",
    ["train", *T, "--instance_data_dir", "photos", "--output_dir", "out"],
    bomb,
)

EDIT = [
    "edit",
    "--image",
    SUBJ + "/00.png",
    "--source_prompt",
    "a photo of a heart",
    "--target_prompt",
    "a photo of a star",
    "--max_train_steps",
    "1",
]
CASES["8 edit --num_inference_steps 0"] = lambda d: (run(sv(*EDIT, "--num_inference_steps", "0"), d), "")
CASES["8 edit --output noext"] = lambda d: (run(sv(*EDIT, "--num_inference_steps", "2", "--output", "noext"), d), "")
CASES["8 inspect --plot dir/.png"] = lambda d: (run(sv("inspect", A(), "--plot", "dir/.png"), d), "")


def deep(d):
    (d / "c.json").write_text("[" * 100000 + "]" * 100000)


simple("8 100k-deep --concepts_list JSON", ["train", *T[4:], "--concepts_list", "c.json", "--output_dir", "out"], deep)


def corrupt(how):
    def f(d):
        shutil.copytree(prep(), d / "run")
        ck = d / "run" / "checkpoint-2"
        if how == "truncated":
            (ck / "trained.safetensors").write_bytes((ck / "trained.safetensors").read_bytes()[:50])
        else:
            s = json.loads((ck / "state.json").read_text())
            s["step"] = "x"
            (ck / "state.json").write_text(json.dumps(s))
        return run(
            sv("train", *T, "--max_train_steps", "3", "--output_dir", "run", "--resume_from_checkpoint", "latest"), d
        ), ""

    return f


CASES["8 resume a truncated checkpoint"] = corrupt("truncated")
CASES['8 resume a checkpoint with "step": "x"'] = corrupt("step")


@case("8 argparse error (train --max_train_steps x)")
def _(d):
    r = run(sv("train", "--max_train_steps", "x"), d)
    return r, f"{r[2]} stderr lines"


@case("9 prompt with front matter, HTML and $(...)")
def _(d):
    prompt = "a photo of sks heart\n---\ninjected: true\n---\n<script>alert(1)</script> $(touch PWNED)"
    r = run(sv("train", *T[:2], "--instance_prompt", prompt, *T[4:], "--output_dir", "out"), d)
    card = (d / "out" / "README.md").read_text() if (d / "out" / "README.md").exists() else ""
    import re

    import yaml

    _, front, body = card.split("---\n", 2)
    notes = []
    if "injected" in (yaml.safe_load(front) or {}):
        notes.append("front matter injected")
    if "<script>" in re.sub(r"(`{3,})[^\n]*\n.*?\n\1\n", "", body, flags=re.S):
        notes.append("raw HTML in the card")
    line = next((x for x in card.splitlines() if x.startswith("svdiff generate")), "")
    if line:
        import shlex

        try:
            words = shlex.split(line)
            notes.append(
                "pasted command stays one prompt"
                if "$(touch PWNED)" in " ".join(words)
                and not subprocess.run(
                    ["bash", "-c", "echo " + line.split("--prompt", 1)[1]], cwd=d, capture_output=True
                ).returncode
                and not (d / "PWNED").exists()
                else "pasting the command RUNS $(...)"
            )
        except ValueError:
            notes.append("pasted command does not parse")
    return r, "; ".join(notes)


ROLL = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from pathlib import Path
from svdiff.spectral.cache import SVDCache
e = sorted(Path(sys.argv[2]).glob("*/*.safetensors"))
p = max(e, key=lambda p: p.stat().st_size)
t = load_file(p)
with safe_open(p, "pt") as f:
    meta = f.metadata()
m = {"U": t["U"].roll(1, dims=1), "S": t["S"].roll(1), "Vh": t["Vh"].roll(1, dims=0)}
save_file(m, p, metadata=meta)
key = meta["key"]
W = (t["U"] * t["S"]) @ t["Vh"]
b = SVDCache(Path(sys.argv[2])).get(key, W)
print("rolled entry accepted" if b is not None else "rolled entry refused")
"""


@case("10 cache entry with U/S/Vh rolled by one")
def _(d):
    prep()
    shutil.copytree(CACHE, d / "c")
    p = subprocess.run([PY, "-c", ROLL, str(SRC), str(d / "c")], cwd=d, env=ENV, capture_output=True, text=True)
    return (p.returncode, (p.stderr.strip().splitlines() or [""])[-1], 0, 0, p), p.stdout.strip()


FP = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from svdiff.models import load_components
from svdiff.spectral import find_targets, fingerprint
from svdiff.format import fingerprint_mismatch
unet = load_components(None)["unet"]
before = fingerprint(unet)
mats = [t for t in find_targets(unet) if t.module.weight.ndim >= 2]
step = max(1, len(mats) // 16)
probed = {t.name for t in mats[::step][:16]}
changed = 0
with torch.no_grad():
    for t in mats:
        if t.name not in probed:
            t.module.weight.mul_(-1.5); changed += 1
m = fingerprint_mismatch({"unet": before}, {"unet": fingerprint(unet)})
print(f"{changed} of {len(mats)} matrices replaced:", "accepted as the same base" if m is None else "refused: " + m)
"""


@case("10 base with all unprobed matrices replaced")
def _(d):
    p = subprocess.run([PY, "-c", FP, str(SRC)], cwd=d, env=ENV, capture_output=True, text=True)
    return (p.returncode, (p.stderr.strip().splitlines() or [""])[-1], 0, 0, p), p.stdout.strip()


def escape(d):
    (d / "sub").mkdir()
    (d / "sub" / "c.json").write_text(
        json.dumps(
            [
                {
                    "instance_prompt": "a photo of sks heart",
                    "instance_data_dir": SUBJ,
                    "class_prompt": "a photo of a heart",
                    "class_data_dir": "../../escaped-class",
                }
            ]
        )
    )


simple(
    "11 concepts list with class_data_dir ../../…",
    [
        "train",
        *T[4:],
        "--concepts_list",
        "sub/c.json",
        "--with_prior_preservation",
        "--num_class_images",
        "1",
        "--output_dir",
        "out",
    ],
    lambda d: escape(d),
    lambda d: f"escaped folder written: {(d.parent.parent / 'escaped-class').exists()}",
)
simple(
    "11 class folder = instance folder",
    [
        "train",
        *T[:2],
        "--instance_data_dir",
        "photos",
        *T[2:],
        "--with_prior_preservation",
        "--class_data_dir",
        "photos",
        "--class_prompt",
        "a photo of a heart",
        "--num_class_images",
        "6",
        "--output_dir",
        "out",
    ],
    photos,
    lambda d: f"photos/ holds {len(list((d / 'photos').iterdir()))} files (5 before)",
)


def afile(d):
    (d / "f.png").write_bytes(b"x")


simple(
    "11 a file as --instance_data_dir",
    ["train", *T[:0], "--instance_data_dir", "f.png", *T[2:], "--output_dir", "o"],
    afile,
)
simple("11 edit an unreadable image", ["edit", "--image", "f.png", *EDIT[3:]], afile)


def loop(d):
    os.symlink("b", d / "a")
    os.symlink("a", d / "b")


simple(
    "11 symlink loop as --instance_data_dir", ["train", "--instance_data_dir", "a", *T[2:], "--output_dir", "o"], loop
)

results = []
for name, f in CASES.items():
    if ONLY and not any(o in name for o in ONLY):
        continue
    d = fresh(f"c{len(results):02d}")
    try:
        (rc, last, nlines, secs, _), note = f(d)
    except Exception as e:  # the harness itself
        rc, last, nlines, secs, note = "harness", repr(e)[:200], 0, 0, ""
    # files changed outside the case folder? (checked by the escape case's note)
    row = {"case": name, "exit": rc, "last_stderr": last[:200], "note": note}
    print(json.dumps(row), flush=True)
    results.append(row)
OUT.write_text(json.dumps(results, indent=1))

"""`svdiff ui` for real: the app is started on a free localhost port and driven in headless Chromium (Debian's
`chromium`, through Playwright) — a subject uploaded and trained, two shift files generated at two slider
positions, a merge, a LoRA exported and downloaded, a path outside the workspace refused, bad input answered in
the page — with a screenshot of each tab. Without Chromium or the `ui` extra the browser tests skip; the
workspace and command-line checks below them need neither."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from svdiff.cli import build_parser, main
from svdiff.errors import SvdiffError
from svdiff.ui import actions
from svdiff.ui.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "examples" / "subjects" / "heart_sks"
CHROMIUM = Path("/usr/bin/chromium")
RUN = "runs/heart/svdiff_weights.safetensors"
# What an element shows: its text and the values of its fields (a textarea's value is not its text)
SHOWN = """window._shown = (id) => {
    const el = document.getElementById(id);
    if (!el) return "";
    return [el.innerText, ...[...el.querySelectorAll("textarea, input")].map((e) => e.value)].join(" ");
};"""


def _missing() -> str | None:
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            return f"the ui extra is not installed ({module}): pip install -e '.[ui]'"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


browser_only = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`svdiff ui` in its own process; yields (url, workspace folder)."""
    workspace = tmp_path_factory.mktemp("ui") / "workspace"
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = (workspace.parent / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "svdiff", "ui", "--workspace", str(workspace), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail("the app did not start: " + (workspace.parent / "server.log").read_text()[-2000:])
            time.sleep(1)
    yield url, workspace
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield _open(browser, *server)
        browser.close()


def _open(browser, url: str, workspace: Path):
    """The app in a new browser context (no cookies or storage shared with another)."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True).new_page()
    page.set_default_timeout(60_000)
    page.failure_picture = workspace.parent / "failure.png"
    page.add_init_script(SHOWN)
    page.goto(url)
    page.wait_for_selector("#train_start")
    return page


def _fill(page, elem_id: str, text) -> None:
    box = page.locator(f"#{elem_id}").locator("textarea, input").first
    box.fill(str(text))
    box.press("Tab")  # Gradio sends a field's value when it loses focus


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.locator("ul[role=listbox] li", has_text=option).first.click()


def _tab(page, name: str) -> None:
    page.click(f"#tab_{name}-button")
    page.wait_for_selector(f"#tab_{name}", state="visible")


def _says(page, elem_id: str, text: str, timeout: float = 60_000) -> None:
    """Waits until the element's text, or the value of a field in it, contains `text`."""
    from playwright.sync_api import TimeoutError as Timeout

    try:
        page.wait_for_function("([id, text]) => _shown(id).includes(text)", arg=[elem_id, text], timeout=timeout)
    except Timeout:
        shown = page.evaluate("(id) => _shown(id)", elem_id)
        page.screenshot(path=str(page.failure_picture), full_page=True)
        raise AssertionError(f"#{elem_id} shows {shown!r}, not {text!r} (page: {page.failure_picture})") from None


def _image_bytes(page, elem_id: str) -> bytes:
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    return page.request.get(src).body()


def _screenshot(page, tmp_path, name: str) -> Path:
    path = tmp_path / f"ui_{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 100, f"the {name} page looks blank ({len(colors or [])} colors)"
    return path


@pytest.mark.slow
@browser_only
def test_train_generate_merge_export_in_the_browser(page, server, tmp_path):
    url, workspace = server
    # Train: the example subject's photos uploaded, 20 steps, the grid and the loss chart only at the end
    page.set_input_files("#train_photos input[type=file]", sorted(str(p) for p in SUBJECT.glob("*.png")))
    page.locator("#train_photos", has_text="03").wait_for()
    _fill(page, "train_identifier", "sks")
    _fill(page, "train_class", "heart")
    _says(page, "train_prompts", "a photo of sks heart")
    page.click("#train_add")
    _says(page, "train_message", "added subject sks-heart")
    assert len(list((workspace / "subjects" / "sks-heart").glob("*.png"))) == 4
    _fill(page, "train_run", "heart")
    _fill(page, "train_steps", 20)
    page.get_by_text("validation, checkpoints, optimizer").click()
    _fill(page, "train_val_steps", 0)
    _fill(page, "train_val_images", 1)
    _fill(page, "train_val_inference", 2)
    _fill(page, "train_checkpoints", 10)
    page.click("#train_start")
    _says(page, "train_message", "queued")
    _says(page, "train_progress", "step 20 / 20", timeout=420_000)
    _says(page, "train_progress", "done", timeout=120_000)
    page.locator("#train_grid img").wait_for()
    page.locator("#train_loss img").wait_for()
    _says(page, "train_command", "svdiff train")
    assert (workspace / RUN).is_file()
    _screenshot(page, tmp_path, "train")

    # Files: the run's file listed; merged at weight -1 into a second file; exported to a LoRA and downloaded
    _tab(page, "files")
    _says(page, "files_table", RUN)
    page.locator("#merge_files label", has_text=RUN).click()
    _fill(page, "merge_weights", "-1")
    _fill(page, "merge_name", "negated")
    page.click("#merge_run")
    _says(page, "files_message", "wrote merged/negated.safetensors")
    _says(page, "files_table", "merged/negated.safetensors")
    _choose(page, "files_inspect", RUN)
    page.click("#files_inspect_run")
    _says(page, "files_summary", "largest shifts")
    page.locator("#files_blocks img").wait_for()
    _choose(page, "export_file", RUN)
    _fill(page, "export_name", "heart-lora")
    page.click("#export_run")
    _says(page, "export_report", "relative error")
    with page.expect_download() as download:
        page.click("#export_download")
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    from safetensors.torch import load_file

    assert any("lora" in key for key in load_file(saved))
    # a path outside the workspace is refused in the page and nothing is written there
    _fill(page, "export_name", "../outside")
    page.click("#export_run")
    _says(page, "files_message", "outside the workspace")
    assert not (workspace.parent / "outside.safetensors").exists()
    assert page.request.get(url + "gradio_api/file=/etc/passwd").status == 403  # the server serves the workspace only
    _screenshot(page, tmp_path, "files")

    # Generate: the run's file at 1 with its negation at 0, then at 1 (they cancel: the base); the grids differ
    _tab(page, "generate")
    _fill(page, "gen_prompt", "a photo of sks heart")
    _choose(page, "gen_file_0", RUN)
    _choose(page, "gen_file_1", "merged/negated.safetensors")
    _fill(page, "gen_scale_1", 0)
    _fill(page, "gen_images", 2)
    _fill(page, "gen_steps", 3)
    page.click("#gen_run")
    _says(page, "gen_command", "negated.safetensors:0 ")
    first = _image_bytes(page, "gen_grid")
    _fill(page, "gen_scale_1", 1)
    page.click("#gen_run")
    _says(page, "gen_command", "negated.safetensors:1 ")
    second = _image_bytes(page, "gen_grid")
    assert first != second
    _screenshot(page, tmp_path, "generate")

    # Edit: no image given is answered in the page
    _tab(page, "edit")
    page.click("#edit_run")
    _says(page, "edit_message", "upload the image to edit")
    _screenshot(page, tmp_path, "edit")
    if os.environ.get("SVDIFF_UI_SCREENSHOTS"):  # how docs/pictures/ui_*.png are made
        for shot in tmp_path.glob("ui_*.png"):
            shutil.copy(shot, os.environ["SVDIFF_UI_SCREENSHOTS"])


@pytest.mark.slow
@browser_only
def test_a_closed_page_that_comes_back_sees_its_job(page, server):
    """The queue lives in the workspace: a new page (another browser) shows the job the first one started."""
    other = _open(page.context.browser, *server)
    _says(other, "train_progress", "job 0001")
    _says(other, "train_jobs", "runs/heart")
    _says(other, "train_subjects", "sks-heart")  # added after the server started
    other.context.close()


# --- without a browser ---


def test_paths_outside_the_workspace_are_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (ws.root / "link").symlink_to(tmp_path)
    for text in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "link/secret.safetensors", "/etc"):
        with pytest.raises(SvdiffError, match="outside the workspace"):
            ws.path(text)
    assert ws.path("runs/a") == ws.root / "runs" / "a"
    with pytest.raises(SvdiffError, match="outside the workspace"):
        actions.export(ws, "../secret.safetensors", "lora")
    with pytest.raises(SvdiffError, match="outside the workspace"):
        ws.new_file("exports", "../../x", ".safetensors")


def test_uploads_are_limited_and_checked(tmp_path):
    ws = Workspace(tmp_path / "ws")
    photos = sorted(SUBJECT.glob("*.png"))
    with pytest.raises(SvdiffError, match="at most 20"):
        ws.save_images("many", photos * 6)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(SvdiffError, match="cannot read image"):
        ws.save_images("bad", [photos[0], text])
    assert not (ws.root / "subjects" / "bad").exists()
    with pytest.raises(SvdiffError, match="letters, digits"):
        ws.save_images("../up", photos)
    name = actions.add_subject(ws, "sks", "heart", photos)
    assert ws.subjects() == [name] == ["sks-heart"]


def test_train_flags_are_the_commands_flags(tmp_path):
    """One subject: --instance_data_dir; two: a concepts list; only changed settings appear; all parse."""
    ws = Workspace(tmp_path / "ws")
    photos = sorted(SUBJECT.glob("*.png"))
    actions.add_subject(ws, "sks", "heart", photos)
    actions.add_subject(ws, "xyz", "heart", photos)
    flags, out = actions.train_flags(ws, ["sks-heart"], "one", max_train_steps=20, preset="all", seed=0)
    assert out == "runs/one" and "--preset" not in flags and flags[-2:] == ["--output_dir", "runs/one"]
    args = build_parser().parse_args(["train", *flags])
    assert (args.instance_prompt, args.max_train_steps) == ("a photo of sks heart", 20)
    flags, _ = actions.train_flags(ws, ["sks-heart", "xyz-heart"], "two", with_prior_preservation=True)
    args = build_parser().parse_args(["train", *flags])
    concepts = (ws.root / args.concepts_list).read_text()
    assert "a photo of xyz heart" in concepts and "class-images/heart" in concepts and args.with_prior_preservation
    with pytest.raises(SvdiffError, match="at least one subject"):
        actions.train_flags(ws, [], "none")


def test_generate_shows_the_command_that_draws_the_same_grid(tmp_path, monkeypatch):
    import torch

    import svdiff
    from svdiff.adapters import save_shifts
    from svdiff.models import base_name, load_components

    ws = Workspace(tmp_path / "ws")
    components = load_components(None)
    g = torch.Generator().manual_seed(0)
    for model in components.values():
        for p in svdiff.add_shifts(model, progress=False).values():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_shifts(ws.root / "runs" / "x", components, base_model=base_name(None), preset="all")
    result = actions.generate(
        ws,
        prompt="a photo of a heart",
        shifts=[("runs/x/svdiff_weights.safetensors", 0.7)],
        num_images=1,
        num_inference_steps=2,
    )
    command = result["command"]
    assert command.startswith(f"cd {ws.root} && svdiff generate ") and ":0.7" in command
    argv = shlex.split(command.split(" && ", 1)[1])[1:]
    again = tmp_path / "again.png"
    argv[argv.index("--output") + 1] = str(again)
    monkeypatch.chdir(ws.root)
    assert main(argv) == 0
    assert Image.open(again).tobytes() == Image.open(result["grid"]).tobytes()


# --- the training queue, with a stand-in for `svdiff train` (prints its bar, obeys SIGINT as it does) ---

FAKE_TRAIN = """#!{python}
import json, signal, sys, time
from pathlib import Path

flags = sys.argv[4:]  # after: -m svdiff train
value = lambda name, default=None: flags[flags.index(name) + 1] if name in flags else default
steps, out = int(value("--max_train_steps")), Path(value("--output_dir"))
start = 5 if "--resume_from_checkpoint" in flags else 0
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # inherited: a SIGINT before the loop would be lost
    print("error: SIGINT is ignored", file=sys.stderr)
    sys.exit(3)
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
if "--fail" in flags:
    print("error: the subject folder is empty", file=sys.stderr)
    sys.exit(2)
for step in range(start + 1, steps + 1):
    time.sleep(float(value("--delay", 0.02)))
    bar = f"{{step}}/{{steps}} [00:01<00:01, 9.0it/s, loss={{1 / step:.4f}}, lr=0.001]"
    sys.stderr.write("\\rtraining:  50%|#####     | " + bar)
    sys.stderr.flush()
    if stop:
        print(f"\\nerror: stopped by SIGINT at step {{step}} of {{steps}}; saved checkpoint-{{step}}", file=sys.stderr)
        sys.exit(130)
out.mkdir(parents=True, exist_ok=True)
(out / "loss.json").write_text(json.dumps([[s, 1 / s] for s in range(1, steps + 1)]))
(out / "train_summary.json").write_text(json.dumps({{"steps": steps}}))
"""


@pytest.fixture
def trainer(tmp_path):
    from svdiff.ui.jobs import Trainer

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAIN.format(python=sys.executable))
    fake.chmod(0o755)
    queue = Trainer(Workspace(tmp_path / "ws"), python=str(fake), poll=0.05)
    yield queue
    queue.close(timeout=10)


def _until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_runs_one_job_at_a_time_and_reads_the_bar(trainer):
    first = trainer.submit(["--max_train_steps", "20", "--output_dir", "runs/a"], "runs/a", 20)
    second = trainer.submit(["--max_train_steps", "10", "--output_dir", "runs/b"], "runs/b", 10)
    _until(lambda: first.state == "running")
    assert second.state == "queued"
    _until(lambda: second.state == "done")
    assert first.state == "done" and first.step == 20 and first.losses[-1] == [20, pytest.approx(0.05)]
    assert second.created >= first.created and first.returncode == second.returncode == 0
    trainer.submit(["--max_train_steps", "10", "--output_dir", "runs/c"], "runs/c", 10)
    with pytest.raises(SvdiffError, match="already has job"):  # one job per output folder at a time
        trainer.submit(["--max_train_steps", "10", "--output_dir", "runs/c"], "runs/c", 10)


def test_stop_checkpoints_and_resume_continues(trainer):
    job = trainer.submit(["--max_train_steps", "400", "--delay", "0.05", "--output_dir", "runs/s"], "runs/s", 400)
    _until(lambda: job.step > 2)
    assert os.getpgid(job.pid) == job.pid != os.getpgid(0)  # a Ctrl-C at the server's terminal does not reach it
    trainer.stop(job.id)
    _until(lambda: job.state == "stopped")
    assert job.returncode == 130 and "stopped by SIGINT" in job.message and 2 < job.step < 400
    again = trainer.resume(job.id)
    assert again.flags[-2:] == ["--resume_from_checkpoint", "latest"] and again.output_dir == "runs/s"
    trainer.stop(again.id)  # still queued, or already running: either way it ends without finishing
    _until(lambda: again.state in ("cancelled", "stopped"))
    with pytest.raises(SvdiffError, match="nothing to stop"):
        trainer.stop(again.id)


def test_stop_reaches_jobs_of_a_server_that_ignores_sigint(tmp_path):
    """A shell starts a background server with SIGINT ignored; its training processes must not inherit that."""
    from svdiff.ui.jobs import Trainer

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAIN.format(python=sys.executable))
    fake.chmod(0o755)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        queue = Trainer(Workspace(tmp_path / "ws"), python=str(fake), poll=0.05)
        job = queue.submit(["--max_train_steps", "3", "--output_dir", "runs/i"], "runs/i", 3)
        _until(lambda: job.state not in ("queued", "running"))
        queue.close(timeout=10)
    finally:
        signal.signal(signal.SIGINT, before)
    assert job.state == "done", job.message


def test_a_failed_job_shows_the_error_line(trainer):
    job = trainer.submit(["--max_train_steps", "5", "--fail", "--output_dir", "runs/f"], "runs/f", 5)
    _until(lambda: job.state == "failed")
    assert job.message == "the subject folder is empty" and job.returncode == 2


def test_a_restarted_server_finds_its_jobs(trainer, tmp_path):
    from svdiff.ui.jobs import Trainer

    done = trainer.submit(["--max_train_steps", "3", "--output_dir", "runs/r"], "runs/r", 3)
    _until(lambda: done.state == "done")
    trainer.close(timeout=10)
    lost = json.loads((trainer.folder / f"{done.id}.json").read_text()) | {"id": "0002", "state": "running"}
    lost |= {"pid": 2**22 + 1, "output_dir": "runs/lost"}  # a process that no longer exists
    (trainer.folder / "0002.json").write_text(json.dumps(lost))
    again = Trainer(trainer.workspace, python=trainer.python, poll=0.05)
    try:
        assert [(j.id, j.state) for j in again.jobs()] == [("0001", "done"), ("0002", "interrupted")]
        assert again.latest().id == "0002"
    finally:
        again.close(timeout=10)

"""Training jobs of the web app: a queue worked by one background thread, each job one `svdiff train` process.

A job's state lives in the workspace (`jobs/<id>.json`, its output in `jobs/<id>.log`), not in a browser: a page
that closes and comes back, or a server that restarts, finds its jobs where they were. Progress is read from what
the process writes: tqdm's training bar (step, total, loss) in its log, the validation grids and loss chart in its
output folder. Stop sends SIGINT, on which `svdiff train` finishes its step, saves a checkpoint and exits; resume
runs the same command again with `--resume_from_checkpoint latest`."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SvdiffError
from ..files import write_atomic
from .workspace import JOBS, Workspace

# tqdm's bar as `svdiff train` prints it: "training:  45%|████▌     | 9/20 [00:03<00:04, …, loss=0.1234, lr=0.001]"
_BAR = re.compile(r"(?P<desc>[A-Za-z][\w .]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)(?P<rest>[^\r\n]*)")
_LOSS = re.compile(r"loss=(?P<loss>[-+0-9.eE]+|nan|inf)")
WAITING = ("queued", "running", "stopping")
RESUMABLE = ("stopped", "failed", "interrupted")


@dataclass
class Job:
    id: str
    output_dir: str  # relative to the workspace
    flags: list[str]  # of `svdiff train`
    max_train_steps: int
    state: str = "queued"  # queued, running, stopping, done, stopped, failed, interrupted, cancelled
    step: int = 0
    phase: str = ""  # the bar in progress: training, or class images, SVD, …
    losses: list = field(default_factory=list)  # [[step, loss]] as the bar showed them
    pid: int | None = None
    returncode: int | None = None
    message: str = ""
    created: float = field(default_factory=time.time)

    @property
    def command(self) -> str:
        return shlex.join(["svdiff", "train", *self.flags])


class Trainer:
    """The queue: `submit` adds a job, one worker thread runs them in order, `stop` and `resume` act on one."""

    def __init__(self, workspace: Workspace, python: str = sys.executable, poll: float = 0.5):
        self.workspace = workspace
        self.folder = workspace.root / JOBS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.python, self.poll = python, poll
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # a server started in the background by a shell ignores SIGINT, and its training processes would inherit
            # that: Stop could not reach one before its loop installs its own handler
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self._jobs = {job.id: job for job in map(self._read, sorted(self.folder.glob("*.json")))}
        for job in self._jobs.values():
            if job.state in ("running", "stopping") and not _is_training(job.pid):
                self._finish(job, None)  # ended while no server watched it: its files say how far it got
        self._thread = threading.Thread(target=self._work, name="svdiff-ui-trainer", daemon=True)
        self._thread.start()

    # --- what the page calls ---

    def submit(self, flags: list[str], output_dir: str, max_train_steps: int) -> Job:
        with self._lock:
            busy = [j for j in self._jobs.values() if j.output_dir == output_dir and j.state in WAITING]
            if busy:
                raise SvdiffError(f"{output_dir} already has job {busy[0].id} ({busy[0].state})")
            number = max((int(j) for j in self._jobs), default=0) + 1
            job = Job(id=f"{number:04d}", output_dir=output_dir, flags=list(flags), max_train_steps=max_train_steps)
            self._jobs[job.id] = job
            self._save(job)
        self._wake.set()
        return job

    def stop(self, job_id: str) -> Job:
        """A running job gets SIGINT (it checkpoints, then ends as "stopped"); a queued one is cancelled."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                job.state = "cancelled"
            elif job.state == "running" and job.pid:
                try:
                    os.kill(job.pid, signal.SIGINT)
                except ProcessLookupError:
                    raise SvdiffError(f"job {job_id} has just ended") from None
                job.state = "stopping"
            else:
                raise SvdiffError(f"job {job_id} is {job.state}: nothing to stop")
            self._save(job)
            return job

    def resume(self, job_id: str) -> Job:
        """A new job: the same command with --resume_from_checkpoint latest, into the same folder."""
        job = self.get(job_id)
        if job.state not in RESUMABLE:
            raise SvdiffError(f"job {job_id} is {job.state}: only a stopped, failed or interrupted job resumes")
        flags = _without(job.flags, "--resume_from_checkpoint") + ["--resume_from_checkpoint", "latest"]
        return self.submit(flags, job.output_dir, job.max_train_steps)

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(str(job_id or "").strip())
        if job is None:
            raise SvdiffError(f"no job {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.id)

    def latest(self) -> Job | None:
        """The job a page shows first: the running one, else the next queued, else the newest."""
        jobs = self.jobs()
        for state in ("running", "stopping", "queued"):
            waiting = [j for j in jobs if j.state == state]
            if waiting:
                return waiting[0]
        return jobs[-1] if jobs else None

    def close(self, timeout: float = 60.0) -> None:
        """Stops the worker; a running training gets SIGINT and up to `timeout` seconds to save its checkpoint."""
        self._closing = True
        running = [j for j in self._jobs.values() if j.state == "running" and j.pid]
        for job in running:
            try:
                self.stop(job.id)
            except SvdiffError:
                pass
        self._wake.set()
        self._thread.join(timeout)

    # --- the worker ---

    def _work(self) -> None:
        for job in [j for j in self.jobs() if j.state in ("running", "stopping")]:
            self._watch(job)  # still training from before this server started: one job at a time
        while not self._closing:
            with self._lock:
                job = next((j for j in self.jobs() if j.state == "queued"), None)
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run(job)

    def _watch(self, job: Job) -> None:
        log, offset = self.folder / f"{job.id}.log", 0
        job.losses = []
        while _is_training(job.pid) and not self._closing:
            time.sleep(self.poll)
            offset = self._progress(job, log, offset)
        if not self._closing:
            with self._lock:
                self._finish(job, None)

    def _run(self, job: Job) -> None:
        log = self.folder / f"{job.id}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log.open("ab") as out:
            try:
                process = subprocess.Popen(
                    [self.python, "-m", "svdiff", "train", *job.flags],
                    cwd=self.workspace.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # its own process group: a Ctrl-C at the server's terminal reaches the server only, which then
                    # sends the one SIGINT that makes `svdiff train` checkpoint (a second one stops it at once)
                    start_new_session=True,
                )
            except OSError as e:
                with self._lock:
                    job.state, job.message = "failed", f"cannot start svdiff train: {e}"
                    self._save(job)
                return
            with self._lock:
                job.state, job.pid = "running", process.pid
                self._save(job)
            offset = 0
            while process.poll() is None:
                time.sleep(self.poll)
                offset = self._progress(job, log, offset)
            self._progress(job, log, offset)
        with self._lock:
            self._finish(job, process.returncode)

    def _progress(self, job: Job, log: Path, offset: int) -> int:
        """Reads what the log gained since `offset`: the bars' positions and the losses they showed."""
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\r") + 1 or chunk.rfind(b"\n") + 1  # an unfinished bar is read next time
        text = chunk[:end].decode("utf-8", errors="replace")
        with self._lock:
            for m in _BAR.finditer(text):
                job.phase = m["desc"].strip()
                if job.phase == "training":
                    job.step = int(m["n"])
                    loss = _LOSS.search(m["rest"])
                    if loss and job.step > 0:
                        if job.losses and job.losses[-1][0] == job.step:
                            job.losses[-1][1] = float(loss["loss"])
                        else:
                            job.losses.append([job.step, float(loss["loss"])])
            if text:
                self._save(job)
        return offset + end

    def _finish(self, job: Job, returncode: int | None) -> None:
        """The job's end state from its exit status (None: not known, read from the files it left)."""
        output = self.workspace.root / job.output_dir
        summary = output / "train_summary.json"
        job.returncode, job.pid = returncode, None
        finished = summary.is_file() and json.loads(summary.read_text()).get("steps") == job.max_train_steps
        if returncode == 0 or (returncode is None and finished):
            job.state, job.step, job.message = "done", job.max_train_steps, ""
            losses = output / "loss.json"
            if losses.is_file():
                job.losses = json.loads(losses.read_text())
        elif returncode == 128 + signal.SIGINT or job.state == "stopping":
            job.state, job.message = "stopped", _last_error(self.folder / f"{job.id}.log")
        elif returncode is None:
            job.state, job.message = "interrupted", "the server stopped while it ran; resume continues it"
        else:
            job.state = "failed"
            job.message = _last_error(self.folder / f"{job.id}.log") or f"svdiff train exited with {returncode}"
        self._save(job)

    def _read(self, path: Path) -> Job:
        return Job(**json.loads(path.read_text()))

    def _save(self, job: Job) -> None:
        write_atomic(self.folder / f"{job.id}.json", json.dumps(asdict(job), indent=1).encode())


def _without(flags: list[str], name: str) -> list[str]:
    """`flags` less the flag `name` and its value."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == name:
            skip = True
        else:
            out.append(flag)
    return out


def _last_error(log: Path) -> str:
    """The last `error: …` or `note: …` line of a job's output: what `svdiff train` said when it ended."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    said = [line for line in lines if line.startswith(("error: ", "note: "))]
    return said[-1].removeprefix("error: ") if said else ""


def _is_training(pid: int | None) -> bool:
    """Whether `pid` is still an `svdiff train` process (a pid alone may have been reused since)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"svdiff" in cmdline and b"train" in cmdline

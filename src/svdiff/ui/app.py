"""`svdiff ui`: the web app (Gradio) — its four pages in one Blocks, and the server. The server binds 127.0.0.1,
serves no file outside the workspace and makes no share link unless asked."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import gradio as gr

from .edit_page import edit_page
from .files_page import files_page
from .generate_page import generate_page
from .jobs import Trainer
from .train_page import train_page
from .workspace import MAX_UPLOAD_MB, Workspace


def build(workspace: Workspace, trainer: Trainer, base=None) -> gr.Blocks:
    with gr.Blocks(title="svdiff", analytics_enabled=False) as demo:
        gr.Markdown(f"## svdiff · workspace `{workspace.root}`")
        with gr.Tabs():
            train_page(demo, workspace, trainer, base)
            generate_page(workspace, base)
            edit_page(workspace, base)
            files_page(workspace, base)
    return demo


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

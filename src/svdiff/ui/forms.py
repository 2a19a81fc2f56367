"""What every page of the web app shares: the message box a handler answers in, the guard that turns any
failure into one line there, and small field helpers."""

from __future__ import annotations

import functools
import html
import sys
import traceback

import gradio as gr

from ..errors import SvdiffError

NONE = ""  # a file menu's "nothing chosen"


def message(text: str, error: bool = False) -> str:
    return f"**error:** {html.escape(text)}" if error else html.escape(text)


def guarded(outputs: int):
    """Wraps a handler whose last output is the page's message box: a user's mistake (SvdiffError, a file that
    cannot be read or written) becomes `error: …` there, any other failure one line too (the traceback goes to the
    server's log), and the other outputs stay as they were."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SvdiffError as e:
                text = str(e)
            except OSError as e:
                text = f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                first = str(e).splitlines()[0] if str(e) else ""
                text = f"internal error ({type(e).__name__}: {first}); see the server log"
            return (*[gr.skip()] * (outputs - 1), message(text, error=True))

        return run

    return wrap


def whole(value, label: str, elem_id: str) -> gr.Number:
    """A field for a whole number (steps, images, seeds)."""
    return gr.Number(value, label=label, precision=0, elem_id=elem_id)


def command_box(label: str, elem_id: str) -> gr.Textbox:
    """The command line a result came from, to copy into a terminal."""
    return gr.Textbox(label=label, lines=2, max_lines=6, interactive=False, buttons=["copy"], elem_id=elem_id)


def integer(value, what: str) -> int:
    if value is None or float(value) != int(value):
        raise SvdiffError(f"{what}: give a whole number")
    return int(value)


def choice_updates(choices: list[str], current):
    """New choices for file menus, each keeping its choice while it still exists (one menu: one update)."""
    boxes = [gr.update(choices=choices, value=c if c in choices else NONE) for c in current]
    return boxes if len(boxes) > 1 else boxes[0]

"""`svdiff ui`: a local web app over the library and the `svdiff` commands — personalize (a training queue),
generate, combine, edit, inspect, merge and export — in one workspace folder. Needs the `ui` extra (Gradio);
nothing here imports it until the app starts."""

from __future__ import annotations

from ..checks import check_range
from ..errors import SvdiffError
from ..flags import base_flag, flag
from .workspace import DEFAULT_WORKSPACE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ui", help="the local web app: train, generate, edit, merge and export in a browser")
    flag(p, "workspace", default=DEFAULT_WORKSPACE, help="the one folder the app reads and writes")
    flag(p, "host", default="127.0.0.1", help="address to bind (default: this machine only)")
    flag(p, "port", type=int, default=7860)
    flag(p, "share", action="store_true", help="also make a public share link (off by default)")
    base_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from .app import serve
    except ImportError as e:
        raise SvdiffError(f"svdiff ui needs the ui extra: pip install 'svdiff[ui]' ({e.name} is missing)") from None
    check_range("--port", args.port, 1, 65535, integer=True)
    serve(args.workspace, host=args.host, port=args.port, share=args.share, base=args.base)
    return 0

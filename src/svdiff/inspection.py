"""Looking at a shift file: its metadata, sizes and most-moved layers as text (`svdiff inspect`), and the size
of δ per block as a PNG bar chart."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from .format import RESERVED_KEYS, ShiftFile, ShiftFileError, clip


def summarize(shift_file: ShiftFile, top: int = 10) -> dict:
    """A JSON-able account of a file: metadata, size, counts per component, the `top` layers δ moved most."""
    layers = []
    for key, delta in shift_file.tensors.items():
        values = delta.double()
        layers.append(
            {
                "key": key,
                "rms": values.square().mean().sqrt().item(),
                "max_abs": values.abs().max().item(),
                "n": delta.numel(),
            }
        )
    layers.sort(key=lambda layer: layer["rms"], reverse=True)
    components = {
        name: {"tensors": len(deltas), "values": sum(d.numel() for d in deltas.values())}
        for name, deltas in shift_file.components().items()
    }
    return {
        "file": str(shift_file.path) if shift_file.path else None,
        "size_bytes": shift_file.path.stat().st_size if shift_file.path else None,
        "metadata": shift_file.metadata,
        "components": components,
        "total_values": sum(c["values"] for c in components.values()),
        "top_layers": layers[:top],
    }


def format_summary(summary: dict) -> str:
    """The text `svdiff inspect FILE` prints."""
    meta = summary["metadata"]
    size = f"{summary['size_bytes']:,} bytes, " if summary["size_bytes"] is not None else ""
    written_by = clip(meta.get("svdiff_version", "?"))
    rows = [
        ("base model", clip(meta["base_model"], 100)),
        ("preset", clip(meta["preset"], 100)),
        ("format", f"{meta['format']} v{meta['format_version']} (written by svdiff {written_by})"),
    ]
    components = summary["components"].items()
    rows += [(name, f"{c['tensors']} layers, {c['values']:,} values") for name, c in components]
    rows.append(("total", f"{summary['total_values']:,} values"))
    rows += [(key, clip(json.dumps(value), 100)) for key, value in meta.items() if key not in RESERVED_KEYS]
    lines = [f"{summary['file'] or 'shift file'}  ({size}{clip(meta.get('dtype', '?'))})"]
    lines += [f"  {clip(label, 40):<16} {value}" for label, value in rows]
    lines.append(f"largest shifts (RMS of δ, top {len(summary['top_layers'])}):")
    lines += [
        f"  {layer['rms']:.3e}  max {layer['max_abs']:.3e}  n={layer['n']:<6} {clip(layer['key'], 200)}"
        for layer in summary["top_layers"]
    ]
    return "\n".join(lines)


def block_of(key: str) -> str:
    """The block a layer belongs to, for plots: unet.down_blocks.1…, unet.mid_block…, text_encoder…layers.3…"""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def plot_blocks(shift_file: ShiftFile, path: str | os.PathLike) -> Path:
    """A PNG bar chart of the RMS of δ per block (1-D norm shifts left out: they live on another scale)."""
    sums: dict[str, list[float]] = {}
    for key, delta in shift_file.tensors.items():
        if "norm" in key:
            continue
        acc = sums.setdefault(block_of(key), [0.0, 0])
        acc[0] += float(delta.double().square().sum())
        acc[1] += delta.numel()
    if not sums:
        raise ShiftFileError(f"{shift_file.path}: no matrix shifts to plot")
    rms = {block: (s / n) ** 0.5 for block, (s, n) in sums.items()}
    top = max(rms.values()) or 1.0
    label_w, bar_w, row = 300, 400, 16
    image = Image.new("RGB", (label_w + bar_w + 90, row * len(rms) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"RMS of delta per block: {shift_file.path}", fill="black")
    for i, (block, value) in enumerate(rms.items()):
        y = 24 + i * row
        draw.text((4, y), block[-46:], fill="black")
        draw.rectangle([label_w, y + 2, label_w + int(bar_w * value / top), y + row - 3], fill=(70, 110, 200))
        draw.text((label_w + bar_w + 6, y), f"{value:.2e}", fill="black")
    out = Path(path)
    image.save(out)
    return out

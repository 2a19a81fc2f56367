"""Pictures for a person to look at: contact sheets of images, and line charts (loss curves)."""

from PIL import Image, ImageDraw


def grid(images, cols: int, scale: int = 2, labels=None, label_height: int = 12) -> Image.Image:
    """Tiles equally sized images `cols` to a row, each enlarged `scale`× (nearest, so pixels stay visible).
    Labels, if given, are one per row and printed above it."""
    w, h = images[0].width * scale, images[0].height * scale
    rows = (len(images) + cols - 1) // cols
    band = label_height if labels else 0
    sheet = Image.new("RGB", (cols * w, rows * (h + band)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.resize((w, h), Image.NEAREST), (c * w, r * (h + band) + band))
    for r, text in enumerate(labels or []):
        draw.text((2, r * (h + band)), text, fill=(0, 0, 0))
    return sheet


def line_chart(
    series: dict[str, list[tuple[float, float]]], title: str, size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """A plain line chart of one or more named series of (x, y) points, with the y range labelled."""
    colors = [(40, 90, 200), (220, 80, 40), (40, 160, 70), (140, 60, 180)]
    width, height = size
    left, right, top, bottom = 60, 12, 24, 28
    sheet = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    points = [p for s in series.values() for p in s]
    draw.text((left, 6), title, fill=(0, 0, 0))
    if not points:
        return sheet
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)

    def at(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            top + (y1 - y) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    for value, y in ((y1, top), (y0, height - bottom)):
        draw.text((4, y - 6), f"{value:.4g}", fill=(0, 0, 0))
    draw.text((left, height - bottom + 6), f"{x0:g}", fill=(0, 0, 0))
    draw.text((width - right - 40, height - bottom + 6), f"{x1:g}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        if len(pts) > 1:
            draw.line([at(x, y) for x, y in pts], fill=color, width=1 if i == 0 and len(series) > 1 else 2)
        draw.text((width - right - 150, top + 4 + 12 * i), name, fill=color)
    return sheet

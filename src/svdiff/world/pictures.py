"""Contact sheets: many small images in one PNG, optionally labelled, for a person to look at."""

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

"""The icon image: a memory gauge filled in the state's colour, readable at 16–24 px."""

from __future__ import annotations

from PIL import Image, ImageDraw

from appliance.tray.snapshot import Snapshot, TrayState

STATE_COLOURS: dict[TrayState, tuple[int, int, int]] = {
    TrayState.STOPPED: (128, 128, 128),
    TrayState.IDLE: (90, 160, 220),
    TrayState.LOADING: (240, 180, 30),
    TrayState.READY: (60, 190, 90),
    TrayState.BUSY: (40, 120, 240),
    TrayState.ERROR: (220, 50, 50),
}
BACKGROUND = (40, 40, 40, 255)
EMPTY = (85, 85, 85, 255)


def render_icon(snapshot: Snapshot, size: int = 64) -> Image.Image:
    """A rounded tile: a state-coloured frame and a bar filled to the memory use from below."""
    colour = STATE_COLOURS[snapshot.state]
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    border = max(2, size // 10)
    draw.rounded_rectangle([0, 0, size - 1, size - 1], radius=size // 5, fill=(*colour, 255))
    inner = [border, border, size - 1 - border, size - 1 - border]
    draw.rectangle(inner, fill=BACKGROUND)
    pad = max(1, size // 16)
    left, top, right, bottom = inner[0] + pad, inner[1] + pad, inner[2] - pad, inner[3] - pad
    draw.rectangle([left, top, right, bottom], fill=EMPTY)
    if snapshot.state is not TrayState.STOPPED:
        height = round((bottom - top + 1) * snapshot.fill)
        if height:
            draw.rectangle([left, bottom - height + 1, right, bottom], fill=(*colour, 255))
    else:  # a cross-bar says "off" even where colour is hard to see
        draw.line([left, bottom, right, top], fill=(*colour, 255), width=max(1, size // 12))
    return image

#!/usr/bin/env python3
"""Write deterministic sample inputs for topyaz-mount's tests.

    python tools/make_samples.py DIR

or, from Python, `make_samples(dir) -> list[Path]`. The same call always writes the
same bytes: images come from fixed formulas and a fixed random seed (Pillow), the
video from ffmpeg's testsrc with bit-exact flags (skipped with a warning when ffmpeg
is missing unless video=True is required).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 480
SEED = 20240601

# Name with spaces, an accented letter, a dash and a CJK character.
UNICODE_NAME = "Café photo – 写真 01.png"
VIDEO_NAME = "clip.mp4"


def _gradient() -> Image.Image:
    """Horizontal red ramp, vertical green ramp, constant-ish blue."""
    red = Image.linear_gradient("L").rotate(90).resize((WIDTH, HEIGHT))
    green = Image.linear_gradient("L").resize((WIDTH, HEIGHT))
    blue = Image.new("L", (WIDTH, HEIGHT), 96)
    return Image.merge("RGB", (red, green, blue))


def _noise(seed: int) -> Image.Image:
    """The gradient with seeded RGB noise blended in (looks like a grainy photo)."""
    rng = random.Random(seed)
    noise = Image.frombytes("RGB", (WIDTH, HEIGHT), rng.randbytes(WIDTH * HEIGHT * 3))
    return Image.blend(_gradient(), noise, 0.35)


def _shapes() -> Image.Image:
    """Flat shapes with hard edges (where sharpening shows) on a transparent canvas."""
    img = Image.new("RGBA", (WIDTH, HEIGHT), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    rng = random.Random(SEED + 1)
    for _ in range(24):
        x0, y0 = rng.randrange(WIDTH - 80), rng.randrange(HEIGHT - 80)
        x1, y1 = x0 + rng.randrange(20, 200), y0 + rng.randrange(20, 160)
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256), 255)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    return img


def _save(img: Image.Image, path: Path, **options) -> Path:
    with open(path, "wb") as fh:
        img.save(fh, **options)
    return path


def make_video(path: Path, seconds: int = 2) -> Path:
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=duration={seconds}:size=320x240:rate=15",
            "-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p",
            "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
            "-f", "mp4", str(path)]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return path


def make_samples(directory: Path | str, *, video: bool | None = None) -> list[Path]:
    """Write the samples into directory (created if needed); returns their paths.

    video=None makes the video when ffmpeg is on PATH; True requires it; False skips it.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _save(_gradient(), out / "gradient.png", format="PNG", compress_level=6),
        _save(_noise(SEED).convert("RGB"), out / "noise.jpg", format="JPEG", quality=90),
        _save(_shapes(), out / UNICODE_NAME, format="PNG", compress_level=6),
        _save(_noise(SEED + 2).resize((320, 240), Image.LANCZOS), out / "small.tiff",
              format="TIFF", compression="raw"),
    ]
    if video or (video is None and shutil.which("ffmpeg")):
        paths.append(make_video(out / VIDEO_NAME))
    elif video is None:
        print("make_samples: ffmpeg not found, no video sample", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: make_samples.py DIR", file=sys.stderr)
        return 2
    for path in make_samples(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

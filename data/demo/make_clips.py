"""Make the demo video clips in clips/ from the bundled photos in images/.

Run from anywhere:  python data/demo/make_clips.py

Each clip is a simulated camera move (pan and/or zoom) over one still photo: every
frame is a crop box of the photo, resized with Lanczos to the frame size, so the
box can move by fractions of a pixel and the motion stays smooth. Nothing is random,
so running the script again writes the same frames (and, with the same PyAV/FFmpeg
build, the same bytes).

Writes:
  clips/rocket_pan.mp4        4 s, a slow pan from left to right across the launch pad
  clips/coffee_zoom.mp4       3 s, a zoom in on the espresso cup
  clips/chelsea_pan_zoom.mp4  4 s, a pan from one of the cat's eyes to the other,
                              then a zoom out to the whole face
  clips/clock_frames/000.jpg .. 005.jpg
                              6 JPEG frames zooming in on the wall clock: a video
                              given as a list of frames instead of a file

then decodes each .mp4 with PyAV and prints its frames, fps, duration, size and bytes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import av
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
CLIPS = HERE / "clips"

FPS = 8
SIZE = (224, 160)  # width, height of the .mp4 frames (multiples of 16)
FRAMES_SIZE = (224, 168)  # the JPEG frame folder keeps clock.jpg's 4:3 shape
CRF = 23  # libx264 quality: 0 is lossless, 23 is the default, higher is smaller

# A view is (centre x, centre y, box width) in the photo's pixels; the box height
# follows from the frame's aspect ratio.
View = tuple[float, float, float]


def ease(t: float) -> float:
    """0..1 -> 0..1, starting and stopping gently (a smoothstep)."""
    return t * t * (3 - 2 * t)


def between(a: View, b: View, t: float) -> View:
    """The view a fraction `t` of the way from `a` to `b`. The box width is interpolated
    on a log scale, so a zoom looks equally fast all the way through."""
    t = ease(t)
    cx = a[0] + (b[0] - a[0]) * t
    cy = a[1] + (b[1] - a[1]) * t
    w = math.exp(math.log(a[2]) + (math.log(b[2]) - math.log(a[2])) * t)
    return cx, cy, w


def render(photo: Image.Image, view: View, size: tuple[int, int]) -> Image.Image:
    """The part of `photo` that `view` shows, resized to `size`. The box is moved (not
    shrunk) to stay inside the photo."""
    cx, cy, w = view
    h = w * size[1] / size[0]
    if w > photo.width or h > photo.height:
        raise ValueError(f"view {view} is larger than the photo ({photo.width}x{photo.height})")
    left = min(max(cx - w / 2, 0.0), photo.width - w)
    top = min(max(cy - h / 2, 0.0), photo.height - h)
    return photo.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + w, top + h))


def path_frames(photo: Image.Image, views: list[View], seconds: list[float], size) -> list[Image.Image]:
    """Frames at FPS that move through `views`, spending seconds[i] between views[i] and
    views[i + 1]. The last frame shows the last view exactly."""
    frames = []
    for a, b, s in zip(views, views[1:], seconds):
        n = round(s * FPS)
        frames += [render(photo, between(a, b, i / n), size) for i in range(n)]
    frames[-1] = render(photo, views[-1], size)
    return frames


def write_mp4(path: Path, frames: list[Image.Image]) -> None:
    """Encode `frames` as H.264 (yuv420p) in an .mp4 at FPS frames per second."""
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one thread: the same bytes every run
        stream.options = {"crf": str(CRF), "preset": "slow"}
        for image in frames:
            frame = av.VideoFrame.from_image(image)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def check_mp4(path: Path) -> None:
    """Decode every frame of `path` and print what it holds."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        fps = float(stream.average_rate)
        codec = stream.codec_context.name
    w, h = frames[0].width, frames[0].height
    print(
        f"{path.relative_to(HERE)}: {len(frames)} frames, {fps:g} fps, "
        f"{len(frames) / fps:g} s, {w}x{h}, {codec}, {path.stat().st_size} bytes"
    )


def main() -> None:
    CLIPS.mkdir(exist_ok=True)
    photo = lambda name: Image.open(IMAGES / name).convert("RGB")  # noqa: E731

    # rocket.jpg (336x224): at 1:1 scale the 224x160 box slides from the left edge to
    # the right edge, keeping the rocket and the pad lights in view.
    rocket = photo("rocket.jpg")
    pan = [(112, 136, 224), (224, 136, 224)]
    write_mp4(CLIPS / "rocket_pan.mp4", path_frames(rocket, pan, [4], SIZE))

    # coffee.jpg (336x224): from nearly the whole photo in to the crema in the cup.
    coffee = photo("coffee.jpg")
    zoom = [(168, 112, 312), (167, 68, 104)]
    write_mp4(CLIPS / "coffee_zoom.mp4", path_frames(coffee, zoom, [3], SIZE))

    # chelsea.jpg (336x224): close on the eye on the left, across to the other eye,
    # then out to the whole face.
    chelsea = photo("chelsea.jpg")
    moves = [(128, 92, 112), (236, 100, 112), (168, 112, 312)]
    write_mp4(CLIPS / "chelsea_pan_zoom.mp4", path_frames(chelsea, moves, [2, 2], SIZE))

    # clock.jpg (336x252): 6 frames zooming in on the clock, saved as JPEGs.
    clock = photo("clock.jpg")
    folder = CLIPS / "clock_frames"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    start, end = (168, 126, 336), (177, 130, 144)
    count = 6
    for i in range(count):
        image = render(clock, between(start, end, i / (count - 1)), FRAMES_SIZE)
        image.save(folder / f"{i:03d}.jpg", quality=85)

    for name in ("rocket_pan.mp4", "coffee_zoom.mp4", "chelsea_pan_zoom.mp4"):
        check_mp4(CLIPS / name)
    files = sorted(folder.glob("*.jpg"))
    print(
        f"{folder.relative_to(HERE)}/: {len(files)} frames, {FRAMES_SIZE[0]}x{FRAMES_SIZE[1]}, "
        f"{sum(f.stat().st_size for f in files)} bytes"
    )


if __name__ == "__main__":
    main()

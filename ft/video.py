"""Videos: which frames a sample takes, and reading them from a file with PyAV.

A video reaches the model as frames, two per temporal patch (Qwen2.5-VL's
`temporal_patch_size`), each frame resized by the video processor within
``data.video_min_pixels``/``video_max_pixels``. Which frames, and so how many tokens, is
decided here from the file's header alone (:func:`probe`), so that the pre-training
data check counts exactly the tokens that loading the sample later gives
(:func:`read`), without decoding every frame.

Why PyAV: its wheels bundle FFmpeg, so ``pip install av`` is all a machine needs.
torchcodec, the other maintained decoder, needs FFmpeg's shared libraries installed on
the system and a release matched to each torch release.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

__all__ = ["Clip", "VideoError", "VideoInfo", "VideoSampling", "as_clip", "probe", "processor_kwargs", "read"]


class VideoError(ValueError):
    """A video file that cannot be used; the message says why (the caller adds the row)."""


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How many frames a video gives, and which (``data.video_fps``, ``video_max_frames``)."""

    fps: float = 2.0
    """Frames taken per second of video; a list of frames is taken to be at this rate."""

    max_frames: int = 32
    """At most this many frames, spread evenly over the clip."""

    temporal: int = 2
    """Frames per temporal patch: the count is a multiple of this, and at least this."""

    def count(self, frames: int, rate: float | None) -> int:
        """Frames taken from a video of `frames` frames at `rate` frames per second (None:
        a list of frames, already at `fps`)."""
        want = frames if rate is None else frames / rate * self.fps
        taken = min(want, self.max_frames, frames)
        return max(self.temporal, math.floor(taken / self.temporal) * self.temporal)

    def indices(self, frames: int, rate: float | None) -> list[int]:
        """Which of the `frames` frames are taken, evenly spread from the first to the
        last (a clip shorter than `temporal` frames repeats its last)."""
        return torch.linspace(0, frames - 1, self.count(frames, rate)).round().long().tolist()

    def sampled_fps(self, frames: int, rate: float | None) -> float:
        """Frames per second of the frames taken: what places them on M-RoPE's time
        axis (the processor turns it into `second_per_grid_ts`)."""
        duration = frames / (rate or self.fps)
        return self.count(frames, rate) / duration


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says, checked by decoding its first frame."""

    frames: int
    rate: float
    width: int
    height: int


class Clip(NamedTuple):
    """Frames taken from a video, and where they came from."""

    frames: torch.Tensor
    """uint8 [T, 3, H, W] RGB."""
    fps: float
    """Frames per second of the frames taken (:meth:`VideoSampling.sampled_fps`)."""
    indices: list[int]
    """Which frames of the source they are (into a list of frames, for one)."""
    rate: float
    """The source's frame rate (``data.video_fps`` for a list of frames)."""


def as_clip(video) -> Clip:
    """A :class:`Clip`, from one or from a (frames, fps) pair (frames taken at `fps`)."""
    if isinstance(video, Clip):
        return video
    frames, fps = video
    return Clip(frames, float(fps), list(range(len(frames))), float(fps))


def processor_kwargs(clips: list, family, size: dict | None = None) -> dict:
    """The video processor's `videos_kwargs` for `clips` (:class:`Clip`s, or (frames,
    fps) pairs, whose frames are already chosen, as :func:`read` gives them): sample no
    frames again; say where the frames came from as the model's `family` needs it
    (`ft.families.Family.video_metadata`); and size
    each frame within the processor's pixel bounds (or `size`) alone, without
    transformers' whole-video budget (`cap_pixels_per_frame`), so a video's token count
    depends on its frames and those bounds only. Empty for no clips."""
    if not clips:
        return {}
    metadata = [family.video_metadata(len(c.frames), c.fps, c.indices, c.rate) for c in map(as_clip, clips)]
    kwargs = {"video_metadata": metadata, "do_sample_frames": False, "cap_pixels_per_frame": False}
    return {**kwargs, "size": size} if size else kwargs


def _av():
    from ft.deps import require

    require("av", "reading video files")
    import av

    return av


def probe(path: str) -> VideoInfo:
    """The frame count, frame rate and frame size of the video file `path`.

    Decodes the first frame only: enough to find a file that is not a video, holds no
    frame or uses a codec FFmpeg cannot decode. When the header gives no frame count
    (some containers), the packets are counted without decoding them. Raises
    VideoError.
    """
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError(f"{path} has no frames")
            frames = stream.frames
            if not frames:
                container.seek(0)
                frames = sum(1 for packet in container.demux(stream) if packet.size)
    except av.EOFError as e:  # how some containers without a frame end
        raise VideoError(f"{path} ends before its first frame (no frames, or a truncated file)") from e
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: {e}") from e
    if rate <= 0:
        raise VideoError(f"{path}: the frame rate is unknown")
    return VideoInfo(frames=max(frames, 1), rate=rate, width=first.width, height=first.height)


def read(path: str, sampling: VideoSampling) -> Clip:
    """The frames `sampling` takes from the video file `path`, as uint8 [T, 3, H, W]
    RGB, with their rate, their indices in the file and the file's frame rate.

    The frames are chosen from the header's count (:func:`probe`), as the data check
    counts them; should the stream end early, its last frame stands in for the missing
    ones, so the sample still has the tokens the check counted. Raises VideoError.
    """
    info = probe(path)
    wanted = sampling.indices(info.frames, info.rate)
    av = _av()
    taken: list[torch.Tensor] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            want = iter(wanted)
            target = next(want, None)
            for number, frame in enumerate(container.decode(stream)):
                if target is None:
                    break
                picture = None
                while target is not None and target == number:  # an index may repeat
                    picture = picture if picture is not None else torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    taken.append(picture)
                    target = next(want, None)
                last = frame
            if len(taken) < len(wanted):  # the stream ended before the header's count
                picture = taken[-1] if taken else torch.from_numpy(last.to_ndarray(format="rgb24"))
                taken += [picture] * (len(wanted) - len(taken))
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: {e}") from e
    if len({t.shape for t in taken}) > 1:
        raise VideoError(f"{path}: the frame size changes within the video")
    return Clip(torch.stack(taken).permute(0, 3, 1, 2).contiguous(), sampling.sampled_fps(info.frames, info.rate),
                wanted, info.rate)

"""Chat with a Qwen VL model folder (an ft export such as ``runs/demo/best``, or any
Hugging Face Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder): one question, or a multi-turn
session in the terminal.

    python -m ft.chat MODEL_DIR [--image PATH ...] [--video PATH] [PROMPT]

Everything here is plain transformers: the family's model class (``ft.families``) and
``AutoProcessor`` loaded from the folder, the conversation rendered by the processor's
chat template, ``model.generate``. What ft adds is what makes the answers comparable
with training: pictures laid on white when transparent (as ``ft.dataset`` does), and a
video's frames chosen by ``ft.video`` at the frame rate and frame cap the export
records (``fps`` and ``max_frames`` in its ``video_preprocessor_config.json``), with
the processor told not to sample again and not to apply its whole-video pixel budget,
as in training.

With PROMPT it answers once and exits (0; 2 on a bad image, video or folder). Without,
it reads one message per line from stdin and keeps the conversation, pictures included:
``/image PATH`` and ``/video PATH`` attach media to the next message, ``/reset``
forgets the conversation, ``/exit`` (or end of input) quits. The answer streams to
stdout; a line with the token count and speed goes to stderr.

In code, :class:`Chat` does the same without a terminal::

    chat = Chat("runs/demo/best")
    text, ids = chat.ask("What is in this picture?", images=["photo.jpg"])
    text, ids = chat.ask("And what colour is it?")  # the first turn is in the prompt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from ft.config_load import model_dir_refusal
from ft.deps import MissingDependency, require
from ft.families import read_family
from ft.processor import saved_video_sampling
from ft.video import Clip, VideoError, VideoSampling, as_clip, processor_kwargs

DEFAULT_VIDEO = VideoSampling()  # fps 2.0, at most 32 frames: ft's data.video_* defaults
HELP = ("type a message and press Enter; /image PATH or /video PATH attaches media to the next message, "
        "/reset forgets the conversation, /exit or Ctrl-D quits")


class ChatInputError(ValueError):
    """An image, a video or a model folder that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- inputs


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` as a Path; ChatInputError naming it when it is not a model folder
    (``ft.config_load.model_dir_refusal``, the check training and ft.predict make)."""
    refusal = model_dir_refusal(model_dir)
    if refusal:
        raise ChatInputError(f"MODEL_DIR {refusal}")
    return Path(model_dir)


def video_sampling(model_dir: str | os.PathLike, fps: float | None = None,
                   max_frames: int | None = None) -> VideoSampling:
    """How frames are taken from a video for `model_dir`
    (``ft.processor.saved_video_sampling``); ChatInputError for impossible values."""
    sampling = saved_video_sampling(model_dir, fps, max_frames)
    if sampling.fps <= 0 or sampling.max_frames < 1:
        raise ChatInputError(f"video sampling needs fps > 0 and max_frames >= 1 (got fps {sampling.fps}, "
                             f"max_frames {sampling.max_frames})")
    return sampling


def load_image(path: str | os.PathLike):
    """The image file `path` as ``ft.dataset.open_image`` gives it (RGB, transparent pixels
    laid on white, as in training); ChatInputError naming the file when it is missing or
    cannot be decoded."""
    from ft.dataset import open_image

    if not os.path.isfile(path):
        raise ChatInputError(f"image not found: {path}")
    try:
        return open_image(os.fspath(path))
    except ValueError as e:
        raise ChatInputError(str(e)) from e


def load_video(path: str | os.PathLike, sampling: VideoSampling = DEFAULT_VIDEO) -> Clip:
    """The frames `sampling` takes from the video file `path` (uint8 [T, 3, H, W]), their
    rate and where they come from; ChatInputError naming the file when it cannot be used."""
    from ft import video

    if not os.path.isfile(path):
        raise ChatInputError(f"video not found: {path}")
    try:
        return video.read(str(path), sampling)
    except (VideoError, MissingDependency) as e:
        raise ChatInputError(str(e) if str(path) in str(e) else f"cannot read video {path}: {e}") from e


# --------------------------------------------------------------------------- the chat


class _Printer:
    """A ``generate`` streamer writing the answer to `out` as it grows.

    Each step decodes the whole answer so far (skipping special tokens) and writes what
    is new, holding back a trailing ``\\ufffd`` (a character whose bytes are not all
    there yet); at the end it writes the rest and a newline. So what it writes is the
    final decoded answer, which the transformers streamers (they restart decoding
    after each newline) do not promise for arbitrary token sequences.
    """

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        self._write(text)

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            self.out.write(text[self.written:])
            self.out.flush()
            self.written = len(text)


class Chat:
    """A conversation with a Qwen VL model folder.

    Loads the model (``attn_implementation="sdpa"``; bf16 on CUDA, fp32 on the CPU)
    and its processor (``AutoProcessor``). :meth:`ask` adds a user turn, generates the
    answer and keeps both, so the next question sees the whole conversation, its
    images and videos included. After each answer, ``last_inputs`` holds the
    processor's output that went into ``generate`` and ``last_stats`` the prompt and
    answer token counts and the time it took.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, video_fps: float | None = None,
                 video_max_frames: int | None = None):
        self.model_dir = check_model_dir(model_dir)
        self.video = video_sampling(self.model_dir, video_fps, video_max_frames)
        require("torchvision", "the Qwen VL processors")
        from transformers import AutoProcessor

        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.family = read_family(self.model_dir)
        self.model = self.family.model_class().from_pretrained(
            self.model_dir, dtype=dtype, attn_implementation="sdpa").to(self.device).eval()
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed = seed
        self.last_inputs: Any = None
        self.last_stats: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (its turns, images and videos)."""
        self.messages: list[dict[str, Any]] = []
        self.images: list[Any] = []
        self.videos: list[Clip] = []

    def inputs(self, messages: list[dict[str, Any]], images: Sequence[Any],
               videos: Sequence[Clip]):
        """The processor's model inputs for `messages` (ending with a user turn) and the
        conversation's `images` and `videos` in order, with the assistant prompt added."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # Frames are chosen already (ft.video): the processor only resizes them, within
        # the video pixel bounds, as ft.dataset has it do in training.
        out = self.processor(text=[text], images=list(images) or None,
                             videos=[clip.frames for clip in videos] or None, return_tensors="pt",
                             videos_kwargs=processor_kwargs(list(videos), self.family))
        return out.to(self.device)

    def generation_kwargs(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        """``generate`` arguments: greedy when temperature is 0, else sampling with this
        temperature, top_p and top_k (0: no top-k cut). They replace the folder's
        generation_config.json values (Qwen's released one has top_k 1, which would make
        any sampling greedy); its other settings, such as repetition_penalty, stay."""
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k if self.top_k > 0 else None)
        else:
            kwargs["do_sample"] = False
        return kwargs

    def ask(self, text: str, images: Sequence[Any] = (), video: Any = None, stream: TextIO | None = None,
            max_new_tokens: int | None = None) -> tuple[str, list[int]]:
        """Answer `text` with `images` (paths or PIL images) and `video` (a path, the
        :class:`ft.video.Clip` :func:`load_video` returns, or ``(frames, fps)``) in the
        user turn, after the conversation so far; keep both turns. Returns the answer
        (special tokens left out) and the ids generated (an end-of-turn token included
        when one ended it).
        With `stream`, the answer is written there as it is generated.

        Raises ChatInputError (conversation unchanged) when a file cannot be used.
        """
        new_images = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        new_videos = []
        if video is not None:
            new_videos.append(load_video(video, self.video) if isinstance(video, (str, os.PathLike)) else as_clip(video))
        content = ([{"type": "image"} for _ in new_images] + [{"type": "video"} for _ in new_videos]
                   + [{"type": "text", "text": text}])
        messages = self.messages + [{"role": "user", "content": content}]
        all_images, all_videos = self.images + new_images, self.videos + new_videos
        inputs = self.inputs(messages, all_images, all_videos)
        prompt_len = inputs["input_ids"].shape[1]
        if self.seed is not None:
            torch.manual_seed(self.seed)
        streamer = _Printer(self.processor.tokenizer, stream) if stream is not None else None
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens), streamer=streamer)
        seconds = time.perf_counter() - start
        ids = out[0, prompt_len:].tolist()
        answer = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images, self.videos = all_images, all_videos
        self.last_inputs = inputs
        self.last_stats = {"prompt_tokens": prompt_len, "new_tokens": len(ids), "seconds": seconds,
                           "tokens_per_s": len(ids) / seconds if seconds > 0 else float("inf")}
        return answer, ids

    def summary(self) -> str:
        """One line on the last answer: tokens, seconds, tokens per second."""
        s = self.last_stats
        return (f"[chat] {s['new_tokens']} new tokens in {s['seconds']:.2f} s, {s['tokens_per_s']:.1f} tokens/s "
                f"(prompt {s['prompt_tokens']} tokens, {self.device.type})")


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ft.chat",
        description="Chat with a Qwen VL model folder (an ft export such as runs/demo/best). With PROMPT, "
                    "answer once and exit; without, read one message per line (" + HELP + ").")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Qwen VL model folder (config.json, weights, "
                   "processor files)")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the question; omit it for an interactive session")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (first) message; repeat for several")
    p.add_argument("--video", metavar="PATH", help="a video file for the (first) message")
    p.add_argument("--video-fps", type=float, default=None,
                   help=f"frames taken per second of video (default: the folder's video_preprocessor_config.json "
                        f"'fps', else {DEFAULT_VIDEO.fps})")
    p.add_argument("--video-max-frames", type=int, default=None,
                   help=f"at most this many frames per video (default: the folder's 'max_frames', else "
                        f"{DEFAULT_VIDEO.max_frames})")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy decoding; > 0: sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (default 0: "
                   "no cut; replaces the folder's generation_config.json top_k)")
    p.add_argument("--seed", type=int, default=None, help="seed torch before each answer (for sampling)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available, else cpu)")
    return p


def _error(message: str) -> None:
    print(f"ft.chat: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # the prompt may come after --image PATH
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a random model's bytes must not crash the print
    try:
        # Folder and media first: a typo fails in a second, before the model loads.
        check_model_dir(args.model_dir)
        sampling = video_sampling(args.model_dir, args.video_fps, args.video_max_frames)
        images = [load_image(path) for path in args.image]
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar: noise beside the answers
        video = load_video(args.video, sampling) if args.video else None
        chat = Chat(args.model_dir, device=args.device, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                    video_fps=sampling.fps, video_max_frames=sampling.max_frames)
    except ChatInputError as e:
        _error(str(e))
        return 2
    except MissingDependency as e:
        _error(str(e))
        return 1
    if args.prompt is not None:
        chat.ask(args.prompt, images=images, video=video, stream=sys.stdout)
        print(chat.summary(), file=sys.stderr, flush=True)
        return 0
    return repl(chat, images, video)


def repl(chat: Chat, images: list | None = None, video: Any = None, stdin: TextIO | None = None) -> int:
    """The interactive session: one message per line of `stdin` (default sys.stdin)."""
    stdin = stdin or sys.stdin
    tty = stdin is sys.stdin and stdin.isatty()
    pending_images, pending_videos = list(images or ()), [video] if video is not None else []
    print(f"ft.chat: {HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ") if tty else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not tty and not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                chat.reset()
                pending_images, pending_videos = [], []
                print("ft.chat: conversation cleared", file=sys.stderr, flush=True)
                continue
            if command == "/image":
                if not arg:
                    raise ChatInputError("/image needs a PATH")
                pending_images.append(load_image(arg))
                print(f"ft.chat: image {arg} goes with the next message", file=sys.stderr, flush=True)
                continue
            if command == "/video":
                if not arg:
                    raise ChatInputError("/video needs a PATH")
                if pending_videos:
                    raise ChatInputError("one video per message: the next message already has one")
                pending_videos.append(load_video(arg, chat.video))
                print(f"ft.chat: video {arg} goes with the next message", file=sys.stderr, flush=True)
                continue
            if command.startswith("/") and command != "/":
                raise ChatInputError(f"unknown command {command}: {HELP}")
            try:
                chat.ask(line, images=pending_images, video=pending_videos[0] if pending_videos else None,
                         stream=sys.stdout)
            except KeyboardInterrupt:  # stop this answer; the conversation is as before it
                print("\nft.chat: interrupted, answer dropped", file=sys.stderr, flush=True)
                continue
            pending_images, pending_videos = [], []
            print(chat.summary(), file=sys.stderr, flush=True)
        except ChatInputError as e:
            _error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

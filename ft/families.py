"""The Qwen VL families ft trains, and everything that differs between them.

This is the one module that names a family's classes. The loop, the sharding backends,
the optimizers and the checkpoints ask a :class:`Family` instead; tests/test_structure.py
fails when any other module of ft names one.

A family says:

- which transformers classes it is built from (`model`, `processor`, ...), by name, in
  `transformers.models.<package>`: a family that the installed transformers lacks is
  refused by name when it is first used, not at import;
- its *roles*: which module classes play the parts ft plans around (the vision tower,
  its own weights outside blocks and mergers, one vision block, the merger, one decoder
  layer). The wrap plan (`ft.fsdp_wrap.WRAP_PLAN`) and the freezable parts
  (`ft.parts.PARTS`) name roles, never classes;
- how one sample's positions are built (the model's own `get_rope_index`, run on the
  config alone: :meth:`Family.inner_class`, `ft.packing.RopeIndex`);
- what its video processor needs to know about the frames (:meth:`video_metadata`);
- the tiny model's config (:meth:`tiny_config`) and the shapes the FLOP count uses
  (:meth:`vision_shape`).

The family of a checkpoint is its config.json's `model_type` (:func:`family_of`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ft.messages import DEFAULT_SYSTEM_PROMPT

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "Family", "FamilyError", "MoeShape", "VisionShape", "family_of", "family_named",
           "config_family", "head_dim", "processor_family", "read_family"]


class FamilyError(ValueError):
    """A model family ft does not train, or one the installed transformers lacks."""


class MoeShape(NamedTuple):
    """What ft needs of a language model whose MLPs are mixtures of experts: the FLOP
    count, the fit check and the load-balancing loss (`ft.moe`) read it."""

    experts: int  # experts per MoE layer
    top_k: int  # experts each token is routed to
    intermediate: int  # one expert's MLP inner size (gated: gate, up, down)
    layers: tuple[int, ...]  # the decoder layers whose MLP is a mixture (the rest are dense)
    aux_coef: float  # the checkpoint's load-balancing loss weight (`router_aux_loss_coef`)


class VisionShape(NamedTuple):
    """What the FLOP count needs of a vision tower (`ft.metrics`)."""

    width: int  # hidden size of the vision blocks
    intermediate: int  # their MLP's inner size
    mlp_matrices: int  # 3 for a gated MLP (gate, up, down), 2 for fc1, fc2
    full_blocks: int  # blocks attending over a whole frame
    window_blocks: int  # blocks attending within windows of `window` pixels
    window: int  # 0 when no block is windowed
    mergers: int  # merger MLPs run on every merged token (1 + Qwen3-VL's DeepStack mergers)
    out: int  # the mergers' output width: the language model's hidden size


@dataclass(frozen=True)
class Family:
    model_type: str
    """config.json's `model_type`."""
    name: str
    package: str
    """`transformers.models.<package>` holds the classes."""
    model: str
    """The ...ForConditionalGeneration class."""
    inner: str
    """The class whose `get_rope_index` builds the M-RoPE positions."""
    config: str
    processor: str
    video_processor: str
    processor_package: str = ""
    """`transformers.models.<processor_package>` holds the processor when the family
    shares another's (Qwen3-VL-MoE takes Qwen3-VL's); empty: `package`."""
    image_processor: str = "Qwen2VLImageProcessor"
    roles: dict[str, str] = field(default_factory=dict)
    """Role -> class name in the modeling module. Roles: `vision_tower`, `vision_own`
    (the tower's weights outside its blocks and mergers), `vision_block`, `merger`,
    `decoder_layer`; a mixture-of-experts family also has `router` (the module whose
    forward returns the router logits, the scores and the chosen experts) and
    `experts` (the fused expert weights)."""
    timestamps: bool = False
    """Each temporal patch of a video is written with its time in text
    (`<1.2 seconds>`) and its own vision start and end tokens (Qwen3-VL): the video
    processor needs the real frame rate and frame indices."""
    default_system: str | None = DEFAULT_SYSTEM_PROMPT
    """The system message the family's chat template inserts when a conversation has
    none (Qwen2-VL and Qwen2.5-VL's published templates do; Qwen3-VL's inserts none):
    training renders the same text, so that prompts match those seen at inference."""
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    tiny_vision: Callable[[int, int, int, int], dict] | None = field(default=None, repr=False)
    """(depth, hidden, heads, out_hidden) -> the tiny model's vision_config."""
    tiny_text: Callable[[dict], dict] | None = field(default=None, repr=False)
    """The tiny model's text_config from the common one (None: as it is)."""
    vision: Callable[[Any], VisionShape] | None = field(default=None, repr=False)
    """vision_config -> the shapes the FLOP count and the fit check read."""
    video_bounds: str = "frame"
    """What the video processor's pixel bounds (`data.video_min_pixels`,
    `video_max_pixels`) bound: each `frame`, or the whole `clip` (frames x height x
    width: Qwen3-VL)."""

    # ------------------------------------------------------------- classes
    def _module(self, kind: str):
        import transformers

        package = (self.processor_package or self.package) if kind == "processing" else self.package
        try:
            return importlib.import_module(f"transformers.models.{package}.{kind}_{package}")
        except ImportError as e:
            raise FamilyError(f"{self.name} (model_type {self.model_type!r}) needs a transformers that has "
                              f"{self.package}; transformers {transformers.__version__} does not ({e})") from e

    def cls(self, role: str) -> type:
        """The module class playing `role` (see :attr:`roles`)."""
        if role not in self.roles:
            raise KeyError(f"{self.name} has no role {role!r}; its roles are {', '.join(self.roles)}")
        return getattr(self._module("modeling"), self.roles[role])

    def model_class(self) -> type:
        return getattr(self._module("modeling"), self.model)

    def config_class(self) -> type:
        return getattr(self._module("configuration"), self.config)

    def processor_class(self) -> type:
        return getattr(self._module("processing"), self.processor)

    def inner_class(self) -> type:
        """The class whose `get_rope_index` builds the positions (`ft.packing.RopeIndex`
        runs it on the config alone)."""
        return getattr(self._module("modeling"), self.inner)

    def rope_takes(self, argument: str) -> bool:
        """Whether `get_rope_index` takes `argument` (`mm_token_type_ids`,
        `second_per_grid_ts`)."""
        return argument in inspect.signature(self.inner_class().get_rope_index).parameters

    # ------------------------------------------------------------- video
    def video_metadata(self, taken: int, sampled_fps: float, indices: list[int], rate: float):
        """The video processor's metadata for `taken` frames already chosen from a clip.

        Qwen2-VL and Qwen2.5-VL place frames on M-RoPE's time axis by the rate of the
        frames taken (`sampled_fps`; Qwen2.5-VL's processor turns it into
        `second_per_grid_ts`). Qwen3-VL writes each temporal patch's time as text, the
        mean of its frames' `index / rate`: it needs the source's frame indices and
        rate (without them its processor warns and assumes 24 fps). A list of frames
        has the indices into the list and `data.video_fps` as its rate."""
        from transformers.video_utils import VideoMetadata

        if self.timestamps:
            return VideoMetadata(total_num_frames=max(indices) + 1, fps=rate, frames_indices=list(indices))
        return VideoMetadata(total_num_frames=taken, fps=sampled_fps)

    # ------------------------------------------------------------- tiny model
    def tiny_config(self, text: dict, vision: dict, ids: dict[str, int], tie: bool, init_std: float):
        """The family's config class built from the tiny text and vision configs."""
        return self.config_class()(
            text_config=self.tiny_text(text) if self.tiny_text else text, vision_config=vision,
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
            tie_word_embeddings=tie, initializer_range=init_std,
        )

    def vision_shape(self, vision_config) -> VisionShape:
        return self.vision(vision_config)

    @property
    def is_moe(self) -> bool:
        return "router" in self.roles

    def moe_shape(self, text_config) -> MoeShape | None:
        """The experts of a mixture-of-experts language model (None for a dense one).
        A layer is sparse unless listed in `mlp_only_layers`, every
        `decoder_sparse_step`-th layer (Qwen3-VL-MoE: all of them)."""
        if not self.is_moe:
            return None
        dense = set(getattr(text_config, "mlp_only_layers", None) or ())
        step = getattr(text_config, "decoder_sparse_step", 1) or 1
        layers = tuple(i for i in range(text_config.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
        return MoeShape(text_config.num_experts, text_config.num_experts_per_tok, text_config.moe_intermediate_size,
                        layers, float(getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0))

    def video_frame_size(self, frames: int, height: int, width: int, video_processor, bounds) -> tuple[int, int]:
        """The (height, width) the video processor gives each of `frames` frames of
        `height` x `width` within `bounds` (its `size`: shortest_edge, longest_edge).
        Raises ValueError for an aspect ratio over 200, as the processor does."""
        factor = video_processor.patch_size * video_processor.merge_size
        resize = _clip_resize if self.video_bounds == "clip" else _per_frame_resize
        return resize(frames, height, width, factor, video_processor.temporal_patch_size,
                      bounds["shortest_edge"], bounds["longest_edge"])


# ================================================================= the families
def _qwen2_vision(depth: int, hidden: int, heads: int, out: int) -> dict:
    return {"depth": depth, "embed_dim": hidden, "mlp_ratio": 2, "num_heads": heads, "hidden_size": out,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _qwen2_5_vision(depth: int, hidden: int, heads: int, out: int) -> dict:
    return {"depth": depth, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": heads,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            # 56 px = 2x2 merged tokens per window, so 112 px images already span several
            # windows and the windowed-attention path is exercised.
            "window_size": 56,
            # Every second block attends globally, as every 8th does in the real tower.
            "fullatt_block_indexes": [i for i in range(depth) if i % 2 == 1],
            "out_hidden_size": out}


def _qwen3_vision(depth: int, hidden: int, heads: int, out: int) -> dict:
    return {"depth": depth, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": heads,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": out,
            # 8x8 learned positions, interpolated to each image's grid (real: 48x48).
            "num_position_embeddings": 64,
            # DeepStack: the features after these blocks go to the first decoder layers
            # (real 8B: [8, 16, 24] of 27 blocks), every block but the last here.
            "deepstack_visual_indexes": list(range(max(1, depth - 1)))}


def _qwen3_text(text: dict) -> dict:
    """Qwen3's text model states its head size, and interleaves the M-RoPE frequencies."""
    rope = {**text["rope_parameters"], "mrope_interleaved": True}
    return {**text, "head_dim": text["hidden_size"] // text["num_attention_heads"], "rope_parameters": rope}


def _qwen3_moe_text(text: dict) -> dict:
    """Top-2 of 8 experts in every layer, each expert `hidden` wide: the active MLP is
    2 x hidden, as the dense tiny Qwen3-VL's (its dense twin). The real 30B-A3B routes
    to 8 of 128."""
    return {**_qwen3_text(text), "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": text["hidden_size"], "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001, "output_router_logits": False}


def _per_frame_resize(frames, height, width, factor, temporal, min_pixels, max_pixels) -> tuple[int, int]:
    """Qwen2-VL's and Qwen2.5-VL's video processor: each frame within the bounds."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _clip_resize(frames, height, width, factor, temporal, min_pixels, max_pixels) -> tuple[int, int]:
    """Qwen3-VL's video processor: the bounds are on the whole clip (frames x height x
    width), with ft's `cap_pixels_per_frame=False`."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    return smart_resize(frames, height, width, temporal_factor=temporal, factor=factor,
                        min_pixels=min_pixels, max_pixels=max_pixels)


def _qwen2_shape(v) -> VisionShape:
    return VisionShape(v.embed_dim, int(v.embed_dim * v.mlp_ratio), 2, v.depth, 0, 0, 1, v.hidden_size)


def _qwen2_5_shape(v) -> VisionShape:
    full = len(v.fullatt_block_indexes)
    return VisionShape(v.hidden_size, v.intermediate_size, 3, full, v.depth - full, v.window_size, 1,
                       v.out_hidden_size)


def _qwen3_shape(v) -> VisionShape:
    return VisionShape(v.hidden_size, v.intermediate_size, 2, v.depth, 0, 0, 1 + len(v.deepstack_visual_indexes),
                       v.out_hidden_size)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(
        "qwen2_vl", "Qwen2-VL", "qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2VLConfig",
        "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
        roles={"vision_tower": "Qwen2VisionTransformerPretrainedModel", "vision_own": "PatchEmbed",
               "vision_block": "Qwen2VLVisionBlock", "merger": "PatchMerger", "decoder_layer": "Qwen2VLDecoderLayer"},
        tiny_vision=_qwen2_vision, vision=_qwen2_shape,
    ),
    Family(
        "qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
        "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
        roles={"vision_tower": "Qwen2_5_VisionTransformerPretrainedModel", "vision_own": "Qwen2_5_VisionPatchEmbed",
               "vision_block": "Qwen2_5_VLVisionBlock", "merger": "Qwen2_5_VLPatchMerger",
               "decoder_layer": "Qwen2_5_VLDecoderLayer"},
        tiny_vision=_qwen2_5_vision, vision=_qwen2_5_shape,
    ),
    Family(
        "qwen3_vl", "Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel", "Qwen3VLConfig",
        "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
        # The tower's own weights include its learned position embedding (an
        # nn.Embedding beside patch_embed), which no class of its own holds: the whole
        # tower is that unit, its blocks and mergers nested units of their own.
        roles={"vision_tower": "Qwen3VLVisionModel", "vision_own": "Qwen3VLVisionModel",
               "vision_block": "Qwen3VLVisionBlock", "merger": "Qwen3VLVisionPatchMerger",
               "decoder_layer": "Qwen3VLTextDecoderLayer"},
        timestamps=True, default_system=None, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        tiny_vision=_qwen3_vision, vision=_qwen3_shape, video_bounds="clip",
        tiny_text=_qwen3_text,
    ),
    Family(
        "qwen3_vl_moe", "Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel",
        "Qwen3VLMoeConfig", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", processor_package="qwen3_vl",
        roles={"vision_tower": "Qwen3VLMoeVisionModel", "vision_own": "Qwen3VLMoeVisionModel",
               "vision_block": "Qwen3VLMoeVisionBlock", "merger": "Qwen3VLMoeVisionPatchMerger",
               "decoder_layer": "Qwen3VLMoeTextDecoderLayer", "router": "Qwen3VLMoeTextTopKRouter",
               "experts": "Qwen3VLMoeTextExperts"},
        timestamps=True, default_system=None, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        tiny_vision=_qwen3_vision, vision=_qwen3_shape, video_bounds="clip",
        tiny_text=_qwen3_moe_text,
    ),
)}

DEFAULT_FAMILY = "qwen2_5_vl"
"""The tiny demo model's family unless `model.tiny_family` says otherwise."""


def head_dim(text_config) -> int:
    """The attention head size of a family's language model: Qwen3 states it (64 heads
    of 128 on the 5120-wide 32B), Qwen2 derives it from the hidden size."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def family_named(model_type: str, where: str = "model_type") -> Family:
    """The family of `model_type`; FamilyError naming `where` and the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{t} ({f.name})" for t, f in FAMILIES.items())
        raise FamilyError(f"{where} is {model_type!r}: ft trains {supported}")
    return FAMILIES[model_type]


def family_of(config: Any) -> Family:
    """The family of a model config (a transformers config, a config.json dict, or a
    model whose `.config` is one)."""
    config = getattr(config, "config", config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return family_named(str(model_type))


def processor_family(processor) -> Family:
    """The family whose processor class `processor` is (a subclass counts); of families
    sharing a processor (Qwen3-VL and Qwen3-VL-MoE), the first: they share its data
    rules too (timestamps, video bounds, the default system message)."""
    for cls in type(processor).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ == family.processor:
                return family
    raise FamilyError(f"{type(processor).__name__} is the processor of no family ft trains "
                      f"({', '.join(f.processor for f in FAMILIES.values())})")


def config_family(config_file: str | os.PathLike) -> Family:
    """The family a checkpoint's config.json names (its `model_type`), read without
    transformers. FamilyError naming the file, for a model_type of no family ft trains;
    OSError or ValueError for a file that cannot be read as JSON."""
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return family_named(str(model_type), f"{os.fspath(config_file)}: model_type")


def read_family(path: str | os.PathLike) -> Family:
    """The family of the checkpoint folder `path` (:func:`config_family`), read before
    transformers parses its config.json (a model_type this transformers lacks fails
    there with a less useful message), and checked to be importable. FamilyError names
    the file."""
    config_file = os.path.join(os.fspath(path), "config.json")
    family = config_family(config_file)
    try:
        family.model_class()
    except FamilyError as e:
        raise FamilyError(f"{config_file}: {e}") from None
    return family

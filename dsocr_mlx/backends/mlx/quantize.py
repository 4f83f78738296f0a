"""Quantization through ``nn.quantize``: which modules, and the quantized stacked experts."""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


class QuantizedSwitchLinear(nn.Module):
    """Stacked expert weights, quantized, applied with a gathered quantized matmul."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        q = mx.quantize(weight, group_size, bits, mode=mode)
        self.weight, self.scales = q[0], q[1]
        if len(q) > 2 and q[2] is not None:
            self.biases = q[2]
        self.freeze()

    @property
    def compute_dtype(self) -> mx.Dtype | None:
        # Affine scales carry the float dtype; the microscaling modes take any float input.
        return self.scales.dtype if self.mode == "affine" else None

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


BITS = (2, 3, 4, 5, 6, 8)
KINDS = ("experts", "attention", "mlp", "lm_head", "embed_tokens", "vision")

# Mixed-precision recipes, named as mlx-lm's and mlx-vlm's ``--quant-predicate`` values: ``mixed_LOW_HIGH``.
# Their rule (from llama.cpp's Q4_K_M) raises v_proj and down_proj in a third of the layers; in this MoE model
# the routed experts hold 88 % of the weights the decoder quantizes (2.4 of 2.8 billion) and each token uses 6
# of 64, while every token goes through attention, the shared experts, the dense first layer and lm_head. So
# the split is by layer kind: the routed experts take LOW bits, the other decoder layers HIGH bits.
RECIPES = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_5": (3, 5),
    "mixed_3_6": (3, 6),
    "mixed_3_8": (3, 8),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
}


@dataclass
class QuantPolicy:
    """What to quantize, per layer kind: True at ``bits``, a number of bits, or False (kept float). The vision
    towers, projector, router, norms and layout embeddings stay float unless asked."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    attention: bool | int = True  # decoder q/k/v/o projections
    mlp: bool | int = True  # the dense SwiGLU and the shared experts
    experts: bool | int = True  # the routed experts
    lm_head: bool | int = True
    embed_tokens: bool | int = False
    vision: bool | int = False  # SAM, CLIP and Qwen2-encoder linear layers (convolutions always stay float)
    recipe: str | None = None  # the named recipe this policy came from, recorded in config.json

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.bits not in BITS:
            raise ValueError(f"quantization bits must be 2, 3, 4, 5, 6 or 8, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"quantization group size must be 16, 32, 64 or 128, got {self.group_size}")
        for kind in KINDS:
            value = getattr(self, kind)
            if not isinstance(value, bool) and value not in BITS:
                raise ValueError(f"{kind}: quantization bits must be 2, 3, 4, 5, 6 or 8 (or True/False), got {value}")
        if self.mode != "affine" and self.mixed:
            raise ValueError(f"{self.mode} has one bit width: mixed bits per layer kind need the affine mode")

    def kind_bits(self, kind: str) -> int | None:
        """The bits a layer kind is quantized with, None where it stays float."""
        value = getattr(self, kind)
        return (self.bits if value else None) if isinstance(value, bool) else value

    @property
    def mixed(self) -> bool:
        """Whether the quantized kinds use more than one bit width."""
        return len({b for b in map(self.kind_bits, KINDS) if b is not None} | {self.bits}) > 1

    def params(self, kind: str) -> dict | None:
        """``to_quantized`` arguments for a layer of ``kind``, None where it stays float."""
        bits = self.kind_bits(kind)
        return None if bits is None else {"group_size": self.group_size, "bits": bits, "mode": self.mode}

    def config(self, modules: dict[str, dict] | None = None) -> dict:
        """The ``quantization`` block written into a converted ``config.json``: the top-level parameters, the
        policy, and for mixed bits each quantized module's own parameters (``modules``), as mlx-lm records
        its recipes, so that the folder loads and dequantizes without flags."""
        out = {
            "group_size": self.group_size,
            "bits": self.bits,
            "mode": self.mode,
            "policy": {k: getattr(self, k) for k in KINDS},
        }
        if self.recipe:
            out["recipe"] = self.recipe
        if self.mixed:
            out.update({path: dict(params) for path, params in sorted((modules or {}).items())})
        return out


def recipe_policy(
    name: str, group_size: int = 64, mode: str = "affine", overrides: dict[str, bool | int] | None = None
) -> QuantPolicy:
    """The policy of a named recipe (:data:`RECIPES`): routed experts at its low bits; attention, shared experts,
    dense MLP and lm_head at its high bits; token embeddings and vision towers float. ``overrides`` change a
    kind: True quantizes it (experts at the low bits, any other kind at the high), a number sets its bits,
    False keeps it float."""
    if name not in RECIPES:
        raise ValueError(f"unknown quantization recipe {name!r}: choose one of {', '.join(RECIPES)}")
    if mode != "affine":
        raise ValueError(f"recipe {name} mixes bit widths, which only the affine mode has (not {mode})")
    low, high = RECIPES[name]
    kinds: dict[str, bool | int] = {"experts": low, "attention": high, "mlp": high, "lm_head": high}
    for kind, value in (overrides or {}).items():
        kinds[kind] = (low if kind == "experts" else high) if value is True else value
    return QuantPolicy(bits=low, group_size=group_size, mode=mode, recipe=name, **kinds)


_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj$")
_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate|up|down)_proj$")
_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj$")
_VISION = re.compile(r"^model\.(sam_model|vision_model|qwen2_model)\..*")


def layer_kind(path: str, module: nn.Module) -> str | None:
    """Which :data:`KINDS` entry a module is, None for the layers that always stay float."""
    if _EXPERTS.match(path):
        return "experts"
    if _ATTENTION.match(path):
        return "attention"
    if _MLP.match(path):
        return "mlp"
    if path == "lm_head":
        return "lm_head"
    if path == "model.embed_tokens":
        return "embed_tokens"
    if _VISION.match(path) and isinstance(module, nn.Linear):
        return "vision"
    return None


def quant_predicate(policy: QuantPolicy):
    """``(path, module) -> to_quantized arguments or False`` for ``nn.quantize``, skipping rows that do not
    split into groups."""

    def predicate(path: str, module: nn.Module) -> dict | bool:
        if not hasattr(module, "to_quantized") or isinstance(module, nn.Conv2d):
            return False
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[-1] % policy.group_size:
            return False
        kind = layer_kind(path, module)
        return (kind is not None and policy.params(kind)) or False

    return predicate


def quantized_modules(model: nn.Module, policy: QuantPolicy) -> dict[str, dict]:
    """``{path: to_quantized arguments}`` of every module ``policy`` quantizes (read from a skeleton)."""
    predicate = quant_predicate(policy)
    return {path: params for path, module in model.named_modules() if path and (params := predicate(path, module))}


def quantize_model(model: nn.Module, policy: QuantPolicy) -> dict:
    """Quantize ``model`` in place; returns the config block that lets it load again without flags."""
    modules = quantized_modules(model, policy)
    nn.quantize(
        model,
        policy.group_size,
        policy.bits,
        mode=policy.mode,
        class_predicate=lambda path, _: dict(modules[path]) if path in modules else False,
    )
    return policy.config(modules)


def packed_params(path: str, module: nn.Module, weights: dict[str, mx.array]) -> dict | None:
    """The group size, bits and mode a saved weight was packed with, read from its shapes (mlx-lm's
    ``infer_quant_config``): None where they do not tell (the config's parameters apply)."""
    weight, scales = weights.get(f"{path}.weight"), weights[f"{path}.scales"]
    in_dims = module.weight.shape[-1]
    if weight is None or scales.shape[-1] == 0 or in_dims % scales.shape[-1]:
        return None
    group_size, bits = in_dims // scales.shape[-1], weight.shape[-1] * 32 // in_dims
    if scales.dtype != mx.uint8:  # only affine keeps its scales in a float dtype
        return {"group_size": group_size, "bits": bits, "mode": "affine"} if bits in BITS else None
    mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group_size))
    return None if mode is None else {"group_size": group_size, "bits": bits, "mode": mode}


_DEFAULTS = {"group_size": 64, "bits": 4, "mode": "affine"}  # what an entry that omits a parameter means


def quantize_like(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Prepare ``model`` for a quantized checkpoint: quantize exactly the modules that have scales saved, each
    with the parameters ``config.json`` gives it (mlx-lm's per-module entries), else those its packed shapes
    tell, else the config's top-level ones."""

    def predicate(path: str, module: nn.Module) -> dict | bool:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        own = quantization.get(path)
        if isinstance(own, dict):
            return _DEFAULTS | {k: own[k] for k in _DEFAULTS if k in own}
        return packed_params(path, module, weights) or True

    top = _DEFAULTS | {k: quantization[k] for k in _DEFAULTS if k in quantization}
    nn.quantize(model, top["group_size"], top["bits"], mode=top["mode"], class_predicate=predicate)

"""Quantization through ``nn.quantize``: which modules, and the quantized stacked experts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

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


@dataclass
class QuantPolicy:
    """What to quantize. The vision towers, projector, router, norms and layout embeddings stay float."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    attention: bool = True  # decoder q/k/v/o projections
    mlp: bool = True  # the dense SwiGLU and the shared experts
    experts: bool = True  # the routed experts
    lm_head: bool = True
    embed_tokens: bool = False
    vision: bool = False  # SAM, CLIP and Qwen2-encoder linear layers (convolutions always stay float)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"quantization bits must be 2, 3, 4, 5, 6 or 8, got {self.bits}")
        if self.group_size not in (16, 32, 64, 128):
            raise ValueError(f"quantization group size must be 16, 32, 64 or 128, got {self.group_size}")

    def config(self) -> dict:
        """The ``quantization`` block written into a converted ``config.json``."""
        return {
            "group_size": self.group_size,
            "bits": self.bits,
            "mode": self.mode,
            "policy": {k: v for k, v in asdict(self).items() if k not in ("group_size", "bits", "mode")},
        }


_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj$")
_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate|up|down)_proj$")
_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj$")
_VISION = re.compile(r"^model\.(sam_model|vision_model|qwen2_model)\..*")


def quant_predicate(policy: QuantPolicy):
    """``(path, module) -> bool`` for ``nn.quantize``, skipping rows that do not split into groups."""

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized") or isinstance(module, nn.Conv2d):
            return False
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[-1] % policy.group_size:
            return False
        if _EXPERTS.match(path):
            return policy.experts
        if _ATTENTION.match(path):
            return policy.attention
        if _MLP.match(path):
            return policy.mlp
        if path == "lm_head":
            return policy.lm_head
        if path == "model.embed_tokens":
            return policy.embed_tokens
        if _VISION.match(path):
            return policy.vision and isinstance(module, nn.Linear)
        return False

    return predicate


def quantize_model(model: nn.Module, policy: QuantPolicy) -> dict:
    """Quantize ``model`` in place; returns the config block that lets it load again without flags."""
    nn.quantize(model, policy.group_size, policy.bits, mode=policy.mode, class_predicate=quant_predicate(policy))
    return policy.config()


def quantize_like(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Prepare ``model`` for a quantized checkpoint: quantize exactly the modules that have scales saved."""

    def predicate(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        quantization.get("group_size", 64),
        quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )

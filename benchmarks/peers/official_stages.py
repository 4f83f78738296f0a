"""Stage timings of the official DeepSeek-OCR code (HF remote code): on CPU in float32, or on CUDA in bfloat16.

Runs inside the peer environment (torch, transformers 4.46.3), never in ours. On CUDA it runs as the
official ``infer()`` does: weights in bfloat16 on the GPU, generation under bfloat16 autocast. ``--code`` is the
folder holding the official ``.py`` files from the model's Hugging Face repo; they are imported from a
temporary copy and never stored in this repository. Inputs come from the official ``infer()`` itself
(its ``generate`` is intercepted), so preprocessing and token layout are the official ones. Prints one
JSON object with the same stage keys as ``dsocr_mlx.bench.time_once``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
import shutil
import sys
import tempfile
import time
import types

from stages import print_summary, stage_parser

CODE_FILES = (
    "modeling_deepseekocr.py",
    "deepencoder.py",
    "modeling_deepseekv2.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
)
PACKAGE = "deepseek_ocr_reference"


def _install_torchvision_stand_in() -> None:
    """The official code uses only ToTensor, Normalize, Compose and InterpolationMode from torchvision.

    A torchvision wheel matching a CPU-only torch is often not installable, so these four are provided
    with torchvision's arithmetic (uint8 / 255, then (x - mean) / std) when the real one cannot load.
    """
    try:
        import torchvision.transforms  # noqa: F401

        return
    except Exception:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    import enum

    import numpy as np
    import torch

    class ToTensor:
        def __call__(self, pic):
            array = np.asarray(pic, dtype=np.uint8)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub(mean).div(std)

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        LANCZOS = "lanczos"

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.ToTensor, transforms.Normalize, transforms.Compose = ToTensor, Normalize, Compose
    transforms.InterpolationMode = functional.InterpolationMode = InterpolationMode
    transforms.functional, root.transforms = functional, transforms
    sys.modules.update(
        {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    )


def import_reference(code_dir: str, scratch: str, device: str):
    """Import the official files as a package from a temporary copy; ``.cuda()`` becomes a no-op on CPU."""
    import torch

    missing = [f for f in CODE_FILES if not os.path.isfile(os.path.join(code_dir, f))]
    if missing:
        raise SystemExit(
            f"error: {code_dir} lacks the official file(s) {', '.join(missing)}; pass the folder "
            "that holds the .py files of deepseek-ai/DeepSeek-OCR"
        )
    package = os.path.join(scratch, PACKAGE)
    os.makedirs(package)
    for name in CODE_FILES:
        shutil.copy(os.path.join(code_dir, name), package)
    open(os.path.join(package, "__init__.py"), "w").close()
    _install_torchvision_stand_in()
    if device == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, scratch)
    return importlib.import_module(f"{PACKAGE}.modeling_deepseekocr")


class _Intercepted(Exception):
    pass


def official_inputs(model, tokenizer, image_path, prompt, base_size, image_size, crop) -> dict:
    """Run the official ``infer()`` up to its ``generate`` call and return that call's arguments."""
    captured = {}

    def capture(input_ids, **kwargs):
        captured.update(kwargs, input_ids=input_ids)
        raise _Intercepted

    model.generate = capture
    try:
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(open(os.devnull, "w")):
            model.infer(
                tokenizer,
                prompt=prompt,
                image_file=image_path,
                output_path=out,
                base_size=base_size,
                image_size=image_size,
                crop_mode=crop,
                eval_mode=True,
            )
    except _Intercepted:
        pass
    finally:
        del model.generate
    return captured


def synchronize(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


class VisionClock:
    """Times each SAM -> projector pass (tiles first, then the global view, as the official forward runs)."""

    def __init__(self, model, device: str):
        self.spans, self._start, self.device = [], None, device
        inner = model.model
        inner.sam_model.register_forward_pre_hook(lambda *_: self._begin())
        inner.projector.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        synchronize(self.device)  # GPU work is asynchronous: wait for what came before
        self._start = time.perf_counter()

    def _end(self) -> None:
        synchronize(self.device)
        self.spans.append(time.perf_counter() - self._start)


class TokenClock:
    """A generate() streamer that only records when each new token arrives."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


def time_once(model, tokenizer, vision, args, tokens):
    import torch

    t0 = time.perf_counter()
    inputs = official_inputs(model, tokenizer, args.image, args.prompt, args.base_size, args.image_size, args.crop)
    t1 = time.perf_counter()
    crops, global_view = inputs["images"][0]
    n_tiles = crops.shape[0] if bool(crops.abs().sum() > 0) else 0
    clock = TokenClock()
    vision.spans.clear()
    if args.device == "cpu":
        images, autocast = [(crops.float(), global_view.float())], contextlib.nullcontext()
    else:  # as the official infer() calls generate on CUDA
        images, autocast = [(crops, global_view)], torch.autocast("cuda", dtype=torch.bfloat16)
    synchronize(args.device)
    start = time.perf_counter()
    with autocast, torch.no_grad():
        model.generate(
            inputs["input_ids"],
            images=images,
            images_seq_mask=inputs["images_seq_mask"],
            images_spatial_crop=inputs["images_spatial_crop"],
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            use_cache=True,
            streamer=clock,
        )
    end = time.perf_counter()
    first = clock.times[0]
    vision_s = sum(vision.spans)
    n_prompt = inputs["input_ids"].shape[1]
    return {
        "preprocess_s": t1 - t0,
        "vision_global_s": vision.spans[-1],
        "vision_per_tile_s": vision.spans[0] / n_tiles if n_tiles else 0.0,
        "vision_s": vision_s,
        "prefill_tps": n_prompt / max(first - start - vision_s, 1e-9),
        "ttft_s": (t1 - t0) + (first - start),
        "decode_tps": (len(clock.times) - 1) / (end - first) if len(clock.times) > 1 else 0.0,
        "postprocess_s": 0.0,
        "prompt_tokens": n_prompt,
        "image_tokens": int(inputs["images_seq_mask"].sum()),
        "tiles": n_tiles,
    }


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--code", required=True, help="folder with the official .py files")
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as scratch:
        reference = import_reference(args.code, scratch, args.device)
        t = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dtype = getattr(torch, args.dtype)
        model = reference.DeepseekOCRForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval()
        if args.device != "cpu":  # the official way: load on the CPU, then move to the GPU
            model = model.to(args.device)
            synchronize(args.device)
        load_s = time.perf_counter() - t
        vision = VisionClock(model, args.device)
        time_once(model, tokenizer, vision, args, min(args.tokens, 4))  # warm-up
        runs = [time_once(model, tokenizer, vision, args, args.tokens) for _ in range(args.trials)]
    if args.device == "cpu":
        name, peak = "official (HF, torch CPU)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    else:
        name, peak = f"official (HF, torch {args.device})", torch.cuda.max_memory_allocated() / 1e9
    print_summary(name, {"torch": torch.__version__, "transformers": transformers.__version__}, load_s, peak, runs)


if __name__ == "__main__":
    main()

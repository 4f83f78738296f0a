"""Image preprocessing and prompt building, exactly as the official ``infer()`` does (numpy and PIL only).

Every backend consumes the same :class:`ProcessedInputs`: token ids with the ``<image>`` placeholders,
the mask of their positions, the tile grid per image, and bf16-rounded pixels in NCHW float32.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .modes import OCR1, Mode, family_mode

IMAGE_TOKEN = "<image>"
PATCH_SIZE = 16
DOWNSAMPLE_RATIO = 4
TILE_SIZE = 640  # DeepSeek-OCR's gundam tiles; each Mode names its own
MIN_TILES, MAX_TILES = 2, 9
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# ImageOps.pad fills with the mean colour as the official code computes it: int(0.5 * 255) = 127.
PAD_COLOR = tuple(int(m * 255) for m in IMAGE_MEAN)


ImageInput = Union[str, Path, bytes, "Image.Image", np.ndarray]


@dataclass
class ProcessedInputs:
    """Model inputs for one prompt, as the reference builds them.

    Attributes:
        input_ids: ``(L,)`` int64 token ids, BOS first, one id per ``<image>`` placeholder position.
        images_seq_mask: ``(L,)`` bool, True at the image-token positions.
        images_spatial_crop: ``(n_images, 2)`` int64 ``[width_tiles, height_tiles]`` per image.
        global_pixels: ``(n_images, 3, S, S)`` float32 global views, normalised and rounded to bf16.
        crop_pixels: ``(n_tiles, 3, T, T)`` float32 tiles of all images in order (0 rows if none); T is
            the mode's tile size (640 for DeepSeek-OCR's gundam, 768 for DeepSeek-OCR-2).
        image_sizes: ``(width, height)`` of each original image, for mapping boxes back.
        prompt: the formatted prompt text.
    """

    input_ids: np.ndarray
    images_seq_mask: np.ndarray
    images_spatial_crop: np.ndarray
    global_pixels: np.ndarray
    crop_pixels: np.ndarray
    image_sizes: list[tuple[int, int]]
    prompt: str

    @property
    def num_image_tokens(self) -> int:
        return int(self.images_seq_mask.sum())


def get_mode(mode: str | Mode | None, family: str = OCR1) -> Mode:
    """The :class:`Mode` named ``mode`` of the model ``family`` (None: its official default)."""
    if isinstance(mode, Mode):
        return mode
    return family_mode(family, mode)


# Raster formats only: Pillow's other openers (EPS through Ghostscript, for one) are not for untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(
    source: str | Path | io.BytesIO, name: str, max_pixels: int | None = None, decode: bool = True
) -> Image.Image:
    """Open and decode an image file or buffer, in the raster formats of :data:`IMAGE_FORMATS` only.

    ``max_pixels`` refuses larger images from their header, before any pixel is decoded (default:
    Pillow's decompression-bomb limit). With ``decode=False`` only the header is read and checked.

    Raises:
        ValueError: not a readable image in a supported format, too many pixels, or a failing decoder,
            with ``name`` (the file, or "the image") in the message.
    """
    Image.init()  # registers every opener, so the formats named below are known
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name} declares too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError(f"{name} is not a readable image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{name} declares {width}x{height} pixels, more than the limit of {max_pixels}")
    if not decode:
        return img
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - a decoder may fail in any way on hostile bytes: one clear error
        raise ValueError(f"{name} is not a readable image: it is truncated or corrupt ({e})") from None
    return img


def check_image(data: bytes, max_pixels: int) -> None:
    """Refuse untrusted image bytes from their header alone: a format outside :data:`IMAGE_FORMATS`, or
    more than ``max_pixels`` pixels (a truncated body shows only when :func:`decode_image` decodes it)."""
    open_image(io.BytesIO(data), "the image", max_pixels, decode=False)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode untrusted image bytes into an RGB image, refusing decompression bombs before decoding pixels.

    Raises:
        ValueError: the bytes are not a complete image in a supported format, or declare more than
            ``max_pixels`` pixels (checked from the header, before any pixel is decoded).
    """
    return load_image(open_image(io.BytesIO(data), "the image", max_pixels))


def load_image(image: ImageInput) -> Image.Image:
    """Open an image from a path, bytes, PIL image or HxW[xC] uint8 array; EXIF-transposed RGB.

    Files and bytes are decoded as :func:`open_image` does: supported raster formats only, clear errors.
    """
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"an image array must be uint8 HxW, HxWx1, HxWx3 or HxWx4, got {image.dtype} {image.shape}"
            )
        img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = open_image(io.BytesIO(bytes(image)), "the image bytes")
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        img = open_image(path, str(path))
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, bytes, PIL.Image or numpy array")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image (the reference falls back too)
        pass
    if img.width < 1 or img.height < 1:
        raise ValueError(f"the image is empty ({img.width}x{img.height})")
    return img.convert("RGB")


def _closest_aspect_ratio(
    aspect: float, ratios: list[tuple[int, int]], width: int, height: int, tile: int
) -> tuple[int, int]:
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            # Ties go to the later (larger) grid only when the image has the pixels for it.
            best = ratio
    return best


def tile_grid(
    width: int, height: int, tile: int = TILE_SIZE, min_num: int = MIN_TILES, max_num: int = MAX_TILES
) -> tuple[int, int]:
    """The official ``dynamic_preprocess`` choice of ``(columns, rows)`` for an image."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    return _closest_aspect_ratio(width / height, ratios, width, height, tile)


def split_tiles(img: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    cols, rows = grid
    resized = img.resize((tile * cols, tile * rows))
    return [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def normalize(img: Image.Image) -> np.ndarray:
    """``ToTensor`` + ``Normalize(0.5, 0.5)`` + ``.to(bfloat16)``: CHW float32 holding bf16 values."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    x = (x - mean) / std
    return round_to_bfloat16(x.transpose(2, 0, 1))


def num_queries(size: int) -> int:
    """Image tokens per side for a view of ``size`` pixels: patch 16, then 4x downsampling."""
    return math.ceil((size // PATCH_SIZE) / DOWNSAMPLE_RATIO)


def image_token_count(grid: tuple[int, int], mode: Mode) -> int:
    """Number of ``<image>`` placeholders for one image with tile grid ``(columns, rows)``.

    With newlines (DeepSeek-OCR) each row of tokens ends with one more; without (DeepSeek-OCR-2) a view
    of ``n x n`` tokens takes ``n * n``. Either way the global view is followed by one separator.
    """
    if not mode.newlines:
        n_base, n_tile = num_queries(mode.base_size), num_queries(mode.image_size)
        count = n_base * n_base + 1
        if grid[0] > 1 or grid[1] > 1:
            count += n_tile * n_tile * grid[0] * grid[1]
        return count
    if not mode.crop_mode:
        n = num_queries(mode.image_size)
        return (n + 1) * n + 1
    n_base, n_tile = num_queries(mode.base_size), num_queries(mode.image_size)
    count = (n_base + 1) * n_base + 1
    if grid[0] > 1 or grid[1] > 1:
        count += (n_tile * grid[0] + 1) * (n_tile * grid[1])
    return count


def process_image(img: Image.Image, mode: Mode) -> tuple[np.ndarray, list[np.ndarray], tuple[int, int]]:
    """One image -> (global view CHW, tiles CHW, (columns, rows))."""
    if mode.crop_mode:
        tile = mode.image_size
        if img.width <= tile and img.height <= tile:
            grid, tiles = (1, 1), []
        else:
            grid = tile_grid(img.width, img.height, tile, mode.min_tiles, mode.max_tiles)
            tiles = [normalize(t) for t in split_tiles(img, grid, tile)]
        global_view = ImageOps.pad(img, (mode.base_size, mode.base_size), color=PAD_COLOR)
        return normalize(global_view), tiles, grid
    view = img
    if mode.image_size <= TILE_SIZE:
        view = img.resize((mode.image_size, mode.image_size))  # direct resize, aspect not kept (as official)
    view = ImageOps.pad(view, (mode.image_size, mode.image_size), color=PAD_COLOR)
    return normalize(view), [], (1, 1)


def prepare_inputs(
    images: list[ImageInput] | ImageInput | None,
    prompt: str,
    tokenizer: Any,
    mode: str | Mode | None = None,
    image_token_id: int = 128815,
    bos_token_id: int = 0,
    family: str = OCR1,
) -> ProcessedInputs:
    """Build the model inputs for ``prompt`` with one ``<image>`` placeholder per image.

    Args:
        images: one image or a list, in the order of the ``<image>`` placeholders.
        prompt: the user prompt, e.g. ``"<image>\\n<|grounding|>Convert the document to markdown."``.
        tokenizer: an object with ``encode(text) -> list[int]`` (no special tokens added).
        mode: a mode of the model ``family`` (None: its official default): DeepSeek-OCR's ``tiny``,
            ``small``, ``base``, ``large``, ``gundam``; DeepSeek-OCR-2's ``default``.
        family: ``deepseek-ocr`` or ``deepseek-ocr-2`` (:data:`~dsocr_mlx.modes.MODES_BY_FAMILY`).

    Returns:
        The :class:`ProcessedInputs` of the official ``plain`` template.
    """
    mode = get_mode(mode, family)
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    # The 'plain' template is the stripped user content; the assistant turn adds nothing.
    text = prompt.strip()
    splits = text.split(IMAGE_TOKEN)
    if len(splits) - 1 != len(images):
        raise ValueError(
            f"the prompt has {len(splits) - 1} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) were given; "
            f"put one {IMAGE_TOKEN} in the prompt per image"
        )
    pil_images = [load_image(im) for im in images]

    ids: list[int] = []
    mask: list[bool] = []
    globals_, tiles, grids = [], [], []
    for split, img in zip(splits, pil_images):
        split_ids = tokenizer.encode(split)
        ids += split_ids
        mask += [False] * len(split_ids)
        global_view, image_tiles, grid = process_image(img, mode)
        globals_.append(global_view)
        tiles += image_tiles
        grids.append(grid)
        n = image_token_count(grid, mode)
        ids += [image_token_id] * n
        mask += [True] * n
    last_ids = tokenizer.encode(splits[-1])
    ids = [bos_token_id] + ids + last_ids
    mask = [False] + mask + [False] * len(last_ids)

    view = mode.base_size if mode.crop_mode else mode.image_size
    return ProcessedInputs(
        input_ids=np.asarray(ids, dtype=np.int64),
        images_seq_mask=np.asarray(mask, dtype=bool),
        images_spatial_crop=np.asarray(grids, dtype=np.int64).reshape(-1, 2),
        global_pixels=(np.stack(globals_) if globals_ else np.zeros((0, 3, view, view), np.float32)),
        crop_pixels=(np.stack(tiles) if tiles else np.zeros((0, 3, mode.image_size, mode.image_size), np.float32)),
        image_sizes=[(im.width, im.height) for im in pil_images],
        prompt=text,
    )

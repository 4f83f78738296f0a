"""Preprocessing and prompt building: the golden cases of the official ``infer()`` bit for bit, plus the
rules behind them (token counts, tile grids, resize vs pad, bf16 pixels) and image loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dsocr_mlx.modes import MODES_BY_FAMILY, OCR1, OCR2
from dsocr_mlx.processing import (
    PAD_COLOR,
    image_token_count,
    load_image,
    prepare_inputs,
    round_to_bfloat16,
    tile_grid,
)
from dsocr_mlx.random_checkpoint import tokenizer_files
from dsocr_mlx.tokenizer import Tokenizer

MODES = MODES_BY_FAMILY[OCR1]
IMAGE_TOKEN_ID = 128815
# The bf16 value of the normalised pad colour 127: (127/255 - 0.5) / 0.5 = -0.0039215684 -> bf16.
PAD_BF16 = -0.003936767578125


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_files()["tokenizer.json"].decode()))


# ----------------------------------------------------------------------------------------------------
# Golden cases


def _golden_case_ids() -> list[str]:
    """Case ids to parametrise over; a placeholder without data (``golden_dir`` then skips or fails)."""
    try:
        return [c["id"] for c in json.loads((Path(os.environ["DSOCR_GOLDEN"]) / "cases.json").read_text())]
    except (KeyError, OSError, ValueError):
        return ["golden"]


@pytest.fixture(scope="module")
def golden_cases(golden_dir) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((golden_dir / "cases.json").read_text())}


@pytest.fixture(scope="module")
def processed(golden_dir, golden_cases, tokenizer):
    """prepare_inputs of each golden case, computed once."""
    cache = {}

    def get(case_id):
        if case_id not in golden_cases:
            pytest.fail(f"case {case_id} is not in {golden_dir / 'cases.json'}")
        if case_id not in cache:
            c = golden_cases[case_id]
            cache[case_id] = prepare_inputs(str(golden_dir / c["image"]), c["prompt"], tokenizer, c["mode"])
        return golden_cases[case_id], cache[case_id]

    return get


def _rle(mask) -> list[list]:
    out = []
    for v in np.asarray(mask, bool).tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _sha256_bf16(x: np.ndarray) -> str:
    """sha256 of the bf16 bytes: the upper 16 bits of each float32, little-endian uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16
    return hashlib.sha256(bits.astype("<u2").tobytes()).hexdigest()


@pytest.mark.parametrize("case_id", _golden_case_ids())
def test_golden_token_layout(processed, case_id):
    c, p = processed(case_id)
    assert c["mode"] in MODES
    assert p.input_ids.dtype == np.int64
    assert p.input_ids.tolist() == c["input_ids"]
    assert len(p.input_ids) == c["n_tokens"] == len(p.images_seq_mask)
    assert _rle(p.images_seq_mask) == c["images_seq_mask_rle"]
    assert p.num_image_tokens == c["n_image_tokens"]
    assert (p.input_ids[p.images_seq_mask] == IMAGE_TOKEN_ID).all()
    assert p.images_spatial_crop.tolist() == c["images_spatial_crop"]
    assert p.crop_pixels.shape[0] == c["n_crop_tiles"]
    assert [list(s) for s in p.image_sizes] == [c["image_size_wh"]]
    assert p.prompt == c["prompt_formatted"]


@pytest.mark.parametrize("case_id", _golden_case_ids())
def test_golden_text_splits(golden_cases, tokenizer, case_id):
    if case_id not in golden_cases:
        pytest.fail(f"case {case_id} is not in cases.json")
    c = golden_cases[case_id]
    assert [tokenizer.encode(s) for s in c["text_splits"]] == c["text_split_ids"]


@pytest.mark.parametrize("case_id", _golden_case_ids())
def test_golden_pixels(golden_dir, processed, case_id):
    c, p = processed(case_id)
    gv = c["global_view"]
    assert list(p.global_pixels.shape) == gv["shape"]
    assert p.global_pixels.dtype == np.float32
    assert _sha256_bf16(p.global_pixels) == gv["sha256_bf16"], "global view differs from the official tensor"
    # The float32 tensor holds exactly the bf16 values (nothing below bit 16).
    assert not (p.global_pixels.view(np.uint32) & 0xFFFF).any()
    assert hashlib.sha256(p.global_pixels.tobytes()).hexdigest() == gv["sha256_f32"]
    npz = np.load(golden_dir / "cases" / f"{case_id}.npz")
    np.testing.assert_array_equal(p.global_pixels[0, :, ::16, ::16], npz["global_view_sub16"])
    if c["n_crop_tiles"]:
        assert list(p.crop_pixels.shape) == c["crops"]["shape"]
        assert _sha256_bf16(p.crop_pixels) == c["crops"]["sha256_raw"], "tiles differ from the official ones"
        np.testing.assert_array_equal(p.crop_pixels[:, :, ::16, ::16], npz["crops_sub16"])
    else:
        size = MODES[c["mode"]].image_size  # the mode's tile size (its view size when it never tiles)
        assert p.crop_pixels.shape == (0, 3, size, size)
        assert "crops_sub16" not in npz


# ----------------------------------------------------------------------------------------------------
# Token counts and tile grids


@pytest.mark.parametrize("mode, n", [("tiny", 8), ("small", 10), ("base", 16), ("large", 20)])
def test_token_count_non_crop(tokenizer, mode, n):
    assert image_token_count((1, 1), MODES[mode]) == (n + 1) * n + 1
    img = np.full((80, 100, 3), 200, np.uint8)
    p = prepare_inputs(img, "<image>\nFree OCR.", tokenizer, mode)
    assert p.num_image_tokens == (n + 1) * n + 1
    assert p.images_spatial_crop.tolist() == [[1, 1]]
    size = MODES[mode].image_size
    assert p.global_pixels.shape == (1, 3, size, size)


@pytest.mark.parametrize(
    "grid, expected",
    [((1, 1), 273), ((2, 1), 273 + 21 * 10), ((3, 2), 893), ((1, 3), 603), ((3, 3), 273 + 31 * 30)],
)
def test_token_count_crop(grid, expected):
    wc, hc = grid
    assert (
        image_token_count(grid, MODES["gundam"])
        == expected
        == (16 + 1) * 16 + 1 + (((10 * wc + 1) * 10 * hc) if grid != (1, 1) else 0)
    )


def test_token_count_crop_formula_every_grid():
    for wc in range(1, 10):
        for hc in range(1, 10):
            if 2 <= wc * hc <= 9:
                assert image_token_count((wc, hc), MODES["gundam"]) == 273 + (10 * wc + 1) * 10 * hc


def _official_grid(width: int, height: int, image_size: int = 640, min_num: int = 2, max_num: int = 9):
    """The official dynamic_preprocess / find_closest_aspect_ratio choice, copied verbatim in logic."""
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize(
    "size, grid",
    [
        ((1400, 1400), (3, 3)),  # tie 2x2 vs 3x3 goes to 3x3: 1400^2 > 0.5 * 640^2 * 9
        ((1300, 1300), (2, 2)),  # ... but not with fewer pixels
        ((1000, 1000), (2, 2)),
        ((1300, 1000), (3, 2)),
        ((700, 1800), (1, 3)),
        ((1500, 500), (3, 1)),
        ((641, 100), (6, 1)),
        ((5000, 100), (9, 1)),
    ],
)
def test_tile_grid_examples(size, grid):
    assert tile_grid(*size) == grid == _official_grid(*size)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000))
def test_tile_grid_matches_official_rule(width, height):
    cols, rows = tile_grid(width, height)
    assert 2 <= cols * rows <= 9
    assert (cols, rows) == _official_grid(width, height)


@pytest.mark.parametrize("size", [(640, 640), (640, 500), (100, 640), (30, 20)])
def test_gundam_no_tiles_when_small(tokenizer, size):
    img = np.full((size[1], size[0], 3), 90, np.uint8)
    p = prepare_inputs(img, "<image>\nFree OCR.", tokenizer, "gundam")
    assert p.images_spatial_crop.tolist() == [[1, 1]]
    assert p.crop_pixels.shape == (0, 3, 640, 640)
    assert p.num_image_tokens == 273
    assert p.global_pixels.shape == (1, 3, 1024, 1024)


@pytest.mark.parametrize("size, grid", [((641, 100), (6, 1)), ((100, 700), (1, 7)), ((1400, 1400), (3, 3))])
def test_gundam_tiles_when_large(tokenizer, size, grid):
    img = np.full((size[1], size[0], 3), 90, np.uint8)
    p = prepare_inputs(img, "<image>\nFree OCR.", tokenizer, "gundam")
    wc, hc = grid
    assert p.images_spatial_crop.tolist() == [[wc, hc]]
    assert p.crop_pixels.shape == (wc * hc, 3, 640, 640)
    assert p.num_image_tokens == 273 + (10 * wc + 1) * 10 * hc
    # A uniform image gives uniform tiles of its own colour: no padding in tiles.
    assert (p.crop_pixels == _colour(90)).all()


# ----------------------------------------------------------------------------------------------------
# Resize vs pad, pad colour, bf16 pixels


def _colour(v: int) -> float:
    return float(round_to_bfloat16(np.array([np.float32(v) / np.float32(255) * 2 - 1], np.float32))[0])


def test_pad_colour_is_127():
    assert PAD_COLOR == (127, 127, 127)
    assert _colour(127) == PAD_BF16
    assert abs(PAD_BF16 - (-1 / 255)) < 2e-5


@pytest.mark.parametrize("mode", ["tiny", "small"])
def test_tiny_small_resize_directly(tokenizer, mode):
    # A wide two-colour image: resized to a square, its left half stays left, nothing is padded.
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :150] = (200, 30, 90)
    img[:, 150:] = (10, 250, 60)
    p = prepare_inputs(img, "<image>", tokenizer, mode)
    x = p.global_pixels[0]
    s = MODES[mode].image_size
    assert x.shape == (3, s, s)
    assert not np.isclose(x, PAD_BF16).all(axis=0).any(), "tiny/small must not pad"
    for row in (0, s // 2, s - 1):  # every row carries the image, left and right colours
        assert x[:, row, 2].tolist() == [_colour(200), _colour(30), _colour(90)]
        assert x[:, row, s - 3].tolist() == [_colour(10), _colour(250), _colour(60)]


@pytest.mark.parametrize("mode", ["base", "large", "gundam"])
def test_base_large_gundam_pad(tokenizer, mode):
    img = np.zeros((100, 300, 3), np.uint8)
    img[:] = (200, 30, 90)
    p = prepare_inputs(img, "<image>", tokenizer, mode)
    x = p.global_pixels[0]
    s = x.shape[-1]
    assert s == MODES[mode].base_size
    content = round(s * 100 / 300)  # aspect kept: the image fills the width and a centred band
    top = round((s - content) / 2)  # as ImageOps.pad centres it
    assert content < s and top > 0
    assert (x[:, :top] == PAD_BF16).all() and (x[:, top + content :] == PAD_BF16).all()
    band = x[:, top + 2 : top + content - 2]
    np.testing.assert_array_equal(band[0], _colour(200))
    np.testing.assert_array_equal(band[1], _colour(30))
    np.testing.assert_array_equal(band[2], _colour(90))


def test_pixels_are_bf16_rounded(tokenizer):
    # 254 normalises to 0.99215686, which is not a bf16 value; the official tensor holds 0.9921875.
    img = np.full((64, 64, 3), 254, np.uint8)
    p = prepare_inputs(img, "<image>", tokenizer, "tiny")
    assert np.float32(254) / np.float32(255) * 2 - 1 == np.float32(0.99215686)
    assert (p.global_pixels == np.float32(0.9921875)).all()


def test_round_to_bfloat16_ties_to_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0x3F800000], np.uint32)
    out = round_to_bfloat16(bits.view(np.float32)).view(np.uint32)
    assert [hex(b) for b in out] == [
        hex(b) for b in [0x3F800000, 0x3F820000, 0x3F810000, 0x3F800000, 0xBF800000, 0x3F800000]
    ]
    assert round_to_bfloat16(np.array([0.99215686], np.float32))[0] == np.float32(0.9921875)


# ----------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize(
    "prompt, n_images",
    [("<image>\nFree OCR.", 0), ("<image>\nFree OCR.", 2), ("Free OCR.", 1), ("<image><image>\nFree OCR.", 1)],
)
def test_placeholder_count_mismatch(tokenizer, prompt, n_images):
    images = [np.zeros((8, 8, 3), np.uint8)] * n_images
    with pytest.raises(ValueError, match="placeholder") as e:
        prepare_inputs(images, prompt, tokenizer, "tiny")
    assert f"{prompt.count('<image>')} <image>" in str(e.value)
    assert f"{n_images} image(s)" in str(e.value)


def test_text_only_prompt(tokenizer):
    p = prepare_inputs(None, "  Hello, world.\n", tokenizer, "base")
    assert p.input_ids.tolist() == [0] + tokenizer.encode("Hello, world.")
    assert len(p.input_ids) > 1
    assert not p.images_seq_mask.any() and p.images_seq_mask.shape == p.input_ids.shape
    assert p.global_pixels.shape == (0, 3, 1024, 1024)
    assert p.crop_pixels.shape[0] == 0
    assert p.images_spatial_crop.shape == (0, 2)
    assert p.image_sizes == []


def test_two_images_in_order(tokenizer):
    a = np.full((40, 60, 3), 10, np.uint8)
    b = np.full((40, 60, 3), 240, np.uint8)
    p = prepare_inputs([a, b], "<image>A<image>B", tokenizer, "tiny")
    assert p.num_image_tokens == 2 * 73
    block = [IMAGE_TOKEN_ID] * 73
    assert p.input_ids.tolist() == [0] + block + tokenizer.encode("A") + block + tokenizer.encode("B")
    assert p.global_pixels[0, 0, 0, 0] == _colour(10) and p.global_pixels[1, 0, 0, 0] == _colour(240)


def test_unknown_mode(tokenizer):
    with pytest.raises(ValueError, match="tiny, small, base, large, gundam"):
        prepare_inputs(None, "x", tokenizer, "huge")


# ----------------------------------------------------------------------------------------------------
# Image loading


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)


def test_load_image_sources(tmp_path, rgb):
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(rgb))
    data = path.read_bytes()
    for source in (path, str(path), data, bytearray(data), memoryview(data), Image.fromarray(rgb), rgb):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (50, 30), type(source)
        np.testing.assert_array_equal(np.asarray(img), rgb)


def test_load_image_arrays(rgb):
    grey = rgb[..., 0]
    for arr in (grey, grey[..., None]):
        img = load_image(arr)
        assert img.mode == "RGB" and img.size == (50, 30)
        np.testing.assert_array_equal(np.asarray(img), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((30, 50, 1), 255, np.uint8)], axis=2)
    img = load_image(rgba)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)


def test_load_image_converts_modes(rgb):
    assert load_image(Image.fromarray(rgb[..., 0])).mode == "RGB"
    assert load_image(Image.fromarray(rgb).convert("P")).mode == "RGB"
    assert load_image(Image.fromarray(rgb).convert("CMYK")).mode == "RGB"


def test_load_image_exif_transpose(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: red left half, blue right half
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    for source in (buf.getvalue(), path, Image.open(io.BytesIO(buf.getvalue()))):
        img = load_image(source)
        assert img.size == (20, 40), "EXIF orientation 6 must be applied"
        out = np.asarray(img).astype(int)
        assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the left (red) half is now on top
        assert out[34, 10, 2] > 200 and out[34, 10, 0] < 60
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # the stored pixels are not rotated; only the EXIF tag says so


def test_load_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.png"))


def test_load_image_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(b"this is not an image at all")
    path = tmp_path / "text.png"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image") as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_load_image_truncated_png(tmp_path):
    rng = np.random.default_rng(2)
    data = _png_bytes(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))  # noise: large IDAT
    cut = data[: len(data) // 2]
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(cut)
    path = tmp_path / "cut.png"
    path.write_bytes(cut)
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(path)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 3), np.uint16),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((10,), np.uint8),
        np.zeros((2, 10, 10, 3), np.uint8),
    ],
    ids=["float32", "uint16", "2-channels", "1d", "4d"],
)
def test_load_image_bad_arrays(arr):
    with pytest.raises(ValueError, match="uint8 HxW") as e:
        load_image(arr)
    assert str(arr.dtype) in str(e.value)


def test_load_image_bad_type():
    with pytest.raises(TypeError, match="unsupported image type"):
        load_image(12345)


def test_prepare_inputs_reports_load_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_inputs(tmp_path / "nope.png", "<image>", tokenizer, "tiny")
    with pytest.raises(ValueError, match="uint8"):
        prepare_inputs(np.zeros((8, 8, 3), np.float64), "<image>", tokenizer, "tiny")


# ---------------------------------------------------------------------------------------------------
# DeepSeek-OCR-2: one mode, 2-6 tiles of 768 (none when both sides are <= 768), no newlines


def _v2(tokenizer, img, prompt="<image>\nFree OCR."):
    return prepare_inputs(img, prompt, tokenizer, None, family=OCR2)


@pytest.mark.parametrize("size", [(768, 768), (768, 100), (640, 560), (20, 30)])
def test_v2_no_tiles_when_both_sides_fit(tokenizer, size):
    p = _v2(tokenizer, np.full((size[1], size[0], 3), 90, np.uint8))
    assert p.images_spatial_crop.tolist() == [[1, 1]]
    assert p.crop_pixels.shape == (0, 3, 768, 768)
    assert p.num_image_tokens == 257  # 16 x 16 global queries + the separator, no newlines
    assert p.global_pixels.shape == (1, 3, 1024, 1024)
    assert p.input_ids.tolist()[-4:] == tokenizer.encode("\nFree OCR.")


@pytest.mark.parametrize(
    "size, grid",
    [((769, 768), (2, 2)), ((768, 769), (2, 2)), ((1600, 1100), (3, 2)), ((800, 2000), (1, 3)), ((2400, 600), (4, 1))],
)
def test_v2_tiles_one_pixel_past_768(tokenizer, size, grid):
    p = _v2(tokenizer, np.full((size[1], size[0], 3), 90, np.uint8))
    wc, hc = grid
    assert p.images_spatial_crop.tolist() == [[wc, hc]]
    assert p.crop_pixels.shape == (wc * hc, 3, 768, 768)
    assert p.num_image_tokens == 257 + 144 * wc * hc
    assert image_token_count(grid, MODES_BY_FAMILY[OCR2]["default"]) == 257 + 144 * wc * hc


@settings(max_examples=300, deadline=None)
@given(st.integers(769, 6000), st.integers(1, 6000))
def test_v2_tile_grid_matches_official_rule(width, height):
    mode = MODES_BY_FAMILY[OCR2]["default"]
    cols, rows = tile_grid(width, height, mode.image_size, mode.min_tiles, mode.max_tiles)
    assert 2 <= cols * rows <= 6  # never one tile
    assert (cols, rows) == _official_grid(width, height, 768, 2, 6)


@pytest.mark.parametrize("size, grid", [((1250, 1000), (2, 2)), ((1500, 1200), (3, 2))])
def test_v2_aspect_tie_goes_to_the_larger_grid_only_with_the_pixels(size, grid):
    # aspect 1.25 sits halfway between 2x2 (1.0) and 3x2 (1.5): 3x2 wins iff w*h > 0.5 * 768^2 * 6
    assert tile_grid(*size, 768, 2, 6) == grid == _official_grid(*size, 768, 2, 6)


@pytest.mark.parametrize("size, first_row", [((1200, 625), 246), ((1500, 500), 342)])
def test_v2_pad_offset_rounds_half_to_even(tokenizer, size, first_row):
    """ImageOps.pad centres with round((1024 - side) / 2): a 491 margin starts the image at 246, not 245."""
    p = _v2(tokenizer, np.full((size[1], size[0], 3), 250, np.uint8))
    column = p.global_pixels[0, 0, :, 512]
    assert column[first_row - 1] == PAD_BF16 and column[first_row] > 0.9


def test_v2_rejects_the_v1_modes_and_v1_rejects_default(tokenizer):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="DeepSeek-OCR-2 has no mode 'gundam' .*its only mode is 'default'"):
        prepare_inputs(img, "<image>", tokenizer, "gundam", family=OCR2)
    with pytest.raises(ValueError, match="DeepSeek-OCR has no mode 'default' .*choose one of tiny, small"):
        prepare_inputs(img, "<image>", tokenizer, "default")
    with pytest.raises(ValueError, match="no mode 'huge' .*there is no such mode"):
        prepare_inputs(img, "<image>", tokenizer, "huge", family=OCR2)

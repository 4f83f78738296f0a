"""The golden cases of the official DeepSeek-OCR-2 code (../shared/golden2) reproduced in float32 through
the public API, on both backends (the checks are in tests/golden.py, shared with DeepSeek-OCR's)."""

from __future__ import annotations

import json

import pytest

from tests.golden import check_batch, check_case

pytestmark = pytest.mark.slow

# Each backend's passing cases: their prepared inputs and vision embeddings, for the batched run.
PREPARED: dict[str, dict[str, tuple]] = {}

CASE_IDS = ["g01", "g02", "g03", "g04", "g05"]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def golden2_model(request, golden2_ckpt):
    """The golden v2 checkpoint in float32 on each backend (one loaded at a time)."""
    pytest.importorskip("mlx.core" if request.param == "mlx" else "torch")
    import dsocr_mlx

    model = dsocr_mlx.load(str(golden2_ckpt), backend=request.param, dtype="float32")
    assert model.family == "deepseek-ocr-2"
    yield model
    del model


@pytest.fixture(scope="module")
def cases2(golden2_dir):
    return {c["id"]: c for c in json.loads((golden2_dir / "cases.json").read_text())}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden2_case(golden2_model, golden2_dir, cases2, case_id):
    PREPARED.setdefault(golden2_model.backend, {})[case_id] = check_case(golden2_model, golden2_dir, cases2[case_id])


def test_golden2_cases_decode_together(golden2_model, cases2):
    """After the cases (pytest groups the tests of one backend), all of them decode as one batch."""
    done = PREPARED.pop(golden2_model.backend, {})
    if len(done) < 2:
        pytest.skip("needs the cases above to have passed on this backend")
    check_batch(golden2_model, [cases2[c] for c in done], list(done.values()))

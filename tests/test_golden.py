"""The golden cases of the official DeepSeek-OCR code (../shared/golden) reproduced in float32 through the
public API, on both backends (the checks are in tests/golden.py, shared with DeepSeek-OCR-2's)."""

from __future__ import annotations

import json

import pytest

from tests.golden import check_batch, check_case

pytestmark = pytest.mark.slow

# Each backend's passing cases: their prepared inputs and vision embeddings, for the batched run.
PREPARED: dict[str, dict[str, tuple]] = {}

CASE_IDS = ["p01", "p02", "p03", "p04", "p05", "p06"]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def golden_model(request, golden_ckpt):
    """The golden checkpoint in float32 on each backend (one loaded at a time)."""
    pytest.importorskip("mlx.core" if request.param == "mlx" else "torch")
    import dsocr_mlx

    model = dsocr_mlx.load(str(golden_ckpt), backend=request.param, dtype="float32")
    assert model.family == "deepseek-ocr"
    yield model
    del model


@pytest.fixture(scope="module")
def cases(golden_dir):
    return {c["id"]: c for c in json.loads((golden_dir / "cases.json").read_text())}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden_case(golden_model, golden_dir, cases, case_id):
    PREPARED.setdefault(golden_model.backend, {})[case_id] = check_case(golden_model, golden_dir, cases[case_id])


def test_golden_cases_decode_together(golden_model, cases):
    """After the cases (pytest groups the tests of one backend), all of them decode as one batch."""
    done = PREPARED.pop(golden_model.backend, {})
    if len(done) < 2:
        pytest.skip("needs the cases above to have passed on this backend")
    check_batch(golden_model, [cases[c] for c in done], list(done.values()))

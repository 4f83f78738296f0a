"""The PyTorch backend: MLX-vs-torch parity per component and on logits, its cache, its loader's refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import dsocr_mlx
from tests.conftest import assert_close
from tests.tolerances import BACKENDS, CACHE

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def torch_model(tiny_ckpt):
    return dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def inputs(tiny_model, sample_image):
    return tiny_model.prepare(sample_image, "<image>\nFree OCR.", mode="gundam")


def test_state_dict_mirrors_the_mlx_parameters(tiny_model, torch_model):
    from mlx.utils import tree_flatten

    mlx_params = {k: tuple(v.shape) for k, v in tree_flatten(tiny_model.runtime.model.parameters())}
    torch_params = {k: tuple(v.shape) for k, v in torch_model.runtime.model.state_dict().items()}
    assert set(mlx_params) == set(torch_params)
    from dsocr_mlx.weights import CONV_WEIGHTS

    convs = set(CONV_WEIGHTS)
    for key, shape in torch_params.items():
        want = mlx_params[key]
        if key in convs:  # (out, kh, kw, in) in MLX, (out, in, kh, kw) in torch
            want = (want[0], want[3], want[1], want[2])
        assert shape == want, key


def test_vision_components_match(tiny_model, torch_model, inputs):
    m, t = tiny_model.runtime.model.model, torch_model.runtime.model.model
    pixels = inputs.global_pixels
    with torch.inference_mode():
        sam_t = t.sam_model(torch.from_numpy(pixels))
        clip_t = t.vision_model(sam_t)
        view_t = t.encode_view(torch.from_numpy(inputs.crop_pixels[:2]))
    sam_m = m.sam_model(mx.array(pixels.transpose(0, 2, 3, 1)))
    assert_close(np.array(sam_m), sam_t.numpy(), **BACKENDS, what="SAM")
    assert_close(np.array(m.vision_model(sam_m)), clip_t.numpy(), **BACKENDS, what="CLIP")
    view_m = m.encode_view(mx.array(inputs.crop_pixels[:2].transpose(0, 2, 3, 1)))
    assert_close(np.array(view_m), view_t.numpy(), **BACKENDS, what="encode_view (tiles)")


def test_image_embeddings_and_prefill_logits_match(tiny_model, torch_model, inputs):
    assert_close(
        torch_model.image_embeddings(inputs), tiny_model.image_embeddings(inputs), **BACKENDS, what="image embeddings"
    )
    assert_close(
        torch_model.prefill_logits(inputs), tiny_model.prefill_logits(inputs), **BACKENDS, what="prefill logits"
    )


def test_greedy_tokens_match_across_backends(tiny_model, torch_model, sample_image):
    kwargs = dict(task="free", mode="small", max_new_tokens=16, detect_loops=False)
    assert torch_model.ocr(sample_image, **kwargs).token_ids == tiny_model.ocr(sample_image, **kwargs).token_ids
    ngram = dict(kwargs, no_repeat_ngram_size=3, ngram_window=20, repetition_penalty=1.2)
    assert torch_model.ocr(sample_image, **ngram).token_ids == tiny_model.ocr(sample_image, **ngram).token_ids


def naive_greedy(model, embeds, steps: int) -> list[int]:
    """The oracle: recompute the whole sequence at every step, no cache."""
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(None, None, embeds)[0, -1].argmax())
            out.append(token)
            embeds = torch.cat([embeds, model.model.embed_tokens(torch.tensor([[token]]))], dim=1)
    return out


def test_cached_greedy_equals_naive_greedy(torch_model, inputs):
    runtime = torch_model.runtime
    emb = runtime.image_embeddings(inputs)
    cached = list(runtime.generate(inputs, emb, max_tokens=10))
    assert cached == naive_greedy(runtime.model, runtime.input_embeddings(inputs, emb), 10)


def test_chunked_prefill_and_decode_steps_equal_full_forward(torch_model, inputs):
    from dsocr_mlx.backends.torch.generate import prefill

    model = torch_model.runtime.model
    embeds = torch_model.runtime.input_embeddings(inputs, torch_model.runtime.image_embeddings(inputs))
    with torch.inference_mode():
        full = model(None, None, embeds)[0]
        for step in (7, 100, 10_000):
            cache = model.make_cache()
            chunked = prefill(model, embeds, cache, step_size=step)[0]
            assert cache[0].offset == embeds.shape[1]
            assert_close(chunked.numpy(), full[-1].numpy(), **CACHE, what=f"prefill step {step}")
        ids = torch.tensor([[0, 1000, 2000, 3000, 4000]])
        whole = model(ids)[0]
        cache = model.make_cache(max_length=8)
        model(ids[:, :3], cache)
        assert_close(model(ids[:, 3:4], cache)[0, 0].numpy(), whole[3].numpy(), **CACHE, what="decode step")
        assert cache[0].keys.shape[2] == 8  # preallocated once


def test_moe_gather_and_grouped_paths_agree(torch_model):
    experts = torch_model.runtime.model.model.layers[1].mlp.experts
    x = torch.randn(5, experts.gate_proj.weight.shape[2], generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, experts.gate_proj.weight.shape[0], (5, 3), generator=torch.Generator().manual_seed(1))
    rows, flat = x.repeat_interleave(3, dim=0), idx.reshape(-1)
    with torch.inference_mode():
        gathered = experts.gathered(rows, flat)
        grouped = experts.grouped(rows, flat)
        routed = experts(x, idx)  # CPU: the grouped path at any size
    assert_close(gathered.numpy(), grouped.numpy(), **CACHE, what="MoE paths")
    np.testing.assert_array_equal(routed.reshape(-1, x.shape[1]).numpy(), grouped.numpy())


def decode_both_ways(model, embeds, tokens: list[int], **step_kwargs):
    """Logits after each of ``tokens``: the dynamic cached step, and ``DecodeStep`` over its own cache."""
    from dsocr_mlx.backends.torch.generate import DecodeStep, prefill

    max_length = embeds.shape[1] + len(tokens)
    dynamic, fixed = model.make_cache(max_length), model.make_cache(max_length)
    with torch.inference_mode():
        prefill(model, embeds, dynamic)
        prefill(model, embeds, fixed)
        step = DecodeStep(model, fixed, **step_kwargs)
        for token in tokens:
            want = model(torch.tensor([[token]]), dynamic)[:, -1, :].float()
            yield want, step(token), dynamic, fixed


def test_fixed_shape_decode_step_equals_the_dynamic_step(torch_model, inputs):
    runtime = torch_model.runtime
    embeds = runtime.input_embeddings(inputs, runtime.image_embeddings(inputs))
    for n, (want, got, dynamic, fixed) in enumerate(
        decode_both_ways(runtime.model, embeds, [5, 900, 17, 17, 3], capture=False)
    ):
        assert_close(got.numpy(), want.numpy(), **CACHE, what=f"fixed-shape decode step {n}")
        assert fixed[0].offset == dynamic[0].offset == embeds.shape[1] + n + 1
    np.testing.assert_allclose(fixed[-1].keys.numpy(), dynamic[-1].keys.numpy(), rtol=1e-5, atol=1e-5)


def test_fixed_shape_decode_in_generate_gives_the_same_tokens(torch_model, inputs):
    from dsocr_mlx.backends.torch.generate import generate_step

    runtime = torch_model.runtime
    embeds = runtime.input_embeddings(inputs, runtime.image_embeddings(inputs))
    prompt = inputs.input_ids.tolist()
    runs = {
        graph: [
            t for t, _ in generate_step(prompt, runtime.model, input_embeddings=embeds, max_tokens=12, cuda_graph=graph)
        ]
        for graph in (False, True)
    }
    assert runs[True] == runs[False]


def test_decode_step_traces_as_one_graph_without_host_syncs(torch_model, inputs, monkeypatch):
    """What CUDA graph capture needs, checked on the CPU: TorchDynamo traces the step (with the GPU's
    gathered MoE path) as one graph, so it reads no tensor value on the host and branches on none."""
    from dsocr_mlx.backends.torch.decoder import SwitchGLU
    from dsocr_mlx.backends.torch.generate import DecodeStep, prefill

    monkeypatch.setattr(SwitchGLU, "use_gather", lambda self, pairs, device: pairs <= self.gather_limit)
    model = torch_model.runtime.model
    embeds = torch_model.runtime.input_embeddings(inputs, None)[:, :20]
    torch._dynamo.reset()
    with torch.inference_mode():
        cache = model.make_cache(24)
        prefill(model, embeds, cache)
        step = DecodeStep(model, cache, capture=False)
        eager = step.run()
        traced = torch.compile(step.run, backend="eager", fullgraph=True)()
    assert_close(traced.numpy(), eager.numpy(), **CACHE, what="traced decode step")


class ReplayStandIn:
    """Stands in for a captured CUDA graph on the CPU: replay recomputes the step into the output buffer,
    optionally with the position frozen at its first value (a host value captured as a constant)."""

    def __init__(self, step, frozen_position: bool):
        self.step, self.frozen = step, frozen_position
        self.first = None

    def replay(self):
        position = self.step.position.clone()
        if self.frozen:
            self.first = position if self.first is None else self.first
            self.step.position.copy_(self.first)
        self.step.logits.copy_(self.step.run())
        self.step.position.copy_(position)


@pytest.mark.parametrize("frozen", [False, True])
def test_replays_are_checked_against_the_eager_step(torch_model, inputs, frozen):
    from dsocr_mlx.backends.torch.generate import DecodeStep, prefill

    model = torch_model.runtime.model
    embeds = torch_model.runtime.input_embeddings(inputs, None)[:, :20]
    tokens = [5, 900, 17, 3]
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = model.make_cache(24)
        prefill(model, embeds, reference)
        want = [model(torch.tensor([[t]]), reference)[:, -1, :].float() for t in tokens]
        cache = model.make_cache(24)
        prefill(model, embeds, cache)
        step = DecodeStep(model, cache, capture=False)
        step.logits = torch.zeros_like(want[0])
        step.graph = ReplayStandIn(step, frozen)
        got = [step(t) for t in tokens]
    for n, (g, w) in enumerate(zip(got, want)):
        assert_close(g.numpy(), w.numpy(), **CACHE, what=f"step {n}")
    assert (step.graph is None) == frozen  # a replay stuck at one position is caught at the second one
    assert any("disagrees with the eager step" in str(w.message) for w in caught) == frozen
    assert step.checks_left == 0


def test_a_failed_capture_decodes_eagerly(torch_model, inputs):
    from dsocr_mlx.backends.torch.generate import DecodeStep, prefill

    model = torch_model.runtime.model
    embeds = torch_model.runtime.input_embeddings(inputs, None)[:, :20]
    with torch.inference_mode():
        reference = model.make_cache(22)
        prefill(model, embeds, reference)
        want = model(torch.tensor([[7]]), reference)[:, -1, :].float()
        cache = model.make_cache(22)
        prefill(model, embeds, cache)
        step = DecodeStep(model, cache, capture=True)
        if torch.cuda.is_available():
            pytest.skip("capture works where CUDA is available")
        with pytest.warns(UserWarning, match="CUDA graph capture of the decode step failed"):
            got = step(7)
    assert step.graph is None and not step.capture
    assert_close(got.numpy(), want.numpy(), **CACHE, what="eager after a failed capture")


def test_decode_step_refuses_a_full_cache(torch_model):
    from dsocr_mlx.backends.torch.generate import DecodeStep, prefill

    model = torch_model.runtime.model
    with torch.inference_mode():
        cache = model.make_cache(3)
        with pytest.raises(ValueError, match="run the prefill first"):
            DecodeStep(model, cache, capture=False)
        prefill(model, model.model.embed_tokens(torch.tensor([[1, 2, 3]])), cache)
        with pytest.raises(ValueError, match="KV cache holds 3 positions and is full"):
            DecodeStep(model, cache, capture=False)(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_eager_on_cuda(tiny_ckpt, inputs):
    from dsocr_mlx.backends.torch.generate import generate_step

    cuda = dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype="float32", device="cuda").runtime
    embeds = cuda.input_embeddings(inputs, cuda.image_embeddings(inputs))
    prompt = inputs.input_ids.tolist()
    runs = {
        graph: [
            t for t, _ in generate_step(prompt, cuda.model, input_embeddings=embeds, max_tokens=16, cuda_graph=graph)
        ]
        for graph in (False, True)
    }
    assert runs[True] == runs[False]
    for n, (want, got, _, _) in enumerate(decode_both_ways(cuda.model, embeds, [5, 900, 17], capture=True)):
        assert_close(got.cpu().numpy(), want.cpu().numpy(), **CACHE, what=f"CUDA graph decode step {n}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_in_that_dtype(tiny_ckpt, torch_model, inputs, dtype):
    half = dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype=dtype)
    assert {p.dtype for p in half.runtime.model.parameters()} == {getattr(torch, dtype)}
    logits = half.prefill_logits(inputs)
    assert np.corrcoef(logits, torch_model.prefill_logits(inputs))[0, 1] > 0.99


def test_loader_refuses_what_only_mlx_runs(tiny_ckpt, tmp_path, torch_model, inputs):
    from dsocr_mlx.convert import convert

    q = convert(tiny_ckpt, tmp_path / "q4", q_bits=4, q_group_size=32, show_progress=False)
    with pytest.raises(ValueError, match="only the MLX backend"):
        dsocr_mlx.load(str(q.path), backend="torch")
    f = convert(tiny_ckpt, tmp_path / "f32", dtype="float32", show_progress=False)
    converted = dsocr_mlx.load(str(f.path), backend="torch")
    np.testing.assert_array_equal(converted.prefill_logits(inputs), torch_model.prefill_logits(inputs))


def test_backend_errors_are_clear(tiny_ckpt, monkeypatch):
    from dsocr_mlx import backends

    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        dsocr_mlx.load(str(tiny_ckpt), backend="jax")
    monkeypatch.setitem(
        backends.BACKENDS,
        "torch",
        ("dsocr_mlx.backends.torch", "torch_missing_module", 'pip install "dsocr-mlx[torch]"'),
    )
    with pytest.raises(ImportError, match=r"dsocr-mlx\[torch\]"):
        dsocr_mlx.load(str(tiny_ckpt), backend="torch")
    assert backends.default_backend() in ("mlx", "torch")


def test_auto_dtype_and_device_resolve_per_host(tiny_ckpt):
    cpu = dsocr_mlx.load(str(tiny_ckpt), backend="torch")
    assert (cpu.device, cpu.dtype) == ("cpu", "float32")  # half-precision matmuls are slower on a CPU
    assert {p.dtype for p in cpu.runtime.model.parameters()} == {torch.float32}
    named = dsocr_mlx.load(str(tiny_ckpt), backend="auto", device="cpu", dtype="auto")
    assert (named.backend, named.device, named.dtype) == ("torch", "cpu", "float32")  # a device picks torch
    from dsocr_mlx.backends.torch import default_dtype
    from dsocr_mlx.config import ModelArgs

    args = ModelArgs.from_file(tiny_ckpt / "config.json")
    assert default_dtype(args, "cuda") == "bfloat16"  # the official inference dtype
    assert default_dtype(args, "cuda:1") == "bfloat16" and default_dtype(args, "cpu") == "float32"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "unknown device 'tpu'"),
        ("mps", "on Apple Silicon use the MLX backend"),
        ("cuda:99", "sees no CUDA GPU" if not torch.cuda.is_available() else "CUDA device"),
    ],
)
def test_bad_devices_are_refused_clearly(tiny_ckpt, device, message):
    with pytest.raises(ValueError, match=message):
        dsocr_mlx.load(str(tiny_ckpt), backend="torch", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a host without CUDA")
def test_cuda_on_a_host_without_it_says_what_to_do(tiny_ckpt):
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but torch .* sees no CUDA GPU; use --device cpu"):
        dsocr_mlx.load(str(tiny_ckpt), backend="torch", device="cuda")

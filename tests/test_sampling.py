"""Generation rules: the official n-gram ban, greedy/sampled decoding, the repetition penalty, settings
validation, loop detection on real token streams and streaming detokenization with the real tokenizer."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsocr_mlx.sampling import (
    NGRAM_WHITELIST,
    PDF_NGRAM,
    TD_CLOSE,
    TD_OPEN,
    LoopDetector,
    Repetition,
    SamplingParams,
    banned_ngram_tokens,
)
from dsocr_mlx.tokenizer import StreamingDetokenizer

mx = pytest.importorskip("mlx.core")
from dsocr_mlx.backends.mlx.generate import (  # noqa: E402 - after the importorskip
    generate_step,
    make_logits_processors,
    make_sampler,
    prefill,
)

# --------------------------------------------------------------------------------------------------------------
# The official rule, transcribed literally (DeepSeek-OCR-vllm/process/ngram_norepeat.py)
# --------------------------------------------------------------------------------------------------------------


def official_banned(
    input_ids: list[int], ngram_size: int, window_size: int, whitelist_token_ids=NGRAM_WHITELIST
) -> set[int]:
    if len(input_ids) < ngram_size:
        return set()
    current_prefix = tuple(input_ids[-(ngram_size - 1) :])
    search_start = max(0, len(input_ids) - window_size)
    search_end = len(input_ids) - ngram_size + 1
    banned_tokens = set()
    for i in range(search_start, search_end):
        ngram = tuple(input_ids[i : i + ngram_size])
        if ngram[:-1] == current_prefix:
            banned_tokens.add(ngram[-1])
    return banned_tokens - set(whitelist_token_ids)


def ngram_violations(generated: list[int], n: int, window: int, whitelist=NGRAM_WHITELIST) -> list[int]:
    """Positions t where generated[t] completes an n-gram already seen in the window (the rule's target)."""
    bad = []
    for t in range(n, len(generated)):
        if generated[t] in whitelist:
            continue
        current = generated[t - n + 1 : t + 1]
        if any(generated[i : i + n] == current for i in range(max(0, t - window), t - n + 1)):
            bad.append(t)
    return bad


# Small alphabets so that repeats happen; the whitelisted <td>/</td> ids are in the mix.
ALPHABET = st.sampled_from([1, 2, 3, TD_OPEN, TD_CLOSE])


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(ALPHABET, max_size=60), n=st.integers(2, 6), window=st.integers(1, 20))
@example(tokens=[1, 2, 3, 1, 2], n=3, window=20)
@example(tokens=[1, TD_OPEN, 2, 1], n=2, window=20)
def test_ban_matches_official_processor(tokens, n, window):
    assert banned_ngram_tokens(tokens, n, window) == official_banned(tokens, n, window)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=80),
    n=st.integers(2, 6),
    window=st.integers(1, 20),
    whitelist=st.frozensets(st.integers(0, 3), max_size=2),
)
def test_ban_matches_official_with_custom_whitelist(tokens, n, window, whitelist):
    assert banned_ngram_tokens(tokens, n, window, whitelist) == official_banned(tokens, n, window, whitelist)


@pytest.mark.parametrize(
    ("tokens", "n", "window", "expected"),
    [
        ([1, 2, 3, 1, 2], 3, 90, {3}),  # "1 2" was followed by 3
        ([1, 2, 3, 1, 2, 4, 1, 2], 3, 90, {3, 4}),  # both continuations of "1 2"
        ([1, 2, 3, 9, 9, 9, 9, 1, 2], 3, 4, set()),  # the first "1 2 3" starts outside the window
        ([1, 2, 3, 9, 9, 9, 1, 2], 3, 8, {3}),  # ... and inside it
        ([1, TD_OPEN, 1], 2, 90, set()),  # <td> is whitelisted
        ([5, TD_CLOSE, 6, 5], 2, 90, set()),  # </td> too
        ([1, 2], 3, 90, set()),  # shorter than n
        ([], 2, 10, set()),
        ([7, 7, 7], 2, 1, set()),  # window == n - 1: no n-gram fits
        ([7, 7, 7], 2, 2, {7}),
    ],
)
def test_ban_crafted(tokens, n, window, expected):
    assert official_banned(tokens, n, window) == expected  # the transcription itself
    assert banned_ngram_tokens(tokens, n, window) == expected


def test_ban_off_when_size_zero():
    assert banned_ngram_tokens([1, 1, 1, 1], 0, 10) == set()


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(ALPHABET, min_size=1, max_size=30), window=st.integers(1, 20))
def test_ban_size_one_matches_official(tokens, window):
    assert official_banned(tokens, 1, window) == set()
    assert banned_ngram_tokens(tokens, 1, window) == official_banned(tokens, 1, window)


# --------------------------------------------------------------------------------------------------------------
# Greedy generation with the processors: a numpy fake model against a naive loop
# --------------------------------------------------------------------------------------------------------------

VOCAB = TD_CLOSE + 6  # the real whitelist ids fit
FAKE_ALPHABET = np.array([3, 5, 7, 11, TD_OPEN, TD_CLOSE])
_rng = np.random.default_rng(0)
FAKE_W = _rng.normal(0.0, 1.5, (len(FAKE_ALPHABET), len(FAKE_ALPHABET))).astype(np.float32)
# A strong preference to cycle <td> 3 </td> 5 <td> ... (and 7 11 7 ...): indices into FAKE_ALPHABET.
for _i, _j in {4: 0, 0: 5, 5: 1, 1: 4, 2: 3, 3: 2}.items():
    FAKE_W[_i, _j] += 6.0
FAKE_BASE = (-100.0 - 1e-3 * np.arange(VOCAB)).astype(np.float32)  # other tokens: distinct and far below


def fake_logits(last: int) -> np.ndarray:
    """A Markov "model" that prefers to repeat a cycle (positive and negative logits among its tokens)."""
    logits = FAKE_BASE.copy()
    logits[FAKE_ALPHABET] = FAKE_W[int(np.flatnonzero(FAKE_ALPHABET == last)[0])]
    return logits


PROMPT = [TD_OPEN, 3, TD_CLOSE, 5] * 3  # contains the cycle: a ban that looked at the prompt would differ


def naive_greedy(steps: int, n: int, window: int, penalty: float, whitelist) -> list[int]:
    generated: list[int] = []
    for _ in range(steps):
        logits = fake_logits((PROMPT + generated)[-1])
        for t in set(generated):
            logits[t] = logits[t] / np.float32(penalty) if logits[t] > 0 else logits[t] * np.float32(penalty)
        if n:
            for t in official_banned(generated, n, window, whitelist):
                logits[t] = -np.inf
        generated.append(int(np.argmax(logits)))
    return generated


def library_greedy(steps: int, params: SamplingParams) -> list[int]:
    processors = make_logits_processors(params, len(PROMPT))
    sampler = make_sampler(params.temperature)
    tokens = list(PROMPT)
    for _ in range(steps):
        logits = mx.array(fake_logits(tokens[-1])[None])
        for processor in processors:
            logits = processor(tokens, logits)
        tokens.append(int(sampler(logits).item()))
    return tokens[len(PROMPT) :]


@pytest.mark.parametrize(
    ("n", "window", "penalty", "whitelist"),
    [
        (2, 20, 1.0, NGRAM_WHITELIST),
        (3, 10, 1.0, NGRAM_WHITELIST),
        (4, 60, 1.0, frozenset()),
        (3, 15, 1.3, NGRAM_WHITELIST),
        (0, 1, 10.0, NGRAM_WHITELIST),
        PDF_NGRAM + (1.0, NGRAM_WHITELIST),
    ],
)
def test_greedy_with_processors_matches_naive_loop(n, window, penalty, whitelist):
    steps = 150
    params = SamplingParams(
        no_repeat_ngram_size=n, ngram_window=window, repetition_penalty=penalty, ngram_whitelist=whitelist
    )
    expected = naive_greedy(steps, n, window, penalty, whitelist)
    assert library_greedy(steps, params) == expected
    plain = naive_greedy(steps, 0, 1, 1.0, whitelist)
    assert expected != plain  # the rule changed the output: the comparison is not vacuous
    if n:
        assert ngram_violations(plain, n, window, whitelist)
        assert not ngram_violations(expected, n, window, whitelist)


def test_ngram_processor_ignores_prompt():
    params = SamplingParams(no_repeat_ngram_size=2, ngram_window=50)
    (ban,) = make_logits_processors(params, prompt_length=2)
    out = np.array(ban([4, 6, 4], mx.zeros((1, 10))))  # "4 6" is in the prompt only
    assert np.isfinite(out).all()
    out = np.array(ban([0, 0, 4, 6, 4], mx.zeros((1, 10))))  # now generated
    assert np.isneginf(out[0, 6]) and np.isfinite(np.delete(out[0], 6)).all()


def test_no_processors_by_default():
    assert make_logits_processors(SamplingParams(no_repeat_ngram_size=0), 5) == []
    assert len(make_logits_processors(SamplingParams(repetition_penalty=1.1), 5)) == 2


# --------------------------------------------------------------------------------------------------------------
# The same on the real MLX generate_step with the tiny model
# --------------------------------------------------------------------------------------------------------------

STEPS = 48


@pytest.fixture(scope="module")
def tiny_prompt(tiny_model, sample_image):
    inputs = tiny_model.prepare(Image.fromarray(sample_image), "<image>\nFree OCR.", mode="tiny")
    runtime = tiny_model.runtime
    embeds = runtime.input_embeddings(inputs, runtime.image_embeddings(inputs))
    return inputs, inputs.input_ids.tolist(), embeds


def _run(tiny_model, tiny_prompt, params: SamplingParams | None) -> list[int]:
    _, prompt, embeds = tiny_prompt
    kwargs = {}
    if params is not None:
        kwargs = dict(
            sampler=make_sampler(params.temperature), logits_processors=make_logits_processors(params, len(prompt))
        )
    return [
        t
        for t, _ in generate_step(prompt, tiny_model.runtime.model, input_embeddings=embeds, max_tokens=STEPS, **kwargs)
    ]


def _naive_reference(model, embeds, n: int, window: int) -> list[int]:
    cache = model.make_cache()
    logits = prefill(model, embeds, cache)
    generated: list[int] = []
    for _ in range(STEPS):
        scores = np.array(logits[0], dtype=np.float32)
        if n:
            for t in official_banned(generated, n, window):
                scores[t] = -np.inf
        generated.append(int(np.argmax(scores)))
        logits = model(mx.array([[generated[-1]]]), cache)[:, -1, :].astype(mx.float32)
    return generated


def test_tiny_model_greedy_without_ban_is_plain_greedy(tiny_model, tiny_prompt):
    plain = _run(tiny_model, tiny_prompt, None)
    assert _run(tiny_model, tiny_prompt, SamplingParams(no_repeat_ngram_size=0)) == plain
    assert _naive_reference(tiny_model.runtime.model, tiny_prompt[2], 0, 1) == plain
    inputs, _, _ = tiny_prompt
    runtime = tiny_model.runtime
    assert list(runtime.generate(inputs, runtime.image_embeddings(inputs), STEPS)) == plain


@pytest.mark.parametrize(("n", "window"), [(2, 30), (3, 40)])
def test_tiny_model_generation_respects_ban(tiny_model, tiny_prompt, n, window):
    plain = _run(tiny_model, tiny_prompt, None)
    assert ngram_violations(plain, n, window)  # the random model loops: the ban has work to do
    banned = _run(tiny_model, tiny_prompt, SamplingParams(no_repeat_ngram_size=n, ngram_window=window))
    assert not ngram_violations(banned, n, window)
    assert banned == _naive_reference(tiny_model.runtime.model, tiny_prompt[2], n, window)
    inputs, prompt, embeds = tiny_prompt
    runtime = tiny_model.runtime
    params = SamplingParams(no_repeat_ngram_size=n, ngram_window=window)
    assert list(runtime.generate(inputs, runtime.image_embeddings(inputs), STEPS, params)) == banned
    # The yielded logits are those after the processors: -inf exactly where the official rule bans.
    steps = generate_step(
        prompt,
        runtime.model,
        input_embeddings=embeds,
        max_tokens=12,
        logits_processors=make_logits_processors(params, len(prompt)),
    )
    for k, (token, logits) in enumerate(steps):
        scores = np.array(logits[0])
        assert set(np.flatnonzero(np.isneginf(scores)).tolist()) == official_banned(banned[:k], n, window)
        assert token == banned[k] == int(np.argmax(scores))


# --------------------------------------------------------------------------------------------------------------
# make_sampler
# --------------------------------------------------------------------------------------------------------------


def _logits(seed: int, vocab: int = 50) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, 3, (1, vocab)).astype(np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_temperature_zero_is_argmax(seed):
    logits = _logits(seed)
    assert int(make_sampler(0.0)(logits).item()) == int(np.argmax(np.array(logits)))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_one_and_tiny_top_p_are_argmax(temperature):
    for seed in range(5):
        logits = _logits(seed)
        best = int(np.argmax(np.array(logits)))
        top_k = make_sampler(temperature, top_k=1, seed=seed)
        top_p = make_sampler(temperature, top_p=1e-6, seed=seed)
        assert [int(top_k(logits).item()) for _ in range(20)] == [best] * 20
        assert [int(top_p(logits).item()) for _ in range(20)] == [best] * 20


def _draws(sampler, logits, count: int) -> list[int]:
    return [int(sampler(logits).item()) for _ in range(count)]


def test_seed_reproduces_and_different_seeds_differ():
    flat = mx.zeros((1, 1000))
    a = _draws(make_sampler(1.0, seed=7), flat, 40)
    assert a == _draws(make_sampler(1.0, seed=7), flat, 40)
    assert a != _draws(make_sampler(1.0, seed=8), flat, 40)
    assert len(set(a)) > 30  # flat over 1000 tokens: draws are spread out


def test_unseeded_samplers_differ():
    flat = mx.zeros((1, 1000))
    assert _draws(make_sampler(1.0), flat, 40) != _draws(make_sampler(1.0), flat, 40)


def _frequencies(sampler, logits: np.ndarray, count: int = 2000) -> np.ndarray:
    draws = _draws(sampler, mx.array(logits[None].astype(np.float32)), count)
    return np.bincount(draws, minlength=len(logits)) / count


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_sampling_frequencies_match_softmax(temperature):
    logits = np.array([1.0, 0.5, 0.0, -1.0])
    freq = _frequencies(make_sampler(temperature, seed=11), logits)
    assert np.abs(freq - _softmax(logits / temperature)).max() < 0.04


def test_top_k_and_top_p_frequencies():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    # top_p 0.7: the smallest prefix reaching 0.7 is {0.5, 0.3}; renormalised to 0.625 / 0.375.
    freq = _frequencies(make_sampler(1.0, top_p=0.7, seed=3), logits)
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 0.625) < 0.04
    freq = _frequencies(make_sampler(1.0, top_k=3, seed=4), logits)
    assert freq[3] == 0 and np.abs(freq[:3] - probs[:3] / probs[:3].sum()).max() < 0.04


# --------------------------------------------------------------------------------------------------------------
# Repetition penalty and settings validation
# --------------------------------------------------------------------------------------------------------------


def test_repetition_penalty_on_generated_tokens_only():
    params = SamplingParams(repetition_penalty=2.0, no_repeat_ngram_size=0)
    (penalty,) = make_logits_processors(params, prompt_length=3)
    logits = np.array([[4.0, -4.0, 2.0, -2.0, 1.0, -1.0, 8.0]], np.float32)
    tokens = [4, 5, 6] + [0, 1, 0]  # prompt 4, 5, 6 stay untouched; generated 0 and 1 are penalised
    out = np.array(penalty(tokens, mx.array(logits)))
    expected = logits.copy()
    expected[0, 0] = 2.0  # positive: divided
    expected[0, 1] = -8.0  # negative: multiplied
    np.testing.assert_array_equal(out, expected)
    out = np.array(penalty([4, 5, 6, 2, 3], mx.array(logits)))
    assert out[0, 2] == 1.0 and out[0, 3] == -4.0 and out[0, 6] == 8.0
    np.testing.assert_array_equal(np.array(penalty([0, 1, 2], mx.array(logits))), logits)  # prompt only


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=3, ngram_window=0), "ngram_window"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_stronger():
    params = SamplingParams()
    assert (params.temperature, params.no_repeat_ngram_size, params.ngram_window) == (0.0, 30, 90)
    assert params.ngram_whitelist == {TD_OPEN, TD_CLOSE}
    SamplingParams(no_repeat_ngram_size=0, ngram_window=0)  # window does not matter when the ban is off
    stronger = params.stronger()
    assert stronger.no_repeat_ngram_size <= params.no_repeat_ngram_size and stronger.ngram_window >= 1024
    assert stronger.repetition_penalty > 1.0
    assert SamplingParams(no_repeat_ngram_size=0).stronger().no_repeat_ngram_size > 0


# --------------------------------------------------------------------------------------------------------------
# LoopDetector on token streams, fed one token at a time as the pipeline does
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


def feed(tokens: list[int], detector: LoopDetector) -> tuple[int, Repetition] | None:
    seen: list[int] = []
    for token in tokens:
        seen.append(token)
        found = detector.check(seen)
        if found is not None:
            return len(seen), found
    return None


PREFIX_TEXT = "Some text before the loop starts:"


@pytest.mark.parametrize(
    ("unit_text", "period", "repeats"), [(" hello", 1, 300), (" one two three four five six seven", 7, 60)]
)
def test_loop_detector_triggers_on_short_loops(tokenizer, unit_text, period, repeats):
    prefix, unit = tokenizer.encode(PREFIX_TEXT), tokenizer.encode(unit_text)
    assert len(unit) == period
    assert prefix[-1] != unit[-1]  # so the loop starts exactly after the prefix
    found = feed(prefix + unit * repeats, LoopDetector(decode=tokenizer.decode))
    assert found is not None
    at, rep = found
    assert rep.period == len(unit) and rep.start == len(prefix)
    assert at <= len(prefix) + 240 + 8 + len(unit)  # found soon after the minimum span
    assert rep.repeats == pytest.approx((at - len(prefix)) / len(unit))


def _varied_text(tokenizer, min_tokens: int) -> list[int]:
    rng = np.random.default_rng(5)
    subjects = [
        "the committee",
        "a reviewer",
        "the river",
        "our team",
        "the old bridge",
        "each student",
        "the report",
        "a small village",
        "the engine",
        "my neighbour",
    ]
    verbs = ["describes", "crosses", "measures", "reveals", "supports", "questions", "follows", "improves"]
    objects = [
        "the budget",
        "a narrow valley",
        "the final results",
        "several open problems",
        "an early draft",
        "the northern border",
        "the main argument",
        "a quiet street",
    ]
    tails = ["in spring", "after the storm", "before noon", "with great care", "for the third time", ""]
    sentences: list[str] = []
    while True:
        parts = [
            f"{len(sentences) + 1}.",
            rng.choice(subjects).capitalize(),
            rng.choice(verbs),
            rng.choice(objects),
            rng.choice(tails),
        ]
        sentences.append(" ".join(p for p in parts if p) + ".")
        if len(sentences) % 20 == 0:
            tokens = tokenizer.encode(" ".join(sentences))
            if len(tokens) >= min_tokens:
                return tokens


def test_loop_detector_triggers_on_repeated_paragraph(tokenizer):
    paragraph = _varied_text(tokenizer, 160)[:150]
    prefix = tokenizer.encode(PREFIX_TEXT)
    assert prefix[-1] != paragraph[-1]
    found = feed(prefix + paragraph * 6, LoopDetector(decode=tokenizer.decode))
    assert found is not None
    at, rep = found
    assert rep.period == 150 and rep.start == len(prefix) and 4 <= rep.repeats < 5
    assert at < len(prefix) + 5 * 150


def test_repetition_is_json_serialisable(tokenizer):
    _, rep = feed(tokenizer.encode(PREFIX_TEXT) + tokenizer.encode(" hello") * 300, LoopDetector())
    assert isinstance(rep.period, int) and isinstance(rep.start, int) and isinstance(rep.repeats, float)
    assert json.loads(json.dumps(asdict(rep)))["period"] == 1


def _html_table(rows: int) -> str:
    body = "".join(f"<tr><td>Item {i}</td><td>{(i * 37) % 1000 / 100:.2f}</td></tr>" for i in range(rows))
    return f"<table>{body}</table>"


def _markdown_table(rows: int) -> str:
    body = "".join(f"| Item {i} | {i % 7} | {i * 1.25:.2f} |\n" for i in range(rows))
    return "| Name | Qty | Price |\n|---|---|---|\n" + body


EMPTY_HTML = "<table>" + "<tr><td></td><td></td><td></td></tr>" * 200 + "</table>"
EMPTY_MARKDOWN = "| | | |\n|---|---|---|\n" + "|  |  |  |\n" * 200
RULES_ONLY = "|---|:---:|---|\n" * 200


@pytest.mark.parametrize(
    "text",
    [_html_table(200), EMPTY_HTML, _markdown_table(200), EMPTY_MARKDOWN, RULES_ONLY],
    ids=["html", "empty-html", "markdown", "empty-markdown", "rules"],
)
def test_loop_detector_ignores_tables(tokenizer, text):
    tokens = tokenizer.encode(text)
    assert len(tokens) > 1000
    assert feed(tokens, LoopDetector(decode=tokenizer.decode)) is None


@pytest.mark.parametrize("text", [EMPTY_HTML, EMPTY_MARKDOWN])
def test_markup_filter_is_what_spares_empty_tables(tokenizer, text):
    found = feed(tokenizer.encode(text), LoopDetector())  # no decode: no markup filter
    assert found is not None and found[1].period < 20


def test_loop_detector_ignores_varied_text(tokenizer):
    tokens = _varied_text(tokenizer, 2000)
    assert len(tokens) >= 2000
    assert feed(tokens, LoopDetector(decode=tokenizer.decode)) is None


def test_loop_detector_checks_every_few_tokens_only():
    detector = LoopDetector(every=8)
    assert detector.check([3] * 247) is None  # 247 is not a multiple of 8: no look
    assert detector.check([3] * 248).period == 1
    assert detector.check([3] * 100) is None  # shorter than the minimum span


# --------------------------------------------------------------------------------------------------------------
# StreamingDetokenizer with the real tokenizer
# --------------------------------------------------------------------------------------------------------------

TEXTS = [
    "Café déjà vu — naïve façade, Ångström, Ørsted, São Paulo, Straße, Dvořák, İstanbul.",
    "日本語のテキストと中文文本，还有한국어 문장。罕见字：龘靐齉爩 𠀀𠀁𪚥",
    "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 😀🎉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# 标题 🎉 naïve\n\n|   a | b |\n",
    "  leading spaces and\ttabs\n\nnew lines  ",
]


def _stream(tokenizer, ids: list[int]) -> tuple[list[str], str, StreamingDetokenizer]:
    detok = StreamingDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_deltas_add_up_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    deltas, rest, detok = _stream(tokenizer, ids)
    assert "".join(deltas) + rest == full == detok.text
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas) and rest == ""


def test_streaming_exercises_split_characters(tokenizer):
    ids = tokenizer.encode(TEXTS[2])
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) > 5  # byte-level BPE splits the emoji


def test_streaming_holds_back_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    pieces = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert pieces, "expected the emoji to be split across tokens"
    cut = ids[: ids.index(pieces[-1])]  # drop the last piece: the emoji stays incomplete
    deltas, rest, _ = _stream(tokenizer, cut)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + rest == tokenizer.decode(cut) and rest.endswith("\ufffd")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=80))
def test_streaming_random_text(tokenizer, text):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    deltas, rest, _ = _stream(tokenizer, ids)
    assert "".join(deltas) + rest == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)

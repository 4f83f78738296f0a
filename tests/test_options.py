"""The one options object and the one front end: validation, precedence, config, CLI flags, and the
client text that adds up to the final text on every path."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import dsocr_mlx
from dsocr_mlx.cli import app
from dsocr_mlx.options import OCROptions, OptionError, coerce, option_fields
from dsocr_mlx.pipeline import OCRModel, join_pages
from dsocr_mlx.random_checkpoint import tiny_args
from dsocr_mlx.settings import TEMPLATE, load_settings
from dsocr_mlx.tokenizer import Tokenizer
from tests.test_pipeline import ScriptedRuntime


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return Tokenizer.from_folder(tiny_ckpt)


def scripted_model(tokenizer, raw: str) -> OCRModel:
    return OCRModel(ScriptedRuntime([tokenizer.encode(raw) + [tokenizer.eos_token_id]]), tokenizer, tiny_args())


@pytest.mark.parametrize(
    "bad, option, words",
    [
        (dict(mode="gundm"), "mode", "tiny, small, base, large, gundam"),
        (dict(task="poem"), "task", "markdown, ocr, free"),
        (dict(task="locate"), "ref", "needs the text"),
        (dict(top_p=0), "top_p", "(0, 1]"),
        (dict(top_k=-1), "top_k", ">= 0"),
        (dict(temperature=-1), "temperature", ">= 0"),
        (dict(repetition_penalty=0), "repetition_penalty", "> 0"),
        (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size", ">= 0"),
        (dict(max_new_tokens=0), "max_new_tokens", "at least 1"),
        (dict(dpi=5), "dpi", "between 18 and 1200"),
        (dict(output="yaml"), "output", "markdown, raw, json"),
        (dict(temperature="hot"), "temperature", "a number"),
        (dict(detect_loops=1), "detect_loops", "true or false"),
        (dict(stop=[1]), "stop", "list of strings"),
    ],
)
def test_bad_values_fail_when_the_options_are_built(bad, option, words):
    with pytest.raises(OptionError) as info:
        OCROptions(**bad)
    assert info.value.option == option and words in str(info.value)


def test_merged_layers_and_the_prompt_task_rule():
    base = OCROptions(task="free", mode="tiny", top_k=5)
    assert base.merged(mode=None, top_k=None) == base  # None: not given
    assert base.merged(prompt="<image>\nRead.").task is None  # a prompt replaces the configured task
    assert base.merged(prompt="<image>\nRead.").merged(task="ocr").prompt is None  # and a task the prompt
    with pytest.raises(OptionError, match="either a prompt or a task"):
        base.merged(prompt="x", task="ocr")
    with pytest.raises(OptionError, match="unknown option"):
        base.merged(temprature=1)
    assert base.merged(stop="END").stop == ("END",)
    assert OCROptions().sampling_params().no_repeat_ngram_size == 30
    assert OCROptions().sampling_params(pdf_page=True).no_repeat_ngram_size == 20
    assert OCROptions(no_repeat_ngram_size=0).sampling_params(pdf_page=True).no_repeat_ngram_size == 0


def test_values_from_form_fields():
    assert coerce("max_new_tokens", "12", text=True) == 12
    assert coerce("detect_loops", "false", text=True) is False
    assert coerce("temperature", "0.5", text=True) == 0.5
    with pytest.raises(OptionError, match="an integer"):
        coerce("top_k", "five", text=True)


def test_the_config_template_documents_every_config_option_and_loads(tmp_path):
    names = [f.name for f in option_fields("config")]
    ocr = TEMPLATE.split("[ocr]\n")[1].split("\n\n")[0]
    assert [line.split()[1] for line in ocr.splitlines()] == names
    # Every line uncommented is a valid config that gives the documented defaults (or the examples).
    uncommented = "\n".join(
        line[2:].split("  #")[0] if line.startswith("# ") and " = " in line else line
        for line in TEMPLATE.splitlines()
        if not line.startswith("# [server.models]") and not line.startswith("# small")
    )
    path = tmp_path / "config.toml"
    path.write_text(uncommented)
    loaded = load_settings(path)
    assert loaded.ocr == OCROptions(
        task="markdown", ref="total", mode="gundam", seed=0, no_repeat_ngram_size=30, ngram_window=90
    )


def test_a_bad_config_value_names_the_file_and_setting(tmp_path):
    path = tmp_path / "config.toml"
    for text, words in (
        ('[ocr]\nmode = "huge"\n', "unknown mode 'huge'"),
        ("[ocr]\ntop_k = 1.5\n", "an integer"),
        ('[ocr]\noutput = "raw"\n', "unknown setting ocr.output"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            load_settings(path)
        assert str(path) in str(info.value) and words in str(info.value)


def test_every_cli_option_has_a_flag():
    help_text = CliRunner().invoke(app, ["ocr", "--help"], env={"COLUMNS": "200"}).stdout
    for f in option_fields("cli"):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag


@pytest.mark.parametrize(
    "args, words",
    [
        (["--mode", "gundm"], "unknown mode 'gundm'"),
        (["--task", "poem"], "unknown task 'poem'"),
        (["--task", "locate"], "needs the text"),
        (["--top-p", "3"], "--top-p"),
        (["--task", "free", "--prompt", "x"], "either a prompt or a task"),
    ],
)
def test_a_typo_exits_2_before_the_model_loads(args, words, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dsocr_mlx, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 64)).save(page)
    result = CliRunner().invoke(app, ["ocr", str(page), *args])
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output
    assert calls == []  # the loader was never called


def test_cli_options_reach_the_pipeline(tmp_path, monkeypatch, tokenizer):
    model = scripted_model(tokenizer, "Hello")
    monkeypatch.setattr(dsocr_mlx, "load", lambda *a, **k: model)
    config = tmp_path / "config.toml"
    config.write_text('[ocr]\nmode = "tiny"\ntop_k = 5\nrepetition_penalty = 1.2\nstop = ["zz"]\n')
    monkeypatch.setenv("DSOCR_CONFIG", str(config))
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 64)).save(page)
    result = CliRunner().invoke(
        app,
        [
            "ocr",
            str(page),
            "--top-k",
            "7",
            "--seed",
            "3",
            "--no-detect-loops",
            "--stop",
            "a",
            "--stop",
            "b",
            "--temperature",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    params = model.runtime.calls[-1]
    assert (params.top_k, params.seed, params.repetition_penalty, params.temperature) == (7, 3, 1.2, 0.5)


# Pieces of raw model output that the official clean-up rewrites, holds or removes.
PIECES = [
    "Title",
    "body",
    " ",
    "\n",
    "\n\n",
    "\n\n\n",
    "\\coloneqq",
    "\\eqq",
    "colon",
    "é",
    "表",
    "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>",
    "<|ref|>image<|/ref|><|det|>[[50, 60, 700, 800]]<|/det|>",
    "<|ref|>title<|/ref|><|det|>[[5, 5, 900, 90]]<|/det|>\n",
    "<|ref|>",
    "<|re",  # with the next piece, joins into a span once the span between them is removed
    "f|>x<|/ref|><|det|>d<|/det|>",
    "<|ref|>x<|/ref|><|det|>d<|/det|>",
    "END",
    "EN",
    "</table>",
    "</tab",
]


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), min_size=1, max_size=14),
    page=st.sampled_from([None, 0, 3]),
    output=st.sampled_from(["markdown", "raw", "json"]),
    stop=st.sampled_from([(), ("END",), ("</table>", "END")]),
)
@example(parts=["Some cells here", "\n", "</tab", "le>"], page=None, output="markdown", stop=("</table>",))
@example(
    parts=[
        "<|re",
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>",
        "f|>x<|/ref|><|det|>d<|/det|>",
        " later ",
        "<|ref|>x<|/ref|><|det|>d<|/det|>",
        " tail",
    ],
    page=None,
    output="markdown",
    stop=(),
)
def test_streamed_client_text_adds_up_to_the_final_text(tokenizer, parts, page, output, stop):
    model = scripted_model(tokenizer, "".join(parts))
    image = Image.new("RGB", (200, 300), "white")
    responses = list(
        model.stream_ocr(image, task="free", mode="tiny", page=page, output=output, stop=stop, detect_loops=False)
    )
    result = responses[-1].result
    assert "".join(r.output for r in responses) == result.output_text(output)
    assert result.text == model.ocr(image, task="free", mode="tiny", page=page, stop=stop, detect_loops=False).text


# The official PDF script collapses blank lines only at a removed non-figure span.
KEPT = "Title\n\n\n\nbody"
COLLAPSED = "<|ref|>title<|/ref|><|det|>[[5, 5, 900, 90]]<|/det|>\nTitle\n\n\n\nbody"


@pytest.mark.parametrize("raw, page_text", [(KEPT, "Title\n\n\n\nbody"), (COLLAPSED, "\nTitle\n\nbody")])
def test_a_pdf_page_gives_the_same_markdown_on_every_path(raw, page_text, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("starlette")
    openai = pytest.importorskip("openai")
    from tests.test_server import KEY, data_url, running_server

    model = scripted_model(tokenizer, raw)
    path = tmp_path / "doc.pdf"
    Image.new("RGB", (300, 400), "white").save(path, "PDF", resolution=72)
    want = join_pages(list(model.ocr_many([path], mode="tiny")))
    assert want == page_text + f"\n{dsocr_mlx.pdf.PAGE_SEPARATOR}\n"
    (rendered,) = [img for _, img in dsocr_mlx.pdf.render_pages(path)]
    assert model.ocr(rendered, mode="tiny", page=0).text == page_text

    monkeypatch.setattr(dsocr_mlx, "load", lambda *a, **k: model)
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    cli = CliRunner().invoke(app, ["ocr", str(path), "--mode", "tiny"])
    assert cli.exit_code == 0 and cli.stdout == want + "\n", cli.output

    file_part = {
        "type": "file",
        "file": {"filename": "doc.pdf", "file_data": data_url(path.read_bytes(), "application/pdf")},
    }
    with running_server(tmp_path, loader=lambda _: model, ocr={"max_new_tokens": 64}) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [file_part]}]
        chat = client.chat.completions.create(model=tmp_path.name, messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == want
        whole = client.chat.completions.create(model=tmp_path.name, messages=messages)
        assert whole.choices[0].message.content == want
        inputs = [
            {
                "role": "user",
                "content": [{"type": "input_file", "filename": "doc.pdf", "file_data": file_part["file"]["file_data"]}],
            }
        ]
        events = client.responses.create(model=tmp_path.name, input=inputs, stream=True)
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want


class Spy:
    """A model that records the options each generation runs with."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_ocr(self, *args, options=None, **kwargs):
        self.seen.append(options)
        yield from self.model.stream_ocr(*args, options=options, **kwargs)

    def ocr(self, *args, options=None, **kwargs):
        self.seen.append(options)
        return self.model.ocr(*args, options=options, **kwargs)


def test_every_config_option_reaches_every_endpoint(tokenizer, tmp_path):
    pytest.importorskip("starlette")
    from tests.test_server import data_url, image_message, multipart, png, request, running_server

    config = {
        "task": "free",
        "ref": "total",
        "mode": "small",
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 1,
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 10,
        "ngram_window": 40,
        "detect_loops": False,
        "retry_on_repetition": False,
        "stop": ["zzz"],
        "dpi": 100,
    }
    assert set(config) == {f.name for f in option_fields("config")}  # a new option must be added here
    want = OCROptions(**config)
    assert all(getattr(want, k) != getattr(OCROptions(), k) for k in config)  # none is its default
    spy = Spy(scripted_model(tokenizer, "Hello"))
    with running_server(tmp_path, loader=lambda _: spy, ocr=config) as base:
        for path, key in (("/v1/chat/completions", "messages"), ("/v1/responses", "input")):
            status, _, body = request(base, path, {key: image_message(png())})
            assert status == 200, body
        body, ctype = multipart({}, ("scan.png", png()))
        status, _, reply = request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
        assert status == 200, reply
        streamed = request(base, "/v1/chat/completions", {"messages": image_message(png()), "stream": True})
        assert streamed[0] == 200
        pdf_path = tmp_path / "one.pdf"
        Image.new("RGB", (100, 100), "white").save(pdf_path, "PDF", resolution=72)
        part = {"type": "input_file", "file_data": data_url(pdf_path.read_bytes(), "application/pdf")}
        status, _, body = request(base, "/v1/responses", {"input": [{"role": "user", "content": [part]}]})
        assert status == 200, body
    assert spy.seen == [want, want, want, want, want]
    # Request fields beat the config, as on the command line.
    spy.seen.clear()
    with running_server(tmp_path, loader=lambda _: spy, ocr=config) as base:
        fields = {"temperature": 0.1, "top_k": 2, "repetition_penalty": 1.5, "seed": 9, "mode": "tiny"}
        request(base, "/v1/chat/completions", {"messages": image_message(png()), **fields})
        body, ctype = multipart({k: str(v) for k, v in fields.items()}, ("scan.png", png()))
        request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
    assert spy.seen == [want.merged(**fields)] * 2


def test_the_backend_contract(tiny_model, tiny_ckpt):
    from dsocr_mlx.backends import Runtime

    assert isinstance(tiny_model.runtime, Runtime)
    if "torch" in sys.modules or pytest.importorskip("torch"):
        torch_model = dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype="float32")
        assert isinstance(torch_model.runtime, Runtime)
    fields = {f.name for f in dataclasses.fields(OCROptions)}
    assert {"ignore_eos", "output"} <= fields
    json.dumps(OCROptions().to_dict())


def test_text_stream_holds_whitespace_before_a_stop_string_and_joined_spans():
    from dsocr_mlx.textstream import TextStream, final_text

    stream, out, raw = TextStream("markdown", stop=["</table>"]), "", ""
    for piece in ["Some cells here", "\n", "</", "table"]:
        raw += piece
        out += stream.feed(raw)
    assert out == "Some cells here"  # the newline before the stop string is not sent
    assert stream.finish(final_text("Some cells here", "markdown")) == ""

    span = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    later = "<|ref|>x<|/ref|><|det|>d<|/det|>"
    pieces = ["<|re", span, "f|>x<|/ref|><|det|>d<|/det|>", " later ", later, " tail"]
    stream, out, raw = TextStream("markdown"), "", ""
    for piece in pieces:
        raw += piece
        out += stream.feed(raw)
    out += stream.finish(final_text(raw.strip(), "markdown"))
    assert out == final_text(raw.strip(), "markdown") == " later  tail"

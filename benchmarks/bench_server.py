"""Concurrent clients against ``dsocr serve``: total time at several ``max_batch`` settings, same answers.

    python benchmarks/bench_server.py [--model DIR] [--backend mlx] [--clients 8] [--tokens 64] [--max-batch 1,8]

A real uvicorn server on a loopback port serves the model (loaded once, shared by the runs); for each
``max_batch`` the clients send their streaming chat requests at once (each with its own page image,
temperature 0) and the wall time until the last one ends is recorded. Every client's text must be the
same at every setting (batching never changes what a page gives). Writes ``server.json`` and
``server.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(model, max_batch: int, clients: int, tokens: int, mode: str | None) -> dict:
    """One server with ``max_batch``; ``clients`` streaming requests at once. Returns the time and texts."""
    import openai
    import uvicorn
    from dsocr_server import create_app

    from dsocr_mlx.bench import page_image
    from dsocr_mlx.settings import Settings

    settings = Settings()
    settings.model.update(path=str(model.path))
    settings.ocr = settings.ocr.merged(mode=mode, max_new_tokens=tokens, ignore_eos=False)
    settings.server.update(max_batch=max_batch, max_queue=clients, max_tokens_cap=tokens)
    app = create_app(settings, loader=lambda _: model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    urls = []
    for i in range(clients):
        buf = io.BytesIO()
        page_image(640, 560, seed=200 + i).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    texts, gate = [None] * clients, threading.Barrier(clients + 1)

    def ask(i: int) -> None:
        gate.wait()
        stream = client.chat.completions.create(
            model=app.state.dsocr.default,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}}]}],
            max_tokens=tokens,
            stream=True,
            extra_body={"task": "free", "detect_loops": False, "no_repeat_ngram_size": 0},
        )
        texts[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    server.should_exit = True
    thread.join(30)
    return {"max_batch": max_batch, "seconds": elapsed, "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the full-size random checkpoint)")
    parser.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mode", help="the mode (default: the family's smallest, tiny for DeepSeek-OCR)")
    parser.add_argument("--max-batch", default="1,8", help="comma-separated max_batch settings")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "server")
    args = parser.parse_args()

    import dsocr_mlx
    from dsocr_mlx.bench import machine
    from dsocr_mlx.random_checkpoint import default_bench_checkpoint

    path = args.model or str(default_bench_checkpoint())
    model = dsocr_mlx.load(path, backend=args.backend, dtype=args.dtype)
    mode = args.mode or ("tiny" if model.family == "deepseek-ocr" else None)
    settings = [int(x) for x in args.max_batch.split(",")]
    runs = []
    for max_batch in settings:
        print(f"max_batch {max_batch} ...", file=sys.stderr, flush=True)
        runs.append(run_clients(model, max_batch, args.clients, args.tokens, mode))
        print(f"  {runs[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    same = all(r["texts"] == runs[0]["texts"] for r in runs)
    first = runs[0]["seconds"]
    lines = [
        f"Machine: {machine()}",
        "",
        f"Model: {path} ({model.args.family_name}), {model.backend} {model.dtype}, mode {mode or 'default'}; "
        f"{args.clients} concurrent streaming clients, up to {args.tokens} tokens each, temperature 0.",
        "",
        f"| max_batch | total time (s) | vs max_batch {settings[0]} |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['max_batch']} | {r['seconds']:.1f} | {first / r['seconds']:.2f}x |" for r in runs]
    lines += ["", f"Every client's text is the same at every setting: {'yes' if same else 'NO'}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps({"runs": runs, "same_texts": same}, indent=1))
    (args.out / "server.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

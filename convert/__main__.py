"""``python -m dsocr_convert SRC DST``: the weight converter as a script (same as ``dsocr convert``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsocr_convert", description="Convert DeepSeek-OCR weights to MLX.")
    ap.add_argument("src", help="Hugging Face repo id or local folder (original layout)")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--q-bits", type=int, default=None, help="quantize with this many bits (4, 8, ...)")
    ap.add_argument("--q-group-size", type=int, default=64, choices=[16, 32, 64, 128])
    ap.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--upload-repo", default=None, help="upload the result to this Hugging Face repo")
    args = ap.parse_args(argv)

    from dsocr_mlx.convert import convert

    try:
        report = convert(args.src, args.dst, dtype=args.dtype, q_bits=args.q_bits, q_group_size=args.q_group_size,
                         q_mode=args.q_mode, overwrite=args.overwrite, upload_repo=args.upload_repo)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, ImportError) as e:
        print(f"dsocr convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.path} ({report.bytes / 1e9:.2f} GB, {len(report.files)} shard(s), {report.dtype}"
          f"{', quantized' if report.quantization else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

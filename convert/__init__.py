"""The weight converter's command-line shell, installed as ``dsocr_convert``; the work is
:func:`dsocr_mlx.convert.convert`."""

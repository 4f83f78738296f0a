"""Weight converter shell, installed as ``dsocr_convert`` (not yet written: see the converter issue)."""

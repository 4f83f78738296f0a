"""OpenAI-compatible server shell, installed as ``dsocr_server`` (not yet written: see the server issue)."""

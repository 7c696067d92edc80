"""Bundled real patient data (shipped inside the package; nothing is downloaded)."""

"""`twin.units`: conversions, the same-spelling shortcut, readability."""

from __future__ import annotations

import subprocess
import sys

import pytest

from twin.units import UnitError, conversion_factor, is_readable_unit


def test_conversions_and_errors():
    assert conversion_factor("mg", "mg") == 1.0
    assert conversion_factor("g", "mg") == pytest.approx(1000.0)
    assert conversion_factor("ug/L", "ng/mL") == pytest.approx(1.0)
    assert conversion_factor("mm3", "mm**3") == 1.0
    with pytest.raises(UnitError):
        conversion_factor("ng/mX", "ng/mL")
    with pytest.raises(UnitError):
        conversion_factor("mg", "ng/mL")  # readable, wrong dimension
    assert is_readable_unit("ng/mL") and is_readable_unit("µg/L") and not is_readable_unit("ng/mX") and not is_readable_unit("")


def test_same_spelling_does_not_load_pint():
    """A protocol in mg (the common case) never pays for pint's registry (~0.5 s per process)."""
    code = "import sys; from twin.units import conversion_factor; assert conversion_factor('mg', 'mg') == 1.0; print('pint' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"

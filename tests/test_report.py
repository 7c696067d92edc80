"""The HTML report (scenarios/report.py): self-contained, parseable, with provenance."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from scenarios.outcomes import build_result
from scenarios.report import render_report, write_report


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    t = np.arange(0.0, 113.0, 7.0)
    arms = ["continuous", "adaptive"]
    growth = np.array([0.004, 0.012])[:, None, None] + 0.003 * rng.standard_normal((2, 10, 1))
    psa = 10.0 * np.exp(growth * t)
    vol = 1000.0 * np.exp(growth * t)
    on = np.ones((2, 10, t.size), bool)
    on[1, :, 6:10] = False
    dose = np.cumsum(on, axis=-1)[..., None] * 7.5
    ds = build_result(t, arms, {"psa": psa, "tumor_volume": vol, "on_treatment": on, "cumulative_dose": dose},
                      drugs=["leuprolide"], patient_id="P-REPORT", seed=11, versions="twin=test, numpy=x")
    ds.attrs.update({"visits": t[::4], "scenario": "s", "scenario_sha256": "ab" * 32,
                     "patient_sha256": '{"patient.toml": "' + "cd" * 32 + '"}', "twin_kind": "prior"})
    return ds


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.imgs = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "action", "data") and v is not None:
                self.urls.append(v)
        if tag == "img":
            self.imgs += 1
        if tag in ("script", "link", "iframe"):
            self.urls.append(f"<{tag}>")


def test_report_is_self_contained(result, tmp_path):
    path = write_report(result, tmp_path / "r.html", title="Test report")
    text = path.read_text(encoding="utf-8")
    p = _Collect()
    p.feed(text)
    p.close()
    assert p.imgs >= 2
    assert all(u.startswith("data:image/png;base64,") for u in p.urls), p.urls
    assert "http://" not in text and "https://" not in text and "@import" not in text
    assert "P-REPORT" in text and "ab" * 32 in text and "cd" * 32 in text and "twin=test" in text
    assert "How to read this" in text and "Arm comparisons" in text and "Outcomes per arm" in text
    assert "prior predictions" in text


def test_report_into_folder_and_observed(result, tmp_path):
    import pandas as pd

    obs = pd.DataFrame({"time": [0.0, 28.0], "observable": ["psa", "psa"], "value": [10.0, 12.0], "censored": [False, False]})
    path = write_report(result, tmp_path, observed=obs)
    assert path.name == "report.html" and path.is_file()


def test_report_escapes_text(result):
    r = result.copy()
    r.attrs["patient_id"] = "<script>x</script>"
    html = render_report(r)
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_headless(result, tmp_path):  # pragma: no cover - needs chromium
    path = write_report(result, tmp_path / "r.html")
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "How to read this" in out.stdout
    assert "Uncaught" not in out.stderr

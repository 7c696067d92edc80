"""Package-level contracts: import isolation, direction of imports, public API, CLI basics."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_import_twin_is_light():
    mods = _modules_after("import twin")
    for heavy in ("pymc", "arviz", "matplotlib", "pytensor", "calibration", "scenarios", "dask"):
        assert heavy not in mods, f"`import twin` imported {heavy}"


@pytest.mark.parametrize("package", ["twin"])
def test_twin_never_imports_calibration_or_scenarios(package):
    """Static check: no module of twin/ imports calibration or scenarios (cli.py may, lazily)."""
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in ("calibration", "scenarios"):
                    offenders.append(f"{path.relative_to(ROOT)}: {n}")
    assert not offenders, offenders


def test_public_names_are_documented():
    import twin

    for name in twin.__all__:
        obj = getattr(twin, name)
        if name.startswith("__"):
            continue
        assert getattr(obj, "__doc__", None), f"twin.{name} has no docstring"


def test_cli_version_and_usage(capsys):
    from twin.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "twin" in capsys.readouterr().out
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_python_dash_m_twin():
    out = subprocess.run([sys.executable, "-m", "twin", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("twin ")


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    """`twin demo` (small): patient summary, calibrated twin (diagnostics passed), the ADT
    scenario arms across its posterior draws, the HTML report and the twin file."""
    from twin.cli import main
    from twin.twin import Twin

    assert main(["demo", "-o", str(tmp_path), "--draws", "8"]) == 0
    out = capsys.readouterr().out
    assert "bruchovsky-101" in out and "Diagnostics" in out and "observations in the 90% predictive interval" in out
    for arm in ("continuous", "intermittent", "adaptive"):
        assert arm in out
    tw = Twin.load(tmp_path / "bruchovsky-101.twin.nc")
    assert tw.n_draws == 8 and tw.method == "map" and "ppc_coverage90" in tw.diagnostics
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html.lower() and "intermittent" in html
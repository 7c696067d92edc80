"""Shared test fixtures.

``good_bundle`` writes a small, valid patient bundle folder (patient.toml + CSV tables)
into the test's ``tmp_path``; a test changes, adds or removes single files to build the
case it needs. Keep it generic: other test modules use it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The contents of a valid bundle. Times are days; weight 80 kg and height 180 cm give a
# body-surface area of exactly 2.0 m² (Mosteller: sqrt(80 * 180 / 3600)).
GOOD_FILES: dict[str, str] = {
    "patient.toml": """\
id = "{id}"

[covariates]
age = 64
sex = "male"
weight = 80
height = 180

[labels]
relapse = false
""",
    "measurements.csv": """\
time,observable,value,unit
0,psa,12.5,ng/mL
28,psa,8.1,ng/mL
56,psa,4.0,ng/mL
84,psa,2.2,ng/mL
""",
    "dosing.csv": """\
drug,time,amount,unit,route,interval,count
docetaxel,0,75,mg/m2,iv,21,3
abiraterone,0,1000,mg,oral,1,84
""",
    "omics/mutations.csv": """\
gene,protein_change,vaf,classification
TP53,R273H,0.45,missense
""",
    "omics/copy_number.csv": """\
gene,log2_ratio,gistic
AR,1.8,2
""",
}


@pytest.fixture
def good_bundle(tmp_path: Path):
    """Factory: ``good_bundle(name="P001", files=None, *, patient_id=None) -> Path``.

    Writes a valid bundle folder ``tmp_path / name``. ``files`` maps a path inside the
    bundle to new content (``str`` or ``bytes``), or to ``None`` to leave that file out.
    The patient id is ``patient_id`` (default: the last part of ``name``, so
    ``good_bundle("cohort/P002")`` makes patient P002 inside a cohort folder); a replacement ``patient.toml``
    may use ``{id}`` for it. The default contents are ``good_bundle.files``.
    """

    def make(name: str = "P001", files: dict[str, str | bytes | None] | None = None, *, patient_id: str | None = None) -> Path:
        contents: dict[str, str | bytes | None] = {**GOOD_FILES, **(files or {})}
        root = tmp_path / name
        root.mkdir(parents=True)
        for rel, content in contents.items():
            if content is None:
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                if rel == "patient.toml":
                    content = content.replace("{id}", patient_id or Path(name).name)
                target.write_text(content, encoding="utf-8")
        return root

    make.files = dict(GOOD_FILES)
    return make

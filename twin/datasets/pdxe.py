"""Converter for the Novartis PDX Encyclopedia (PDXE) in vivo screen (Gao et al. 2015).

The source (raw tables of the Xeva PDXE XevaSet, github.com/spocks/PDXE_xevaSet) is a folder::

    pdxe_tumor_volume_timeseries.csv    model.id, drug, time [day], volume [mm3], body.weight [g]
    model_info.csv                      model.id, tissue, tissue.name, patient.id, drug
    pdxe_mutation_cn_calls_long.csv.gz  biobase_id, gene, call (Gao 2015 mutation / CN calls)

One :class:`~twin.patient.Patient` per PDX (``patient.id``, e.g. ``X-007``) that has at least
one volume curve; each treatment (one mouse) is an *arm* named after the treatment with
twin's catalogue names (``untreated``, ``alpelisib``, ``encorafenib+binimetinib``,
``binimetinib-3.5mpk``). Dose and schedule are not in the source: each treated arm gets one
dosing row per component drug at day 0 with the amount left blank and ``duration`` = the
arm's follow-up (exposure over the whole window). Decisions and data quirks:
``docs/datasets.md``.

Regenerate the bundled copy with::

    python -m twin.datasets.pdxe /path/to/novartis_pdxe OUTDIR
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..drugs import lookup_drug
from ..errors import InputError, PatientFileError
from ..patient import Cohort, Patient

__all__ = ["from_raw", "arm_name", "route_of", "patient_documents", "write_bundles", "DATASET", "CITATION", "LICENCE", "BODY_WEIGHT_RANGE_G", "DOSING_NOTE"]

DATASET = "Novartis PDX Encyclopedia (PDXE) in vivo drug screen (Gao et al. 2015), raw tables of the Xeva PDXE XevaSet"
CITATION = (
    "Gao H, Korn JM, Ferretti S, et al. High-throughput screening using patient-derived tumor xenografts to predict "
    "clinical trial drug response. Nat Med 2015;21(11):1318-1325. doi:10.1038/nm.3954; "
    "Mer AS, et al. Integrative pharmacogenomics analysis of patient-derived xenografts. Cancer Res 2019;79(17):4539-4550"
)
LICENCE = (
    "no explicit licence: supplementary data of Gao et al. 2015 (Nature Medicine), released by Novartis for research; "
    "also redistributed in the Bioconductor package Xeva (GPL-3); attribution required; check before public redistribution"
)
SOURCE_URL = "https://github.com/spocks/PDXE_xevaSet/tree/5e584dbb447997b1b8c20a23dc2280a8a701b6f2/data/raw_data"
DOSING_NOTE = (
    "dose and schedule not recorded in source: one row per drug at day 0, amount blank, duration = the arm's follow-up "
    "(exposure over the whole window, not one infusion); route assumed from the drug type (small molecules oral, "
    "antibodies and other biologics iv, taxanes iv, other chemotherapy ip). Arms named '<drug>-<x>mpk' state the dose: "
    "x mg/kg converted to mg with that mouse's body weight at day 0"
)

#: Plausible body weights of an adult nude/NSG mouse [g]; values outside are entry errors
#: (the source has -0.1 and single-visit spikes of 53-219 g among 20-30 g neighbours).
BODY_WEIGHT_RANGE_G = (5.0, 50.0)

_MUTATIONS = {"MutKnownFunctional": "known_functional", "MutLikelyFunctional": "likely_functional", "MutNovel": "novel"}
_MUT_ORDER = ["known_functional", "likely_functional", "novel"]
_COPY_NUMBER = {"Amp5": (2, 5.0), "Amp8": (2, 8.0), "Del0.8": (-2, None)}

# Route assumptions by drug (Gao 2015 does not give routes in the tables used here).
_IV_CHEMO = {"paclitaxel", "nab_paclitaxel"}
_IP_CHEMO = {"gemcitabine", "fluorouracil", "dacarbazine"}


def route_of(drug: str) -> str:
    """Assumed route for a catalogue drug: biologics and taxanes iv, other chemotherapy ip, else oral."""
    d = lookup_drug(drug)
    if d is None:
        raise InputError(f"unknown drug {drug!r}")
    cls = d.drug_class.lower()
    if "antibod" in cls or "nanobody" in cls or d.name in _IV_CHEMO:
        return "iv"
    if d.name in _IP_CHEMO:
        return "ip"
    return "oral"


def _components(treatment: str) -> list[tuple[str, float | None]]:
    """[(catalogue drug name, dose in mg/kg or None)] of a PDXE treatment name."""
    out = []
    for part in (p.strip() for p in treatment.split("+")):
        m = re.fullmatch(r"(.+?)-([\d.]+)mpk", part)
        base, mpk = (m.group(1), float(m.group(2))) if m else (part, None)
        d = lookup_drug(base)
        if d is None:
            raise InputError(f"PDXE treatment {treatment!r}: drug {base!r} is not in twin's catalogue; fix: add it to twin/data/drugs.toml (with its Novartis code as a synonym)")
        out.append((d.name, mpk))
    return out


def arm_name(treatment: str) -> str:
    """Readable arm name: ``untreated``, catalogue names joined by ``+``, ``-<x>mpk`` kept."""
    if treatment.strip().lower() == "untreated":
        return "untreated"
    return "+".join(f"{name}-{mpk:g}mpk" if mpk is not None else name for name, mpk in _components(treatment))


def _g(x: float) -> float:
    """Round to 10 significant digits, as written in bundles (so a re-read is identical)."""
    return float(f"{x:.10g}")


def _omics(calls: pd.DataFrame) -> tuple[list[dict], list[dict], list[str]]:
    """(mutation records, copy-number records, genes with several mutation classes).

    A gene with several mutation classes (e.g. ``MutNovel;MutKnownFunctional``) becomes one
    record with the most functional class (known > likely > novel): without protein
    changes, two records of one gene would be duplicates in the patient format. The
    other classes are listed in the third item (kept in ``source.mutations_several_classes``).
    """
    muts, cns, several = [], [], []
    for gene, call in zip(calls["gene"], calls["call"]):
        parts = call.split(";")
        classes = sorted({_MUTATIONS[p] for p in parts if p in _MUTATIONS}, key=_MUT_ORDER.index)
        cn_parts = [p for p in parts if p in _COPY_NUMBER]
        unknown = [p for p in parts if p not in _MUTATIONS and p not in _COPY_NUMBER]
        if unknown:
            raise InputError(f"PDXE call {call!r} for {gene}: unknown code(s) {unknown}; expected {sorted(_MUTATIONS) + sorted(_COPY_NUMBER)}")
        if classes:
            muts.append({"gene": gene, "classification": classes[0]})
            if len(classes) > 1:
                several.append(f"{gene} ({';'.join(classes)})")
        if cn_parts:
            gistic = {_COPY_NUMBER[p][0] for p in cn_parts}
            if len(gistic) > 1:
                raise InputError(f"PDXE call {call!r} for {gene}: both amplification and deletion")
            copies = [_COPY_NUMBER[p][1] for p in cn_parts if _COPY_NUMBER[p][1] is not None]
            rec = {"gene": gene, "gistic": gistic.pop(), "call": ";".join(cn_parts)}
            if copies:
                rec["copies"] = max(copies)
            cns.append(rec)
    return muts, cns, several


def patient_documents(path: str | Path, *, omics: bool = True) -> list[dict]:
    """Patient documents (single-file layout) for every PDX of the raw folder that has a volume curve."""
    root = Path(path)
    for f in ("pdxe_tumor_volume_timeseries.csv", "model_info.csv"):
        if not (root / f).exists():
            raise InputError(f"{root}: missing {f}; fix: point to the PDXE raw folder")
    vol = pd.read_csv(root / "pdxe_tumor_volume_timeseries.csv", dtype={"model.id": str, "drug": str})
    info = pd.read_csv(root / "model_info.csv", dtype=str)
    calls = None
    cfile = root / "pdxe_mutation_cn_calls_long.csv.gz"
    if omics and cfile.exists():
        calls = pd.read_csv(cfile, dtype=str)
    missing = sorted(set(vol["model.id"]) - set(info["model.id"]))
    if missing:
        raise InputError(f"model ids with curves but not in model_info.csv: {missing[:5]}")
    info = info.set_index("model.id")
    vol = vol.join(info[["patient.id"]], on="model.id")
    docs = []
    by_patient_calls = dict(tuple(calls.groupby("biobase_id"))) if calls is not None else {}
    sample_tissue: dict[str, str] = {}
    sfile = root / "pdxe_mutation_samples.csv"
    if omics and sfile.exists():
        samples = pd.read_csv(sfile, dtype=str)
        sample_tissue = dict(zip(samples["sampleID"], samples["tissue"]))
    for pid, pv in vol.groupby("patient.id", sort=True):
        notes: list[str] = []
        meas, dosing = [], []
        arms_seen: dict[str, str] = {}
        first = info.loc[pv["model.id"].iloc[0]]
        for model_id, mv in pv.groupby("model.id", sort=True):
            treatment = info.loc[model_id, "drug"]
            if mv["drug"].iloc[0] != treatment or mv["drug"].nunique() != 1:
                raise InputError(f"{model_id}: treatment differs between the volume table and model_info.csv")
            arm = arm_name(treatment)
            if arm in arms_seen:
                raise InputError(f"{pid}: arms {arms_seen[arm]} and {model_id} both map to arm {arm!r}")
            arms_seen[arm] = model_id
            mv = mv.sort_values("time", kind="stable")
            if mv["time"].duplicated().any():
                n = int(mv["time"].duplicated().sum())
                notes.append(f"arm {arm} ({model_id}) dropped: {len(mv)} rows with {n} repeated days (several animals in one model id, rows ordered by volume within a day, so animals cannot be told apart)")
                continue
            bad_bw = []
            for t, v, bw in zip(mv["time"], mv["volume"], mv["body.weight"]):
                t = float(t)
                meas.append({"arm": arm, "time": t, "observable": "tumor_volume", "value": _g(float(v)), "unit": "mm3"})
                if pd.notna(bw):
                    if BODY_WEIGHT_RANGE_G[0] <= bw <= BODY_WEIGHT_RANGE_G[1]:
                        meas.append({"arm": arm, "time": t, "observable": "body_weight", "value": _g(float(bw) / 1000.0), "unit": "kg"})
                    else:
                        bad_bw.append(f"day {t:g}: {bw:g} g")
            if bad_bw:
                notes.append(f"arm {arm}: implausible body weight dropped ({', '.join(bad_bw)})")
            if arm == "untreated":
                continue
            follow_up = float(mv["time"].max())
            bw0 = mv.loc[mv["time"] == 0, "body.weight"]
            for drug, mpk in _components(treatment):
                rec = {"arm": arm, "drug": drug, "time": 0.0, "route": route_of(drug)}
                if follow_up > 0:
                    rec["duration"] = follow_up
                if mpk is not None:
                    if len(bw0) and pd.notna(bw0.iloc[0]) and BODY_WEIGHT_RANGE_G[0] <= bw0.iloc[0] <= BODY_WEIGHT_RANGE_G[1]:
                        rec.update(amount=_g(mpk * float(bw0.iloc[0]) / 1000.0), unit="mg")
                        notes.append(f"arm {arm}: {mpk:g} mg/kg x {bw0.iloc[0]:g} g (body weight at day 0) = {rec['amount']:g} mg per administration")
                    else:
                        notes.append(f"arm {arm}: {mpk:g} mg/kg stated but no body weight at day 0; amount left blank")
                dosing.append(rec)
            if float(mv["time"].min()) > 0:
                notes.append(f"arm {arm}: first measurement at day {float(mv['time'].min()):g} (treatment start is day 0)")
        meas.sort(key=lambda r: (r["arm"], r["time"], r["observable"]))
        dosing.sort(key=lambda r: (r["arm"], r["time"], r["drug"]))
        source = {"dataset": DATASET, "citation": CITATION, "licence": LICENCE, "url": SOURCE_URL, "dosing": DOSING_NOTE, "models": ", ".join(f"{a}={m}" for a, m in sorted(arms_seen.items()))}
        doc = {
            "id": pid,
            "covariates": {"species": "mouse"},
            "labels": {"tissue": first["tissue"], "tissue_name": first["tissue.name"]},
            "measurements": meas,
        }
        if dosing:
            doc["dosing"] = dosing
        pc = by_patient_calls.get(pid)
        if pc is not None:
            muts, cns, several = _omics(pc.sort_values("gene", kind="stable"))
            doc["omics"] = {k: v for k, v in (("mutations", muts), ("copy_number", cns)) if v}
            source["omics"] = (
                "pdxe_mutation_cn_calls_long.csv.gz (Gao 2015 calls): MutKnownFunctional/MutLikelyFunctional/MutNovel -> mutations "
                "(classification known_functional/likely_functional/novel; no protein change or VAF in source; a gene with several "
                "classes keeps the most functional one, all listed in mutations_several_classes), Amp5/Amp8 -> copy_number gistic 2 "
                "with copies >= 5/8, Del0.8 -> gistic -2; call verbatim"
            )
            if several:
                source["mutations_several_classes"] = ", ".join(several)
            if pid in sample_tissue and sample_tissue[pid] != first["tissue"]:
                notes.append(f"tissue {first['tissue']} in model_info.csv (used) but {sample_tissue[pid]!r} in pdxe_mutation_samples.csv")
        elif calls is not None:
            notes.append("no mutation/copy-number calls for this PDX in the source")
        if notes:
            source["conversion_notes"] = "; ".join(notes)
        doc["source"] = source
        docs.append(doc)
    return docs


def from_raw(path: str | Path, *, omics: bool = True) -> Cohort:
    """Convert the PDXE raw folder into a :class:`~twin.patient.Cohort` (one patient per PDX).

    Parameters
    ----------
    path : folder with ``pdxe_tumor_volume_timeseries.csv``, ``model_info.csv`` and
        (optional) ``pdxe_mutation_cn_calls_long.csv.gz``.
    omics : read the mutation / copy-number calls.

    Every patient passes the patient-file checks; a failure raises
    :class:`~twin.errors.PatientFileError` with the problems.
    """
    from ..io import patient_from_document

    patients: list[Patient] = []
    for doc in patient_documents(path, omics=omics):
        patient, problems = patient_from_document(doc, doc["id"])
        if patient is None:
            raise PatientFileError(doc["id"], problems.errors)
        patients.append(patient)
    return Cohort(tuple(patients), name="pdxe", source={"dataset": DATASET, "citation": CITATION, "licence": LICENCE, "path": str(path)})


def write_bundles(cohort: Cohort, outdir: str | Path, *, overwrite: bool = True) -> list[Path]:
    """Save every patient as a bundle folder ``outdir/<id>/`` (canonical units)."""
    from ..io import save_cohort

    return save_cohort(cohort, outdir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """``python -m twin.datasets.pdxe SRC OUTDIR``: convert and write the bundles."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m twin.datasets.pdxe", description="Convert the PDXE raw tables into twin patient bundles.")
    ap.add_argument("src", help="folder with pdxe_tumor_volume_timeseries.csv, model_info.csv, pdxe_mutation_cn_calls_long.csv.gz")
    ap.add_argument("outdir", help="output folder (one sub-folder per PDX)")
    ap.add_argument("--no-omics", action="store_true", help="skip the mutation / copy-number calls")
    args = ap.parse_args(argv)
    cohort = from_raw(args.src, omics=not args.no_omics)
    paths = write_bundles(cohort, args.outdir)
    print(f"wrote {len(paths)} patients to {args.outdir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

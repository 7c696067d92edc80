"""`Regimen`: the one dose-event type, shared by a patient's history, scenarios and calibration.

A regimen is a table of administrations in canonical units: time [day], amount [mg]
(NaN when not recorded), route, infusion duration [day] (0 = bolus), and for compact
repeated dosing an ``interval`` [day] and a ``count``. :meth:`Regimen.events` expands
the repeats into one row per administration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

__all__ = ["Regimen", "REGIMEN_COLUMNS"]

REGIMEN_COLUMNS = ("arm", "drug", "time", "amount", "route", "duration", "interval", "count", "note")
_DTYPES = {
    "arm": "object", "drug": "object", "time": "float64", "amount": "float64", "route": "object",
    "duration": "float64", "interval": "float64", "count": "int64", "note": "object",
}


def _canonical(t: pd.DataFrame) -> bool:
    """True when ``t`` has exactly ``REGIMEN_COLUMNS`` in order, their dtypes, and rows sorted
    by (arm, time, drug): what ``Regimen`` would build from it is ``t`` itself (renumbered)."""
    if tuple(t.columns) != REGIMEN_COLUMNS or any(str(t.dtypes.iloc[i]) != _DTYPES[c] for i, c in enumerate(REGIMEN_COLUMNS)):
        return False
    if len(t) < 2:
        return True
    a, tm, d = t["arm"].to_numpy(), t["time"].to_numpy(), t["drug"].to_numpy()
    try:
        lt_a, eq_a = a[:-1] < a[1:], a[:-1] == a[1:]
        lt_d = d[:-1] <= d[1:]
    except TypeError:  # mixed types: let the full path sort (or fail) as before
        return False
    lt_t, eq_t = tm[:-1] < tm[1:], tm[:-1] == tm[1:]
    return bool(np.all(lt_a | (eq_a & (lt_t | (eq_t & lt_d)))))


@dataclass(frozen=True, eq=False)
class Regimen:
    """A dose history or plan (immutable; operations return new regimens).

    Parameters
    ----------
    table : DataFrame with columns ``REGIMEN_COLUMNS`` in canonical units (``note``, free
        text, may be omitted).
    """

    table: pd.DataFrame

    def __post_init__(self):
        t = self.table
        if "note" not in t.columns:  # free text is optional
            t = t.assign(note=None)
        missing = [c for c in REGIMEN_COLUMNS if c not in t.columns]
        if missing:
            raise ValueError(f"Regimen table lacks columns {missing}; expected {list(REGIMEN_COLUMNS)}")
        if _canonical(t):  # already in canonical form (e.g. a slice of a regimen): the same table, copied
            t = t.reset_index(drop=True).copy()
        else:
            t = t.loc[:, list(REGIMEN_COLUMNS)].astype(_DTYPES)
            t = t.sort_values(["arm", "time", "drug"], kind="stable").reset_index(drop=True)
        object.__setattr__(self, "table", t)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls) -> "Regimen":
        return cls(pd.DataFrame({c: pd.Series(dtype=d) for c, d in _DTYPES.items()}))

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "Regimen":
        """Build from dicts with keys of ``REGIMEN_COLUMNS`` (missing optional keys get defaults)."""
        rows = []
        for r in records:
            rows.append(
                {
                    "arm": r.get("arm", "main"),
                    "drug": r["drug"],
                    "time": float(r["time"]),
                    "amount": np.nan if r.get("amount") is None else float(r["amount"]),
                    "route": r.get("route", "oral"),
                    "duration": float(r.get("duration") or 0.0),
                    "interval": np.nan if r.get("interval") is None else float(r["interval"]),
                    "count": int(r.get("count") or 1),
                    "note": r.get("note"),
                }
            )
        if not rows:
            return cls.empty()
        return cls(pd.DataFrame(rows))

    @classmethod
    def from_events(cls, events: pd.DataFrame, *, arm: str | None = None) -> "Regimen":
        """The regimen of an :meth:`events` table (one row per administration; ``arm``: put
        every row in that arm). Cheap when the table's dtypes are canonical (the usual case: the
        events of another regimen): no per-row parsing."""
        if events is None or len(events) == 0:
            return cls.empty()
        ev = events
        if "count" not in ev.columns and "interval" not in ev.columns:
            ev = ev.assign(interval=np.nan, count=1)
        if arm is not None:
            ev = ev.assign(arm=arm)
        if "note" not in ev.columns:
            ev = ev.assign(note=None)
        if (set(REGIMEN_COLUMNS) <= set(ev.columns) and ev["count"].notna().all() and ev["duration"].notna().all()
                and ev["drug"].map(lambda d: isinstance(d, str)).all()):
            return cls(ev.loc[:, list(REGIMEN_COLUMNS)])
        return cls.from_records(ev.to_dict("records"))

    # -- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    @property
    def drugs(self) -> list[str]:
        return sorted(self.table["drug"].unique())

    @property
    def arms(self) -> list[str]:
        return sorted(self.table["arm"].unique())

    def for_arm(self, arm: str) -> "Regimen":
        return Regimen(self.table[self.table["arm"] == arm])

    def events(self) -> pd.DataFrame:
        """One row per administration: arm, drug, time [day], amount [mg], route, duration [day]."""
        t = self.table
        if t.empty:
            return t.drop(columns=["interval", "count"]).copy()
        reps = t["count"].to_numpy()
        idx = np.repeat(np.arange(len(t)), reps)
        k = np.concatenate([np.arange(n) for n in reps])
        out = t.iloc[idx].reset_index(drop=True).drop(columns=["interval", "count"])
        step = np.nan_to_num(t["interval"].to_numpy()[idx], nan=0.0)
        out["time"] = out["time"].to_numpy() + k * step
        return out.sort_values(["arm", "time", "drug"], kind="stable").reset_index(drop=True)

    def total_amount(self, drug: str) -> float:
        """Cumulative amount [mg] of ``drug`` (NaN if any amount is unrecorded)."""
        t = self.table[self.table["drug"] == drug]
        return float((t["amount"] * t["count"]).sum(min_count=1)) if not t["amount"].isna().any() else float("nan")

    def __repr__(self) -> str:
        return f"Regimen({len(self)} rows, drugs={self.drugs}, arms={self.arms})"

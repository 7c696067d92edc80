"""`twin.regimen.Regimen`: canonical form, the fast path for tables already canonical, events round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.regimen import REGIMEN_COLUMNS, Regimen, _canonical

ROWS = [
    {"drug": "leuprolide", "time": 0.0, "amount": 7.5, "route": "im"},
    {"drug": "cyproterone_acetate", "time": 0.0, "amount": 100.0, "interval": 0.5, "count": 4},
    {"drug": "abiraterone", "time": 3.0, "amount": 1000.0, "duration": 0.04},
    {"arm": "b", "drug": "abiraterone", "time": 1.0, "amount": None},
]


def test_table_is_sorted_typed_and_detected_canonical():
    r = Regimen.from_records(ROWS)
    t = r.table
    assert tuple(t.columns) == REGIMEN_COLUMNS and _canonical(t)
    assert list(zip(t["arm"], t["time"], t["drug"])) == sorted(zip(t["arm"], t["time"], t["drug"]))
    shuffled = t.iloc[::-1]
    assert not _canonical(shuffled)
    pd.testing.assert_frame_equal(Regimen(shuffled).table, t)  # the full path sorts it back
    wrong_dtype = t.astype({"count": "float64"})
    assert not _canonical(wrong_dtype)
    pd.testing.assert_frame_equal(Regimen(wrong_dtype).table, t)


def test_fast_path_copies_the_callers_table():
    t = Regimen.from_records(ROWS).table.copy()
    r = Regimen(t)
    t.loc[0, "amount"] = -1.0
    assert (r.table["amount"].fillna(0) >= 0).all()


def test_from_events_equals_the_records_path():
    r = Regimen.from_records(ROWS)
    ev = r.events()
    assert len(ev) == 4 + 1 + 1 + 1  # the 4 cyproterone repeats expanded
    a = Regimen.from_events(ev)
    b = Regimen.from_records(ev.to_dict("records"))
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.events(), ev)
    main = Regimen.from_events(ev, arm="main")
    assert set(main.table["arm"]) == {"main"} and len(main) == len(ev)
    assert np.isnan(a.table.loc[a.table["arm"] == "b", "amount"]).all()  # unrecorded amount kept as NaN
    assert len(Regimen.from_events(ev.iloc[:0])) == 0

"""Reading, validating and writing patient files (see ``docs/patient-format.md``)."""

from .load import load_patient, read_patient, validate_patient, load_cohort
from .save import save_patient
from .records import json_schema

__all__ = ["load_patient", "read_patient", "validate_patient", "load_cohort", "save_patient", "json_schema"]

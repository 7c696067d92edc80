"""Reading, validating and writing patient files (see ``docs/patient-format.md``)."""

from .load import load_cohort, load_patient, patient_from_document, read_patient, validate_patient
from .save import save_cohort, save_patient
from .records import json_schema

__all__ = ["load_patient", "read_patient", "validate_patient", "load_cohort", "save_patient", "save_cohort", "json_schema", "patient_from_document"]

"""Evaluation: pure metric functions (:mod:`.metrics`), case matching and ``dataset.json``
scored labels (:mod:`.cases`), folders -> nnU-Net-style summary (:mod:`.evaluator`), the
``summary.json`` / CSV / table writers (:mod:`.report`), and where gate maps look (:mod:`.gates`)."""

from medseg.evaluate.cases import case_key, load_dataset_json, match_cases
from medseg.evaluate.evaluator import align_to_reference, evaluate_case, evaluate_folders, summarize
from medseg.evaluate.gates import gate_localisation
from medseg.evaluate.metrics import ALL_METRICS, assd, compute_metrics, confusion, dice, hd95, iou, nsd, surface_distances
from medseg.evaluate.report import format_table, write_summary

__all__ = [
    "ALL_METRICS",
    "align_to_reference",
    "assd",
    "case_key",
    "compute_metrics",
    "confusion",
    "dice",
    "evaluate_case",
    "evaluate_folders",
    "format_table",
    "gate_localisation",
    "hd95",
    "iou",
    "load_dataset_json",
    "match_cases",
    "nsd",
    "summarize",
    "surface_distances",
    "write_summary",
]

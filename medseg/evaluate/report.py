"""Write an evaluation summary: ``summary.json`` (nnU-Net layout), a CSV, and a console table.

JSON: Python's ``json`` with ``NaN`` / ``Infinity`` tokens, like nnU-Net's ``summary.json``
(``json.load`` reads them back). CSV: one row per case and scored class, columns ``case, label,
name, prediction_file, reference_file`` then the metric columns; NaN / inf are written as
``nan`` / ``inf``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from medseg.evaluate.metrics import METRIC_KEYS
from medseg.io import atomic_write_text

__all__ = ["format_table", "summary_rows", "write_summary"]

COUNT_KEYS = ("n_pred", "n_ref", "TP", "FP", "FN", "TN")


def _metric_columns(summary: dict) -> list[str]:
    return [METRIC_KEYS[m] for m in summary["metrics"]] + list(COUNT_KEYS)


def summary_rows(summary: dict) -> list[dict]:
    """The CSV rows: one dict per (case, class) of ``summary["metric_per_case"]``."""
    names = summary.get("label_names", {})
    cols = _metric_columns(summary)
    rows = []
    for case in summary["metric_per_case"]:
        for lab, m in case["metrics"].items():
            row = {"case": case.get("case", ""), "label": lab, "name": names.get(lab, ""),
                   "prediction_file": case["prediction_file"], "reference_file": case["reference_file"]}
            row.update({k: m.get(k) for k in cols})
            rows.append(row)
    return rows


def write_summary(summary: dict, json_path: str | Path, csv_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``summary.json`` and its CSV (default: same name, ``.csv``) atomically; returns both paths."""
    json_path = Path(json_path)
    csv_path = Path(csv_path) if csv_path else json_path.with_suffix(".csv")
    atomic_write_text(json_path, json.dumps(summary, indent=2, allow_nan=True) + "\n")
    buf = io.StringIO()
    fields = ["case", "label", "name", "prediction_file", "reference_file"] + _metric_columns(summary)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(summary))
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "nan" if math.isnan(v) else "inf"
    return f"{v:.4f}"


def format_table(summary: dict) -> str:
    """Per-class table: label, name, number of cases that score the class, mean of each metric."""
    keys = [METRIC_KEYS[m] for m in summary["metrics"]]
    names = summary.get("label_names", {})
    header = ["label", "name", "cases"] + keys
    lines = [header]
    for lab, m in summary["mean"].items():
        n = sum(1 for c in summary["metric_per_case"] if lab in c["metrics"])
        lines.append([lab, names.get(lab, ""), str(n)] + [_fmt(m.get(k)) for k in keys])
    if summary["mean"]:
        lines.append(["fg", "foreground mean", ""] + [_fmt(summary["foreground_mean"].get(k)) for k in keys])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)

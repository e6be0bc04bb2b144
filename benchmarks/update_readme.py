"""Splice the benchmark tables (``benchmarks/results/*.md``) into README.md.

Everything between the lines ``<!-- perf:start -->`` and ``<!-- perf:end -->`` of README.md is
replaced by the result files, in the order of :data:`ORDER` (``infer_speed``, ``train_speed``, ``augment_cost_organs``,
``augment_cost_lung_lesion``, then the real-CT
tables of one machine after the other: ``real_ct_study``, ``real_ct_study_lung_lesion`` (bf16 CPU),
``real_ct_study_fp32``, ``real_ct_study_lung_lesion_fp32`` (fp32 CPU), then ``head_to_head``, ``head_to_head_fp32``),
then any other ``*.md`` alphabetically, except ``model_zoo.md`` (``benchmarks/model_cost.py``), which goes
between ``<!-- zoo:start -->`` and ``<!-- zoo:end -->`` (the "Model zoo" section). Text outside the
markers is left as it is; numbers are never typed in by hand. Exit 1 when the markers are missing
(add them to the "Performance" section first).

    python benchmarks/update_readme.py            # rewrite README.md in place
    python benchmarks/update_readme.py --check    # exit 1 when README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
ORDER = ("infer_speed", "train_speed", "augment_cost_organs", "augment_cost_lung_lesion", "real_ct_study",
         "real_ct_study_lung_lesion", "real_ct_study_fp32", "real_ct_study_lung_lesion_fp32", "head_to_head",
         "head_to_head_fp32")
ZOO, ZOO_START, ZOO_END = "model_zoo", "<!-- zoo:start -->", "<!-- zoo:end -->"


def result_files(results: Path) -> list[Path]:
    """The ``*.md`` result files of the Performance section, in README order (``model_zoo.md`` left out)."""
    files = {p.stem: p for p in sorted(results.glob("*.md")) if p.stem != ZOO}
    return [files.pop(n) for n in ORDER if n in files] + list(files.values())


def splice(readme: str, blocks: list[str], start: str = START, end: str = END) -> str:
    """``readme`` with the text between the markers ``start`` and ``end`` replaced by ``blocks``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    i, j = readme.find(start), readme.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"README.md needs the markers {start} ... {end} (in that order)")
    inner = "\n\n".join(b.strip() for b in blocks) or "_No benchmark results yet: run the scripts above._"
    return readme[: i + len(start)] + "\n" + inner + "\n" + readme[j:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to update (default README.md)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder of result *.md files")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 when the README differs from the results")
    args = p.parse_args(argv)
    from medseg.io import atomic_write_text

    old = args.readme.read_text()
    try:
        new = splice(old, [f.read_text() for f in result_files(args.results)])
        zoo = args.results / f"{ZOO}.md"
        if zoo.is_file():
            new = splice(new, [zoo.read_text()], ZOO_START, ZOO_END)
    except ValueError as err:
        print(f"{args.readme}: {err}", file=sys.stderr)
        return 1
    if args.check:
        print("README.md is up to date" if new == old else "README.md is out of date: run benchmarks/update_readme.py")
        return int(new != old)
    if new != old:
        atomic_write_text(args.readme, new)
    print(f"{args.readme}: {'updated' if new != old else 'unchanged'} ({len(result_files(args.results))} result file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``medseg`` console script: ``medseg <command> [options]``.

Each command lives in ``medseg/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this module only dispatches (commands are imported lazily so that
``medseg --help`` is fast). ``medseg --version`` prints the version; ``--quiet`` (before or
after the command) turns progress bars off and logging down to warnings. User errors
(:class:`medseg.errors.MedsegError`) print one ``medseg: error: ...`` line and exit with
status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "preprocess": "fingerprint a dataset, plan spacing / normalization / patch size, and preprocess every case",
    "train": "train a U-Net variant from a YAML config into a run directory",
    "infer": "segment NIfTI / NRRD / MHA / DICOM volumes with a trained run, in each input's own geometry",
    "evaluate": "score predicted masks against references (Dice, IoU, HD95, ASSD, NSD) into summary.json + CSV",
    "run": "the whole job on a dataset: preprocess -> train -> infer on imagesTs -> evaluate against labelsTs",
    "demo": "phantoms -> preprocess -> train -> infer -> evaluate on CPU, then print where to look",
}


QUIET_HELP = "no progress bars; log warnings and errors only (also accepted after the command)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    from medseg import __version__

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="3D CT segmentation with attention U-Nets (MONAI + PyTorch).",
        epilog="Run `medseg <command> --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a subcommand's default must not undo `medseg --quiet <command>`
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        if name == command:
            _module(name).add_arguments(p)
    return parser


def set_quiet(quiet: bool) -> None:
    """``--quiet``: the console shows the ``medseg`` loggers from WARNING up, and progress bars stay off.

    The library shows its bars only while the console shows INFO lines; worker processes (data
    loaders, ``torchrun`` ranks) inherit ``MEDSEG_LOGLEVEL``. A run's ``log.txt`` keeps its INFO lines.
    """
    from medseg.runtime import set_console_level

    if quiet:
        set_console_level("WARNING")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether a command draws progress bars (not with ``--quiet``)."""
    return not getattr(args, "quiet", False)


def _module(name: str):
    return importlib.import_module(f"medseg.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    from medseg.errors import MedsegError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    set_quiet(args.quiet)
    try:
        return int(_module(args.command).run(args) or 0)
    except MedsegError as err:
        print(f"medseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The shipped configs: one YAML per model variant, the demo's, and the real-CT studies'.

They are package data, installed with ``medseg`` (``configs/`` at the repository root links
here), so a config can be named instead of found on disk::

    medseg train --config attention_unet3d ...        # = medseg/configs/attention_unet3d.yaml
    load_config("cbam_unet3d", ["train.epochs=50"])

:func:`resolve_config` is the one rule (``medseg.config.load_config`` applies it): an existing
file wins; otherwise a bare name, ``<name>.yaml`` or ``configs/<name>.yaml`` (the spelling of the
README's examples, which then work outside the source tree too) names a shipped config.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import ConfigError

__all__ = ["CONFIG_DIR", "resolve_config", "shipped_configs"]

CONFIG_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of every shipped config, sorted by name (``demo``, ``unet3d``, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config(spec: str | Path) -> Path:
    """The YAML file that ``spec`` names: an existing file, else a shipped config.

    Args:
        spec: a path to a YAML file, or a shipped config's name (``attention_unet3d``), with or
            without ``.yaml``, optionally under ``configs/``.

    Returns:
        The path of the file.

    Raises:
        ConfigError: no such file and no shipped config of that name (the message lists them).
    """
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    shipped = shipped_configs()
    if str(path.parent) in (".", "configs") and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file not found: {spec} (a file path, or one of the shipped configs: "
                      f"{', '.join(shipped)})")

"""Data layer: dataset discovery, fingerprint, plan, preprocessing, phantoms (and training transforms).

Import the submodules directly (``from medseg.data.preprocess import preprocess_volume``);
this package keeps its import light.
"""

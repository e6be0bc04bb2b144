"""medseg: 3D CT segmentation with attention U-Nets on MONAI and PyTorch.

Layers (an upper layer may import a lower one, never the reverse)::

    medseg/cli.py, medseg/commands/, pipelines/   thin mains
    medseg/pipelines/                             whole jobs over the engines (the demo)
    medseg/train/ medseg/infer/ medseg/evaluate/  engines
    medseg/nn/                                    models
    medseg/data/                                  datasets, plans, preprocessing, phantoms
    medseg/io.py medseg/config.py medseg/registry.py medseg/runtime.py medseg/errors.py
"""

__version__ = "0.1.0"

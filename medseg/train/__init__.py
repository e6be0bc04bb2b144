"""Training engine: ``train(cfg, out_dir, resume=False)`` (see :mod:`medseg.train.engine`).

Imported lazily so that ``python -m medseg.train.tensorboard`` does not load the engine first.
"""

__all__ = ["TrainingDiverged", "train"]


def __getattr__(name: str):
    if name in __all__:
        from medseg.train import engine

        return getattr(engine, name)
    raise AttributeError(name)

"""Inference engine: sliding-window prediction, the run-directory predictor, post-processing.

``sliding_window_predict`` (used by the trainer's validation too) and ``predict_case_arrays``
need only a model; :class:`Predictor` wraps a whole run directory (config, plans, checkpoint)
and returns masks, probabilities and gate maps in each input's own geometry.
"""

from __future__ import annotations

from medseg.infer.sliding import sliding_window_predict

__all__ = ["PredictionResult", "Predictor", "predict_case_arrays", "sliding_window_predict"]


def predict_case_arrays(model, image, *, roi_size, **kwargs):
    """Logits ``(K, X, Y, Z)`` of a preprocessed case ``(C, X, Y, Z)`` on its own grid.

    A thin alias of :func:`sliding_window_predict` for the trainer's validation; keyword
    arguments are passed through (``overlap``, ``precision``, ``device``, ...).
    """
    return sliding_window_predict(model, image, roi_size=roi_size, **kwargs)


def __getattr__(name: str):  # the predictor pulls in the data and model layers: import lazily
    if name in ("Predictor", "PredictionResult"):
        from medseg.infer import predictor

        return getattr(predictor, name)
    raise AttributeError(name)

"""Segmentation loss: Dice + cross-entropy with deep supervision, plus a model's auxiliary losses.

- Dice + CE: MONAI's :class:`~monai.losses.DiceLoss` (softmax, one-hot target, background left
  out of the Dice term as in nnU-Net's ``DC_and_CE_loss``; batch Dice by default) plus torch's
  cross-entropy -- the two terms of MONAI's ``DiceCELoss``, which has no ``ignore_index``.
- Dice + TopK CE (``dice_topk10``, nnU-Net's ``nnUNetTrainerDiceTopK10Loss``): the cross-entropy
  averages only the 10% of voxels with the highest loss (bootstrapped CE, Wu et al., "Bridging
  category-level and instance-level semantic image segmentation", arXiv 1605.06885, 2016). A
  small class the net does not predict yet then holds a share of the CE near its share of the
  hard voxels, not of all voxels: a spleen of 1% of a patch weighs ~10x more until it is learnt.
- nnU-Net v2's ignore label (``ignore_label``): voxels labelled with it are left out of both
  terms, as nnU-Net's ``DC_and_CE_loss`` does: the cross-entropy averages over the other voxels
  (``ignore_index``) and the Dice masks prediction and one-hot target there (MONAI's
  ``DiceLoss(ignore_index=...)``). A batch with no voxel left contributes 0.
- Deep supervision (Lee et al., "Deeply-Supervised Nets", AISTATS 2015; nnU-Net's weighting):
  output ``i`` (resolution ``1/2^i``) gets weight ``1/2^i``, the lowest-resolution output gets
  0, the weights are normalized to sum to 1. Targets are downsampled with nearest neighbour
  (``nearest-exact``), as is the target of a single output coarser than the label (a strided
  stem's logits with ``model.train_at_stem``). The weighted sum is MONAI's :class:`~monai.losses.DeepSupervisionLoss`
  given these weights.
- 2.5D models (``z_halo = H > 0``, :mod:`medseg.nn.slice25d`): outputs and label carry ``H``
  context slices at each z end (:class:`medseg.train.data.PatchDataset`); the loss sees only the
  central slices, whose inputs were all real. The auxiliary loss takes the whole patch.
- Models that declare ``auxiliary_loss(label)`` (the attention branch of ABN, Fukui et al.
  CVPR 2019) add it with weight ``train.aux_loss_weight``: 1.0 by default, the paper's plain sum
  ``L = L_seg + L_att`` (the trainer's step: ``seg + train.aux_loss_weight * aux``).

All terms are computed in float32, whatever the autocast dtype of the logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss

from medseg.config import TrainConfig
from medseg.errors import ConfigError
from medseg.nn.slice25d import crop_z_halo

__all__ = ["build_loss", "deep_supervision_weights", "SegmentationLoss"]

# kind -> (Dice weight, CE weight, top-k %: the CE term averages the k% highest voxel losses; None: all voxels)
LOSSES = {"dice_ce": (1.0, 1.0, None), "dice": (1.0, 0.0, None), "ce": (0.0, 1.0, None), "dice_topk10": (1.0, 1.0, 10.0)}


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for ``n`` outputs (full resolution first): ``1/2^i``, last 0, sum 1.

    ``n == 1`` gives ``[1.0]``.
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    w = [1.0 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


class SegmentationLoss(torch.nn.Module):
    """Dice + CE over one logits tensor or a deep-supervision list.

    Call: ``outputs`` = logits ``(B, K, X, Y, Z)`` or ``[(B, K, X, Y, Z), (B, K, X/2, ...), ...]``,
    ``label (B, 1, X, Y, Z)`` integer -> scalar float32 loss.

    Args:
        kind: ``dice_ce``, ``dice``, ``ce`` or ``dice_topk10`` (CE over the 10% hardest voxels).
        batch_dice: Dice over the whole batch (nnU-Net's default) instead of per sample.
        ignore_label: label value whose voxels enter no term (nnU-Net v2's ``ignore``; it is
            ``>= K``, not a network output), or ``None``.
        z_halo: slices at each z end of outputs and label left out of the loss (2.5D context).

    Raises:
        ConfigError: unknown ``kind``.
    """

    def __init__(self, kind: str = "dice_ce", *, batch_dice: bool = True, ignore_label: int | None = None,
                 z_halo: int = 0):
        super().__init__()
        self.z_halo = int(z_halo)
        if kind not in LOSSES:
            raise ConfigError(f"train.loss: '{kind}' is not valid (use {', '.join(LOSSES)})")
        self.lambda_dice, self.lambda_ce, self.topk = LOSSES[kind]
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                             ignore_index=self.ignore_label)

    def _term(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + CE of one output (float32 logits, ``(B, 1, ...)`` target of integer values)."""
        target = target.long()
        loss = logits.new_zeros(())
        if self.lambda_dice:
            loss = loss + self.lambda_dice * self.dice(logits, target)
        if self.lambda_ce:
            ignore = -100 if self.ignore_label is None else self.ignore_label
            if self.ignore_label is not None and not bool((target != ignore).any()):
                ce = logits.sum() * 0.0  # every voxel ignored: no CE (still in the graph, as nnU-Net)
            elif self.topk is None:
                ce = F.cross_entropy(logits, target[:, 0], ignore_index=ignore)
            else:
                ce = self._topk_ce(logits, target[:, 0], ignore)
            loss = loss + self.lambda_ce * ce
        return loss

    def _topk_ce(self, logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
        """Mean CE of the ``self.topk`` % voxels with the highest CE (ignored voxels left out first), as
        nnU-Net's ``TopKLoss``: ``(B, K, *S)`` logits, ``(B, *S)`` target -> scalar."""
        voxel = F.cross_entropy(logits, target, ignore_index=ignore, reduction="none").flatten()
        if self.ignore_label is not None:
            voxel = voxel[target.flatten() != ignore]
        k = max(1, int(voxel.numel() * self.topk / 100))
        return voxel.topk(k, sorted=False).values.mean()

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        outs = crop_z_halo([outputs] if isinstance(outputs, torch.Tensor) else list(outputs), self.z_halo)
        label = crop_z_halo(label, self.z_halo).float()  # MONAI resizes the target with nearest-exact: a float
        # MONAI's DeepSupervisionLoss with nnU-Net's weights (its "exp" mode floors at 1/16 and does not
        # normalise); weight-0 outputs still enter the graph (DDP needs every head to receive a gradient).
        # A single output goes through it too (weight 1.0): its target is resized the same way when the
        # output is coarser than the label (model.train_at_stem)
        return DeepSupervisionLoss(self._term, weights=deep_supervision_weights(len(outs)))(outs, label)

    @torch.no_grad()
    def overlap_counts(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor,
                       stride: int = 2) -> torch.Tensor:
        """Hard-prediction overlap of the first (finest) output, for the training Dice per class.

        ``outputs`` / ``label`` as in :meth:`forward` -> float64 ``(3, K - 1)``: per foreground class
        the voxels predicted and labelled, predicted, labelled (argmax of the logits; the z halo
        and ``ignore_label`` voxels left out), on every ``stride``-th voxel along each axis: an
        estimate at 1/8 of the cost by default (a full-resolution argmax costs ~10% of a CPU step
        on 96^3 patches, the subsampled one 1.5-5% with ``argmax``, ~0.5% with ``max``). Summed over
        steps, ``2 * tp / (pred + ref)`` is the Dice of the patches seen, a class's cue of being
        learnt long before a validation.
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        logits, label = crop_z_halo(logits, self.z_halo), crop_z_halo(label, self.z_halo)
        # logits coarser than the label (model.train_at_stem): the label at their grid, the same density of samples
        steps = [max(1, stride * o // i) for o, i in zip(logits.shape[2:], label.shape[2:])]
        label = _label_like(label, logits)
        sub = (Ellipsis, *(slice(None, None, s) for s in steps))
        k = logits.shape[1]
        # max(1).indices: the first maximum on ties, as argmax, ~10x faster on the CPU over a short channel
        # axis (2 x 6 x 48^3 bf16 on 2 cores: 4 against 48 ms, ~5% of a 96^3 training step)
        pred, ref = logits[sub].max(1).indices.flatten(), label[sub][:, 0].long().flatten()
        if self.ignore_label is not None:
            keep = ref != self.ignore_label
            pred, ref = pred[keep], ref[keep]
        conf = torch.bincount(pred * k + ref.clamp(0, k - 1), minlength=k * k).view(k, k).double()  # [pred, ref]
        return torch.stack([conf.diagonal()[1:], conf.sum(1)[1:], conf.sum(0)[1:]])


def _label_like(label: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``label (B, 1, *S)`` at the spatial size of ``logits`` (nearest-exact, as MONAI's
    ``DeepSupervisionLoss`` resizes targets); unchanged when the sizes agree."""
    if label.shape[2:] == logits.shape[2:]:
        return label
    return F.interpolate(label.float(), size=logits.shape[2:], mode="nearest-exact").to(label.dtype)


def build_loss(train_cfg: TrainConfig, *, ignore_label: int | None = None, z_halo: int = 0) -> SegmentationLoss:
    """The segmentation loss named by ``train.loss``; ``ignore_label``: ``plans["ignore_label"]``;
    ``z_halo``: the model's (:func:`medseg.nn.slice25d.z_halo`)."""
    return SegmentationLoss(train_cfg.loss, batch_dice=train_cfg.batch_dice, ignore_label=ignore_label, z_halo=z_halo)

"""Training losses: cross-entropy plus soft Dice with equal weight, as the paper trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_dice_loss", "ce_dice_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over classes of ``1 - Dice`` between softmax probabilities and one-hot labels.

    Parameters
    ----------
    logits:
        ``[B, C, H, W]`` raw scores at the label resolution.
    target:
        ``[B, H, W]`` integer labels in ``0..C-1``.
    eps:
        Additive smoothing (in voxels) so classes absent from both prediction and target
        score a Dice of 1 instead of 0/0.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return 1.0 - dice.mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                 ce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * (1 - Dice)``; logits are upsampled to the labels first.

    SegFormer predicts at 1/4 of its input resolution; upsampling the logits bilinearly to the
    label grid (rather than downsampling labels) keeps thin cortices in the loss.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
    ce = F.cross_entropy(logits.float(), target.long())
    return ce_weight * ce + dice_weight * soft_dice_loss(logits, target)

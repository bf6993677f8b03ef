"""Training losses: cross-entropy plus soft Dice with equal weight, as the paper trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "soft_dice_loss", "ce_dice_loss"]

#: Label value of pixels nobody annotated (partial labels): no loss term, no Dice count.
IGNORE_INDEX = 255


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
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
    ignore_index:
        Pixels with this label count neither in the prediction nor in the target (masked
        out of both sums); a target without it gives exactly the unmasked value.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    target = target.long()
    valid = None if ignore_index is None else target != ignore_index
    if valid is not None:
        target = target.masked_fill(~valid, 0)
    one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    if valid is not None and not bool(valid.all()):
        mask = valid.unsqueeze(1).to(probs.dtype)
        probs, one_hot = probs * mask, one_hot * mask
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return 1.0 - dice.mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                 ce_weight: float = 1.0, dice_weight: float = 1.0,
                 ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * (1 - Dice)``; logits are upsampled to the labels first.

    SegFormer predicts at 1/4 of its input resolution; upsampling the logits bilinearly to the
    label grid (rather than downsampling labels) keeps thin cortices in the loss. Pixels
    labelled ``ignore_index`` (not annotated) are left out of both terms; a batch with no
    annotated pixel gives a zero loss (with a gradient of zero) instead of NaN.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
    target = target.long()
    if ignore_index is not None and not bool((target != ignore_index).any()):
        return logits.float().sum() * 0.0
    ce = F.cross_entropy(logits.float(), target,
                         ignore_index=-100 if ignore_index is None else ignore_index)
    return ce_weight * ce + dice_weight * soft_dice_loss(logits, target,
                                                         ignore_index=ignore_index)

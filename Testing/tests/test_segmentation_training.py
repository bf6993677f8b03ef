"""Training: subject-level split, augmentation geometry, loss decreases, checkpoints resume."""

import itertools
import json

import numpy as np
import pytest
import torch

from HRpQCTCore.errors import HRpQCTError
from HRpQCTSegmentationEngine import training
from HRpQCTSegmentationEngine.losses import ce_dice_loss, soft_dice_loss
from HRpQCTSegmentationEngine.training import (
    SliceDataset,
    TrainingCase,
    TrainingConfig,
    fit,
    lr_factor,
    split_by_subject,
)
from HRpQCTSegmentationEngine.unet import UNet


def _toy_slices(n: int, size: int = 32, seed: int = 0) -> SliceDataset:
    """Bright disks (class 1) with dark rings (class 5) on air, noisy: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size), np.float16)
    labels = np.empty((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        r = np.hypot(yy - cy, xx - cx)
        lab = np.where(r < size * 0.15, 1, np.where(r < size * 0.3, 5, 0)).astype(np.uint8)
        hu = np.select([lab == 1, lab == 5], [2000.0, 50.0], -1000.0)
        hu = hu + rng.normal(0, 100, hu.shape)
        images[i] = ((np.clip(hu, -4000, 6000) + 4000) / 10000).astype(np.float16)
        labels[i] = lab
    return SliceDataset(images, labels, [f"s{i}" for i in range(n)])


def test_split_keeps_subjects_on_one_side():
    cases = [TrainingCase(f"subj{i // 3}", f"img{i}", f"lab{i}") for i in range(30)]
    train, val = split_by_subject(cases, 0.2, seed=1)
    assert {c.subject for c in train}.isdisjoint({c.subject for c in val})
    assert len({c.subject for c in val}) == 2
    with pytest.raises(HRpQCTError, match="two subjects"):
        split_by_subject(cases[:3], 0.2, seed=1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 10, 1.0) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_dice_loss_is_zero_for_perfect_and_high_for_wrong_predictions():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target, 6).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target) < 1e-3
    assert soft_dice_loss(-perfect, target) > 0.3
    low_res = perfect[:, :, ::2, ::2]  # logits at half resolution are upsampled first
    assert ce_dice_loss(low_res, target) < ce_dice_loss(-low_res, target)


def test_augmented_patches_keep_image_and_labels_aligned():
    data = _toy_slices(4, size=64)
    config = TrainingConfig(crop_px=32, batch_size=6)
    x, y = training._sample_batch(data, config, np.random.default_rng(3))
    assert x.shape == (6, 1, 32, 32) and y.shape == (6, 32, 32)
    hu = x[:, 0].numpy() * 10000 - 4000
    # Bone label sits on bright pixels, air on dark ones, whatever rotation/flip was drawn.
    assert hu[y.numpy() == 1].mean() > 1500
    assert hu[y.numpy() == 0].mean() < -500


@pytest.mark.slow  # over 20 s on 2 loaded cores
@pytest.mark.parametrize("architecture", ["segformer", "unet"])
def test_short_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path, architecture):
    from HRpQCTSegmentationEngine.model import load_model

    train_data, val_data = _toy_slices(12, size=64, seed=1), _toy_slices(4, size=64, seed=2)
    config = TrainingConfig(architecture=architecture, crop_px=64, batch_size=4, epochs=4,
                            steps_per_epoch=10, warmup_steps=5, learning_rate=2e-3,
                            validation_slices=4, augmentation=training.AugmentationConfig(
                                rotation_deg=10, extra_noise_sd_hu=0))
    result = fit(train_data, val_data, tmp_path / "model", config=config, device="cpu")
    history = result["history"]
    assert result["finished"] and len(history) == 4
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    if architecture == "segformer":  # the BatchNorm U-Net needs more steps to validate well
        assert history[-1]["val_iou"]["tibial_cortical"] > 0.5
    model = load_model(tmp_path / "model")
    if architecture == "unet":
        assert isinstance(model, UNet)
    meta = json.loads((tmp_path / "model" / "hrpqct_model.json").read_text(encoding="utf-8"))
    assert meta["training"]["training_config"]["architecture"] == architecture


@pytest.mark.slow  # over 20 s on 2 loaded cores
def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    train_data, val_data = _toy_slices(8, seed=1), _toy_slices(3, seed=2)
    config = TrainingConfig(architecture="unet", crop_px=32, batch_size=2, epochs=2,
                            steps_per_epoch=4, warmup_steps=2, checkpoint_every=2,
                            validation_slices=2)
    straight = fit(train_data, val_data, tmp_path / "a", config=config, device="cpu")
    part = fit(train_data, val_data, tmp_path / "b", config=config, device="cpu", max_steps=3)
    assert not part["finished"] and part["step"] == 3
    resumed = fit(train_data, val_data, tmp_path / "b", config=config, device="cpu",
                  resume=True)
    assert resumed["finished"]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert straight["history"][-1]["train_loss"] == pytest.approx(
        resumed["history"][-1]["train_loss"], rel=1e-4)


def test_resume_with_other_settings_is_refused(tmp_path):
    train_data, val_data = _toy_slices(4, seed=1), _toy_slices(2, seed=2)
    config = TrainingConfig(architecture="unet", crop_px=32, batch_size=2, epochs=1,
                            steps_per_epoch=2, validation_slices=1)
    fit(train_data, val_data, tmp_path / "m", config=config, device="cpu", max_steps=1)
    other = TrainingConfig(architecture="unet", crop_px=32, batch_size=2, epochs=1,
                           steps_per_epoch=2, validation_slices=1, learning_rate=1e-2)
    with pytest.raises(HRpQCTError, match="other training settings"):
        fit(train_data, val_data, tmp_path / "m", config=other, device="cpu", resume=True)

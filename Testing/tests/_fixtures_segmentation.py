"""Shared fixtures for the segmentation tests: tiny preprocessing and a small random B0."""

import pytest


@pytest.fixture(scope="session")
def tiny_preprocessing():
    """Crop 64 x 64, network input 32 x 32 (logits 8 x 8): the paper's pipeline, shrunk."""
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    return PreprocessingConfig(crop_yx=(64, 64), input_yx=(32, 32))


def randomise_batch_norm(model, seed: int = 0) -> None:
    """Give the decoder's BatchNorm non-trivial statistics and affine parameters."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    bn = model.decode_head.batch_norm
    with torch.no_grad():
        n = bn.running_mean.shape[0]
        bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
        bn.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=generator))
        bn.bias.copy_(0.3 * torch.randn(n, generator=generator))


@pytest.fixture(scope="session")
def random_b0():
    """A randomly initialised one-channel six-class SegFormer-B0 in eval mode."""
    from HRpQCTSegmentationEngine.model import build_model

    model = build_model("b0", seed=1234)
    randomise_batch_norm(model)
    return model.eval()

"""Exact fast inference for SegFormer on the CPU: a folded decoder head and ONNX Runtime.

Why it is exact
---------------
SegFormer's all-MLP decoder does, for encoder stages ``i = 0..3`` with features ``x_i``::

    u_i = up(P_i x_i + p_i)                     # per-stage linear projection, then bilinear
    v   = BN(F [u_3; u_2; u_1; u_0])            # 1x1 "linear_fuse" on the concatenation
    logits = C relu(v) + c                      # classifier

``up`` (bilinear, ``align_corners=False``) is linear, acts on each channel separately, and
keeps constants (its weights sum to one). Eval-mode BatchNorm is an affine map
``s * z + t``. Splitting ``F`` into its per-stage column blocks ``F_i`` therefore gives::

    v = sum_i up((s * F_i P_i) x_i) + (t + s * sum_i F_i p_i)

so each stage needs one small 1 x 1 convolution (``C_i -> D`` channels) at the stage's own
resolution, *before* upsampling; the 4D-channel concatenation and the big ``linear_fuse`` at
1/4 resolution disappear (B0 at 800 x 800: 33 -> ~12 GFLOP). The ReLU and the classifier stay
after the sum. Results equal the reference up to float rounding.

ONNX Runtime (optional, ``pip install onnxruntime onnx``; the ``fast`` extra) runs the folded
model another ~1.5x faster on the CPU.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from HRpQCTCore.atomic import atomic_path
from HRpQCTSegmentationEngine.onnx_graph import ONNX_OPSET, OnnxSession

__all__ = [
    "FastSegformer",
    "fold_decoder",
    "export_onnx",
    "OnnxSegmenter",
    "onnx_available",
]

log = logging.getLogger(__name__)


def _torch():
    import torch

    return torch


def _stage_projections(head):
    """The per-stage MLPs of the decode head (``linear_c`` in transformers 4.x)."""
    projections = getattr(head, "linear_projections", None)
    return projections if projections is not None else head.linear_c


def fold_decoder(model) -> dict[str, Any]:
    """Folded decoder weights of an eval-mode ``SegformerForSemanticSegmentation``.

    Returns a dict with ``stage_weights`` (list of ``[D, C_i]`` tensors, stage order 0..3),
    ``bias`` (``[D]``), ``classifier_weight`` (``[K, D]``) and ``classifier_bias`` (``[K]``),
    all float32; folding is computed in float64.
    """
    torch = _torch()
    head = model.decode_head
    projections = _stage_projections(head)
    n_stages = len(projections)
    fuse = head.linear_fuse.weight.detach().double()[:, :, 0, 0]  # [D, n*D]
    dim = fuse.shape[0]
    bn = head.batch_norm
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    if head.linear_fuse.bias is not None:  # transformers has none; handle it anyway
        shift = shift + scale * head.linear_fuse.bias.detach().double()
    stage_weights, bias = [], shift.clone()
    for i, projection in enumerate(projections):
        # transformers concatenates the upsampled stages in reverse order (stage 3 first).
        block = fuse[:, (n_stages - 1 - i) * dim:(n_stages - i) * dim]
        proj_w = projection.proj.weight.detach().double()  # [D, C_i]
        proj_b = projection.proj.bias.detach().double()
        stage_weights.append((scale[:, None] * (block @ proj_w)).float())
        bias = bias + scale * (block @ proj_b)
    classifier = head.classifier
    return {
        "stage_weights": stage_weights,
        "bias": bias.float(),
        "classifier_weight": classifier.weight.detach()[:, :, 0, 0].float().clone(),
        "classifier_bias": classifier.bias.detach().float().clone(),
    }


class FastSegformer(_torch().nn.Module):
    """SegFormer with the decoder folded into one 1 x 1 convolution per encoder stage.

    Built from a trained ``SegformerForSemanticSegmentation`` (which is not modified; the
    encoder is shared). ``forward(pixel_values)`` returns the logits tensor
    ``[B, num_labels, H/4, W/4]`` -- the same as ``model(pixel_values).logits`` in eval mode.
    The module is for inference only (the BatchNorm statistics are frozen into it).
    """

    def __init__(self, model) -> None:
        torch = _torch()
        super().__init__()
        if model.training:
            raise ValueError("Build FastSegformer from a model in eval mode (call model.eval())")
        self.encoder = model.segformer
        self.num_stages = len(_stage_projections(model.decode_head))
        folded = fold_decoder(model)
        self.stage_convs = torch.nn.ModuleList()
        for weight in folded["stage_weights"]:
            conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
            conv.weight.data.copy_(weight[:, :, None, None])
            self.stage_convs.append(conv)
        self.register_buffer("fused_bias", folded["bias"][None, :, None, None].clone())
        k, d = folded["classifier_weight"].shape
        self.classifier = torch.nn.Conv2d(d, k, 1)
        self.classifier.weight.data.copy_(folded["classifier_weight"][:, :, None, None])
        self.classifier.bias.data.copy_(folded["classifier_bias"])
        self.config = model.config
        self.eval()

    def encoder_features(self, pixel_values):
        """The four stage outputs ``[B, C_i, H_i, W_i]`` of the Mix Transformer encoder."""
        outputs = self.encoder(pixel_values, output_hidden_states=True, return_dict=True)
        features = list(outputs.hidden_states)[-self.num_stages:]
        batch = pixel_values.shape[0]
        for i, h in enumerate(features):
            if h.ndim == 3:  # reshape_last_stage=False (transformers 4.x option)
                side = round(h.shape[1] ** 0.5)
                features[i] = h.reshape(batch, side, side, -1).permute(0, 3, 1, 2)
        return features

    def forward(self, pixel_values):
        torch = _torch()
        features = self.encoder_features(pixel_values)
        size = features[0].shape[-2:]
        fused = None
        for conv, h in zip(self.stage_convs, features, strict=True):
            y = conv(h)
            if y.shape[-2:] != size:
                y = torch.nn.functional.interpolate(y, size=size, mode="bilinear",
                                                    align_corners=False)
            fused = y if fused is None else fused + y
        fused = torch.relu(fused + self.fused_bias)
        return self.classifier(fused)


# ------------------------------------------------------------------------------------------
# ONNX Runtime
# ------------------------------------------------------------------------------------------
def onnx_available() -> bool:
    """Whether ONNX export (``onnx``) and inference (``onnxruntime``) are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _LogitsOnly(_torch().nn.Module):
    """Wraps a transformers model so that export sees a plain tensor output."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values)
        return out.logits if hasattr(out, "logits") else out


def export_onnx(model, path: str | Path, input_yx: tuple[int, int] = (800, 800),
                fold: bool = True, opset: int = ONNX_OPSET) -> Path:
    """Export a SegFormer (folded by default) to an ONNX file of any batch and spatial size.

    ``input_yx`` is the size the graph is traced at; the exported graph takes any rows and
    columns (its attention reshapes follow the input's shape; the tests compare it with
    torch at several sizes), so one graph serves every network input
    (:func:`.preprocessing.network_window`). The input channels are fixed: the model's own
    (``config.num_channels``: 3 for a 2.5D model). Needs the ``onnx`` package (``pip install
    onnx``; part of the ``fast`` extra). The file is written atomically.
    """
    torch = _torch()
    if not onnx_available():
        from HRpQCTCore.errors import HRpQCTError

        raise HRpQCTError(
            "ONNX export needs the packages onnx and onnxruntime: "
            "pip install 'hrpqct-segmenter[fast]' (or use the torch engine).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if fold and not isinstance(model, FastSegformer) and hasattr(model, "decode_head"):
        model = FastSegformer(model)
    wrapped = _LogitsOnly(model).eval()
    channels = int(getattr(getattr(model, "config", None), "num_channels", 1))
    example = torch.zeros(1, channels, *input_yx)
    # atomic_path: a temporary file beside `path`, renamed over it on success (with the
    # user's usual file permissions)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
        # The TorchScript-based exporter needs only `onnx`; the newer dynamo exporter
        # would also need `onnxscript`.
        torch.onnx.export(
            wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["pixel_values"], output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch", 2: "rows", 3: "columns"},
                          "logits": {0: "batch", 2: "logit_rows", 3: "logit_columns"}},
            do_constant_folding=True)
    return path


class OnnxSegmenter(OnnxSession):
    """Runs an exported SegFormer with ONNX Runtime on the CPU, returning torch tensors.

    Calling it with a ``[B, C, H, W]`` float32 array or tensor returns the logits as a torch
    tensor ``[B, K, H/4, W/4]``, so it drops into :func:`.inference.segment_volume`. (The
    torch-free :class:`.onnx_graph.OnnxSession` returns numpy arrays.)
    """

    @classmethod
    def from_model(cls, model, input_yx: tuple[int, int] = (800, 800),
                   path: str | Path | None = None,
                   num_threads: int | None = None) -> OnnxSegmenter:
        """Export ``model`` (folded) and open a session; the file goes to ``path`` or a temp
        file that is removed when the session is created (ONNX Runtime keeps it in memory)."""
        if path is not None:
            return cls(export_onnx(model, path, input_yx), num_threads)
        with tempfile.TemporaryDirectory(prefix="hrpqct-onnx-") as tmp:
            return cls(export_onnx(model, Path(tmp) / "segformer.onnx", input_yx), num_threads)

    def __call__(self, pixel_values):
        return _torch().from_numpy(self.run(pixel_values))

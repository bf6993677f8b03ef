"""Model variants, saving/loading with checksums, and adapting RGB checkpoints."""

import json

import pytest
import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from HRpQCTCore.errors import ArtefactError
from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTSegmentationEngine.model import (
    CONFIG_FILE,
    METADATA_FILE,
    SEGFORMER_VARIANTS,
    WEIGHTS_FILE,
    CorruptModelError,
    ModelChecksumError,
    ModelFolderError,
    build_model,
    find_first_patch_embedding,
    load_model,
    load_pretrained_rgb_checkpoint,
    read_model_metadata,
    save_model,
)
from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig


def test_variants_are_data():
    assert set(SEGFORMER_VARIANTS) == {"b0", "b1", "b2", "b3", "b4", "b5"}
    b3 = SEGFORMER_VARIANTS["b3"].to_hf_config()
    assert list(b3.depths) == [3, 4, 18, 3]
    assert list(b3.hidden_sizes) == [64, 128, 320, 512]
    assert b3.decoder_hidden_size == 768
    assert b3.num_channels == 1
    assert b3.num_labels == len(NETWORK_CLASSES)
    assert b3.id2label[1] == NETWORK_CLASSES[1].key


def test_b0_shapes(random_b0):
    n_params = sum(p.numel() for p in random_b0.parameters())
    assert 3.5e6 < n_params < 3.9e6  # MiT-B0 SegFormer: 3.7 M
    with torch.inference_mode():
        logits = random_b0(torch.rand(1, 1, 64, 48)).logits
    assert tuple(logits.shape) == (1, len(NETWORK_CLASSES), 16, 12)  # 1/4 of the input


def test_save_and_load_round_trip(random_b0, tmp_path):
    preprocessing = PreprocessingConfig(crop_yx=(64, 64), input_yx=(32, 32))
    save_model(random_b0, tmp_path, extra_metadata={"training": {"epochs": 3}},
               preprocessing=preprocessing)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE}
    meta = json.loads((tmp_path / METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["variant"] == "b0"
    assert meta["class_names"] == [c.name for c in NETWORK_CLASSES]
    assert meta["training"] == {"epochs": 3}
    assert len(meta["weights_sha256"]) == 64
    assert read_model_metadata(tmp_path).preprocessing == preprocessing
    loaded = load_model(tmp_path, device="cpu")
    assert not loaded.training
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x).logits, random_b0(x).logits, rtol=0, atol=0)
    # The folder is also a plain transformers checkpoint.
    plain = SegformerForSemanticSegmentation.from_pretrained(tmp_path, use_safetensors=True)
    torch.testing.assert_close(plain.decode_head.classifier.weight,
                               random_b0.decode_head.classifier.weight)


def test_reserved_metadata_keys_are_refused(random_b0, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_model(random_b0, tmp_path, extra_metadata={"weights_sha256": "x"})


def test_truncated_weights_are_reported_as_corrupt(random_b0, tmp_path):
    save_model(random_b0, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="interrupted") as info:
        load_model(tmp_path)
    assert isinstance(info.value, ArtefactError) and info.value.exit_code == 6


def test_modified_weights_fail_the_checksum(random_b0, tmp_path):
    save_model(random_b0, tmp_path)
    other = build_model("b0", seed=99)
    # Write other (complete, valid) weights without updating the metadata.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(tmp_path / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ModelChecksumError, match="checksum"):
        load_model(tmp_path)


def test_missing_files_and_foreign_folders(random_b0, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    random_b0.save_pretrained(tmp_path)  # a transformers folder without our metadata
    with pytest.raises(ModelFolderError, match="load_pretrained_rgb_checkpoint"):
        load_model(tmp_path)
    save_model(random_b0, tmp_path / "ours")
    (tmp_path / "ours" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFolderError, match="no weights file"):
        load_model(tmp_path / "ours")


def rgb_checkpoint(folder, num_labels):
    config = SegformerConfig(num_channels=3, num_labels=num_labels,
                             id2label={i: f"c{i}" for i in range(num_labels)},
                             label2id={f"c{i}": i for i in range(num_labels)})
    torch.manual_seed(7)
    model = SegformerForSemanticSegmentation(config)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("num_labels", [4, 6])
def test_rgb_checkpoint_is_averaged_into_one_channel(tmp_path, num_labels):
    rgb = rgb_checkpoint(tmp_path, num_labels)
    grey = load_pretrained_rgb_checkpoint(tmp_path)
    assert grey.config.num_channels == 1
    assert grey.config.num_labels == len(NETWORK_CLASSES)
    _, rgb_kernel = find_first_patch_embedding(rgb.named_parameters(), 3)
    name, grey_kernel = find_first_patch_embedding(
        grey.named_parameters(), 1, (rgb_kernel.shape[0], *rgb_kernel.shape[2:]))
    assert tuple(grey_kernel.shape) == (rgb_kernel.shape[0], 1, *rgb_kernel.shape[2:])
    torch.testing.assert_close(grey_kernel, rgb_kernel.mean(dim=1, keepdim=True))
    rgb_params = dict(rgb.named_parameters())
    head_reinitialised = num_labels != len(NETWORK_CLASSES)
    for key, value in grey.named_parameters():
        if key == name:
            continue
        if key.startswith("decode_head.classifier") and head_reinitialised:
            assert value.shape[0] == len(NETWORK_CLASSES)
            continue
        torch.testing.assert_close(value, rgb_params[key], rtol=0, atol=0, msg=key)
    for key, value in grey.named_buffers():
        torch.testing.assert_close(value, dict(rgb.named_buffers())[key], msg=key)
    with torch.inference_mode():
        out = grey.eval()(torch.rand(1, 1, 32, 32)).logits
    assert tuple(out.shape) == (1, len(NETWORK_CLASSES), 8, 8)


def test_pickle_only_checkpoints_are_refused(tmp_path):
    rgb_checkpoint(tmp_path, 4)
    (tmp_path / WEIGHTS_FILE).rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="safetensors"):
        load_pretrained_rgb_checkpoint(tmp_path)


def test_models_saved_with_transformers_4_names_load(random_b0, tmp_path):
    """transformers 4.x names SegFormer's parameters differently (encoder.block.0.0...,
    decode_head.linear_c...); a folder written under 4.x must load under 5.x."""
    from safetensors.torch import save_file

    from HRpQCTCore.artefacts import sha256_file
    from HRpQCTSegmentationEngine.model import _KEYS_4_TO_5, _KEYS_5_TO_4, _rename_keys

    state = random_b0.state_dict()
    old_names = _rename_keys(state, _KEYS_5_TO_4)
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in old_names
    assert "decode_head.linear_c.0.proj.weight" in old_names
    assert list(_rename_keys(old_names, _KEYS_4_TO_5)) == list(state)
    save_model(random_b0, tmp_path)
    save_file({k: v.contiguous() for k, v in old_names.items()}, str(tmp_path / WEIGHTS_FILE),
              metadata={"format": "pt"})
    meta = json.loads((tmp_path / METADATA_FILE).read_text(encoding="utf-8"))
    meta["weights_sha256"] = sha256_file(tmp_path / WEIGHTS_FILE)
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x).logits, random_b0(x).logits, rtol=0, atol=0)

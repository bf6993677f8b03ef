"""The segmentation model shipped with the engine, found and checked before use.

The bundled model folder is three checksummed artefacts (metadata, config, weights): all three
are verified, so a partial or swapped installation fails with a message instead of segmenting
with the wrong network.
"""

from __future__ import annotations

from pathlib import Path

from HRpQCTCore.errors import ArtefactError

__all__ = ["BUNDLED_MODEL", "BUNDLED_MODEL_PARTS", "resolve_model_folder"]

#: Name of the bundled SegFormer in resources/segmentation-artefacts.json.
BUNDLED_MODEL = "segformer-b0-phantoms"
#: Further artefacts of the bundled model folder, named ``<BUNDLED_MODEL>:<part>``.
BUNDLED_MODEL_PARTS = ("config", "weights")


def resolve_model_folder(model: str | Path | None) -> Path:
    """The model folder to use: the user's, or the bundled one after its checksum check.

    Parameters
    ----------
    model:
        A folder written by ``hrpqct train-segmenter``; None or empty: the bundled model.

    Raises
    ------
    ArtefactError
        If the user's folder does not exist, or no intact bundled model is installed.
    """
    if model:
        folder = Path(model)
        if not folder.is_dir():
            raise ArtefactError(
                f"Model folder {folder} does not exist. Pass a folder written by "
                "'hrpqct train-segmenter', or omit --model to use the bundled model.")
        return folder
    from HRpQCTCore.artefacts import list_artefacts, verified_path

    try:
        folder = verified_path(BUNDLED_MODEL).parent
        for part in BUNDLED_MODEL_PARTS:
            verified_path(f"{BUNDLED_MODEL}:{part}")
        return folder
    except ArtefactError as exc:
        if any(a.name == BUNDLED_MODEL for a in list_artefacts()):
            raise  # installed but missing or damaged: the message says to reinstall
        raise ArtefactError(
            f"{exc}. No bundled segmentation model is available in this installation; train "
            "one with 'hrpqct train-segmenter' and pass it with --model.") from None

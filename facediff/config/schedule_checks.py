"""Checks of the noise schedule options that need to know the model family (`ExperimentConfig` calls them)."""

from __future__ import annotations

import json
from pathlib import Path

from facediff.config.types import ConflictingKeys

# the architecture presets shipped with facediff, read as data (`facediff.models.pretrained` builds from them)
PRESET_DIR = Path(__file__).resolve().parents[1] / "models" / "presets"


def refuse_zero_snr_without_v(diffusion, model, pipeline_family: bool) -> None:
    """`diffusion.zero_terminal_snr` needs v-prediction: at zero SNR x_t is pure noise, so an ε target is x_t
    itself and no x0 can be recovered from it. A pipeline family predicts what its scheduler says: its shipped
    preset's, checked here; a pretrained pipeline's scheduler is checked when the task is built."""
    if not diffusion.zero_terminal_snr:
        return
    prediction, where = diffusion.prediction_type, "diffusion.prediction_type"
    fix, keys = "set diffusion.prediction_type=v_prediction", [("diffusion", "zero_terminal_snr"),
                                                              ("diffusion", "prediction_type")]
    pipeline = getattr(model, "pipeline", None)
    if pipeline_family:
        preset = PRESET_DIR / f"{pipeline.preset}.json"
        if pipeline.pretrained is not None or not preset.is_file():
            return
        prediction = json.loads(preset.read_text())["scheduler"].get("prediction_type", "epsilon")
        where = f"model.pipeline's preset {pipeline.preset!r}"
        fix, keys = "use a v-prediction pipeline (preset sd2_768)", [("diffusion", "zero_terminal_snr")]
    if prediction != "v_prediction":
        raise ConflictingKeys(f"diffusion.zero_terminal_snr: needs v-prediction, but {where} predicts "
                              f"{prediction!r} (at zero SNR an epsilon model sees pure noise and cannot recover the "
                              f"image); {fix} or remove diffusion.zero_terminal_snr", keys=keys)

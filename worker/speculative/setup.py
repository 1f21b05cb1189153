"""Builds a worker's speculative decoding from `model.draft_model*` and checks it against the model.

Every check that needs the loaded model fails the worker's start with a `ConfigError` naming the field:
a model whose memory cannot be rolled back (recurrent / hybrid: rejected drafts' state cannot be
removed), or an `n_batch` with no room for the pending token plus `draft_model_num_pred_tokens` drafts.
Providers are looked up in `PROVIDERS` by their config name; each builder gets the options and the engine.
Predicted outputs need no configuration: every worker that can roll back serves them.
The decode cost curve the draft lengths are chosen from is measured on the first sequence that drafts
(worker/speculative/calibrate.py); this module hands `Speculation` the function that measures it.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.config import ConfigError, ModelOptions
from worker.engine import LlamaEngine
from worker.speculative.base import Drafter
from worker.speculative.calibrate import measure_step_costs
from worker.speculative.control import DEFAULT_MAX_BATCH, PREDICTION_K_MAX, Calibrator, Speculation
from worker.speculative.mtp import build_mtp
from worker.speculative.prediction import PredictionDrafter
from worker.speculative.prompt_lookup import PromptLookup


def _prompt_lookup(options: ModelOptions, engine: LlamaEngine) -> Drafter:
    del engine
    return PromptLookup(options.draft_model_max_ngram_size)


def _draft_model(options: ModelOptions, engine: LlamaEngine) -> Drafter:
    from worker.speculative.draft_model import DraftModel

    return DraftModel(options, engine)


CALIBRATION_SECONDS = 3.0  # the most time measuring step costs may take, once per worker

# Config name -> builder.
PROVIDERS: dict[str, Callable[[ModelOptions, LlamaEngine], Drafter]] = {
    "prompt-lookup-decoding": _prompt_lookup,
    "draft-mtp": build_mtp,
    "draft-model": _draft_model,
}


def build_speculation(options: ModelOptions, engine: LlamaEngine) -> Speculation | None:
    """The worker's speculation, or None when the model cannot roll back and none is configured."""
    k = options.draft_model_num_pred_tokens
    info = engine.info
    max_batch = options.draft_model_max_batch_size or DEFAULT_MAX_BATCH
    prediction_k = min(max(k, PREDICTION_K_MAX), info.n_batch - 1)
    if options.draft_model is None:
        if info.recurrent or engine.embedding:
            return None
        calibrate = _calibrator(engine, prediction_k + 1, options.draft_model_calibration_seconds)
        k_max = min(k, info.n_batch - 1)
        return Speculation(
            None, k_max, max_batch, PredictionDrafter(), calibrate=calibrate, prediction_k_max=prediction_k
        )
    if info.recurrent:
        raise ConfigError(
            f"model.draft_model {options.draft_model!r}: this model's memory is recurrent (or hybrid) and "
            "cannot roll back rejected drafts; remove model.draft_model"
        )
    if info.n_batch < k + 1:
        raise ConfigError(
            f"model.draft_model_num_pred_tokens {k} needs model.n_batch >= {k + 1} (it is {info.n_batch})"
        )
    builder = PROVIDERS.get(options.draft_model)
    if builder is None:
        raise ConfigError(f"model.draft_model {options.draft_model!r} is not available in this build")
    drafter = builder(options, engine)
    calibrate = _calibrator(engine, max(k, prediction_k) + 1, options.draft_model_calibration_seconds)
    return Speculation(
        drafter, k, max_batch, PredictionDrafter(), calibrate=calibrate, prediction_k_max=prediction_k
    )


def _calibrator(engine: LlamaEngine, max_rows: int, seconds: float | None) -> Calibrator | None:
    """Measures the engine's step costs on a live sequence (None: the config turned measuring off)."""
    budget = CALIBRATION_SECONDS if seconds is None else seconds
    if budget <= 0:
        return None

    def calibrate(seq_id: int, position: int) -> list[float]:
        return measure_step_costs(engine, seq_id, position, max_rows, budget)

    return calibrate

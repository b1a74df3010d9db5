"""``--protocol paper``: the settings the official ECoFLaP code uses, per model family.

Without a protocol every setting takes our default (:data:`DEFAULTS`). With ``protocol="paper"`` the
settings in :func:`paper_settings` replace them, chosen by the model family (``adapter.family``), the
fine-stage method, the allocation and the score method (see docs/FIDELITY.md, "Facts for the paper preset",
for the official code behind each value).

The rule for explicit settings: a setting given explicitly (a CLI flag, or a keyword argument other than
``None`` in :func:`~ecoflap_utils.pipeline.run_prune`) that *agrees* with the preset is accepted; one that
*contradicts* it is refused with one line naming the flag, the preset's value and the fix (drop the flag or
drop ``--protocol``). Settings the preset does not control take the explicit value or our default.

Evaluation has its own preset (:func:`paper_eval_settings`, ``evaluate --protocol paper``): CoOp's single
template per dataset for zero-shot CLIP, and LAVIS's generation settings for BLIP-2, with transformers'
``min_length`` as the official code passes it. The same rule applies to its explicit flags.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .errors import UserError

PROTOCOLS = ("paper",)

#: our defaults for the settings a protocol may control (``run_prune`` / CLI options default to None)
DEFAULTS: dict[str, Any] = {
    "comparison": "row", "calib_samples": 128, "batch_size": 8, "granularity": "block", "perturb": "tensor",
    "difference": "forward", "eps": 1e-3, "num_noise": 1, "variant": "grad", "first_stage_samples": 32,
    "first_stage_batch_size": 8, "max_sparsity": None, "seq_len": None, "clip_objective": "contrastive",
    "calibration_augment": False,
}
#: ``max_sparsity`` in a preset: the target + 0.1 (the official ``max_sparsity_per_layer``)
CAP_PLUS_0_1 = "target+0.1"

#: the zeroth-order estimator of the official LAVIS / CoOp code (LSBP L482-553)
_ZEROTH = {"granularity": "block", "perturb": "tensor", "difference": "central", "eps": 1e-3, "num_noise": 1,
           "max_sparsity": CAP_PLUS_0_1}


def check_protocol(protocol: str | None) -> str | None:
    if protocol is None or protocol == "":
        return None
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol {protocol!r}; choose {', '.join(PROTOCOLS)} (or leave it out for "
                        "our defaults)")
    return protocol


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def paper_settings(family: str, *, method: str, allocation: str, scores: str,
                   stacks: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The paper preset for one run: ``(settings, notes)``.

    ``stacks`` are the model's stacks (for the per-stack comparison of BLIP-2; ``None`` gives the T5 stacks).
    ``notes`` say where the run lies outside what the official code does (the preset then fills in what
    applies and the run goes ahead).
    """
    notes: list[str] = []
    s: dict[str, Any] = dict(_ZEROTH)
    coarse = allocation in ("ecoflap", "owl")
    if allocation == "owl":
        notes.append("OWL allocation is not part of the official ECoFLaP code")
    if coarse and scores in ("jvp", "magnitude"):
        notes.append(f"score method {scores!r} is not part of the official ECoFLaP code")
    if family == "blip2":
        stacks = list(stacks) if stacks else ["vision", "text_encoder", "text_decoder"]
        s["calib_samples"] = 128
        if method == "magnitude":
            s["comparison"] = "global"  # GLOBAL L116-142, L179-182: one threshold over ViT + LM
        else:
            s["comparison"] = {st: ("matrix" if st == "vision" else "row") for st in stacks}  # WANDA L271-277, L552-556
        if coarse and scores == "first":
            s.update(variant="weight_grad", first_stage_samples=128, first_stage_batch_size=1)  # ecoflap_first.py
        else:
            s.update(first_stage_samples=32, first_stage_batch_size=8)  # EVAL L240-242, ecoflap_zeroth.py L19
        # one loader serves both stages: batch 8 in ecoflap_zeroth.py, 1 elsewhere; SparseGPT's catchers need 1
        zeroth_ecoflap = allocation == "ecoflap" and scores == "zeroth"
        s["batch_size"] = 8 if (zeroth_ecoflap and method == "wanda") else 1
    elif family == "clip":
        s.update(calib_samples=128, batch_size=16, comparison="row", first_stage_samples=32,
                 first_stage_batch_size=16, clip_objective="contrastive")  # CoOp train.py, zsclip.py, C-WANDA
        # the pruning loader is CoOp's train loader: random resized crop + flip (configs/trainers/CoOp/vit_b16.yaml L13)
        s["calibration_augment"] = True
        if method == "magnitude":
            notes.append("the official CLIP code has no magnitude pruner; per-row magnitude is used")
        if coarse and scores == "first":
            notes.append("the official CLIP code has no first-order scores (zeroth-order scripts only)")
    elif family == "causal_lm":
        s.update(calib_samples=128, batch_size=1, seq_len=2048,  # LLaMA/main.py L26, L32; Wanda one sample per forward
                 comparison="matrix" if method == "magnitude" else "row")  # Wanda lib/prune.py L122-123, L176-200
        if coarse and scores == "first":
            s.update(variant="grad", first_stage_samples=128, first_stage_batch_size=1)  # ecoflap_first.sh, main.py
        else:
            s.update(first_stage_samples=32, first_stage_batch_size=1)  # ecoflap_zero.sh
        if coarse:
            notes.append("the official LLaMA coarse-stage code (LLaMA/lib/) is not in the snapshot: eps 1e-3, per "
                         "tensor, central difference and batch 1 are the LAVIS/Wanda values, unverified")
    else:
        raise UserError(f"--protocol paper knows the families blip2, clip and causal_lm, not {family!r}: drop "
                        "--protocol")
    return s, notes


def _same(key: str, given: Any, preset: Any, target: float | None) -> bool:
    if key == "max_sparsity":
        if preset == CAP_PLUS_0_1:
            return target is None or math.isclose(float(given), min(target + 0.1, 1.0), abs_tol=1e-9)
        return given == preset
    if key == "num_noise":
        try:
            return int(given) == int(preset)
        except (TypeError, ValueError):
            return False
    if isinstance(preset, float) or isinstance(given, float):
        try:
            return math.isclose(float(given), float(preset), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(preset, Mapping):
        if isinstance(given, str):  # one comparison for every stack agrees when the preset's are all the same
            return all(v == given for v in preset.values())
        return dict(given) == dict(preset)
    return given == preset


def _show(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if key == "max_sparsity" and value == CAP_PLUS_0_1:
        return "(sparsity + 0.1)"
    return str(value)


def check_agreement(preset: Mapping[str, Any], given: Mapping[str, Any], *, family: str | None,
                    target: float | None, scope: str | None = None) -> None:
    """Refuse the first explicit setting in ``given`` (non-None values) that contradicts ``preset``; the message
    says ``for {family} models`` (or ``for {scope}``)."""
    for key, value in given.items():
        if value is None or key not in preset:
            continue
        if not _same(key, value, preset[key], target):
            who = f" for {scope}" if scope else (f" for {family} models" if family else "")
            raise UserError(f"--protocol paper sets {flag(key)} {_show(key, preset[key])}{who}, but "
                            f"{flag(key)} {_show(key, value)} was given: drop {flag(key)} to use the paper's "
                            f"value, or drop --protocol to use your own")


def precheck(protocol: str | None, given: Mapping[str, Any], *, method: str, allocation: str, scores: str,
             target: float | None) -> None:
    """Before the model is loaded (its family unknown): refuse contradictions of settings every family shares."""
    if check_protocol(protocol) is None:
        return
    presets = [paper_settings(f, method=method, allocation=allocation, scores=scores)[0]
               for f in ("blip2", "clip", "causal_lm")]
    shared = {k: v for k, v in presets[0].items()
              if all(k in p and _same(k, v, p[k], None) and _same(k, p[k], v, None) for p in presets[1:])
              and not isinstance(v, Mapping)}
    check_agreement(shared, given, family=None, target=target)


def resolve(protocol: str | None, given: Mapping[str, Any], *, family: str, method: str, allocation: str,
            scores: str, target: float | None, stacks: Sequence[str] | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings to run with and what to record: ``(settings, record)``.

    ``given`` holds the explicitly set values (None = not given). ``settings`` = our defaults, then the
    preset (with a protocol), then the given values (a contradiction of the preset raises ``UserError``).
    ``record`` is ``{"protocol": None}`` or ``{"protocol": "paper", "protocol_settings": {...},
    "protocol_notes": [...]}``.
    """
    protocol = check_protocol(protocol)
    settings = dict(DEFAULTS)
    record: dict[str, Any] = {"protocol": protocol}
    if protocol == "paper":
        preset, notes = paper_settings(family, method=method, allocation=allocation, scores=scores, stacks=stacks)
        check_agreement(preset, given, family=family, target=target)
        resolved = dict(preset)
        if resolved.get("max_sparsity") == CAP_PLUS_0_1:
            resolved["max_sparsity"] = None  # the allocation's default cap is the target + 0.1
        settings.update(resolved)
        record.update(protocol_settings={k: (v if k != "max_sparsity" else preset[k]) for k, v in resolved.items()},
                      protocol_notes=notes)
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings, record


# --------------------------------------------------------------------------- evaluation
#: LAVIS's zero-shot VQA settings (``vqav2_zeroshot_flant5xl_eval.yaml`` L39-43; ``gqa_...`` L34-38; ``okvqa_...``
#: L37-41): ``min_len`` reaches transformers as ``min_length`` (``blip2_t5.py`` L426)
PAPER_VQA = {"prompt": "Question: {} Short answer:", "num_beams": 5, "max_new_tokens": 10, "min_length": 1,
             "length_penalty": -1.0}
#: NoCaps captioning (``nocaps_flant5xl_eval.yaml`` L32-34; prompt ``blip2_caption_flant5xl.yaml`` L27):
#: ``min_len`` 8 reaches transformers as ``min_length`` (``blip2_t5.py`` L360)
PAPER_CAPTION = {"prompt": "a photo of", "num_beams": 5, "max_new_tokens": 30, "min_length": 8}


def paper_eval_settings(task: str, *, dataset: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The official evaluation settings for ``task``: ``(settings, notes)``.

    * ``zeroshot``: ``{"templates": [t]}`` with ``t`` the CoOp dataset's ``ZeroshotCLIP`` template
      (``CoOp/trainers/zsclip.py`` L13-29, L42-45; :data:`ecoflap_utils.data.coop.CUSTOM_TEMPLATES`). ``dataset``
      is its name (a :func:`~ecoflap_utils.data.coop.find_spec` name); without one (data that is not a CoOp
      dataset) CoOp's generic ``"a photo of a {}."``, and a note says so.
    * ``vqav2`` / ``okvqa`` / ``gqa``: :data:`PAPER_VQA`; ``caption``: :data:`PAPER_CAPTION`. ``min_length`` is
      transformers' ``min_length``, as ``blip2_t5.py`` passes it (L360, L426): for Flan-T5 it counts the decoder's
      start token, so VQA's 1 imposes nothing and captioning's 8 means 7 new tokens.
    * ``perplexity``: 2048-token non-overlapping windows (Wanda / SparseGPT's WikiText-2 protocol).
    * ``retrieval``: nothing (the paper's Flickr30k numbers come from BLIP-2's retrieval model, not CLIP).
    """
    from .data import coop

    notes: list[str] = []
    if task == "zeroshot":
        if dataset is None:
            notes.append("not a CoOp dataset: CoOp's generic template 'a photo of a {}.' is used")
            return {"templates": [coop.GENERIC_TEMPLATE]}, notes
        return {"templates": [coop.template_for(dataset)]}, notes
    if task in ("vqav2", "okvqa", "gqa"):
        return dict(PAPER_VQA), notes
    if task == "caption":
        return dict(PAPER_CAPTION), notes
    if task == "perplexity":
        return {"window": 2048, "stride": 2048}, notes
    if task == "retrieval":
        notes.append("the official code has no CLIP retrieval evaluation: our defaults are used")
        return {}, notes
    raise UserError(f"--protocol paper has no evaluation settings for task {task!r}")

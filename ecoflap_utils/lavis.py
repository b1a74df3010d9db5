"""The official ECoFLaP release's formats: LAVIS parameter names, checkpoints and score files.

The authors' code (github ylsung/ECoFLaP) is built on Salesforce LAVIS. Its BLIP-2 models are LAVIS
``Blip2T5`` / ``Blip2OPT`` modules, so its pruned checkpoints (``torch.save(model.state_dict())`` in
``LAVIS/evaluate_blip.py``) and its per-tensor score files (``LAVIS/importance_scores/*.pth``) use
LAVIS names. Our models are transformers' ``Blip2ForConditionalGeneration``; this module translates.

Name mapping (LAVIS <-> transformers 5), the rules of transformers' own BLIP-2 conversion script
(``convert_blip_2_original_to_pytorch.py``: ``create_rename_keys``, the "renamed efficiently" loop and
``read_in_q_v_bias``), written as one table that is read in both directions. ``{i}`` is a layer number,
``{p}`` is ``weight`` or ``bias``, ``{rest}`` any tail, ``{lm}`` is ``t5`` or ``opt``:

====================================================  ==========================================================
LAVIS                                                 transformers ``Blip2ForConditionalGeneration``
====================================================  ==========================================================
``visual_encoder.cls_token``                          ``vision_model.embeddings.class_embedding``
``visual_encoder.pos_embed``                          ``vision_model.embeddings.position_embedding``
``visual_encoder.patch_embed.proj.{p}``               ``vision_model.embeddings.patch_embedding.{p}``
``visual_encoder.blocks.{i}.norm1.{p}``               ``vision_model.encoder.layers.{i}.layer_norm1.{p}``
``visual_encoder.blocks.{i}.norm2.{p}``               ``vision_model.encoder.layers.{i}.layer_norm2.{p}``
``visual_encoder.blocks.{i}.attn.qkv.weight``         ``vision_model.encoder.layers.{i}.self_attn.qkv.weight``
``visual_encoder.blocks.{i}.attn.proj.{p}``           ``vision_model.encoder.layers.{i}.self_attn.projection.{p}``
``visual_encoder.blocks.{i}.mlp.fc1|fc2.{p}``         ``vision_model.encoder.layers.{i}.mlp.fc1|fc2.{p}``
``ln_vision.{p}`` (LayerNorm after the EVA ViT)       ``vision_model.post_layernorm.{p}``
``query_tokens``                                      ``query_tokens``
``Qformer.bert.embeddings.LayerNorm.{p}``             ``qformer.layernorm.{p}``
``Qformer.bert.encoder.layer.{i}.attention.self.*``   ``qformer.encoder.layer.{i}.attention.attention.*``
(same for ``crossattention.self.*``)                  (``crossattention.attention.*``)
``Qformer.bert.encoder.layer.{i}.{rest}``             ``qformer.encoder.layer.{i}.{rest}``
``{lm}_proj.{p}``                                     ``language_projection.{p}``
``{lm}_model.{rest}``                                 ``language_model.{rest}``
====================================================  ==========================================================

The language models keep their names below the prefix: LAVIS holds a transformers-4
``T5ForConditionalGeneration`` / ``OPTForCausalLM`` (``t5_model.encoder.block.N...``,
``opt_model.model.decoder.layers.N...``) and transformers 5's ``Blip2ForConditionalGeneration.language_model``
is the same class with the same module tree (``language_model.encoder.block.N``,
``language_model.model.decoder.layers.N``).

One pair of tensors does not map one-to-one: LAVIS's EVA ViT has a query and a value bias
(``attn.q_bias``, ``attn.v_bias``) and no key bias; transformers packs them into one
``self_attn.qkv.bias = cat(q_bias, zeros, v_bias)``. The state-dict converters pack and split it
(a non-zero key bias cannot be exported); the name functions map both LAVIS biases to ``qkv.bias``
and refuse ``qkv.bias`` in the other direction.

Skip list: LAVIS keys that ``Blip2ForConditionalGeneration`` has no place for, dropped on import
(only when the model lacks them). BLIP-2's generative models feed the Q-Former query tokens only:

* ``Qformer.bert.embeddings.position_ids`` (a buffer, in every in-memory LAVIS state dict),
* ``Qformer.bert.embeddings.word_embeddings.*``, ``Qformer.bert.embeddings.position_embeddings.*``
  (the Q-Former's text embeddings),
* ``Qformer.cls.*`` (the Q-Former's masked-LM head),
* ``Qformer.bert.encoder.layer.{i}.intermediate.*`` and ``.output.*`` (the text-only feed-forward; the
  queries use ``intermediate_query`` / ``output_query``).

``Blip2T5`` / ``Blip2OPT`` set these to ``None`` after building, so ECoFLaP's pruned checkpoints have only
``position_ids``; stage-1 / stage-2 LAVIS checkpoints can hold the others.

Tied weights: transformers 5's T5 always builds ``lm_head`` tied to ``shared`` (``T5Config`` forces
``tie_word_embeddings=True``), while Flan-T5 and LAVIS's checkpoints have a separate ``lm_head``. When a
checkpoint gives different values to parameters the model ties, the import unties them (as transformers'
``from_pretrained`` does) instead of letting the last copy overwrite the others.

Numerics: LAVIS's ``Blip2T5`` sets the T5 config's ``dense_act_fn = "gelu"`` (so does transformers'
conversion script); ``T5Config(feed_forward_proj="gated-gelu")`` alone gives ``gelu_new``. Names and
shapes do not depend on it, outputs do: build the text config with ``dense_act_fn="gelu"`` to match LAVIS.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import UserError

#: the bundled copies of the authors' per-tensor score files (see data/README.md)
OFFICIAL_DIR = Path(__file__).resolve().parents[1] / "data" / "official"
LMS = ("t5", "opt")

# (LAVIS template, transformers template); read top to bottom, first match wins, in both directions
_RULES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("visual_encoder.blocks.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("visual_encoder.blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{i}.attn.proj.{p}", "vision_model.encoder.layers.{i}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{i}.mlp.{fc}.{p}", "vision_model.encoder.layers.{i}.mlp.{fc}.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.encoder.layer.{i}.{att}.self.{rest}", "qformer.encoder.layer.{i}.{att}.attention.{rest}"),
    ("Qformer.bert.encoder.layer.{i}.{rest}", "qformer.encoder.layer.{i}.{rest}"),
    ("{lm}_proj.{p}", "language_projection.{p}"),
    ("{lm}_model.{rest}", "language_model.{rest}"),
)
# LAVIS's separate q/v biases of the EVA ViT, packed into transformers' qkv.bias
_QV_BIAS_LAVIS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")
_QKV_BIAS_HF = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
# LAVIS keys that Blip2ForConditionalGeneration has no place for (see the module docstring)
SKIP_PATTERNS: tuple[str, ...] = (
    r"^Qformer\.bert\.embeddings\.position_ids$",
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
    r"^Qformer\.cls\.",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
)
_SKIP = tuple(re.compile(p) for p in SKIP_PATTERNS)

_FIELDS = {"i": r"\d+", "p": r"weight|bias", "fc": r"fc1|fc2", "att": r"attention|crossattention", "rest": r".+",
           "lm": r"t5|opt"}


def _compile(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile("^" + out + re.escape(template[pos:]) + "$")


_FORWARD = tuple((_compile(lav), hf) for lav, hf in _RULES)
_BACKWARD = tuple((_compile(hf), lav) for lav, hf in _RULES)


def _check_lm(lm: str | None) -> None:
    if lm is not None and lm not in LMS:
        raise UserError(f"unknown LAVIS language model {lm!r}: choose one of {', '.join(LMS)}")


# --------------------------------------------------------------------------- names
def lavis_to_hf_name(name: str, *, lm: str | None = None) -> str:
    """The transformers name of the LAVIS parameter ``name``.

    ``lm`` (``"t5"`` or ``"opt"``) is read from the name's ``t5_``/``opt_`` prefix when not given; when
    given, a name of the other language model is an error. ``attn.q_bias`` / ``attn.v_bias`` map to the
    ``self_attn.qkv.bias`` they are packed into. Names of the skip list and unknown names raise ``UserError``.
    """
    _check_lm(lm)
    if _QV_BIAS_LAVIS.match(name):
        return f"vision_model.encoder.layers.{_QV_BIAS_LAVIS.match(name).group(1)}.self_attn.qkv.bias"
    for pat, hf in _FORWARD:
        m = pat.match(name)
        if m is None:
            continue
        fields = m.groupdict()
        if lm is not None and fields.get("lm", lm) != lm:
            raise UserError(f"{name} belongs to a LAVIS blip2_{fields['lm']} model, not blip2_{lm}")
        return hf.format(**fields)
    if any(p.match(name) for p in _SKIP):
        raise UserError(f"{name} has no counterpart in transformers' Blip2ForConditionalGeneration "
                        "(it is on the documented skip list of ecoflap_utils.lavis)")
    raise UserError(f"{name} is not a LAVIS BLIP-2 parameter name this module knows (see ecoflap_utils.lavis)")


def hf_to_lavis_name(name: str, *, lm: str = "t5") -> str:
    """The LAVIS name of the transformers parameter ``name``; ``lm`` picks ``t5_model.`` or ``opt_model.``.

    ``self_attn.qkv.bias`` has no single LAVIS name (it is ``attn.q_bias`` + zeros + ``attn.v_bias``):
    use :func:`hf_state_dict_to_lavis` for it.
    """
    _check_lm(lm)
    if _QKV_BIAS_HF.match(name):
        raise UserError(f"{name} is split into LAVIS's attn.q_bias and attn.v_bias: convert it with "
                        "hf_state_dict_to_lavis, not by name")
    for pat, lav in _BACKWARD:
        m = pat.match(name)
        if m is not None:
            return lav.format(lm=lm, **m.groupdict())
    raise UserError(f"{name} is not a Blip2ForConditionalGeneration parameter name with a LAVIS counterpart")


def _lavis_names_of(hf_name: str, lm: str) -> list[str]:
    """LAVIS names that make up one transformers tensor (two for the packed qkv bias; the transformers
    name itself when it has no LAVIS counterpart)."""
    m = _QKV_BIAS_HF.match(hf_name)
    if m:
        return [f"visual_encoder.blocks.{m.group(1)}.attn.q_bias", f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"]
    try:
        return [hf_to_lavis_name(hf_name, lm=lm)]
    except UserError:
        return [hf_name]


# stack of our adapters -> LAVIS module prefix of its blocks (``{lm}`` filled in)
_STACK_PREFIX = {
    "vision": "visual_encoder.blocks",
    "qformer": "Qformer.bert.encoder.layer",
    "text_encoder": "t5_model.encoder.block",
    "text_decoder": "t5_model.decoder.block",
    "lm": "opt_model.model.decoder.layers",
}
_BLOCK_NAME = re.compile(r"^(vision|qformer|text_encoder|text_decoder|lm)(?:\.(\d+))?$")


def block_to_lavis(name: str, *, lm: str = "t5") -> str:
    """LAVIS module prefix of one of our block or stack names (the keys of scores.json).

    ``vision.3`` -> ``visual_encoder.blocks.3``, ``text_encoder.5`` -> ``t5_model.encoder.block.5``,
    ``text_decoder.2`` -> ``t5_model.decoder.block.2``, ``lm.7`` -> ``opt_model.model.decoder.layers.7``,
    ``qformer.1`` -> ``Qformer.bert.encoder.layer.1``; a bare stack name gives the list's prefix
    (``vision`` -> ``visual_encoder.blocks``). T5 has no ``lm`` stack and OPT no text encoder/decoder.
    """
    _check_lm(lm)
    m = _BLOCK_NAME.match(name)
    if m is None:
        raise UserError(f"{name!r} is not a block name (stack.N) or stack name of a BLIP-2 adapter")
    stack, idx = m.groups()
    if (stack == "lm") != (lm == "opt") and stack not in ("vision", "qformer"):
        raise UserError(f"block {name!r} does not exist in a LAVIS blip2_{lm} model")
    prefix = _STACK_PREFIX[stack]
    return prefix if idx is None else f"{prefix}.{idx}"


def lavis_to_block(name: str) -> str:
    """Inverse of :func:`block_to_lavis`."""
    for stack, prefix in _STACK_PREFIX.items():
        if name == prefix:
            return stack
        if name.startswith(prefix + ".") and name[len(prefix) + 1:].isdigit():
            return f"{stack}.{name[len(prefix) + 1:]}"
    raise UserError(f"{name!r} is not the LAVIS prefix of a BLIP-2 block")


def to_lavis_names(mapping: Mapping[str, Any], *, lm: str = "t5") -> dict[str, Any]:
    """``{our name: value}`` -> ``{LAVIS name: value}``, for export back to the official code.

    Keys may be parameter names (``sparsity_dict.json``; layer-granularity scores) or block / stack
    names (``scores.json`` at block or module granularity), which become LAVIS module prefixes.
    """
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        new = block_to_lavis(k, lm=lm) if _BLOCK_NAME.match(k) else hf_to_lavis_name(k, lm=lm)
        if new in out:
            raise UserError(f"two keys map to the LAVIS name {new}")
        out[new] = v
    return out


def from_lavis_names(mapping: Mapping[str, Any], *, lm: str | None = None) -> dict[str, Any]:
    """Inverse of :func:`to_lavis_names`: LAVIS parameter names or block prefixes -> our names."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        try:
            new = lavis_to_block(k)
        except UserError:
            new = lavis_to_hf_name(k, lm=lm)
        if new in out:
            raise UserError(f"two LAVIS keys map to {new} (attn.q_bias and attn.v_bias share qkv.bias)")
        out[new] = v
    return out


# --------------------------------------------------------------------------- state dicts
def _model_of(obj) -> nn.Module | None:
    """``Blip2ForConditionalGeneration`` from an adapter, a model, or None."""
    if obj is None or isinstance(obj, nn.Module):
        return obj
    model = getattr(obj, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise UserError(f"expected a Blip2ForConditionalGeneration or a Blip2Adapter, got {type(obj).__name__}")


def lm_of(model_or_adapter) -> str:
    """``"t5"`` or ``"opt"``: the LAVIS language model that matches a BLIP-2 model's text config."""
    model = _model_of(model_or_adapter)
    cfg = getattr(getattr(model, "config", None), "text_config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in LMS:
        raise UserError(f"LAVIS BLIP-2 has T5 and OPT language models only; this model's is {kind!r}")
    return kind


def _lm_of_keys(keys: Iterable[str], prefix_style: str) -> str | None:
    for k in keys:
        if prefix_style == "lavis":
            for lm in LMS:
                if k.startswith(f"{lm}_model.") or k.startswith(f"{lm}_proj."):
                    return lm
        elif k.startswith("language_model.encoder.block.") or k.startswith("language_model.decoder.block."):
            return "t5"
        elif k.startswith("language_model.model.decoder."):
            return "opt"
    return None


def _convert(sd: Mapping[str, torch.Tensor], model: nn.Module | None):
    """LAVIS state dict -> (transformers state dict, {hf key: [LAVIS keys]}, unexpected, missing partners)."""
    have = set(model.state_dict()) if model is not None else None
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, list[str]] = {}
    unexpected: list[str] = []
    qv: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        if not isinstance(val, torch.Tensor):
            unexpected.append(key)
            continue
        m = _QV_BIAS_LAVIS.match(key)
        if m:
            qv.setdefault(m.group(1), {})[m.group(2)] = val
            continue
        try:
            new = lavis_to_hf_name(key)
        except UserError:
            new = None
        if any(p.match(key) for p in _SKIP) and (new is None or have is None or new not in have):
            continue
        if new is None or new in out:
            unexpected.append(key)
            continue
        out[new] = val
        sources[new] = [key]
    missing_partner: list[str] = []
    for i, parts in sorted(qv.items(), key=lambda kv: int(kv[0])):
        names = [f"visual_encoder.blocks.{i}.attn.{c}_bias" for c in "qv"]
        if set(parts) != {"q", "v"}:
            missing_partner += [n for c, n in zip("qv", names) if c not in parts]
            continue
        q, v = parts["q"], parts["v"]
        hf = f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"
        out[hf] = torch.cat((q, torch.zeros_like(v), v))
        sources[hf] = names
    return out, sources, unexpected, missing_partner


def lavis_state_dict_to_hf(sd: Mapping[str, torch.Tensor], model=None) -> dict[str, torch.Tensor]:
    """A LAVIS BLIP-2 state dict with transformers names: renamed, q/v biases packed, skip list dropped.

    ``model`` (a ``Blip2ForConditionalGeneration`` or adapter, optional) keeps skip-list keys that the
    model does have. Keys that are neither mapped nor on the skip list raise ``UserError``.
    """
    out, _, unexpected, missing = _convert(sd, _model_of(model))
    if unexpected or missing:
        bad = unexpected + [f"{n} (missing)" for n in missing]
        raise UserError(f"{len(bad)} LAVIS key(s) cannot be converted: {_first(bad)}")
    return out


def hf_state_dict_to_lavis(sd_or_model, *, lm: str | None = None) -> dict[str, torch.Tensor]:
    """A transformers BLIP-2 state dict (or model / adapter) with LAVIS names: the inverse of
    :func:`lavis_state_dict_to_hf`. ``qkv.bias`` is split into ``attn.q_bias`` / ``attn.v_bias`` (its key
    part must be zero: LAVIS's EVA ViT has no key bias). Tensors are detached and share storage with
    the model except the split biases. ``lm`` is read from the model or the keys when not given.
    """
    _check_lm(lm)
    if isinstance(sd_or_model, Mapping):
        sd = sd_or_model
        lm = lm or _lm_of_keys(sd, "hf")
    else:
        model = _model_of(sd_or_model)
        sd = model.state_dict()
        lm = lm or lm_of(model)
    if lm is None:
        raise UserError("cannot tell the language model from the keys: pass lm='t5' or lm='opt'")
    out: dict[str, torch.Tensor] = {}
    for key, val in sd.items():
        val = val.detach()
        m = _QKV_BIAS_HF.match(key)
        if m:
            q, k, v = val.chunk(3)
            if torch.count_nonzero(k).item():
                raise UserError(f"{key} has a non-zero key bias, which LAVIS's EVA ViT (q_bias, v_bias only) "
                                "cannot hold")
            q_name, v_name = _lavis_names_of(key, lm)
            out[q_name], out[v_name] = q.clone(), v.clone()
            continue
        out[hf_to_lavis_name(key, lm=lm)] = val
    return out


# --------------------------------------------------------------------------- checkpoints
def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        text = str(e)
        if not allow_pickle and ("Unsupported global" in text or "can still be loaded" in text):
            raise UserError(f"{path} holds objects other than tensors and plain containers, which torch.load("
                            "weights_only=True) refuses; if you trust the file, pass allow_pickle=True") from e
        raise UserError(f"{path} is not a readable torch checkpoint ({_reason(text)})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable torch checkpoint ({_reason(str(e)) or type(e).__name__})") from e


def _reason(text: str) -> str:
    """The informative line of a torch.load error, on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0][:200] if lines else ""


def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path} holds no state dict: expected {{'model': state_dict}} or a state dict")
    return dict(obj)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one tensor (tied weights), each group in model order."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _untie(model: nn.Module, name: str) -> None:
    """Give the parameter ``name`` its own storage and drop it from transformers' tied-weight mappings
    (what ``from_pretrained`` does when a checkpoint holds different values for tied weights)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    setattr(mod, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
    parts = name.split(".")
    for j in range(len(parts)):
        tied = getattr(model.get_submodule(".".join(parts[:j])) if j else model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop(".".join(parts[j:]), None)


LAVIS_EXPECTED = ("a LAVIS BLIP-2 {lm} state dict of the whole model with this architecture (as ECoFLaP's "
                  "torch.save(model.state_dict()) writes), or {{'model': state_dict}}")


def load_lavis_checkpoint(path, adapter_or_model, *, strict: bool = True, allow_pickle: bool = False) -> nn.Module:
    """Load a LAVIS BLIP-2 ``.pth`` (such as ECoFLaP's pruned Flan-T5-XL checkpoints) into a
    ``Blip2ForConditionalGeneration`` (or an adapter's model), in place; returns the model.

    The file holds ``{"model": state_dict}`` or the state dict itself. It is read with
    ``weights_only=True`` unless ``allow_pickle`` (trusted files only). Every key must map
    (after the skip list) onto the model and every model tensor must be given (a tied alias counts),
    with equal shapes; otherwise ``UserError`` in one line naming how many keys and the first few, in
    LAVIS names. ``strict=False`` allows missing keys (a LAVIS training checkpoint that holds only the
    trained Q-Former, on top of a loaded model) but not unexpected ones. Values are cast to the model's
    dtypes. Tied parameters given different values are untied (Flan-T5's ``lm_head``).
    """
    path = Path(path)
    model = _model_of(adapter_or_model)
    lm = lm_of(model)
    if not path.is_file():
        raise UserError(f"LAVIS checkpoint {path} does not exist: pass the .pth file of a LAVIS BLIP-2 model")
    if any(p.is_meta for p in model.parameters()):
        raise UserError("the model is on the meta device: build it on a real device before loading weights")
    sd = _state_dict_of(_torch_load(path, allow_pickle), path)
    expected = LAVIS_EXPECTED.format(lm="Flan-T5 (blip2_t5)" if lm == "t5" else "OPT (blip2_opt)")
    file_lm = _lm_of_keys(sd, "lavis")
    if file_lm is not None and file_lm != lm:
        raise UserError(f"{path} is a LAVIS blip2_{file_lm} checkpoint but the model's language model is {lm}: "
                        f"expected {expected}")
    hf_sd, sources, unexpected, missing_partner = _convert(sd, model)
    target = model.state_dict(keep_vars=True)
    unexpected += [s for k in hf_sd if k not in target for s in sources[k]]
    hf_sd = {k: v for k, v in hf_sd.items() if k in target}
    covered = set(hf_sd)
    for group in _alias_groups(model):
        if covered & set(group):
            covered |= set(group)
    # a lone q_bias or v_bias cannot be packed, strict or not
    missing = list(dict.fromkeys(missing_partner + ([
        n for k in target if k not in covered for n in _lavis_names_of(k, lm) if n not in sd] if strict else [])))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_first(unexpected)})")
        hint = "; strict=False loads a checkpoint of the trained parts only" if not unexpected else ""
        raise UserError(f"{path} does not match the model: {' and '.join(parts)}; expected {expected}{hint}")
    bad = [f"{sources[k][0]} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in hf_sd.items()
           if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise UserError(f"{path} does not match the model: {len(bad)} shape mismatch(es) (file vs model: "
                        f"{_first(bad)}); expected {expected}")
    # tied parameters the checkpoint gives different values: untie all but the first value's names
    for group in _alias_groups(model):
        given = [n for n in group if n in hf_sd]
        if len(given) < 2:
            continue
        first = hf_sd[given[0]]
        for n in given[1:]:
            if not torch.equal(hf_sd[n].to(first.dtype), first):
                _untie(model, n)
    target = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in hf_sd.items():
            target[k].copy_(v)
    return model


def save_lavis_checkpoint(model_or_adapter, path, *, wrap: bool = True) -> Path:
    """Write the model as a LAVIS state dict (``{"model": sd}`` when ``wrap``) for the official code."""
    path = Path(path)
    sd = hf_state_dict_to_lavis(model_or_adapter)
    torch.save({"model": sd} if wrap else sd, path)
    return path


# --------------------------------------------------------------------------- official score files
def official_score_file(method: str = "wanda") -> Path:
    """The bundled copy of the authors' BLIP-2 Flan-T5-XL per-tensor scores (``wanda`` or ``sparsegpt``)."""
    if method not in ("wanda", "sparsegpt"):
        raise UserError(f"the official score files are for wanda and sparsegpt, not {method!r}")
    return OFFICIAL_DIR / f"blip2-flan-t5-xl_local_{method}_scores.json"


def read_official_scores(path, adapter) -> dict[str, float]:
    """The authors' per-tensor scores keyed by our parameter names (``adapter.model``'s names).

    ``path`` is a JSON file with a ``"scores"`` dict (LAVIS name -> float; as bundled in data/official/)
    or the authors' own ``LAVIS/importance_scores/*.pth`` (a dict LAVIS name -> float). A name that is
    not a parameter of the adapter's model raises ``UserError`` naming the first; values must be finite.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"score file {path} does not exist: pass one of {OFFICIAL_DIR}/*_scores.json")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not JSON: {e}") from e
    else:
        raw = _torch_load(path, allow_pickle=False)
    scores = raw.get("scores", raw) if isinstance(raw, Mapping) else None
    if not isinstance(scores, Mapping) or not scores:
        raise UserError(f"{path} has no scores: expected {{'scores': {{LAVIS name: float}}}}")
    model = _model_of(adapter)
    lm = lm_of(model)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    out: dict[str, float] = {}
    for key, val in scores.items():
        try:
            new = lavis_to_hf_name(key, lm=lm)
        except UserError as e:
            raise UserError(f"{path}: {e}") from e
        if new not in names or _QKV_BIAS_HF.match(new):
            raise UserError(f"{path}: {key} (ours: {new}) is not a parameter of {getattr(adapter, 'name', 'the model')}"
                            "; the scores are for BLIP-2 Flan-T5-XL")
        if new in out:
            raise UserError(f"{path}: two keys map to {new}")
        if isinstance(val, torch.Tensor) and val.numel() == 1:
            val = val.item()
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise UserError(f"{path}: the score of {key} is {val!r}, not a finite number")
        out[new] = float(val)
    return out

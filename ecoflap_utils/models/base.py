"""What every model adapter provides: ordered blocks of prunable weights, calibration data and a loss.

An adapter never knows about scores or pruning. It says three things about a model:

* its *blocks*, in the order a forward pass meets them, each with a stack (``vision``,
  ``qformer``, ``text_encoder``, ``text_decoder``, ``lm``), a modality (``vision``,
  ``language``, ``bridge``) and its prunable weights by qualified parameter name;
* how to build calibration batches (``calibration_samples`` then ``batches``);
* how to run the model on a batch (``forward``) and how to compute its calibration ``loss``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .devices import execution_device

MODALITIES = ("vision", "language", "bridge")


@dataclass
class Block:
    """One transformer block: the unit that ECoFLaP scores and the pruner walks through."""

    name: str  # e.g. "vision.3"
    stack: str  # e.g. "vision", "lm", "text_encoder"
    modality: str  # "vision" | "language" | "bridge"
    module: nn.Module = field(repr=False)
    weights: list[str] = field(default_factory=list)  # qualified parameter names in adapter.model
    prunable: bool = True  # False for stacks that are scored/cached but not pruned by default


def prunable_weight_names(module: nn.Module, prefix: str) -> list[str]:
    """Qualified names of the 2-D weights a layer-wise pruner acts on inside ``module``.

    ``nn.Linear`` weights and the packed ``in_proj_weight`` / ``out_proj.weight`` of
    ``nn.MultiheadAttention`` (kept in place, never swapped for Linear modules).
    Embeddings, norms and relative position tables are left alone, as in Wanda and SparseGPT.
    """
    names = []
    for mod_name, mod in module.named_modules():
        full = f"{prefix}.{mod_name}" if mod_name else prefix
        if isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is not None:
                names.append(f"{full}.in_proj_weight")
            else:  # separate q/k/v weights (kdim != embed_dim)
                names += [f"{full}.q_proj_weight", f"{full}.k_proj_weight", f"{full}.v_proj_weight"]
        elif isinstance(mod, nn.Linear):
            names.append(f"{full}.weight")
    return names


class ModelAdapter:
    """Base class. Subclasses set ``self.model``, ``self.name`` and implement the hooks below."""

    family: str = "base"
    #: stacks that are pruned unless the caller says otherwise
    default_stacks: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, name: str, *, device="cpu", dtype=torch.float32, source: str | None = None):
        self.model = model
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source or name
        self.model.eval()
        self._blocks: list[Block] | None = None

    # ----------------------------------------------------------------- structure
    def build_blocks(self) -> list[Block]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def blocks(self) -> list[Block]:
        if self._blocks is None:
            self._blocks = self.build_blocks()
        return self._blocks

    def stacks(self) -> list[str]:
        """Stack names in model order."""
        seen: list[str] = []
        for b in self.blocks:
            if b.stack not in seen:
                seen.append(b.stack)
        return seen

    def stack_blocks(self, stack: str) -> list[Block]:
        return [b for b in self.blocks if b.stack == stack]

    def pruned_blocks(self, stacks: Iterable[str] | None = None) -> list[Block]:
        """Blocks the pruner acts on: the default stacks, or the given ones."""
        chosen = set(stacks) if stacks is not None else set(self.default_stacks or self.stacks())
        unknown = chosen - set(self.stacks())
        if unknown:
            raise ValueError(f"unknown stack(s) {sorted(unknown)} for {self.name}; this model has {self.stacks()}")
        return [b for b in self.blocks if b.stack in chosen]

    def parameter(self, qualified_name: str) -> torch.Tensor:
        return self.model.get_parameter(qualified_name)

    def layer_names(self, stacks: Iterable[str] | None = None) -> list[str]:
        return [w for b in self.pruned_blocks(stacks) for w in b.weights]

    def block_of(self) -> dict[str, Block]:
        """Map from weight name to the block that holds it."""
        return {w: b for b in self.blocks for w in b.weights}

    # ----------------------------------------------------------------- data
    def calibration_samples(self, n: int, seed: int = 0) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, samples: list[Any], batch_size: int) -> list[dict[str, Any]]:
        """Collate ``samples`` into batches on the model's input device, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [self.collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]

    @property
    def calibration_name(self) -> str:
        return getattr(self, "_calibration_name", "generated")

    # ----------------------------------------------------------------- compute
    def forward(self, batch: dict[str, Any]) -> Any:
        """Run the model on a batch (used to capture block inputs). Defaults to the loss."""
        return self.loss(batch)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def low_memory_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The calibration loss, computed so that its backward pass holds little beyond the blocks'
        inputs (used by low-memory first-order scores). The same value as :meth:`loss`; adapters whose
        loss head is large (causal LMs: the vocabulary logits) override it."""
        return self.loss(batch)

    def training_loss(self, batch: dict[str, Any], *, vision_grad: bool = True) -> torch.Tensor:
        """The same loss for fine-tuning: adapters may skip work that training does not need (BLIP-2 with a
        decoder-only LM runs its ViT without gradients when ``vision_grad`` is false and its LM head only at
        the target positions). The value and the trained parameters' gradients equal :meth:`loss`'s."""
        return self.loss(batch)

    def input_device(self) -> torch.device:
        """Where batches go: the model's main device when accelerate dispatched it (its root hook's execution
        device), else the device of its first parameter (``devices.execution_device``)."""
        if next(self.model.parameters(), None) is None:  # pragma: no cover
            return self.device
        return execution_device(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "source": self.source,
            "stacks": {s: len(self.stack_blocks(s)) for s in self.stacks()},
            "default_stacks": list(self.default_stacks or self.stacks()),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def seeded_rng(seed: int) -> random.Random:
    return random.Random(seed)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes (``devices.execution_device``): its accelerate hook's execution device when the
    model was dispatched (offloaded weights sit on ``meta`` then), else its first parameter's device."""
    return execution_device(module)


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, *, chunk_tokens: int = 512) -> torch.Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM, the value of ``model(input_ids, labels=input_ids).loss``,
    with the output head and the loss run on ``chunk_tokens`` tokens at a time under activation checkpointing:
    the full (tokens x vocabulary) logits never exist at once, in the forward or the backward pass."""
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = input_ids[:, 1:].reshape(-1)

    def part(hh, yy):
        return F.cross_entropy(head(hh).float(), yy, reduction="sum")

    total = sum(checkpoint(part, h[i:i + chunk_tokens], y[i:i + chunk_tokens], use_reentrant=False)
                for i in range(0, h.shape[0], chunk_tokens))
    return total / h.shape[0]


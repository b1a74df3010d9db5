"""Capturing what reaches each block in a real forward pass, and replaying blocks on it.

Block inputs are captured with forward pre-hooks (``with_kwargs=True``), so attention masks,
T5 position bias, rotary embeddings and encoder states reach every block exactly as the model
gives them. Every hook is removed when the context exits, also on error.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .models.base import Block, ModelAdapter, module_device, to_device

HIDDEN_KWARGS = ("hidden_states", "x", "q_x", "query")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the blocks of interest have run."""


@dataclass
class Call:
    """The positional and keyword arguments a block was called with."""

    args: tuple
    kwargs: dict

    def hidden(self) -> torch.Tensor:
        if self.args:
            return self.args[0]
        for k in HIDDEN_KWARGS:
            if k in self.kwargs:
                return self.kwargs[k]
        raise ValueError("cannot find the hidden-state argument of a block call")

    def with_hidden(self, hidden: torch.Tensor) -> "Call":
        if self.args:
            return Call((hidden,) + tuple(self.args[1:]), self.kwargs)
        for k in HIDDEN_KWARGS:
            if k in self.kwargs:
                return Call(self.args, {**self.kwargs, k: hidden})
        raise ValueError("cannot find the hidden-state argument of a block call")

    def without_hidden(self) -> "Call":
        return self.with_hidden(None)  # type: ignore[arg-type]


def first_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (its output may be a tensor, a tuple or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"unexpected block output type {type(out).__name__}")


def with_first_output(out: Any, hidden: torch.Tensor) -> Any:
    """``out`` (a block's output: tensor, tuple or ModelOutput) with its hidden states replaced by ``hidden``."""
    if isinstance(out, torch.Tensor):
        return hidden
    if hasattr(out, "_fields"):  # a namedtuple
        return out._replace(**{out._fields[0]: hidden})
    if isinstance(out, (tuple, list)):
        return type(out)((hidden, *out[1:]))
    if hasattr(out, "to_tuple"):
        first = next(iter(out.keys()))
        return type(out)(**{**out, first: hidden})
    raise TypeError(f"unexpected block output type {type(out).__name__}")


@contextmanager
def hooks(*handles) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_calls(adapter: ModelAdapter, blocks: Sequence[Block], batches: Sequence[dict], *,
                  keep_hidden: str = "first", stop_after_last: bool = True,
                  skip_later: bool = False) -> list[list[Call]]:
    """Run ``adapter.forward`` on each batch and record how each of ``blocks`` was called.

    Returns ``calls[batch][i]`` for block ``i``. With ``keep_hidden="first"`` only the first block keeps
    its hidden-state input (later ones are replayed from the previous block's output, which saves
    memory); ``"all"`` keeps every block's. With ``stop_after_last`` the forward pass is cut short
    after the last block, so nothing after it is computed.

    ``skip_later`` (with ``keep_hidden="first"``): blocks after the first do not compute. Each hands on its input
    hidden states with the rest of what the first block returned in that batch (T5's position bias, for
    example), so the stack still calls every block with the arguments it would give it, and the capture costs
    one block's forward instead of the whole stack's. This holds where a stack derives a block's arguments from
    the previous blocks' outputs only through those extra outputs, never from the hidden values: true of every
    adapter here (``tests/test_prune.py`` compares both captures on each), not of every model a generic adapter
    accepts (transformers 5.25's GLM-MoE-DSA hands each layer the previous layer's top-k indices,
    ``models/glm_moe_dsa/modeling_glm_moe_dsa.py`` L705). So the first batch is
    captured both ways and compared (:func:`same_call`); if any later block's arguments differ, every batch is
    captured in full. The fine stage replays the blocks anyway, so the skipped forwards were pure cost: a third of
    Wanda's time on SmolLM2.
    """
    if skip_later and keep_hidden != "first":
        raise ValueError("skip_later needs keep_hidden='first': later blocks' hidden states are not computed")
    if not skip_later or len(blocks) < 2 or not batches:
        return _capture(adapter, blocks, batches, keep_hidden, stop_after_last, skip=False)
    full = _capture(adapter, blocks, batches[:1], keep_hidden, stop_after_last, skip=False)
    short = _capture(adapter, blocks, batches[:1], keep_hidden, stop_after_last, skip=True)
    safe = all(same_call(a, b) for a, b in zip(full[0], short[0]))
    return full + _capture(adapter, blocks, batches[1:], keep_hidden, stop_after_last, skip=safe)


def same_call(a: Call, b: Call) -> bool:
    """Whether two recorded calls have equal arguments: tensors by value (dtype and shape included), containers
    item by item, anything else by identity or ``==``."""
    return _same(a.args, b.args) and _same(a.kwargs, b.kwargs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # an object whose == is not a truth value
        return False


def _capture(adapter: ModelAdapter, blocks: Sequence[Block], batches: Sequence[dict], keep_hidden: str,
             stop_after_last: bool, *, skip: bool) -> list[list[Call]]:
    calls: list[list[Call]] = []
    current: list[Call | None] = []
    idx_of = {id(b.module): i for i, b in enumerate(blocks)}

    def pre_hook(module, args, kwargs):
        i = idx_of[id(module)]
        if current[i] is not None:
            raise RuntimeError(f"block {blocks[i].name} was called twice in one forward pass")
        call = Call(tuple(args), dict(kwargs))
        if keep_hidden == "first" and i > 0:
            call = call.without_hidden()
        current[i] = call

    def stop_hook(module, args, output):
        raise StopForward

    with ExitStack() as stack:
        for b in blocks:
            stack.enter_context(hooks(b.module.register_forward_pre_hook(pre_hook, with_kwargs=True)))
        if stop_after_last:
            stack.enter_context(hooks(blocks[-1].module.register_forward_hook(stop_hook)))
        if skip and len(blocks) > 1:
            first_out: list[Any] = [None]

            def keep_first(module, args, output):
                first_out[0] = output

            def pass_through(*args, **kwargs):
                return with_first_output(first_out[0], Call(args, kwargs).hidden())

            stack.enter_context(hooks(blocks[0].module.register_forward_hook(keep_first)))
            for b in blocks[1:]:
                stack.enter_context(replaced_forward(b.module, pass_through))
        for batch in batches:
            current = [None] * len(blocks)
            try:
                with torch.no_grad():
                    adapter.forward(batch)
            except StopForward:
                pass
            missing = [blocks[i].name for i, c in enumerate(current) if c is None]
            if missing:
                raise RuntimeError(f"blocks {missing} were not called by the forward pass of {adapter.name}")
            calls.append(list(current))  # type: ignore[arg-type]
    return calls


def run_block(block: Block, call: Call, hidden: torch.Tensor | None = None) -> Any:
    """Call a block with a recorded call, optionally with new hidden states; inputs move to its device."""
    if hidden is not None:
        call = call.with_hidden(hidden)
    dev = module_device(block.module)
    return block.module(*to_device(call.args, dev), **to_device(call.kwargs, dev))


def stack_groups(blocks: Sequence[Block]) -> list[list[Block]]:
    """Split blocks into consecutive runs of the same stack, in order."""
    groups: list[list[Block]] = []
    for b in blocks:
        if groups and groups[-1][0].stack == b.stack:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the ``with`` body at ``n`` torch intra-op threads (``None``: as they are); restored on exit.

    On CPU the thread count changes the rounding, not only the speed. Measured here (MKL, 1 vs 2 threads):
    a float32 matmul with a long inner size and few rows (1024 or more inputs, 16-256 rows; equal at 512
    inputs) such as mini-blip2's Q-Former ``output_query.dense`` and mini-clip's text ``output.dense``, and
    the Cholesky factorisation and ``cholesky_inverse`` from 96-160 columns on, differ in their last bits;
    elementwise ops, layer norms, softmax and X^T X over a few thousand tokens did not. One thread gives one
    answer whatever the process's thread count (on one CPU and library build; another CPU's kernels may round
    differently). Only CPU work is affected (``torch.set_num_threads``); CUDA kernels do not use these threads.
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def replaced_forward(module: nn.Module, fn) -> Iterator[None]:
    """Temporarily replace ``module.forward`` (hooks still run); restored on exit."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward

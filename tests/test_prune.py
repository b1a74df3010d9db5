"""Fine stage: masks on hand-checked cases, N:M, SparseGPT, and the sequential block runner."""
import math

import pytest
import torch

from ecoflap_utils import UserError, load_model, prune
from ecoflap_utils.models import Block, ModelAdapter
from ecoflap_utils.capture import capture_calls, first_output, run_block, same_call
from ecoflap_utils.errors import CalibrationError
from ecoflap_utils.prune import parse_nm, select_prune_mask, sparsegpt_prune, wanda_scores


def test_wanda_mask_by_hand_on_a_4x8_layer():
    # Inputs: two tokens; column norms ||X_j|| = (1,2,3,4,1,2,3,4) * sqrt(2) ... chosen so scores are easy.
    X = torch.tensor([[1., 2, 3, 4, 1, 2, 3, 4], [1., 2, 3, 4, 1, 2, 3, 4]])
    W = torch.tensor([
        [8., 1, 1, 1, 1, 1, 1, 1],   # scores ~ 8,2,3,4,1,2,3,4  -> prune cols 4,1 (2 lowest at s=0.25: 1,2 tie)
        [1., 1, 1, 1, 1, 1, 1, 1],   # scores 1,2,3,4,1,2,3,4 -> lowest: col0 (1), col4 (1)
        [-4., 2, 1, 1, 0.5, 1, 1, 1],  # 4,4,3,4,0.5,2,3,4 -> col4 (0.5), col5 (2)
        [1., 1, 1, -0.1, 1, 1, 1, 1],  # 1,2,3,0.4,1,2,3,4 -> col3 (0.4), col0 (1)
    ])
    sq = (X * X).sum(0)
    mask = select_prune_mask(wanda_scores(W, sq), 0.25)
    expected = torch.zeros(4, 8, dtype=torch.bool)
    # row 0: scores*sqrt2 -> [8,2,3,4,1,2,3,4]: lowest two are col4 (1) and col1 (2; tie with col5, col1 first)
    expected[0, [4, 1]] = True
    expected[1, [0, 4]] = True
    expected[2, [4, 5]] = True
    expected[3, [3, 0]] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_row_comparison_prunes_floor_s_cin_in_every_row(s):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(0))
    mask = select_prune_mask(scores, s, comparison="row")
    assert (mask.sum(1) == math.floor(s * 40)).all()
    kept_min = torch.where(mask, torch.inf, scores).min(1).values
    pruned_max = torch.where(mask, scores, -torch.inf).max(1).values
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("k", [0, 1, 7, 20, 39, 40])
def test_selection_equals_the_first_k_of_a_stable_sort(k):
    """The row comparison picks by selection (kthvalue) but must equal Wanda's stable sort, ties included:
    scores drawn from 5 values, so most rows tie at their k-th score."""
    scores = torch.randint(0, 5, (64, 40), generator=torch.Generator().manual_seed(k)).float()
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(select_prune_mask(scores, k / 40, comparison="row"), expected)
    flat = torch.zeros(scores.numel(), dtype=torch.bool)  # and over the whole matrix (SparseGPT, ViT Wanda)
    flat[torch.sort(scores.flatten(), stable=True).indices[: k * 64]] = True
    assert torch.equal(select_prune_mask(scores, k / 40, comparison="matrix"), flat.reshape(64, 40))


@pytest.mark.parametrize("s", [0.1, 0.3, 0.77])
def test_row_comparison_meets_the_target_when_s_cin_is_fractional(s):
    scores = torch.rand(13, 37, generator=torch.Generator().manual_seed(0))
    mask = select_prune_mask(scores, s, comparison="row")
    k = math.floor(s * 37)
    per_row = mask.sum(1)
    assert ((per_row == k) | (per_row == k + 1)).all()
    assert mask.sum() == math.floor(s * 13 * 37)
    # and they are the lowest of each row
    kept_min = torch.where(mask, torch.inf, scores).min(1).values
    pruned_max = torch.where(mask, scores, -torch.inf).max(1).values
    assert (pruned_max <= kept_min).all()


def _fractional_by_sort(scores, s):
    """The fractional-row rule written with two stable sorts (the code before session 8): the first floor(s * C_in)
    of each row's sort, then position floor(s * C_in) of the sort in the rows whose value there is lowest."""
    rows, cols = scores.shape
    k, mask = int(s * cols), torch.zeros_like(scores, dtype=torch.bool)
    extra = int(s * scores.numel()) - k * rows
    order = torch.sort(scores, dim=1, stable=True)
    mask.scatter_(1, order.indices[:, :k], True)
    plus = torch.sort(order.values[:, k], stable=True).indices[:extra]
    mask[plus, order.indices[plus, k]] = True
    return mask


@pytest.mark.parametrize("s", [0.01, 0.3, 0.6, 0.77, 0.99])
def test_fractional_rows_equal_the_stable_sort_rule_ties_included(s):
    """The extra weight of the fractional rows is found by a row minimum, not a sort: the masks must be those of
    the sort, with scores drawn from 4 values (ties at the k-th and the next place in most rows, and between rows)
    and from a continuous draw."""
    g = torch.Generator().manual_seed(int(s * 100))
    for scores in (torch.randint(0, 4, (48, 37), generator=g).float(), torch.rand(48, 37, generator=g)):
        assert int(s * scores.numel()) > int(s * 37) * 48  # the fractional path
        assert torch.equal(select_prune_mask(scores, s, comparison="row"), _fractional_by_sort(scores, s))


def test_matrix_comparison_prunes_floor_s_numel():
    scores = torch.rand(13, 37, generator=torch.Generator().manual_seed(1))
    mask = select_prune_mask(scores, 0.45, comparison="matrix")
    assert mask.sum() == math.floor(0.45 * 13 * 37)
    assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_every_nm_group_has_exactly_n_zeros(method, nm):
    a = load_model("tiny-llama")
    n, m = parse_nm(nm)
    res = prune(a, nm=nm, method=method, calib_samples=8, batch_size=4, progress=False)
    assert res.report
    for row in res.report:
        W = a.model.get_parameter(row["name"]).detach()
        zeros = (W == 0).reshape(W.shape[0], -1, m).sum(-1)
        assert (zeros == n).all(), row["name"]


def test_sparsegpt_output_error_below_magnitude_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 8, generator=g)
    X = base @ torch.randn(8, 32, generator=g) + 0.05 * torch.randn(512, 32, generator=g)  # rank-8 + noise
    W = torch.randn(16, 32, generator=g)
    H = X.T @ X
    Ws, mask_s = sparsegpt_prune(W, H, 0.5)
    mask_m = select_prune_mask(W.abs(), 0.5, comparison="matrix")
    Wm = W.masked_fill(mask_m, 0)
    err_s = torch.linalg.norm(X @ W.T - X @ Ws.T)
    err_m = torch.linalg.norm(X @ W.T - X @ Wm.T)
    assert mask_s.sum() == mask_m.sum() == 256
    assert (Ws[mask_s] == 0).all()
    assert err_s < 0.5 * err_m


def test_sparsegpt_at_zero_sparsity_keeps_the_weights():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 16, generator=g)
    W = torch.randn(4, 16, generator=g)
    Ws, mask = sparsegpt_prune(W, X.T @ X, 0.0)
    assert not mask.any()
    torch.testing.assert_close(Ws, W)


def _block_layers(adapter, i):
    return adapter.pruned_blocks()[i].weights


def test_pruned_outputs_feed_the_next_block():
    """Block 1's masks come from block 0's *pruned* outputs (checked against a direct recomputation)."""
    a = load_model("tiny-llama")
    calib = a.calibration_samples(8, 0)
    l0, l1 = _block_layers(a, 0), _block_layers(a, 1)
    res_both = prune(a, {**{w: 0.7 for w in l0}, **{w: 0.5 for w in l1}}, calibration=calib, batch_size=4,
                     progress=False)
    b = load_model("tiny-llama")
    res_only1 = prune(b, {w: 0.5 for w in l1}, calibration=calib, batch_size=4, progress=False)
    differs = [w for w in l1 if not torch.equal(res_both.masks[w], res_only1.masks[w])]
    assert differs, "block 1's masks ignore the pruning of block 0"

    # Independent: prune block 0 only, then run the whole model and gather block 1's input norms directly.
    c = load_model("tiny-llama")
    prune(c, {w: 0.7 for w in l0}, calibration=calib, batch_size=4, progress=False)
    q = c.model.get_submodule(l1[0].rsplit(".", 1)[0])
    sq = torch.zeros(q.in_features)

    def gather(module, args):
        sq.add_((args[0].reshape(-1, args[0].shape[-1]) ** 2).sum(0))

    h = q.register_forward_pre_hook(gather)
    try:
        with torch.no_grad():
            for batch in c.batches(calib, 4):
                c.loss(batch)
    finally:
        h.remove()
    expected = ~select_prune_mask(wanda_scores(q.weight, sq), 0.5)
    assert torch.equal(res_both.masks[l1[0]], expected)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-blip2-opt", "tiny-blip2-t5", "tiny-clip"])
def test_sequential_replay_reproduces_the_dense_forward(name):
    """Replaying blocks from captured calls gives exactly what each block sees in a real forward pass."""
    a = load_model(name)
    batches = a.batches(a.calibration_samples(4, 0), 2)
    for stack in a.stacks():
        blocks = a.stack_blocks(stack)
        full = capture_calls(a, blocks, batches, keep_hidden="all", stop_after_last=False)
        for b, calls in enumerate(full):
            h = calls[0].hidden()
            for i, block in enumerate(blocks[:-1]):
                with torch.no_grad():
                    h = first_output(run_block(block, calls[i], h))
                torch.testing.assert_close(h, calls[i + 1].hidden(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-blip2-opt", "tiny-blip2-t5", "tiny-clip"])
def test_capture_that_skips_later_blocks_records_the_same_calls(name):
    """The fine stage's capture runs only the first block of a stack; every later block is still called with
    exactly the arguments (masks, position bias, encoder states, ...) a full forward gives it."""
    a = load_model(name)
    batches = a.batches(a.calibration_samples(4, 0), 2)
    for stack in a.stacks():
        blocks = a.stack_blocks(stack)
        full = capture_calls(a, blocks, batches, keep_hidden="first")
        short = capture_calls(a, blocks, batches, keep_hidden="first", skip_later=True)
        for per_full, per_short in zip(full, short, strict=True):
            assert torch.equal(per_full[0].hidden(), per_short[0].hidden())
            for cf, cs in zip(per_full, per_short, strict=True):
                assert same_call(cf, cs), (name, stack)
        # and the later blocks really did not compute after the first batch
        ran = []
        h = blocks[-1].module.register_forward_pre_hook(lambda m, a_: ran.append(1))
        try:
            calls = []
            for b in blocks[1:]:
                orig = b.module.forward
                b.module.forward = lambda *x, _o=orig, **k: (calls.append(1), _o(*x, **k))[1]
            capture_calls(a, blocks, batches, keep_hidden="first", skip_later=True)
        finally:
            h.remove()
            for b in blocks[1:]:
                del b.module.forward
        assert len(batches) > 1 and ran
        assert len(calls) == len(blocks) - 1  # only the first batch, captured in full to check the shortcut


class _ValueRoutedStack(torch.nn.Module):
    """A stack that hands each block a value computed from the previous block's output (as GLM-MoE-DSA's layers
    pass on their top-k indices): a capture that skips later blocks would record wrong arguments."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, h, route=None):
            out = torch.tanh(self.fc(h)) if route is None else torch.tanh(self.fc(h)) * route
            return out, out.detach().abs().mean(-1, keepdim=True)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(self.Layer() for _ in range(3))

    def forward(self, x):
        route = None
        for layer in self.layers:
            x, route = layer(x, route=route)
        return x


class _ValueRoutedAdapter(ModelAdapter):
    def build_blocks(self):
        return [Block(f"s.{i}", "s", "language", layer, [f"layers.{i}.fc.weight"])
                for i, layer in enumerate(self.model.layers)]

    def forward(self, batch):
        return self.model(batch["x"])


def test_prune_inside_inference_mode_gives_the_same_masks():
    """Inference tensors have no version counter; the statistics then simply do not share sums."""
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    outside = prune(a, 0.5, calib_samples=8, batch_size=4, progress=False)
    with torch.inference_mode():
        inside = prune(b, 0.5, method="sparsegpt", calib_samples=8, batch_size=4, progress=False)
        wanda_inside = prune(load_model("tiny-llama"), 0.5, calib_samples=8, batch_size=4, progress=False)
    assert all(torch.equal(outside.masks[k], wanda_inside.masks[k]) for k in outside.masks)
    assert inside.actual_sparsity == pytest.approx(0.5)


def test_capture_captures_in_full_when_later_arguments_depend_on_hidden_values():
    a = _ValueRoutedAdapter(_ValueRoutedStack(), "value-routed")
    batches = [{"x": torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(b))} for b in range(3)]
    full = capture_calls(a, a.blocks, batches, keep_hidden="first")
    guarded = capture_calls(a, a.blocks, batches, keep_hidden="first", skip_later=True)
    for per_full, per_guarded in zip(full, guarded, strict=True):
        assert all(same_call(f, g) for f, g in zip(per_full, per_guarded))
    # what the guard protects against: the pass-through alone hands block 2 block 0's route
    from ecoflap_utils.capture import _capture
    unguarded = _capture(a, a.blocks, batches[:1], "first", True, skip=True)
    assert not same_call(full[0][2], unguarded[0][2])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-blip2-opt", "tiny-blip2-t5", "tiny-clip"])
@pytest.mark.parametrize("kind", ["wanda", "sparsegpt"])
def test_statistics_pass_cut_short_gives_the_same_statistics(name, kind):
    """The fine stage stops a block's statistics pass once its last pruned layer saw its input; the sums (and
    X^T X) are bit-identical to a full pass, and the rest of the block really is skipped."""
    from ecoflap_utils.capture import StopForward
    from ecoflap_utils.stats import input_statistics

    a = load_model(name)
    batches = a.batches(a.calibration_samples(4, 0), 2)
    for stack in a.stacks():
        blocks = a.stack_blocks(stack)
        calls = capture_calls(a, blocks, batches, keep_hidden="all", stop_after_last=False)
        for i in (0, len(blocks) - 1):
            block, layers = blocks[i], blocks[i].weights
            with input_statistics(a.model, layers, kind) as full, torch.no_grad():
                for c in calls:
                    run_block(block, c[i])
            outputs = []
            h = block.module.register_forward_hook(lambda m, args, out: outputs.append(1))
            try:
                with input_statistics(a.model, layers, kind, stop_when_seen=True) as short, torch.no_grad():
                    for c in calls:
                        with pytest.raises(StopForward):
                            run_block(block, c[i])
            finally:
                h.remove()
            assert not outputs  # no pass reached the block's end
            for w in layers:
                assert short[w].tokens == full[w].tokens > 0
                assert torch.equal(short[w].sq, full[w].sq), (name, w)
                if kind == "sparsegpt":
                    assert torch.equal(short[w].H, full[w].H), (name, w)


def test_layers_fed_one_input_get_its_sums_computed_once_and_right():
    """q/k/v (and gate/up) of a LLaMA block see one tensor: the statistics reuse one X^T X, and it equals the
    sums taken independently from what reaches each projection."""
    from ecoflap_utils.stats import input_statistics

    a = load_model("tiny-llama")
    block = a.stack_blocks("lm")[0]
    batches = a.batches(a.calibration_samples(4, 0), 2)
    seen: dict[str, list] = {}
    mods = {w: a.model.get_submodule(w.rsplit(".", 1)[0]) for w in block.weights}
    handles = [m.register_forward_pre_hook(lambda m, args, w=w: seen.setdefault(w, []).append(args[0].detach()))
               for w, m in mods.items()]
    matmuls = []
    try:
        with input_statistics(a.model, block.weights, "sparsegpt") as st, torch.no_grad():
            real_matmul = torch.Tensor.__matmul__
            torch.Tensor.__matmul__ = lambda x, y: (matmuls.append(1), real_matmul(x, y))[1]
            try:
                for batch in batches:
                    a.forward(batch)
            finally:
                torch.Tensor.__matmul__ = real_matmul
    finally:
        for h in handles:
            h.remove()
    for w in block.weights:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[w]])
        torch.testing.assert_close(st[w].H, x.T @ x, rtol=1e-5, atol=1e-4)
        assert st[w].tokens == x.shape[0]
        assert torch.equal(st[w].sq, sum((t.reshape(-1, t.shape[-1]) ** 2).sum(0) for t in seen[w]))
    q, k, v = (next(w for w in block.weights if f".{p}_proj." in w) for p in "qkv")
    assert torch.equal(st[q].H, st[k].H) and torch.equal(st[q].H, st[v].H)
    distinct_inputs = 4  # q/k/v, o, gate/up, down
    assert len(matmuls) == distinct_inputs * len(batches)


def test_every_t5_block_receives_its_position_bias():
    a = load_model("tiny-blip2-t5")
    batches = a.batches(a.calibration_samples(4, 0), 2)
    for stack in ("text_encoder", "text_decoder"):
        blocks = a.stack_blocks(stack)
        calls = capture_calls(a, blocks, batches, keep_hidden="first")
        for per_batch in calls:
            assert per_batch[0].args[2] is None  # block 0 computes the bias itself
            biases = [c.args[2] for c in per_batch[1:]]
            assert all(isinstance(b, torch.Tensor) for b in biases)
            # the bias block 0 returns is the one every later block gets
            out = run_block(blocks[0], per_batch[0])
            for bias in biases:
                assert torch.equal(bias, out[1])


def test_nan_in_calibration_statistics_is_an_error():
    a = load_model("tiny-llama")
    w = a.pruned_blocks()[0].weights[-1]  # down_proj of block 0
    with torch.no_grad():
        a.model.get_parameter(w)[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite"):
        prune(a, 0.5, calib_samples=4, batch_size=2, progress=False)


@pytest.mark.parametrize("bad,match", [
    (dict(sparsity=1.0), r"\[0, 1\)"),
    (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(sparsity=0.5, nm="4:2"), "0 < N < M"),
    (dict(sparsity=0.6, nm="2:4"), "prunes exactly 0.5"),
    (dict(sparsity=0.5, method="obs"), "unknown method"),
    (dict(sparsity={"model.layers.0.nope.weight": 0.5}), "does not have"),
    (dict(sparsity=0.5, threads=0), "threads must be a positive whole number"),
])
def test_bad_input_is_refused(bad, match):
    a = load_model("tiny-llama")
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    with pytest.raises(UserError, match=match):
        prune(a, **{"calib_samples": 4, **bad})
    assert all(torch.equal(before[k], v) for k, v in a.model.state_dict().items())


def test_sparsity_dict_prunes_only_its_layers():
    a = load_model("tiny-opt")
    layers = _block_layers(a, 2)
    res = prune(a, {layers[0]: 0.25, layers[1]: 0.75}, calib_samples=8, progress=False)
    assert {r["name"]: r["actual_sparsity"] for r in res.report} == {layers[0]: 0.25, layers[1]: 0.75}
    other = _block_layers(a, 0)[0]
    assert (a.model.get_parameter(other) != 0).all()


@pytest.mark.parametrize("s", [0.5, 0.6])
def test_inf_and_nan_scores_keep_the_stable_sort_order(s):
    """Scores that overflow (inf) or come out NaN (0 * inf) are ordered as the stable sort orders them (NaN last),
    on the whole-k path (0.5 of 6 columns) and the fractional one (0.6), rows of all-inf included."""
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[1.0, nan, 2.0, 0.5, inf, 3.0], [inf, inf, inf, inf, inf, inf],
                           [0.0, 5.0, nan, nan, 6.0, -1.0], [2.0, 2.0, 1.0, inf, 1.0, 0.0]])
    rows, cols = scores.shape
    k, extra = int(s * cols), int(s * scores.numel()) - int(s * cols) * rows
    order = torch.sort(scores, dim=1, stable=True)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order.indices[:, :k], True)
    if extra > 0:
        plus = torch.sort(order.values[:, k], stable=True).indices[:extra]
        expected[plus, order.indices[plus, k]] = True
    got = select_prune_mask(scores, s, comparison="row")
    assert torch.equal(got, expected) and int(got.sum()) == int(s * scores.numel())

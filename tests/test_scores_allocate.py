"""Coarse stage: scores agree with exact gradients, weights are restored bit-exactly, allocation invariants."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ecoflap_utils import UserError, load_model, prune
from ecoflap_utils.allocate import allocate_sparsity, expand_to_layers, load_sparsity_dict, owl_sparsity
from ecoflap_utils.cli import main
from ecoflap_utils.scores import (PrefixCache, _first_block_index, _jvp, _math_attention,
                                  compute_scores, owl_outlier_ratios, score_groups, unit_noise)


@pytest.mark.parametrize("seed", [0, 1])
def test_zeroth_order_block_scores_rank_like_exact_gradient_norms(seed):
    """128 calibration samples in batches of 8 (16 batches), 4 noise directions per batch, tiny-llama."""
    a = load_model("tiny-llama")
    calib = a.calibration_samples(128, seed)
    exact = compute_scores(a, "first", calib, variant="grad_norm", progress=False)
    zeroth = compute_scores(a, "zeroth", calib, perturb="group", num_noise=4, seed=seed, progress=False)
    g = list(exact)
    assert len(g) == 4
    assert spearmanr([exact[k] for k in g], [zeroth[k] for k in g])[0] >= 0.9
    # E|z . g| = sqrt(2/pi) ||g||: the estimate is on the scale of the gradient norm
    ratio = sum(zeroth.values()) / sum(exact.values())
    assert 0.5 < ratio < 1.1


def test_zeroth_order_layer_scores_rank_like_exact_gradient_norms():
    a = load_model("tiny-llama")
    calib = a.calibration_samples(64, 0)
    exact = compute_scores(a, "first", calib, variant="grad_norm", granularity="layer", progress=False)
    zeroth = compute_scores(a, "zeroth", calib, perturb="group", granularity="layer", num_noise=2, progress=False)
    g = list(exact)
    assert len(g) == 28
    assert spearmanr([exact[k] for k in g], [zeroth[k] for k in g])[0] >= 0.9


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-clip", "tiny-blip2-t5"])
def test_jvp_matches_autograd_directional_derivative(name):
    a = load_model(name)
    batch = a.batches(a.calibration_samples(8, 0), 8)[0]
    for block in (a.pruned_blocks()[0], a.pruned_blocks()[-1]):
        params = [a.model.get_parameter(w) for w in block.weights]
        z = unit_noise(params, 7)
        a.model.zero_grad()
        a.loss(batch).backward()
        exact = sum((p.grad * t).sum() for p, t in zip(params, z)).item()
        a.model.zero_grad()
        with _math_attention(a, True):
            j = _jvp(a, batch, block.weights, 7)
        assert j == pytest.approx(exact, rel=1e-4, abs=1e-9), block.name


def test_cached_prefix_gives_the_same_estimate_as_a_full_forward():
    a = load_model("tiny-blip2-t5")
    calib = a.calibration_samples(16, 0)
    cached = compute_scores(a, "zeroth", calib, perturb="group", cache=True, progress=False)
    full = compute_scores(a, "zeroth", calib, perturb="group", cache=False, progress=False)
    for g in full:
        assert cached[g] == pytest.approx(full[g], rel=1e-5, abs=1e-6)


def test_cached_prefix_skips_the_vision_encoder_when_perturbing_the_language_model():
    a = load_model("tiny-blip2-opt")
    batches = a.batches(a.calibration_samples(4, 0), 4)
    cache = PrefixCache(a, batches)
    calls = []
    handles = [b.module.register_forward_pre_hook(lambda m, args, n=b.name: calls.append(n))
               for b in a.stack_blocks("vision")]
    lm_block = a.stack_blocks("lm")[1]
    try:
        with cache.prefix(0, _first_block_index(a, lm_block.weights)):
            with torch.no_grad():
                stubbed = a.loss(batches[0])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        dense = a.loss(batches[0])
    assert torch.equal(stubbed, dense)
    # hooks fire, but the stubbed blocks return cached outputs; check no vision block *computed*:
    # perturbing an LM block leaves the loss identical only if the vision outputs are the cached ones
    params = [a.model.get_parameter(w) for w in a.stack_blocks("vision")[0].weights]
    with cache.prefix(0, _first_block_index(a, lm_block.weights)):
        from ecoflap_utils.scores import perturbed
        with perturbed(params, 0, 1.0), torch.no_grad():
            assert torch.equal(a.loss(batches[0]), dense)  # vision perturbation invisible: it never ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,perturb", [("zeroth", "tensor"), ("zeroth", "group"), ("jvp", "group"),
                                            ("first", "group")])
def test_weights_are_bit_identical_after_scoring(dtype, method, perturb):
    if method in ("jvp", "first") and dtype != torch.float32:
        pytest.skip("checked in float32")
    a = load_model("tiny-llama", dtype=dtype)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in a.model.named_parameters()}
    compute_scores(a, method, a.calibration_samples(8, 0), perturb=perturb, progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert {n: p.requires_grad for n, p in a.model.named_parameters()} == grads_before
    assert all(p.grad is None for p in a.model.parameters())


def test_every_group_sees_the_same_batches():
    a = load_model("tiny-llama")
    seen = {}
    orig = a.loss

    def spy(batch):
        seen.setdefault("ids", set()).add(batch["input_ids"].sum().item())
        return orig(batch)

    a.loss = spy
    compute_scores(a, "zeroth", a.calibration_samples(16, 0), perturb="group", progress=False)
    assert len(seen["ids"]) == 2  # 16 samples / 8 per batch, the same two batches for every group


def test_magnitude_scores_and_granularities():
    a = load_model("tiny-blip2-t5")
    s = compute_scores(a, "magnitude", granularity="module")
    assert list(s) == ["vision", "text_encoder", "text_decoder"]
    direct = sum(a.model.get_parameter(w).abs().sum().item() for b in a.stack_blocks("vision") for w in b.weights)
    assert s["vision"] == pytest.approx(direct, rel=1e-5)
    assert len(score_groups(a, "layer")) == len(a.layer_names())


@pytest.mark.parametrize("kw,match", [
    (dict(method="second"), "unknown score method"),
    (dict(granularity="head"), "unknown granularity"),
    (dict(eps=0.0), "eps must be"),
    (dict(eps=-1e-3), "eps must be"),
    (dict(perturb="row"), "unknown perturbation"),
])
def test_bad_score_arguments(kw, match):
    a = load_model("tiny-llama")
    with pytest.raises(UserError, match=match):
        compute_scores(a, **{"method": "zeroth", **kw})


# --------------------------------------------------------------------------- allocation
def _random_case(seed, groups=12):
    rng = np.random.default_rng(seed)
    sizes = {f"g{i}": int(rng.integers(50, 5000)) for i in range(groups)}
    scores = {g: float(rng.lognormal(0, 1.5)) for g in sizes}
    return scores, sizes


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_ecoflap_allocation_hits_the_total_and_respects_the_cap(seed, target):
    scores, sizes = _random_case(seed)
    sp = allocate_sparsity(scores, sizes, target)
    N = sum(sizes.values())
    kept = sum(round((1 - sp[g]) * sizes[g]) for g in sizes)
    assert abs(kept - int(N * (1 - target))) <= len(sizes)
    assert kept == int(N * (1 - target))  # in fact exact
    assert max(sp.values()) <= target + 0.1 + 1e-12
    assert min(sp.values()) >= 0.0


def test_a_higher_scored_group_of_equal_size_never_gets_a_higher_sparsity():
    rng = np.random.default_rng(3)
    for _ in range(200):
        sizes = {f"g{i}": 1000 for i in range(8)}
        scores = {g: float(rng.lognormal(0, 2)) for g in sizes}
        sp = allocate_sparsity(scores, sizes, float(rng.uniform(0.2, 0.8)))
        order = sorted(sizes, key=lambda g: scores[g])
        assert all(sp[a] >= sp[b] for a, b in zip(order, order[1:]))


def test_scores_proportional_to_size_give_uniform():
    sizes = {"a": 1000, "b": 3000, "c": 600, "d": 2048}
    scores = {g: 2.5 * n for g, n in sizes.items()}
    sp = allocate_sparsity(scores, sizes, 0.6)
    for g, n in sizes.items():
        assert abs(sp[g] - 0.6) <= 1.0 / n + 1e-12


def test_full_groups_pass_their_share_on():
    sizes = {"big": 1000, "small1": 1000, "small2": 1000}
    scores = {"big": 1000.0, "small1": 1.0, "small2": 1.0}
    sp = allocate_sparsity(scores, sizes, 0.5, max_sparsity=0.9)
    assert sp["big"] == 0.0  # keeps everything
    assert sp["small1"] == pytest.approx(0.75) and sp["small2"] == pytest.approx(0.75)


def test_allocation_bad_input():
    sizes = {"a": 10, "b": 10}
    with pytest.raises(UserError, match="below the target"):
        allocate_sparsity({"a": 1.0, "b": 2.0}, sizes, 0.5, max_sparsity=0.4)
    with pytest.raises(UserError, match="all 2 group scores are zero"):
        allocate_sparsity({"a": 0.0, "b": 0.0}, sizes, 0.5)
    with pytest.raises(UserError, match=r"non-finite.*\['b'\]"):
        allocate_sparsity({"a": 1.0, "b": float("nan")}, sizes, 0.5)
    with pytest.raises(UserError, match="unknown allocation"):
        allocate_sparsity({"a": 1.0, "b": 1.0}, sizes, 0.5, method="lamp")


def test_owl_keeps_the_total_and_favours_outlier_rich_groups():
    sizes = {"a": 100, "b": 300, "c": 200}
    ratios = {"a": 0.01, "b": 0.05, "c": 0.03}
    sp = owl_sparsity(ratios, sizes, 0.6, owl_lambda=0.08)
    kept = sum((1 - sp[g]) * sizes[g] for g in sizes)
    assert kept == pytest.approx(0.4 * 600)
    assert sp["a"] > sp["c"] > sp["b"]
    assert max(sp.values()) - min(sp.values()) == pytest.approx(0.16)


def test_owl_outlier_ratios_from_a_real_forward():
    a = load_model("tiny-llama")
    r = owl_outlier_ratios(a, a.calibration_samples(8, 0), m=5.0)
    assert list(r) == [b.name for b in a.pruned_blocks()]
    assert all(0.0 <= v < 0.5 for v in r.values())
    r2 = owl_outlier_ratios(a, a.calibration_samples(8, 0), m=2.0)
    assert all(r2[g] >= r[g] for g in r)


def test_saved_sparsity_dict_passed_back_gives_the_same_masks(tmp_path):
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert main(["prune", "--model", "tiny-llama", "--allocation", "ecoflap", "--scores", "zeroth",
                 "--sparsity", "0.6", "--out", str(out1), "--no-progress", "--calib-samples", "16"]) == 0
    sd = load_sparsity_dict(out1 / "sparsity_dict.json")
    assert len(set(round(v, 6) for v in sd.values())) > 1  # non-uniform
    assert main(["prune", "--model", "tiny-llama", "--sparsity-dict", str(out1 / "sparsity_dict.json"),
                 "--out", str(out2), "--no-progress", "--calib-samples", "16"]) == 0
    a1, a2 = load_model(str(out1)), load_model(str(out2))
    for name in sd:
        assert torch.equal(a1.model.get_parameter(name) == 0, a2.model.get_parameter(name) == 0)


def test_cli_ecoflap_on_tiny_blip2_t5(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--model", "tiny-blip2-t5", "--allocation", "ecoflap", "--scores", "zeroth",
                 "--sparsity", "0.6", "--out", str(out), "--no-progress"]) == 0
    table = json.loads((out / "scores.json").read_text())["groups"]
    vis = {round(v["sparsity"], 4) for v in table.values() if v["modality"] == "vision"}
    lang = {round(v["sparsity"], 4) for v in table.values() if v["modality"] == "language"}
    assert vis and lang and vis != lang
    assert max(v["sparsity"] for v in table.values()) <= 0.7 + 1e-9
    for v in table.values():
        assert {"score", "stderr", "size", "stack", "modality", "sparsity"} <= set(v)
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert abs(cfg["actual_sparsity"] - 0.6) <= 0.005
    res = json.loads((out / "resources.json").read_text())
    assert {"scores", "allocation", "fine"} <= set(res["stages"])


@pytest.mark.parametrize("flags,match", [
    (["--eps", "0"], "--eps must be > 0"),
    (["--max-sparsity", "0.5"], "below the target"),
    (["--scores", "second"], "unknown score method"),
    (["--granularity", "head"], "unknown granularity"),
    (["--allocation", "ecoflap", "--nm", "2:4", "--sparsity", "0.5"], "N:M"),
])
def test_cli_coarse_bad_input(flags, match, tmp_path, capsys):
    args = ["prune", "--model", "tiny-llama", "--allocation", "ecoflap", "--out", str(tmp_path / "o"), "--no-progress"]
    if "--sparsity" not in flags:
        args += ["--sparsity", "0.6"]
    assert main(args + flags) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_expand_to_layers_and_prune_follow_the_allocation():
    a = load_model("tiny-opt")
    groups = score_groups(a, "block")
    gs = {g: s for g, s in zip(groups, [0.3, 0.5, 0.6, 0.8])}
    res = prune(a, expand_to_layers(gs, groups), calib_samples=8, progress=False)
    by_block = {}
    for r in res.report:
        by_block.setdefault(r["block"], []).append(r["actual_sparsity"])
    for g, s in gs.items():
        assert all(abs(x - s) < 0.01 for x in by_block[g])


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-blip2-opt", "tiny-clip", "tiny-llama"])
@pytest.mark.parametrize("perturb", ["tensor", "group"])
def test_cached_prefix_matches_full_forward_on_every_family(name, perturb):
    a = load_model(name)
    calib = a.calibration_samples(8, 1)
    cached = compute_scores(a, "zeroth", calib, perturb=perturb, batch_size=4, cache=True, progress=False)
    full = compute_scores(a, "zeroth", calib, perturb=perturb, batch_size=4, cache=False, progress=False)
    for g in full:
        assert cached[g] == pytest.approx(full[g], rel=1e-4, abs=1e-5), g

"""ecoflap_utils.lessons: the helpers of notebooks 01-03, on tiny models and the bundled official files."""
import math
from collections import Counter

import pytest
import torch

from ecoflap_utils import lessons
from ecoflap_utils.scores import estimate_scores, score_groups


def test_exact_gradient_norms_match_an_independent_backward(llama):
    calib = llama.calibration_samples(16, 0)
    ref = lessons.exact_gradient_norms(llama, calib, batch_size=8)
    groups = score_groups(llama, "block")
    batches = llama.batches(calib, 8)
    assert len(ref[lessons.SUM_OF_TENSOR_NORMS]) == len(batches) == 2
    for b, batch in enumerate(batches):
        llama.model.zero_grad(set_to_none=True)
        llama.loss(batch).backward()  # every parameter, not only the scored ones
        for g, ws in groups.items():
            norms = [llama.model.get_parameter(w).grad.norm().item() for w in ws]
            assert ref[lessons.SUM_OF_TENSOR_NORMS][b][g] == pytest.approx(sum(norms), rel=1e-5)
            assert ref[lessons.GROUP_NORM][b][g] == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-5)
    llama.model.zero_grad(set_to_none=True)
    # and the group norm is what the package's exact first-order grad_norm variant computes
    first = estimate_scores(llama, "first", calib, variant="grad_norm", batch_size=8, progress=False)
    ours = lessons.prefix_sum(ref[lessons.GROUP_NORM], 2)
    assert all(ours[g] == pytest.approx(first.scores[g], rel=1e-5) for g in groups)
    assert all(not p.requires_grad or p.grad is None for p in llama.model.parameters())


def test_prefix_sum_spearman_and_batches_for():
    pb = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 0.5}]
    assert lessons.prefix_sum(pb, 1) == {"a": 1.0, "b": 2.0} and lessons.prefix_sum(pb, 2) == {"a": 4.0, "b": 2.5}
    assert lessons.spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == pytest.approx(1.0)
    assert lessons.spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == pytest.approx(-1.0)
    assert lessons.batches_for([8, 16, 32], 8) == [1, 2, 4]
    with pytest.raises(Exception, match="multiples"):
        lessons.batches_for([12], 8)
    assert lessons.max_relative_difference({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.0}) == pytest.approx(0.5)


def test_compare_estimators_prefix_scores_equal_a_run_on_fewer_samples(llama):
    calib = llama.calibration_samples(16, 0)
    rows, runs = lessons.compare_estimators(llama, calib, [8, 16], batch_size=8)
    assert {(r["estimator"], r["samples"]) for r in rows} >= {("zeroth per tensor", 8), ("zeroth per group", 16)}
    assert len(rows) == 2 * (1 + 2 * 2)
    assert all(-1 <= r["spearman"] <= 1 for r in rows)
    # the 8-sample score is the first batch of the 16-sample run: the same as running on the first 8 only
    short = estimate_scores(llama, "zeroth", calib[:8], perturb="tensor", batch_size=8, progress=False)
    prefix = lessons.prefix_sum(runs["tensor"].per_batch, 1)
    assert all(prefix[g] == pytest.approx(short.scores[g], rel=1e-6) for g in short.scores)
    assert set(runs["cost"]) == {"exact", "tensor", "group"}


def test_difference_agreement_counts_forwards(llama):
    calib = llama.calibration_samples(8, 0)
    rows, res = lessons.difference_agreement(llama, calib, [1e-3], perturb="tensor", batch_size=8)
    (r,) = rows
    units = sum(len(ws) for ws in score_groups(llama, "block").values())
    # both fill the prefix cache with one dense forward, which also gives the forward difference its L(W)
    assert r["forwards (forward)"] == units + 1 and r["forwards (central)"] == 2 * units + 1
    assert r["spearman"] > 0.9 and r["max_rel_diff"] < 0.2
    again, _ = lessons.difference_agreement(llama, calib, [1e-3], perturb="tensor", batch_size=8,
                                            forward=res["forward eps=0.001"])
    assert again[0]["spearman"] == pytest.approx(r["spearman"])


def test_cost_of_methods_and_scatter(llama):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, res = lessons.cost_of_methods(llama, llama.calibration_samples(8, 0), paper_units=3)
    assert [r["method"] for r in rows][-1].startswith("paper's code")
    assert rows[-1]["timed_units"].startswith("3 of ")
    assert all(r["wall_s"] > 0 and math.isfinite(r["peak_delta_mb"]) for r in rows)
    plain, low = res["first (plain)"].scores, res["first (low memory)"].scores
    assert lessons.max_relative_difference(plain, low) < 1e-5
    fig, ax = plt.subplots()
    lessons.cost_scatter(ax, rows)
    assert len(ax.texts) == len(rows)
    plt.close(fig)


def test_allocation_by_estimator_and_modality_sparsity(blip_t5):
    groups = score_groups(blip_t5, "block")
    a = {g: float(i + 1) for i, g in enumerate(groups)}
    b = {g: float(len(groups) - i) for i, g in enumerate(groups)}
    rows = lessons.allocation_by_estimator(blip_t5, {"per tensor": a, "per group": b}, 0.6)
    assert len(rows) == 2 * len(groups)
    means = lessons.modality_sparsity(rows)
    for est in ("per tensor", "per group"):
        sub = [r for r in rows if r["estimator"] == est]
        total = sum(r["sparsity"] * r["size"] for r in sub) / sum(r["size"] for r in sub)
        assert total == pytest.approx(0.6, abs=1e-3)  # the budget is exact
        assert set(means[est]) == {"vision", "language"}
        assert all(r["sparsity"] <= 0.7 + 1e-9 for r in sub)
    assert means["per tensor"]["vision"] != pytest.approx(means["per group"]["vision"])


def test_official_local_scores_group_by_modality_in_plot_order():
    for method in ("wanda", "sparsegpt"):
        rows = lessons.official_local_scores(method)
        assert len(rows) == 588
        assert Counter(r["modality"] for r in rows) == {"vision": 156, "language": 432}
        assert Counter(r["stack"] for r in rows) == {"visual_encoder": 39 * 4, "t5_encoder": 24 * 7, "t5_decoder": 24 * 11}
        assert [r["layer"] for r in rows] == list(range(588))
        assert rows[0]["name"] == "visual_encoder.blocks.0.attn.qkv.weight"
        assert rows[155]["name"].startswith("visual_encoder.blocks.38.")
        assert rows[156]["name"].startswith("t5_model.encoder.block.0.")
        assert rows[-1]["name"].startswith("t5_model.decoder.block.23.")
        assert all(r["score"] > 0 and math.isfinite(r["score"]) for r in rows)
    with pytest.raises(Exception, match="neither"):
        lessons.lavis_modality("Qformer.bert.encoder.layer.0.output.dense.weight")


def test_local_wanda_scores_follow_the_official_definition(blip_t5):
    calib = blip_t5.calibration_samples(8, 0)
    before = {k: v.clone() for k, v in blip_t5.model.state_dict().items()}
    scores = lessons.local_wanda_scores(blip_t5, calib, sparsity=0.5, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in blip_t5.model.state_dict().items())  # restored
    assert list(scores) == blip_t5.layer_names()
    # the first block's inputs are dense: recompute its scores as the authors' WrappedGPT does, batch by batch
    from ecoflap_utils.stats import input_statistics

    first = blip_t5.pruned_blocks()[0]
    scaler = {w: torch.zeros(blip_t5.model.get_parameter(w).shape[1]) for w in first.weights}
    nsamples = {w: 0 for w in first.weights}
    for batch in blip_t5.batches(calib, 4):
        with input_statistics(blip_t5.model, list(first.weights), "wanda") as st, torch.no_grad():
            blip_t5.forward(batch)
        n = len(batch["image"]) if isinstance(batch, dict) and "image" in batch else 4
        for w in first.weights:  # scaler_row *= n_old / n_new; scaler_row += ||x||^2 / n_new
            scaler[w] *= nsamples[w] / (nsamples[w] + n)
            nsamples[w] += n
            scaler[w] += st[w].sq / nsamples[w]
    for w in first.weights:
        W = blip_t5.model.get_parameter(w).detach().float()
        expected = float((W.abs() * scaler[w].sqrt().unsqueeze(0)).mean())
        assert scores[w] == pytest.approx(expected, rel=1e-4)
    rows = lessons.local_score_rows(blip_t5, scores)
    assert {r["modality"] for r in rows} == {"vision", "language"}
    med = lessons.modality_medians(rows)
    assert med["vision_over_language"] == pytest.approx(med["vision_median"] / med["language_median"])


def test_notebook02_records_are_sound_and_skip_non_finite():
    from ecoflap_utils.scores import ScoreResult

    agreement = [{"estimator": "zeroth per tensor", "reference": lessons.SUM_OF_TENSOR_NORMS, "samples": 8, "spearman": 0.5},
                 {"estimator": "zeroth per group", "reference": lessons.GROUP_NORM, "samples": 8, "spearman": float("nan")}]
    diffs = [{"perturb": "tensor", "eps": 1e-3, "spearman": 1.0, "max_rel_diff": 0.02, "forwards (forward)": 29,
              "forwards (central)": 56}]
    costs = [{"method": "first (low memory)", "wall_s": 0.1, "peak_delta_mb": 2.0, "memory_kind": "process_rss",
              "passes": "1 fwd+bwd", "timed_units": "all"}]
    recs = lessons.notebook02_records("m", agreement, diffs, costs, ScoreResult({"a": 1.0}, stability=0.9, split="x"),
                                      samples=8, low_memory_diff=0.0)
    assert [r["task"] for r in recs] == ["score_agreement"] * 2 + ["finite_difference", "cost", "stability"]
    assert recs[1]["metrics"] == {}  # nan left out
    assert recs[2]["metrics"]["forwards_central"] == 56 and recs[2]["config"]["eps"] == 1e-3
    assert recs[3]["metrics"]["max_rel_diff"] == 0.0
    assert all({"model", "method", "sparsity", "task", "metrics", "resources", "config"} <= set(r) for r in recs)
    none = lessons.notebook02_records("m", [], [], [], ScoreResult({"a": 1.0}), samples=8)
    assert none == []

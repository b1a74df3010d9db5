"""Models spread over devices by accelerate (issue 19, part 3), on the CPU.

Two placements with accelerate's real hooks, each against the plain model:
* *dispatched*: ``load_model(name, device_map=MAP)`` with one entry per block (and per other module), every
  entry on the CPU: ``dispatch_model`` puts an ``AlignDevicesHook`` on every block, as on several GPUs;
* *offloaded*: the second half of each stack's blocks offloaded the way ``dispatch_model`` offloads modules
  mapped to ``"cpu"`` next to a GPU (parameters on ``meta``, values in an ``OffloadedWeightsLoader``), with
  the CPU as the execution device. Any code that reads or writes ``model.get_parameter`` instead of where the
  values live fails here.
Masks, SparseGPT's updated weights, coarse-stage scores and a masked fine-tuning step must equal the plain
model's exactly.
"""
import json

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, attach_align_device_hook_on_blocks
from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict

from ecoflap_utils import UserError, load_model, prune
from ecoflap_utils.coarse import coarse_stage
from ecoflap_utils.finetune import finetune
from ecoflap_utils.models.devices import weight_tensor
from ecoflap_utils.scores import estimate_scores

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The following device_map keys:UserWarning"),
              pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules:UserWarning")]

MODELS = ["tiny-llama", "tiny-blip2-t5"]


def block_map(adapter, device="cpu") -> dict:
    """A device map with one entry per block and one per other module or loose tensor (never a block's parent)."""
    blocks = {id(b.module) for b in adapter.blocks}
    out = {}

    def walk(prefix, module):
        for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out[f"{prefix}{n}"] = device
        for n, child in module.named_children():
            if id(child) in blocks or not any(id(m) in blocks for m in child.modules()):
                if len(child.state_dict()):
                    out[f"{prefix}{n}"] = device
            else:
                walk(f"{prefix}{n}.", child)

    walk("", adapter.model)
    return out


def module_names(adapter) -> dict:
    ids = {id(m): n for n, m in adapter.model.named_modules()}
    return {b.name: ids[id(b.module)] for b in adapter.blocks}


def dispatched(name):
    adapter = load_model(name, device_map=block_map(load_model(name)))
    paths = module_names(adapter)
    assert set(paths.values()) <= set(adapter.model.hf_device_map)  # one entry per block
    for b in adapter.blocks:  # the hooks are really there, and really accelerate's
        assert isinstance(b.module._hf_hook, AlignDevicesHook), b.name
        assert b.module._hf_hook.execution_device is not None
    return adapter


def offloaded(name):
    """dispatch_model's steps for a map with "cpu" next to a GPU (accelerate big_modeling.py, dispatch_model:
    state dict of the CPU modules, OffloadedWeightsLoader, attach_align_device_hook_on_blocks), with the CPU as
    the execution device; the second half of each stack's blocks is offloaded."""
    adapter = load_model(name)
    model = adapter.model
    dm = block_map(adapter)
    paths = module_names(adapter)
    off = []
    for stack in adapter.stacks():
        blocks = adapter.stack_blocks(stack)
        off += [paths[b.name] for b in blocks[len(blocks) // 2:]]
    weights = OffloadedWeightsLoader(state_dict=extract_submodules_state_dict(model.state_dict(), off))
    attach_align_device_hook_on_blocks(model, execution_device={**{k: "cpu" for k in dm}, "": "cpu"},
                                       offload={k: k in off for k in dm}, weights_map=weights,
                                       preload_module_classes=["MultiheadAttention"])  # as devices.dispatch
    model.hf_device_map = dm  # as from_pretrained records it (save_pretrained reads offloaded weights by it)
    names = [w for b in adapter.blocks if paths[b.name] in off for w in b.weights]
    assert names and all(model.get_parameter(w).device.type == "meta" for w in names)
    return adapter, names


def place(name, placement):
    return dispatched(name) if placement == "dispatched" else offloaded(name)[0]


def values(adapter) -> dict:
    return {w: weight_tensor(adapter.model, w).detach().clone() for w in adapter.layer_names(adapter.stacks())}


@pytest.mark.parametrize("placement", ["dispatched", "offloaded"])
@pytest.mark.parametrize("name", MODELS)
def test_hooked_models_compute_the_plain_loss(name, placement):
    plain, hooked = load_model(name), place(name, placement)
    batch = plain.batches(plain.calibration_samples(2, 0), 2)[0]
    with torch.no_grad():
        assert torch.equal(plain.loss(batch), hooked.loss(batch))


@pytest.mark.parametrize("placement", ["dispatched", "offloaded"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("name", MODELS)
def test_prune_gives_the_plain_masks_and_weights(name, method, placement):
    plain, hooked = load_model(name), place(name, placement)
    kw = dict(method=method, calib_samples=8, batch_size=4, progress=False)
    ref, got = prune(plain, 0.5, **kw), prune(hooked, 0.5, **kw)
    assert ref.masks and set(got.masks) == set(ref.masks)
    for w in ref.masks:
        assert torch.equal(got.masks[w], ref.masks[w]), w
    a, b = values(plain), values(hooked)  # SparseGPT's updates too, written where the values live
    assert all(torch.equal(a[w], b[w]) for w in a)
    assert got.actual_sparsity == ref.actual_sparsity > 0.4
    if placement == "offloaded":  # still offloaded: nothing was materialised on the parameters
        assert any(hooked.model.get_parameter(w).device.type == "meta" for w in a)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_multihead_attention_prunes_to_the_plain_masks(method):
    """open_clip keeps q, k, v in nn.MultiheadAttention, whose out_proj input is recomputed from its weights
    (``stats.input_tap``): with them offloaded they are read where they live."""
    plain, (hooked, names) = load_model("tiny-clip"), offloaded("tiny-clip")
    assert any(n.endswith("in_proj_weight") for n in names)
    kw = dict(method=method, calib_samples=8, batch_size=4, progress=False)
    ref, got = prune(plain, 0.5, **kw), prune(hooked, 0.5, **kw)
    assert ref.masks and all(torch.equal(got.masks[w], ref.masks[w]) for w in ref.masks)


def test_a_pruned_offloaded_model_saves_its_pruned_values(tmp_path):
    from ecoflap_utils.io import load_pruned, save_pruned

    plain, (hooked, names) = load_model("tiny-llama"), offloaded("tiny-llama")
    kw = dict(method="sparsegpt", calib_samples=4, batch_size=4, progress=False)
    prune(plain, 0.5, **kw)
    save_pruned(hooked, tmp_path / "run", prune(hooked, 0.5, **kw))
    back = load_pruned(tmp_path / "run")
    assert all(torch.equal(back.model.get_parameter(n), p) for n, p in plain.model.named_parameters())
    assert (back.model.get_parameter(names[0]) == 0).float().mean() >= 0.5


@pytest.mark.parametrize("placement", ["dispatched", "offloaded"])
@pytest.mark.parametrize("name", MODELS)
def test_coarse_stage_block_scores_equal_and_weights_restored(name, placement):
    plain, hooked = load_model(name), place(name, placement)
    before = values(hooked)
    kw = dict(target=0.5, samples=4, batch_size=4, progress=False)  # one batch: every tensor perturbed once
    ref, got = coarse_stage(plain, **kw), coarse_stage(hooked, **kw)
    assert got["scores"] == ref["scores"] and len(ref["scores"]) == len(plain.pruned_blocks())
    assert got["layer_sparsity"] == ref["layer_sparsity"]
    after = values(hooked)  # every perturbation undone bit for bit, also in the offloaded copies
    assert all(torch.equal(before[w], after[w]) for w in before)


def test_owl_and_magnitude_scores_equal_on_offloaded_blocks():
    plain, (hooked, _) = load_model("tiny-blip2-t5"), offloaded("tiny-blip2-t5")
    for kw in (dict(allocation="owl", granularity="module"), dict(allocation="ecoflap", scores="magnitude")):
        ref = coarse_stage(plain, target=0.5, samples=4, batch_size=2, **kw)
        assert coarse_stage(hooked, target=0.5, samples=4, batch_size=2, **kw)["scores"] == ref["scores"]


def test_first_order_scores_equal_when_dispatched_and_refused_when_offloaded():
    plain, hooked = load_model("tiny-llama"), dispatched("tiny-llama")
    calib = plain.calibration_samples(4, 0)
    ref = estimate_scores(plain, "first", calib, batch_size=2, progress=False).scores
    assert estimate_scores(hooked, "first", calib, batch_size=2, progress=False).scores == ref
    off, _ = offloaded("tiny-llama")
    for method in ("first", "jvp"):
        with pytest.raises(UserError, match="offloaded .* --scores zeroth") as e:
            estimate_scores(off, method, calib, batch_size=2, progress=False)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", MODELS)
def test_finetune_on_a_dispatched_model_keeps_masks_and_matches_plain(name):
    plain, hooked = load_model(name), dispatched(name)
    for a in (plain, hooked):
        prune(a, 0.5, method="wanda", calib_samples=4, batch_size=4, progress=False)
    kw = dict(steps=2, lr=1e-3, batch_size=2, progress=False, stacks=plain.default_stacks[-2:])  # pruned stacks
    ref, got = finetune(plain, **kw), finetune(hooked, **kw)
    assert got.masks and set(got.masks) == set(ref.masks)
    assert got.losses == ref.losses
    for w, keep in got.masks.items():
        p = hooked.model.get_parameter(w)
        assert torch.equal(keep, ref.masks[w])
        assert not p[~keep.to(p.device)].any()  # the pruned weights stayed zero
        assert torch.equal(p, plain.model.get_parameter(w))  # and the trained ones moved as in the plain run
    assert any(not torch.equal(keep, torch.ones_like(keep)) for keep in got.masks.values())


def test_finetune_refuses_offloaded_weights():
    adapter, names = offloaded("tiny-llama")
    with pytest.raises(UserError, match="offloaded .* to the CPU") as e:
        finetune(adapter, steps=1, lr=1e-3, batch_size=2, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, match", [
    (dict(device_map={"": "disk"}), "offloads \\(the whole model\\) to disk"),
    (dict(device_map="auto", offload_folder="offload"), "offload_folder"),
    (dict(device_map="auto", max_memory={"cpu": 1000}), "to disk"),  # the computed map needs disk
    (dict(max_memory={"cpu": "1GiB"}), "give device_map='auto'"),
    (dict(device_map={"model.layers.0": "cpu"}), "device map: .*lm_head"),  # incomplete
])
def test_disk_offload_and_bad_maps_are_refused_in_one_line(kw, match):
    with pytest.raises(UserError, match=match) as e:
        load_model("tiny-llama", **kw)
    assert "\n" not in str(e.value)


def test_disk_map_refused_for_a_checkpoint_folder_and_by_the_prune_run(tmp_path):
    load_model("tiny-llama").model.save_pretrained(tmp_path / "ckpt")
    dm = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(UserError, match="offloads lm_head to disk"):
        load_model(str(tmp_path / "ckpt"), device_map=dm)
    with pytest.raises(UserError, match="to disk"):  # the map from_pretrained computed needs disk
        load_model(str(tmp_path / "ckpt"), device_map="auto", max_memory={"cpu": 100_000})
    from ecoflap_utils.pipeline import run_prune

    with pytest.raises(UserError, match="offloads lm_head to disk"):
        run_prune(model="tiny-llama", out=str(tmp_path / "run"), device_map=dm, progress=False)
    assert not (tmp_path / "run").exists()


def test_prune_run_with_a_device_map_records_it_and_writes_the_plain_weights(tmp_path):
    from ecoflap_utils.pipeline import run_prune

    kw = dict(model="tiny-llama", sparsity=0.5, calib_samples=4, batch_size=4, progress=False)
    dm = block_map(load_model("tiny-llama"))
    ref = run_prune(out=str(tmp_path / "plain"), **kw)
    got = run_prune(out=str(tmp_path / "mapped"), device_map=dm, **kw)
    cfg = json.loads((tmp_path / "mapped" / "pruning_config.json").read_text())
    assert cfg["device_map"] == dm
    a, b = load_model(str(tmp_path / "plain")), load_model(str(tmp_path / "mapped"))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert got["result"].actual_sparsity == ref["result"].actual_sparsity


# ------------------------------------------------------------------------------------------------ command line

@pytest.mark.parametrize("command", ["prune", "finetune"])
@pytest.mark.parametrize("flags,message", [
    (["--device-map", '{"model": "disk"}'], "offloads model to disk"),
    (["--device-map", "disk"], "offloads the model to disk"),
    (["--device-map", "everywhere"], "is neither auto/balanced/sequential"),
    (["--device-map", "auto", "--max-memory", "0=20GiB,disk=100GB"], "room on disk"),
    (["--device-map", "auto", "--max-memory", "gpu0"], "is not DEVICE=SIZE pairs"),
])
def test_cli_refuses_bad_device_maps_in_one_line(command, flags, message, tmp_path, capsys):
    from ecoflap_utils.cli import main

    out = tmp_path / "run"
    extra = ["--sparsity", "0.5"] if command == "prune" else ["--steps", "1", "--dense"]
    code = main([command, "--model", "tiny-llama", *extra, "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_device_map_prunes_like_the_plain_model(tmp_path):
    """``prune --device-map`` with a JSON map (every block on the CPU, accelerate's hooks attached) writes the same
    weights as a plain ``prune`` and records the map."""
    import json

    from ecoflap_utils.cli import main
    from ecoflap_utils.io import load_pruned

    common = ["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "mapped"), "--device-map", '{"": "cpu"}']) == 0
    cfg = json.loads((tmp_path / "mapped" / "pruning_config.json").read_text())
    assert cfg["device_map"] == {"": "cpu"}
    a = load_pruned(tmp_path / "plain").model.state_dict()
    b = load_pruned(tmp_path / "mapped").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

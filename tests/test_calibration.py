"""Calibration data from disk (ecoflap_utils.data.calibration) on small fixtures written here.

Fixtures: MNIST digits from the bundled training split saved as JPEG/PNG, captioned "a photo of the digit
three"; the same pairs as official COCO captions JSON, Karpathy JSON, a BLIP/LAVIS list, CSV, TSV and
img2dataset-style webdataset shards; C4-style gzipped JSON lines from the bundled calibration text; an
ImageFolder train split. Models are the tiny ones (byte tokenizers, random weights).
"""
import gzip
import json
import random

import numpy as np
import pytest
import torch

from ecoflap_utils.data import calibration as C
from ecoflap_utils.data.images import DIGIT_NAMES, digits, to_pil
from ecoflap_utils.data.text import calibration_text
from ecoflap_utils.errors import UserError
from ecoflap_utils.models.openclip import CLIPAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 12  # two captions each in the COCO / Karpathy files


def _caption(label, k=0):
    name = DIGIT_NAMES[int(label)]
    return [f"A photo of the digit {name}.", f"a handwritten {name}, white on black"][k]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every fixture layout, written once for the module."""
    root = tmp_path_factory.mktemp("calib")
    images, labels, _ = digits("train")
    pick = np.linspace(0, len(labels) - 1, N_IMAGES).astype(int).tolist()  # the file is sorted by digit
    imgs, labs = [images[i] for i in pick], [int(labels[i]) for i in pick]
    out = {"labels": labs}

    # COCO: annotations/captions_train2014.json next to train2014/ (the official zips' layout)
    coco = root / "coco"
    (coco / "train2014").mkdir(parents=True)
    (coco / "annotations").mkdir()
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(N_IMAGES)]
    for name, im in zip(names, imgs):
        to_pil(im).save(coco / "train2014" / name, quality=95)
    anns = [{"id": 100 + 2 * i + k, "image_id": i, "caption": _caption(labs[i], k)}
            for i in range(N_IMAGES) for k in range(2)]
    cj = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)], "annotations": anns}
    out["coco"] = coco / "annotations" / "captions_train2014.json"
    out["coco"].write_text(json.dumps(cj))

    # Karpathy: dataset_coco.json in coco/, paths filepath/filename; the last 2 images are 'test' rows
    rows = [{"filepath": "train2014", "filename": n, "split": "test" if i >= N_IMAGES - 2 else
             ("restval" if i % 3 == 0 else "train"),
             "sentences": [{"raw": _caption(labs[i], k)} for k in range(2)]} for i, n in enumerate(names)]
    out["karpathy"] = coco / "dataset_coco.json"
    out["karpathy"].write_text(json.dumps({"images": rows}))
    out["lavis"] = coco / "coco_karpathy_train.json"
    out["lavis"].write_text(json.dumps([{"image": f"train2014/{n}", "caption": _caption(labs[i])}
                                        for i, n in enumerate(names)]))

    # CSV (comma, filepath/caption) and TSV (tab, image/title) with paths relative to the file
    pngs = root / "csvset" / "images"
    pngs.mkdir(parents=True)
    for i, im in enumerate(imgs):
        to_pil(im).save(pngs / f"{i:03d}.png")
    out["csv"] = root / "csvset" / "pairs.csv"
    out["csv"].write_text("filepath,caption\n" + "".join(f"images/{i:03d}.png,\"{_caption(labs[i])}\"\n"
                                                        for i in range(N_IMAGES)))
    out["tsv"] = root / "csvset" / "pairs.tsv"
    out["tsv"].write_text("image\ttitle\n" + "".join(f"images/{i:03d}.png\t{_caption(labs[i], 1)}\n"
                                                    for i in range(N_IMAGES)))

    # webdataset shards as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json; 6 samples per shard
    import io

    import webdataset as wds

    shards = root / "cc3m"
    shards.mkdir()
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as w:
            for j in range(6):
                i = 6 * s + j
                buf = io.BytesIO()
                to_pil(imgs[i]).save(buf, format="JPEG", quality=95)
                key = f"{s:05d}{j:04d}"
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": _caption(labs[i]),
                         "json": json.dumps({"key": key, "caption": _caption(labs[i]), "status": "success"})})
    out["shards"] = shards
    out["brace"] = f"{shards}/{{00000..00001}}.tar"
    out["glob"] = f"{shards}/*.tar"

    # C4-style gzipped JSON lines: the bundled calibration text's paragraphs, plus short documents
    paragraphs = [p for p in calibration_text().split("\n\n") if not p.startswith("= ")][:40]
    docs = paragraphs + ["Too short."] * 40
    random.Random(0).shuffle(docs)
    out["docs"] = docs
    out["c4"] = root / "c4" / "c4-train.00000-of-01024.json.gz"
    out["c4"].parent.mkdir()
    with gzip.open(out["c4"], "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org"}) + "\n")
    out["txt"] = root / "c4" / "wiki.train.raw"
    out["txt"].write_text("\n\n".join(paragraphs[:5]))

    # ImageFolder train split: 3 classes with an underscore in one folder name, 4 images each
    folder = root / "digits_train"
    for c, cname in enumerate(["zero", "one", "two_digit"]):
        (folder / cname).mkdir(parents=True)
        idx = np.flatnonzero(labels == c)[:4]
        for k in idx:
            to_pil(images[k]).save(folder / cname / f"{k}.png")
    out["folder"] = folder
    return out


def _loss(adapter, samples):
    with torch.no_grad():
        return float(torch.stack([adapter.loss(b) for b in adapter.batches(samples, 4)]).mean())


# --------------------------------------------------------------------------- readers and sampling
PAIR_SOURCES = [("coco", "coco", 2 * N_IMAGES), ("karpathy", "karpathy", 2 * (N_IMAGES - 2)),
                ("lavis", "karpathy", N_IMAGES), ("csv", "csv", N_IMAGES), ("tsv", "csv", N_IMAGES),
                ("brace", "webdataset", N_IMAGES), ("glob", "webdataset", N_IMAGES),
                ("shards", "webdataset", N_IMAGES)]


@pytest.mark.parametrize("source,fmt,available", PAIR_SOURCES)
def test_pairs_are_seeded_and_recorded(data, source, fmt, available):
    path = data[source]
    assert C.detect_format(path) == fmt
    items, rec = C.sample_pairs(path, 5, seed=0)
    again, rec_again = C.sample_pairs(path, 5, seed=0, format=fmt)
    other, rec_other = C.sample_pairs(path, 5, seed=1)
    assert [i["id"] for i in items] == [i["id"] for i in again] and rec == rec_again
    assert [i["id"] for i in items] != [i["id"] for i in other]
    assert rec["ids_sha256"] != rec_other["ids_sha256"]
    assert rec["path"] == str(path) and rec["format"] == fmt and rec["count"] == 5 and rec["seed"] == 0
    assert rec["available"] == available
    assert rec["ids_sha256"] == C.ids_sha256([i["id"] for i in items])
    for it in items:
        assert "digit" in it["caption"] or "handwritten" in it["caption"]
        if fmt == "webdataset":  # decoded by webdataset, only the chosen ones
            assert it["image"].mode == "RGB" and it["image"].size == (28, 28)
        else:
            assert it["image"].is_file()
    if fmt == "karpathy" and source == "karpathy":  # Karpathy test rows never calibrate
        test_files = {f"COCO_train2014_{i:012d}.jpg" for i in (N_IMAGES - 2, N_IMAGES - 1)}
        all_items, _ = C.sample_pairs(path, available, seed=0)
        assert not {it["image"].name for it in all_items} & test_files


def test_webdataset_decodes_only_the_chosen_images(data, tmp_path):
    """A sample with undecodable image bytes is indexed (its caption is read) but never decoded unless chosen."""
    import io

    import webdataset as wds

    shard = tmp_path / "00000.tar"
    with wds.TarWriter(str(shard)) as w:
        for j in range(8):
            buf = io.BytesIO()
            to_pil(np.full((28, 28), 30 * j, dtype=np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"{j:09d}", "jpg": b"not a jpeg" if j == 3 else buf.getvalue(), "txt": f"grey {j}"})
    shards, index = C.index_webdataset(shard)
    assert len(index) == 8 and [it["caption"] for it in index] == [f"grey {j}" for j in range(8)]
    seed = next(s for s in range(50) if 3 not in C.choose(8, 3, s, "x"))
    items, rec = C.sample_pairs(shard, 3, seed=seed)
    assert [it["id"] for it in items] == [index[i]["id"] for i in C.choose(8, 3, seed, "x")]
    bad_seed = next(s for s in range(50) if 3 in C.choose(8, 3, s, "x"))
    with pytest.raises(UserError, match="cannot decode an image of shard"):
        C.sample_pairs(shard, 3, seed=bad_seed)


def test_imagefolder_classes(data):
    items, classnames, rec = C.sample_classes(data["folder"], 6, seed=0)
    assert classnames == ["one", "two digit", "zero"]  # sorted folder names, "_" -> " "
    assert [i["id"] for i in items] == [i["id"] for i in C.sample_classes(data["folder"], 6, seed=0)[0]]
    assert [i["id"] for i in items] != [i["id"] for i in C.sample_classes(data["folder"], 6, seed=1)[0]]
    assert rec["format"] == "imagefolder" and rec["count"] == 6 and rec["classes"] == 3
    assert C.detect_format(data["folder"]) == "imagefolder"


def test_text_documents_and_wanda_windows(data, llama):
    docs = C.read_documents(data["c4"])
    assert docs == data["docs"] and C.detect_format(data["c4"]) == "jsonl"
    assert C.read_documents(data["txt"]) == [data["txt"].read_text()] and C.detect_format(data["txt"]) == "text"
    tok = llama.tokenizer
    windows, ids = C.sample_windows(tok, docs, 16, 32, seed=0)
    assert (windows, ids) == C.sample_windows(tok, docs, 16, 32, seed=0)
    assert ids != C.sample_windows(tok, docs, 16, 32, seed=1)[1]
    # Wanda's get_c4 with random.seed(seed): document and offset draws from one stream, short documents redrawn
    rng = random.Random(0)
    for w, id_ in zip(windows, ids):
        while True:
            i = rng.randint(0, len(docs) - 1)
            enc = tok(docs[i])["input_ids"]
            if len(enc) > 32:
                break
        j = rng.randint(0, len(enc) - 32 - 1)
        assert id_ == f"{i}:{j}" and w == enc[j: j + 32] and docs[i] != "Too short."


# --------------------------------------------------------------------------- adapters: samples and losses
def test_blip2_t5_prefix_lm_from_coco(data, blip_t5):
    samples, rec = C.load_calibration(blip_t5, data["coco"], n=8, seed=0)
    again, _ = C.load_calibration(blip_t5, data["coco"], n=8, seed=0)
    assert rec["format"] == "coco" and rec["count"] == 8 and len(samples) == 8
    eos = blip_t5.eos_id
    for s, a in zip(samples, again):
        assert s["prefix_ids"] == a["prefix_ids"] and s["target_ids"] == a["target_ids"]
        assert torch.equal(s["pixel_values"], a["pixel_values"])
        assert s["pixel_values"].shape == (3, 32, 32)
        cap = s["caption"]
        assert cap == cap.lower() and "." not in cap  # LAVIS's blip_caption processor
        prefix = blip_t5.tokenizer.decode(s["prefix_ids"])
        target = blip_t5.tokenizer.decode(s["target_ids"])
        assert s["prefix_ids"][-1] == eos and len(s["target_ids"]) <= 31  # max_txt_len 32 with the eos
        assert cap.startswith(prefix + target) and (prefix + target == cap or len(s["target_ids"]) == 31)
        assert 1 <= len(prefix) <= len(cap) // 2  # LAVIS: split = randint(1, len(caption) // 2), in characters
    loss = _loss(blip_t5, samples)
    generated = _loss(blip_t5, blip_t5.calibration_samples(8, 0))
    assert np.isfinite(loss) and abs(loss - generated) > 1e-3


def test_blip2_opt_caption_lm_from_karpathy(data, blip_opt):
    samples, rec = C.load_calibration(blip_opt, data["karpathy"], n=6, seed=3)
    assert rec["format"] == "karpathy"
    bos = blip_opt.tokenizer.bos_token_id
    for s in samples:
        assert s["prefix_ids"] == []
        assert s["target_ids"][0] == bos and len(s["target_ids"]) <= 32  # max_txt_len, BOS included
        assert blip_opt.tokenizer.decode(s["target_ids"]) == (s["caption"] + "\n")[: len(s["target_ids"]) - 1]
    assert any(blip_opt.tokenizer.decode(s["target_ids"]) == s["caption"] + "\n" for s in samples)  # short ones whole
    batch = blip_opt.batches(samples, 6)[0]
    q = blip_opt.num_query_tokens
    assert (batch["labels"][:, :q] == -100).all()  # no loss on the query tokens
    assert (batch["labels"][:, q] == bos).all()  # LAVIS keeps OPT's BOS in the targets
    loss = _loss(blip_opt, samples)
    assert np.isfinite(loss) and abs(loss - _loss(blip_opt, blip_opt.calibration_samples(6, 3))) > 1e-3


def test_clip_contrastive_from_webdataset_and_csv(data, clip):
    for source in ("brace", "csv"):
        samples, rec = C.load_calibration(clip, data[source], n=8, seed=0)
        assert rec["count"] == 8 and samples[0]["image"].shape == (3, 32, 32)
        expected = clip.tokenizer([s["caption"] for s in samples])
        assert torch.equal(torch.stack([s["text"] for s in samples]), expected)
        loss = _loss(clip, samples)
        assert np.isfinite(loss) and abs(loss - _loss(clip, clip.calibration_samples(8, 0))) > 1e-3


def test_clip_imagefolder_objectives(data, clip):
    samples, rec = C.load_calibration(clip, data["folder"], n=8, seed=0, clip_objective="classes")
    assert rec["template"] == C.DEFAULT_TEMPLATE and rec["objective"] == "classes" and rec["format"] == "imagefolder"
    batch = clip.batches(samples, 4)[0]
    prompts = ["a photo of a one.", "a photo of a two digit.", "a photo of a zero."]
    assert torch.equal(batch["class_text"], clip.tokenizer(prompts))
    assert batch["labels"].tolist() == [s["label"] for s in samples[:4]]
    with torch.no_grad():  # cross-entropy of each image against all class prompts, with logit_scale
        img = clip.encode_image(batch["image"])
        logits = clip.model.logit_scale.exp() * img @ clip.encode_text(clip.tokenizer(prompts)).T
        expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
        assert torch.allclose(clip.loss(batch), expected)
    # the paper's CoOp/zsclip.py pruning loss: each image with its own class prompt, in-batch contrastive
    pairs, rec2 = C.load_calibration(clip, data["folder"], n=8, seed=0, template="itap of a {}.")
    assert rec2["objective"] == "contrastive" and rec2["ids_sha256"] == rec["ids_sha256"]
    assert [s["caption"] for s in pairs] == [f"itap of a {['one', 'two digit', 'zero'][s['label']]}." for s in pairs]
    assert np.isfinite(_loss(clip, pairs)) and abs(_loss(clip, pairs) - _loss(clip, samples)) > 1e-4

    class PairsOnlyCollate(CLIPAdapter):  # a subclass whose collate knows image-caption pairs only (mini-clip)
        def collate(self, samples):
            return {"image": torch.stack([s["image"] for s in samples]),
                    "text": torch.stack([s["text"] for s in samples])}

    sub = PairsOnlyCollate(clip.model, "sub", tokenizer=clip.tokenizer, preprocess=clip.preprocess)
    assert torch.equal(sub.batches(samples, 4)[0]["class_text"], batch["class_text"])


def test_causal_lm_windows_from_c4(data, llama):
    samples, rec = C.load_calibration(llama, data["c4"], n=8, seed=0)
    assert rec["format"] == "jsonl" and rec["seq_len"] == llama.seq_len == 32 and rec["count"] == 8
    assert all(len(w) == 32 for w in samples) and samples == C.load_calibration(llama, data["c4"], n=8, seed=0)[0]
    assert samples != C.load_calibration(llama, data["c4"], n=8, seed=1)[0]
    longer, rec16 = C.load_calibration(llama, data["txt"], n=4, seed=0, seq_len=16)
    assert rec16["format"] == "text" and all(len(w) == 16 for w in longer)
    loss = _loss(llama, samples)
    assert np.isfinite(loss) and abs(loss - _loss(llama, llama.calibration_samples(8, 0))) > 1e-3
    assert llama.calibration_samples(4, 0) == llama.calibration_samples(4, 0)  # no path: generated, unchanged


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path, clip):
    with pytest.raises(UserError, match=r"calibration data .*nope\.json does not exist: check the path"):
        C.load_calibration(clip, tmp_path / "nope.json", n=2)
    with pytest.raises(UserError, match="does not exist"):
        C.sample_pairs(f"{tmp_path}/{{00000..00003}}.tar", 2)


def test_unknown_format(data, clip, llama):
    with pytest.raises(UserError, match="unknown calibration format 'parquet': use one of coco, karpathy, csv, "
                                        "webdataset, text, jsonl, imagefolder"):
        C.load_calibration(clip, data["csv"], n=2, format="parquet")
    with pytest.raises(UserError, match="calibrates on text"):
        C.load_calibration(llama, data["csv"], n=2)


def test_missing_images(data, tmp_path):
    rows = json.loads(data["coco"].read_text())
    rows["images"].append({"id": 900, "file_name": "COCO_train2014_gone1.jpg"})
    rows["images"].append({"id": 901, "file_name": "COCO_train2014_gone2.jpg"})
    rows["annotations"] += [{"id": 1, "image_id": 900, "caption": "x"}, {"id": 2, "image_id": 901, "caption": "y"}]
    bad = data["coco"].parent / "captions_train2014_missing.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(UserError) as err:
        C.sample_pairs(bad, 2, format="coco")
    msg = str(err.value)
    assert "2 of the 14 images" in msg and "COCO_train2014_gone1.jpg" in msg and "--image-root" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match=r"12 of the 12 images .* missing, the first is .*images/000\.png"):
        C.sample_pairs(data["csv"], 2, image_root=tmp_path)


def test_fewer_items_than_requested(data, clip):
    with pytest.raises(UserError, match=r"asked for 30 calibration samples but .* holds 24 items: ask for at most 24"):
        C.load_calibration(clip, data["coco"], n=30)
    with pytest.raises(UserError, match="holds 12 items"):
        C.sample_pairs(data["brace"], 13)


def test_text_shorter_than_one_window(tmp_path, llama):
    short = tmp_path / "short.txt"
    short.write_text("hello")
    with pytest.raises(UserError, match=r"has 5 tokens, too few for one window of 32 tokens"):
        C.load_calibration(llama, short, n=2)
    jl = tmp_path / "short.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "tiny " * k}) for k in range(1, 4)))
    with pytest.raises(UserError, match=r"no document .* more than 32 tokens \(the longest has 15\)"):
        C.load_calibration(llama, jl, n=2)

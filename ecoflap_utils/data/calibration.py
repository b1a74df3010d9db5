"""Calibration data read from disk: the paper's CC3M / COCO captions / C4 / downstream train splits.

ECoFLaP (and the layer-wise pruners it wraps) calibrate on real data, not on noise:

* BLIP-2: image-caption pairs from CC3M with BLIP-2's prefix-LM loss (Flan-T5) or captioning loss (OPT);
* CLIP: the *train* split of each downstream classification set, each image with its class prompt (CoOp's
  11 datasets read from their own split files, ``coop:/data/oxford_pets``: :mod:`ecoflap_utils.data.coop`);
* LLaMA-family LMs: 128 windows of 2048 tokens of C4, sampled as Wanda / SparseGPT do.

This module reads *items* (no model needed) from the common on-disk layouts, chooses ``n`` of them with
a seed, and records what it chose; :func:`load_calibration` then turns the items into the samples an
adapter's ``batches()`` / ``loss()`` take, with the model's own image preprocessing and tokenizer
(``Blip2Adapter.samples_from_pairs``, ``CLIPAdapter.samples_from_pairs`` / ``samples_from_classes``,
token windows for causal LMs). See data/BENCHMARKS.md, "Calibration data", for where the files come from.

Formats (``format=None`` detects one from the path):

========== =====================================================================================
coco        official COCO captions JSON (``captions_train2014.json``): one item per annotation
karpathy    Karpathy's ``dataset_coco.json`` (``train`` + ``restval`` rows, one item per sentence)
            or the BLIP/LAVIS list ``[{"image", "caption"}]`` (``coco_karpathy_train.json``)
csv         CSV/TSV with a header: an image path column and a caption column
webdataset  tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.json``]):
            one ``.tar``, a brace range ``cc3m/{00000..00331}.tar``, a glob ``cc3m/*.tar`` or a folder
text        a plain text file (WikiText-style): one document
jsonl       JSON lines with a ``text`` field, optionally gzipped (C4's ``c4-train.00000-of-01024.json.gz``)
imagefolder an ImageFolder train split (one folder per class) for CLIP
coop        the train split of one of CoOp's datasets (``coop:/data/oxford_pets``, or the folder with
            ``format="coop"``), read as CoOp's readers do (:func:`ecoflap_utils.data.coop.read_coop`)
========== =====================================================================================

CLIP images may be augmented with CoOp's training transform (``augment=True``: random resized crop + flip,
drawn once per image from the seed, :func:`ecoflap_utils.data.coop.augment_image`), as the official pruning
data loader does; ``--protocol paper`` asks for it (``ecoflap_utils.protocol`` ``calibration_augment``).
"""
from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import numbers
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UserError
from .formats import PATH_COLUMNS, _field, read_image_folder, read_json_file

FORMATS = ("coco", "karpathy", "csv", "webdataset", "text", "jsonl", "imagefolder", "coop")
PAIR_FORMATS = ("coco", "karpathy", "csv", "webdataset")
TEXT_FORMATS = ("text", "jsonl")
CLASS_FORMATS = ("imagefolder", "coop")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "raw")
#: Karpathy rows used for calibration: the Karpathy training images (BLIP's 113k = train + restval)
KARPATHY_TRAIN_SPLITS = ("train", "restval")
#: CLIP's dataset-agnostic prompt (CoOp's template for ImageNet, Caltech101, SUN397, StanfordCars)
DEFAULT_TEMPLATE = "a photo of a {}."
CLIP_OBJECTIVES = ("contrastive", "classes")
#: image extensions img2dataset may write into a shard (``--output_format webdataset``)
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
HINT = "see data/BENCHMARKS.md, 'Calibration data'"


# --------------------------------------------------------------------------- small helpers
def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UserError(f"the number of calibration samples must be a positive integer, got {n!r}")
    return int(n)


def choose(total: int, n: int, seed: int, source: str) -> list[int]:
    """``n`` distinct indices out of ``total``, in a seeded random order (same seed, same indices)."""
    n = _check_n(n)
    if n > total:
        raise UserError(f"asked for {n} calibration samples but {source} holds {total} items: "
                        f"ask for at most {total}, or use a larger set")
    return random.Random(seed).sample(range(total), n)


def ids_sha256(ids: Iterable[str]) -> str:
    """SHA-256 of the chosen item ids, in the order they were chosen (one id per line)."""
    return hashlib.sha256("\n".join(str(i) for i in ids).encode("utf-8")).hexdigest()


def source_record(path: Any, format: str, ids: Sequence[str], seed: int, **extra: Any) -> dict:
    """``{"path", "format", "count", "seed", "ids_sha256", ...}``: what was read, for pruning_config.json."""
    rec = {"path": str(path), "format": format, "count": len(ids), "seed": int(seed), "ids_sha256": ids_sha256(ids)}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_caption`` text processor (``BlipCaptionProcessor.pre_caption``): lower case, the
    characters ``.!"()*#:;~`` replaced by spaces, runs of white space collapsed, at most ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", str(caption).lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def fill_template(template: str, classname: str) -> str:
    """A class prompt: ``template`` with ``{}`` (or ``{c}``) replaced by the class name."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" not in template:
        raise UserError(f"prompt template {template!r} has no '{{}}' for the class name: use e.g. {DEFAULT_TEMPLATE!r}")
    return template.replace("{}", classname)


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _has_braces(s: str) -> bool:
    return re.search(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}]*,[^{}]*\}", s) is not None


# --------------------------------------------------------------------------- format detection
def check_format(format: str | None) -> str | None:
    if format is None:
        return None
    f = str(format).strip().lower()
    if f not in FORMATS:
        raise UserError(f"unknown calibration format {format!r}: use one of {', '.join(FORMATS)} "
                        "(or leave it out to detect it from the path)")
    return f


def _missing_path(path: Any) -> UserError:
    return UserError(f"calibration data {path} does not exist: check the path ({HINT})")


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its name (and, for ``.json``, its content); see the module docstring."""
    s = str(path)
    if s.startswith("coop:"):
        return "coop"
    if _has_braces(s) or _has_glob(s):
        return "webdataset"
    p = Path(s)
    if not p.exists():
        raise _missing_path(path)
    if p.is_dir():
        if _is_coop_folder(p):
            return "coop"
        has_dirs = any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir())
        if not has_dirs and any(p.glob("*.tar")):
            return "webdataset"
        return "imagefolder"
    name = p.name.lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".txt", ".raw")):
        return "text"
    if name.endswith(".json"):
        return _json_kind(read_json_file(p, "calibration JSON"), p)
    raise UserError(f"cannot tell the calibration format of {p} from its name: pass the format, one of "
                    f"{', '.join(FORMATS)}")


def _is_coop_folder(p: Path) -> bool:
    """A folder in CoOp's layout: a ``split_zhou_*.json``, FGVCAircraft's lists or ImageNet's ``classnames.txt``
    beside ``images/train`` (an ImageFolder reading of it would take ``images/`` for a class)."""
    return (any(p.glob("split_zhou_*.json"))
            or ((p / "variants.txt").is_file() and (p / "images_variant_train.txt").is_file())
            or ((p / "classnames.txt").is_file() and (p / "images" / "train").is_dir()))


def _json_kind(obj: Any, path: Path) -> str:
    if isinstance(obj, dict) and "annotations" in obj:
        return "coco"
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        first = obj["images"][0] if obj["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        if "image" in obj[0] and "caption" in obj[0]:
            return "karpathy"
        if "text" in obj[0]:
            return "jsonl"
    raise UserError(f"{path} is neither COCO captions ({{'images', 'annotations'}}), Karpathy's "
                    "({'images': [{'sentences'}]}) nor a BLIP/LAVIS list ([{'image', 'caption'}]): pass the format")


# --------------------------------------------------------------------------- image-caption pairs
def _pair(id_: str, image: Any, caption: Any, path: Path, where: str) -> dict:
    if not isinstance(caption, str):
        raise UserError(f"{path}: {where} has a caption of type {type(caption).__name__}; expected a string")
    return {"id": id_, "image": image, "caption": caption}


def _check_images(pairs: list[dict], path: Path, root: Path) -> list[dict]:
    """Every listed image must be on disk: the first missing one and how many are missing otherwise."""
    missing: list[Path] = []
    seen: dict[Path, bool] = {}
    for p in pairs:
        img = p["image"]
        if img not in seen:
            seen[img] = img.is_file()
            if not seen[img]:
                missing.append(img)
    if missing:
        raise UserError(f"{len(missing)} of the {len(seen)} images listed in {path} are missing, the first is "
                        f"{missing[0]} (looked under {root}): pass --image-root DIR, the folder the image paths "
                        "are relative to")
    return pairs


def _image_root(path: Path, image_root: Any, first: str | None, extra: Sequence[str] = ()) -> Path:
    """``image_root`` when given, else the first of the JSON's folder (and its ``extra`` sub-folders, e.g.
    ``train2014``, and ``images``, and the parent's ``train2014``) where the first listed image exists."""
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise UserError(f"image root {root} does not exist: pass --image-root pointing at the folder of images")
        return root
    folder = path.parent
    cands = [folder / e for e in extra] + [folder / "images", folder] + [folder.parent / e for e in extra]
    if first is not None:
        for c in cands:
            if (c / first).is_file():
                return c
    return folder


def read_coco_pairs(path: str | os.PathLike, image_root: Any = None) -> list[dict]:
    """Official COCO captions JSON: one ``{"id", "image", "caption"}`` per annotation, in file order."""
    path = Path(path)
    obj = read_json_file(path, "COCO captions")
    hint = "COCO captions {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
    images = _field(obj, "images", path, "the file", hint)
    anns = _field(obj, "annotations", path, "the file", hint)
    files = {}
    for i, im in enumerate(images):
        files[_field(im, "id", path, f"images[{i}]", hint)] = _field(im, "file_name", path, f"images[{i}]", hint)
    m = re.search(r"(train|val|test)(\d{4})", path.name)
    root = _image_root(path, image_root, next(iter(files.values()), None), [m.group(0)] if m else [])
    pairs = []
    for i, a in enumerate(anns):
        iid = _field(a, "image_id", path, f"annotation {i}", hint)
        if iid not in files:
            raise UserError(f"{path}: annotation {i} refers to image_id {iid}, which 'images' does not list")
        cap = _field(a, "caption", path, f"annotation {i}", hint)
        pairs.append(_pair(str(a.get("id", i)), root / files[iid], cap, path, f"annotation {i}"))
    if not pairs:
        raise UserError(f"{path} holds no annotations: use the training captions file (captions_train2014.json)")
    return _check_images(pairs, path, root)


def read_karpathy_pairs(path: str | os.PathLike, image_root: Any = None,
                        splits: Sequence[str] | None = KARPATHY_TRAIN_SPLITS) -> list[dict]:
    """Karpathy's ``dataset_coco.json`` (rows of ``splits``, one item per sentence) or the BLIP/LAVIS list
    ``[{"image", "caption"}]`` (a caption string or list per row, one item per caption)."""
    path = Path(path)
    obj = read_json_file(path, "Karpathy-style captions")
    rows: list[tuple[str, Any, str]] = []  # (relative image path, caption, where)
    if isinstance(obj, dict):
        hint = "Karpathy's dataset_*.json {'images': [{'filepath', 'filename', 'split', 'sentences': [{'raw'}]}]}"
        for i, r in enumerate(_field(obj, "images", path, "the file", hint)):
            if splits is not None and isinstance(r, dict) and "split" in r and r["split"] not in splits:
                continue
            rel = os.path.join(r.get("filepath", "") if isinstance(r, dict) else "",
                               _field(r, "filename", path, f"images[{i}]", hint))
            for k, s in enumerate(_field(r, "sentences", path, f"images[{i}]", hint)):
                rows.append((rel, _field(s, "raw", path, f"images[{i}].sentences[{k}]", hint), f"images[{i}]"))
    elif isinstance(obj, list):
        hint = "BLIP/LAVIS rows {'image': 'train2014/x.jpg', 'caption': ...}"
        for i, r in enumerate(obj):
            rel = _field(r, "image", path, f"entry {i}", hint)
            c = _field(r, "caption", path, f"entry {i}", hint)
            for cap in ([c] if isinstance(c, str) else list(c)):
                rows.append((rel, cap, f"entry {i}"))
    else:
        raise UserError(f"{path}: expected Karpathy's dict with 'images' or a BLIP/LAVIS list of rows")
    if not rows:
        raise UserError(f"{path} holds no captions of the training splits {list(splits or [])}")
    root = _image_root(path, image_root, rows[0][0])
    counts: dict[str, int] = {}
    pairs = []
    for rel, cap, where in rows:
        k = counts.get(rel, 0)
        counts[rel] = k + 1
        pairs.append(_pair(f"{rel}#{k}", root / rel, cap, path, where))
    return _check_images(pairs, path, root)


def read_csv_pairs(path: str | os.PathLike, image_root: Any = None) -> list[dict]:
    """CSV/TSV with a header holding an image path column (``path``/``filepath``/``image``...) and a caption
    column (``caption``/``text``/``title``...); the delimiter is sniffed. Relative paths are resolved from
    ``image_root`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise _missing_path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    try:
        dialect = csv.Sniffer().sniff(lines[0] if lines else "", delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    header = {h.strip().lower(): h for h in (reader.fieldnames or [])}
    pcol = next((header[c] for c in PATH_COLUMNS if c in header), None)
    ccol = next((header[c] for c in CAPTION_COLUMNS if c in header), None)
    if pcol is None or ccol is None:
        raise UserError(f"{path}: needs a header with an image column ({'/'.join(PATH_COLUMNS)}) and a caption "
                        f"column ({'/'.join(CAPTION_COLUMNS)}); found {list(header) or 'no header'}")
    root = Path(image_root) if image_root is not None else path.parent
    pairs = []
    for i, row in enumerate(reader):
        rel, cap = (row.get(pcol) or "").strip(), row.get(ccol)
        if not rel or cap is None:
            raise UserError(f"{path}: row {i + 2} has no {pcol!r} or {ccol!r} value")
        img = Path(rel) if os.path.isabs(rel) else root / rel
        pairs.append(_pair(f"{i}:{rel}", img, cap.strip(), path, f"row {i + 2}"))
    if not pairs:
        raise UserError(f"{path} has a header but no rows")
    return _check_images(pairs, path, root)


# --------------------------------------------------------------------------- webdataset shards
def expand_shards(path: str | os.PathLike) -> list[str]:
    """Shard files of ``path``: one tar, brace notation (expanded by webdataset), a glob, or a folder of tars."""
    s = str(path)
    if not (_has_braces(s) or _has_glob(s)) and Path(s).is_dir():
        shards = sorted(str(p) for p in Path(s).glob("*.tar"))
        if not shards:
            raise UserError(f"{s} holds no .tar shards: point at the img2dataset output folder ({HINT})")
        return shards
    from webdataset.shardlists import expand_urls

    shards: list[str] = []
    for pattern in expand_urls(s):
        shards += sorted(glob.glob(pattern)) if _has_glob(pattern) else [pattern]
    missing = [x for x in shards if not Path(x).is_file()]
    if not shards or len(missing) == len(shards):
        raise _missing_path(path)
    if missing:
        raise UserError(f"{len(missing)} of the {len(shards)} shards of {path} do not exist, the first is "
                        f"{missing[0]}: fix the brace range or glob to the shards on disk")
    return shards


def _shard_samples(shard: str, select):
    import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(select_files=select))


def _caption_of(sample: dict) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        cap = meta.get("caption") if isinstance(meta, dict) else None
        return cap.strip() if isinstance(cap, str) else None
    return None


def index_webdataset(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """First pass over the shards: ``[{"id", "shard", "key", "caption"}]`` of every sample with an image and a
    caption, in shard order. Image members are skipped by name with webdataset's ``select_files``: their
    bytes are never copied out or decoded (the tar stream itself is still read through)."""
    from webdataset.tariterators import base_plus_ext

    shards = expand_shards(path)
    items: list[dict] = []
    for shard in shards:
        with_image: set[str] = set()

        def select(fname: str, _seen=with_image) -> bool:
            key, ext = base_plus_ext(fname)
            ext = (ext or "").lower()
            if ext in WDS_IMAGE_EXTENSIONS:
                _seen.add(key)
                return False  # skipped without reading its bytes
            return ext in ("txt", "json")

        try:
            for sample in _shard_samples(shard, select):
                cap = _caption_of(sample)
                key = sample["__key__"]
                if cap is not None and key in with_image:
                    items.append({"id": f"{Path(shard).name}/{key}", "shard": shard, "key": key, "caption": cap})
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            raise UserError(f"cannot read shard {shard} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                            "expected a tar written by img2dataset (KEY.jpg + KEY.txt); re-download or remove it"
                            ) from None
    if not items:
        raise UserError(f"{path} holds no image-caption samples (KEY.jpg with KEY.txt or a 'caption' in KEY.json): "
                        f"write the shards with img2dataset --output_format webdataset ({HINT})")
    return shards, items


def load_webdataset_images(items: Sequence[dict]) -> list[Any]:
    """Second pass: decode (as RGB PIL images, with webdataset's decoder) only the images of ``items``,
    reading only the shards that hold them; returned in the order of ``items``."""
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext

    wanted: dict[str, set[str]] = {}
    for it in items:
        wanted.setdefault(it["shard"], set()).add(it["key"])
    found: dict[tuple[str, str], Any] = {}
    for shard, keys in wanted.items():
        def select(fname: str, _keys=keys) -> bool:
            key, ext = base_plus_ext(fname)
            return key in _keys and (ext or "").lower() in WDS_IMAGE_EXTENSIONS

        pipe = wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(select_files=select),
                                wds.decode("pilrgb"))
        try:
            for sample in pipe:
                img = next((sample[e] for e in WDS_IMAGE_EXTENSIONS if e in sample), None)
                if img is not None:
                    found[(shard, sample["__key__"])] = img
        except Exception as e:
            raise UserError(f"cannot decode an image of shard {shard} ({type(e).__name__}: {e}): re-download the "
                            "shard or remove the broken sample") from None
    out = []
    for it in items:
        if (it["shard"], it["key"]) not in found:  # pragma: no cover - the index saw it
            raise UserError(f"image of {it['id']} vanished between the two reads of {it['shard']}")
        out.append(found[(it["shard"], it["key"])])
    return out


# --------------------------------------------------------------------------- sampling pairs / classes
def read_pairs(path: str | os.PathLike, format: str, image_root: Any = None) -> list[dict]:
    """All pairs of a file format (``coco``, ``karpathy``, ``csv``); images are paths, checked on disk."""
    if format == "coco":
        return read_coco_pairs(path, image_root)
    if format == "karpathy":
        return read_karpathy_pairs(path, image_root)
    if format == "csv":
        return read_csv_pairs(path, image_root)
    raise UserError(f"{format!r} is not a file format of image-caption pairs: use coco, karpathy or csv")


def sample_pairs(path: str | os.PathLike, n: int, seed: int = 0, *, format: str | None = None,
                 image_root: Any = None) -> tuple[list[dict], dict]:
    """``n`` image-caption pairs ``{"id", "image", "caption"}`` chosen with ``seed``, and the source record.

    For webdataset shards the keys and captions are indexed first and only the chosen images are decoded."""
    _check_n(n)
    format = check_format(format) or detect_format(path)
    if format not in PAIR_FORMATS:
        raise UserError(f"{path} is {format!r} data, not image-caption pairs: use one of {', '.join(PAIR_FORMATS)}")
    if format == "webdataset":
        shards, index = index_webdataset(path)
        chosen = [index[i] for i in choose(len(index), n, seed, str(path))]
        images = load_webdataset_images(chosen)
        items = [{"id": it["id"], "image": im, "caption": it["caption"]} for it, im in zip(chosen, images)]
        return items, source_record(path, format, [it["id"] for it in items], seed, available=len(index),
                                    shards=len(shards))
    if not Path(path).exists():
        raise _missing_path(path)
    pairs = read_pairs(path, format, image_root)
    items = [pairs[i] for i in choose(len(pairs), n, seed, str(path))]
    return items, source_record(path, format, [it["id"] for it in items], seed, available=len(pairs))


def sample_classes(path: str | os.PathLike, n: int, seed: int = 0) -> tuple[list[dict], list[str], dict]:
    """``n`` images ``{"id", "image", "label"}`` of an ImageFolder train split chosen with ``seed``, the class
    names (folder names, ``_`` -> space, sorted as torchvision does) and the source record."""
    _check_n(n)
    root = Path(path)
    if not root.exists():
        raise _missing_path(path)
    ds = read_image_folder(root)
    picked = choose(len(ds.images), n, seed, str(path))
    items = [{"id": Path(ds.images[i]).relative_to(root).as_posix(), "image": ds.images[i], "label": ds.labels[i]}
             for i in picked]
    rec = source_record(path, "imagefolder", [it["id"] for it in items], seed, available=len(ds.images),
                        classes=len(ds.classnames))
    return items, list(ds.classnames), rec


def sample_coop(data: Any, n: int, seed: int = 0, *, split: str = "train", dataset: str | None = None
                ) -> tuple[list[dict], Any, dict]:
    """``n`` items ``{"id", "image", "label"}`` of a split of one of CoOp's datasets (the pruning data of
    ``ZeroshotCLIP`` is the train split, ``CoOp/trainers/zsclip.py`` L52-61), chosen with :func:`choose` like
    every calibration source; ``id`` is the image's path relative to the dataset folder. Returns the items, the
    :class:`~ecoflap_utils.data.coop.CoOpDataset` and the source record (``dataset``, ``split``, ``classes``,
    ``available``)."""
    from .coop import read_coop

    ds = read_coop(data, dataset=dataset)
    items = ds.split(split)
    ds.check_images(split)
    picked = choose(len(items), n, seed, f"the {split} split of {ds.name} ({ds.root})")
    out = []
    for i in picked:
        it = items[i]
        out.append({"id": os.path.relpath(it.path, ds.root).replace(os.sep, "/"), "image": it.path,
                    "label": it.label})
    rec = source_record(ds.source, "coop", [o["id"] for o in out], seed, dataset=ds.name, split=split,
                        available=len(items), classes=len(ds.classnames))
    return out, ds, rec


# --------------------------------------------------------------------------- text
def read_documents(path: str | os.PathLike, format: str | None = None) -> list[str]:
    """Documents of a text source: a plain text file is one document; JSON lines (or a JSON list) give one
    document per row's ``text`` field (C4's ``*.json.gz``)."""
    format = check_format(format) or detect_format(path)
    p = Path(path)
    if not p.is_file():
        raise _missing_path(path)
    if format == "text":
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise UserError(f"text file {p} is empty: nothing to calibrate on")
        return [text]
    if format != "jsonl":
        raise UserError(f"{path} is {format!r} data, not text: use one of {', '.join(TEXT_FORMATS)}")
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p} ({type(e).__name__}: {e}): expected (gzipped) JSON lines") from None
    rows: list[Any]
    if raw.lstrip().startswith("["):
        try:
            rows = list(json.loads(raw))
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON ({e})") from None
        where = "entry"
    else:
        rows = []
        for k, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}: line {k + 1} is not valid JSON ({e}): expected one object per "
                                    "line") from None
        where = "line"
    docs = []
    for k, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise UserError(f"{p}: {where} {k + 1} has no 'text' string; expected rows like C4's "
                            "{\"text\": ..., \"url\": ..., \"timestamp\": ...}")
        docs.append(r["text"])
    if not docs:
        raise UserError(f"{p} holds no documents")
    return docs


def _encode_doc(tokenizer, text: str) -> list[int]:
    # Wanda's get_c4 calls tokenizer(text): the tokenizer's own special tokens (LLaMA's BOS) included
    ids = tokenizer(text)["input_ids"]
    return list(ids.tolist() if hasattr(ids, "tolist") else ids)


def sample_windows(tokenizer, documents: Sequence[str], n: int, seq_len: int, seed: int = 0, *,
                   source: str = "the text") -> tuple[list[list[int]], list[str]]:
    """``n`` windows of ``seq_len`` tokens sampled as Wanda's ``get_c4`` does, and their ids ``"doc:offset"``.

    For each window: draw a random document until one has more than ``seq_len`` tokens, then a random
    offset in ``[0, tokens - seq_len - 1]`` (``random.Random(seed)`` drives both draws). Documents are
    tokenized when drawn, with the tokenizer's special tokens, as ``tokenizer(text)`` does in Wanda.
    """
    _check_n(n)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 2:
        raise UserError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not documents:
        raise UserError(f"{source} holds no documents")
    rng = random.Random(seed)
    long: dict[int, list[int]] = {}
    short: dict[int, int] = {}

    def tokens(i: int) -> list[int] | None:
        if i in long:
            return long[i]
        if i in short:
            return None
        ids = _encode_doc(tokenizer, documents[i])
        if len(ids) > seq_len:
            long[i] = ids
            return ids
        short[i] = len(ids)
        return None

    def none_long() -> UserError:
        top = max(short.values())
        if len(documents) == 1:
            return UserError(f"{source} has {top} tokens, too few for one window of {seq_len} tokens (it needs more "
                             f"than {seq_len}): use a shorter seq_len or a longer text")
        return UserError(f"no document of {source} has more than {seq_len} tokens (the longest has {top}), so no "
                         f"window of {seq_len} tokens fits: use a shorter seq_len or longer documents")

    windows, ids = [], []
    for _ in range(n):
        misses = 0
        while True:
            i = rng.randint(0, len(documents) - 1)
            toks = tokens(i)
            if toks is not None:
                break
            misses += 1
            if len(short) == len(documents):
                raise none_long()
            if misses == 4 * len(documents) + 100 and not long:
                # many rejections in a row: make sure some document is long enough before drawing on
                if not any(tokens(k) is not None for k in range(len(documents))):
                    raise none_long()
        j = rng.randint(0, len(toks) - seq_len - 1)
        windows.append(list(toks[j: j + seq_len]))
        ids.append(f"{i}:{j}")
    return windows, ids


# --------------------------------------------------------------------------- entry point
def _augmented(items: list[dict], size: int, seed: int) -> list[dict]:
    """``items`` with each image replaced by CoOp's training transform of it (:func:`coop.augment_image`)."""
    from .coop import augment_image

    return [{**it, "image": augment_image(it["image"], size=size, seed=seed, key=str(it["id"]))} for it in items]


def load_calibration(adapter, path: str | os.PathLike, *, n: int, seed: int = 0, format: str | None = None,
                     image_root: str | os.PathLike | None = None, seq_len: int | None = None,
                     template: str | None = None, clip_objective: str = "contrastive",
                     augment: bool = False) -> tuple[list[Any], dict]:
    """Calibration samples for ``adapter`` read from ``path``, and the record of what was read.

    The samples are what ``adapter.batches()`` / ``adapter.loss()`` take, so both stages use them exactly like
    ``adapter.calibration_samples(n, seed)``:

    * ``blip2``: ``n`` image-caption pairs (``coco``, ``karpathy``, ``csv``, ``webdataset``) through
      ``adapter.samples_from_pairs`` (Flan-T5: LAVIS's prefix-LM split; OPT / decoder-only: caption + ``"\\n"``);
    * ``clip``: image-caption pairs (symmetric contrastive loss), or a labelled train split (an ImageFolder, or
      one of CoOp's datasets: ``coop:/data/oxford_pets``, read by :func:`sample_coop`)
      whose images are paired with their class prompt ``template.format(classname)``
      (``clip_objective="contrastive"``, CoOp/ECoFLaP's ``zsclip.py``) or scored against the prompts of all
      classes (``"classes"``). ``template`` defaults to the CoOp dataset's own (``CUSTOM_TEMPLATES``,
      ``zsclip.py`` L13-29; class names with ``_`` as spaces, L77), else ``"a photo of a {}."``.
      ``augment=True`` passes every image through CoOp's training transform first (random resized crop + flip,
      drawn once per image from ``seed`` and the image's id: :func:`ecoflap_utils.data.coop.augment_image`);
    * ``causal_lm``: ``n`` windows of ``seq_len`` (default ``adapter.seq_len``) tokens of ``text`` / ``jsonl``
      documents, sampled as Wanda's ``get_c4``.

    The record is ``{"path", "format", "count", "seed", "ids_sha256", ...}`` (plus ``available`` items, and
    ``seq_len`` / ``template`` / ``objective`` / ``augmentation`` where they apply; a CoOp source adds
    ``dataset``, ``split`` and ``classes``).
    """
    _check_n(n)
    fmt = check_format(format) or detect_format(path)
    family = getattr(adapter, "family", None)
    if augment and family != "clip":
        raise UserError(f"training augmentation of calibration images is implemented for CLIP (CoOp's random resized "
                        f"crop + flip), but {getattr(adapter, 'name', adapter)} is a {family} model: drop it")
    if family == "causal_lm":
        if fmt not in TEXT_FORMATS:
            raise UserError(f"{adapter.name} is a language model and calibrates on text, but {path} is {fmt!r} "
                            f"data: use one of {', '.join(TEXT_FORMATS)} (C4's .json.gz, a .txt)")
        tok = getattr(adapter, "tokenizer", None)
        if tok is None:
            raise UserError(f"{adapter.name} has no tokenizer: load it from a folder that holds the tokenizer files")
        seq_len = int(seq_len if seq_len is not None else adapter.seq_len)
        docs = read_documents(path, fmt)
        windows, ids = sample_windows(tok, docs, n, seq_len, seed, source=str(path))
        return windows, source_record(path, fmt, ids, seed, available=len(docs), seq_len=seq_len)
    if family == "blip2":
        if fmt not in PAIR_FORMATS:
            raise UserError(f"{adapter.name} is a BLIP-2 model and calibrates on image-caption pairs, but {path} is "
                            f"{fmt!r} data: use one of {', '.join(PAIR_FORMATS)} (CC3M shards, COCO captions)")
        items, rec = sample_pairs(path, n, seed, format=fmt, image_root=image_root)
        return adapter.samples_from_pairs(items, seed), rec
    if family == "clip":
        size = int(getattr(adapter, "image_size", 224))
        if fmt in PAIR_FORMATS:
            items, rec = sample_pairs(path, n, seed, format=fmt, image_root=image_root)
            if augment:
                items = _augmented(items, size, seed)
            rec["augmentation"] = _augmentation(augment, size, seed)
            return adapter.samples_from_pairs(items, seed), rec
        if fmt in CLASS_FORMATS:
            if clip_objective not in CLIP_OBJECTIVES:
                raise UserError(f"unknown CLIP calibration objective {clip_objective!r}: use one of "
                                f"{', '.join(CLIP_OBJECTIVES)}")
            if template is not None:
                fill_template(str(template), "x")  # a template without a slot for the class name fails here
            if fmt == "coop":
                items, ds, rec = sample_coop(path, n, seed)
                classnames = ds.prompt_classnames
                template = ds.template if template is None else str(template)
            else:
                template = DEFAULT_TEMPLATE if template is None else str(template)
                items, classnames, rec = sample_classes(path, n, seed)
            if augment:
                items = _augmented(items, size, seed)
            samples = adapter.samples_from_classes(items, classnames, template, objective=clip_objective)
            rec.update(template=template, objective=clip_objective, augmentation=_augmentation(augment, size, seed))
            return samples, rec
        raise UserError(f"{adapter.name} is a CLIP model and calibrates on images, but {path} is {fmt!r} data: use an "
                        f"ImageFolder train split, a CoOp dataset (coop:/data/oxford_pets) or image-caption pairs "
                        f"({', '.join(PAIR_FORMATS)})")
    raise UserError(f"{getattr(adapter, 'name', adapter)} (family {family!r}) cannot calibrate on data from disk")


def _augmentation(augment: bool, size: int, seed: int) -> dict | str:
    from .coop import augmentation_record

    return augmentation_record(size, seed) if augment else "none (the model's evaluation transform)"

"""Readers for the standard on-disk evaluation formats of the ECoFLaP benchmarks (paper Sec. 4).

* zero-shot classification: an ImageFolder tree (one folder per class) or a CSV/TSV of
  ``path,label`` rows (CLIP_benchmark's layouts), or an in-memory list of ``(image, label)``;
* image-text retrieval: Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` or the
  BLIP/LAVIS annotation lists (``coco_karpathy_test.json``, ``flickr30k_test.json``);
* VQA: the official VQAv2 / OK-VQA pair of questions and annotations JSON files, GQA's
  ``*_questions.json``;
* captioning: COCO captions JSON (``captions_val2014.json``, NoCaps ``nocaps_val_4500_captions.json``)
  or a Karpathy-style file;
* language modelling: raw text (WikiText-2 ``wiki.test.raw``).

Readers return plain lists/dataclasses whose images are *paths* (opened lazily, batch by batch),
and check what they read: a malformed file raises :class:`~ecoflap_utils.errors.UserError` naming
the file and the missing field; an image that is not on disk names the path tried and ``--image-root``.
Nothing is downloaded (see data/BENCHMARKS.md for where the official files come from).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
PATH_COLUMNS = ("path", "filepath", "filename", "file_name", "file", "image", "image_path")
LABEL_COLUMNS = ("label", "class", "target", "classname", "category")


# --------------------------------------------------------------------------- containers
@dataclass
class ClassificationSet:
    """Images (paths, PIL images or preprocessed tensors) with integer labels and optional class names."""

    images: list[Any]
    labels: list[int]
    classnames: list[str] | None = None
    name: str = "in-memory"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class RetrievalSet:
    """Images and captions: ``txt2img[t]`` is the image of caption ``t``, ``img2txt[i]`` the captions of image ``i``."""

    images: list[Any]
    texts: list[str]
    txt2img: list[int] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    name: str = "in-memory"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n_images: int) -> "RetrievalSet":
        """The first ``n_images`` images with all of their captions."""
        keep = self.img2txt[:n_images]
        texts, t2i, i2t = [], [], []
        for i, caps in enumerate(keep):
            i2t.append(list(range(len(texts), len(texts) + len(caps))))
            texts += [self.texts[t] for t in caps]
            t2i += [i] * len(caps)
        return RetrievalSet(self.images[:n_images], texts, t2i, i2t, self.name)


# --------------------------------------------------------------------------- helpers
def load_image(image: Any):
    """A path becomes an RGB PIL image; PIL images and tensors are returned as they are."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"image {image} does not exist: check --image-root / the dataset folder") from None
        except OSError as e:
            raise UserError(f"cannot read image {image} ({e}): replace or remove the file") from None
    return image


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file, with a UserError naming the file (and what it should be) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: check the path (see data/BENCHMARKS.md)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): expected the {what} file") from None


def _field(item: Any, key: str, path: Path, where: str, hint: str) -> Any:
    if not isinstance(item, dict) or key not in item:
        raise UserError(f"{path}: {where} has no {key!r} field; expected {hint}")
    return item[key]


def _check_root(root: Path, what: str) -> Path:
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: pass --image-root pointing at the {what} images")
    return root


def _existing(candidates: Sequence[Path], source: Path) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"image {candidates[0]} (listed in {source}) does not exist: pass --image-root pointing at the "
                    "folder that holds the images")


def read_text(path: str | os.PathLike) -> str:
    """Raw text of a file (WikiText-2 ``wiki.test.raw``); the evaluation concatenates nothing else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist: pass --data pointing at e.g. wikitext-2-raw/wiki.test.raw")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"text file {path} is empty: nothing to evaluate")
    return text


# --------------------------------------------------------------------------- classification
def read_image_folder(root: str | os.PathLike) -> ClassificationSet:
    """An ImageFolder tree ``root/CLASS/*.jpg``: classes are the sorted folder names (torchvision's rule).

    Class names are the folder names with ``_`` turned into spaces (pass ``--classnames`` for others).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: pass --data pointing at an ImageFolder tree")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class folders: lay it out as {root}/CLASS_NAME/IMAGE.jpg "
                        "(or pass a CSV of path,label)")
    images, labels = [], []
    for idx, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(f)
                labels.append(idx)
    if not images:
        raise UserError(f"{root} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return ClassificationSet(images, labels, [c.replace("_", " ") for c in classes], root.name)


def read_classification_csv(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                            classnames: Sequence[str] | None = None) -> ClassificationSet:
    """A CSV or TSV with a header: a path column (``path``/``filepath``/``image``...) and a label column.

    Labels are integers (then class names come from ``classnames``) or class names (then they are
    looked up in ``classnames``, or numbered in sorted order when none are given). Relative paths
    are resolved from ``image_root`` (default: the CSV's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist: check --data")
    text = path.read_text(encoding="utf-8")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else "", delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    pcol = next((c for c in PATH_COLUMNS if c in header), None)
    lcol = next((c for c in LABEL_COLUMNS if c in header), None)
    if not rows or pcol is None or lcol is None:
        raise UserError(f"{path}: needs a header with a path column ({'/'.join(PATH_COLUMNS)}) and a label column "
                        f"({'/'.join(LABEL_COLUMNS)}); found {header or 'no rows'}")
    root = Path(image_root) if image_root is not None else path.parent
    orig = {k.strip().lower(): k for k in rows[0].keys()}
    raw = [(r[orig[pcol]].strip(), r[orig[lcol]].strip()) for r in rows]
    images = [Path(p) if os.path.isabs(p) else root / p for p, _ in raw]
    labels_raw = [lab for _, lab in raw]
    if all(_is_int(lab) for lab in labels_raw):
        labels = [int(lab) for lab in labels_raw]
        names = list(classnames) if classnames is not None else None
        if names is not None and (min(labels) < 0 or max(labels) >= len(names)):
            raise UserError(f"{path}: labels run from {min(labels)} to {max(labels)} but {len(names)} class names "
                            "were given: check --classnames")
    else:
        names = list(classnames) if classnames is not None else sorted(set(labels_raw))
        index = {n: i for i, n in enumerate(names)}
        missing = sorted(set(labels_raw) - set(index))
        if missing:
            raise UserError(f"{path}: labels {missing[:5]} are not among the class names: check --classnames")
        labels = [index[lab] for lab in labels_raw]
    if images and not images[0].is_file():
        raise UserError(f"image {images[0]} (first row of {path}) does not exist: pass --image-root pointing at "
                        "the folder the CSV paths are relative to")
    return ClassificationSet(images, labels, names, path.stem)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def classification_from_memory(items: Any, *, classnames: Sequence[str] | None = None,
                               name: str = "in-memory") -> ClassificationSet:
    """A list of ``(image, label)`` pairs, or a dict ``{"images", "labels"[, "classnames"]}`` (bundled sets)."""
    if isinstance(items, ClassificationSet):
        return items
    if isinstance(items, dict):
        for key in ("images", "labels"):
            if key not in items:
                raise UserError(f"in-memory zero-shot set has no {key!r} key; expected "
                                "{'images': [...], 'labels': [...], 'classnames': [...]}")
        images, labels = list(items["images"]), [int(x) for x in items["labels"]]
        classnames = classnames if classnames is not None else items.get("classnames")
        name = items.get("name", name)
    else:
        pairs = list(items)
        if any(not (isinstance(p, (tuple, list)) and len(p) == 2) for p in pairs):
            raise UserError("an in-memory zero-shot set must be a list of (image, label) pairs")
        images, labels = [p[0] for p in pairs], [int(p[1]) for p in pairs]
    if len(images) != len(labels):
        raise UserError(f"in-memory zero-shot set has {len(images)} images but {len(labels)} labels: "
                        "give one label per image")
    return ClassificationSet(images, labels, list(classnames) if classnames is not None else None, name)


def load_classification(data: Any, *, classnames: Sequence[str] | None = None,
                        image_root: str | os.PathLike | None = None) -> ClassificationSet:
    """An ImageFolder directory, a CSV/TSV file, or an in-memory set; ``classnames`` overrides the set's names."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            ds = read_image_folder(p)
        elif p.is_file():
            ds = read_classification_csv(p, image_root=image_root, classnames=classnames)
        else:
            raise UserError(f"--data {p} does not exist: pass an ImageFolder directory or a CSV of path,label")
        if classnames is not None:
            if len(classnames) < max(ds.labels) + 1:
                raise UserError(f"{p} has {max(ds.labels) + 1} classes but only {len(classnames)} class names: "
                                "check --classnames")
            ds.classnames = list(classnames)
        return ds
    return classification_from_memory(data, classnames=classnames)


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """One entry per non-empty line (``--classnames`` / ``--templates`` files), or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist: give a text file with one entry per line")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            out = [str(x) for x in json.loads(text)]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} looks like JSON but is not valid ({e})") from None
    else:
        out = [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise UserError(f"{what} file {path} is empty")
    return out


# --------------------------------------------------------------------------- retrieval (Karpathy)
def read_karpathy(path: str | os.PathLike, *, split: str | None = "test",
                  image_root: str | os.PathLike | None = None) -> RetrievalSet:
    """Karpathy-split COCO/Flickr30k JSON as a retrieval set (BLIP/LAVIS Karpathy protocol).

    Two layouts are read: Karpathy's ``{"images": [{"filepath"?, "filename", "split", "sentences":
    [{"raw"}]}]}`` (rows whose ``split`` differs from ``split`` are dropped; ``split=None`` keeps all)
    and the BLIP/LAVIS list ``[{"image": "val2014/x.jpg", "caption": [...]}]`` (a caption string per
    row is grouped by image). Image paths are relative to ``image_root`` (default: the JSON's folder).
    """
    path = Path(path)
    obj = read_json_file(path, "Karpathy-style retrieval JSON")
    root = Path(image_root) if image_root is not None else path.parent
    order: list[str] = []
    caps: dict[str, list[str]] = {}
    if isinstance(obj, dict):
        rows = _field(obj, "images", path, "the file", "Karpathy's dataset_*.json with an 'images' list")
        for i, r in enumerate(rows):
            if split is not None and "split" in r and r["split"] != split:
                continue
            fname = _field(r, "filename", path, f"images[{i}]", "Karpathy's 'filename' and 'sentences'")
            sents = _field(r, "sentences", path, f"images[{i}]", "Karpathy's 'filename' and 'sentences'")
            rel = os.path.join(r.get("filepath", ""), fname)
            texts = [_field(s, "raw", path, f"images[{i}].sentences", "sentences with a 'raw' caption") for s in sents]
            if rel not in caps:
                order.append(rel)
                caps[rel] = []
            caps[rel] += texts
    elif isinstance(obj, list):
        for i, r in enumerate(obj):
            rel = _field(r, "image", path, f"entry {i}", "BLIP/LAVIS rows {'image': ..., 'caption': [...]}")
            c = _field(r, "caption", path, f"entry {i}", "BLIP/LAVIS rows {'image': ..., 'caption': [...]}")
            if rel not in caps:
                order.append(rel)
                caps[rel] = []
            caps[rel] += [c] if isinstance(c, str) else list(c)
    else:
        raise UserError(f"{path}: expected Karpathy's dict with 'images' or a BLIP/LAVIS list of rows")
    if not order:
        raise UserError(f"{path} holds no images for split {split!r}: check --split (test, val, train, restval)")
    images, texts, t2i, i2t = [], [], [], []
    for i, rel in enumerate(order):
        images.append(_existing([root / rel], path))
        i2t.append(list(range(len(texts), len(texts) + len(caps[rel]))))
        texts += caps[rel]
        t2i += [i] * len(caps[rel])
    return RetrievalSet(images, texts, t2i, i2t, path.stem)


def retrieval_from_memory(items: Any, name: str = "in-memory") -> RetrievalSet:
    """A list of ``{"image", "captions": [...]}`` (or ``"references"``/``"caption"``) rows, or a dict
    ``{"images", "texts", "txt2img", "img2txt"}`` (the arguments of ``metrics.retrieval_recall``), as a retrieval set."""
    if isinstance(items, RetrievalSet):
        return items
    if isinstance(items, dict):
        for key in ("images", "texts", "txt2img", "img2txt"):
            if key not in items:
                raise UserError(f"in-memory retrieval set has no {key!r} key; expected "
                                "{'images', 'texts', 'txt2img', 'img2txt'}")
        ds = RetrievalSet(list(items["images"]), [str(t) for t in items["texts"]], [int(i) for i in items["txt2img"]],
                          [[int(t) for t in ts] for ts in items["img2txt"]], items.get("name", name))
        if len(ds.txt2img) != len(ds.texts) or len(ds.img2txt) != len(ds.images):
            raise UserError(f"in-memory retrieval set: {len(ds.texts)} texts but {len(ds.txt2img)} txt2img entries, "
                            f"{len(ds.images)} images but {len(ds.img2txt)} img2txt entries; give one per item")
        return ds
    images, texts, t2i, i2t = [], [], [], []
    for i, r in enumerate(items):
        if not isinstance(r, dict) or "image" not in r:
            raise UserError(f"in-memory retrieval row {i} has no 'image'; expected {{'image', 'captions': [...]}}")
        c = r.get("captions", r.get("references", r.get("caption")))
        if c is None:
            raise UserError(f"in-memory retrieval row {i} has no 'captions'; expected {{'image', 'captions': [...]}}")
        c = [c] if isinstance(c, str) else list(c)
        images.append(r["image"])
        i2t.append(list(range(len(texts), len(texts) + len(c))))
        texts += c
        t2i += [i] * len(c)
    if not images:
        raise UserError("in-memory retrieval set is empty")
    return RetrievalSet(images, texts, t2i, i2t, name)


# --------------------------------------------------------------------------- VQA
def find_vqa_files(path: str | os.PathLike, annotations: str | os.PathLike | None = None,
                   *, need_annotations: bool = True) -> tuple[Path, Path | None]:
    """``--data``: the questions JSON itself, or a folder holding one ``*questions*.json`` (and one
    ``*annotations*.json`` unless ``annotations`` names it)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--data {p} does not exist: pass the questions JSON or the folder that holds it")
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        found = sorted(folder.glob("*questions*.json"))
        if len(found) != 1:
            raise UserError(f"{folder} holds {len(found)} *questions*.json files ({[f.name for f in found]}): "
                            "pass the questions file itself as --data")
        q = found[0]
    else:
        q = p
    if annotations is not None:
        a = Path(annotations)
        if not a.is_file():
            raise UserError(f"annotations file {a} does not exist: check --annotations")
        return q, a
    if not need_annotations:
        return q, None
    found = sorted(folder.glob("*annotations*.json"))
    if len(found) != 1:
        raise UserError(f"{folder} holds {len(found)} *annotations*.json files ({[f.name for f in found]}): "
                        "pass the annotations file with --annotations")
    return q, found[0]


def _default_image_root(folder: Path, subtype: str | None) -> Path:
    for cand in ([folder / subtype] if subtype else []) + [folder / "images", folder]:
        if cand.is_dir() and any(cand.iterdir()):
            return cand
    return folder


def read_vqa(questions: str | os.PathLike, annotations: str | os.PathLike, *,
             image_root: str | os.PathLike | None = None) -> list[dict]:
    """The official VQAv2 / OK-VQA pair: ``{"questions": [{"question_id", "image_id", "question"}]}`` and
    ``{"annotations": [{"question_id", "answers": [{"answer"}]}]}`` (Antol et al. 2015; Goyal et al. 2017;
    Marino et al. 2019). Returns ``[{"image", "question", "answers", "question_id"}]`` in question order.

    COCO images are found under ``image_root`` (default: the ``data_subtype`` folder, e.g. ``val2014/``,
    next to the questions file, else ``images/``, else that folder) as ``COCO_val2014_%012d.jpg``
    or ``%012d.jpg``.
    """
    qpath, apath = Path(questions), Path(annotations)
    qobj = read_json_file(qpath, "VQA questions")
    aobj = read_json_file(apath, "VQA annotations")
    qs = _field(qobj, "questions", qpath, "the file", "the official questions JSON with a 'questions' list")
    anns = _field(aobj, "annotations", apath, "the file", "the official annotations JSON with an 'annotations' list")
    by_qid = {}
    for i, a in enumerate(anns):
        qid = _field(a, "question_id", apath, f"annotation {i}", "'question_id' and 'answers' in each annotation")
        answers = _field(a, "answers", apath, f"annotation {i}", "'question_id' and 'answers' in each annotation")
        by_qid[qid] = [_field(x, "answer", apath, f"annotation {i} answers", "answers as {'answer': ...}")
                       for x in answers]
    subtype = qobj.get("data_subtype") if isinstance(qobj, dict) else None
    root = Path(image_root) if image_root is not None else _default_image_root(qpath.parent, subtype)
    out, cache = [], {}
    for i, q in enumerate(qs):
        hint = "'question_id', 'image_id' and 'question' in each question"
        qid = _field(q, "question_id", qpath, f"question {i}", hint)
        img = _field(q, "image_id", qpath, f"question {i}", hint)
        text = _field(q, "question", qpath, f"question {i}", hint)
        if qid not in by_qid:
            raise UserError(f"{apath} has no annotation for question_id {qid} of {qpath}: the two files must be "
                            "the same split (e.g. both val2014)")
        if img not in cache:
            names = ([f"COCO_{subtype}_{int(img):012d}.jpg"] if subtype else []) + [f"{int(img):012d}.jpg",
                                                                                    f"{img}.jpg"]
            cache[img] = _existing([root / n for n in names], qpath)
        out.append({"image": cache[img], "question": text, "answers": by_qid[qid], "question_id": qid})
    if not out:
        raise UserError(f"{qpath} holds no questions")
    return out


def read_gqa(questions: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> list[dict]:
    """GQA questions (Hudson & Manning 2019): ``{qid: {"imageId", "question", "answer"}}`` as in
    ``testdev_balanced_questions.json``, or a list of rows with ``question_id``, ``image``/``imageId``,
    ``question``, ``answer``. Images are ``image_root/IMAGEID.jpg`` (default: ``images/`` next to the file).
    Returns ``[{"image", "question", "answer", "question_id"}]``.
    """
    qpath = Path(questions)
    obj = read_json_file(qpath, "GQA questions")
    if isinstance(obj, dict):
        rows = [dict(v, question_id=k) for k, v in obj.items()]
    elif isinstance(obj, list):
        rows = obj
    else:
        raise UserError(f"{qpath}: expected GQA's dict {{question_id: {{imageId, question, answer}}}}")
    root = Path(image_root) if image_root is not None else _default_image_root(qpath.parent, None)
    out, cache = [], {}
    for i, r in enumerate(rows):
        hint = "'imageId', 'question' and 'answer' per question (test/challenge files have no answers)"
        img = r.get("imageId", r.get("image")) if isinstance(r, dict) else None
        if img is None:
            raise UserError(f"{qpath}: question {i} has no 'imageId' field; expected {hint}")
        text = _field(r, "question", qpath, f"question {i}", hint)
        ans = _field(r, "answer", qpath, f"question {i}", hint)
        if img not in cache:
            name = str(img) if str(img).lower().endswith(IMAGE_EXTENSIONS) else f"{img}.jpg"
            cache[img] = _existing([root / name], qpath)
        out.append({"image": cache[img], "question": text, "answer": ans,
                    "question_id": r.get("question_id", i)})
    if not out:
        raise UserError(f"{qpath} holds no questions")
    return out


# --------------------------------------------------------------------------- captioning
def read_captions(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                  split: str | None = "test") -> list[dict]:
    """COCO-style captions JSON (``captions_val2014.json``, NoCaps ``nocaps_val_4500_captions.json``):
    ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``; a Karpathy-style
    file is read with :func:`read_karpathy`. Returns ``[{"image", "references", "image_id"}]`` in the
    order of ``images``; images without a reference are skipped.
    """
    path = Path(path)
    obj = read_json_file(path, "COCO-style captions")
    if isinstance(obj, list) or (isinstance(obj, dict) and "annotations" not in obj and "images" in obj
                                 and obj["images"] and isinstance(obj["images"][0], dict)
                                 and "sentences" in obj["images"][0]):
        rs = read_karpathy(path, split=split, image_root=image_root)
        return [{"image": im, "references": [rs.texts[t] for t in caps], "image_id": i}
                for i, (im, caps) in enumerate(zip(rs.images, rs.img2txt))]
    hint = "the COCO captions format {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
    images = _field(obj, "images", path, "the file", hint)
    if "annotations" not in obj:
        raise UserError(f"{path} has no 'annotations' field: it holds no reference captions (NoCaps/COCO test "
                        "references are kept by the evaluation server); use the validation file")
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(obj["annotations"]):
        iid = _field(a, "image_id", path, f"annotation {i}", hint)
        refs.setdefault(iid, []).append(_field(a, "caption", path, f"annotation {i}", hint))
    root = Path(image_root) if image_root is not None else _default_image_root(path.parent, None)
    out = []
    for i, im in enumerate(images):
        iid = _field(im, "id", path, f"images[{i}]", hint)
        fname = _field(im, "file_name", path, f"images[{i}]", hint)
        if iid in refs:
            out.append({"image": _existing([root / fname], path), "references": refs[iid], "image_id": iid})
    if not out:
        raise UserError(f"{path}: no image has a reference caption (image ids in 'images' and 'annotations' differ)")
    return out


def check_rows(rows: Iterable[Any], keys: Sequence[str], what: str, example: str) -> list[dict]:
    """In-memory rows (bundled sets): each a dict with ``keys``; a UserError names the first bad row."""
    rows = list(rows)
    if not rows:
        raise UserError(f"the {what} set is empty")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{what} row {i} is a {type(r).__name__}; expected {example}")
        for k in keys:
            if k not in r:
                raise UserError(f"{what} row {i} has no {k!r} field; expected {example}")
    return rows

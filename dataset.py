"""Image lists, image loading, transforms and batch sampling for chest X-ray retrieval.

List files hold one image per line, whitespace separated (the COVIDx format):

    patient_id filename label [source]

Blank lines and lines starting with `#` are skipped. Labels map to class indices by `--dataset`:
`covid` (normal, pneumonia, COVID-19 -> 0, 1, 2), `covidx-cxr2` (negative, positive -> 0, 1) or
`generic` (the sorted class names found in the list). See data/README.md for the folder layout.

Images are looked up by one rule in every script: training/validation images in DIR/train when that
folder exists (else DIR), test images in --test-dataset-dir, else DIR/test when it exists, else DIR.

Bad input stops before any work: a malformed line or unknown label names the file, the line and the
allowed labels; missing images are counted and the first few listed; an unreadable image names its path.
"""
import argparse
import collections
import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

LABEL_MAPS = {
    "covid": {"normal": 0, "pneumonia": 1, "COVID-19": 2},
    "covidx-cxr2": {"negative": 0, "positive": 1},
}
DATASETS = (*LABEL_MAPS, "generic")
MAX_LISTED_MISSING = 5  # how many missing paths an error message shows


class ImageRecord(NamedTuple):
    patient_id: str
    filename: str
    label: int
    source: str | None


def class_names(dataset, labels_found=None):
    """Class names in index order. `generic` needs the label strings found in a list (sorted)."""
    if dataset in LABEL_MAPS:
        label_map = LABEL_MAPS[dataset]
        return sorted(label_map, key=label_map.get)
    if dataset != "generic":
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if labels_found is None:
        raise ValueError("--dataset generic takes its class names from the list; pass labels_found")
    names = sorted(set(labels_found))
    if not names:
        raise ValueError("--dataset generic: no labels found")
    return names


def list_label_names(path):
    """The set of label strings a list file uses (the list's format is checked on the way)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist (check the --*-image-list flags)")
    return {cols[2] for _, cols in _parse_lines(path)}


def resolve_class_names(dataset, primary_list, other_lists=(), given=None):
    """Class names (index order) shared by several lists, so one class has one id in all of them.

    covid / covidx-cxr2: the built-in map. generic: `given` (e.g. the class order a checkpoint was
    trained with) or else the sorted names of `primary_list` (the training list); names that only
    the other lists use are appended, sorted. Returns (names, appended names). Without this, each
    list's own sorted set would number the classes, and a query list lacking one class would give
    every later class another id than its gallery.
    """
    if dataset in LABEL_MAPS:
        return class_names(dataset), []
    if dataset != "generic":
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    names = list(given) if given else sorted(list_label_names(primary_list))
    found = set()
    for p in [primary_list, *other_lists]:
        if p is not None:
            found |= list_label_names(p)
    extra = sorted(found - set(names))
    return names + extra, extra


def _parse_lines(path):
    """Yield (line_number, columns) of the non-blank, non-comment lines; check the column count."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            cols = stripped.split()
            if len(cols) not in (3, 4):
                raise ValueError(
                    f"{path}:{lineno}: expected 3 or 4 whitespace-separated columns "
                    f"'patient_id filename label [source]', got {len(cols)}: {stripped!r}"
                )
            yield lineno, cols


ID_PATH_PARTS = 3  # CheXpert's patient/study/view: the id of a file whose stem repeats in its list


def path_image_id(filename, parts=None):
    """The last `parts` parts (None: all) of a relative path, extension dropped, joined by '_'.

    'CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg' -> 'patient00001_study1_view1_frontal' with
    parts=3, the id ontology.read_chexpert_csv gives the same file whatever folder the list's paths start in.
    """
    p = Path(str(filename).replace("\\", "/"))
    names = [q for q in p.parent.parts if q != p.anchor] + [p.stem]
    return "_".join(names[-parts:] if parts else names)


def list_image_ids(filenames):
    """Image ids of a list's files: one rule for every id a script writes.

    The filename stem when the stems are unique within the list; else the last three path parts (CheXpert's
    patientX/studyY/viewZ, whatever folder the paths start in) when those are unique; else the whole relative
    path. Extension dropped, '/' -> '_'. Ids may still collide (a.png and a.jpg in one folder):
    ImageListDataset.check_unique_ids names the two lines.
    """
    for parts in (1, ID_PATH_PARTS, None):
        ids = [path_image_id(f, parts) for f in filenames]
        if len(set(ids)) == len(ids):
            break
    return ids


def read_image_list(path, dataset="covid", class_names=None):
    """Parse a list file into ImageRecords; errors name the file, the line and the allowed labels.

    class_names: explicit class order (index = position), e.g. a training list's generic classes
    reused for its test list. For `covid`/`covidx-cxr2` it must equal the built-in map's order.
    """
    return _read_image_list(path, dataset, class_names)[0]


def _read_image_list(path, dataset, class_names):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist (check the --*-image-list flags)")
    rows = list(_parse_lines(path))
    if not rows:
        raise ValueError(f"image list {path} has no images (only blank or comment lines)")
    names = _resolve_class_names(dataset, class_names, [cols[2] for _, cols in rows])
    label_map = {name: i for i, name in enumerate(names)}
    records, seen = [], {}
    for lineno, cols in rows:
        patient_id, filename, label = cols[:3]
        if label not in label_map:
            raise ValueError(
                f"{path}:{lineno}: unknown label {label!r} for --dataset {dataset}; "
                f"allowed labels: {', '.join(names)}"
            )
        if filename in seen:
            # the same file twice would match itself in leave-one-out retrieval
            raise ValueError(f"{path}:{lineno}: file {filename!r} already listed on line {seen[filename]}")
        seen[filename] = lineno
        records.append(ImageRecord(patient_id, filename, label_map[label], cols[3] if len(cols) == 4 else None))
    return records, names


def _resolve_class_names(dataset, given, labels_found):
    if dataset not in DATASETS:
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if given is None:
        return class_names(dataset, labels_found)
    given = list(given)
    if dataset in LABEL_MAPS and given != class_names(dataset):
        raise ValueError(f"class_names {given} differ from --dataset {dataset}: {class_names(dataset)}")
    if len(set(given)) != len(given):
        raise ValueError(f"class_names {given} has duplicates")
    return given


# ----------------------------------------------------------------------------------------------
# image loading


def _scale_to_uint8(arr):
    """Linear map of the array's own min..max to 0..255 (a constant image becomes 0)."""
    arr = np.asarray(arr)
    lo, hi = arr.min(), arr.max()
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    if arr.dtype.kind in "ui" and int(hi) - int(lo) < 1 << 20:
        # integer pixels (16-bit PNG, most DICOM): a lookup table, same numbers, ~5x faster
        lut = np.floor(np.arange(int(hi) - int(lo) + 1) * 255.0 / (int(hi) - int(lo)) + 0.5).astype(np.uint8)
        offsets = arr if lo == 0 else arr.astype(np.int64) - int(lo)
        return lut[offsets]
    arr = arr.astype(np.float64)
    lo, hi = float(lo), float(hi)
    return np.floor((arr - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)


def _gray_to_rgb(arr_uint8):
    return Image.fromarray(arr_uint8, mode="L").convert("RGB")


def _load_dicom(path):
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError as e:
        raise ImportError(f"reading DICOM {path} needs pydicom: pip install pydicom") from e
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array  # raises for compressed data without a decoder plugin; caught by load_image
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"{frames} frames; only single-frame radiographs are supported")
    if samples == 3:
        return Image.fromarray(_scale_to_uint8(arr) if arr.dtype != np.uint8 else arr, mode="RGB")
    arr = apply_modality_lut(arr, ds)  # RescaleSlope / RescaleIntercept (or a modality LUT)
    out = _scale_to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are bright
    return _gray_to_rgb(out)


def _is_dicom(path):
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def load_image(path):
    """Read an image as an 8-bit RGB PIL image.

    8-bit grayscale is kept as is; 16-bit (and 32-bit/float) grayscale is scaled by its own
    min..max, so a 12-bit radiograph stored in 16 bits is never clipped to white. Alpha is
    composited onto black (X-ray background). DICOM: modality LUT, MONOCHROME1 inverted, min..max.
    """
    path = Path(path)
    try:
        if _is_dicom(path):
            return _load_dicom(path)
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, with the path
            mode = img.mode
            if mode in ("L", "RGB"):
                out = img.copy()
            elif mode == "1":
                out = img.convert("L")
            elif mode.startswith("I") or mode == "F":
                return _gray_to_rgb(_scale_to_uint8(np.asarray(img)))
            elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                out = Image.alpha_composite(black, rgba)
            else:  # P without transparency, CMYK, YCbCr, ...
                out = img.convert("RGB")
        return out.convert("RGB")
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# transforms


class FloorCenterCrop(transforms.CenterCrop):
    """Centre crop whose offsets are rounded down, (H - S) // 2, as Hugging Face image processors crop;
    torchvision's CenterCrop rounds half up, one pixel apart when H - S is odd."""

    def forward(self, img):
        w, h = TF.get_image_size(img)
        ch, cw = self.size
        if ch > h or cw > w:
            return super().forward(img)  # pads as torchvision does
        return TF.crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw)


def build_transform(img_size, mean, std, train=False, rand_resize=False, resize_mode="crop",
                    interpolation="bilinear", resize_size=None, crop_rounding="round"):
    """The one transform pipeline. crop: resize shorter side to `resize_size` (default int(1.125 x size)), then
    crop; squash: resize to size x size.

    `interpolation` ("bilinear" or "bicubic") is the resize filter: ConceptCLIP's processor uses bicubic.
    `crop_rounding`: "round" (torchvision's CenterCrop, open_clip) or "floor" (Hugging Face processors), so that a
    model's processor is reproduced to the pixel (model.py reads both from the processor).
    """
    img_size = int(img_size)
    modes = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    if crop_rounding not in ("round", "floor"):
        raise ValueError(f"crop_rounding must be 'round' or 'floor', got {crop_rounding!r}")
    interp = modes[interpolation]
    center_crop = FloorCenterCrop if crop_rounding == "floor" else transforms.CenterCrop
    if resize_mode == "crop":
        steps = [transforms.Resize(int(resize_size or 1.125 * img_size), interpolation=interp)]
        if train:
            steps.append(transforms.RandomResizedCrop(img_size) if rand_resize else center_crop(img_size))
            steps.append(transforms.RandomHorizontalFlip())
        else:
            steps.append(center_crop(img_size))
    elif resize_mode == "squash":
        steps = [transforms.Resize((img_size, img_size), interpolation=interp)]
        if train:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        raise ValueError(f"resize_mode must be 'crop' or 'squash', got {resize_mode!r}")
    steps += [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    return transforms.Compose(steps)


def train_image_dir(dataset_dir):
    """Training (and validation) images: DIR/train when it exists, else DIR."""
    d = Path(dataset_dir)
    return d / "train" if (d / "train").is_dir() else d


def test_image_dir(dataset_dir, test_dataset_dir=None):
    """Test images: --test-dataset-dir when given, else DIR/test when it exists, else DIR."""
    if test_dataset_dir is not None:
        return Path(test_dataset_dir)
    d = Path(dataset_dir)
    return d / "test" if (d / "test").is_dir() else d


test_image_dir.__test__ = False  # its name starts with test_: keep pytest from collecting it where imported


# ----------------------------------------------------------------------------------------------
# resized-image cache


class ResizedImageCache:
    """Each image decoded and resized once (the transform's first Resize), stored as a uint8 .npy file.

    .npy rather than PNG: reading it costs ~0.5 ms against ~5 ms for decoding a 432 px PNG, and it is
    still small (one channel for grayscale: ~190-250 KiB at 384 px, against ~0.5-1.3 MiB per 1024 px source).

    Key: absolute source path, its mtime (ns) and byte size, and the Resize parameters, so an edited
    source file or another image size gets a fresh entry. Entries are written atomically (temporary
    file then rename), so concurrent workers or ranks may fill the same cache.
    """

    VERSION = 2

    def __init__(self, cache_dir, resize):
        if not isinstance(resize, transforms.Resize):
            raise ValueError(f"the cache stores the transform's first Resize step, got {resize!r}")
        self.cache_dir = Path(cache_dir)
        self.resize = resize
        self.tag = (f"v{self.VERSION}|{resize.size}|{resize.interpolation.value}|"
                    f"{resize.max_size}|{resize.antialias}")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.cache_dir).close()
        except OSError as e:
            raise ValueError(f"--cache-dir {self.cache_dir} is not writable: {e}") from e

    def entry(self, path):
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{self.tag}"
        h = hashlib.sha1(key.encode()).hexdigest()
        return self.cache_dir / h[:2] / f"{h}.npy"

    def load(self, path):
        entry = self.entry(path)
        try:
            arr = np.load(entry, allow_pickle=False)
            if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
                return Image.fromarray(arr).convert("RGB")
        except (OSError, ValueError, EOFError):
            pass  # not cached yet (or a damaged entry): rebuild it from the source
        img = self.resize(load_image(path))
        arr = np.asarray(img)
        # grayscale stored as one channel (3x smaller); L -> RGB restores identical pixels
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return img


# ----------------------------------------------------------------------------------------------
# dataset


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ImageListDataset:
    """Images of one list file. Items are (image, label, index); image is a tensor when a transform is set.

    cache_dir: opt-in resized-image cache (ResizedImageCache). The transform must then be a Compose
    starting with Resize (as build_transform's is); the cached image is that Resize's exact output,
    so batches are identical with and without the cache.
    """

    def __init__(self, list_file, image_dir, dataset="covid", transform=None, class_names=None,
                 check_files=True, cache_dir=None):
        self.list_file = Path(list_file)
        self.image_dir = Path(image_dir)
        self.dataset = dataset
        self.records, self.class_names = _read_image_list(self.list_file, dataset, class_names)
        self.labels = np.array([r.label for r in self.records], dtype=np.int64)
        self.filenames = [r.filename for r in self.records]
        self.image_ids = list_image_ids(self.filenames)
        self.patient_ids = [r.patient_id for r in self.records]
        self.sources = [r.source for r in self.records]
        self.paths = [self.image_dir / r.filename for r in self.records]
        if check_files:
            self.check_files()
        self.transform = transform
        self.cache = None
        self._after_cache = transform
        if cache_dir is not None:
            if not isinstance(transform, transforms.Compose) or not transform.transforms:
                raise ValueError("--cache-dir needs a transform built by build_transform (Compose starting with Resize)")
            self.cache = ResizedImageCache(cache_dir, transform.transforms[0])
            self._after_cache = transforms.Compose(transform.transforms[1:])

    def check_files(self):
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} for {self.list_file} does not exist "
                f"(check --dataset-dir / --test-dataset-dir; training images are looked up in DIR/train when it exists)"
            )
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            shown = "\n  ".join(str(p) for p in missing[:MAX_LISTED_MISSING])
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.paths)} images listed in {self.list_file} are missing from "
                f"{self.image_dir}; first {min(len(missing), MAX_LISTED_MISSING)}:\n  {shown}\n"
                f"check --dataset-dir / --test-dataset-dir (training images are looked up in DIR/train when it exists)"
            )

    def check_unique_ids(self):
        """A ValueError naming the two list lines whose files get the same image id (outputs are keyed by id)."""
        first = {}
        for i, iid in enumerate(self.image_ids):
            if iid in first:
                lines = [n for n, _ in _parse_lines(self.list_file)]  # records keep no line numbers
                raise ValueError(f"{self.list_file}:{lines[i]}: {self.filenames[i]!r} gets image id {iid!r}, as does "
                                 f"{self.filenames[first[iid]]!r} on line {lines[first[iid]]}; image ids are filename "
                                 f"stems or paths without the extension: rename one file")
            first[iid] = i

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        path = self.paths[index]
        if self.cache is not None:
            img = self._after_cache(self.cache.load(path))
        else:
            img = load_image(path)
            if self.transform is not None:
                img = self.transform(img)
        return img, int(self.labels[index]), index

    def subset(self, indices):
        """A view of some items that keeps every per-item attribute (index = position in the subset)."""
        indices = [int(i) for i in indices]
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.records = [self.records[i] for i in indices]
        view.labels = self.labels[indices] if indices else self.labels[:0]
        for name in ("filenames", "image_ids", "patient_ids", "sources", "paths"):
            setattr(view, name, [getattr(self, name)[i] for i in indices])
        return view

    def __repr__(self):
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        per_class = ", ".join(f"{n}: {c}" for n, c in zip(self.class_names, counts))
        return (f"ImageListDataset({self.list_file}, {len(self)} images, "
                f"{len(set(self.patient_ids))} patients; {per_class})")


def shared_between(ds_a, ds_b):
    """(patients, filenames) that appear in both datasets."""
    return set(ds_a.patient_ids) & set(ds_b.patient_ids), set(ds_a.filenames) & set(ds_b.filenames)


def overlap_warning(ds_a, ds_b, name_a="train", name_b="test"):
    """Warn when two lists share patients or files (a leak between them); returns the message or None."""
    patients, files = shared_between(ds_a, ds_b)
    if not patients and not files:
        return None
    msg = (f"{name_a} list {ds_a.list_file} and {name_b} list {ds_b.list_file} share "
           f"{len(patients)} patients and {len(files)} files (e.g. {sorted(patients or files)[:3]}); "
           f"retrieval results will be optimistic; run audit_data.py for the full audit (copies and "
           f"near-duplicate images under other names and patient ids)")
    warnings.warn(msg, stacklevel=2)
    return msg


# ----------------------------------------------------------------------------------------------
# sampling and splits


class PKSampler:
    """Batch sampler: every batch holds p distinct classes x k images (a list of p*k indices).

    Each class cycles through a fresh random permutation of its images, so an epoch is never cut
    short when a class runs out. A class with fewer than k images contributes all its images plus
    k - n drawn at random with replacement (one warning). The batch stream depends only on
    (seed, epoch): rank r of world_size takes batches r, r + world_size, ..., so ranks draw
    different batches and together equal one process drawing world_size x num_batches.
    num_batches (per rank) defaults to ceil(N / (p * k * world_size)).
    """

    def __init__(self, labels, p, k, num_batches=None, seed=0, rank=0, world_size=1):
        labels = np.asarray(labels, dtype=np.int64)
        self.classes, counts = np.unique(labels, return_counts=True)
        if p < 1 or k < 1:
            raise ValueError(f"-p/--labels-per-batch and -k/--samples-per-label must be >= 1, got p={p}, k={k}")
        if p > len(self.classes):
            raise ValueError(f"-p/--labels-per-batch {p} is larger than the number of classes in the "
                             f"training list ({len(self.classes)}); use -p {len(self.classes)} or fewer")
        tiny = [f"class {c}: {n}" for c, n in zip(self.classes, counts) if n < 2]
        if tiny:
            raise ValueError(f"classes with fewer than 2 images cannot form a positive pair ({', '.join(tiny)})")
        small = [f"class {c}: {n}" for c, n in zip(self.classes, counts) if n < k]
        if small:
            warnings.warn(f"PKSampler: classes smaller than k={k} are drawn with replacement ({', '.join(small)})",
                          stacklevel=2)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.class_indices = [np.flatnonzero(labels == c) for c in self.classes]
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.num_batches = (math.ceil(len(labels) / (p * k * world_size)) if num_batches is None
                            else int(num_batches))
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [collections.deque() for _ in self.class_indices]
        for b in range(self.num_batches * self.world_size):
            chosen = rng.choice(len(self.class_indices), size=self.p, replace=False)
            batch = []
            for c in chosen:
                idx = self.class_indices[c]
                if len(idx) < self.k:
                    batch.extend(rng.permutation(idx).tolist() + rng.choice(idx, self.k - len(idx)).tolist())
                    continue
                q = queues[c]
                while len(q) < self.k:
                    q.extend(rng.permutation(idx).tolist())
                batch.extend(q.popleft() for _ in range(self.k))
            # every rank advances the same stream and keeps its own share
            if b % self.world_size == self.rank:
                yield batch


def patient_split(patient_ids, labels, val_fraction, seed):
    """Patient-disjoint (train_indices, val_indices), roughly stratified by label, seeded.

    Patients are grouped by their most frequent label; within each group patients are shuffled
    and moved to validation while that brings the group's validation image count closer to
    val_fraction of its images, always leaving one patient for training. If that leaves the
    validation set empty (tiny lists) one patient of the largest group is moved, when possible.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(patient_ids) != len(labels):
        raise ValueError(f"{len(patient_ids)} patient ids but {len(labels)} labels")
    by_patient = collections.defaultdict(list)
    for i, pid in enumerate(patient_ids):
        by_patient[pid].append(i)
    if val_fraction == 0:
        return np.arange(len(labels), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if len(by_patient) < 2:
        raise ValueError(f"cannot make a patient-disjoint validation split from {len(by_patient)} patient; "
                         f"pass --val-image-list or --val-fraction 0")
    groups = collections.defaultdict(list)
    for pid in sorted(by_patient):
        counts = np.bincount(labels[by_patient[pid]])
        groups[int(counts.argmax())].append(pid)
    rng = np.random.default_rng(seed)
    val_patients = set()
    for label in sorted(groups):
        pids = [groups[label][i] for i in rng.permutation(len(groups[label]))]
        target = val_fraction * sum(len(by_patient[p]) for p in pids)
        taken = 0
        for pid in pids[:-1]:
            n = len(by_patient[pid])
            if abs(taken + n - target) < abs(taken - target):
                val_patients.add(pid)
                taken += n
    if not val_patients:
        largest = max(sorted(groups), key=lambda g: len(groups[g]))
        if len(groups[largest]) > 1:
            val_patients.add(groups[largest][int(rng.integers(len(groups[largest])))])
        else:  # one patient per group: take one from some group, the class then trains without it
            val_patients.add(groups[largest][0])
    val = sorted(i for pid in val_patients for i in by_patient[pid])
    val_set = set(val)
    train = [i for i in range(len(labels)) if i not in val_set]
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


def get_gallery_parser():
    """Parent parser of the gallery flags (test.py, explain.py, audit_data.py): one definition each."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("gallery (retrieval archive)")
    g.add_argument("--gallery-image-list", type=Path, default=None,
                   help="the retrieval archive: queries are searched against these images instead of leave-one-out "
                        "(audit_data.py audits it like the other lists)")
    g.add_argument("--gallery-dataset-dir", type=Path, default=None,
                   help="folder of the gallery images; not given: the training folder of --dataset-dir")
    return p


def get_data_parser(lists=("train", "val", "test"), test_help="test list (images in the test folder)"):
    """The data flags shared by the scripts; `lists` picks the list flags a script actually reads."""
    from utils import default_workers
    parser = argparse.ArgumentParser(add_help=False)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="covid", choices=DATASETS,
                   help="label map: covid (normal/pneumonia/COVID-19), covidx-cxr2 (negative/positive), "
                        "generic (class names from the lists; ids follow the training list or checkpoint)")
    g.add_argument("--dataset-dir", type=Path, default=None,
                   help="image root; training images in DIR/train when it exists, else DIR")
    g.add_argument("--test-dataset-dir", type=Path, default=None,
                   help="test image folder; not given: DIR/test when it exists, else DIR")
    if "train" in lists:
        g.add_argument("--train-image-list", type=Path, default=None,
                       help="training list file: patient_id filename label [source]")
    if "val" in lists:
        g.add_argument("--val-image-list", type=Path, default=None,
                       help="validation list (images in the training folder)")
    if "test" in lists:
        g.add_argument("--test-image-list", type=Path, default=None, help=test_help)
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="data loader worker processes (0: the main process); default %(default)s = min(4, this "
                        "machine's cores)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="opt-in cache of decoded, resized images reused across epochs and runs")
    return parser

"""Saved embedding sets: the one owner of the files every tool after extraction reads and writes.

A set saved as X.npy is five files (the names below appear in this module only):
    X.npy              float32 (N, D), row i = image i of the list it was extracted from
    X_labels.npy       int64 (N,), ids into class_names
    X_image_ids.npy    (N,) str, unique (filename stems)
    X_patient_ids.npy  (N,) str (optional)
    X_meta.json        which model made the rows, from what, on which list (make_meta); class_names

    s = embeddings.load("emb/test.npy")            # checked: lengths, dtypes, NaN/inf, ids, labels, names
    g = embeddings.align(s, embeddings.load("emb/other_model_test.npy"))   # g's rows in s's image order
    embeddings.save("emb/fused.npy", embeddings.EmbeddingSet(...), overwrite=False)
    rows = embeddings.embed_dataset(model, dataset, device, batch_size=32)  # list order, 1 or N ranks

Imports numpy, json and pathlib only; torch, utils and model are imported inside the functions that need
them, so metric code and tests can read sets without building anything.
"""
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

META_VERSION = 1
SIDECARS = {"labels": "_labels.npy", "image_ids": "_image_ids.npy", "patient_ids": "_patient_ids.npy",
            "meta": "_meta.json"}
MAX_NAMED = 5  # rows / ids named in one error message


# ----------------------------------------------------------------------------- the set

@dataclass
class EmbeddingSet:
    """One saved set. labels / image_ids / patient_ids are None when their file is absent (and not required);
    class_names is None for arrays written without a _meta.json (label ids are then only numbers)."""
    embeddings: np.ndarray
    labels: np.ndarray | None = None
    image_ids: np.ndarray | None = None
    patient_ids: np.ndarray | None = None
    class_names: list | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from / saved to: named in every error

    @property
    def n(self):
        return int(self.embeddings.shape[0])

    @property
    def dim(self):
        return int(self.embeddings.shape[1])

    @property
    def model_identity(self):
        return model_identity(self.meta)

    @property
    def name(self):
        return str(self.path) if self.path is not None else "embedding set"

    def take(self, rows):
        """The set restricted to / reordered by `rows` (indices into this set)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return replace(self, embeddings=self.embeddings[rows], labels=pick(self.labels),
                       image_ids=pick(self.image_ids), patient_ids=pick(self.patient_ids))

    @classmethod
    def from_dataset(cls, embeddings, dataset, meta=None, path=None):
        """Rows of an ImageListDataset (embed_dataset's output) with its labels, ids and class names."""
        return cls(np.asarray(embeddings, np.float32), np.asarray(dataset.labels, np.int64),
                   np.asarray(dataset.image_ids, dtype=str), np.asarray(dataset.patient_ids, dtype=str),
                   list(dataset.class_names), dict(meta or {}), path)


def sidecar_paths(path):
    """{"embeddings": X.npy, "labels": X_labels.npy, "image_ids": ..., "patient_ids": ..., "meta": X_meta.json}."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".npy" else path
    return {"embeddings": stem.with_name(stem.name + ".npy"),
            **{k: stem.with_name(stem.name + s) for k, s in SIDECARS.items()}}


# ----------------------------------------------------------------------------- load

def _where(path, flag):
    return f"{flag} {path}" if flag else str(path)


def read_array(path, flag=None, fix="write it again with extract_embeddings.py"):
    """One .npy file, plain (no pickle), or one readable error naming the flag and the file: the only place
    the toolkit loads an .npy it was handed (sets through load(); other arrays, e.g. text embeddings, here)."""
    if not Path(path).is_file():
        raise ValueError(f"{_where(path, flag)}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # truncated file, pickled objects, not an .npy at all
        raise ValueError(f"{_where(path, flag)}: not a plain .npy array ({type(e).__name__}: {e}); {fix}") from e


def _read_meta(path):
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e}); re-extract the embeddings or remove it") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load(path, *, labels=None, image_ids=None, patient_ids=None, required=("labels", "image_ids"), flag=None):
    """Read X.npy and the files beside it, check them, return an EmbeddingSet.

    labels / image_ids / patient_ids: other .npy files to use instead of the ones beside X.npy (a script's
    --labels flag). required: which of labels / image_ids / patient_ids must exist. flag names the
    command-line flag in errors (e.g. "--embeddings"). Every problem is a ValueError naming the file.
    """
    if Path(path).suffix != ".npy":
        raise ValueError(f"{_where(path, flag)}: expected an (N, D) .npy file (X.npy, with X_labels.npy ... beside it)")
    side = sidecar_paths(path)
    path = side["embeddings"]
    emb = read_array(path, flag)
    given = {"labels": labels, "image_ids": image_ids, "patient_ids": patient_ids}
    arrays, files = {}, {}
    for key, other in given.items():
        f = Path(other) if other is not None else side[key]
        files[key] = f
        if other is None and not f.is_file():
            if key in required:
                raise ValueError(f"{f} not found: {path} needs its {key.replace('_', ' ')} beside it; write the set "
                                 f"with extract_embeddings.py (or pass the file with its flag)")
            continue
        arrays[key] = read_array(f)
    meta = _read_meta(side["meta"]) if side["meta"].is_file() else {}
    s = EmbeddingSet(emb, arrays.get("labels"), arrays.get("image_ids"), arrays.get("patient_ids"),
                     meta.get("class_names"), meta, path)
    return check(s, files={"embeddings": path, "meta": side["meta"], **files}, flag=flag)


def check(s, files=None, flag=None):
    """Check a set (lengths, dtypes, NaN/inf rows, duplicated ids, labels, class names) and return it with
    embeddings float32, labels int64 and ids str. `files` names the file of each part in the errors."""
    if files is None:
        files = sidecar_paths(s.path) if s.path is not None else {}

    def name(key):
        return _where(files.get(key, f"{s.name} ({key})"), flag if key == "embeddings" else None)

    emb = np.asarray(s.embeddings)
    if emb.ndim != 2 or emb.dtype.kind != "f" or 0 in emb.shape:
        raise ValueError(f"{name('embeddings')}: expected a non-empty 2-D (N, D) float array, got {emb.dtype} "
                         f"{emb.shape}; give the embeddings file, not a labels or ids file")
    out = {"embeddings": emb.astype(np.float32, copy=False)}
    for key in ("labels", "image_ids", "patient_ids"):
        a = getattr(s, key)
        out[key] = None if a is None else _check_column(np.asarray(a), key, len(emb), name(key), name("embeddings"))
    _check_finite(out["embeddings"], out["image_ids"], name("embeddings"))
    if out["image_ids"] is not None:
        uniq, counts = np.unique(out["image_ids"], return_counts=True)
        dup = uniq[counts > 1]
        if len(dup):
            raise ValueError(f"{name('image_ids')}: {len(dup)} image ids repeat ({_few(dup)}); rows cannot be "
                             f"matched by id: give each image a unique file name (the id is its stem) and re-extract")
    names = _check_names(s.class_names, name("meta"))
    _check_labels(out["labels"], names, name("labels"), name("meta"))
    meta = dict(s.meta or {})
    for key, got in (("embedding_dim", emb.shape[1]), ("num_images", len(emb))):
        if isinstance(meta.get(key), int) and meta[key] != got:
            raise ValueError(f"{name('meta')}: {key} {meta[key]} but {name('embeddings')} has {got}; the meta file "
                             f"belongs to another extraction")
    return replace(s, class_names=names, meta=meta, **out)


def _few(values):
    values = [str(v) for v in values]
    return ", ".join(values[:MAX_NAMED]) + (", ..." if len(values) > MAX_NAMED else "")


def _check_column(a, key, n, where, emb_where):
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{where}: {a.size} entries (shape {a.shape}) but {emb_where} has {n} rows; both must "
                         f"come from the same extraction")
    if key == "labels":
        if a.dtype.kind not in "iu":
            raise ValueError(f"{where}: expected integer class ids, got dtype {a.dtype}")
        return a.astype(np.int64)
    return a.astype(str)


def _check_finite(emb, ids, where):
    bad = np.flatnonzero(~np.isfinite(emb).all(1))
    if len(bad):
        rows = [f"{r}" + (f" ({ids[r]})" if ids is not None else "") for r in bad]
        raise ValueError(f"{where}: {len(bad)} of {len(emb)} rows hold NaN or inf (rows {_few(rows)}); "
                         f"re-extract those images")


def _check_names(names, where):
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names):
        raise ValueError(f"{where}: class_names must be a list of strings, got {names!r}")
    dup = sorted({c for c in names if list(names).count(c) > 1})
    if dup:
        raise ValueError(f"{where}: class_names {list(names)} repeat {dup}; give one name per class id")
    return list(names)


def _check_labels(labels, names, where, meta_where):
    if labels is None or not len(labels):
        return
    top = np.inf if names is None else len(names)
    bad = np.flatnonzero((labels < 0) | (labels >= top))
    if not len(bad):
        return
    if names is None:
        raise ValueError(f"{where}: negative label ids (first at row {bad[0]}: {labels[bad[0]]}); class ids are >= 0")
    raise ValueError(f"{where}: label ids {labels.min()}..{labels.max()} (first bad at row {bad[0]}) do not fit the "
                     f"{len(names)} class names {names} of {meta_where}; the labels and the meta file come from "
                     f"different extractions")


# ----------------------------------------------------------------------------- save

def check_output(path, overwrite=False, flag="--output"):
    """Before any work: `path` is an X.npy whose files do not exist (or overwrite) in a writable folder."""
    from utils import check_writable_dir
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"{flag} {path}: must end in .npy (e.g. embeddings/convnext.npy)")
    existing = [str(p) for p in sidecar_paths(path).values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{flag} {path}: {', '.join(existing)} already exist; choose another {flag} or pass "
                         f"--overwrite to replace them")
    check_writable_dir(path.parent, flag)
    return path


def save(path, s, overwrite=False, flag="--output"):
    """Write the set as X.npy and its files, each atomically; refuses (before writing anything) to replace
    existing files unless overwrite. s.meta must come from make_meta (one schema for every writer); the
    set's class names, width and row count are written into it, so the meta file cannot disagree with the
    arrays. A stale optional file of an earlier set (patient ids) is removed."""
    from utils import atomic_np_save, save_json
    path = check_output(path, overwrite, flag)
    side = sidecar_paths(path)
    s = check(replace(s, path=path), files=side)
    if s.meta.get("meta_version") != META_VERSION:
        raise ValueError(f"{path}: the set's meta was not made by embeddings.make_meta (no meta_version "
                         f"{META_VERSION}); build it with make_meta(model=..., checkpoint=..., ...)")
    if s.meta.get("class_names") is not None and list(s.meta["class_names"]) != s.class_names:
        raise ValueError(f"{path}: meta class_names {s.meta['class_names']} differ from the set's {s.class_names}")
    path.parent.mkdir(parents=True, exist_ok=True)
    for key in ("labels", "image_ids", "patient_ids"):
        a = getattr(s, key)
        if a is not None:
            atomic_np_save(side[key], a)
        elif side[key].exists():
            side[key].unlink()  # overwrite: an old file would be read as this set's
    atomic_np_save(side["embeddings"], s.embeddings)
    meta = dict(s.meta, class_names=s.class_names, embedding_dim=s.dim, num_images=s.n)
    save_json(meta, side["meta"])
    return replace(s, meta=meta)


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_WEIGHT_KEYS = ("pretrained_weights", "convnext_weights", "vit_weights", "backbone", "convnext_backbone",
                "vit_backbone", "conceptclip_path")


def make_meta(model=None, *, model_name=None, model_args=None, embedding_dim=None, checkpoint=None, weights=None,
              list_file=None, image_dir=None, dataset=None, class_names=None, seed=None, **extra):
    """The one meta schema of a saved set. `model` (or model_name / model_args / embedding_dim) says which
    model; its source is `checkpoint` (path; its sha256 is stored, which tells two trained heads apart
    wherever the file lies) or else `weights` (an id, e.g. "microsoft/rad-dino"; default: the weight names
    in model_args, or "random init" for --no-pretrained). `extra` keys (e.g. inputs, world_size) are kept."""
    from utils import git_revision
    from model import ENCODERS, encoder_info, encoder_row
    encoder = None  # a foundation encoder's row of model.ENCODERS (id, input, normalisation, licence, gated, ...)
    if model is not None:
        model = getattr(model, "module", model)    # DistributedDataParallel
        model = getattr(model, "_orig_mod", model)  # torch.compile
        encoder = encoder_info(model)
        model_name = model_name or model.model_name
        model_args = model_args if model_args is not None else dict(model.model_args)
        embedding_dim = embedding_dim or int(model.embedding_dim)
    model_args = dict(model_args or {})
    if encoder is None and model_name in ENCODERS:
        encoder = encoder_row(model_name)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ValueError(f"checkpoint {checkpoint}: file not found")
        source = {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint)}
    elif weights is not None:
        source = {"weights": str(weights)}
    elif model_args.get("pretrained", True) is False:
        source = {"weights": "random init", "seed": seed}
    else:
        source = {"weights": ", ".join(f"{k}={model_args[k]}" for k in _WEIGHT_KEYS if model_args.get(k))
                  or "pretrained"}
    meta = {"meta_version": META_VERSION, "model_name": model_name, "model_args": model_args,
            "model_source": source, "embedding_dim": None if embedding_dim is None else int(embedding_dim),
            "list_file": None if list_file is None else str(list_file),
            "image_dir": None if image_dir is None else str(image_dir), "dataset": dataset,
            "class_names": None if class_names is None else list(class_names), "seed": seed, "encoder": encoder,
            "git": git_revision(), "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
    clash = sorted(set(extra) & set(meta))
    if clash:
        raise ValueError(f"make_meta: extra keys {clash} are part of the schema; pass them by name")
    return {**meta, **extra}


def source_checkpoint(meta):
    """(checkpoint path, its sha256 or None) that a set's meta names as the model's source, else (None, None).

    Current meta: model_source {"checkpoint", "sha256"} (extract_embeddings.py --resume, train_fusion.py --apply).
    Older meta, no hash: "resume" (extract_embeddings.py, a train.py checkpoint) or "checkpoint" (train_fusion.py
    --apply, a fusion head)."""
    meta = meta or {}
    if "meta_version" in meta:
        src = meta.get("model_source") or {}
        return (src["checkpoint"], src.get("sha256")) if src.get("checkpoint") else (None, None)
    ckpt = meta.get("resume") or meta.get("checkpoint")
    return (ckpt, None) if ckpt else (None, None)


def model_identity(meta):
    """One string per model that produced a set, equal for sets of the same model, else different.

    Current meta: a checkpoint by its sha256 (the path may differ), else model name + arguments + weights
    (+ seed for random init). Older files: "resume" (extract_embeddings.py) or "checkpoint"
    (train_fusion.py --apply) by the path as written (os.path.normpath), else name + arguments. None without a
    meta file. An older file and a current one of the same checkpoint differ (one has a path, the other a hash).
    """
    if not meta:
        return None
    name = meta.get("model_name", "?")
    args = json.dumps(meta.get("model_args") or {}, sort_keys=True)
    if "meta_version" in meta:
        src = meta.get("model_source") or {}
        if src.get("sha256"):
            return f"{name} checkpoint sha256:{src['sha256']}"
        extra = f" seed {src.get('seed')}" if src.get("weights") == "random init" else ""
        return f"{name} {args} weights {src.get('weights')}{extra}"
    for key in ("resume", "checkpoint"):
        if meta.get(key):  # "./ck/a.pth" and "ck/a.pth" are one checkpoint (train_fusion.py compared them so)
            return f"{name} checkpoint {os.path.normpath(str(meta[key]))}"
    random_init = (meta.get("model_args") or {}).get("pretrained") is False
    return f"{name} {args}" + (f" seed {meta.get('seed')}" if random_init else "")


# ----------------------------------------------------------------------------- matching two sets

def take_ids(s, image_ids, other="the list"):
    """Rows of `s` for these image ids, in this order; error naming a few ids that `s` lacks."""
    if s.image_ids is None:
        raise ValueError(f"{s.name}: no image ids beside it, so its rows cannot be matched to {other}; "
                         f"re-extract it with extract_embeddings.py")
    want = [str(v) for v in image_ids]
    pos = {str(v): i for i, v in enumerate(s.image_ids)}
    missing = [v for v in want if v not in pos]
    if missing or len(want) != s.n:
        extra = sorted(set(pos) - set(want))
        raise ValueError(f"{s.name} ({s.n} images) and {other} ({len(want)} images) are not of the same images "
                         f"(only in {other}: {missing[:MAX_NAMED]}, only in {s.name}: {extra[:MAX_NAMED]}); "
                         f"extract both from the same image list")
    return s.take(np.array([pos[v] for v in want], dtype=np.int64))


def common_classes(a, b):
    """One class id per class NAME across two sets (e.g. queries and a gallery extracted separately).

    Returns (names, a_labels, b_labels): a's numbering, b relabelled into it, names only b has appended.
    Both without names: the ids are taken as they are. One without: an error (ids cannot be matched).
    """
    if a.class_names is None and b.class_names is None:
        return None, a.labels, b.labels
    if a.class_names is None or b.class_names is None:
        missing, other = (a, b) if a.class_names is None else (b, a)
        raise ValueError(f"{other.name} carries class names (its meta file) but {missing.name} has none, so their "
                         f"label ids cannot be matched by class; re-extract {missing.name} with "
                         f"extract_embeddings.py, or give both sets without meta files and the same integer ids")
    names = list(a.class_names) + [c for c in b.class_names if c not in a.class_names]
    remap = np.array([names.index(c) for c in b.class_names], dtype=np.int64)
    return names, a.labels, None if b.labels is None else (remap[b.labels] if len(b.labels) else b.labels)


def align(a, b, check_labels=True):
    """b with its rows in a's image order and its labels in a's class numbering (class_names = a's).

    For two models' embeddings of the same images. Errors: the image ids differ (naming a few of each),
    one set lacks class names, b has a class a does not, or (check_labels) an image's class differs.
    """
    if a.image_ids is None:
        raise ValueError(f"{a.name}: no image ids beside it, so {b.name} cannot be matched to it by image")
    b = take_ids(b, a.image_ids, a.name)
    names, _, lab = common_classes(a, b)
    if names is not None and len(names) > len(a.class_names):
        only = names[len(a.class_names):]
        used = [c for c in only if b.labels is not None and (lab == names.index(c)).any()]
        if used or b.labels is None:
            raise ValueError(f"class names differ: {b.name} has {b.class_names}, {a.name} has {a.class_names} "
                             f"(only in {b.name}: {only}); extract both with the same --dataset and class list")
    b = replace(b, labels=lab, class_names=None if names is None else list(a.class_names))
    if check_labels and a.labels is not None and b.labels is not None:
        diff = np.flatnonzero(a.labels != b.labels)
        if len(diff):
            raise ValueError(f"labels of {a.name} and {b.name} disagree on {len(diff)} of {a.n} images (first "
                             f"{a.image_ids[diff[0]]}: {_cls(a, a.labels[diff[0]])} vs {_cls(a, b.labels[diff[0]])}); "
                             f"extract both from the same image list")
    return b


def _cls(s, i):
    return repr(s.class_names[i]) if s.class_names is not None else str(int(i))


# ----------------------------------------------------------------------------- embedding a list

def embed_dataset(model, dataset, device, batch_size=32, workers=0, amp_dtype=None, progress=False,
                  desc="embedding", indices=None, channels_last=False, normalize=False, distributed=None):
    """Embeddings (len(indices or dataset), D) float32 with row i = item indices[i] (default: item i).

    The one list-order embedding loop (model.compute_embeddings underneath). Under torchrun (distributed
    None = when a process group is up) each rank embeds every world-th item and the rows are gathered, so
    every rank returns the same array as one process would. distributed=False embeds everything on this
    rank (e.g. rank 0 alone). Items are (image, label, index) as ImageListDataset's; normalize: unit rows
    in float32 (removes bf16 drift). Every rank must call it when distributed.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from model import _unwrap, compute_embeddings
    from utils import all_gather_object, get_rank, get_world_size, is_dist, is_main_process
    want = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    shard_it = is_dist() if distributed is None else bool(distributed)
    rank, world = (get_rank(), get_world_size()) if shard_it else (0, 1)
    # strided shards: every rank gets a similar mix, no padding or duplicated items
    shard = want[rank::world].tolist()
    device = torch.device(device)
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    idx, emb = compute_embeddings(model, loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                                  progress=progress and is_main_process(), desc=desc)
    parts = all_gather_object((idx, emb)) if shard_it else [(idx, emb)]
    dim = next((e.shape[1] for _, e in parts if len(e)), int(_unwrap(model).embedding_dim))
    row_of = {int(item): r for r, item in enumerate(want)}
    out = np.zeros((len(want), dim), np.float32)
    seen = np.zeros(len(want), np.int64)
    for i, e in parts:
        rows = np.array([row_of.get(int(v), -1) for v in i], dtype=np.int64)
        if (rows < 0).any():
            raise ValueError(f"{type(dataset).__name__} returned item index {int(i[rows < 0][0])}, which was not "
                             f"asked for: items must be (image, label, own index) as ImageListDataset's")
        out[rows] = e
        np.add.at(seen, rows, 1)
    if (seen != 1).any():
        raise ValueError(f"{int((seen != 1).sum())} of {len(want)} rows were embedded {sorted(set(seen.tolist()))} "
                         f"times instead of once: the dataset's items must carry their own index")
    if normalize:
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out

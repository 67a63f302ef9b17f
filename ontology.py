"""The finding vocabulary (data/ontology/) and the readers of concept-label files mapped onto it.

    vocab = load_vocabulary()                      # data/ontology/findings.tsv, label_maps.tsv, relations.tsv
    vocab.resolve("GGO")                           # -> "ground_glass_opacity" (id, name or synonym)
    vocab.code_text("consolidation")               # -> "UMLS C0521530, RadLex RID43255"
    labels = read_concept_labels("C.csv", vocab)   # image_id,CONCEPT,... with 1 / 0 / blank (= unknown)
    labels = read_concept_labels("train.csv", vocab, "chexpert")            # CheXpert train.csv / valid.csv
    labels = read_concept_labels("Data_Entry_2017.csv", vocab, "chestxray14")  # ChestX-ray14

Label semantics: 1 = present, 0 = absent, NaN = unknown (a blank cell; CheXpert's -1 "uncertain" too unless
``uncertain`` says otherwise). An unknown value leaves that image out of that concept's probe.
No I/O beyond reading the named files; every problem is a ValueError naming the file, the line and a fix.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VOCAB_DIR = Path(__file__).resolve().parent / "data" / "ontology"
KINDS = ("finding", "device", "disease", "modifier", "group")
LABEL_FORMATS = ("auto", "csv", "chexpert", "chestxray14")
_CUI = re.compile(r"^C\d{7}$")
_RID = re.compile(r"^RID\d+$")


def _norm(s: str) -> str:
    """Case, spaces, '-' and '_' ignored: 'Ground-glass opacity' == 'ground_glass_opacity'."""
    return re.sub(r"[\s_\-]+", "", str(s).strip().lower())


@dataclass
class Concept:
    id: str
    name: str
    kind: str
    is_a: str | None
    synonyms: list
    umls_cui: str = ""
    umls_source: str = ""
    radlex_id: str = ""
    radlex_source: str = ""
    notes: str = ""


@dataclass
class Vocabulary:
    concepts: dict                              # id -> Concept, file order
    label_maps: dict = field(default_factory=dict)   # dataset -> {label: concept id}
    relations: list = field(default_factory=list)    # dicts: disease, category, finding, modifiers, source, note
    _lookup: dict = field(default_factory=dict)

    def resolve(self, name: str):
        """Concept id for an id, a name or a synonym (normalised); None when unknown or ambiguous."""
        return self._lookup.get(_norm(name))

    def ancestors(self, cid: str) -> list:
        out, node = [], self.concepts[cid].is_a
        while node:
            out.append(node)
            node = self.concepts[node].is_a
        return out

    def kind(self, cid: str) -> str:
        return self.concepts[cid].kind

    def name(self, cid: str) -> str:
        return self.concepts[cid].name if cid in self.concepts else cid

    def modifier_group(self, cid: str):
        """'laterality', 'zone', 'distribution' or 'extent' for a modifier, else None."""
        c = self.concepts.get(cid)
        return c.is_a if c is not None and c.kind == "modifier" else None

    def code_text(self, cid: str) -> str:
        c = self.concepts.get(cid)
        if c is None:
            return ""
        codes = ([f"UMLS {c.umls_cui}"] if c.umls_cui else []) + ([f"RadLex {c.radlex_id}"] if c.radlex_id else [])
        return ", ".join(codes)

    def prompt_terms(self, cid: str) -> list:
        """The name and synonyms of a concept: the words a text prompt is built from."""
        c = self.concepts[cid]
        return [c.name] + [s for s in c.synonyms if s]


def _read_tsv(path: Path, required: list):
    if not path.is_file():
        raise ValueError(f"vocabulary file {path} not found (see data/ontology/README.md)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or [h.strip() for h in rows[0][:len(required)]] != required:
        raise ValueError(f"{path}:1: header must start with {required}")
    head = [h.strip() for h in rows[0]]
    out = []
    for n, r in enumerate(rows[1:], 2):
        if not any(x.strip() for x in r):
            continue
        if len(r) != len(head):
            raise ValueError(f"{path}:{n}: {len(r)} tab-separated fields, the header has {len(head)}")
        out.append((n, dict(zip(head, (x.strip() for x in r)))))
    return out


def load_vocabulary(directory=VOCAB_DIR) -> Vocabulary:
    """Read and check findings.tsv (+ label_maps.tsv, relations.tsv when present) in ``directory``."""
    d = Path(directory)
    path = d / "findings.tsv"
    cols = ["id", "name", "kind", "is_a", "synonyms", "umls_cui", "umls_source", "radlex_id", "radlex_source"]
    concepts = {}
    for n, r in _read_tsv(path, cols):
        cid = r["id"]
        if not re.fullmatch(r"[a-z0-9_]+", cid):
            raise ValueError(f"{path}:{n}: id {cid!r} must be lower-case letters, digits and '_'")
        if cid in concepts:
            raise ValueError(f"{path}:{n}: id {cid!r} appears twice")
        if r["kind"] not in KINDS:
            raise ValueError(f"{path}:{n}: kind {r['kind']!r} must be one of {KINDS}")
        if r["umls_cui"] and (not _CUI.match(r["umls_cui"]) or not r["umls_source"]):
            raise ValueError(f"{path}:{n}: UMLS CUI {r['umls_cui']!r} must look like C0000000 and name its source")
        if r["radlex_id"] and (not _RID.match(r["radlex_id"]) or not r["radlex_source"]):
            raise ValueError(f"{path}:{n}: RadLex id {r['radlex_id']!r} must look like RID123 and name its source")
        concepts[cid] = Concept(cid, r["name"], r["kind"], r["is_a"] or None,
                                [s.strip() for s in r["synonyms"].split("|") if s.strip()],
                                r["umls_cui"], r["umls_source"], r["radlex_id"], r["radlex_source"], r.get("notes", ""))
    for c in concepts.values():
        if c.is_a is not None and c.is_a not in concepts:
            raise ValueError(f"{path}: {c.id} is_a {c.is_a!r}, which is not a concept id")
        seen, node = {c.id}, c.is_a
        while node:
            if node in seen:
                raise ValueError(f"{path}: is_a cycle through {c.id!r}")
            seen.add(node)
            node = concepts[node].is_a
    vocab = Vocabulary(concepts)
    # lookup: ids first, then names, then synonyms; a synonym shared by two concepts resolves to neither
    lookup, ambiguous = {}, set()
    for level in ("id", "name", "synonym"):
        new = {}
        for c in concepts.values():
            keys = {"id": [c.id], "name": [c.name], "synonym": c.synonyms}[level]
            for k in keys:
                nk = _norm(k)
                if nk in lookup:
                    continue
                if nk in new and new[nk] != c.id:
                    ambiguous.add(nk)
                new[nk] = c.id
        lookup.update({k: v for k, v in new.items() if k not in ambiguous})
    vocab._lookup = lookup
    if (d / "label_maps.tsv").is_file():
        for n, r in _read_tsv(d / "label_maps.tsv", ["dataset", "label", "concept"]):
            if r["concept"] not in concepts:
                raise ValueError(f"{d / 'label_maps.tsv'}:{n}: concept {r['concept']!r} is not in findings.tsv")
            vocab.label_maps.setdefault(r["dataset"], {})[r["label"]] = r["concept"]
    if (d / "relations.tsv").is_file():
        for n, r in _read_tsv(d / "relations.tsv", ["disease", "category", "finding", "modifiers", "source"]):
            for cid in [r["disease"], r["finding"]] + [m for m in r["modifiers"].split("|") if m]:
                if cid not in concepts:
                    raise ValueError(f"{d / 'relations.tsv'}:{n}: {cid!r} is not in findings.tsv")
            vocab.relations.append(r)
    return vocab


# --------------------------------------------------------------------------- concept labels

@dataclass
class ConceptLabels:
    """Image-level concept labels: values (N, K) float, 1 present / 0 absent / NaN unknown."""
    image_ids: np.ndarray          # (N,) str
    concepts: list                 # K concept ids
    values: np.ndarray             # (N, K) float64
    patient_ids: np.ndarray | None = None
    source: str = ""
    columns: list = field(default_factory=list)   # the file's own column names, one per concept


def _check_columns(names, vocab: Vocabulary, path, what="column"):
    ids, unknown = [], []
    for nm in names:
        cid = vocab.resolve(nm)
        (unknown.append(nm) if cid is None else ids.append(cid))
    if unknown:
        raise ValueError(f"{path}: unknown concept {what}(s) {unknown}; use a concept id, name or synonym of "
                         f"data/ontology/findings.tsv (e.g. {', '.join(list(vocab.concepts)[1:6])}, ...)")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise ValueError(f"{path}: several {what}s name the same concept(s) {dup}")
    return ids


def _parse_value(cell: str, path, line, col):
    v = cell.strip()
    if v == "":
        return math.nan
    if v in ("1", "1.0"):
        return 1.0
    if v in ("0", "0.0"):
        return 0.0
    raise ValueError(f"{path}:{line}: column {col!r} has {cell!r}; values are 1, 0 or blank (unknown)")


def read_concept_csv(path, vocab: Vocabulary) -> ConceptLabels:
    """``image_id,CONCEPT,...`` with 1 / 0 / blank (blank = unknown). Optional column ``patient_id``."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "image_id":
        raise ValueError(f"{path}:1: the header must start with image_id, then one column per concept")
    head = [h.strip() for h in rows[0]]
    pcol = head.index("patient_id") if "patient_id" in head else None
    ccols = [i for i in range(1, len(head)) if i != pcol]
    if not ccols:
        raise ValueError(f"{path}:1: no concept columns after image_id")
    ids = _check_columns([head[i] for i in ccols], vocab, path)
    image_ids, pids, vals, first = [], [], [], {}
    for n, r in enumerate(rows[1:], 2):
        if not any(x.strip() for x in r):
            continue
        if len(r) != len(head):
            raise ValueError(f"{path}:{n}: {len(r)} fields, the header has {len(head)}")
        iid = r[0].strip()
        if not iid:
            raise ValueError(f"{path}:{n}: empty image_id")
        if iid in first:
            raise ValueError(f"{path}:{n}: image {iid!r} already labelled on line {first[iid]}")
        first[iid] = n
        image_ids.append(iid)
        if pcol is not None:
            pids.append(r[pcol].strip())
        vals.append([_parse_value(r[i], path, n, head[i]) for i in ccols])
    if not image_ids:
        raise ValueError(f"{path}: no label rows")
    return ConceptLabels(np.array(image_ids), ids, np.array(vals, np.float64),
                         np.array(pids) if pcol is not None else None, str(path), [head[i] for i in ccols])


def read_chexpert_csv(path, vocab: Vocabulary, uncertain: str = "unknown") -> ConceptLabels:
    """CheXpert train.csv / valid.csv: Path, Sex, Age, Frontal/Lateral, AP/PA, 14 labels (1.0, 0.0, -1.0, blank).

    Image id = patientNNNNN_studyN_viewN_frontal (the last three path parts, extension dropped, joined by '_'),
    patient id = patientNNNNN. This is the id dataset.list_image_ids gives the same file in an image list (its
    stems repeat, so it takes the last three parts), whatever folder the list's paths start in: CheXpert's
    'CheXpert-v1.0/train/...' or a list relative to CheXpert-v1.0/train.
    -1.0 (uncertain) -> unknown (``uncertain="unknown"``, U-Ignore), 1 (``"positive"``, U-Ones) or 0
    (``"negative"``, U-Zeros); blank (not mentioned) -> unknown.
    """
    path = Path(path)
    if uncertain not in ("unknown", "positive", "negative"):
        raise ValueError(f"uncertain must be unknown, positive or negative, got {uncertain!r}")
    lmap = vocab.label_maps.get("chexpert", {})
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    head = [h.strip() for h in rows[0]] if rows else []
    if "Path" not in head:
        raise ValueError(f"{path}:1: not a CheXpert label file (no 'Path' column)")
    lcols = [i for i, h in enumerate(head) if h in lmap]
    if not lcols:
        raise ValueError(f"{path}:1: none of the CheXpert labels {sorted(lmap)} is a column")
    unc = {"unknown": math.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    pi = head.index("Path")
    image_ids, pids, vals, first = [], [], [], {}
    for n, r in enumerate(rows[1:], 2):
        if not any(x.strip() for x in r):
            continue
        parts = r[pi].strip().replace("\\", "/").split("/")
        if len(parts) < 3:
            raise ValueError(f"{path}:{n}: Path {r[pi]!r} is not patient/study/view")
        iid = "_".join(parts[-3:-1] + [Path(parts[-1]).stem])   # = dataset.path_image_id(Path, 3)
        if iid in first:
            raise ValueError(f"{path}:{n}: image {iid!r} already labelled on line {first[iid]}")
        first[iid] = n
        image_ids.append(iid)
        pids.append(parts[-3])
        row = []
        for i in lcols:
            v = r[i].strip()
            if v in ("-1", "-1.0"):
                row.append(unc)
            else:
                row.append(_parse_value(v, path, n, head[i]))
        vals.append(row)
    return ConceptLabels(np.array(image_ids), [lmap[head[i]] for i in lcols], np.array(vals, np.float64),
                         np.array(pids), str(path), [head[i] for i in lcols])


def read_chestxray14_csv(path, vocab: Vocabulary) -> ConceptLabels:
    """ChestX-ray14 Data_Entry_2017.csv: 'Image Index', 'Finding Labels' (A|B or 'No Finding'), 'Patient ID'.

    The labels are complete per image (text-mined): a label not listed is 0. Image id = file stem.
    """
    path = Path(path)
    lmap = vocab.label_maps.get("chestxray14", {})
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    head = [h.strip() for h in rows[0]] if rows else []
    if "Image Index" not in head or "Finding Labels" not in head:
        raise ValueError(f"{path}:1: not a ChestX-ray14 file (needs 'Image Index' and 'Finding Labels')")
    ii, fi = head.index("Image Index"), head.index("Finding Labels")
    pi = head.index("Patient ID") if "Patient ID" in head else None
    labels = list(lmap)
    image_ids, pids, vals = [], [], []
    for n, r in enumerate(rows[1:], 2):
        if not any(x.strip() for x in r):
            continue
        found = [x.strip() for x in r[fi].split("|") if x.strip()]
        bad = [x for x in found if x not in lmap]
        if bad:
            raise ValueError(f"{path}:{n}: unknown ChestX-ray14 label(s) {bad}; known: {labels}")
        image_ids.append(Path(r[ii].strip()).stem)
        if pi is not None:
            pids.append(r[pi].strip())
        vals.append([1.0 if lab in found else 0.0 for lab in labels])
    return ConceptLabels(np.array(image_ids), [lmap[x] for x in labels], np.array(vals, np.float64),
                         np.array(pids) if pi is not None else None, str(path), labels)


def read_concept_labels(path, vocab: Vocabulary, fmt: str = "auto", uncertain: str = "unknown") -> ConceptLabels:
    """Any of the three formats; ``auto`` looks at the header."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concept label file {path} not found")
    if fmt not in LABEL_FORMATS:
        raise ValueError(f"label format must be one of {LABEL_FORMATS}, got {fmt!r}")
    if fmt == "auto":
        with open(path, newline="", encoding="utf-8") as f:
            head = [h.strip() for h in next(csv.reader(f), [])]
        fmt = ("chestxray14" if "Finding Labels" in head else "chexpert" if "Path" in head else "csv")
    if fmt == "chexpert":
        return read_chexpert_csv(path, vocab, uncertain)
    if fmt == "chestxray14":
        return read_chestxray14_csv(path, vocab)
    return read_concept_csv(path, vocab)


def write_concept_csv(path, image_ids, concepts, values, fmt="{:.4f}"):
    """image_id,CONCEPT,... rows; NaN written as blank (unknown). Returns the text (callers write atomically)."""
    lines = [",".join(["image_id"] + list(concepts))]
    for iid, row in zip(image_ids, np.asarray(values, np.float64)):
        lines.append(",".join([str(iid)] + ["" if not np.isfinite(v) else fmt.format(v) for v in row]))
    return "\n".join(lines) + "\n"

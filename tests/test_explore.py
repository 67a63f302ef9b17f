"""explore.py: the page built from test.py / concepts.py outputs and hand-made explain.py folders on the demo
data, and (--compute) from the files the tools themselves write for a tiny random checkpoint, opened in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser download). The browser tests skip when
Playwright or the browser is missing; the build tests run everywhere."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import embeddings
import explore as X
import metrics

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
K, N_CAND = 2, 20


def _main(module, argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def _pairs(s, k):
    """metrics.rank's top-k of every query of set s (same patient excluded), as explain.py ranks them."""
    return metrics.rank(s.embeddings, s.labels, k=k, exclude_self=True, query_groups=s.patient_ids,
                        full_ranking=False)


def _explain_dir(d, method, s, queries, evidence):
    """An explain.py --save-dir as explain.py writes it (explain.json's keys explore.py reads; maps/*.npy of the
    original image size): the top-K pairs of `queries`."""
    (d / "maps").mkdir(parents=True)
    rk, rng, pairs = _pairs(s, K), np.random.default_rng(len(method)), []
    for qi in queries:
        for r, gi in enumerate(rk.indices[qi]):
            qid, rid = str(s.image_ids[qi]), str(s.image_ids[gi])
            entry = {"query_id": qid, "rank": r + 1, "result_id": rid, "similarity": float(rk.sims[qi, r])}
            for side in ("result", "query"):
                entry[f"{side}_map"] = f"maps/{qid}__{r + 1}_{rid}__{side}.npy"
                np.save(d / entry[f"{side}_map"], rng.random((64, 64)).astype(np.float32))
            pairs.append(entry)
    (d / "explain.json").write_text(json.dumps({"method": method, "checkpoint": "tiny.pth", "pairs": pairs,
                                                "num_pairs": len(pairs), "scores": {}, "evidence": evidence}))


def _score(mean, lo, hi, n=6):
    return {"mean": mean, "ci95": [lo, hi], "n": n}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """What the tools write, made cheaply: an embedding set of the demo's 27 training images (test.py's
    --save-dir layout, results.json by test.py itself), two explain.py folders, concepts.py probes, a second set."""
    import concepts
    import test as T
    from dataset import ImageListDataset
    d = tmp_path_factory.mktemp("explore_runs")
    ds = ImageListDataset(demo_data / "train_split.txt", demo_data / "train", dataset="covid")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8))
    emb = (centres[ds.labels] + 1.2 * rng.standard_normal((len(ds), 8))).astype(np.float32)
    meta = embeddings.make_meta(model_name="synthetic", embedding_dim=8, weights="synthetic", list_file=ds.list_file,
                                image_dir=ds.image_dir, dataset="covid", class_names=ds.class_names)
    s = embeddings.EmbeddingSet(emb, ds.labels, np.array(ds.image_ids), np.array(ds.patient_ids),
                                list(ds.class_names), meta)
    embeddings.save(d / "results" / "embeddings.npy", s)
    assert _main(T, ["--embeddings", d / "results" / "embeddings.npy", "--exclude-same-patient", "--bootstrap", "20",
                     "--save-dir", d / "results", "--k-values", "1", "5"]) == 0
    s = embeddings.load(d / "results" / "embeddings.npy")
    ev = {"method": "gradcam", "target": "dot", "layers": ["backbone.layer4"], "map_grid": [2, 2], "num_pairs": 6,
          "scores": {"pointing_game": {"higher_is_better": True, "method": _score(0.5, 0.1, 0.9),
                                       "random_baseline": _score(0.17, 0.0, 0.5), "difference": _score(0.33, -0.2, 0.8),
                                       "verdict": "not distinguishable from random"}},
          "uniform_area_fraction": None, "summary": "gradcam: pointing_game 0.50 vs random 0.17",
          # the sanity block of /tmp/evidence_schema.md, failed; plus a key a later explain.py may add
          "sanity": {"cascade": ["head", "stem"], "threshold": 0.5, "passed": False, "random_baseline_passed": False,
                     "steps": [{"randomised": "head", "spearman": _score(0.9, 0.8, 1.0), "ssim": _score(0.8, 0.7, 0.9)},
                               {"randomised": "stem", "spearman": _score(0.85, 0.7, 0.95), "ssim": None}],
                     "random_baseline_steps": [], "summary": "gradcam FAILS (Spearman 0.85)"},
          "calibration_note": "a key this explore.py does not know"}
    ev["scores"]["road"] = {"higher_is_better": True, "method": _score(0.02, None, None), "random_baseline": None,
                            "difference": {"mean": None, "ci95": None, "n": 0}, "verdict": "no CI"}
    _explain_dir(d / "explain_gradcam", "gradcam", s, [0, 1, 2], ev)
    _explain_dir(d / "explain_random", "random", s, [1, 2], {"method": "random", "scores": {}, "sanity": None})
    assert _main(concepts, ["probe", "--embeddings", d / "results" / "embeddings.npy", "--concept-labels",
                            demo_data / "concept_labels.csv", "--save-dir", d / "probes", "--folds", "2"]) == 0
    other = rng.standard_normal(emb.shape).astype(np.float32)
    embeddings.save(d / "other.npy", embeddings.EmbeddingSet(other, s.labels, s.image_ids, s.patient_ids,
                                                             s.class_names, {**meta, "model_name": "other"}))
    return d


def build(runs, out, *extra, explain=("gradcam", "random")):
    return _main(X, ["--results", runs / "results", "--explain", *[runs / f"explain_{m}" for m in explain],
                     "--probes", runs / "probes" / "probes.npz", "--ood-reference", runs / "results" / "embeddings.npy",
                     "--ood-k", "3", "--compare", f"random={runs / 'other.npy'}",
                     "--hierarchy", Path(X.__file__).parent / "data" / "ontology" / "covidx_hierarchy.txt",
                     "--topk", K, "--candidates", N_CAND, "--save-dir", out, *extra])


@pytest.fixture(scope="module")
def page(runs):
    out = runs / "page"
    assert build(runs, out) == 0
    return out


def read_data(out):
    text = (out / "data.js").read_text()
    return json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))


def expected(runs):
    """metrics.rank's top-N of every query (the same exclusions as test.py's run)."""
    s = embeddings.load(runs / "results" / "embeddings.npy")
    return s, _pairs(s, N_CAND)


def test_build_reads_every_input_and_keeps_originals_out(runs, page, demo_data):
    data = read_data(page)
    s, rk = expected(runs)
    assert len(data["queries"]) == s.n and data["k"] == K and data["exclude_same_patient"]
    assert set(data["methods"]) == {"gradcam", "random"} and data["compare"] == ["random"]
    for i, q in enumerate(data["queries"]):
        assert [data["gallery"][g]["id"] for g in q["top"]] == [str(s.image_ids[j]) for j in rk.indices[i, :K]]
        assert 0 <= q["ood"]["pct"] <= 100 and len(q["why"]) == K and len(q["prof"]) == len(data["concepts"]["names"])
    assert data["methods"]["gradcam"]["evidence"]["scores"]["pointing_game"]["method"]["mean"] == 0.5
    thumbs = list((page / "thumbs").glob("*.jpg"))
    assert thumbs and not list(page.rglob("*.png")) or all(p.parent.name == "maps" for p in page.rglob("*.png"))
    assert build(runs, page) == 2  # an existing page is kept without --overwrite


def test_evidence_of_any_shape_is_read_without_failing():
    # a later explain.py: another score, a sanity block per method, fields of the wrong type or missing
    ev = X.read_evidence({"method": "gradcam", "layers": "backbone.stages.2", "map_grid": [2, "x"], "scores": {
        "road": {"method": {"mean": "0.3", "ci95": [0.1], "n": 4}, "verdict": None}, "broken": 3},
        "sanity": {"gradcam": {"passed": False, "steps": [{"randomised": "stem", "spearman": {"mean": 0.9}}]}},
        "road_percentiles": [10, 90]}, "gradcam")
    assert ev["layers"] is None and ev["map_grid"] is None and set(ev["scores"]) == {"road"}
    assert ev["scores"]["road"]["method"] == {"mean": None, "ci95": None, "n": 4}
    assert ev["sanity"]["passed"] is False and ev["sanity"]["last"]["spearman"]["mean"] == 0.9
    assert ev["other_keys"] == ["road_percentiles"]
    assert X.read_evidence(None, "m") is None and X.read_evidence("text", "m") is None
    assert X.read_evidence({}, "m")["sanity"] is None


def test_refine_order_by_hand():
    g = X.unit(np.array([[1, 0], [0, 1], [1, 1], [1, -1]], np.float32))
    q = X.unit(np.array([[1, 0.1]], np.float32))[0]
    dirs = np.array([[0, 1]], np.float32)
    idx, _ = X.refine_order(q, g, dirs, [0.0], np.arange(4), 4)
    assert idx.tolist() == [0, 2, 3, 1]
    idx, _ = X.refine_order(q, g, dirs, [5.0], np.arange(4), 4)  # pushed toward (0, 1)
    assert idx.tolist() == [1, 2, 0, 3]
    idx, _ = X.refine_order(q, g[[0, 0, 1]], dirs, [0.0], np.array([2, 0, 1]), 3)  # a tie: lower index first
    assert idx.tolist() == [0, 1, 2]


def test_queries_from_another_run_are_refused(runs, tmp_path, capsys):
    bad = tmp_path / "explain_other"
    shutil.copytree(runs / "explain_random", bad)
    ex = json.loads((bad / "explain.json").read_text())
    for p in ex["pairs"]:
        p["query_id"] = "other-" + p["query_id"]
    (bad / "explain.json").write_text(json.dumps(ex))
    assert _main(X, ["--results", runs / "results", "--explain", bad, "--save-dir", tmp_path / "p"]) == 2
    err = capsys.readouterr().err
    assert "different runs" in err and "explain_other" in err and not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def computed(demo_data, tmp_path_factory):
    """explore.py --compute on a tiny random checkpoint: test.py, extract_embeddings.py (the OOD reference),
    concepts.py probe and explain.py (gradcam and random, 1 query x top 2, pointing game and mass inside the demo's
    masks, the sanity check) write the inputs the page is built from, so a change of explain.json or of its maps'
    format fails here."""
    import torch
    import model as M
    d = tmp_path_factory.mktemp("explore_compute")
    torch.manual_seed(0)
    m = M.build_model("timm", backbone="test_resnet", pretrained=False, use_mxa=False, embedding_dim=8, img_size=48)
    torch.save(M.make_checkpoint(m, epoch=0), d / "tiny.pth")
    argv = ["--resume", d / "tiny.pth", "--dataset-dir", demo_data, "--compute", "results,explain,ood,concepts",
            "--test-image-list", demo_data / "test_split.txt", "--train-image-list", demo_data / "train_split.txt",
            "--concept-labels", demo_data / "concept_labels.csv", "--mask-dir", demo_data / "masks",
            "--exclude-same-patient", "--explain-queries", "1", "--explain-args", "--sanity --bootstrap 20",
            "--test-args", "--k-values 1 2 --vote-k 1 --bootstrap 0 --num-examples 0", "--workers", "0",
            "--device", "cpu", "--topk", K, "--candidates", N_CAND, "--ood-k", "3", "--save-dir", d / "page"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 48 px model: more threads only contend for the shared cores (5x slower under load)
    try:
        assert _main(X, argv) == 0
    finally:
        torch.set_num_threads(threads)
    return d / "page"


def test_compute_builds_the_page_from_the_tools_files(computed):
    from PIL import Image
    data, inp = read_data(computed), computed / "inputs"
    res = json.loads((inp / "results" / "results.json").read_text())
    assert data["metrics"]["R@1"] == res["R@1"] and len(data["queries"]) == res["num_queries"]
    assert all(0 <= q["ood"]["pct"] <= 100 and len(q["prof"]) == len(data["concepts"]["names"])
               for q in data["queries"])
    qids = [q["id"] for q in data["queries"]]
    for m in ("gradcam", "random"):
        ex = json.loads((inp / f"explain_{m}" / "explain.json").read_text())
        assert data["methods"][m]["evidence"] == X.read_evidence(ex["evidence"], m)
        ev = data["methods"][m]["evidence"]
        assert {"pointing_game", "mass_inside"} <= set(ev["scores"])
        assert ev["sanity"]["passed"] in ((False,) if m == "random" else (True, False))  # random fails by design
        assert ev["sanity"]["last"]["spearman"]["n"] == K
        assert ev["scores"]["pointing_game"]["method"]["n"] == len(ex["pairs"]) == K
        for p in ex["pairs"]:  # every explained pair's two maps are in the page's sprite, cell for cell
            qi = qids.index(p["query_id"])
            row = data["methods"][m]["maps"][str(qi)]
            cell = row["cells"][p["rank"] - 1]
            assert data["gallery"][data["queries"][qi]["top"][p["rank"] - 1]]["id"] == p["result_id"]
            sprite = np.asarray(Image.open(computed / row["file"]))
            for side, key in (("r", "result_map"), ("q", "query_map")):
                col = cell[side]
                want = X.map_cell(np.load(inp / f"explain_{m}" / p[key]), 32)
                assert np.array_equal(sprite[:, col * 32:(col + 1) * 32], want)
    ex = json.loads((inp / "explain_gradcam" / "explain.json").read_text())
    q = ex["pairs"][0]["query_id"]
    pw = _browser()
    b = Page(pw, computed, f"#q={q}&m=gradcam")
    try:
        pg = b.page
        assert pg.locator("#results .ov").count() == K and pg.locator(".qcard .ov").count() == 2
        text = pg.inner_text(".ev")
        assert "pointing_game" in text and "mass_inside" in text and "random baseline" in text
        assert ex["evidence"]["scores"]["pointing_game"]["verdict"] in text
        sanity = ex["evidence"]["sanity"]
        assert ("sanity check passed" if sanity["passed"] else "sanity check FAILED") in text
        assert pg.locator(".qcard .sanity-bad").count() == (0 if sanity["passed"] else 2)
        pg.select_option("#method", "random")  # random fails the check by construction: flagged next to its maps
        assert pg.locator("#results .ov").count() == K and "Evidence for random" in pg.inner_text(".ev")
        assert pg.locator(".qcard .sanity-bad").count() == 2 and pg.locator(".res .sanity-bad").count() == K
        assert "sanity check FAILED" in pg.inner_text(".ev")
        assert not b.errors and not b.outside
    finally:
        b.close()


# ----------------------------------------------------------------------------- in the browser

def _browser():
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return pw


class Page:
    """A Chromium page that records console errors, page errors and every request leaving the folder."""

    def __init__(self, pw, folder, hash_=""):
        self.folder = Path(folder).resolve()
        self.errors, self.outside = [], []
        self.p = pw.sync_playwright().start()
        self.browser = self.p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: None if r.url.startswith(self.folder.as_uri() + "/")
                     else self.outside.append(r.url))
        self.page.goto((self.folder / "index.html").as_uri() + hash_)
        self.page.wait_for_function("window.EXPLORE_READY && window.EXPLORE_EMB_READY", timeout=10000)

    def ids(self):
        return self.page.eval_on_selector_all("#results .res", "els => els.map(e => e.dataset.id)")

    def close(self):
        self.browser.close()
        self.p.stop()


def test_page_in_chromium(runs, page):
    pw = _browser()
    data = read_data(page)
    s, rk = expected(runs)
    b = Page(pw, page)
    try:
        pg = b.page
        assert pg.locator("#qlist li").count() == s.n
        qi = 1  # a query explained by both methods
        pg.click(f'#qlist li[data-i="{qi}"]')
        assert b.ids() == [str(s.image_ids[j]) for j in rk.indices[qi, :K]]
        assert "q=" + str(s.image_ids[qi]) in pg.evaluate("location.hash")
        over = lambda: pg.eval_on_selector_all("#results .ov", "els => els.map(e => e.dataset.src)")  # noqa
        first = over()
        ev = pg.inner_text(".ev")
        assert len(first) == K and "gradcam" in ev and "random baseline" in ev and "not distinguishable" in ev
        # gradcam's sanity block says FAILED: flagged in red next to both maps of the pair and on every result map
        assert pg.locator(".qcard .sanity-bad").count() == 2 and pg.locator(".res .sanity-bad").count() == K
        assert "sanity check FAILED (Spearman trained vs randomised 0.850 [0.700, 0.950] with stem" in ev
        assert "road" in ev and "not shown: calibration_note" in ev
        assert "(sanity FAILED)" in pg.inner_text("#method")
        pg.select_option("#method", "random")
        assert over() != first and "No evidence" in pg.inner_text(".ev")  # none computed: the page says so
        # random has no sanity block of its own; gradcam's measured the random baseline failing: flagged too
        assert pg.locator(".qcard .sanity-bad").count() == 2 and "measured in gradcam's" in pg.inner_text(".ev")
        # the other backbone's top-k of this query, in metrics.rank's order on that set, with thumbnails
        o = embeddings.load(runs / "other.npy")
        ork = _pairs(o, K)
        assert pg.eval_on_selector_all("#cmp-0 .cmpres", "els => els.map(e => e.dataset.id)") == \
            [str(o.image_ids[j]) for j in ork.indices[qi]]
        assert pg.locator("#cmp-0 .cmpres img.thumb").count() == K and "overlap@2" in pg.inner_text("#cmp-0")
        same = [o.labels[j] == s.labels[qi] for j in ork.indices[qi]]
        assert pg.eval_on_selector_all("#cmp-0 .cmpres .badge.b-same, #cmp-0 .cmpres .badge.b-diff",
                                       "els => els.map(e => e.textContent)") == \
            ["same" if x else "different" for x in same]
        # a concept slider: the page's order against refine_order on the same files
        names = data["concepts"]["names"]
        qe = X.unit(s.embeddings)
        import concepts
        w = concepts.load_probes(runs / "probes" / "probes.npz")["weights"].astype(np.float64)
        dirs = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)
        changed = False
        for c, a in [(c, a) for c in range(len(names)) for a in (1.0, -1.0)]:
            pg.eval_on_selector(f"#s-{c}", f"el => {{ el.value = {a}; el.dispatchEvent(new Event('change')); }}")
            alphas = np.zeros(len(names))
            alphas[c] = a
            want, _ = X.refine_order(qe[qi], qe, dirs, alphas, rk.indices[qi], K)
            got = b.ids()
            assert got == [str(s.image_ids[j]) for j in want]
            assert f"a={names[c]}:{a:g}" in pg.evaluate("decodeURIComponent(location.hash)")
            pg.click("#reset")
            if got != [str(s.image_ids[j]) for j in rk.indices[qi, :K]]:
                changed = (names[c], a, got)
                break
        assert changed, "no slider moved the order: the check above compared nothing new"
        # the slider state in the URL gives the same view (a shared link)
        pg.evaluate(f"location.hash = '#q={s.image_ids[qi]}&a={changed[0]}:{changed[1]:g}'")
        pg.wait_for_function("document.getElementById('refined-note') !== null")
        assert b.ids() == changed[2]
        pg.click("#reset")
        # filters, keyboard, summary
        pg.select_option("#f-top1", "wrong")
        n_wrong = sum(data["gallery"][q["top"][0]]["label"] != q["label"] for q in data["queries"])
        assert pg.locator("#qlist li").count() == n_wrong
        pg.select_option("#f-top1", "")
        pg.click("#qlist li >> nth=0")
        pg.keyboard.press("j")
        assert "q=" + str(s.image_ids[1]) in pg.evaluate("location.hash")
        pg.click("#tab-summary")
        text = pg.inner_text("#view-summary")
        assert "R@1" in text and "Per class" in text and "OOD scores" in text and pg.locator("#ood-hist").count() == 1
        assert not b.errors, b.errors
        assert not b.outside, b.outside
    finally:
        b.close()


def test_missing_image_and_wrong_map_size_are_notes_on_the_page(runs, demo_data, tmp_path):
    pw = _browser()
    imgs = tmp_path / "images"
    shutil.copytree(demo_data / "train", imgs)
    s, rk = expected(runs)
    gone = str(s.image_ids[rk.indices[1, 0]])
    (imgs / f"{gone}.png").unlink()
    ex_dir = tmp_path / "explain_random"
    shutil.copytree(runs / "explain_random", ex_dir)
    pairs = json.loads((ex_dir / "explain.json").read_text())["pairs"]
    pair = next(p for p in pairs if p["query_id"] == str(s.image_ids[1]) and p["rank"] == 2)
    np.save(ex_dir / pair["result_map"], np.zeros((7, 9), np.float32))
    out = tmp_path / "page"
    assert _main(X, ["--results", runs / "results", "--explain", ex_dir, "--image-dir", imgs, "--topk", K,
                     "--candidates", N_CAND, "--save-dir", out]) == 0
    b = Page(pw, out, f"#q={s.image_ids[1]}")
    try:
        text = b.page.inner_text("#detail")
        assert "no image: image file" in text and gone in text
        assert "has shape (7, 9) but the image is (64, 64): not shown" in text
        assert b.page.locator("#results .res").count() == K  # the rest of the page is drawn
        assert not b.errors and not b.outside
    finally:
        b.close()


def test_bad_flags_and_ood_of_another_run_are_one_line(runs, tmp_path, capsys):
    base = ["--results", runs / "results", "--save-dir", tmp_path / "p"]
    assert _main(X, base + ["--compute", "explain"]) == 2
    assert "--compute explain needs --resume, --dataset-dir" in capsys.readouterr().err
    assert _main(X, base + ["--compute", "nope"]) == 2 and "unknown ['nope']" in capsys.readouterr().err
    assert _main(X, base + ["--topk", "5", "--candidates", "20"]) == 2
    assert "at least 10 x --topk" in capsys.readouterr().err
    ood_dir = tmp_path / "ood"
    ood_dir.mkdir()
    (ood_dir / "ood.json").write_text(json.dumps({"method": "knn", "threshold": {"value": 1.0}}))
    (ood_dir / "ood_scores.csv").write_text("row,set,image_id,label,truth,score,flagged\n0,query,x1,normal,ID,0.5,0\n")
    assert _main(X, base + ["--ood", ood_dir]) == 2
    assert "different runs" in capsys.readouterr().err and not (tmp_path / "p").exists()
    # files another tool wrote but unreadable: the one line names the file (and the line of a CSV)
    (ood_dir / "ood_scores.csv").write_text("row,set,image_id,label,truth,score,flagged\n0,query,x1,normal,ID,high,0\n")
    assert _main(X, base + ["--ood", ood_dir]) == 2
    assert f"{ood_dir / 'ood_scores.csv'}, line 2: score 'high' is not a number" in capsys.readouterr().err
    (ood_dir / "ood.json").write_text(json.dumps({"method": "knn"}))
    assert _main(X, base + ["--ood", ood_dir]) == 2
    assert f"{ood_dir / 'ood.json'}: no threshold" in capsys.readouterr().err
    bad = tmp_path / "explain_bad"
    bad.mkdir()
    (bad / "explain.json").write_text('{"method": "gradcam", "pairs": [')
    assert _main(X, base + ["--explain", bad]) == 2
    assert f"--explain {bad / 'explain.json'}: not a readable JSON file" in capsys.readouterr().err
    (bad / "explain.json").write_text(json.dumps({"method": "gradcam", "pairs": [{"query_id": "x", "rank": 1}]}))
    assert _main(X, base + ["--explain", bad]) == 2
    assert f"--explain {bad / 'explain.json'}: pair 0 has no result_id" in capsys.readouterr().err
    assert _main(X, base + ["--explain-args=--no-such-flag"]) == 2
    assert "--explain-args '--no-such-flag': explain.py does not take these" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

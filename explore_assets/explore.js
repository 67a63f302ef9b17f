// Retrieval explorer: a static page over data.js (window.EXPLORE) written by explore.py. No network, no library.
(function () {
  "use strict";
  var D = window.EXPLORE;
  var $ = function (id) { return document.getElementById(id); };
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function fmt(x, d) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(d === undefined ? 3 : d); }
  function fail(msg) { var e = $("error"); e.hidden = false; e.textContent = msg; }
  if (!D) { fail("data.js is missing or did not load: rebuild the page with explore.py"); return; }

  var methods = Object.keys(D.methods || {});
  var S = {q: 0, r: 0, m: methods[0] || null, o: 0.6, a: {}, view: "queries"};
  var shown = [];           // filtered query indices
  var EMB = null;           // decoded embeddings (embeddings.js), loaded after the first paint

  // ------------------------------------------------------------------ URL hash (shareable view)
  function readHash() {
    var h = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return; var p = kv.split("="); h[decodeURIComponent(p[0])] = decodeURIComponent(p.slice(1).join("="));
    });
    if (h.q !== undefined) { var i = D.queries.findIndex(function (x) { return x.id === h.q; }); if (i >= 0) S.q = i; }
    if (h.m && methods.indexOf(h.m) >= 0) S.m = h.m;
    if (h.o) S.o = Math.max(0, Math.min(1, parseFloat(h.o) || 0));
    if (h.r) S.r = Math.max(0, parseInt(h.r, 10) - 1 || 0);
    S.a = {};
    if (h.a) h.a.split(",").forEach(function (cv) { var p = cv.split(":"); var v = parseFloat(p[1]); if (p[0] && v) S.a[p[0]] = v; });
    S.view = h.v === "summary" ? "summary" : "queries";
  }
  function writeHash() {
    var a = Object.keys(S.a).filter(function (c) { return S.a[c]; }).map(function (c) { return c + ":" + S.a[c]; }).join(",");
    var h = "q=" + encodeURIComponent(D.queries[S.q].id) + "&r=" + (S.r + 1) + (S.m ? "&m=" + encodeURIComponent(S.m) : "") +
      "&o=" + S.o + (a ? "&a=" + a : "") + (S.view === "summary" ? "&v=summary" : "");
    history.replaceState(null, "", "#" + h);
  }

  // ------------------------------------------------------------------ refine by concept (formula in explore.py)
  function f32(b64) {
    var s = atob(b64), u = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Float32Array(u.buffer);
  }
  function decodeEmb() {
    var E = window.EXPLORE_EMB; if (!E) return null;
    return {dim: E.dim, q: f32(E.q), g: f32(E.g), dirs: E.dirs ? f32(E.dirs) : null};
  }
  function refined(qi) {
    // returns null when no slider is moved: the page then shows metrics.rank's order as written
    var names = D.concepts ? D.concepts.names : [];
    var moved = names.some(function (c) { return S.a[c]; });
    if (!moved || !EMB || !EMB.dirs) return null;
    var d = EMB.dim, q = new Float64Array(d), i, j, c;
    // NOTE: the query row of the embedding file is the query's own row; for leave-one-out it is also a gallery row
    for (i = 0; i < d; i++) q[i] = EMB.q[qi * d + i];
    for (c = 0; c < names.length; c++) {
      var a = S.a[names[c]] || 0; if (!a) continue;
      for (i = 0; i < d; i++) q[i] += a * EMB.dirs[c * d + i];
    }
    var nq = 0; for (i = 0; i < d; i++) nq += q[i] * q[i]; nq = Math.sqrt(nq);
    var cand = D.queries[qi].cand, out = [];
    for (j = 0; j < cand.length; j++) {
      var g = cand[j], s = 0, ng = 0;
      for (i = 0; i < d; i++) { var v = EMB.g[g * d + i]; s += q[i] * v; ng += v * v; }
      out.push({g: g, s: s / (nq * Math.sqrt(ng)), gi: D.gallery[g].gidx});
    }
    out.sort(function (x, y) { return y.s - x.s || x.gi - y.gi; });
    return out.slice(0, D.k + 1);
  }

  // ------------------------------------------------------------------ query list
  function top1Right(q) { return D.gallery[q.top[0]].label === q.label; }
  function buildFilters() {
    var sel = $("f-class");
    D.classes.forEach(function (c, i) { var o = document.createElement("option"); o.value = i; o.textContent = c; sel.appendChild(o); });
    if (!D.queries.some(function (q) { return q.ood; })) $("f-ood").disabled = true;
    ["f-class", "f-top1", "f-ood"].forEach(function (id) { $(id).onchange = renderList; });
    $("f-search").oninput = renderList;
  }
  function renderList() {
    var fc = $("f-class").value, ft = $("f-top1").value, fo = $("f-ood").value, fs = $("f-search").value.trim().toLowerCase();
    shown = [];
    D.queries.forEach(function (q, i) {
      if (fc !== "" && q.label !== +fc) return;
      if (ft && (ft === "right") !== top1Right(q)) return;
      if (fo && (!q.ood || (fo === "flag") !== q.ood.flag)) return;
      if (fs && q.id.toLowerCase().indexOf(fs) < 0) return;
      shown.push(i);
    });
    var ul = $("qlist"), html = [];
    shown.forEach(function (i) {
      var q = D.queries[i], ok = top1Right(q);
      html.push('<li data-i="' + i + '"' + (i === S.q ? ' class="sel"' : "") + '><span class="' + (ok ? "ok" : "bad") + '">' +
        (ok ? "✓" : "✗") + "</span><span>" + esc(q.id) + "</span><span>" + esc(D.classes[q.label]) + "</span>" +
        (q.ood && q.ood.flag ? '<span class="badge b-ood">OOD</span>' : "") + "</li>");
    });
    ul.innerHTML = html.join("");
    $("count").textContent = shown.length + " of " + D.queries.length + " queries";
  }
  $("qlist").onclick = function (e) {
    var li = e.target.closest("li"); if (!li) return;
    select(+li.dataset.i, 0);
  };
  function select(i, r) {
    S.q = i; S.r = r || 0;
    var old = document.querySelector("#qlist li.sel"); if (old) old.classList.remove("sel");
    var li = document.querySelector('#qlist li[data-i="' + i + '"]');
    if (li) { li.classList.add("sel"); li.scrollIntoView({block: "nearest"}); }
    renderDetail(); writeHash();
  }

  // ------------------------------------------------------------------ one query
  function pic(item, map, note) {
    // map: {file, col, n}: column col of a sprite of n map cells (explore.py write_sprite)
    var img = item.thumb ? '<img class="thumb" src="' + esc(item.thumb) + '" alt="' + esc(item.id) + '">'
      : '<div class="noimg">no image: ' + esc(item.note || "not found") + "</div>";
    var ov = map ? '<div class="ov" data-src="' + esc(map.file) + '#' + map.col + '" style="background-image:url(\'' + esc(map.file) +
      '\');background-size:' + map.n * 100 + '% 100%;background-position:' + (map.col / (map.n - 1) * 100) + '% 0;opacity:' + S.o + '"></div>' : "";
    return '<div class="pic">' + img + ov + "</div>" + (note ? '<div class="note">' + esc(note) + "</div>" : "") +
      (item.note && item.thumb ? '<div class="note">' + esc(item.note) + "</div>" : "");
  }
  function oodBadge(q) {
    if (!D.ood) return "";
    if (!q.ood) return '<span class="badge b-na">OOD: no score</span>';
    return '<span class="badge ' + (q.ood.flag ? "b-ood" : "b-id") + '">' + (q.ood.flag ? "OOD-flagged" : "in distribution") +
      ": score " + fmt(q.ood.score, 4) + " (threshold " + fmt(D.ood.threshold, 4) + "; " +
      (q.ood.pct === null ? "percentile n/a: no calibration scores in " + esc(D.ood.source) : q.ood.pct.toFixed(1) + "th percentile of ID validation rows") + ")</span>";
  }
  function mapCell(qi, g) {
    // the explained pair (query qi, gallery item g) for the current method, by gallery item (the refined order may
    // move it): {r: result side, q: query side (each {file, col, n} or undefined), rnote, qnote}
    if (!S.m) return null;
    var M = D.methods[S.m], row = M.maps[qi]; if (!row) return null;
    var top = D.queries[qi].top;
    for (var r = 0; r < top.length; r++) if (top[r] === g) {
      var c = row.cells[r]; if (!c) return null;
      var at = function (col) { return col === undefined ? null : {file: row.file, col: col, n: 2 * D.k}; };
      return {r: at(c.r), q: at(c.q), rnote: c.rnote, qnote: c.qnote};
    }
    return null;
  }
  function sanityOf(m) {
    // explain.json evidence.sanity as explore.py read it: {passed: true / false / null, summary, last, ...} or null
    var M = m && D.methods[m]; return M && M.evidence && M.evidence.sanity ? M.evidence.sanity : null;
  }
  function sanityFlag(m) {
    // next to every map of method m: a failed model-randomisation check in red, otherwise its state in small type
    var s = sanityOf(m);
    if (s && s.passed === false) return '<div class="sanity-bad" data-method="' + esc(m) + '">' + esc(m) +
      " FAILED the sanity check: its maps barely change when the model's weights are randomised; this map does not explain the model</div>";
    if (s && s.passed === true) return '<div class="cap sanity-ok">' + esc(m) + " passed the sanity check (model randomisation)</div>";
    return m ? '<div class="cap">' + esc(m) + ": sanity check not run (explain.py --sanity)</div>" : "";
  }
  function ci(s) { return !s ? "n/a" : fmt(s.mean) + (s.ci95 ? " [" + fmt(s.ci95[0]) + ", " + fmt(s.ci95[1]) + "]" : ""); }
  function evidence(m) {
    // explain.json's "evidence" block (scores next to random, paired difference, verdict, sanity); older files: "scores"
    if (!m) return '<div class="ev"><span class="none">No explanation maps were given (--explain).</span></div>';
    var M = D.methods[m], ev = M.evidence || null, h = '<div class="ev"><b>Evidence for ' + esc(m) + "</b> (" + esc(M.dir) + ")";
    var evs = ev && ev.scores ? Object.keys(ev.scores) : [];
    var old = Object.keys(M.scores || {}).filter(function (k) { return M.scores[k] && M.scores[k][m]; });
    if (!evs.length && !old.length) {
      h += '<div class="none">No evidence: explain.py computed no score for these maps (run it with --evaluate and a ' +
        "finding mask), so nothing says they beat a random map. Read them as unverified.</div>";
    } else if (evs.length) {
      h += "<table><tr><th>score</th><th>" + esc(m) + " [95% CI]</th><th>random baseline</th><th>difference</th><th>verdict</th></tr>";
      evs.forEach(function (k) {
        var e = ev.scores[k], v = e.verdict || "";
        h += "<tr><td>" + esc(k) + (e.higher_is_better === false ? " (lower is better)" : "") + (e.method && e.method.n !== null ? '<div class="cap">n = ' + e.method.n + "</div>" : "") + "</td><td>" + ci(e.method) + "</td><td>" + ci(e.random_baseline) +
          "</td><td>" + ci(e.difference) + '</td><td class="' + (v.indexOf("better") === 0 ? "ok" : v.indexOf("worse") === 0 ? "bad" : "") + '">' + esc(v) + "</td></tr>";
      });
      h += "</table>";
    } else {
      h += "<table><tr><th>score</th><th>" + esc(m) + " mean [95% CI]</th><th>random baseline</th><th>n</th></tr>";
      old.forEach(function (k) { var a = M.scores[k][m]; h += "<tr><td>" + esc(k) + "</td><td>" + ci(a) + "</td><td>" + ci(M.scores[k].random_baseline) + "</td><td>" + a.n + "</td></tr>"; });
      h += "</table>";
    }
    if (ev) {
      if (ev.uniform_area_fraction) h += "<div>uniform map (chance of mass inside): " + ci(ev.uniform_area_fraction) + "</div>";
      if (ev.target) h += "<div>explains the " + esc(ev.target) + " target" + (ev.layers ? " at " + esc(ev.layers.join(", ")) : "") + (ev.map_grid ? " (" + ev.map_grid.join(" x ") + " grid)" : "") + "</div>";
      var sn = ev.sanity;
      if (!sn) h += '<div class="sanity">sanity check (model randomisation): not run (explain.py --sanity)</div>';
      else {
        var st = sn.passed === true ? "passed" : sn.passed === false ? "FAILED" : "no verdict";
        h += '<div class="sanity ' + (sn.passed === true ? "ok" : sn.passed === false ? "bad" : "") + '">sanity check ' + st +
          (sn.last && sn.last.spearman ? " (Spearman trained vs randomised " + ci(sn.last.spearman) + " with " + esc(sn.last.randomised) + " randomised" +
            (sn.threshold !== null ? "; fails at >= " + fmt(sn.threshold, 2) : "") + (sn.last.ssim ? "; SSIM " + fmt(sn.last.ssim.mean) : "") + ")" : "") + "</div>";
        if (sn.summary) h += '<div class="cap">' + esc(sn.summary) + "</div>";
        if (sn.random_baseline_passed === false && !sn.from) h += '<div class="cap">random baseline fails it, as it should (it ignores the model)</div>';
      }
      if (ev.other_keys && ev.other_keys.length) h += '<div class="cap">also in explain.json, not shown: ' + esc(ev.other_keys.join(", ")) + "</div>";
    }
    return h + "</div>";
  }
  function bars(qp, rp) {
    if (!D.concepts || !qp) return "";
    var t = D.concepts.threshold, h = ['<div class="bars"><div class="bar"><b>concept</b><b>query</b><b>result</b></div>'];
    D.concepts.names.forEach(function (c, i) {
      var a = qp[i], b = rp ? rp[i] : null, sh = a !== null && b !== null && a >= t && b >= t;
      var fill = function (v) { return '<div class="track"><div class="fill" style="width:' + (v === null ? 0 : 100 * v) + '%"></div></div>'; };
      h.push('<div class="bar' + (sh ? " shared" : "") + '" title="' + esc(c) + ": " + fmt(a, 2) + " / " + fmt(b, 2) + '"><span>' + esc(D.concepts.labels[i]) + "</span>" + fill(a) + fill(b) + "</div>");
    });
    return h.join("") + "<div>bars: probability; bold orange = a finding both show (>= " + t + ")</div></div>";
  }
  function sliders() {
    if (!D.concepts || !D.concepts.sliders) return "";
    var h = ['<div class="sliders"><h3>Refine by concept</h3>'];
    D.concepts.names.forEach(function (c, i) {
      var v = S.a[c] || 0;
      h.push('<div class="s"><label for="s-' + i + '">' + esc(D.concepts.labels[i]) + '</label><input type="range" id="s-' + i +
        '" data-c="' + esc(c) + '" min="-1" max="1" step="0.05" value="' + v + '"><span>' + v.toFixed(2) + "</span></div>");
    });
    h.push('<div class="hint">q\' = q + Σ a·w/|w| (probe directions); top ' + D.k + " re-ranked by cosine among the query's " + D.n_cand +
      " precomputed candidates, ties by gallery index. <button id=\"reset\">reset</button></div></div>");
    return h.join("");
  }
  function renderDetail() {
    var qi = S.q, q = D.queries[qi];
    if (!q) { $("detail").innerHTML = '<div class="warn">no query selected</div>'; return; }
    var ref = refined(qi);
    var order = ref ? ref.map(function (x) { return x.g; }) : q.top.concat([]);
    var sims = ref ? ref.map(function (x) { return x.s; }) : q.sims;
    var k = D.k;
    if (S.r >= k) S.r = 0;
    var g0 = order[S.r], it0 = D.gallery[g0], c0 = mapCell(qi, g0);
    var h = ['<div class="cols"><div class="maincol"><div class="row">'];
    // the selected pair side by side: the query's map toward result #r, the result's map toward the query
    h.push('<div class="card qcard"><h3>Query ' + esc(q.id) + "</h3>" + pic(q, c0 && c0.q, c0 && c0.qnote) + "<div>label <b>" + esc(D.classes[q.label]) +
      "</b>; patient " + esc(q.patient || "n/a") + "</div>" + oodBadge(q) + "<div class=\"cap\">map: the query toward result #" + (S.r + 1) + "</div>" + (c0 && c0.q ? sanityFlag(S.m) : ""));
    q.notes.forEach(function (n) { h.push('<div class="note">' + esc(n) + "</div>"); });
    h.push('</div><div class="card qcard"><h3>Result #' + (S.r + 1) + " " + esc(it0.id) + "</h3>" + pic(it0, c0 && c0.r, c0 && c0.rnote) +
      "<div>label <b>" + esc(D.classes[it0.label]) + "</b>; patient " + esc(it0.patient || "n/a") + "</div><div class=\"cap\">map: the result toward the query</div>" + (c0 && c0.r ? sanityFlag(S.m) : ""));
    if (S.m && !c0) h.push('<div class="note">no ' + esc(S.m) + " map for this pair (explain.py did not explain it)</div>");
    h.push('</div><div class="card whycard"><h3>Concepts</h3>');
    var why = q.why && q.top.indexOf(g0) >= 0 ? q.why[q.top.indexOf(g0)] : null;
    if (why) h.push('<div class="why">' + esc(why.text) + "</div>");
    h.push(D.concepts ? bars(q.prof, it0.prof) : "<div>no concept profiles given (--probes / --profile)</div>");
    h.push("</div></div>");
    if (ref) h.push('<div class="note" id="refined-note">Refined order (sliders moved): not metrics.rank\'s order; maps shown only for pairs explain.py explained.</div>');
    h.push('<div id="results">');
    for (var r = 0; r < k; r++) {
      var g = order[r], it = D.gallery[g], same = it.label === q.label, cell = mapCell(qi, g);
      var margin = sims[r] - sims[r + 1];
      h.push('<div class="card res' + (r === S.r ? " sel" : "") + '" data-r="' + r + '" data-id="' + esc(it.id) + '">' +
        pic(it, cell && cell.r, cell && cell.rnote) + (cell && cell.r && sanityOf(S.m) && sanityOf(S.m).passed === false ? '<div class="sanity-bad small">sanity FAILED</div>' : "") + (S.m && !cell ? '<div class="cap">no ' + esc(S.m) + " map (not explained)</div>" : "") + "<div><b>#" + (r + 1) + "</b> " + esc(it.id) + "</div><div>sim " + fmt(sims[r], 4) +
        " · margin " + fmt(margin, 4) + '</div><div><span class="badge ' + (same ? "b-same" : "b-diff") + '">' + (same ? "same" : "different") +
        ": " + esc(D.classes[it.label]) + "</span>" + (q.h && !ref ? ' <span class="badge b-na" title="hierarchy distance h / H (' + esc(D.hierarchy.distance) + ')">h ' + fmt(q.h[r], 1) + "/" + fmt(D.hierarchy.H, 1) + "</span>" : "") +
        (q.patient && it.patient === q.patient ? '<span class="badge b-pat">same patient</span>' : "") + "</div></div>");
    }
    h.push("</div>");
    if (D.compare.length && q.cmp) h.push(compareTable(q));
    h.push('</div><div class="sidecol">');
    if (methods.length) {
      h.push('<div class="controls">method <select id="method">' + methods.map(function (m) {
        var sn = sanityOf(m); return '<option value="' + esc(m) + '"' + (m === S.m ? " selected" : "") + ">" + esc(m) + (sn && sn.passed === false ? " (sanity FAILED)" : "") + "</option>"; }).join("") + '</select> opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="' + S.o + '"></div>');
      h.push("<div class=\"cap\">maps: positive part, each scaled to its own maximum (where, not how much)</div>");
    }
    h.push(evidence(S.m));
    h.push(sliders());
    h.push("</div></div>");
    $("detail").innerHTML = h.join("");
    wireDetail();
  }
  function compareTable(q) {
    // every backbone's top-k of this query, thumbnails in rank order, label same/different, overlap@k with this set
    var main = q.top.map(function (g) { return D.gallery[g].id; });
    var h = ['<div id="compare"><h3>Backbones: the same query</h3>'];
    var row = function (name, idx, top, sims, ov) {
      var r = ['<div class="cmprow" id="cmp-' + idx + '"><div class="cmpname"><b>' + esc(name) + "</b>" + (ov === null ? " (this set)" : "<br>overlap@" + D.k + " " + ov.toFixed(2)) + "</div>"];
      top.forEach(function (g, k) {
        var it = D.gallery[g], same = it.label === q.label, hit = ov !== null && main.indexOf(it.id) >= 0;
        r.push('<div class="cmpres' + (hit ? " hit" : "") + '" data-id="' + esc(it.id) + '" title="' + esc(it.id) + '">' +
          (it.thumb ? '<img class="thumb" src="' + esc(it.thumb) + '" alt="' + esc(it.id) + '">' : '<div class="noimg">no image</div>') +
          "<div>#" + (k + 1) + " " + esc(it.id) + "</div><div>sim " + fmt(sims[k], 3) + '</div><span class="badge ' + (same ? "b-same" : "b-diff") + '">' +
          (same ? "same" : "different") + "</span>" + (hit ? '<span class="badge b-na" title="also in this set\'s top-' + D.k + '">in both</span>' : "") + "</div>");
      });
      return r.join("") + "</div>";
    };
    h.push(row(D.model || "this set", "main", q.top, q.sims, null));
    D.compare.forEach(function (n, i) {
      var c = q.cmp[n]; if (!c) return;
      var ov = c.top.filter(function (g) { return main.indexOf(D.gallery[g].id) >= 0; }).length / D.k;
      h.push(row(n, i, c.top, c.sims, ov));
    });
    return h.join("") + '<div class="cap">each row: that embedding set\'s top ' + D.k + " by metrics.rank (same exclusions); green frame = also in this set's top " + D.k + "</div></div>";
  }
  function wireDetail() {
    var m = $("method"); if (m) m.onchange = function () { S.m = m.value; renderDetail(); writeHash(); };
    var o = $("opacity"); if (o) o.oninput = function () {
      S.o = +o.value; document.querySelectorAll(".ov").forEach(function (x) { x.style.opacity = S.o; }); writeHash(); };
    document.querySelectorAll(".sliders input[type=range]").forEach(function (s) {
      s.onchange = function () { S.a[s.dataset.c] = +s.value; renderDetail(); writeHash(); };
      s.oninput = function () { s.nextElementSibling.textContent = (+s.value).toFixed(2); };
    });
    var rs = $("reset"); if (rs) rs.onclick = function () { S.a = {}; renderDetail(); writeHash(); };
    document.querySelectorAll("#results .res").forEach(function (c) {
      c.onclick = function () { S.r = +c.dataset.r; renderDetail(); writeHash(); };
    });
  }

  // ------------------------------------------------------------------ summary view
  function renderSummary() {
    var h = ["<h2>Summary</h2>"], M = D.metrics || {};
    h.push("<h3>Retrieval metrics</h3><table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>");
    ["R@1", "R@5", "R@10", "mP@5", "mAP", "mAP@5", "mAP@10", "MAP@R"].forEach(function (k) {
      if (M[k] === undefined || M[k] === null) return;
      var ci = M.ci95 && M.ci95[k]; h.push("<tr><td>" + k + "</td><td>" + fmt(M[k], 4) + "</td><td>" + (ci ? "[" + fmt(ci[0], 4) + ", " + fmt(ci[1], 4) + "]" : "") + "</td></tr>");
    });
    h.push("</table><div>" + (M.num_queries || D.queries.length) + " queries" + (M.computed ? "; " + esc(M.computed) : "; from results.json (" + esc(D.sources.results) + ")") + "</div>");
    if (M.per_class) {
      h.push("<h3>Per class</h3><table><tr><th>class</th><th>R@1</th><th>mAP</th><th>queries</th></tr>");
      Object.keys(M.per_class).forEach(function (c) { var p = M.per_class[c]; h.push("<tr><td>" + esc(c) + "</td><td>" + fmt(p["R@1"], 4) + "</td><td>" + fmt(p.mAP, 4) + "</td><td>" + p.num_queries + "</td></tr>"); });
      h.push("</table>");
    }
    if (D.ood) h.push(oodHistogram());
    h.push("<h3>Explanation scores</h3>");
    if (!methods.length) h.push('<div class="ev"><span class="none">No explain.py folders given.</span></div>');
    methods.forEach(function (m) { h.push(evidence(m)); });
    h.push("<h3>Sources</h3><pre>" + esc(JSON.stringify(D.sources, null, 1)) + "\nmodel " + esc(D.model) + "; built " + esc(D.created_utc) + " (" + esc(D.git) + ")\nrefine: " + esc(D.formula) + "</pre>");
    $("view-summary").innerHTML = h.join("");
  }
  function oodHistogram() {
    var v = D.queries.filter(function (q) { return q.ood; }).map(function (q) { return q.ood.score; });
    if (!v.length) return "";
    var lo = Math.min.apply(null, v.concat([D.ood.threshold])), hi = Math.max.apply(null, v.concat([D.ood.threshold]));
    var nb = 30, w = (hi - lo) / nb || 1, cnt = new Array(nb).fill(0), fl = new Array(nb).fill(0);
    D.queries.forEach(function (q) { if (!q.ood) return; var b = Math.min(nb - 1, Math.floor((q.ood.score - lo) / w)); cnt[b]++; if (q.ood.flag) fl[b]++; });
    var mx = Math.max.apply(null, cnt), W = 420, H = 140, bw = W / nb, s = ['<svg width="' + (W + 10) + '" height="' + (H + 30) + '" id="ood-hist">'];
    cnt.forEach(function (c, b) {
      var hh = H * c / mx, hf = H * fl[b] / mx;
      s.push('<rect x="' + b * bw + '" y="' + (H - hh) + '" width="' + (bw - 1) + '" height="' + hh + '" fill="#6b8fb5"/>');
      if (fl[b]) s.push('<rect x="' + b * bw + '" y="' + (H - hf) + '" width="' + (bw - 1) + '" height="' + hf + '" fill="#b00020"/>');
    });
    var tx = (D.ood.threshold - lo) / (hi - lo || 1) * W;
    s.push('<line x1="' + tx + '" x2="' + tx + '" y1="0" y2="' + H + '" stroke="#000" stroke-dasharray="4"/>');
    s.push('<text x="0" y="' + (H + 14) + '" font-size="11">' + fmt(lo, 3) + '</text><text x="' + (W - 40) + '" y="' + (H + 14) + '" font-size="11">' + fmt(hi, 3) + "</text>");
    s.push('<text x="' + Math.min(tx + 3, W - 120) + '" y="12" font-size="11">threshold ' + fmt(D.ood.threshold, 4) + "</text></svg>");
    var n = D.queries.filter(function (q) { return q.ood && q.ood.flag; }).length;
    return "<h3>OOD scores of the queries</h3>" + s.join("") + "<div>" + n + " of " + v.length + " queries flagged (red; score > threshold, " +
      "larger = more unusual); source " + esc(D.ood.source) + (D.ood.calibration ? "; threshold: " + esc(D.ood.calibration) : "") + "</div>";
  }

  // ------------------------------------------------------------------ views, keys, start
  function setView(v) {
    S.view = v; $("view-queries").hidden = v !== "queries"; $("view-summary").hidden = v !== "summary";
    $("tab-queries").classList.toggle("on", v === "queries"); $("tab-summary").classList.toggle("on", v === "summary");
    if (v === "summary") renderSummary();
    writeHash();
  }
  $("tab-queries").onclick = function () { setView("queries"); };
  $("tab-summary").onclick = function () { setView("summary"); };
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    var p = shown.indexOf(S.q);
    if (e.key === "j" || e.key === "ArrowDown") { if (p < shown.length - 1) select(shown[p + 1]); e.preventDefault(); }
    else if (e.key === "k" || e.key === "ArrowUp") { if (p > 0) select(shown[p - 1]); e.preventDefault(); }
    else if (e.key === "ArrowRight") { S.r = Math.min(D.k - 1, S.r + 1); renderDetail(); writeHash(); }
    else if (e.key === "ArrowLeft") { S.r = Math.max(0, S.r - 1); renderDetail(); writeHash(); }
    else if (e.key === "m" && methods.length) { S.m = methods[(methods.indexOf(S.m) + 1) % methods.length]; renderDetail(); writeHash(); }
  });
  window.addEventListener("hashchange", function () { readHash(); renderDetail(); });

  try {
    $("title").textContent = D.title; document.title = D.title;
    $("info").textContent = D.queries.length + " queries · top " + D.k + " · " + (D.loo ? "leave-one-out" : "gallery " + D.sources.gallery) +
      (D.exclude_same_patient ? " · same patient excluded" : "") + " · " + (D.model || "") + " · " + D.tie_rule;
    $("notes").innerHTML = (D.notes || []).map(function (n) { return "<div>" + esc(n) + "</div>"; }).join("");
    readHash();
    buildFilters(); renderList(); renderDetail(); setView(S.view);
    window.EXPLORE_READY = true;
    window.EXPLORE_READY_MS = performance.now();  // list and first query drawn (bench/bench_explore.py)
    // embeddings for the sliders: loaded after the first paint (a local script; fetch() is blocked on file://)
    setTimeout(function () {
      var s = document.createElement("script"); s.src = "embeddings.js";
      s.onload = function () { EMB = decodeEmb(); window.EXPLORE_EMB_READY = true; if (Object.keys(S.a).length) renderDetail(); };
      s.onerror = function () { fail("embeddings.js did not load: the concept sliders cannot re-rank"); };
      document.body.appendChild(s);
    }, 0);
  } catch (err) {
    fail("the page could not be drawn: " + err.message + " (rebuild it with explore.py; report this if it persists)");
    throw err;
  }
})();

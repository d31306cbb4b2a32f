// lmrc show: renders the JSON in #lmrc-data. Every string from a document or a model goes into the page as DOM
// text (textContent, createTextNode), never as HTML, so a title or an LLM answer holding markup stays text.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("lmrc-data").textContent);
  const METHODS = DATA.methods;
  const LABELLED = DATA.labelled;
  const REL = DATA.relations || {};

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else if (k === "title") node.title = String(v);
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }
  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(2));
  const relName = (rid) => (REL[rid] !== undefined ? REL[rid] : rid);
  const entityName = (doc, i) => {
    const e = doc.entities[i];
    return e ? e.mentions[0][3] : "#" + i + " (no such entity)";
  };
  // Entity colours: golden-angle hues, light enough to read the text on.
  const colour = (i) => "hsl(" + ((i * 137.508) % 360).toFixed(1) + ", 75%, 84%)";

  // ------------------------------------------------------------------ status of a fact for a method
  function status(fact, m) {
    const found = fact.m[String(m)] !== undefined;
    if (!LABELLED) return found ? "found" : "";
    if (fact.gold) return found ? "right" : "missed";
    return found ? "wrong" : "";
  }
  function docCounts(doc, m) {
    const c = { right: 0, wrong: 0, missed: 0, found: 0 };
    for (const f of doc.facts) {
      const s = status(f, m);
      if (s) c[s] += 1;
    }
    return c;
  }

  // ------------------------------------------------------------------ header and scores
  function renderHeader() {
    const h = document.getElementById("header");
    h.appendChild(el("h1", {}, "lmrc show: " + METHODS.map((m) => m.name).join(" · ")));
    h.appendChild(el("div", { class: "machine" }, "Machine: " + (DATA.machine || "not recorded by this run")));
    h.appendChild(el("div", { class: "files" }, "From: " + DATA.files.join(", ")));
  }

  function renderScores() {
    const box = document.getElementById("scores");
    if (!LABELLED) {
      const t = el("table", { id: "score-table" }, el("tr", {}, el("th", {}, "method"), el("th", {}, "mode"), el("th", { class: "num" }, "relations")));
      METHODS.forEach((m, i) =>
        t.appendChild(el("tr", { "data-m": i }, el("td", {}, m.name), el("td", {}, m.mode), el("td", { class: "num", "data-count": "predicted" }, m.predictions)))
      );
      box.appendChild(el("p", { class: "note" }, "The documents carry no gold relations: no scores (give --gold to score)."));
      box.appendChild(t);
      return;
    }
    const head = ["method", "mode", "P", "R", "F1", "Ign F1", "intra F1", "inter F1", "right", "wrong", "missed"];
    const t = el("table", { id: "score-table" }, el("tr", {}, head.map((x, k) => el("th", { class: k > 1 ? "num" : "" }, x))));
    METHODS.forEach((m, i) => {
      const s = m.scores, r = s.relation;
      t.appendChild(
        el("tr", { "data-m": i },
          el("td", {}, m.name), el("td", {}, m.mode),
          el("td", { class: "num" }, pct(r.p)), el("td", { class: "num" }, pct(r.r)),
          el("td", { class: "num", "data-f1": r.f1 }, pct(r.f1)), el("td", { class: "num" }, pct(s.ign_f1)),
          el("td", { class: "num", title: s.intra.correct + " / " + s.intra.predicted + " / " + s.intra.gold }, pct(s.intra.f1)),
          el("td", { class: "num", title: s.inter.correct + " / " + s.inter.predicted + " / " + s.inter.gold }, pct(s.inter.f1)),
          el("td", { class: "num", "data-count": "right" }, r.correct),
          el("td", { class: "num", "data-count": "wrong" }, r.predicted - r.correct),
          el("td", { class: "num", "data-count": "missed" }, r.gold - r.correct)
        )
      );
    });
    box.appendChild(t);
    box.appendChild(el("p", { class: "note" },
      "Scores from lmrc's DocRED scorer (lmrc evaluate): P = right / unique predictions, R = right / gold facts. " +
      (METHODS[0].scores.train_used ? "Ign F1 leaves out facts seen in the training documents." : "No training documents were found: Ign F1 equals F1.")));
    const rels = new Map();
    METHODS.forEach((m) => Object.entries(m.scores.per_relation).forEach(([rid, sc]) => rels.set(rid, Math.max(rels.get(rid) || 0, sc.gold))));
    const pr = el("table", { id: "relation-scores" },
      el("tr", {}, el("th", {}, "relation"), el("th", { class: "num" }, "gold"), METHODS.map((m) => el("th", { class: "num" }, m.name + " F1"))));
    for (const [rid, gold] of rels) {
      pr.appendChild(el("tr", {}, el("td", {}, relName(rid) + " (" + rid + ")"), el("td", { class: "num" }, gold),
        METHODS.map((m) => {
          const sc = m.scores.per_relation[rid];
          return el("td", { class: "num", title: sc ? "P " + pct(sc.p) + ", R " + pct(sc.r) + ", right " + sc.correct + " of " + sc.predicted + " predicted" : "" }, sc ? pct(sc.f1) : "–");
        })));
    }
    box.appendChild(el("details", {}, el("summary", {}, "Per relation (" + rels.size + ")"), pr));
  }

  // ------------------------------------------------------------------ document list and search
  let current = -1;
  function renderList() {
    const list = document.getElementById("doc-list");
    DATA.docs.forEach((doc, i) => {
      const c = docCounts(doc, 0);
      const counts = LABELLED ? c.right + " ✓ " + c.wrong + " ✗ " + c.missed + " ·" : c.found + " found";
      const names = doc.entities.map((e) => e.mentions.map((m) => m[3]).join(" ")).join(" ").toLowerCase();
      const li = el("li", { "data-doc": i, onclick: () => openDoc(i) }, el("span", { class: "counts" }, counts), doc.title);
      li.dataset.search = (doc.title + " " + names).toLowerCase();
      list.appendChild(li);
    });
    const search = document.getElementById("search");
    search.addEventListener("input", () => {
      const q = search.value.trim().toLowerCase();
      for (const li of list.children) li.style.display = !q || li.dataset.search.includes(q) ? "" : "none";
    });
  }

  // ------------------------------------------------------------------ one document
  function renderText(doc) {
    const box = el("div", { class: "doc-text", id: "doc-text" });
    doc.sents.forEach((sent, s) => {
      const owner = new Array(sent.length).fill(null);  // the shortest mention over each word
      doc.entities.forEach((e, ei) => e.mentions.forEach((m, mi) => {
        if (m[0] !== s) return;
        for (let w = m[1]; w < m[2] && w < sent.length; w++) {
          const cur = owner[w];
          if (!cur || m[2] - m[1] < cur.len) owner[w] = { ei, mi, len: m[2] - m[1], end: m[2] };
        }
      }));
      const line = el("div", { class: "sent", "data-sent": s }, el("span", { class: "sent-id" }, String(s)));
      let w = 0;
      while (w < sent.length) {
        const o = owner[w];
        if (!o) { line.appendChild(document.createTextNode(sent[w] + " ")); w += 1; continue; }
        const words = [];
        while (w < sent.length && owner[w] && owner[w].ei === o.ei && owner[w].mi === o.mi) { words.push(sent[w]); w += 1; }
        const e = doc.entities[o.ei];
        const span = el("span", { class: "ment", "data-entity": o.ei, title: "E" + o.ei + " · " + e.type + " · " + e.mentions[0][3] },
          words.join(" "), el("sup", {}, e.type + " " + o.ei));
        span.style.background = colour(o.ei);
        line.appendChild(span);
        line.appendChild(document.createTextNode(" "));
      }
      box.appendChild(line);
    });
    return box;
  }

  function factRow(doc, f) {
    const cells = [
      el("td", {}, entityName(doc, f.h)),
      el("td", { title: f.r }, relName(f.r)),
      el("td", {}, entityName(doc, f.t)),
    ];
    if (LABELLED) cells.push(el("td", {}, f.gold ? "gold" : ""));
    const ev = new Set(f.ev);
    METHODS.forEach((m, i) => {
      const s = status(f, i);
      const found = f.m[String(i)];
      if (found && found.ev) found.ev.forEach((x) => ev.add(x));
      const mark = { right: "✓ right", wrong: "✗ wrong", missed: "· missed", found: "found", "": "" }[s];
      const detail = found ? " · " + found.src + (found.score !== undefined ? " · " + found.score : "") : "";
      cells.push(el("td", { class: s ? "st-" + s : "", "data-m": i, "data-status": s }, mark + detail));
    });
    cells.push(el("td", { class: "muted" }, f.loc || ""), el("td", { class: "muted" }, [...ev].sort((a, b) => a - b).join(", ")));
    const tr = el("tr", { class: "fact", "data-rel": f.r, "data-h": f.h, "data-t": f.t }, cells);
    tr.addEventListener("click", () => selectFact(doc, f, tr, [...ev]));
    return tr;
  }

  function selectFact(doc, f, tr, evidence) {
    document.querySelectorAll("tr.fact.selected").forEach((x) => x.classList.remove("selected"));
    document.querySelectorAll(".ment.hl-h, .ment.hl-t").forEach((x) => x.classList.remove("hl-h", "hl-t"));
    document.querySelectorAll(".sent.hl-s").forEach((x) => x.classList.remove("hl-s"));
    tr.classList.add("selected");
    document.querySelectorAll('.ment[data-entity="' + f.h + '"]').forEach((x) => x.classList.add("hl-h"));
    document.querySelectorAll('.ment[data-entity="' + f.t + '"]').forEach((x) => x.classList.add("hl-t"));
    evidence.forEach((s) => { const n = document.querySelector('.sent[data-sent="' + s + '"]'); if (n) n.classList.add("hl-s"); });
    const first = document.querySelector(".ment.hl-h");
    const box = document.getElementById("doc-text");
    if (first && box) box.scrollTop = Math.max(0, first.offsetTop - box.offsetTop - 24);
    renderPair(doc, f);
  }

  function renderPair(doc, f) {
    const panel = document.getElementById("pair-panel");
    panel.textContent = "";
    panel.appendChild(el("div", {}, el("b", {}, entityName(doc, f.h)), " → ", el("b", {}, entityName(doc, f.t)),
      el("span", { class: "muted" }, "  (E" + f.h + " → E" + f.t + (f.loc ? ", " + f.loc + "-sentence" : "") + ")")));
    METHODS.forEach((m, i) => {
      const parts = [el("b", {}, m.name + ": ")];
      const cands = (doc.candidates || {})[String(i)];
      if (cands) {
        const c = cands.find((row) => row[0] === f.h && row[1] === f.t);
        parts.push(c ? "stage-1 candidate, score " + Number(c[2]).toFixed(3) : "not a stage-1 candidate");
      }
      const prompts = ((doc.llm || {})[String(i)] || []).filter((p) => p.pairs.some((q) => q[0] === f.h && q[1] === f.t));
      if (!prompts.length && (doc.llm || {})[String(i)]) parts.push(" · the LLM was not asked about this pair");
      const lines = el("ul", {});
      prompts.forEach((p) => {
        const mine = (p.lines || []).filter((x) => x[3] === f.h && x[4] === f.t);
        mine.forEach((x) => {
          const inResult = doc.facts.some((g) => g.h === f.h && g.t === f.t && g.r === x[5] && g.m[String(i)]);
          let fate, cls;
          if (x[6] === "kept") {
            // aligned, yet not in this method's result: refine's gate removed it, or (a strict-names row of an
            // SBERT run) its relation name is not an exact one
            fate = inResult ? "kept" : "aligned, then left out of this result (refine's gate, or not an exact relation name)";
            cls = inResult ? "fate-kept" : "fate-gated";
          }
          else { fate = "dropped: " + x[6].replace(/_/g, " "); cls = "fate-dropped"; }
          lines.appendChild(el("li", {}, "(" + x[0] + "| " + x[1] + "| " + x[2] + ") ", el("span", { class: cls }, "→ " + fate + (x[5] ? " [" + relName(x[5]) + "]" : ""))));
        });
        if (p.lines && !mine.length) lines.appendChild(el("li", { class: "muted" }, p.hit_limit ? "no answer line: the answer was cut at its token limit" : "no answer line for this pair (None, or an unparsed line)"));
        if (!p.lines) lines.appendChild(el("li", { class: "muted" }, "this run did not save what became of each line; the answer:"));
        lines.appendChild(el("li", {}, el("pre", { class: "answer" }, p.text)));
      });
      panel.appendChild(el("div", {}, parts, prompts.length ? lines : null));
    });
  }

  function applyFilters() {
    const rel = document.getElementById("f-rel").value;
    const st = document.getElementById("f-status").value;
    const m = document.getElementById("f-method").value;
    let shown = 0;
    document.querySelectorAll("#fact-table tr.fact").forEach((tr) => {
      const cells = [...tr.querySelectorAll("td[data-m]")].filter((td) => m === "" || td.dataset.m === m);
      const ok = (!rel || tr.dataset.rel === rel) &&
        (m === "" || cells.some((td) => td.dataset.status)) &&
        (!st || cells.some((td) => td.dataset.status === st));
      tr.style.display = ok ? "" : "none";
      shown += ok;
    });
    document.getElementById("shown").textContent = shown + " shown";
  }

  function renderFilters(doc) {
    const rels = [...new Set(doc.facts.map((f) => f.r))].sort((a, b) => relName(a).localeCompare(relName(b)));
    const statuses = LABELLED ? ["right", "wrong", "missed"] : ["found"];
    const box = el("div", { class: "filters" },
      el("label", {}, "relation ", el("select", { id: "f-rel" }, el("option", { value: "" }, "all"), rels.map((r) => el("option", { value: r }, relName(r))))),
      el("label", {}, "status ", el("select", { id: "f-status" }, el("option", { value: "" }, "all"), statuses.map((s) => el("option", { value: s }, s)))),
      el("label", {}, "method ", el("select", { id: "f-method" }, el("option", { value: "" }, "any"), METHODS.map((m, i) => el("option", { value: i }, m.name)))),
      el("span", { id: "shown", class: "muted" }));
    box.querySelectorAll("select").forEach((s) => s.addEventListener("change", applyFilters));
    return box;
  }

  function renderAnswers(doc) {
    const out = [];
    METHODS.forEach((m, i) => {
      const prompts = (doc.llm || {})[String(i)];
      if (!prompts) return;
      const body = el("div", {});
      prompts.forEach((p, k) => {
        body.appendChild(el("div", { class: "muted" }, "prompt " + (k + 1) + ": " + p.pairs.length + " pairs asked" + (p.hit_limit ? ", answer cut at its token limit" : "")));
        body.appendChild(el("pre", { class: "answer" }, p.text));
      });
      out.push(el("details", { class: "answers" }, el("summary", {}, "The LLM's raw answers: " + m.name + " (" + prompts.length + " prompts)"), body));
    });
    return out;
  }

  function openDoc(i) {
    current = i;
    const doc = DATA.docs[i];
    document.querySelectorAll("#doc-list li.active").forEach((x) => x.classList.remove("active"));
    const li = document.querySelector('#doc-list li[data-doc="' + i + '"]');
    if (li) li.classList.add("active");
    const view = document.getElementById("doc-view");
    view.textContent = "";
    view.appendChild(el("h2", { id: "doc-title" }, doc.title));
    const head = [el("th", {}, "head"), el("th", {}, "relation"), el("th", {}, "tail")];
    if (LABELLED) head.push(el("th", {}, "gold"));
    METHODS.forEach((m) => head.push(el("th", {}, m.name)));
    head.push(el("th", {}, "sentences"), el("th", {}, "evidence"));
    const table = el("table", { id: "fact-table" }, el("tr", {}, head));
    doc.facts.forEach((f) => table.appendChild(factRow(doc, f)));
    const text = renderText(doc);
    view.appendChild(el("div", { class: "doc-top" },
      el("div", { class: "legend" }, "Mentions: one colour per entity, its type and number after it. Click a row of the table: ",
        el("span", { class: "ment hl-h" }, "head"), el("span", { class: "ment hl-t" }, "tail"), el("span", { class: "sent hl-s" }, "its sentences")),
      text,
      el("div", { id: "pair-panel" }, el("span", { class: "muted" }, "No row selected."))));
    view.appendChild(renderFilters(doc));
    view.appendChild(table);
    Object.entries(doc.hidden_wrong || {}).forEach(([m, n]) =>
      view.appendChild(el("p", { class: "note" }, METHODS[Number(m)].name + ": " + n + " more wrong predictions not listed (counted in the scores).")));
    renderAnswers(doc).forEach((d) => view.appendChild(d));
    applyFilters();
    if (location.hash !== "#doc=" + i) history.replaceState(null, "", "#doc=" + i);
  }

  renderHeader();
  renderScores();
  renderList();
  const wanted = /^#doc=(\d+)$/.exec(location.hash);
  if (DATA.docs.length) openDoc(wanted && Number(wanted[1]) < DATA.docs.length ? Number(wanted[1]) : 0);
  document.body.dataset.loadMs = String(Math.round(performance.now()));
  document.body.dataset.ready = "1";
})();

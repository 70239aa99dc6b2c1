// The conversation view: heat map (features x tokens), token text, alert markers and labels.
// Conversation text is adversarial: it is only ever assigned through textContent, never as
// HTML, and the page's CSP forbids inline script, so nothing in it can run.
"use strict";

(function () {
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const columns = data.tokens;
  const n = columns.position.length;
  // Token i: {p: position, t: text (or null), r: role, q: request id, n: full length if cut}.
  const tokens = columns.position.map((p, i) => ({
    p: p, t: columns.text[i], r: columns.role[i], q: columns.request[i], n: columns.cut[i],
  }));
  // Each token's feature values, as the JSON text the store holds; a damaged row is shown as
  // "nothing recorded" and named in a warning.
  const damaged = [];
  const rowText = document.getElementById("feature-rows").textContent;
  const lines = n ? rowText.split("\n") : [];
  const rows = tokens.map((t, i) => {
    const text = lines[i];
    try {
      const row = JSON.parse(text);
      if (row !== null && typeof row === "object" && !Array.isArray(row)) return row;
    } catch (e) { /* fall through */ }
    damaged.push(tokens[i].p);
    return {};
  });
  const nameSet = new Set();
  for (const row of rows) for (const k of Object.keys(row)) nameSet.add(k);
  for (const a of data.alerts) for (const k of Object.keys(a.feature_values)) nameSet.add(k);
  const names = Array.from(nameSet).sort();
  const values = names.map((name) => rows.map((row) => {
    const v = row[name];
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }));
  // Peak: the highest value and the first token where it occurs.
  const features = names.map((name, fi) => {
    const info = data.feature_info[name] || {};
    let peak = null;
    let at = null;
    values[fi].forEach((v, ti) => {
      if (v !== null && (peak === null || v > peak)) { peak = v; at = ti; }
    });
    return {
      name: name, description: info.description || "", label: info.label || "",
      category: info.category || "", hook_point: info.hook_point || "",
      peak: peak, peak_position: at === null ? null : tokens[at].p,
    };
  });
  if (damaged.length) {
    const warning = document.createElement("p");
    warning.className = "warning";
    warning.textContent = "damaged feature values at token(s) " + damaged.slice(0, 20).join(", ");
    document.querySelector("section.head").appendChild(warning);
  }
  const ROW_H = 14;
  // Wide enough to hover one token, narrow enough that 4,096 tokens stay one scroll strip.
  const CELL_W = Math.max(2, Math.min(12, Math.floor(960 / Math.max(1, n))));
  // Heat colours, weakest to strongest (the test suite checks cells against these stops).
  const STOPS = [[16, 16, 48], [200, 40, 60], [255, 230, 90]];
  const MISSING = [60, 60, 60];
  const INVISIBLE = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/;
  const REDACTED = /\[(?:EMAIL|CARD|IP|PHONE|REDACTED)\]/;
  const SPLIT = /(\[(?:EMAIL|CARD|IP|PHONE|REDACTED)\]|[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]|\n)/;

  function heat(x) {
    const t = Math.max(0, Math.min(1, x)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t));
    const f = t - i;
    return STOPS[i].map((c, j) => Math.round(c + (STOPS[i + 1][j] - c) * f));
  }

  function strength(fi, ti) {
    const v = values[fi][ti];
    const peak = features[fi].peak;
    if (v === null || peak === null || peak <= 0 || v <= 0) return 0;
    return v / peak;
  }

  function fmt(v) {
    return v === null || v === undefined ? "n/a" : Number(v).toPrecision(4);
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Text with placeholders of redacted spans, invisible characters and newlines made visible.
  function fillText(target, text) {
    for (const part of text.split(SPLIT)) {
      if (!part) continue;
      if (part === "\n") {
        target.appendChild(el("span", "nl", "\u23ce"));
        target.appendChild(document.createTextNode("\n"));
      } else if (REDACTED.test(part) && part.length < 12) {
        target.appendChild(el("span", "redacted", part));
      } else if (part.length === 1 && INVISIBLE.test(part)) {
        const code = part.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
        target.appendChild(el("span", "ctrl", "<U+" + code + ">"));
      } else {
        target.appendChild(document.createTextNode(part));
      }
    }
  }

  // --- token text -------------------------------------------------------------------------
  const tokenBox = document.getElementById("tokens");
  const spans = [];
  const indexOfPosition = new Map();
  const alertsAt = new Map();
  for (const a of data.alerts) {
    if (!alertsAt.has(a.start)) alertsAt.set(a.start, []);
    alertsAt.get(a.start).push(a);
  }
  let turnKey = null;
  tokens.forEach((t, i) => {
    indexOfPosition.set(t.p, i);
    const key = t.r + "\u0000" + t.q;
    if (key !== turnKey) {
      turnKey = key;
      tokenBox.appendChild(el("div", "turn", (t.r || "?") + " \u00b7 " + (t.q || "")));
    }
    for (const a of alertsAt.get(t.p) || []) {
      const marker = el("a", "alert-marker sev-" + a.severity, "\u2691 " + a.rule);
      marker.href = "#alert-" + a.id;
      marker.dataset.alertId = a.id;
      tokenBox.appendChild(marker);
    }
    const span = el("span", "tok");
    span.dataset.i = i;
    span.dataset.pos = t.p;
    if (t.t === null) {
      span.classList.add("notext");
      span.textContent = "\u2205";
    } else {
      fillText(span, t.t);
      if (t.n) span.appendChild(el("span", "trunc", " \u2026(+" + (t.n - t.t.length) + " chars)"));
    }
    if (span.querySelector(".redacted")) span.classList.add("has-redacted");
    tokenBox.appendChild(span);
    spans.push(span);
  });
  for (const a of data.alerts) {
    spans.forEach((s, i) => {
      if (tokens[i].p >= a.start && tokens[i].p <= a.end) s.classList.add("in-alert");
    });
  }

  // --- heat map ---------------------------------------------------------------------------
  const canvas = document.getElementById("heatmap");
  const strip = document.getElementById("alert-strip");
  canvas.width = Math.max(1, n * CELL_W);
  canvas.height = Math.max(1, features.length * ROW_H);
  strip.width = canvas.width;
  canvas.dataset.cellWidth = CELL_W;
  canvas.dataset.rowHeight = ROW_H;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  features.forEach((f, fi) => {
    for (let ti = 0; ti < n; ti++) {
      const rgb = values[fi][ti] === null ? MISSING : heat(strength(fi, ti));
      for (let y = fi * ROW_H; y < (fi + 1) * ROW_H; y++) {
        for (let x = ti * CELL_W; x < (ti + 1) * CELL_W; x++) {
          const o = (y * canvas.width + x) * 4;
          image.data[o] = rgb[0];
          image.data[o + 1] = rgb[1];
          image.data[o + 2] = rgb[2];
          image.data[o + 3] = 255;
        }
      }
    }
  });
  ctx.putImageData(image, 0, 0);
  const sctx = strip.getContext("2d");
  for (const a of data.alerts) {
    const from = indexOfPosition.get(a.start);
    const to = indexOfPosition.get(a.end);
    if (from === undefined && to === undefined) continue;
    const x0 = (from === undefined ? 0 : from) * CELL_W;
    const x1 = ((to === undefined ? n - 1 : to) + 1) * CELL_W;
    sctx.fillStyle = a.severity === "critical" ? "#e0001b" : "#f28c00";
    sctx.fillRect(x0, 0, Math.max(CELL_W, x1 - x0), strip.height);
  }

  const nameBox = document.getElementById("heat-names");
  const nameRows = features.map((f, fi) => {
    const row = el("div", "fname", f.label ? f.label + " (" + f.name + ")" : f.name);
    row.dataset.feature = f.name;
    row.addEventListener("mouseenter", () => { if (pinned === null) select(fi); });
    row.addEventListener("click", () => pin(fi));
    nameBox.appendChild(row);
    return row;
  });

  // --- selection ----------------------------------------------------------------------------
  let selected = null;
  let pinned = null;
  const info = {
    name: document.getElementById("feature-name"),
    description: document.getElementById("feature-description"),
    peak: document.getElementById("feature-peak"),
  };

  function select(fi) {
    if (selected === fi) return;
    selected = fi;
    const f = features[fi];
    nameRows.forEach((r, i) => r.classList.toggle("selected", i === fi));
    info.name.textContent = f.label ? f.label + " \u2014 " + f.name : f.name;
    const about = [f.description, f.category && "category " + f.category,
      f.hook_point && "at " + f.hook_point].filter(Boolean);
    info.description.textContent = about.join(" \u00b7 ") || "no description in the pack metadata";
    if (f.peak === null) {
      info.peak.textContent = "no values recorded";
    } else {
      const at = indexOfPosition.get(f.peak_position);
      const text = at === undefined || tokens[at].t === null ? "" : tokens[at].t;
      info.peak.textContent = "peak " + fmt(f.peak) + " at token " + f.peak_position +
        (text ? " \u201c" + text.slice(0, 40) + "\u201d" : "");
    }
    document.getElementById("feature-info").dataset.feature = f.name;
    spans.forEach((s, ti) => {
      const x = strength(fi, ti);
      s.style.backgroundColor = x > 0 ? "rgba(255, 140, 0, " + x.toFixed(3) + ")" : "";
      s.classList.toggle("hot", x >= 0.5);
      const v = values[fi][ti];
      s.dataset.value = v === null ? "" : String(v);
    });
  }

  function pin(fi) {
    pinned = pinned === fi ? null : fi;
    nameRows.forEach((r, i) => r.classList.toggle("pinned", i === pinned));
    select(fi);
  }

  const readout = document.getElementById("cell-readout");
  let cursor = { ti: 0, fi: 0 };
  function point(ti, fi, follow) {
    if (ti < 0 || ti >= n || fi < 0 || fi >= features.length) return;
    cursor = { ti: ti, fi: fi };
    if (follow || pinned === null) select(fi);
    const v = values[fi][ti];
    const t = tokens[ti];
    readout.textContent = features[fi].name + " @ token " + t.p + " " +
      JSON.stringify((t.t || "").slice(0, 30)) + ": " + fmt(v);
    readout.dataset.feature = features[fi].name;
    readout.dataset.position = t.p;
    readout.dataset.value = v === null ? "" : String(v);
    spans.forEach((s) => s.classList.remove("cursor"));
    spans[ti].classList.add("cursor");
  }
  canvas.addEventListener("mousemove", (ev) => {
    point(Math.floor(ev.offsetX / CELL_W), Math.floor(ev.offsetY / ROW_H), false);
  });
  // Keyboard scrubbing: left/right along the tokens, up/down between features.
  canvas.tabIndex = 0;
  canvas.addEventListener("keydown", (ev) => {
    const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    const move = step[ev.key];
    if (!move) return;
    ev.preventDefault();
    pinned = null;
    point(Math.min(n - 1, Math.max(0, cursor.ti + move[0])),
      Math.min(features.length - 1, Math.max(0, cursor.fi + move[1])), true);
  });
  canvas.addEventListener("click", (ev) => {
    const fi = Math.floor(ev.offsetY / ROW_H);
    if (fi >= 0 && fi < features.length) pin(fi);
  });
  if (features.length) {
    // Start on the feature behind the first alert, else the first one.
    const first = data.alerts.length ? Object.keys(data.alerts[0].feature_values)[0] : null;
    const fi = features.findIndex((f) => f.name === first);
    select(fi >= 0 ? fi : 0);
  }

  // --- alerts and labels ----------------------------------------------------------------------
  const alertBox = document.getElementById("alerts");
  const labelError = document.getElementById("label-error");

  function dl(target, pairs) {
    const list = el("dl", "fields");
    for (const [k, v] of pairs) {
      list.appendChild(el("dt", "", k));
      const dd = el("dd", "f-" + k.replace(/[^a-z]/g, "-"));
      fillText(dd, String(v));
      list.appendChild(dd);
    }
    target.appendChild(list);
  }

  function showLabel(card, a) {
    const status = card.querySelector(".label-status");
    status.textContent = a.label
      ? a.label.verdict.replace("_", " ") + " by " + a.label.labeler + " at " + a.label.created_at
      : "not reviewed";
    status.dataset.verdict = a.label ? a.label.verdict : "";
    const history = card.querySelector(".history");
    history.textContent = "";
    for (const h of a.history) {
      const li = el("li", "", h.created_at + " " + h.labeler + ": " + h.verdict.replace("_", " "));
      if (h.note) li.appendChild(el("q", "", h.note));
      history.appendChild(li);
    }
  }

  for (const a of data.alerts) {
    const card = el("article", "alert-card sev-" + a.severity);
    card.id = "alert-" + a.id;
    card.dataset.alertId = a.id;
    card.appendChild(el("h3", "", "\u2691 " + a.rule + " (" + a.severity + ")"));
    const fv = Object.entries(a.feature_values).map(([k, v]) => k + "=" + fmt(v)).join(", ");
    dl(card, [
      ["value", fmt(a.value)],
      ["tokens", a.start + "\u2013" + a.end + " (fired at " + a.position + ")"],
      ["output", a.message],
      ["rule set", a.rule_set_hash],
      ["category", a.category],
      ["request", a.request_id],
      ["features", fv],
      ["at", a.created_at || "?"],
    ]);
    card.appendChild(el("p", "label-status"));
    const form = el("div", "label-form");
    const note = el("textarea", "note");
    note.placeholder = "note (optional)";
    note.maxLength = 4000;
    form.appendChild(note);
    for (const verdict of data.verdicts) {
      const button = el("button", "verdict-button v-" + verdict, verdict.replace("_", " "));
      button.type = "button";
      button.dataset.verdict = verdict;
      button.addEventListener("click", () => submitLabel(a, card, verdict, note.value));
      form.appendChild(button);
    }
    card.appendChild(form);
    card.appendChild(el("ul", "history"));
    showLabel(card, a);
    alertBox.appendChild(card);
  }

  async function submitLabel(a, card, verdict, note) {
    labelError.textContent = "";
    const response = await fetch("/api/alerts/" + a.id + "/labels", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ verdict: verdict, note: note }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      labelError.textContent = "label not saved: " + (body.error || response.status);
      return;
    }
    a.label = body.label;
    a.history.push(body.label);
    showLabel(card, a);
  }

  document.body.dataset.ready = "true";
})();

"use strict";
window.addEventListener("error", function (ev) {
  document.body.setAttribute("data-errors", (document.body.getAttribute("data-errors") || "") + ev.message + ";");
});
(function () {
  const D = JSON.parse(document.getElementById("rmoe-data").textContent);
  const E = D.num_experts, L = D.num_layers;
  // tab10 lightened (its grey left out: grey is "dropped"); more experts: golden-angle hues
  const PALETTE = ["#8fbbd9", "#ffbf86", "#95cf95", "#ea9393", "#c9b3de", "#c5aaa5", "#f1bbe0", "#dddd90", "#8bdee7"];
  const color = function (e) {
    if (e < 0) return "#ddd";
    return E <= PALETTE.length ? PALETTE[e] : "hsl(" + Math.round((e * 137.508) % 360) + ", 65%, 78%)";
  };
  const el = function (tag, attrs, text) {
    const n = document.createElement(tag);
    for (const k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const params = new URLSearchParams(location.hash.slice(1));
  let layer = Math.min(Math.max(parseInt(params.get("layer") || D.layer, 10) || 0, 0), L - 1);
  let pinned = params.has("token") ? parseInt(params.get("token"), 10) : null;
  const select = document.getElementById("layer");
  for (let l = 0; l < L; l++) {
    select.appendChild(el("option", {value: l}, "MoE layer " + l + " (decoder layer " + D.layer_indices[l] + ")"));
  }
  select.value = layer;
  const legend = document.getElementById("legend");
  for (let e = 0; e < E; e++) {
    const s = el("span", {}, "expert " + e);
    s.style.background = color(e);
    legend.appendChild(s);
  }
  const dropped = el("span", {}, "dropped");
  dropped.style.background = "#ddd";
  dropped.style.textDecoration = "line-through";
  legend.appendChild(dropped);

  const text = document.getElementById("text");
  const spans = D.tokens.map(function (tok, t) {
    const s = el("span", {"class": "tok" + (tok.t === "" ? " empty" : ""), "data-t": t}, tok.t);
    s.title = tok.l;
    s.addEventListener("mouseenter", function () { if (pinned === null) showToken(t); });
    s.addEventListener("click", function () { pinned = pinned === t ? null : t; paint(); showToken(t); });
    text.appendChild(s);
    return s;
  });
  const pairsText = function (pairs) {
    if (!pairs.length) return "dropped";
    return pairs.map(function (p) { return "e" + p[0] + " " + (p[2] ? p[1].toFixed(2) : "dropped"); }).join(", ");
  };
  function showToken(t) {
    const box = document.getElementById("detail");
    box.replaceChildren();
    const tok = D.tokens[t];
    box.appendChild(el("h3", {}, "token " + t + ": '" + tok.l + "' (id " + tok.id + ")"));
    const path = D.routes.map(function (r) { return r[t].length && r[t][0][2] ? "e" + r[t][0][0] : "x"; });
    box.appendChild(el("div", {"class": "path", "id": "path"}, "path: " + path.join(" \u2192 ")));
    const table = el("table", {"id": "token-table"});
    const head = el("tr"); head.appendChild(el("th", {}, "layer")); head.appendChild(el("th", {}, "experts (weight)"));
    table.appendChild(head);
    for (let l = 0; l < L; l++) {
      const row = el("tr", {"data-layer": l});
      row.appendChild(el("td", {}, String(l)));
      const cell = el("td");
      const pairs = D.routes[l][t];
      if (!pairs.length) cell.appendChild(el("span", {"class": "drop"}, "dropped"));
      pairs.forEach(function (p) {
        const item = el("span", {}, "");
        const sw = el("span", {"class": "sw"}); sw.style.background = color(p[0]);
        item.appendChild(sw);
        const label = "e" + p[0] + " " + (p[2] ? p[1].toFixed(3) : "dropped") + "  ";
        item.appendChild(el("span", {"class": p[2] ? "" : "drop"}, label));
        cell.appendChild(item);
      });
      row.appendChild(cell);
      table.appendChild(row);
    }
    box.appendChild(table);
    box.setAttribute("data-token", t);
    box.setAttribute("data-pairs", pairsText(D.routes[layer][t]));
  }
  function showExperts() {
    const box = document.getElementById("experts");
    box.replaceChildren();
    const title = "Experts of MoE layer " + layer + ": most frequent tokens (share of the expert's load)";
    box.appendChild(el("h3", {}, title));
    const table = el("table", {"id": "expert-table"});
    D.experts[layer].forEach(function (ex) {
      const row = el("tr", {"data-expert": ex.expert});
      const name = el("td"); const sw = el("span", {"class": "sw"}); sw.style.background = color(ex.expert);
      name.appendChild(sw); name.appendChild(document.createTextNode("e" + ex.expert + " (" + ex.load + ")"));
      row.appendChild(name);
      row.appendChild(el("td", {}, ex.top.map(function (t) {
        return "'" + t.label + "' " + t.count + " (" + Math.round(100 * t.share) + "%)";
      }).join("   ")));
      table.appendChild(row);
    });
    box.appendChild(table);
  }
  function paint() {
    D.tokens.forEach(function (tok, t) {
      const e = D.top[layer][t];
      spans[t].style.background = color(e);
      spans[t].classList.toggle("dropped", e < 0);
      spans[t].classList.toggle("selected", pinned === t);
      spans[t].setAttribute("data-expert", e);
    });
  }
  select.addEventListener("change", function () {
    layer = parseInt(select.value, 10);
    paint();
    showExperts();
    if (pinned !== null) showToken(pinned);
  });
  paint(); showExperts();
  if (pinned !== null && pinned >= 0 && pinned < D.tokens.length) showToken(pinned); else pinned = null;
  document.body.setAttribute("data-status", "ready");
})();

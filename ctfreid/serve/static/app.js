// ctfreid serve page: search / add with a photo, erase an item or a person. No build step.
"use strict";
const $ = (id) => document.getElementById(id);
let chosen = null;

function headers() {
  const t = $("token").value || localStorage.getItem("ctfreid-token") || "";
  if ($("token").value) localStorage.setItem("ctfreid-token", $("token").value);
  return t ? { Authorization: "Bearer " + t } : {};
}

async function call(method, url, body) {
  const r = await fetch(url, { method, headers: headers(), body });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const e = (data && data.error) || {};
    throw new Error(r.status + " " + (e.field ? e.field + ": " : "") + (e.message || r.statusText));
  }
  return data;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "err" : "";
}

async function refreshStats() {
  try {
    const s = await call("GET", "/v1/stats");
    $("stats").textContent = s.items + " items, lengths " + s.lengths.join("/") + " bits, model " + s.model_fingerprint;
  } catch (e) { $("stats").textContent = e.message; }
}

function choose(file) {
  chosen = file;
  status("chosen: " + file.name);
}

$("file").addEventListener("change", (ev) => { if (ev.target.files.length) choose(ev.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault(); drop.classList.remove("over");
  if (ev.dataTransfer.files.length) choose(ev.dataTransfer.files[0]);
});

function fmtTime(t) { return t == null ? "" : new Date(t * 1000).toISOString().replace(".000Z", "Z"); }

async function search() {
  if (!chosen) return status("choose a photo first", true);
  const fd = new FormData();
  fd.append("images", chosen, chosen.name);
  fd.append("k", $("k").value || "10");
  run(fd, "");
}

// a hit clicked: search with that stored item (its codes), the item itself left out
function moreLike(id) {
  const body = JSON.stringify({ items: [id], k: parseInt($("k").value || "10", 10) });
  run(new Blob([body], { type: "application/json" }), "more like #" + id + ": ");
}

async function run(body, label) {
  status("searching…");
  try {
    const res = await call("POST", "/v1/search", body);
    const q = res.queries[0];
    const box = $("hits");
    box.innerHTML = "";
    for (const h of q.hits) {
      const div = document.createElement("div");
      div.className = "hit";
      div.dataset.id = h.id;
      div.title = "click: more like this item";
      div.addEventListener("click", () => moreLike(h.id));
      const img = document.createElement("img");
      img.alt = "item " + h.id;
      fetch("/v1/items/" + h.id + "/thumbnail", { headers: headers() })
        .then((r) => (r.ok ? r.blob() : null)).then((b) => { if (b) img.src = URL.createObjectURL(b); });
      div.appendChild(img);
      const cap = document.createElement("div");
      cap.textContent = "#" + h.id + " d=" + h.distance + " @" + h.stage_bits + " bits, cam " +
        (h.camera ?? "?") + (h.pid != null ? ", pid " + h.pid : "") + " " + fmtTime(h.time);
      div.appendChild(cap);
      box.appendChild(div);
    }
    $("candidates").textContent = "candidates per stage: " +
      Object.entries(q.candidates || {}).map(([L, n]) => L + " bits: " + n).join(", ");
    status(label + q.hits.length + " hits in " + q.search_ms.toFixed(2) + " ms (encoding " + q.encode_ms.toFixed(1) + " ms)");
  } catch (e) { status(e.message, true); }
}

async function add() {
  if (!chosen) return status("choose a photo first", true);
  const fd = new FormData();
  fd.append("images", chosen, chosen.name);
  const meta = {};
  if ($("pid").value !== "") meta.pid = parseInt($("pid").value, 10);
  if ($("camera").value !== "") meta.camera = parseInt($("camera").value, 10);
  meta.time = Date.now() / 1000;
  fd.append("metadata", JSON.stringify([meta]));
  try {
    const res = await call("POST", "/v1/items", fd);
    status("added as item " + res.ids.join(", "));
    refreshStats();
  } catch (e) { status(e.message, true); }
}

async function erase(url) {
  try {
    const r = await call("DELETE", url);
    $("receipt").textContent = "erased " + r.count + " item(s): " + r.erased.join(", ") + " at " + r.time_utc;
    refreshStats();
  } catch (e) { $("receipt").textContent = e.message; }
}

$("search").addEventListener("click", search);
$("add").addEventListener("click", add);
$("erase-item").addEventListener("click", () => erase("/v1/items/" + $("erase-id").value));
$("erase-person").addEventListener("click", () => erase("/v1/persons/" + $("erase-pid").value));
refreshStats();

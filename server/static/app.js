// The page: pick a file and models, stream the results (NDJSON from POST /api/ocr?stream=1), compare them,
// and come back to them in the history. Data comes from this server's /api/* only; when the server has an
// API key, a 401 opens the key prompt and POST /api/login sets the session cookie every request then carries.

import { diffPanel, h, historyItem, pager, refreshText, variantCard } from "./view.js";

const $ = (id) => document.getElementById(id);
const S = { models: [], run: null, page: 0, view: "rendered", diff: null, file: null, fileUrl: null, controller: null, history: [] };
const TASKS = [
  ["markdown", "Document → Markdown"],
  ["ocr", "OCR with boxes"],
  ["free", "Free OCR (no layout)"],
  ["figure", "Parse a figure"],
  ["describe", "Describe the image"],
  ["locate", "Find a text…"],
  ["custom", "Custom prompt…"],
];

// ---- the server ---------------------------------------------------------------------------------------

async function detail(response) {
  try {
    const body = await response.json();
    return body.detail || body.error?.message || body.error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

let asking = null;
function askKey() {
  // One prompt however many requests got 401; resolves once POST /api/login has set the cookie.
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = $("login");
    const form = $("login-form");
    $("login-error").hidden = true;
    form.onsubmit = async (e) => {
      e.preventDefault();
      const r = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: $("login-key").value }) });
      if (!r.ok) {
        $("login-error").textContent = await detail(r);
        $("login-error").hidden = false;
        return;
      }
      $("login-key").value = "";
      dialog.close();
      $("logout").hidden = false;
      asking = null;
      resolve();
    };
    dialog.oncancel = (e) => e.preventDefault(); // Esc would leave the page without data
    dialog.showModal();
  });
  return asking;
}

async function api(path, options = {}) {
  for (;;) {
    const r = await fetch(path, { credentials: "same-origin", ...options });
    if (r.status === 401) {
      await askKey();
      continue;
    }
    if (!r.ok) throw new Error(await detail(r));
    return r;
  }
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// ---- models and the form ------------------------------------------------------------------------------

async function loadModels() {
  S.models = await (await api("/api/models")).json();
  const box = $("models");
  box.replaceChildren(
    ...S.models.map((m, i) =>
      h("label", { class: "model", title: m.description }, h("input", { type: "checkbox", value: m.key, checked: m.loaded || (i === 0 && !S.models.some((x) => x.loaded)), onchange: drawModes }), ` ${m.label}`),
    ),
  );
  drawModes();
}

function selectedModels() {
  return [...$("models").querySelectorAll("input:checked")].map((i) => S.models.find((m) => m.key === i.value));
}

function drawModes() {
  // One resolution-mode choice per model family among the models picked (DeepSeek-OCR-2 has one mode).
  const families = new Map();
  for (const m of selectedModels()) if (!families.has(m.family)) families.set(m.family, m);
  const old = new Map([...$("modes").querySelectorAll("select")].map((s) => [s.dataset.family, s.value]));
  $("modes").replaceChildren(
    ...[...families.values()].map((m) =>
      h(
        "label",
        {},
        `Mode${families.size > 1 ? ` (${m.family})` : ""} `,
        h("select", { dataset: { family: m.family }, class: "mode" }, m.modes.map((mode) => h("option", { value: mode, selected: mode === (old.get(m.family) || m.default_mode), text: mode }))),
      ),
    ),
  );
}

function drawTask() {
  const task = $("task").value;
  $("ref-wrap").hidden = task !== "locate";
  $("prompt-wrap").hidden = task !== "custom";
}

function setFile(file) {
  if (!file) return;
  if (!/^image\/|^application\/pdf$/.test(file.type) && !/\.(pdf|png|jpe?g|webp|gif|bmp|tiff?)$/i.test(file.name)) {
    showError(`${file.name} is neither an image nor a PDF`);
    return;
  }
  if (S.fileUrl) URL.revokeObjectURL(S.fileUrl);
  S.file = file;
  S.fileUrl = file.type.startsWith("image/") && !/tiff?$/i.test(file.type) ? URL.createObjectURL(file) : null;
  $("file-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KB`;
  $("pages-wrap").hidden = !/pdf/i.test(file.type || file.name);
  $("drop").classList.add("has-file");
  showError("");
}

function formData() {
  const models = selectedModels();
  if (!S.file) throw new Error("Choose an image or a PDF first (drop it, pick it, or paste it).");
  if (!models.length) throw new Error("Pick at least one model.");
  const fd = new FormData();
  fd.append("file", S.file, S.file.name || "pasted.png");
  fd.append("models", models.map((m) => m.key).join(","));
  const task = $("task").value;
  if (task === "custom") {
    if (!$("prompt").value.trim()) throw new Error("Write the prompt, or choose a task.");
    fd.append("prompt", $("prompt").value);
  } else {
    fd.append("task", task);
    if (task === "locate") fd.append("ref", $("ref").value);
  }
  if ($("pages").value.trim() && !$("pages-wrap").hidden) fd.append("pages", $("pages").value.trim());
  const modes = new Map([...$("modes").querySelectorAll("select")].map((s) => [s.dataset.family, s.value]));
  fd.append("model_options", JSON.stringify(Object.fromEntries(models.map((m) => [m.key, { mode: modes.get(m.family) }]))));
  return fd;
}

// ---- a run: streamed, or opened from the history --------------------------------------------------------

function newRun(start) {
  const pages = () => Array.from({ length: start.pages }, () => ({ status: "pending", text: "", result: null }));
  return {
    id: null,
    filename: start.filename,
    kind: start.kind,
    count: start.pages,
    images: start.kind === "image" ? [S.fileUrl] : [],
    variants: start.models.map((m) => ({ model: m.model, label: m.label, status: "waiting", error: "", pages: pages(), final: null })),
  };
}

function runFromEntry(entry) {
  return {
    id: entry.history_id,
    filename: entry.filename,
    kind: entry.variants[0].pages[0]?.page ? "pdf" : "image",
    count: entry.input_images.length,
    images: entry.input_images.map((i) => i.url),
    variants: entry.variants.map((v) => ({
      model: v.model,
      label: v.label,
      status: "done",
      error: "",
      final: v,
      pages: v.pages.map((p) => ({ status: "done", text: p.text_markdown, result: p })),
    })),
    warnings: entry.metadata.warnings,
  };
}

function variantOf(model) {
  return S.run.variants.find((v) => v.model === model);
}

let pending = null;
function scheduleText(model) {
  // Deltas arrive a token at a time: redraw a card's text at most once a frame.
  pending = pending || new Set();
  pending.add(model);
  requestAnimationFrame(() => {
    if (!pending) return;
    for (const m of pending) {
      const card = document.querySelector(`.variant[data-model="${CSS.escape(m)}"]`);
      if (card) refreshText(card, S.run, variantOf(m), S.page, S.view);
    }
    pending = null;
  });
}

function onEvent(ev) {
  if (ev.type === "start") {
    S.run = newRun(ev);
    S.page = 0;
    draw();
    return $("result").scrollIntoView({ block: "start" });
  }
  if (ev.type === "error") throw new Error(ev.detail);
  if (ev.type === "done") {
    S.run = runFromEntry(ev);
    location.hash = `h=${ev.history_id}`;
    draw();
    return loadHistory();
  }
  const v = variantOf(ev.model);
  if (ev.type === "variant_start") v.status = "running";
  else if (ev.type === "page_start") {
    v.pages[ev.index].status = "running";
    if (ev.image) S.run.images[ev.index] = ev.image;
    if (S.run.count > 1 && S.run.variants.every((x) => x.pages[S.page].status === "done")) S.page = ev.index;
  } else if (ev.type === "delta") {
    v.pages[ev.index].text += ev.text;
    if (ev.index === S.page) return scheduleText(ev.model);
    return;
  } else if (ev.type === "page_done") {
    Object.assign(v.pages[ev.index], { status: "done", result: ev.result, text: ev.result.text_markdown });
  } else if (ev.type === "variant_done") v.status = "done";
  else if (ev.type === "variant_error") {
    v.status = "error";
    v.error = ev.detail;
  }
  draw();
}

async function run(e) {
  e.preventDefault();
  showError("");
  let fd;
  try {
    fd = formData();
  } catch (err) {
    return showError(err.message);
  }
  S.controller = new AbortController();
  $("run").disabled = true;
  $("stop").hidden = false;
  try {
    const r = await api("/api/ocr?stream=1", { method: "POST", body: fd, signal: S.controller.signal });
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (line) onEvent(JSON.parse(line));
      }
    }
  } catch (err) {
    showError(err.name === "AbortError" ? "Stopped." : err.message);
  } finally {
    $("run").disabled = false;
    $("stop").hidden = true;
    S.controller = null;
  }
}

// ---- drawing ------------------------------------------------------------------------------------------

function copyText(text, button) {
  const done = () => {
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  };
  if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  else fallbackCopy(text, done);
}

function fallbackCopy(text, done) {
  const area = h("textarea", { class: "offscreen" });
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  done();
}

function saveBlob(text, name, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 5000);
}

function actions(variant) {
  const f = variant.final;
  const stem = (S.run.filename || "ocr").replace(/\.[^.]+$/, "");
  const text = f ? f.text_markdown : variant.pages.map((p) => p.text).join("\n\n");
  const copy = h("button", { type: "button", class: "small", text: "Copy", title: "Copy the Markdown" });
  copy.addEventListener("click", () => copyText(text, copy));
  return h(
    "div",
    { class: "actions" },
    copy,
    h("button", { type: "button", class: "small", disabled: !f, text: ".mmd", title: "Download the Markdown", onclick: () => saveBlob(f.text_markdown, `${stem}.mmd`, "text/markdown") }),
    h("button", { type: "button", class: "small", disabled: !f, text: ".json", title: "Download the result as JSON", onclick: () => saveBlob(JSON.stringify(f, null, 1), `${stem}.json`, "application/json") }),
    f ? h("a", { class: "button small", href: f.download_url, download: "", title: "The official artefacts (result.mmd, boxes, figures, JSON)", text: ".zip" }) : h("button", { type: "button", class: "small", disabled: true, text: ".zip" }),
  );
}

function draw() {
  const r = S.run;
  $("result").hidden = !r;
  if (!r) return;
  $("result-title").textContent = r.filename;
  $("warnings").textContent = (r.warnings || []).join(" · ");
  $("pager").replaceChildren(
    pager(r, S.page, (n) => {
      S.page = Math.max(0, Math.min(r.count - 1, n));
      draw();
    }),
  );
  for (const b of document.querySelectorAll("#views button")) b.classList.toggle("on", b.dataset.view === S.view);
  $("diff-toggle").hidden = r.variants.length < 2;
  $("diff-toggle").classList.toggle("on", Boolean(S.diff));
  const diff = $("diff");
  diff.replaceChildren();
  if (S.diff && r.variants.length >= 2) {
    diff.append(
      diffPanel(r, S.page, S.diff, (change) => {
        Object.assign(S.diff, change);
        draw();
      }),
    );
  }
  $("variants").className = `variants n${Math.min(r.variants.length, 4)}`;
  $("variants").replaceChildren(...r.variants.map((v) => variantCard(r, v, S.page, S.view, actions)));
}

// ---- the history ----------------------------------------------------------------------------------------

async function loadHistory() {
  S.history = await (await api("/api/history")).json();
  $("history").replaceChildren(...S.history.map((item) => historyItem(item, item.id === S.run?.id, openEntry, removeEntry)));
  $("history-empty").hidden = S.history.length > 0;
}

async function openEntry(id) {
  if (S.controller) return;
  try {
    const entry = await (await api(`/api/history/${encodeURIComponent(id)}`)).json();
    S.run = runFromEntry(entry);
    S.page = 0;
    location.hash = `h=${id}`;
    showError("");
    draw();
    await loadHistory();
  } catch (err) {
    showError(err.message);
  }
}

async function removeEntry(id) {
  try {
    await api(`/api/history/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (S.run?.id === id) {
      S.run = null;
      history.replaceState(null, "", location.pathname);
      draw();
    }
    await loadHistory();
  } catch (err) {
    showError(err.message);
  }
}

// ---- wiring -------------------------------------------------------------------------------------------

function wire() {
  $("task").replaceChildren(...TASKS.map(([value, text]) => h("option", { value, text })));
  $("task").addEventListener("change", drawTask);
  $("pick").addEventListener("click", () => $("file").click());
  $("drop").addEventListener("click", (e) => e.target === $("drop") && $("file").click());
  $("drop").addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && $("file").click());
  $("file").addEventListener("change", () => {
    setFile($("file").files[0]);
    $("file").value = ""; // choosing the same file again (after a drop or a paste) is a change too
  });
  for (const kind of ["dragenter", "dragover"]) {
    $("drop").addEventListener(kind, (e) => {
      e.preventDefault();
      $("drop").classList.add("over");
    });
  }
  $("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
  $("drop").addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop").classList.remove("over");
    setFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])][0];
    if (file) setFile(file.name ? file : new File([file], "pasted.png", { type: file.type }));
  });
  $("ocr-form").addEventListener("submit", run);
  $("stop").addEventListener("click", () => S.controller?.abort());
  $("new-run").addEventListener("click", () => {
    S.run = null;
    history.replaceState(null, "", location.pathname);
    draw();
    loadHistory();
  });
  for (const b of document.querySelectorAll("#views button")) {
    b.addEventListener("click", () => {
      S.view = b.dataset.view;
      draw();
    });
  }
  $("diff-toggle").addEventListener("click", () => {
    const models = S.run.variants.map((v) => v.model);
    S.diff = S.diff ? null : { a: models[0], b: models[1], lines: false, whole: false };
    draw();
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/api/logout", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    location.reload();
  });
  drawTask();
}

async function main() {
  wire();
  try {
    await loadModels();
    await loadHistory();
    const id = new URLSearchParams(location.hash.slice(1)).get("h");
    if (id) await openEntry(id);
  } catch (err) {
    showError(err.message);
  }
  document.body.dataset.ready = "1";
}

main();

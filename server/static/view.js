// What the page draws from a run: one card per model (the page image with its boxes, and the text in the
// chosen view), the page navigation and the text diff. Model text only reaches the DOM through
// renderMarkdown (sanitised) or textContent.

import { renderDiff, renderMarkdown } from "./render.js";

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined && child !== false) el.append(child);
  return el;
}

// The colours grounding.draw_blocks uses for the layout labels (the same label gets the same colour).
const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#9467bd", "#e69f00", "#cc79a7", "#d62728", "#17becf", "#8c564b", "#7f7f7f"];
const KNOWN = ["text", "title", "image", "table", "image_caption", "table_caption", "sub_title", "equation"];

export function labelColour(label, others) {
  const i = KNOWN.indexOf(label);
  if (i >= 0) return PALETTE[i];
  if (!others.includes(label)) others.push(label);
  return PALETTE[(KNOWN.length + others.indexOf(label)) % PALETTE.length];
}

/** The blocks of one page grouped by grounding span, in order. */
function spans(blocks) {
  const groups = new Map();
  for (const b of blocks) {
    if (!groups.has(b.span)) groups.set(b.span, { span: b.span, label: b.label, text: b.text, blocks: [] });
    groups.get(b.span).blocks.push(b);
  }
  return [...groups.values()];
}

/** The URL of a figure link ("images/0.jpg", or "images/3_0.jpg" on a PDF page), once the entry is saved. */
export function figureResolver(variant) {
  const crops = new Map((variant.final?.crops || []).map((c) => [c.path, c.url]));
  return (src) => crops.get(src.replace(/^\.\//, "")) || null;
}

function linkHover(card, span, on) {
  for (const el of card.querySelectorAll(`[data-span="${span}"]`)) el.classList.toggle("hl", on);
}

function hoverable(el, card, span) {
  el.dataset.span = span;
  el.addEventListener("mouseenter", () => linkHover(card, span, true));
  el.addEventListener("mouseleave", () => linkHover(card, span, false));
}

function overlay(card, page) {
  const layer = h("div", { class: "overlay" });
  const others = [];
  for (const b of page?.result?.blocks || []) {
    const [x1, y1, x2, y2] = b.box;
    if (x2 <= x1 || y2 <= y1) continue;
    const colour = labelColour(b.label, others);
    const box = h("div", { class: `box${b.label === "title" ? " title" : ""}`, title: b.label }, h("span", { text: b.label }));
    // Coordinates are 0..999 of the page, as the model writes them (the official mapping divides by 999).
    Object.assign(box.style, {
      left: `${(x1 / 999) * 100}%`,
      top: `${(y1 / 999) * 100}%`,
      width: `${((Math.min(x2, 999) - x1) / 999) * 100}%`,
      height: `${((Math.min(y2, 999) - y1) / 999) * 100}%`,
      borderColor: colour,
    });
    box.firstChild.style.background = colour;
    hoverable(box, card, b.span);
    box.addEventListener("click", () => {
      const target = card.querySelector(`.text [data-span="${b.span}"]`);
      if (target) target.scrollIntoView({ block: "nearest", behavior: "smooth" });
    });
    layer.append(box);
  }
  return layer;
}

function cropFor(variant, page, n) {
  const prefix = page.result.page ? `${page.result.page - 1}_` : "";
  return (variant.final?.crops || []).find((c) => c.path === `images/${prefix}${n}.jpg`);
}

function renderedText(card, variant, page) {
  const figure = figureResolver(variant);
  if (!page.result) return h("div", { class: "md streaming" }, renderMarkdown(page.text, figure));
  const groups = spans(page.result.blocks);
  if (!groups.length) return h("div", { class: "md" }, renderMarkdown(page.result.text_markdown, figure));
  const out = h("div", { class: "md blocks" });
  let figures = 0;
  const others = [];
  for (const g of groups) {
    const el = h("div", { class: `blk blk-${g.label.replace(/[^a-z_]/gi, "")}` });
    el.style.setProperty("--blk", labelColour(g.label, others));
    hoverable(el, card, g.span);
    if (g.label === "image") {
      for (const _ of g.blocks) {
        const crop = cropFor(variant, page, figures++);
        el.append(crop ? h("img", { src: crop.url, alt: "figure", class: "crop" }) : h("span", { class: "figure-missing", text: "[figure]" }));
      }
    } else {
      el.append(renderMarkdown(g.text, figure));
    }
    out.append(el);
  }
  return out;
}

function blockTable(card, page) {
  const rows = (page.result?.blocks || []).map((b, i) => {
    const row = h("tr", {}, h("td", { text: String(i + 1) }), h("td", { text: b.label }), h("td", { class: "mono", text: b.box.join(", ") }), h("td", { text: b.text.slice(0, 300) }));
    hoverable(row, card, b.span);
    return row;
  });
  if (!rows.length) return h("p", { class: "muted", text: page.result ? "No grounded blocks on this page (the task writes none)." : "Blocks appear when the page is done." });
  return h("table", { class: "blocks-table" }, h("thead", {}, h("tr", {}, ["#", "label", "box (0-999)", "text"].map((t) => h("th", { text: t })))), h("tbody", {}, rows));
}

function textView(card, variant, page, view) {
  if (view === "rendered") return renderedText(card, variant, page);
  if (view === "markdown") return h("pre", { class: "source", text: page.result ? page.result.text_markdown : page.text });
  if (view === "raw") return h("pre", { class: "source", text: page.result ? page.result.text_raw : "The raw output (with grounding tags) is shown when the page is done." });
  if (view === "blocks") return blockTable(card, page);
  const url = page.result?.bounding_image_url;
  return url ? h("img", { class: "boxes-img", src: url, alt: "page with boxes" }) : h("p", { class: "muted", text: "The picture with boxes is drawn when the entry is saved." });
}

function statusText(variant, run) {
  if (variant.status === "error") return "failed";
  if (variant.status === "done") return "done";
  if (variant.status === "waiting") return "waiting";
  const n = variant.pages.findIndex((p) => p.status === "running");
  return run.count > 1 && n >= 0 ? `reading page ${n + 1}/${run.count}` : "reading";
}

function stats(variant) {
  const pages = variant.pages.filter((p) => p.result);
  if (!pages.length) return "";
  const tokens = pages.reduce((s, p) => s + p.result.usage.completion_tokens, 0);
  const tps = pages.reduce((s, p) => s + (p.result.timings.generation_tps || 0), 0) / pages.length;
  const secs = variant.final ? variant.final.elapsed_seconds : pages.reduce((s, p) => s + p.result.timings.total, 0);
  return `${tokens} tokens · ${tps.toFixed(1)} tok/s · ${secs.toFixed(1)} s`;
}

/** One model's card for page `n` of the run. `actions` builds its buttons. */
export function variantCard(run, variant, n, view, actions) {
  const page = variant.pages[n] || { status: "pending", text: "" };
  const card = h("article", { class: `variant status-${variant.status}`, dataset: { model: variant.model } });
  const image = run.images[n];
  const picture = h("div", { class: "pageimg" });
  if (image) {
    const wrap = h("div", { class: "imgwrap" }, h("img", { src: image, alt: `page ${n + 1}` }));
    wrap.append(overlay(card, page));
    picture.append(wrap);
  } else {
    picture.append(h("div", { class: "noimg muted", text: "The page picture appears when the page is read." }));
  }
  const text = h("div", { class: "text" });
  if (variant.status === "error") text.append(h("p", { class: "error", text: variant.error }));
  if (page.status === "pending" && !page.text && variant.status !== "error") text.append(h("p", { class: "muted", text: "Waiting for this page…" }));
  else text.append(textView(card, variant, page, view));
  card.append(
    h("header", {}, h("h3", { text: variant.label, title: variant.model }), h("span", { class: "chip", text: statusText(variant, run) }), h("span", { class: "stats", text: stats(variant) }), actions(variant)),
    h("div", { class: "body" }, picture, text),
  );
  return card;
}

/** The text pane of a card, redrawn as deltas arrive (the rest of the card stays as it is). */
export function refreshText(card, run, variant, n, view) {
  const pane = card.querySelector(".text");
  const page = variant.pages[n];
  pane.replaceChildren(textView(card, variant, page, view));
  if (view === "rendered" || view === "markdown") pane.scrollTop = pane.scrollHeight;
  card.querySelector(".chip").textContent = statusText(variant, run);
}

export function pager(run, current, go) {
  if (run.count <= 1) return h("div");
  const state = (n) => {
    const all = run.variants.map((v) => (v.status === "error" && v.pages[n]?.status !== "done" ? "error" : v.pages[n]?.status || "pending"));
    if (all.includes("running")) return "running";
    if (all.every((s) => s === "done")) return "done";
    if (all.includes("error")) return "error";
    return all.includes("done") ? "running" : "pending";
  };
  const buttons = [];
  for (let n = 0; n < run.count; n++) {
    buttons.push(h("button", { type: "button", class: `pg ${state(n)}${n === current ? " current" : ""}`, title: `page ${n + 1}: ${state(n)}`, onclick: () => go(n), text: String(n + 1) }));
  }
  return h(
    "nav",
    { class: "pager", "aria-label": "pages" },
    h("button", { type: "button", class: "pg-step", disabled: current === 0, onclick: () => go(current - 1), text: "‹" }),
    buttons,
    h("button", { type: "button", class: "pg-step", disabled: current >= run.count - 1, onclick: () => go(current + 1), text: "›" }),
  );
}

export function pageText(variant, n) {
  const page = variant.pages[n];
  return page ? (page.result ? page.result.text_markdown : page.text) : "";
}

/** The diff of two models' text (this page, or the whole document). */
export function diffPanel(run, n, choice, change) {
  const names = run.variants.map((v) => v.model);
  const pick = (key) => h("select", { onchange: (e) => change({ [key]: e.target.value }) }, run.variants.map((v) => h("option", { value: v.model, selected: v.model === choice[key], text: v.label })));
  const text = (model) => {
    const v = run.variants.find((x) => x.model === model);
    if (!v) return "";
    return choice.whole ? v.pages.map((_, i) => pageText(v, i)).join("\n\n") : pageText(v, n);
  };
  const a = names.includes(choice.a) ? choice.a : names[0];
  const b = names.includes(choice.b) ? choice.b : names[1];
  const { frag, added, removed } = renderDiff(text(a), text(b), choice.lines);
  return h(
    "section",
    { class: "diff" },
    h(
      "div",
      { class: "diff-head" },
      h("label", {}, "From ", pick("a")),
      h("label", {}, "to ", pick("b")),
      h("label", {}, h("input", { type: "checkbox", checked: choice.lines, onchange: (e) => change({ lines: e.target.checked }) }), " by line"),
      h("label", {}, h("input", { type: "checkbox", checked: choice.whole, onchange: (e) => change({ whole: e.target.checked }) }), " whole document"),
      h("span", { class: "stats", text: `${removed} characters removed, ${added} added` }),
    ),
    h("pre", { class: "diff-body" }, frag),
  );
}

export function historyItem(item, active, open, remove) {
  const when = new Date(item.created_at);
  const del = h("button", { type: "button", class: "del", title: "Delete this entry", text: "×" });
  del.addEventListener("click", (e) => {
    e.stopPropagation();
    if (del.classList.contains("armed")) return remove(item.id);
    del.classList.add("armed");
    del.textContent = "Delete?";
    setTimeout(() => {
      del.classList.remove("armed");
      del.textContent = "×";
    }, 3000);
  });
  return h(
    "li",
    { class: active ? "active" : "", dataset: { id: item.id }, tabindex: "0", onclick: () => open(item.id), onkeydown: (e) => e.key === "Enter" && open(item.id) },
    item.input_image_url ? h("img", { class: "thumb", src: item.input_image_url, alt: "", loading: "lazy" }) : h("div", { class: "thumb" }),
    h(
      "div",
      { class: "meta" },
      h("div", { class: "name", text: item.filename, title: item.filename }),
      h("div", { class: "when", text: `${when.toLocaleString()}${item.pages > 1 ? ` · ${item.pages} pages` : ""}` }),
      h("div", { class: "models", text: item.models.join(" · ") }),
      h("div", { class: "preview", text: item.preview }),
    ),
    del,
  );
}

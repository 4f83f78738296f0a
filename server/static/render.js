// Model output is untrusted: Markdown -> HTML (marked) -> DOMPurify with a strict list (no script, no event
// handlers, no style, no remote source), then TeX rendered by KaTeX from its source (trust: false) and
// sanitised again. Nothing here ever assigns model text to innerHTML; the CSP blocks what might slip through.

/* global marked, DOMPurify, katex, Diff */

const MODEL_HTML = {
  ALLOWED_TAGS: [
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "blockquote", "pre", "code",
    "em", "strong", "b", "i", "u", "del", "s", "sub", "sup", "mark", "table", "thead", "tbody", "tfoot", "tr",
    "th", "td", "caption", "colgroup", "col", "a", "img", "span", "div", "center",
  ],
  ALLOWED_ATTR: ["href", "src", "alt", "title", "colspan", "rowspan", "align", "start"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|images\/)/i,
  RETURN_DOM_FRAGMENT: true,
};
const TEX_HTML = { USE_PROFILES: { html: true, mathMl: true }, FORBID_TAGS: ["img", "a", "style"], RETURN_DOM_FRAGMENT: true };
const KATEX = { throwOnError: false, trust: false, strict: "ignore", maxSize: 20, maxExpand: 500, output: "htmlAndMathml" };
// $$..$$, \[..\], \(..\), and $..$ with no space just inside the dollars (so "$5 and $10" stays text).
const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^\s$](?:[^$\n]*?[^\s$])?)\$/g;
const HOLE = /\uE000(\d+)\uE001/g; // private-use characters: marked and DOMPurify leave them alone

let resolveImage = null; // the figure resolver of the sanitize call in progress

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "IMG") {
    // Only the figures this server cut from the page (images/N.jpg in the official Markdown).
    const url = resolveImage ? resolveImage(node.getAttribute("src") || "") : null;
    if (url) node.setAttribute("src", url);
    else {
      node.removeAttribute("src");
      node.setAttribute("data-missing", "");
    }
  }
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (!/^(https?:|mailto:)/i.test(href)) node.removeAttribute("href");
  }
});

function renderTex(tex, display) {
  let html;
  try {
    html = katex.renderToString(tex, { ...KATEX, displayMode: display });
  } catch {
    return document.createTextNode(tex);
  }
  const saved = resolveImage;
  resolveImage = null;
  try {
    return DOMPurify.sanitize(html, TEX_HTML);
  } finally {
    resolveImage = saved;
  }
}

function fillHoles(root, maths) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const found = [];
  while (walker.nextNode()) if (walker.currentNode.nodeValue.includes("\uE000")) found.push(walker.currentNode);
  for (const node of found) {
    const inCode = node.parentElement && node.parentElement.closest("code, pre");
    const out = document.createDocumentFragment();
    let last = 0;
    const text = node.nodeValue;
    for (const m of text.matchAll(HOLE)) {
      const math = maths[Number(m[1])];
      if (!math) continue;
      out.append(text.slice(last, m.index));
      out.append(inCode ? document.createTextNode(math.source) : renderTex(math.tex, math.display));
      last = m.index + m[0].length;
    }
    out.append(text.slice(last));
    node.replaceWith(out);
  }
}

/**
 * Markdown (with HTML tables and TeX, as DeepSeek-OCR writes it) as a sanitised DOM fragment.
 * `figure(name)` maps a figure link such as "images/0.jpg" to this server's URL, or null (dropped).
 */
export function renderMarkdown(markdown, figure = null) {
  const maths = [];
  const source = String(markdown || "").replace(MATH, (all, a, b, c, d) => {
    maths.push({ tex: a ?? b ?? c ?? d, display: a !== undefined || b !== undefined, source: all });
    return `\uE000${maths.length - 1}\uE001`;
  });
  const html = marked.parse(source, { gfm: true, breaks: false, async: false });
  resolveImage = figure;
  let frag;
  try {
    frag = DOMPurify.sanitize(html, MODEL_HTML);
  } finally {
    resolveImage = null;
  }
  fillHoles(frag, maths);
  for (const img of frag.querySelectorAll("img[data-missing]")) {
    const note = document.createElement("span");
    note.className = "figure-missing";
    note.textContent = "[figure]";
    img.replaceWith(note);
  }
  for (const a of frag.querySelectorAll("a[href]")) {
    a.target = "_blank";
    a.rel = "noopener noreferrer";
  }
  return frag;
}

/** Text diff of `a` against `b` as spans (words, or lines), built with textContent only. */
export function renderDiff(a, b, byLine = false) {
  const parts = byLine ? Diff.diffLines(a, b) : Diff.diffWordsWithSpace(a, b);
  const frag = document.createDocumentFragment();
  let added = 0;
  let removed = 0;
  for (const part of parts) {
    const span = document.createElement(part.added ? "ins" : part.removed ? "del" : "span");
    span.textContent = part.value;
    frag.append(span);
    if (part.added) added += part.value.length;
    if (part.removed) removed += part.value.length;
  }
  return { frag, added, removed };
}

// A tiny Markdown renderer that is safe by construction: it builds DOM nodes with createElement and
// text nodes only — no innerHTML anywhere — so text from a model or a user can never become markup.
// Supported: fenced code, headings, lists, quotes, rules, paragraphs; inline code, bold, italic,
// and links to http(s) URLs only. It copes with half-written input (an unclosed fence while streaming).

const INLINE = [
  { kind: "code", re: /`([^`\n]+)`/ },
  { kind: "link", re: /\[([^\]\n]+)\]\((https?:\/\/[^\s()<>]+)\)/ },
  { kind: "strong", re: /\*\*(?=\S)([^\n]*?\S)\*\*/ },
  { kind: "strong", re: /(?<![\w_])__(?=\S)([^\n]*?\S)__(?![\w_])/ },
  { kind: "em", re: /(?<![\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])/ },
  { kind: "em", re: /(?<![\w_])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\w_])/ },
];

function appendInline(parent, text) {
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { rule, m };
    }
    if (!best) {
      parent.append(document.createTextNode(rest));
      return;
    }
    const { rule, m } = best;
    if (m.index > 0) parent.append(document.createTextNode(rest.slice(0, m.index)));
    if (rule.kind === "code") {
      const code = document.createElement("code");
      code.textContent = m[1];
      parent.append(code);
    } else if (rule.kind === "link") {
      const a = document.createElement("a");
      a.href = m[2]; // only http(s) matched above: never javascript: or data:
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      appendInline(a, m[1]);
      parent.append(a);
    } else {
      const el = document.createElement(rule.kind);
      appendInline(el, m[1]);
      parent.append(el);
    }
    rest = rest.slice(m.index + m[0].length);
  }
}

function appendLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i > 0) parent.append(document.createElement("br"));
    appendInline(parent, line);
  });
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

/** Render Markdown text into a DocumentFragment of plain, safe elements. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end of a still-streaming text)
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[2]) code.dataset.lang = fence[2];
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      appendInline(h, heading[2]);
      out.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      out.append(document.createElement("hr"));
      i += 1;
      continue;
    }
    if (BULLET.test(line) || ORDERED.test(line)) {
      const ordered = !BULLET.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number.parseInt(ORDERED.exec(line)[1], 10);
        if (start !== 1) list.start = start;
      }
      const re = ordered ? ORDERED : BULLET;
      while (i < lines.length && re.test(lines[i])) {
        const m = re.exec(lines[i]);
        const li = document.createElement("li");
        appendInline(li, ordered ? m[2] : m[1]);
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      const quote = document.createElement("blockquote");
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) body.push(QUOTE.exec(lines[i++])[1]);
      quote.append(renderMarkdown(body.join("\n")));
      out.append(quote);
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      lines[i].trim() &&
      !FENCE.test(lines[i]) &&
      !HEADING.test(lines[i]) &&
      !BULLET.test(lines[i]) &&
      !ORDERED.test(lines[i]) &&
      !QUOTE.test(lines[i]) &&
      !RULE.test(lines[i])
    ) {
      para.push(lines[i++]);
    }
    const p = document.createElement("p");
    appendLines(p, para);
    out.append(p);
  }
  return out;
}

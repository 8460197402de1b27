// The usage chart: daily input/output tokens as stacked bars in inline SVG (no library).

const SVG = "http://www.w3.org/2000/svg";
const fmt = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const full = new Intl.NumberFormat();

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A round step (1, 2 or 5 × 10^k tokens) giving at most `maxTicks` grid lines above zero. */
function niceStep(value, maxTicks = 5) {
  if (value <= 0) return 25;
  const raw = value / maxTicks;
  const exp = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) {
    if (m * exp >= raw) return Math.max(1, m * exp);
  }
  return Math.max(1, 10 * exp);
}

function dayLabel(day, opts) {
  const [y, m, d] = day.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d)).toLocaleDateString(undefined, { timeZone: "UTC", ...opts });
}

/** Build the chart for `{days: [{day, inputTokens, outputTokens}], totals}`; returns an <svg>. */
export function usageChart(usage, width = 720) {
  const days = usage.days || [];
  const W = Math.max(280, Math.round(width));
  const H = W < 480 ? 200 : 240;
  const pad = { top: 12, right: 8, bottom: 28, left: 44 };
  const plotW = W - pad.left - pad.right;
  const plotH = H - pad.top - pad.bottom;
  const peak = Math.max(0, ...days.map((d) => d.inputTokens + d.outputTokens));
  const step = niceStep(peak);
  const ticks = Math.max(peak > 0 ? 1 : 4, Math.ceil(peak / step));
  const max = step * ticks;
  const svg = el("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "usage-chart",
    role: "img",
    "aria-label": `Tokens per day over the last ${days.length} days`,
    width: W,
    height: H,
  });
  // Grid lines and y labels.
  for (let k = 0; k <= ticks; k++) {
    const value = step * k;
    const y = pad.top + plotH - (plotH * k) / ticks;
    svg.append(el("line", { x1: pad.left, x2: W - pad.right, y1: y, y2: y, class: k ? "grid" : "axis" }));
    svg.append(el("text", { x: pad.left - 8, y: y + 4, class: "ylabel", "text-anchor": "end" }, fmt.format(value)));
  }
  const slot = plotW / Math.max(1, days.length);
  const barW = Math.max(2, slot * 0.68);
  days.forEach((d, i) => {
    const x = pad.left + i * slot + (slot - barW) / 2;
    const hIn = (d.inputTokens / max) * plotH;
    const hOut = (d.outputTokens / max) * plotH;
    const group = el("g", { class: "bar", "data-day": d.day });
    group.append(
      el(
        "title",
        {},
        `${dayLabel(d.day, { month: "short", day: "numeric" })}: ${full.format(d.inputTokens)} input, ` +
          `${full.format(d.outputTokens)} output tokens`,
      ),
    );
    // An invisible full-height hit area so the tooltip works on empty days too.
    group.append(el("rect", { x: pad.left + i * slot, y: pad.top, width: slot, height: plotH, class: "hit" }));
    const base = pad.top + plotH;
    if (hIn > 0) group.append(el("rect", { x, y: base - hIn, width: barW, height: hIn, class: "in", rx: 1.5 }));
    if (hOut > 0) {
      group.append(el("rect", { x, y: base - hIn - hOut, width: barW, height: hOut, class: "out", rx: 1.5 }));
    }
    svg.append(group);
    const last = i === days.length - 1;
    const every = W < 480 ? 10 : 7;
    if (last || ((days.length - 1 - i) % every === 0 && days.length - 1 - i >= every / 2)) {
      svg.append(
        el(
          "text",
          { x: pad.left + i * slot + slot / 2, y: H - 8, class: "xlabel", "text-anchor": last ? "end" : "middle" },
          last ? "Today" : dayLabel(d.day, { month: "short", day: "numeric" }),
        ),
      );
    }
  });
  return svg;
}

export function formatTokens(n) {
  return full.format(n || 0);
}

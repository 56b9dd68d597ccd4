// Hand-written SVG line charts (no library): one <svg> per chart, one <path> per series.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

export function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : +v.toPrecision(3));

// series: [{name, steps, values}]. Returns an <svg> with data-points = the number of points drawn.
// Legend entries wrapped into rows that fit the width: [{x, row}] per series, and the row count.
function legendLayout(series, width, left, right) {
  let x = left;
  let row = 0;
  const places = series.map((s) => {
    const w = 20 + s.name.length * 6.2;
    if (x > left && x + w > width - right) { x = left; row += 1; }
    const place = { x, row };
    x += w;
    return place;
  });
  return { places, rows: series.length ? row + 1 : 0 };
}

export function lineChart(title, series, { width = 460, height = 240 } = {}) {
  const legendPlaces = legendLayout(series, width, 52, 12);
  height += Math.max(0, legendPlaces.rows - 1) * 14;
  const m = { l: 52, r: 12, t: 24, b: 30 + legendPlaces.rows * 14 };
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("text", { x: m.l, y: 15, class: "chart-title" }, title));
  const points = series.flatMap((s) => s.steps.map((x, i) => [x, s.values[i]])).filter(([, y]) => Number.isFinite(y));
  root.dataset.points = String(points.length);
  if (!points.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" }, "no points yet"));
    return root;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const xTicks = niceTicks(Math.min(...xs), Math.max(...xs));
  const yTicks = niceTicks(Math.min(...ys), Math.max(...ys));
  const [x0, x1] = [Math.min(xTicks[0], ...xs), Math.max(xTicks.at(-1), ...xs)];
  const [y0, y1] = [Math.min(yTicks[0], ...ys), Math.max(yTicks.at(-1), ...ys)];
  const px = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (width - m.l - m.r);
  const py = (y) => height - m.b - ((y - y0) / (y1 - y0 || 1)) * (height - m.t - m.b);
  const axes = svg("g", { class: "axes" });
  for (const t of yTicks) {
    axes.append(svg("line", { x1: m.l, x2: width - m.r, y1: py(t), y2: py(t), class: "grid" }));
    axes.append(svg("text", { x: m.l - 4, y: py(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of xTicks) axes.append(svg("text", { x: px(t), y: height - m.b + 14, "text-anchor": "middle" }, fmt(t)));
  axes.append(svg("text", { x: width - m.r, y: height - m.b + 28, "text-anchor": "end" }, "iteration"));
  root.append(axes);
  const legend = svg("g", { class: "legend" });
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const pts = s.steps.map((x, j) => [x, s.values[j]]).filter(([, y]) => Number.isFinite(y));
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    root.append(svg("path", { d, stroke: color, class: "line", "data-series": s.name }));
    if (pts.length === 1) root.append(svg("circle", { cx: px(pts[0][0]), cy: py(pts[0][1]), r: 3, fill: color }));
    const { x, row } = legendPlaces.places[i];
    const y = height - m.b + 40 + row * 14;
    legend.append(svg("rect", { x, y: y - 4, width: 10, height: 3, fill: color }));
    legend.append(svg("text", { x: x + 13, y }, s.name));
  });
  root.append(legend);
  return root;
}

// Small SVG charts, drawn with DOM calls only: every label is a text node, never parsed as markup.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1d2330", "#2f6fde", "#e0741f", "#2a9d4b", "#b3261e", "#8e44ad", "#13807a", "#c2185b",
    "#6d4c41", "#7f8c8d"];
  const W = 520, H = 240, M = { left: 52, right: 12, top: 10, bottom: 30 };

  function svg(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  // Round ticks covering [lo, hi]. Any finite data ends the loop: where the step is not a positive finite
  // number (1e17 + 1 === 1e17, or a range that overflows) the ends alone are the ticks.
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    if (!(step > 0 && Number.isFinite(step) && hi > lo)) return [lo, hi > lo ? hi : lo + Math.abs(lo) + 1];
    const ticks = [];
    for (let v = Math.floor(lo / step) * step; v <= hi + step / 2 && ticks.length < 2 * count + 4; v += step) {
      ticks.push(Number(v.toPrecision(12)));
    }
    return ticks.length > 1 ? ticks : [lo, hi];
  }

  // The frame: y grid + labels (as many decimals as the tick step needs), x labels; returns scale functions.
  function frame(root, xs, lo, hi, band) {
    const ticks = niceTicks(lo, hi, 4), y0 = ticks[0], y1 = ticks[ticks.length - 1];
    const decimals = Math.min(20, Math.max(0, -Math.floor(Math.log10(ticks[1] - ticks[0] || 1))));  // toFixed: <= 100
    const yFormat = (v) => v.toFixed(decimals);
    const plotW = W - M.left - M.right, plotH = H - M.top - M.bottom;
    const y = (v) => M.top + plotH - ((v - y0) / (y1 - y0)) * plotH;
    const step = band ? plotW / Math.max(xs.length, 1) : plotW / Math.max(xs.length - 1, 1);
    const x = (i) => M.left + (band ? step * (i + 0.5) : (xs.length > 1 ? step * i : plotW / 2));
    for (const t of ticks) {
      root.append(svg("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y(t), y2: y(t) }));
      root.append(svg("text", { x: M.left - 6, y: y(t) + 4, "text-anchor": "end" }, yFormat(t)));
    }
    root.append(svg("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
    root.append(svg("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }));
    xs.forEach((label, i) => root.append(svg("text", { x: x(i), y: H - 10, "text-anchor": "middle" }, label)));
    return { x, y, step, base: y(Math.max(y0, 0)) };
  }

  function figure(title, root, series) {
    const fig = document.createElement("figure");
    fig.className = "chart";
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    const legend = document.createElement("ul");
    legend.className = "legend";
    series.forEach((s, i) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = s.color || PALETTE[i % PALETTE.length];
      item.append(swatch, document.createTextNode(s.name));
      legend.append(item);
    });
    fig.append(cap, root, legend);
    return fig;
  }

  function extent(series, stacked) {
    let lo = Infinity, hi = -Infinity;
    const n = Math.max(0, ...series.map((s) => s.values.length));
    for (let i = 0; i < n; i++) {
      const vals = series.map((s) => s.values[i]).filter((v) => typeof v === "number");
      const top = stacked ? vals.reduce((a, b) => a + b, 0) : Math.max(...vals);
      if (vals.length) { lo = Math.min(lo, stacked ? 0 : Math.min(...vals)); hi = Math.max(hi, top); }
    }
    return lo === Infinity ? [0, 1] : [lo, hi];
  }

  // Lines over categories xs; a null value leaves a gap. series: [{name, values, emphasis}]
  function lineChart(title, xs, series, yFormat) {
    const root = svg("svg", { class: "chart line", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
    root.append(svg("title", {}, title));
    const [lo, hi] = extent(series, false), pad = (hi - lo) * 0.05 || 0.5;
    const f = frame(root, xs, lo - pad, hi + pad, false);
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const pts = s.values.map((v, j) => (typeof v === "number" ? [f.x(j), f.y(v), v, j] : null)).filter(Boolean);
      const line = svg("polyline", {
        class: "series" + (s.emphasis ? " emphasis" : ""), stroke: color,
        points: pts.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" "),
      });
      line.dataset.series = s.name;
      root.append(line);
      for (const p of pts) {
        const dot = svg("circle", { class: "point", cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: 3, fill: color });
        dot.append(svg("title", {}, `${s.name}, round ${xs[p[3]]}: ${yFormat ? yFormat(p[2]) : p[2].toFixed(4)}`));
        root.append(dot);
      }
    });
    return figure(title, root, series);
  }

  // Bars per category; stacked or side by side. series: [{name, values, color}]
  function barChart(title, xs, series, stacked, yFormat) {
    const root = svg("svg", { class: "chart bar", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
    root.append(svg("title", {}, title));
    const [, hi] = extent(series, stacked);
    const fmt = yFormat || ((v) => String(v));
    const f = frame(root, xs, 0, hi, true);
    const width = (f.step * 0.7) / (stacked ? 1 : series.length);
    xs.forEach((label, j) => {
      let top = 0;
      series.forEach((s, i) => {
        const v = typeof s.values[j] === "number" ? s.values[j] : 0;
        const left = f.x(j) - (f.step * 0.35) + (stacked ? 0 : i * width);
        const y1 = f.y(top + v), y0 = f.y(top);
        const bar = svg("rect", {
          class: "bar", x: left.toFixed(1), y: y1.toFixed(1), width: width.toFixed(1),
          height: Math.max(0, y0 - y1).toFixed(1), fill: s.color || PALETTE[i % PALETTE.length],
        });
        bar.dataset.series = s.name;
        bar.append(svg("title", {}, `${s.name}, round ${label}: ${fmt(v)}`));
        root.append(bar);
        if (stacked) top += v;
      });
    });
    return figure(title, root, series);
  }

  return { lineChart, barChart };
})();

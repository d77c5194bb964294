// What every screen of the console shares: the API call, a DOM builder that never parses
// HTML (all text goes in as text), formatting, and a small uPlot wrapper.
import uPlot from './vendor/uPlot.esm.js';

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

let onSignedOut = () => {};
export function whenSignedOut(fn) { onSignedOut = fn; }

// Every call sends the console header: cookie-authenticated writes are refused without it
// (the gateway's CSRF defence), and reads do not mind it.
export async function api(method, path, body) {
  const headers = { accept: 'application/json', 'x-smgate-console': '1' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { json = text; }
  if (res.status === 401 && path !== '/ui/api/session') onSignedOut();
  if (!res.ok) throw new ApiError(res.status, json);
  return json;
}

// h('div', {class: 'x', onclick: f}, 'text', child, [more children])
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', {}, title), ...children);
}

export function table(headers, rows, empty = 'nothing yet') {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  return h('div', { class: 'scroll' },
    h('table', {}, h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
      h('tbody', {}, rows)));
}

export function errorBox(e) {
  const code = e && e.body && (e.body.error || e.body.code);
  return h('p', { class: 'error', role: 'alert' }, code ? `${code}: ${e.message}` : String(e.message || e));
}

export function time(v) {
  if (v === undefined || v === null || v === '') return '–';
  const d = typeof v === 'number' ? new Date(v) : new Date(v);
  return Number.isNaN(d.getTime()) ? String(v) : d.toLocaleString();
}

export function readFile(input) {
  const f = input.files && input.files[0];
  if (!f) return Promise.reject(new Error('choose a file first'));
  return f.text().then((text) => ({ name: f.name, text }));
}

// Samples per `bucketMs` over the last `spanMs`, from a list of event times (ms).
export function rate(times, bucketMs, spanMs, now = Date.now()) {
  const n = Math.ceil(spanMs / bucketMs);
  const start = Math.floor((now - spanMs) / bucketMs) * bucketMs;
  const xs = [];
  const ys = [];
  for (let i = 0; i <= n; i++) { xs.push((start + i * bucketMs) / 1000); ys.push(0); }
  for (const t of times) {
    const i = Math.floor((t - start) / bucketMs);
    if (i >= 0 && i <= n) ys[i]++;
  }
  return [xs, ys];
}

// A line plot that fills its container's width and follows resizes.
export function plot(container, { series, yLabel, xTime = true, height = 180, minSpan = 0 }) {
  // Without time on x (generations), ticks fall on whole numbers.
  const xAxis = xTime ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] };
  const width = () => Math.max(240, container.clientWidth || 320);
  const opts = {
    width: width(),
    height,
    // `minSpan` (x units) keeps a plot with one or two samples from zooming out to years.
    scales: {
      x: {
        time: xTime,
        range: (u, min, max) => (minSpan && (max - min < minSpan || min === max) ? [max - minSpan, max + minSpan / 60] : [min, max]),
      },
      y: { range: (u, min, max) => [Math.min(0, min), Math.max(1, max * 1.1)] },
    },
    axes: [xAxis, { label: yLabel, size: 50 }],
    series: [{}, ...series.map((s, i) => ({
      label: s.label,
      stroke: s.color || ['#1f6feb', '#d1242f', '#1a7f37'][i % 3],
      width: 2,
      points: { show: s.points ?? false },
    }))],
  };
  const data = [[], ...series.map(() => [])];
  const u = new uPlot(opts, data, container);
  const ro = new ResizeObserver(() => u.setSize({ width: width(), height }));
  ro.observe(container);
  return {
    set: (d) => u.setData(d),
    destroy: () => { ro.disconnect(); u.destroy(); },
  };
}

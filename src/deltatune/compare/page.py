"""``report.html``: one self-contained page (no network, no libraries) with the sortable table,
quality against a chosen cost as an SVG scatter, and the answer in words."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text
from .answer import answer_text
from .report import interval_text

#: table columns: (row key, heading); the quality columns come first, from the rows
COLUMNS = [("learning_rate", "lr"), ("verdict", "verdict"), ("stored_params", "stored params"),
           ("not_stored_params", "trained, not stored"), ("adapter_bytes", "file bytes"),
           ("train_seconds", "train s"), ("step_seconds", "s/step"), ("peak_memory_mb", "peak MB"),
           ("latency_ratio", "latency x"), ("merged_latency_ratio", "merged x"), ("forgetting", "forgetting")]
#: the scatter's choice of x axis: (row key, label, log scale)
COSTS = [("stored_params", "stored parameters", True), ("train_seconds", "training seconds", False),
         ("peak_memory_mb", "peak memory (MB)", False), ("latency_ratio", "inference latency / base", False)]

SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const cols = data.columns, rows = data.rows, metric = data.metric;
let sortKey = metric, ascending = false;
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'})[c]);
function cell(v, note) {
  if ((v === null || v === undefined) && note) return `<span class="note" title="${esc(note)}">${esc(note.split(':')[0])}</span>`;  // failed / not measured
  return v === null || v === undefined ? '-' : typeof v === 'number' ? (Number.isInteger(v) ? v.toLocaleString('en') : String(Number(v.toPrecision(4)))) : v;
}
function drawTable() {
  const sorted = [...rows].sort((a, b) => ((a[sortKey] ?? -Infinity) > (b[sortKey] ?? -Infinity) ? 1 : -1) * (ascending ? 1 : -1));
  document.querySelector('#table thead').innerHTML = '<tr>' + cols.map(c => `<th data-key="${c[0]}">${c[1]}${c[0] === sortKey ? (ascending ? ' ▲' : ' ▼') : ''}</th>`).join('') + '</tr>';
  document.querySelector('#table tbody').innerHTML = sorted.map(r => `<tr data-method="${r.method}">` + cols.map(c => `<td>${cell(r[c[0]], r.notes[c[0]])}</td>`).join('') + '</tr>').join('');
  document.querySelectorAll('#table th').forEach(th => th.onclick = () => { ascending = th.dataset.key === sortKey ? !ascending : false; sortKey = th.dataset.key; drawTable(); });
}
function drawPlot() {
  const [key, label, log] = data.costs.find(c => c[0] === document.getElementById('cost').value);
  const pts = rows.filter(r => r[key] !== null && r[key] !== undefined);
  const W = 640, H = 360, L = 60, B = 40, T = 15, R = 110;
  const fx = v => log ? Math.log10(v) : v;
  const xs = pts.map(r => fx(r[key])), ys = pts.map(r => r[metric]);
  const pad = (lo, hi) => hi > lo ? [lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05] : [lo - 1, hi + 1];
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs)), [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
  const px = v => L + (fx(v) - x0) / (x1 - x0) * (W - L - R), py = v => H - B - (v - y0) / (y1 - y0) * (H - B - T);
  let svg = `<svg id="plot" width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg">`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#888"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#888"/>`;
  svg += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">${label}${log ? ' (log scale)' : ''}</text>`;
  svg += `<text x="14" y="${(H - B) / 2}" transform="rotate(-90 14 ${(H - B) / 2})" text-anchor="middle">test ${metric}</text>`;
  svg += `<text x="${L - 4}" y="${py(y0) }" text-anchor="end" font-size="11">${y0.toFixed(3)}</text><text x="${L - 4}" y="${py(y1) + 10}" text-anchor="end" font-size="11">${y1.toFixed(3)}</text>`;
  for (const r of pts) {
    const color = r.verdict === 'converged' ? '#1f77b4' : '#d62728';
    svg += `<circle class="point" data-method="${r.method}" cx="${px(r[key])}" cy="${py(r[metric])}" r="6" fill="${color}"><title>${r.method}: ${metric} ${r[metric].toFixed(3)}, ${label} ${cell(r[key])} (${r.verdict})</title></circle>`;
    svg += `<text x="${px(r[key]) + 8}" y="${py(r[metric]) + 4}" font-size="12">${r.method}</text>`;
  }
  document.getElementById('plotbox').innerHTML = svg + '</svg>';
}
document.getElementById('cost').onchange = drawPlot;
drawTable(); drawPlot();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deltatune compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{cursor:pointer;background:#f3f3f3}}
td:first-child{{text-align:left}}</style></head><body>
<h1>Which method? {title}</h1>
<div id="answer">{answer}</div>
<h2>Quality against cost</h2>
<label>cost: <select id="cost">{options}</select></label> <small>blue: converged; red: not converged</small>
<div id="plotbox"></div>
<h2>Every method</h2><p><small>click a heading to sort</small></p>
<table id="table"><thead></thead><tbody></tbody></table>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""


def write_page(path: Path, report: dict[str, Any]) -> Path:
    rows = report["rows"]
    metric = rows[0]["metric"] if rows else "accuracy"
    qualities = [metric, *sorted(k[:-4] for k in (rows[0] if rows else {}) if k.endswith("_std") and k[:-4] != metric)]
    columns = [("method", "method"), (metric, f"test {metric}"), ("interval", "95% interval"),
               ("flags", "may move because"), *[(q, f"test {q}") for q in qualities[1:]], *COLUMNS]
    keys = {key for key, _ in columns}
    data = {"metric": metric, "columns": columns, "costs": COSTS,
            "rows": [{**{k: v for k, v in r.items() if k in keys}, "interval": interval_text(r),
                      "flags": ", ".join(r.get("flags", [])) or "-", "notes": r.get("notes", {})} for r in rows]}
    seeds = max((len(r["seeds"]) for r in rows), default=1)
    answers = "".join(f"<pre>{html.escape(answer_text(a, metric, seeds).replace('**', ''))}</pre>" for a in report["answers"])
    text = PAGE.format(title=html.escape(f"{rows[0]['model']} ({len(rows)} methods)" if rows else ""),
                       answer=answers, options="".join(f'<option value="{k}">{label}</option>' for k, label, _ in COSTS),
                       data=json.dumps(data).replace("</", "<\\/"), script=SCRIPT)
    atomic_write_text(path, text)
    return path

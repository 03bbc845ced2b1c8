"""A self-contained HTML page: the trace of one token, and an interactive attention view.

Everything is inline (CSS, JavaScript, the numbers as JSON): the page opens offline, from a file,
with nothing fetched. The attention view shows the tokens; hovering one shows, for every head of the
chosen layer, how much that token attends to each key (darker = more), with the largest weight.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch
from torch import Tensor

from glassformer.checkpoints.files import atomic_write
from glassformer.inspect.inputs import TokensOrText, text_input
from glassformer.inspect.trace import Trace, _fmt, trace
from glassformer.model import Transformer

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; }
table.trace { border-collapse: collapse; }
table.trace td { border-top: 1px solid #dde; padding: 4px 8px; vertical-align: top; }
td.n { color: #889; text-align: right; } td.cell { font-weight: 600; white-space: nowrap; }
code { font: 12px ui-monospace, monospace; color: #3a4a8a; } .shape { color: #889; font-size: 12px; }
.vals { font: 12px ui-monospace, monospace; } .vals span { display: inline-block; min-width: 52px; padding: 1px 3px;
  text-align: right; } .row-label { color: #889; min-width: 56px !important; text-align: left !important; }
.tok { display: inline-block; padding: 3px 6px; margin: 2px; border: 1px solid #ccd; border-radius: 4px;
  font: 13px ui-monospace, monospace; white-space: pre; }
#queries .tok { cursor: pointer; background: #f4f5fa; }
#queries .tok.active { background: #ffd54a; border-color: #c9a300; }
.head { margin: 6px 0; } .head-label { display: inline-block; width: 150px; color: #556; }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('gf-data').textContent);
const select = document.getElementById('view');
const queries = document.getElementById('queries');
const heads = document.getElementById('heads');
const status = document.getElementById('status');
let view = 0, query = 0;
data.views.forEach((v, i) => { const o = document.createElement('option'); o.value = i; o.textContent = v.name;
  select.appendChild(o); });
function token(text, cls) {
  const s = document.createElement('span'); s.className = cls; s.textContent = text; return s;
}
function showHeads() {
  const v = data.views[view];
  queries.querySelectorAll('.tok').forEach((t, i) => t.classList.toggle('active', i === query));
  status.textContent = 'query ' + query + ' (' + JSON.stringify(v.q[query]) + ') in ' + v.name;
  heads.innerHTML = '';
  v.pattern.forEach((rows, h) => {
    const row = rows[query], div = document.createElement('div');
    div.className = 'head'; div.dataset.head = h;
    const best = row.indexOf(Math.max(...row));
    div.appendChild(token('head ' + h + ': ' + row[best].toFixed(2) + ' on ' + best, 'head-label'));
    row.forEach((w, k) => { const t = token(v.k[k], 'tok key'); t.dataset.weight = w.toFixed(4);
      t.style.background = 'rgba(37, 99, 235, ' + w.toFixed(4) + ')'; t.style.color = w > 0.5 ? '#fff' : '#1d2330';
      t.title = 'weight ' + w.toFixed(4); div.appendChild(t); });
    heads.appendChild(div);
  });
}
function showView() {
  const v = data.views[view];
  query = Math.min(query, v.q.length - 1);
  queries.innerHTML = '';
  v.q.forEach((text, i) => { const t = token(text, 'tok'); t.dataset.index = i;
    t.addEventListener('mouseenter', () => { query = i; showHeads(); }); queries.appendChild(t); });
  showHeads();
}
select.addEventListener('change', () => { view = Number(select.value); showView(); });
if (data.views.length) { query = data.views[0].q.length - 1; showView(); }
"""


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element (no `</script>` can close it early)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def _values_html(values: Tensor, max_values: int) -> str:
    """A step's numbers: coloured cells when a row fits, else the terminal trace's top-k summary."""
    rows = [values] if values.dim() == 1 else list(values)
    out = []
    for i, row in enumerate(rows):
        label = f'<span class="row-label">head {i}</span>' if values.dim() > 1 else ""
        if row.dim() == 1 and row.numel() <= max_values:
            peak = float(row[torch.isfinite(row)].abs().max()) if torch.isfinite(row).any() else 1.0
            cells = "".join(_cell(float(x), peak) for x in row.tolist())
            out.append(f"<div>{label}{cells}</div>")
        else:
            out.append(f"<div>{label}{html.escape(_fmt(row, 8))}</div>")
    return f'<div class="vals">{"".join(out)}</div>'


def _cell(x: float, peak: float) -> str:
    if x != x or abs(x) == float("inf"):
        return f'<span style="background:#eee">{x}</span>'
    alpha = 0.0 if peak == 0 else min(1.0, abs(x) / peak) * 0.45
    colour = "220, 38, 38" if x < 0 else "37, 99, 235"
    return f'<span style="background: rgba({colour}, {alpha:.3f})">{x:.3f}</span>'


def trace_html(walk: Trace, max_values: int = 16) -> str:
    """The steps of a `Trace` as an HTML section: cell, operation, hook, shape, numbers."""
    rows = []
    for i, step in enumerate(walk.steps, 1):
        hook = f"<code>{html.escape(step.hook)}</code> " if step.hook else ""
        rows.append(
            f'<tr><td class="n">{i}</td><td class="cell">{html.escape(step.cell)}</td>'
            f'<td>{html.escape(step.op)}<br>{hook}<span class="shape">shape {tuple(step.shape)}</span></td>'
            f"<td>{_values_html(step.values, max_values)}</td></tr>"
        )
    return (
        f'<section id="trace"><h2>{html.escape(walk.title)}</h2><table class="trace">{"".join(rows)}</table></section>'
    )


def attention_views(
    model: Transformer,
    tokens: Tensor,
    labels: list[str],
    tgt: Tensor | None = None,
    tgt_labels: list[str] | None = None,
) -> list[dict]:
    """Per attention layer (self-attention, and cross-attention in a decoder), the first sequence's
    pattern as nested lists `[head][query][key]` with the token labels of queries and keys."""

    def is_pattern(name: str) -> bool:
        return name.endswith("hook_pattern")

    with torch.no_grad():
        inputs = (tokens,) if tgt is None else (tokens, tgt)
        _, cache = model.run_with_cache(*inputs, names_filter=is_pattern)
    views = []
    for name, pattern in cache.items():  # firing order: layer by layer, encoder first
        where = name.removesuffix(".hook_pattern")
        query_side = labels if tgt is None or where.startswith("encoder.") else (tgt_labels or labels)
        key_side = labels if ".cross_attn" in where or tgt is None or where.startswith("encoder.") else query_side
        views.append(
            {
                "name": where.replace("blocks.", "layer ")
                .replace(".attn", "")
                .replace(".cross_attn", " cross-attention"),
                "q": query_side,
                "k": key_side,
                "pattern": pattern[0].float().round(decimals=4).tolist(),  # (n_heads, q_pos, k_pos)
            }
        )
    return views


def page(
    model: Transformer,
    tokens: TokensOrText,
    labels: list[str] | None = None,
    position: int = -1,
    tgt: TokensOrText | None = None,
    tgt_labels: list[str] | None = None,
    title: str = "glassformer: inside one forward pass",
) -> str:
    """The whole page: the trace of token `position` and the interactive attention view. Tokens
    may be text; labels default to the tokenizer's token strings, or the ids without one."""
    tokens, labels = _labelled(model, tokens, labels, "tokens")
    if tgt is not None:
        tgt, tgt_labels = _labelled(model, tgt, tgt_labels, "tgt")
    walk = trace(model, tokens, tgt, position=position, labels=tgt_labels if tgt is not None else labels)
    data = {"views": attention_views(model, tokens, labels, tgt, tgt_labels)}
    cfg = model.cfg
    about = f"{cfg.arch}, {cfg.n_layers} layer(s), d_model={cfg.d_model}, {cfg.n_heads} heads × d_head={cfg.d_head}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1><p>{html.escape(about)}</p>
<section id="attention"><h2>Where each head looks</h2>
<p>Layer: <select id="view"></select> &nbsp; <span id="status"></span></p>
<p>Hover a token (the query):</p><div id="queries"></div>
<div id="heads"></div></section>
{trace_html(walk)}
<script type="application/json" id="gf-data">{_script_json(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def _labelled(
    model: Transformer, tokens: TokensOrText, labels: list[str] | None, name: str
) -> tuple[Tensor, list[str]]:
    """(batch, pos) tokens and the first sequence's labels: given, the tokenizer's, or the ids."""
    tokens, token_strings = text_input(model, tokens, name)
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    return tokens, labels or token_strings or [str(t) for t in tokens[0].tolist()]


def write_page(path: str | Path, model: Transformer, tokens: TokensOrText, **options: object) -> Path:
    """Write `page(model, tokens, **options)` to `path` (atomically) and return the path."""
    text = page(model, tokens, **options)  # type: ignore[arg-type]
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path

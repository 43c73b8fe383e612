"""The gateway's API reference page (``/docs``) and its front door (``/``), with no external asset.

FastAPI's own ``/docs`` loads Swagger UI from a CDN: offline (a laptop, an air-gapped cluster) it is a blank page.
No installed package ships Swagger UI or ReDoc, so ``/docs`` is a small page of the project's own: its inline
script (allowed by hash in a Content-Security-Policy that forbids every other origin) reads ``/openapi.json`` of
this origin and lists each endpoint (method, path, summary, parameters, body, answers) and each schema. Without
JavaScript or without the document it says so instead of staying blank. ``/`` is the console's
(``services/gateway/console``), which links here.
"""

from __future__ import annotations

import base64
import hashlib

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DOCS_SCRIPT = r"""
const out = document.getElementById('api');
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text) e.textContent = text;
  if (cls) e.className = cls; return e; };
const typeOf = s => !s ? '' : s.$ref ? s.$ref.split('/').pop() : s.anyOf ? s.anyOf.map(typeOf).join(' | ')
  : s.type === 'array' ? typeOf(s.items) + '[]' : (s.type || '') + (s.enum ? ' ' + JSON.stringify(s.enum) : '');
fetch('/openapi.json').then(r => { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
.then(doc => {
  out.textContent = '';
  out.append(el('h1', doc.info.title + ' ' + doc.info.version), el('p', doc.info.description || ''));
  for (const [path, ops] of Object.entries(doc.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el('section', '', 'op');
      const h = el('h2'); h.append(el('span', method.toUpperCase(), 'm ' + method), el('code', ' ' + path));
      sec.append(h, el('p', op.summary || ''));
      if (op.description) sec.append(el('p', op.description, 'd'));
      const rows = (op.parameters || []).map(p => [p.name + (p.required ? ' *' : ''), p.in, typeOf(p.schema),
                                                   p.description || '']);
      const body = op.requestBody && op.requestBody.content && op.requestBody.content['application/json'];
      if (body) rows.push(['body' + (op.requestBody.required ? ' *' : ''), 'json', typeOf(body.schema), '']);
      for (const [code, r] of Object.entries(op.responses || {})) {
        const c = r.content && r.content['application/json'];
        rows.push([code, 'answer', c ? typeOf(c.schema) : '', r.description || '']);
      }
      const t = el('table');
      for (const row of rows) { const tr = el('tr'); row.forEach(v => tr.append(el('td', v))); t.append(tr); }
      sec.append(t); out.append(sec);
    }
  }
  out.append(el('h1', 'Schemas'));
  for (const [name, s] of Object.entries((doc.components || {}).schemas || {})) {
    const sec = el('section', '', 'op'); sec.id = name; sec.append(el('h2', name));
    if (s.description) sec.append(el('p', s.description, 'd'));
    const t = el('table'); const req = new Set(s.required || []);
    for (const [f, p] of Object.entries(s.properties || {})) {
      const tr = el('tr');
      [f + (req.has(f) ? ' *' : ''), typeOf(p), p.default === undefined ? '' : 'default ' + JSON.stringify(p.default),
       p.description || ''].forEach(v => tr.append(el('td', v)));
      t.append(tr);
    }
    sec.append(t); out.append(sec);
  }
  window.docsReady = true;
})
.catch(err => { out.textContent = 'The API description (/openapi.json) could not be loaded: ' + err.message; });
"""

DOCS_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rheo API</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:70em}} code{{font-size:15px}}
.op{{border-top:1px solid #ccc;padding:.3em 0}} .m{{font:bold 13px monospace;padding:2px 6px;border-radius:3px;
background:#ddd}} .get{{background:#cde}} .post{{background:#cec}} .patch{{background:#eec}}
.delete{{background:#ecc}} .d{{color:#555;white-space:pre-wrap}} td{{padding:2px 10px 2px 0;vertical-align:top}}
header{{background:#f4f4f4;padding:.6em 1em}}</style></head>
<body><header><a href="/console/">Console</a> · rheo gateway. Every <code>/v1</code> call needs
<code>Authorization: Bearer &lt;token&gt;</code> (<code>rheo up</code> prints it).
<b>Player</b>: <code>POST /v1/streams</code> (or
<code>POST /v1/streams/{{id}}/playback</code>) answers a signed <code>player_url</code>,
<code>/player/index.html?src=…</code> on this server; <code>rheo up</code> prints the demo stream's.
Machine-readable: <a href="/openapi.json">/openapi.json</a>.</header>
<main id="api">Loading the API description…</main>
<noscript>This page renders /openapi.json with JavaScript; without it, read
<a href="/openapi.json">/openapi.json</a> directly.</noscript>
<script>{DOCS_SCRIPT}</script></body></html>
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(DOCS_SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; connect-src 'self'; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Only the page's own inline script, and requests to this origin: nothing from a CDN can load, by construction."""

DOCS_PATH = "/docs"


def make_docs_router() -> APIRouter:
    """``/docs``: the offline API reference."""
    router = APIRouter(include_in_schema=False)

    @router.get(DOCS_PATH)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                                "Referrer-Policy": "no-referrer"})

    return router

// tlsgate dashboard: renders /api/overview (map, certificates, diagnostics), follows /events
// (stats every second, access-log batches, config changes) and asks /api/explain. Plain DOM,
// no framework; every value from the server goes in as text, never as HTML.
'use strict';

(function () {
  const MAX_LOG_ROWS = 200;
  const state = { overview: null, stats: {}, marks: {}, path: null, view: 'diagram', proxyNames: {} };

  // ------------------------------------------------------------ tiny DOM helper
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const $ = (id) => document.getElementById(id);
  const clear = (el) => { while (el.firstChild) el.removeChild(el.firstChild); return el; };

  // file://cert|key|ca|crl secrets: the file names are enough to recognise them.
  function secretName(n) {
    if (!n.startsWith('file://')) return n;
    return n.slice(7).split('|').filter(Boolean).map((f) => f.split('/').pop()).join(' + ');
  }

  function badge(mark) {
    return h('span', { class: `badge m-${mark}`, 'data-mark': mark }, state.marks[mark] || mark);
  }

  function timeLeft(seconds) {
    const s = Math.abs(seconds);
    const txt = s >= 86400 * 2 ? `${Math.floor(s / 86400)} d` : s >= 7200 ? `${Math.floor(s / 3600)} h` : s >= 120 ? `${Math.floor(s / 60)} min` : `${Math.floor(s)} s`;
    return seconds <= 0 ? `expired ${txt} ago` : `${txt} left`;
  }
  function secondsUntil(iso) { return (Date.parse(iso) - Date.now()) / 1000; }
  // Same rule as the server (model.ts certLevel): short-lived certificates by share of life left.
  function levelOf(seconds, notBefore, notAfter) {
    const life = notBefore && notAfter ? (Date.parse(notAfter) - Date.parse(notBefore)) / 1000 : Infinity;
    if (seconds <= 0) return 'expired';
    if (life <= 7 * 86400) return seconds < life * 0.1 ? 'urgent' : seconds < life * 0.4 ? 'soon' : 'ok';
    return seconds < 7 * 86400 ? 'urgent' : seconds < 30 * 86400 ? 'soon' : 'ok';
  }

  function certLine(c) {
    const label = c.use === 'server' ? 'serves' : c.use === 'client' ? 'presents' : 'verifies with';
    if (!c.subject && !c.sans) return h('div', { class: 'cert' }, `${label}: ${c.note || secretName(c.secret)}`);
    const left = c.notAfter ? secondsUntil(c.notAfter) : undefined;
    const names = (c.sans && c.sans.length ? c.sans.join(', ') : c.subject) || '(no subject)';
    return h('div', { class: 'cert', title: `${c.secret}\nsha256 ${c.fingerprintSha256 || ''}` },
      `${label}: ${names}`,
      left !== undefined ? [' ', h('span', { class: `left lvl-${levelOf(left, c.notBefore, c.notAfter)}` }, timeLeft(left))] : null,
      c.note ? ` (${c.note})` : null);
  }

  // ------------------------------------------------------------ map
  function listenerIndex() {
    // "Continues at": an endpoint that is another proxy's listener in this process.
    const idx = new Map();
    for (const p of state.overview.proxies) {
      for (const l of p.map.listeners) {
        for (const a of [l.address, '127.0.0.1', 'localhost']) {
          if (l.address === '0.0.0.0' || l.address === '::' || a === l.address) idx.set(`${a}:${l.port}`, { proxy: p, listener: l });
        }
      }
    }
    return idx;
  }

  function hop(id, cls, first, ...children) {
    return h('div', { class: `hop ${cls}${first ? ' first' : ''}`, 'data-hop': id, tabindex: '0', role: 'group' }, h('span', { class: 'step', 'aria-hidden': 'true' }), ...children);
  }

  function hopLabel(el, text) { el.setAttribute('aria-label', text); return el; }
  // Clusters and endpoints repeat under every route that uses them: a path lights only its own row.
  function rowOf(routeId, el) { el.setAttribute('data-row', routeId); return el; }

  function renderDiagram() {
    const root = clear($('map-diagram'));
    const idx = listenerIndex();
    for (const p of state.overview.proxies) {
      const clusters = new Map(p.map.clusters.map((c) => [c.name, c]));
      const sec = h('section', { class: 'proxy', id: `proxy-${p.id}`, 'data-proxy': p.id, 'aria-label': p.name },
        h('h3', {}, p.name, ' ', h('span', { class: 'meta' }, `generation ${p.generation} · ${p.ready ? 'ready' : 'not ready'}${p.draining ? ' · draining' : ''}`)));
      if (p.map.listeners.length === 0) sec.append(h('p', { class: 'hint' }, 'No listener.'));
      for (const l of p.map.listeners) {
        const ls = h('span', { class: 'lstats', 'data-lstats': `${p.id}|${l.name}` });
        const block = h('div', { class: 'listener', id: `L-${p.id}-${l.port}` },
          h('h4', { 'data-hop': l.id }, h('span', { class: 'step', 'aria-hidden': 'true' }), `listener ${l.address}:${l.port}`, ` (${l.role.replace('-', ' ')}, ${l.inspector === 'tls-inspector' ? 'reads the ClientHello first' : 'plain'})`, ls));
        const grid = h('div', { class: 'paths' },
          h('div', { class: 'colhead' }, 'filter chain (server)'), h('div', { class: 'colhead' }, 'route'),
          h('div', { class: 'colhead' }, 'cluster'), h('div', { class: 'colhead' }, 'endpoints'));
        for (const ch of l.chains) {
          const routes = ch.routes.length ? ch.routes : [null];
          const match = ch.serverNames.length ? `SNI ${ch.serverNames.join(', ')}` : ch.transport === 'raw_buffer' ? 'plaintext' : ch.transport === 'tls' ? 'TLS, any SNI' : 'any';
          const chainEl = hopLabel(hop(ch.id, 'chain', true,
            h('div', { class: 'title' }, match), badge(ch.mark),
            ch.tlsMode ? h('div', { class: 'detail' }, `tls.mode ${ch.tlsMode}`) : null,
            ch.certs.map(certLine),
            h('div', { class: 'detail' }, ch.origin || ch.name)),
          `filter chain ${match}: ${state.marks[ch.mark] || ch.mark}`);
          chainEl.style.gridRow = `span ${routes.length}`;
          grid.append(chainEl);
          for (const r of routes) {
            if (!r) {
              grid.append(h('div', { class: 'hop' }, h('div', { class: 'detail' }, ch.filter === 'reject' ? 'refused: no route' : 'no route')), h('div'), h('div'));
              continue;
            }
            const rs = h('div', { class: 'stat', 'data-rstats': `${p.id}|${l.name}|${r.name}` });
            grid.append(hopLabel(hop(r.id, 'route', false,
              h('div', { class: 'title' }, r.kind === 'connect' ? 'CONNECT tunnel' : r.kind === 'tcp' ? 'TCP/TLS route' : r.kind === 'redirect' ? 'redirect' : r.kind === 'direct' ? 'direct response' : 'HTTP route'),
              badge(r.mark),
              h('div', { class: 'detail' }, `${r.hosts.length ? r.hosts.join(', ') + ' · ' : ''}${r.match}`),
              h('div', { class: 'detail' }, r.origin || r.name), rs),
            `route ${r.name}: ${state.marks[r.mark] || r.mark}`));
            const cl = h('div', {});
            const ep = h('div', {});
            for (const ref of r.clusters) {
              const c = clusters.get(ref.name);
              if (!c) { cl.append(h('div', { class: 'hop' }, `${ref.name} (missing)`)); continue; }
              cl.append(hopLabel(rowOf(r.id, hop(c.id, 'cluster', false,
                h('div', { class: 'title' }, `${c.serviceHost}:${c.servicePort}`), badge(c.mark),
                c.tlsMode ? h('div', { class: 'detail' }, `tls.mode ${c.tlsMode}${c.sni ? ` · SNI ${c.sni}` : ''}${c.verify ? ` · ${c.verify}` : ''}`) : null,
                c.certs.map(certLine),
                r.clusters.length > 1 ? h('div', { class: 'detail' }, `weight ${ref.weight}`) : null,
                h('div', { class: 'detail' }, c.name))),
              `cluster ${c.name}: ${state.marks[c.mark] || c.mark}`));
              for (const e of c.endpoints) {
                const next = idx.get(`${e.address}:${e.port}`);
                ep.append(hopLabel(rowOf(r.id, hop(e.id, 'endpoint', false,
                  h('div', { class: 'title' }, `${e.address}:${e.port}`),
                  next ? h('div', { class: 'next' }, 'continues at ', h('a', { href: `#L-${next.proxy.id}-${next.listener.port}` }, `${next.proxy.name} :${next.listener.port}`)) : null)),
                `endpoint ${e.address}:${e.port}${next ? `, which is ${next.proxy.name}` : ''}`));
              }
            }
            grid.append(cl, ep);
          }
        }
        block.append(grid);
        sec.append(block);
      }
      root.append(sec);
    }
  }

  function renderTable() {
    const root = clear($('map-table'));
    const t = h('table', { class: 'maptable' }, h('caption', {}, 'Every path of the running configuration, one row per route and cluster'),
      h('thead', {}, h('tr', {}, ['proxy', 'listener', 'filter chain', 'TLS at the chain', 'certificate served', 'route', 'payload', 'cluster', 'TLS to the upstream', 'endpoints'].map((x) => h('th', { scope: 'col' }, x)))));
    const body = h('tbody');
    for (const p of state.overview.proxies) {
      const clusters = new Map(p.map.clusters.map((c) => [c.name, c]));
      for (const l of p.map.listeners) {
        for (const ch of l.chains) {
          const match = ch.serverNames.length ? `SNI ${ch.serverNames.join(', ')}` : ch.transport;
          const served = ch.certs.filter((c) => c.use === 'server').map((c) => `${(c.sans || []).join(', ') || c.subject || c.secret}${c.notAfter ? ` (until ${c.notAfter.slice(0, 10)})` : ''}`).join('; ');
          const rows = ch.routes.length ? ch.routes.flatMap((r) => (r.clusters.length ? r.clusters.map((k) => [r, k]) : [[r, null]])) : [[null, null]];
          for (const [r, k] of rows) {
            const c = k ? clusters.get(k.name) : null;
            const tr = h('tr', { 'data-hop-row': [l.id, ch.id, r && r.id, c && c.id].filter(Boolean).join(' ') },
              h('td', {}, p.name), h('td', {}, `${l.address}:${l.port}`), h('td', {}, match),
              h('td', { 'data-mark': ch.mark }, state.marks[ch.mark] || ch.mark), h('td', {}, served || '—'),
              h('td', {}, r ? r.name : '—'), h('td', { 'data-mark': r ? r.mark : '' }, r ? state.marks[r.mark] || r.mark : '—'),
              h('td', {}, c ? c.name : '—'),
              h('td', { 'data-mark': c ? c.mark : '' }, c ? `${state.marks[c.mark] || c.mark}${c.sni ? `, SNI ${c.sni}` : ''}` : '—'),
              h('td', {}, c ? c.endpoints.map((e) => `${e.address}:${e.port}`).join(', ') : '—'));
            body.append(tr);
          }
        }
      }
    }
    t.append(body);
    root.append(h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Map as a table' }, t));
  }

  function renderLegend() {
    const root = clear($('legend'));
    for (const m of ['terminated', 'terminated-mutual', 'passthrough', 'originated', 'originated-mutual', 'mtls', 'tls-in-mtls', 'opaque', 'plaintext']) root.append(badge(m));
  }

  // ------------------------------------------------------------ certificates, applies, diagnostics
  function renderCerts() {
    const root = clear($('cert-list'));
    const t = h('table', {}, h('caption', {}, 'Certificates in use, soonest expiry first'),
      h('thead', {}, h('tr', {}, ['proxy', 'secret', 'role', 'subject / SANs', 'issuer', 'expires', 'time left', 'sha256'].map((x) => h('th', { scope: 'col' }, x)))));
    const body = h('tbody');
    const all = [];
    for (const p of state.overview.proxies) for (const c of p.certs) all.push([p, c]);
    all.sort((a, b) => Date.parse(a[1].notAfter) - Date.parse(b[1].notAfter));
    for (const [p, c] of all) {
      const left = secondsUntil(c.notAfter);
      body.append(h('tr', { 'data-cert': c.fingerprintSha256 },
        h('td', {}, p.name), h('td', { title: c.secret }, secretName(c.secret)), h('td', {}, c.role),
        h('td', {}, c.sans.length ? c.sans.join(', ') : c.subject || '(empty)'), h('td', {}, c.issuer),
        h('td', {}, c.notAfter.replace('T', ' ').slice(0, 19) + ' UTC'),
        h('td', {}, h('span', { class: `left lvl-${levelOf(left, c.notBefore, c.notAfter)}`, 'data-cert-left': '' }, timeLeft(left))),
        h('td', { title: c.fingerprintSha256 }, c.fingerprintSha256.slice(0, 23) + '…')));
    }
    if (!all.length) body.append(h('tr', {}, h('td', { colspan: '8' }, 'No certificate loaded.')));
    t.append(body);
    root.append(h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Certificates' }, t));

    const ap = clear($('apply-list'));
    const t2 = h('table', {}, h('caption', {}, 'Most recent first: start, file changes, SIGHUP and workload certificate rotations'),
      h('thead', {}, h('tr', {}, ['time', 'proxy', 'trigger', 'result', 'generation', 'message'].map((x) => h('th', { scope: 'col' }, x)))));
    const b2 = h('tbody');
    const applies = [];
    for (const p of state.overview.proxies) for (const a of p.applies) applies.push([p, a]);
    applies.sort((a, b) => Date.parse(b[1].time) - Date.parse(a[1].time));
    for (const [p, a] of applies.slice(0, 50)) {
      b2.append(h('tr', { 'data-trigger': a.trigger }, h('td', {}, a.time.replace('T', ' ').slice(0, 19)), h('td', {}, p.name), h('td', {}, a.trigger),
        h('td', { class: a.ok ? 'lvl-ok' : 'sev-error' }, a.ok ? 'applied' : 'rejected'), h('td', { class: 'num' }, a.generation), h('td', {}, a.message)));
    }
    t2.append(b2);
    ap.append(t2);
  }

  function renderDiagnostics() {
    const root = clear($('diag-list'));
    for (const p of state.overview.proxies) {
      const ds = p.diagnostics;
      const box = h('div', { class: 'proxy' }, h('h3', {}, p.name, ' ', h('span', { class: 'meta' }, `generation ${p.generation} · config ${p.sources.join(', ')}`)));
      if (!ds.some((d) => d.severity !== 'info')) box.append(h('p', { class: 'lvl-ok' }, 'No warnings or errors.'));
      else {
        const ul = h('ul');
        for (const d of ds) {
          const where = d.file ? `${d.file}${d.line ? `:${d.line}` : ''}${d.column ? `:${d.column}` : ''}` : '';
          ul.append(h('li', { 'data-code': d.code }, h('span', { class: `sev-${d.severity}` }, d.severity === 'info' ? 'note' : d.severity), ` ${d.code} `, where ? h('code', {}, where) : null, ` ${d.message}`, d.hint ? h('div', { class: 'detail' }, d.hint) : null));
        }
        box.append(ul);
      }
      root.append(box);
    }
  }

  function renderProxySelect() {
    const sel = $('ex-proxy');
    const cur = sel.value;
    clear(sel);
    for (const p of state.overview.proxies) sel.append(h('option', { value: p.id }, p.name));
    if (cur && state.overview.proxies.some((p) => p.id === cur)) sel.value = cur;
  }

  // ------------------------------------------------------------ live
  function fmtReasons(o) { return Object.entries(o).map(([k, v]) => `${k} ${v}`).join(', '); }

  function renderStats() {
    if (!state.overview) return;
    const lt = h('table', {}, h('caption', {}, 'Per listener'),
      h('thead', {}, h('tr', {}, ['proxy', 'listener', 'connections', 'open', 'conn/s', 'handshakes ok', 'handshake failures by reason', 'refused by reason'].map((x) => h('th', { scope: 'col' }, x)))));
    const lb = h('tbody');
    const rt = h('table', {}, h('caption', {}, 'Per route'),
      h('thead', {}, h('tr', {}, ['proxy', 'listener', 'route', 'requests', 'req/s', 'by status class'].map((x) => h('th', { scope: 'col' }, x)))));
    const rb = h('tbody');
    for (const p of state.overview.proxies) {
      const s = state.stats[p.id];
      if (!s) continue;
      for (const [name, l] of Object.entries(s.listeners)) {
        lb.append(h('tr', { 'data-listener': name },
          h('td', {}, p.name), h('td', {}, name), h('td', { class: 'num', 'data-k': 'connections' }, l.connections), h('td', { class: 'num' }, l.active),
          h('td', { class: 'num' }, l.connectionsPerSecond), h('td', { class: 'num' }, l.handshakes),
          h('td', { 'data-k': 'failures' }, fmtReasons(l.handshakeFailures) || '—'), h('td', {}, fmtReasons(l.refused) || '—')));
        const el = document.querySelector(`[data-lstats="${CSS.escape(`${p.id}|${name}`)}"]`);
        if (el) {
          const f = Object.values(l.handshakeFailures).reduce((a, b) => a + b, 0);
          el.textContent = `${l.connections} connections · ${l.active} open · ${l.connectionsPerSecond}/s · ${l.handshakes} handshakes${f ? ` · ${f} failed (${fmtReasons(l.handshakeFailures)})` : ''}`;
        }
      }
      for (const r of s.routes) {
        rb.append(h('tr', { 'data-route': r.route }, h('td', {}, p.name), h('td', {}, r.listener), h('td', {}, r.route || '(none)'),
          h('td', { class: 'num', 'data-k': 'requests' }, r.requests), h('td', { class: 'num' }, r.requestsPerSecond), h('td', {}, fmtReasons(r.byClass))));
        // One route may serve several chains (SIMPLE and MUTUAL hosts): every copy shows the count.
        for (const el of document.querySelectorAll(`[data-rstats="${CSS.escape(`${p.id}|${r.listener}|${r.route}`)}"]`)) el.textContent = `${r.requests} requests · ${r.requestsPerSecond}/s`;
      }
    }
    if (!rb.firstChild) rb.append(h('tr', {}, h('td', { colspan: '6' }, 'No HTTP request yet.')));
    clear($('live-listeners')).append(lt);
    lt.append(lb);
    clear($('live-routes')).append(rt);
    rt.append(rb);
    for (const el of document.querySelectorAll('[data-cert-left]')) {
      // keep the "time left" text moving without refetching
      const row = el.closest('[data-cert]');
      if (row && state.overview) {
        const c = state.overview.proxies.flatMap((p) => p.certs).find((x) => x.fingerprintSha256 === row.getAttribute('data-cert'));
        if (c) { const left = secondsUntil(c.notAfter); el.textContent = timeLeft(left); el.className = `left lvl-${levelOf(left, c.notBefore, c.notAfter)}`; }
      }
    }
  }

  function addLogs(items, fresh) {
    const body = $('log-body');
    for (const { proxy, entry: e } of items) {
      const req = e.method ? `${e.method} ${e.authority || ''}${e.path || ''}` : `${e.kind || 'tcp'} ${e.upstream || e.upstreamEndpoint || ''}`;
      const tr = h('tr', { class: fresh ? 'fresh' : '', 'data-reason': e.reason || '' },
        h('td', {}, String(e.time || '').slice(11, 23)), h('td', {}, state.proxyNames[proxy] || proxy), h('td', {}, e.listener || ''),
        h('td', {}, e.sni || '—'), h('td', {}, req), h('td', { class: 'num' }, e.status === undefined ? '—' : e.status),
        h('td', { class: e.reason && e.reason !== 'ok' ? 'sev-warning' : '' }, e.reason || ''),
        h('td', {}, [e.route, e.upstreamCluster || e.cluster].filter(Boolean).join(' → ')));
      body.insertBefore(tr, body.firstChild);
    }
    while (body.childNodes.length > MAX_LOG_ROWS) body.removeChild(body.lastChild);
  }

  // ------------------------------------------------------------ explain
  function clearPath() {
    state.path = null;
    for (const el of document.querySelectorAll('.on-path')) el.classList.remove('on-path');
    for (const el of document.querySelectorAll('.dim')) el.classList.remove('dim');
    for (const el of document.querySelectorAll('.step')) el.textContent = '';
  }

  function drawPath() {
    for (const el of document.querySelectorAll('.on-path')) el.classList.remove('on-path');
    if (!state.path) return;
    const sec = document.querySelector(`[data-proxy="${CSS.escape(state.path.proxy)}"]`);
    if (!sec) return;
    sec.classList.add('dim');
    let first = null;
    const route = state.path.ids.find((x) => x.startsWith('R:'));
    state.path.ids.forEach((id, i) => {
      for (const el of sec.querySelectorAll('[data-hop]')) {
        if (el.getAttribute('data-hop') !== id) continue;
        if (route && el.hasAttribute('data-row') && el.getAttribute('data-row') !== route) continue;
        el.classList.add('on-path');
        const step = el.querySelector('.step');
        if (step) step.textContent = String(i + 1);
        first = first || el;
      }
    });
    if (first && state.scrollToPath) { first.scrollIntoView({ block: 'center', behavior: 'smooth' }); state.scrollToPath = false; }
  }

  function describeExplanation(r) {
    const e = r.explanation;
    const out = h('div', {}, h('p', { class: e.matched ? 'summary' : 'summary nomatch' }, e.summary));
    const ol = h('ol', { 'aria-label': 'The path, hop by hop' });
    if (e.listener) ol.append(h('li', {}, `listener ${e.listener.address}:${e.listener.port}`));
    if (e.chain) ol.append(h('li', {}, `filter chain ${e.chain.name} (chosen by ${e.chain.selectedBy.replace('_', ' ')}${e.chain.pattern ? ` ${e.chain.pattern}` : ''})`));
    if (e.tls) {
      const certs = (e.tls.certificates || []).map((c) => c.leaf ? `${c.leaf.subject || c.leaf.sans.join(', ')}, expires ${c.leaf.notAfter}` : c.secret).join('; ');
      ol.append(h('li', {}, e.tls.action === 'terminate' ? `TLS terminated here (${e.tls.mode}${e.tls.clientCertificate ? `, client certificate ${e.tls.clientCertificate}` : ''})${certs ? ` serving ${certs}` : ''}` : e.tls.action === 'passthrough' ? 'TLS passed through opaque' : 'no TLS'));
    }
    if (e.http && e.http.route) ol.append(h('li', {}, `route ${e.http.route.name} (${e.http.route.match})${e.http.status ? ` → ${e.http.status}` : ''}`));
    else if (e.http && e.http.status) ol.append(h('li', {}, `answered ${e.http.status}${e.http.location ? ` → ${e.http.location}` : ''}`));
    if (e.tcp) ol.append(h('li', {}, `TCP route ${e.tcp.name}`));
    for (const c of e.clusters) {
      const t = c.upstreamTls;
      const tls = !t ? '' : t.mode === 'plaintext' ? ', plaintext to the upstream' : `, TLS ${t.mode} originated${t.sni ? ` with SNI ${t.sni}` : ''}`;
      ol.append(h('li', {}, `cluster ${c.name}${c.percent !== undefined ? ` (${c.percent}%)` : ''}${tls}${c.endpoints ? ` → ${c.endpoints.map((x) => `${x.address}:${x.port}`).join(', ')}` : ''}`));
    }
    out.append(ol);
    for (const n of [...(e.nearest || []), ...(e.notes || [])]) out.append(h('p', { class: 'detail' }, n));
    return out;
  }

  async function runExplain(ev) {
    ev.preventDefault();
    const params = new URLSearchParams();
    for (const k of ['target', 'sni', 'port', 'proxy']) {
      const v = $(`ex-${k}`).value.trim();
      if (v) params.set(k, v);
    }
    const box = clear($('explain-result'));
    box.append(h('p', {}, 'explaining…'));
    try {
      const res = await fetch(`/api/explain?${params}`);
      const body = await res.json();
      clear(box);
      if (!res.ok) { box.append(h('p', { class: 'nomatch', role: 'alert' }, body.error || `error ${res.status}`)); clearPath(); return; }
      box.append(describeExplanation(body));
      clearPath();
      state.path = { proxy: body.proxy, ids: body.path };
      state.scrollToPath = true;
      drawPath();
      if (state.view === 'table') setView('diagram');
    } catch (e) {
      clear(box).append(h('p', { class: 'nomatch', role: 'alert' }, `explain failed: ${e.message}`));
    }
  }

  // ------------------------------------------------------------ views, keyboard
  function setView(v) {
    state.view = v;
    $('view-diagram').setAttribute('aria-pressed', String(v === 'diagram'));
    $('view-table').setAttribute('aria-pressed', String(v === 'table'));
    $('map-diagram').hidden = v !== 'diagram';
    $('map-table').hidden = v !== 'table';
  }

  // Arrow keys move between hops: left/right along a path, up/down between hops of one column.
  function onMapKey(ev) {
    const cur = ev.target.closest && ev.target.closest('[data-hop]');
    if (!cur || !['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown'].includes(ev.key)) return;
    const all = [...document.querySelectorAll('#map-diagram [data-hop]')];
    const r0 = cur.getBoundingClientRect();
    let best = null; let bestD = Infinity;
    for (const el of all) {
      if (el === cur) continue;
      const r = el.getBoundingClientRect();
      const dx = r.left - r0.left; const dy = r.top - r0.top;
      const ok = ev.key === 'ArrowRight' ? dx > 10 : ev.key === 'ArrowLeft' ? dx < -10 : ev.key === 'ArrowDown' ? dy > 5 && Math.abs(dx) < 10 : dy < -5 && Math.abs(dx) < 10;
      if (!ok) continue;
      const d = ev.key === 'ArrowRight' || ev.key === 'ArrowLeft' ? Math.abs(dx) + Math.abs(dy) * 3 : Math.abs(dy);
      if (d < bestD) { bestD = d; best = el; }
    }
    if (best) { ev.preventDefault(); best.focus(); }
  }

  // ------------------------------------------------------------ data
  async function loadOverview() {
    const res = await fetch('/api/overview');
    state.overview = await res.json();
    state.marks = state.overview.marks;
    state.proxyNames = Object.fromEntries(state.overview.proxies.map((p) => [p.id, p.name]));
    renderLegend();
    renderDiagram();
    renderTable();
    renderCerts();
    renderDiagnostics();
    renderProxySelect();
    renderStats();
    drawPath();
    document.body.setAttribute('data-generation', state.overview.proxies.map((p) => p.generation).join(','));
  }

  async function loadLogs() {
    const items = [];
    for (const p of state.overview.proxies) {
      const r = await (await fetch(`/api/logs?proxy=${encodeURIComponent(p.id)}&limit=50`)).json();
      for (const entry of r.entries) items.push({ proxy: p.id, entry });
    }
    items.sort((a, b) => String(a.entry.time).localeCompare(String(b.entry.time)));
    addLogs(items.slice(-MAX_LOG_ROWS), false);
  }

  function connect() {
    const status = $('conn-status');
    const es = new EventSource('/events');
    es.addEventListener('open', () => { status.textContent = 'live'; status.className = 'status live'; });
    es.addEventListener('error', () => { status.textContent = 'disconnected, retrying…'; status.className = 'status down'; });
    es.addEventListener('stats', (ev) => { state.stats = JSON.parse(ev.data); renderStats(); });
    es.addEventListener('log', (ev) => { const d = JSON.parse(ev.data); addLogs(d.entries, true); });
    es.addEventListener('config', () => { void loadOverview(); });
  }

  document.addEventListener('DOMContentLoaded', async () => {
    $('explain-form').addEventListener('submit', runExplain);
    $('ex-clear').addEventListener('click', () => { clearPath(); clear($('explain-result')); });
    $('view-diagram').addEventListener('click', () => setView('diagram'));
    $('view-table').addEventListener('click', () => setView('table'));
    $('map-diagram').addEventListener('keydown', onMapKey);
    try {
      await loadOverview();
      await loadLogs();
      const s = await (await fetch('/api/stats')).json();
      state.stats = s;
      renderStats();
    } catch (e) {
      $('conn-status').textContent = `cannot load: ${e.message}`;
    }
    connect();
    document.body.setAttribute('data-loaded', 'true');
  });
})();

/**
 * The dashboard's routes on the admin server:
 *   GET /                 the page (static HTML, CSS and one script; no CDN, works offline)
 *   GET /api/overview     every proxy of this process: identity, generation, map, certificates,
 *                         diagnostics, apply history
 *   GET /api/stats        counters per listener and route, with rates since the previous sample
 *   GET /api/logs         the last access-log entries (kept in memory by PromTelemetry)
 *   GET /api/explain      ?target=URL | ?sni=&port= [&proxy=id]: explain() over the live snapshot,
 *                         with the map hops it passes through
 *   GET /events           server-sent events: `stats` every second, `log` batches, `config` on change
 *
 * One process may run several proxies (the demo does): every admin server registers here, and
 * each dashboard shows all of them, its own first. Rates and the apply history are computed from
 * the telemetry registry and lastApply() once a second, off the request path.
 */
import type * as http from 'node:http';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AccessLogEntry } from '../../runtime/telemetry.js';
import type { AdminState } from '../server.js';
import { buildMap, certViews, explainLive, parseExplainTarget, TargetError, MARK_TEXT } from './model.js';

export interface ApplyEvent {
  time: string;
  trigger: string;
  ok: boolean;
  generation: number;
  message: string;
  diagnostics: number;
}

interface ProxyEntry {
  id: string;
  name: string;
  state: AdminState;
  server: http.Server;
  applies: ApplyEvent[];
  lastSeen: unknown;
  prev?: { t: number; requests: Map<string, number>; connections: Map<string, number> };
}

export interface ListenerStats {
  connections: number;
  active: number;
  connectionsPerSecond: number;
  handshakes: number;
  handshakeFailures: Record<string, number>;
  refused: Record<string, number>;
  tcp: Record<string, number>;
}

export interface RouteStats {
  listener: string;
  route: string;
  requests: number;
  requestsPerSecond: number;
  byClass: Record<string, number>;
}

export interface ProxyStats {
  time: string;
  generation: number;
  activeConnections: number;
  listeners: Record<string, ListenerStats>;
  routes: RouteStats[];
  upstreamConnectErrors: Record<string, number>;
}

const MAX_APPLIES = 50;
const MAX_SSE_CLIENTS = 32;
const MAX_PENDING_LOGS = 200;
/** A client that cannot keep up is skipped rather than buffered without bound. */
const MAX_SSE_BUFFER = 1 << 20;

const proxies: ProxyEntry[] = [];
let nextId = 1;
let ticker: NodeJS.Timeout | undefined;

interface SseClient {
  res: http.ServerResponse;
  pending: { proxy: string; entry: AccessLogEntry }[];
  dropped: number;
  unsubscribe: (() => void)[];
  generations: Map<string, string>;
}
const sseClients = new Set<SseClient>();

/** Registers an admin server's proxy; it leaves the list when the server closes. */
export function registerProxy(state: AdminState, server: http.Server): void {
  const entry: ProxyEntry = { id: `p${nextId++}`, name: '', state, server, applies: [], lastSeen: undefined };
  proxies.push(entry);
  server.once('listening', () => {
    if (!entry.name) entry.name = `proxy (admin :${(server.address() as { port?: number } | null)?.port ?? '?'})`;
  });
  server.once('close', () => {
    const i = proxies.indexOf(entry);
    if (i >= 0) proxies.splice(i, 1);
    if (proxies.length === 0 && ticker) { clearInterval(ticker); ticker = undefined; }
  });
  if (!ticker) {
    ticker = setInterval(tick, 1000);
    ticker.unref();
  }
  sampleApply(entry);
}

/** Names a proxy on the dashboard (the demo calls this: "ingress gateway", "sidecar default/sleep"). */
export function setProxyLabel(server: http.Server, name: string): void {
  const e = proxies.find((p) => p.server === server);
  if (e) e.name = name;
}

function ordered(self: http.Server): ProxyEntry[] {
  return [...proxies].sort((a, b) => (a.server === self ? -1 : b.server === self ? 1 : 0));
}

function sampleApply(p: ProxyEntry): void {
  const a = p.state.lastApply() as { time?: string; trigger?: string; ok?: boolean; generation?: number; message?: string; diagnostics?: unknown[] } | undefined;
  if (!a || a === p.lastSeen) return;
  p.lastSeen = a;
  p.applies.push({
    time: a.time ?? new Date().toISOString(), trigger: a.trigger ?? '?', ok: a.ok === true, generation: a.generation ?? 0,
    message: a.message ?? '', diagnostics: Array.isArray(a.diagnostics) ? a.diagnostics.length : 0,
  });
  if (p.applies.length > MAX_APPLIES) p.applies.splice(0, p.applies.length - MAX_APPLIES);
}

type Values = { labels: Record<string, string | number>; value: number }[];

async function values(p: ProxyEntry, name: string): Promise<Values> {
  const m = p.state.telemetry.registry.getSingleMetric(`tlsgate_${name}`);
  if (!m) return [];
  const r = await m.get();
  return r.values as Values;
}

/** Reads the counters; `advance` (the ticker) makes this sample the base of the next rates. */
async function computeStats(p: ProxyEntry, advance = true): Promise<ProxyStats> {
  const now = Date.now();
  const listeners: Record<string, ListenerStats> = {};
  const L = (name: string): ListenerStats => (listeners[name] ??= { connections: 0, active: 0, connectionsPerSecond: 0, handshakes: 0, handshakeFailures: {}, refused: {}, tcp: {} });
  for (const l of p.state.dataPlane.snapshot?.listeners ?? []) L(l.name);
  const [conns, active, hs, refused, tcp, reqs, upErr] = await Promise.all([
    values(p, 'downstream_connections_total'), values(p, 'downstream_connections_active'), values(p, 'tls_handshakes_total'),
    values(p, 'downstream_connections_refused_total'), values(p, 'tcp_connections_total'), values(p, 'requests_total'),
    values(p, 'upstream_connect_errors_total'),
  ]);
  const connNow = new Map<string, number>();
  for (const v of conns) {
    const l = String(v.labels['listener'] ?? '');
    L(l).connections += v.value;
    connNow.set(l, (connNow.get(l) ?? 0) + v.value);
  }
  for (const v of active) L(String(v.labels['listener'] ?? '')).active += v.value;
  for (const v of hs) {
    const s = L(String(v.labels['listener'] ?? ''));
    if (v.labels['result'] === 'success') s.handshakes += v.value;
    else if (v.value > 0) { const r = String(v.labels['reason'] ?? 'unknown'); s.handshakeFailures[r] = (s.handshakeFailures[r] ?? 0) + v.value; }
  }
  for (const v of refused) if (v.value > 0) { const s = L(String(v.labels['listener'] ?? '')); const r = String(v.labels['reason'] ?? ''); s.refused[r] = (s.refused[r] ?? 0) + v.value; }
  for (const v of tcp) if (v.value > 0) { const s = L(String(v.labels['listener'] ?? '')); const r = String(v.labels['reason'] ?? ''); s.tcp[r] = (s.tcp[r] ?? 0) + v.value; }
  const reqNow = new Map<string, number>();
  const routes = new Map<string, RouteStats>();
  for (const v of reqs) {
    const listener = String(v.labels['listener'] ?? '');
    const route = String(v.labels['route'] ?? '');
    const key = `${listener}\u0000${route}`;
    let r = routes.get(key);
    if (!r) { r = { listener, route, requests: 0, requestsPerSecond: 0, byClass: {} }; routes.set(key, r); }
    r.requests += v.value;
    const cls = String(v.labels['code_class'] ?? '');
    r.byClass[cls] = (r.byClass[cls] ?? 0) + v.value;
    reqNow.set(key, (reqNow.get(key) ?? 0) + v.value);
  }
  const prev = p.prev;
  if (prev) {
    const dt = Math.max(0.001, (now - prev.t) / 1000);
    for (const [k, r] of routes) r.requestsPerSecond = Math.max(0, Math.round(((r.requests - (prev.requests.get(k) ?? 0)) / dt) * 100) / 100);
    for (const [l, n] of connNow) L(l).connectionsPerSecond = Math.max(0, Math.round(((n - (prev.connections.get(l) ?? 0)) / dt) * 100) / 100);
  }
  if (advance) p.prev = { t: now, requests: reqNow, connections: connNow };
  const upstreamConnectErrors: Record<string, number> = {};
  for (const v of upErr) if (v.value > 0) upstreamConnectErrors[String(v.labels['cluster'] ?? '')] = v.value;
  return {
    time: new Date(now).toISOString(), generation: p.state.dataPlane.snapshot?.generation ?? 0,
    activeConnections: p.state.dataPlane.activeConnections(), listeners, routes: [...routes.values()], upstreamConnectErrors,
  };
}

function sseWrite(c: SseClient, event: string, data: unknown): void {
  if (c.res.destroyed || c.res.writableEnded) return;
  if (c.res.writableLength > MAX_SSE_BUFFER) return;
  c.res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

function tick(): void {
  for (const p of proxies) sampleApply(p);
  if (sseClients.size === 0) return;
  void Promise.all(proxies.map(async (p) => [p.id, await computeStats(p)] as const)).then((all) => {
    const stats = Object.fromEntries(all);
    for (const c of sseClients) {
      sseWrite(c, 'stats', stats);
      if (c.pending.length) {
        sseWrite(c, 'log', { entries: c.pending, dropped: c.dropped });
        c.pending = [];
        c.dropped = 0;
      }
      for (const p of proxies) {
        const g = `${p.state.dataPlane.snapshot?.generation ?? 0}/${p.applies.length}`;
        if (c.generations.get(p.id) !== g) {
          if (c.generations.has(p.id)) sseWrite(c, 'config', { proxy: p.id, generation: p.state.dataPlane.snapshot?.generation ?? 0 });
          c.generations.set(p.id, g);
        }
      }
    }
  }).catch(() => { /* a metrics read failing must not take the admin server down */ });
}

// ------------------------------------------------------------------ static files

const STATIC_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../src/admin/dashboard/static');
const STATIC: Record<string, string> = {
  '/': 'index.html',
  '/index.html': 'index.html',
  '/dashboard.js': 'dashboard.js',
  '/dashboard.css': 'dashboard.css',
};
const TYPES: Record<string, string> = { html: 'text/html; charset=utf-8', js: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8' };
const cache = new Map<string, Buffer>();

function staticFile(name: string): Buffer | undefined {
  let b = cache.get(name);
  if (!b) {
    try { b = readFileSync(path.join(STATIC_DIR, name)); } catch { return undefined; }
    cache.set(name, b);
  }
  return b;
}

const SECURITY_HEADERS = {
  'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-store',
};

function json(res: http.ServerResponse, v: unknown, status = 200): void {
  res.writeHead(status, { 'content-type': 'application/json', ...SECURITY_HEADERS }).end(JSON.stringify(v) + '\n');
}

/** Paths under the working directory as relative ones: shorter, and the same on every machine. */
function relFile(f: string): string {
  const r = path.relative(process.cwd(), f);
  return r && !r.startsWith('..') && !path.isAbsolute(r) ? r : f;
}

function pick(all: ProxyEntry[], id: string | null): ProxyEntry | undefined {
  return id ? all.find((p) => p.id === id) : all[0];
}

function overview(p: ProxyEntry): Record<string, unknown> {
  sampleApply(p);
  const s = p.state;
  const lookup = (n: string) => s.dataPlane.certStore.get(n);
  const snap = s.dataPlane.snapshot;
  return {
    id: p.id, name: p.name, ready: s.dataPlane.ready, draining: s.draining(), sources: s.configSources(),
    generation: snap?.generation ?? 0, boundPorts: s.dataPlane.boundPorts(),
    map: buildMap(snap, lookup), certs: certViews(snap, lookup),
    diagnostics: s.diagnostics().map((d) => ({ code: d.code, severity: d.severity, message: d.message, file: d.location ? relFile(d.location.file) : undefined, line: d.location?.line, column: d.location?.column, resource: d.resource, path: d.path, hint: d.hint })),
    statuses: snap?.statuses ?? [], applies: [...p.applies].reverse(), lastApply: s.lastApply(),
  };
}

/** Handles the dashboard's paths; returns false for anything else (the admin endpoints). */
export async function handleDashboard(self: http.Server, req: http.IncomingMessage, res: http.ServerResponse, url: URL): Promise<boolean> {
  const file = STATIC[url.pathname];
  if (file) {
    const body = staticFile(file);
    if (!body) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`dashboard asset ${file} is missing (looked in ${STATIC_DIR})\n`);
      return true;
    }
    res.writeHead(200, { 'content-type': TYPES[file.split('.').pop()!]!, 'content-length': body.length, ...SECURITY_HEADERS });
    res.end(req.method === 'HEAD' ? undefined : body);
    return true;
  }
  const all = ordered(self);
  switch (url.pathname) {
    case '/api/overview':
      json(res, { time: new Date().toISOString(), marks: MARK_TEXT, proxies: all.map(overview) });
      return true;
    case '/api/stats': {
      const out: Record<string, ProxyStats> = {};
      for (const p of all) out[p.id] = await computeStats(p, false);
      json(res, out);
      return true;
    }
    case '/api/logs': {
      const limit = Math.min(500, Math.max(1, Number(url.searchParams.get('limit') ?? 100) || 100));
      const p = pick(all, url.searchParams.get('proxy'));
      json(res, { proxy: p?.id, entries: p ? p.state.telemetry.recent(limit) : [] });
      return true;
    }
    case '/api/explain': {
      const p = pick(all, url.searchParams.get('proxy'));
      if (!p) { json(res, { error: 'no such proxy' }, 404); return true; }
      const target = url.searchParams.get('target')?.trim() || undefined;
      const sni = url.searchParams.get('sni')?.trim() || undefined;
      const portText = url.searchParams.get('port')?.trim();
      const port = portText ? Number(portText) : undefined;
      if (port !== undefined && (!Number.isInteger(port) || port < 1 || port > 65535)) { json(res, { error: 'port must be 1-65535' }, 400); return true; }
      try {
        const r = explainLive(p.state, parseExplainTarget(target, sni, port));
        if (!r) { json(res, { error: 'nothing is being served yet' }, 503); return true; }
        json(res, { proxy: p.id, ...r });
      } catch (e) {
        if (e instanceof TargetError) json(res, { error: e.message }, 400);
        else throw e;
      }
      return true;
    }
    case '/events':
      openEvents(req, res);
      return true;
    default:
      return false;
  }
}

function openEvents(req: http.IncomingMessage, res: http.ServerResponse): void {
  if (sseClients.size >= MAX_SSE_CLIENTS) {
    res.writeHead(503, { 'content-type': 'text/plain', 'retry-after': '5' }).end('too many dashboard connections\n');
    return;
  }
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive', 'x-content-type-options': 'nosniff' });
  res.write('retry: 2000\n\n');
  const c: SseClient = { res, pending: [], dropped: 0, unsubscribe: [], generations: new Map() };
  for (const p of proxies) {
    c.generations.set(p.id, `${p.state.dataPlane.snapshot?.generation ?? 0}/${p.applies.length}`);
    c.unsubscribe.push(p.state.telemetry.subscribe((entry) => {
      // Runs on the request path: queue only, bounded.
      if (c.pending.length < MAX_PENDING_LOGS) c.pending.push({ proxy: p.id, entry });
      else c.dropped++;
    }));
  }
  sseClients.add(c);
  const close = () => {
    if (!sseClients.delete(c)) return;
    for (const u of c.unsubscribe) u();
  };
  req.socket.setTimeout(0);
  res.on('close', close);
  res.on('error', close);
}

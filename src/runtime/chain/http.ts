/**
 * The HTTP router of one filter chain (Envoy's http_connection_manager + router filter): picks the
 * virtual host and route, answers redirects and direct responses, and proxies the rest to a
 * cluster with rewrites, header mutations, timeouts and retries. It serves the `(req, res)` pair
 * of Node's HTTP/1.1 server and of the HTTP/2 compat API alike.
 *
 * Headers sent upstream, as Envoy sets them at a gateway:
 * - hop-by-hop headers (connection and the names it lists, keep-alive, proxy-connection,
 *   transfer-encoding, upgrade, te except `trailers`) and h2 pseudo-headers are dropped; `:authority`
 *   becomes Host; rewriteAuthority replaces it;
 * - x-forwarded-for gets the downstream address appended; x-forwarded-proto is the listener's
 *   scheme; x-envoy-external-address is the downstream address; client-sent x-envoy-* are dropped;
 * - x-request-id: a client value that looks like an id (<= 128 of [A-Za-z0-9._:-]) is kept so a
 *   trace started by the caller continues; otherwise a UUID is generated. (Envoy at an edge
 *   regenerates by default; keeping a well-formed one is the documented choice here.)
 * - x-forwarded-client-cert: whatever the client sent is removed first; SANITIZE_SET adds ours
 *   when the connection has a client certificate; APPEND_FORWARD keeps the client's value only
 *   over mTLS and appends ours.
 *
 * Every request ends in exactly one access-log entry and one `requests_total` count, whatever
 * happens; nothing here throws into the server.
 */
import { randomUUID, type X509Certificate } from 'node:crypto';
import { isoTime } from '../iso-time.js';
import type { IncomingMessage, OutgoingHttpHeader, ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import type {
  HeaderMutation,
  HttpConnectionManager,
  RetryPolicy,
  Route,
  RouteAction,
  RouteMatch,
  WeightedCluster,
} from '../../model/snapshot.js';
import { getConnectionInfo, type ConnectionInfo } from '../connection-info.js';
import { counterOf, type AccessLogEntry, type Reason, type Telemetry } from '../telemetry.js';
import { UpstreamError, rawHeadersToObject, rawName, rawValue, type ClusterManager, type RawHeaders, type UpstreamControl, type UpstreamHandler } from '../upstream/cluster-manager.js';
import { pickWeighted } from '../upstream/load-balancer.js';
import { hostPort, isMisdirected, matchRoute, normalizeHost, selectVirtualHost, type RouteRequest } from './route-match.js';
import { buildXfcc, subjectAltNames, subjectRfc2253 } from './xfcc.js';

export type DownstreamRequest = IncomingMessage | Http2ServerRequest;
export type DownstreamResponse = ServerResponse | Http2ServerResponse;

export interface HttpHandlerEnv {
  clusters: ClusterManager;
  telemetry: Telemetry;
  /** The port this listener accepts on (route `port` matches, FROM_REQUEST_PORT redirects). */
  listenerPort: number;
  /** Random source for weighted destinations (tests may seed it). */
  random?: () => number;
}

/** Largest request body kept in memory so a retry can resend it (Envoy's buffer limit idea). */
export const RETRY_BUFFER_LIMIT = 64 * 1024;

// ------------------------------------------------------------------ per-config precomputation

interface RouteRuntime {
  weights: number[];
  total: number;
  rewriteRegex: { re: RegExp; sub: string } | undefined;
  retry: ParsedRetry | undefined;
}

interface ParsedRetry {
  attempts: number;
  perTryTimeoutMs: number | undefined;
  on5xx: boolean;
  gatewayError: boolean;
  connectFailure: boolean;
  reset: boolean;
  retriable4xx: boolean;
  refusedStream: boolean;
  codes: Set<number>;
}

const routeRuntimes = new WeakMap<Route, RouteRuntime>();

function routeRuntime(route: Route): RouteRuntime {
  let rt = routeRuntimes.get(route);
  if (rt !== undefined) return rt;
  const a = route.action;
  const weights = a.kind === 'route' ? a.clusters.map((c) => (c.weight > 0 ? c.weight : 0)) : [];
  let total = weights.reduce((x, y) => x + y, 0);
  // A single destination without weight takes everything.
  if (a.kind === 'route' && total === 0 && a.clusters.length === 1) {
    weights[0] = 1;
    total = 1;
  }
  let rewriteRegex: RouteRuntime['rewriteRegex'];
  if (a.kind === 'route' && a.rewriteRegex !== undefined) {
    try {
      // RE2 `\1` groups become JavaScript `$1`; a literal `$` must not be read as a group.
      const sub = a.rewriteRegex.substitution.replace(/\$/g, '$$$$').replace(/\\(\d)/g, '$$$1');
      rewriteRegex = { re: new RegExp(a.rewriteRegex.pattern, 'g'), sub };
    } catch {
      rewriteRegex = undefined;
    }
  }
  rt = { weights, total, rewriteRegex, retry: a.kind === 'route' && a.retry !== undefined ? parseRetry(a.retry) : undefined };
  routeRuntimes.set(route, rt);
  return rt;
}

function parseRetry(p: RetryPolicy): ParsedRetry | undefined {
  if (p.attempts <= 0) return undefined;
  const r: ParsedRetry = {
    attempts: p.attempts, perTryTimeoutMs: p.perTryTimeoutMs && p.perTryTimeoutMs > 0 ? p.perTryTimeoutMs : undefined,
    on5xx: false, gatewayError: false, connectFailure: false, reset: false, retriable4xx: false, refusedStream: false,
    codes: new Set(),
  };
  for (const raw of p.retryOn) {
    for (const cond of raw.split(',')) {
      const c = cond.trim();
      if (c === '5xx') r.on5xx = true;
      else if (c === 'gateway-error') r.gatewayError = true;
      else if (c === 'connect-failure') r.connectFailure = true;
      else if (c === 'reset') r.reset = true;
      else if (c === 'retriable-4xx') r.retriable4xx = true;
      else if (c === 'refused-stream') r.refusedStream = true;
      else if (/^\d{3}$/.test(c)) r.codes.add(Number(c));
      // gRPC conditions (cancelled, unavailable, …) need grpc-status parsing: not supported yet.
    }
  }
  return r;
}

function retriableStatus(r: ParsedRetry, status: number): boolean {
  if (r.codes.has(status)) return true;
  if (r.on5xx && status >= 500) return true;
  if (r.gatewayError && (status === 502 || status === 503 || status === 504)) return true;
  return r.retriable4xx && status === 409;
}

function retriableError(r: ParsedRetry, e: UpstreamError): boolean {
  if (e.reason === 'upstream_overflow' || e.reason === 'internal_error') return false;
  if (e.reason === 'no_healthy_upstream') return false;
  if (r.on5xx || r.gatewayError) return true; // resets, connect failures and per-try timeouts
  if (e.connectFailure) return r.connectFailure || r.reset;
  if (e.code === 'ERR_HTTP2_STREAM_ERROR' || e.code === 'REFUSED_STREAM') return r.refusedStream || r.reset;
  return r.reset;
}

// ------------------------------------------------------------------ header helpers

type HeaderBag = Record<string, string | string[]>;

const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'http2-settings',
  // undici refuses `expect`; Node already answered 100-continue downstream.
  'expect',
  // Set by us, never copied.
  'host', 'x-forwarded-client-cert', 'x-request-id', 'x-envoy-external-address',
]);

const RESPONSE_DROP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'http2-settings']);

const REQUEST_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;

/** Header list (name, value, name, value…; names lower-case) for writeHead. */
type HeaderList = (string | string[])[];

/** A header list as an object; repeated names become arrays. */
function listToObject(h: HeaderList): HeaderBag {
  const o: HeaderBag = Object.create(null) as HeaderBag;
  for (let i = 0; i < h.length; i += 2) {
    const name = h[i] as string;
    const v = h[i + 1]!;
    const cur = o[name];
    if (cur === undefined) o[name] = v;
    else o[name] = ([] as string[]).concat(cur, v);
  }
  return o;
}

/** Whether a header list has a field of this (lower-case) name. */
function hasName(h: HeaderList, name: string): boolean {
  for (let i = 0; i < h.length; i += 2) if (h[i] === name) return true;
  return false;
}

/** The list without the fields of this (lower-case) name. */
function withoutName(h: HeaderList, name: string): HeaderList {
  const out: HeaderList = [];
  for (let i = 0; i < h.length; i += 2) if (h[i] !== name) out.push(h[i]!, h[i + 1]!);
  return out;
}

/** The last value of a field in a header list (as a string). */
function lastValue(h: HeaderList, name: string): string | undefined {
  for (let i = h.length - 2; i >= 0; i -= 2) {
    if (h[i] === name) {
      const v = h[i + 1]!;
      return Array.isArray(v) ? v[v.length - 1] : v;
    }
  }
  return undefined;
}

/** applyMutation for a header list: remove, then set (replaces), then add (appends). */
function applyListMutation(h: HeaderList, m: HeaderMutation | undefined): HeaderList {
  if (m === undefined) return h;
  let out = h;
  const drop = new Set<string>();
  for (const name of m.remove) drop.add(name.toLowerCase());
  for (const [name] of m.set) drop.add(name.toLowerCase());
  if (drop.size > 0) {
    out = [];
    for (let i = 0; i < h.length; i += 2) if (!drop.has(h[i] as string)) out.push(h[i]!, h[i + 1]!);
  }
  for (const [name, value] of m.set) out.push(name.toLowerCase(), value);
  for (const [name, value] of m.add) out.push(name.toLowerCase(), value);
  return out;
}

/** XFCC and log facts per client certificate, computed once per certificate (not per request). */
interface PeerFacts {
  subject: string;
  uriSan: string | undefined;
  xfcc: Map<string, string>;
}
const peerFacts = new WeakMap<X509Certificate, PeerFacts>();

function factsOf(cert: X509Certificate): PeerFacts {
  let f = peerFacts.get(cert);
  if (f === undefined) {
    f = { subject: subjectRfc2253(cert), uriSan: subjectAltNames(cert).uri[0], xfcc: new Map() };
    peerFacts.set(cert, f);
  }
  return f;
}

function xfccFor(cert: X509Certificate, by: string | undefined, includeCert: boolean): string {
  const f = factsOf(cert);
  const key = `${includeCert ? 1 : 0}${by ?? ''}`;
  let v = f.xfcc.get(key);
  if (v === undefined) {
    v = buildXfcc(cert, { ...(by !== undefined ? { by } : {}), includeCert });
    f.xfcc.set(key, v);
  }
  return v;
}

const CODE_CLASSES = ['0xx', '1xx', '2xx', '3xx', '4xx', '5xx'] as const;

function codeClass(status: number): string {
  return status >= 100 && status < 600 ? CODE_CLASSES[Math.floor(status / 100)]! : '0xx';
}

const noop = (): void => undefined;

/** Counts bytes of a request body of unknown length on its way upstream. */
class ByteCounter extends Transform {
  bytes = 0;
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    cb(null, chunk);
  }
}

// ------------------------------------------------------------------ redirect

/** Location for an Istio HTTPRedirect (Envoy RedirectAction). */
export function redirectLocation(
  a: Extract<RouteAction, { kind: 'redirect' }>,
  req: { scheme: string; authority: string; path: string; listenerPort: number },
): string {
  const scheme = a.scheme ?? req.scheme;
  const authority = a.authority ?? req.authority;
  const host = authority.startsWith('[') ? authority.slice(0, authority.indexOf(']') + 1) : (authority.split(':')[0] ?? '');
  let port = hostPort(authority);
  if (a.port !== undefined) port = a.port;
  else if (a.derivePort === 'FROM_PROTOCOL_DEFAULT') port = undefined;
  else if (a.derivePort === 'FROM_REQUEST_PORT') port = hostPort(req.authority) ?? req.listenerPort;
  else if (scheme !== req.scheme && (port === 80 || port === 443)) port = undefined; // scheme switch drops a default port
  // A port that is the scheme's default is left out.
  if ((scheme === 'http' && port === 80) || (scheme === 'https' && port === 443)) port = undefined;
  let path = req.path;
  if (a.path !== undefined) {
    const q = req.path.indexOf('?');
    // A redirect path with its own query replaces the request's; otherwise the query is kept.
    path = a.path.includes('?') || q === -1 ? a.path : a.path + req.path.slice(q);
  }
  return `${scheme}://${host}${port !== undefined ? `:${port}` : ''}${path}`;
}

/** The upstream path after the route's rewrite (query string kept). */
export function rewrittenPath(
  a: Extract<RouteAction, { kind: 'route' }>,
  match: RouteMatch | undefined,
  path: string,
  regex?: { re: RegExp; sub: string },
): string {
  const q = path.indexOf('?');
  let p = q === -1 ? path : path.slice(0, q);
  const query = q === -1 ? '' : path.slice(q);
  if (regex !== undefined) {
    regex.re.lastIndex = 0;
    p = p.replace(regex.re, regex.sub);
  } else if (a.rewritePath !== undefined) {
    p = a.rewritePath;
  } else if (a.rewritePathPrefix !== undefined) {
    const m = match?.path;
    if (m === undefined) p = a.rewritePathPrefix + p.slice(1); // no path condition = prefix "/"
    else if (m.kind === 'prefix') p = a.rewritePathPrefix + p.slice(Math.min(m.value.length, p.length));
    else p = a.rewritePathPrefix; // exact/regex: the whole path was the match
  } else return path;
  if (p === '') p = '/';
  return p + query;
}

/** `http://host:port/p?q` -> authority and origin-form path; undefined when not absolute-form. */
export function splitAbsoluteForm(target: string): { authority: string; path: string; https: boolean } | undefined {
  const https = target.startsWith('https://');
  if (!https && !target.startsWith('http://')) return undefined;
  const start = https ? 8 : 7;
  let end = target.length;
  for (let i = start; i < target.length; i++) {
    const c = target.charCodeAt(i);
    if (c === 47 /* / */ || c === 63 /* ? */) { end = i; break; }
  }
  const rest = target.slice(end);
  return { authority: target.slice(start, end), path: rest === '' ? '/' : rest.charCodeAt(0) === 63 ? `/${rest}` : rest, https };
}

// ------------------------------------------------------------------ the handler

/** The counters one request adds to, kept per listener and route (no label objects per request). */
interface RouteCounters {
  byClass: Map<string, (by?: number) => void>;
  received: (by?: number) => void;
  sent: (by?: number) => void;
}

interface HandlerContext {
  hcm: HttpConnectionManager;
  env: HttpHandlerEnv;
  random: () => number;
  counters: Map<string, Map<Route | undefined, RouteCounters>>;
}

function routeCounters(ctx: HandlerContext, listener: string, route: Route | undefined): RouteCounters {
  let byRoute = ctx.counters.get(listener);
  if (byRoute === undefined) ctx.counters.set(listener, (byRoute = new Map()));
  let c = byRoute.get(route);
  if (c === undefined) {
    const t = ctx.env.telemetry;
    c = {
      byClass: new Map(),
      received: counterOf(t, 'downstream_bytes_total', { listener, direction: 'received' }),
      sent: counterOf(t, 'downstream_bytes_total', { listener, direction: 'sent' }),
    };
    byRoute.set(route, c);
  }
  return c;
}

/**
 * A request handler for `http.createServer` / `http2.createSecureServer({allowHTTP1: true})`.
 * @example http.createServer(createHttpHandler(hcm, { clusters, telemetry, listenerPort: 8080 }))
 */
export function createHttpHandler(hcm: HttpConnectionManager, env: HttpHandlerEnv): (req: DownstreamRequest, res: DownstreamResponse) => void {
  const ctx: HandlerContext = { hcm, env, random: env.random ?? Math.random, counters: new Map() };
  return (req, res) => {
    const ex = new HttpExchange(ctx, req, res);
    try {
      ex.run();
    } catch (err) {
      ex.internalError(err);
    }
  };
}

class HttpExchange implements UpstreamHandler {
  readonly #ctx: HandlerContext;
  readonly #req: DownstreamRequest;
  readonly #res: DownstreamResponse;
  readonly #startMs = Date.now();
  readonly #startHr = performance.now();
  readonly #info: ConnectionInfo | undefined;
  readonly #isH2: boolean;
  #authority = '';
  /** Request target in origin form (path and query). */
  #path = '/';
  #route: Route | undefined;
  #match: RouteMatch | undefined;
  #dest: WeightedCluster | undefined;
  #requestId = '';
  #reason: Reason = 'ok';
  #status = 0;
  #bytesReceived = 0;
  #bytesSent = 0;
  #endpoint: string | undefined;
  #upstreamCode: string | undefined;
  #attempts = 0;
  #logged = false;
  #responded = false;
  // proxying state
  #upHeaders: HeaderList | undefined;
  #upPath = '';
  #body: Readable | Buffer | null = null;
  #counter: ByteCounter | undefined;
  #retry: ParsedRetry | undefined;
  #ctl: UpstreamControl | undefined;
  #discarding = false;
  #routeTimer: NodeJS.Timeout | undefined;
  #tryTimer: NodeJS.Timeout | undefined;
  #waitingDrain = false;
  /** The upstream response's content-length (-1 when not given). */
  #upContentLength = -1;
  /** A complete body held back to go out with end(). */
  #lastChunk: Buffer | undefined;

  constructor(ctx: HandlerContext, req: DownstreamRequest, res: DownstreamResponse) {
    this.#ctx = ctx;
    this.#req = req;
    this.#res = res;
    this.#info = getConnectionInfo(req.socket);
    this.#isH2 = req.httpVersionMajor === 2;
    req.on('error', noop);
    res.on('error', noop);
    res.on('close', this.#onResClose);
  }

  run(): void {
    const { hcm, env } = this.#ctx;
    const req = this.#req;
    const h = req.headers;
    let authority = (this.#isH2 ? (h[':authority'] as string | undefined) ?? h.host : h.host) ?? '';
    let path = req.url ?? '/';
    let routePort = env.listenerPort;
    if (hcm.forwardProxy === true) {
      if (this.#isH2) {
        // HTTP/2 has no absolute form: :scheme and :authority name the destination and its port.
        routePort = hostPort(authority) ?? (h[':scheme'] === 'https' ? 443 : 80);
      } else if (path.charCodeAt(0) !== 47 /* / */) {
        // Sidecar outbound proxy: absolute-form target; its authority names the destination port.
        const abs = splitAbsoluteForm(path);
        if (abs !== undefined) {
          authority = abs.authority;
          path = abs.path;
          routePort = hostPort(authority) ?? (abs.https ? 443 : 80);
        }
      }
    }
    this.#authority = authority;
    this.#path = path;
    const rid = h['x-request-id'];
    this.#requestId = typeof rid === 'string' && REQUEST_ID_RE.test(rid) ? rid : randomUUID();
    if (authority === '') {
      this.#local(400, 'bad_request', 'missing Host header\n');
      return;
    }
    const vhost = selectVirtualHost(hcm.routeConfig, authority);
    if (vhost === undefined) {
      if (isMisdirected(hcm, authority)) this.#local(421, 'misdirected_request', 'misdirected request\n');
      else this.#local(404, 'no_route', 'no route\n');
      return;
    }
    if (vhost.requireTls && hcm.scheme !== 'https') {
      const host = hostPort(authority) === 80 ? normalizeHost(authority) : authority;
      this.#redirect(301, `https://${host}${path}`, 'https_redirect', undefined);
      return;
    }
    const rreq: RouteRequest = { path, method: req.method ?? 'GET', authority, scheme: hcm.scheme, headers: h, port: routePort };
    const sel = matchRoute(vhost, rreq);
    if (sel === undefined) {
      this.#local(404, 'no_route', 'no route\n');
      return;
    }
    this.#route = sel.route;
    this.#match = sel.match;
    const a = sel.route.action;
    switch (a.kind) {
      case 'redirect':
        this.#redirect(a.code, redirectLocation(a, { scheme: hcm.scheme, authority, path, listenerPort: env.listenerPort }), 'redirect', sel.route.responseHeaders);
        return;
      case 'direct': {
        const body = a.bodyBase64 !== undefined ? Buffer.from(a.bodyBase64, 'base64') : a.body !== undefined ? Buffer.from(a.body) : undefined;
        const headers: HeaderList = body !== undefined ? ['content-type', 'text/plain'] : [];
        this.#respond(a.status, 'direct_response', applyListMutation(headers, sel.route.responseHeaders), body);
        return;
      }
      case 'route':
        this.#proxy(a, sel.route);
        return;
    }
  }

  // ---------------------------------------------------------------- local replies

  #redirect(code: number, location: string, reason: Reason, mutation: HeaderMutation | undefined): void {
    this.#respond(code, reason, applyListMutation(['location', location], mutation), undefined);
  }

  /** A reply generated here (no upstream): short text body. */
  #local(status: number, reason: Reason, text: string): void {
    this.#respond(status, reason, ['content-type', 'text/plain'], Buffer.from(text));
  }

  #respond(status: number, reason: Reason, headers: HeaderList, body: Buffer | undefined): void {
    this.#reason = reason;
    this.#status = status;
    const res = this.#res;
    if (this.#responded || res.headersSent || res.destroyed) {
      // Too late for a status: the downstream sees a reset instead.
      this.#destroyDownstream();
      this.#finish();
      return;
    }
    this.#responded = true;
    // Our length, whatever a configured mutation said.
    const out = hasName(headers, 'content-length') ? withoutName(headers, 'content-length') : headers;
    out.push('content-length', String(body?.length ?? 0));
    try {
      if (this.#isH2) (res as Http2ServerResponse).writeHead(status, listToObject(out));
      else (res as ServerResponse).writeHead(status, out as OutgoingHttpHeader[]);
      if (body !== undefined && this.#req.method !== 'HEAD') {
        this.#bytesSent += body.length;
        res.end(body);
      } else res.end();
    } catch (err) {
      this.#log('warn', 'cannot write local reply', err);
      this.#destroyDownstream();
    }
    this.#finish();
  }

  internalError(err: unknown): void {
    this.#log('error', 'http handler failed', err);
    this.#abortUpstream();
    if (!this.#logged) this.#local(500, 'internal_error', 'internal error\n');
  }

  // ---------------------------------------------------------------- proxying

  #proxy(a: Extract<RouteAction, { kind: 'route' }>, route: Route): void {
    const { hcm } = this.#ctx;
    const rt = routeRuntime(route);
    const idx = pickWeighted(rt.weights, rt.total, this.#ctx.random());
    const dest = idx === -1 ? undefined : a.clusters[idx];
    if (dest === undefined) {
      this.#local(503, 'no_healthy_upstream', 'no healthy upstream\n');
      return;
    }
    if (this.#ctx.env.clusters.get(dest.cluster)?.invalidBackend !== undefined) {
      this.#dest = dest;
      this.#local(500, 'invalid_backend', 'invalid backend\n');
      return;
    }
    this.#dest = dest;
    const req = this.#req;
    const path = this.#path;
    this.#upPath = rewrittenPath(a, this.#match, path, rt.rewriteRegex);

    // Upstream headers, copied once.
    // The list form (name, value, …) that undici takes as is: no object of its own to build and
    // enumerate. Values come from req.headers, so repeated fields are combined as Node does.
    const src = req.headers;
    let out: HeaderList = [];
    const conn = src.connection;
    const listed = typeof conn === 'string' && conn !== '' && conn !== 'keep-alive'
      ? conn.toLowerCase().split(',').map((s) => s.trim()) : undefined;
    // HTTP/2 header objects have no prototype (dictionary mode), where enumerating keys costs more
    // than walking the raw list (lower-case names in HTTP/2) and looking each name up.
    const names: readonly string[] = this.#isH2 ? req.rawHeaders : Object.keys(src);
    const step = this.#isH2 ? 2 : 1;
    for (let i = 0; i < names.length; i += step) {
      const name = names[i]!;
      const v = src[name];
      if (v === undefined) continue;
      if (name.charCodeAt(0) === 58 /* : */ || HOP_BY_HOP.has(name)) {
        if (name === 'te' && typeof v === 'string' && v.toLowerCase().includes('trailers') && !hasName(out, 'te')) out.push('te', 'trailers');
        continue;
      }
      // x-envoy-* is never trusted from a client; x-forwarded-for/-proto are set below.
      if (name.charCodeAt(0) === 120 /* x */ && (name.startsWith('x-envoy-') || name === 'x-forwarded-for' || name === 'x-forwarded-proto')) continue;
      if (listed !== undefined && listed.includes(name)) continue;
      // A name repeated in the raw list (HTTP/2) is already in, with its combined value.
      if (step === 2 && hasName(out, name)) continue;
      out.push(name, v);
    }
    const remote = this.#downstreamAddress();
    const xff = src['x-forwarded-for'];
    out.push(
      'host', a.rewriteAuthority ?? this.#authority,
      'x-forwarded-for', xff === undefined || xff === '' ? remote : `${Array.isArray(xff) ? xff.join(', ') : xff}, ${remote}`,
      'x-forwarded-proto', hcm.scheme,
      'x-envoy-external-address', remote,
      'x-request-id', this.#requestId,
    );
    if (this.#upPath !== path) out.push('x-envoy-original-path', path);
    this.#setXfcc(out, src['x-forwarded-client-cert']);
    out = applyListMutation(out, dest.requestHeaders);
    out = applyListMutation(out, route.requestHeaders);
    this.#upHeaders = out;

    // Timeouts cover every attempt (Envoy's route timeout).
    if (a.timeoutMs !== undefined && a.timeoutMs > 0) {
      this.#routeTimer = setTimeout(() => this.#onRouteTimeout(), a.timeoutMs);
      this.#routeTimer.unref();
    }

    // Body: none, buffered (so a retry can resend it) or streamed with backpressure.
    const retry = rt.retry;
    const cl = src['content-length'];
    const declared = cl === undefined ? -1 : Number(cl);
    const noBody = this.#isH2
      ? (req as Http2ServerRequest).stream.endAfterHeaders
      : declared === 0 || (declared === -1 && src['transfer-encoding'] === undefined);
    if (noBody) {
      this.#retry = retry;
      this.#attempt();
    } else if (retry !== undefined && declared >= 0 && declared <= RETRY_BUFFER_LIMIT) {
      this.#retry = retry;
      this.#bufferBody(declared);
    } else {
      // Streamed bodies cannot be replayed: no retries for this request.
      if (declared >= 0) {
        this.#bytesReceived = declared;
        this.#body = req;
      } else {
        this.#counter = new ByteCounter();
        req.pipe(this.#counter);
        this.#body = this.#counter;
      }
      this.#attempt();
    }
  }

  #setXfcc(out: HeaderList, clientValue: string | string[] | undefined): void {
    const mode = this.#ctx.hcm.forwardClientCertDetails;
    if (mode === 'SANITIZE') return;
    const cert = this.#info?.peerCertificate;
    if (cert === undefined) return; // never trust XFCC on a connection without a client certificate
    const by = this.#ctx.hcm.xfccBy ?? this.#info?.localIdentity;
    if (mode === 'SANITIZE_SET') {
      out.push('x-forwarded-client-cert', xfccFor(cert, by, true));
    } else {
      const ours = xfccFor(cert, by, false);
      const prev = Array.isArray(clientValue) ? clientValue.join(',') : clientValue;
      out.push('x-forwarded-client-cert', prev === undefined || prev === '' ? ours : `${prev},${ours}`);
    }
  }

  #bufferBody(declared: number): void {
    const req = this.#req;
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > RETRY_BUFFER_LIMIT || size > declared) {
        // Lying Content-Length or oversized body: refuse rather than buffer without bound.
        req.destroy();
        this.#local(400, 'bad_request', 'request body larger than declared\n');
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (this.#logged) return;
      this.#bytesReceived = size;
      this.#body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size);
      this.#attempt();
    });
  }

  #attempt(): void {
    if (this.#logged) return;
    this.#attempts++;
    this.#discarding = false;
    const dest = this.#dest!;
    if (this.#retry?.perTryTimeoutMs !== undefined) {
      clearTimeout(this.#tryTimer);
      this.#tryTimer = setTimeout(() => this.#onTryTimeout(), this.#retry.perTryTimeoutMs);
      this.#tryTimer.unref();
    }
    this.#ctl = this.#ctx.env.clusters.dispatch(dest.cluster, {
      method: this.#req.method ?? 'GET',
      path: this.#upPath,
      headers: this.#upHeaders!,
      body: this.#body,
      host: lastValue(this.#upHeaders!, 'host') ?? this.#authority,
      downstreamProtocol: this.#isH2 ? 'h2' : 'http1',
    }, this);
  }

  #canRetry(): boolean {
    const r = this.#retry;
    return r !== undefined && !this.#responded && !this.#logged && this.#attempts <= r.attempts &&
      (this.#body === null || Buffer.isBuffer(this.#body));
  }

  #scheduleRetry(): void {
    clearTimeout(this.#tryTimer);
    // Jittered exponential backoff from 25 ms (Envoy's default base), capped at 250 ms.
    const base = Math.min(250, 25 * 2 ** (this.#attempts - 1));
    const t = setTimeout(() => this.#attempt(), Math.floor(this.#ctx.random() * base) + 1);
    t.unref();
  }

  // UpstreamHandler -------------------------------------------------

  onHeaders(ctl: UpstreamControl, statusCode: number, rawHeaders: RawHeaders): void {
    if (this.#logged || ctl !== this.#ctl) {
      ctl.abort();
      return;
    }
    this.#endpoint = ctl.endpoint;
    if (this.#retry !== undefined && retriableStatus(this.#retry, statusCode) && this.#canRetry()) {
      // Read and drop this response, then try again.
      this.#discarding = true;
      this.#status = statusCode;
      return;
    }
    clearTimeout(this.#tryTimer);
    // Copied once, straight from undici's raw list into the list form writeHead takes; repeated
    // fields (set-cookie) stay separate lines.
    let out: HeaderList = [];
    for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
      const name = rawName(rawHeaders[i]!);
      if (RESPONSE_DROP.has(name)) continue;
      const value = rawValue(rawHeaders[i + 1]!);
      if (name === 'content-length' && typeof value === 'string') this.#upContentLength = Number(value);
      out.push(name, value);
    }
    out = applyListMutation(out, this.#dest?.responseHeaders);
    out = applyListMutation(out, this.#route?.responseHeaders);
    this.#status = statusCode;
    this.#responded = true;
    try {
      // HTTP/1.1 takes the list as is. The HTTP/2 compat API takes a list too, but then first
      // removes every listed name from its (empty) header map: an object is its fast path.
      if (this.#isH2) (this.#res as Http2ServerResponse).writeHead(statusCode, listToObject(out));
      else (this.#res as ServerResponse).writeHead(statusCode, out as OutgoingHttpHeader[]);
    } catch (err) {
      this.#log('warn', 'upstream response headers rejected', err);
      this.#reason = 'upstream_reset';
      ctl.abort();
      this.#destroyDownstream();
      this.#finish();
    }
  }

  onData(ctl: UpstreamControl, chunk: Buffer): void {
    if (this.#discarding || this.#logged) return;
    if (this.#bytesSent === 0 && chunk.length === this.#upContentLength) {
      // The whole declared body in one chunk: the end follows in the same parser pass, and
      // end(body) is one downstream write call instead of write(body) and end().
      this.#bytesSent = chunk.length;
      this.#lastChunk = chunk;
      return;
    }
    this.#bytesSent += chunk.length;
    // Both response kinds take (chunk) and return false when the peer is slow.
    if (!(this.#res as ServerResponse).write(chunk) && !this.#waitingDrain) {
      this.#waitingDrain = true;
      ctl.pause();
      this.#res.once('drain', () => this.#onDrain());
    }
  }

  onEnd(ctl: UpstreamControl, rawTrailers: RawHeaders): void {
    if (this.#logged || ctl !== this.#ctl) return;
    if (this.#discarding) {
      this.#scheduleRetry();
      return;
    }
    if (this.#isH2 && rawTrailers.length > 0) {
      (this.#res as Http2ServerResponse).addTrailers(rawHeadersToObject(rawTrailers) as Record<string, string>);
    }
    const last = this.#lastChunk;
    if (last !== undefined) {
      this.#lastChunk = undefined;
      (this.#res as ServerResponse).end(last);
    } else this.#res.end();
    this.#reason = 'ok';
    this.#finish();
  }

  onError(ctl: UpstreamControl, err: UpstreamError): void {
    if (this.#logged || ctl !== this.#ctl) return;
    this.#upstreamFailed(ctl.endpoint ?? err.endpoint, err);
  }

  /** One attempt failed (error or per-try timeout): retry, answer with a status, or reset. */
  #upstreamFailed(endpoint: string | undefined, err: UpstreamError): void {
    this.#endpoint = endpoint;
    this.#upstreamCode = err.code;
    if (err.connectFailure) this.#ctx.env.telemetry.count('upstream_connect_errors_total', { cluster: err.cluster });
    // `discarding`: a retriable status was being dropped when the attempt broke off; retry anyway.
    if (this.#discarding || (this.#retry !== undefined && retriableError(this.#retry, err) && this.#canRetry())) {
      this.#scheduleRetry();
      return;
    }
    if (err.reason === 'upstream_tls_failed') {
      this.#log('warn', 'upstream TLS failed', err, { cluster: err.cluster, endpoint, code: err.code });
    }
    if (this.#responded) {
      this.#reason = err.reason;
      this.#destroyDownstream();
      this.#finish();
      return;
    }
    this.#local(err.status, err.reason, `${err.reason.replace(/_/g, ' ')}\n`);
  }

  // ---------------------------------------------------------------- events (closures made only when needed)

  #onDrain(): void {
    this.#waitingDrain = false;
    this.#ctl?.resume();
  }

  #onRouteTimeout(): void {
    if (this.#logged) return;
    this.#abortUpstream(new UpstreamError('upstream_timeout', 'route timeout', { cluster: this.#dest?.cluster ?? '', code: 'ROUTE_TIMEOUT' }));
    if (this.#responded) {
      this.#reason = 'upstream_timeout';
      this.#destroyDownstream();
      this.#finish();
    } else this.#local(504, 'upstream_timeout', 'upstream request timeout\n');
  }

  #onTryTimeout(): void {
    if (this.#logged || this.#responded) return;
    const err = new UpstreamError('upstream_timeout', 'per-try timeout', { cluster: this.#dest?.cluster ?? '', code: 'PER_TRY_TIMEOUT' });
    const ctl = this.#ctl;
    // Detached first, so the aborted attempt's own error is ignored when it arrives.
    this.#abortUpstream(err);
    this.#discarding = false;
    this.#upstreamFailed(ctl?.endpoint, err);
  }

  #onResClose = (): void => {
    if (this.#logged) return;
    // The downstream went away before we finished: cancel the upstream side.
    this.#abortUpstream();
    this.#reason = 'downstream_reset';
    this.#finish();
  };

  // ---------------------------------------------------------------- helpers

  #abortUpstream(err?: Error): void {
    const ctl = this.#ctl;
    this.#ctl = undefined;
    ctl?.abort(err);
  }

  #destroyDownstream(): void {
    const res = this.#res;
    try {
      if (this.#isH2) (res as Http2ServerResponse).stream?.close(2 /* INTERNAL_ERROR */);
      else (res as ServerResponse).destroy();
    } catch {
      // already gone
    }
  }

  #downstreamAddress(): string {
    return this.#info?.downstreamRemoteAddress ?? this.#req.socket?.remoteAddress ?? '';
  }

  #log(level: 'warn' | 'error', msg: string, err: unknown, extra?: Record<string, unknown>): void {
    this.#ctx.env.telemetry.log(level, msg, {
      requestId: this.#requestId,
      error: err instanceof Error ? err.message : String(err),
      ...extra,
    });
  }

  /** Writes the one access-log entry and the request counter. Idempotent. */
  #finish(): void {
    if (this.#logged) return;
    this.#logged = true;
    clearTimeout(this.#routeTimer);
    clearTimeout(this.#tryTimer);
    const info = this.#info;
    const env = this.#ctx.env;
    const peer = info?.peerCertificate;
    const facts = peer !== undefined ? factsOf(peer) : undefined;
    const req = this.#req;
    if (this.#counter !== undefined) this.#bytesReceived = this.#counter.bytes;
    const telemetry = env.telemetry;
    const listener = info?.listener ?? String(env.listenerPort);
    try {
      const counters = routeCounters(this.#ctx, listener, this.#route);
      const cls = codeClass(this.#status);
      let byClass = counters.byClass.get(cls);
      if (byClass === undefined) {
        byClass = counterOf(telemetry, 'requests_total', { listener, route: this.#route?.name ?? '', code_class: cls });
        counters.byClass.set(cls, byClass);
      }
      byClass(1);
      if (this.#bytesReceived > 0) counters.received(this.#bytesReceived);
      if (this.#bytesSent > 0) counters.sent(this.#bytesSent);
    } catch {
      // Telemetry must never break a request.
    }
    if (telemetry.accessLogEnabled === false) return;
    const entry: AccessLogEntry = {
      time: isoTime(this.#startMs),
      downstreamAddress: this.#downstreamAddress(),
      sni: info?.sni,
      tlsVersion: info?.tlsVersion,
      alpn: info?.alpn,
      peerSubject: facts?.subject,
      peerUriSan: facts?.uriSan,
      method: req.method,
      authority: this.#authority,
      path: this.#path,
      protocol: this.#isH2 ? 'HTTP/2' : `HTTP/${req.httpVersion}`,
      status: this.#status,
      bytesReceived: this.#bytesReceived,
      bytesSent: this.#bytesSent,
      durationMs: Math.round((performance.now() - this.#startHr) * 1000) / 1000,
      listener,
      chain: info?.chain,
      route: this.#route?.name,
      upstreamCluster: this.#dest?.cluster,
      upstreamEndpoint: this.#endpoint,
      upstreamAttempts: this.#attempts,
      upstreamErrorCode: this.#upstreamCode,
      reason: this.#reason,
      requestId: this.#requestId,
    };
    try {
      telemetry.accessLog(entry);
    } catch {
      // Telemetry must never break a request.
    }
  }
}

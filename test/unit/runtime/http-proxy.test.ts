// The HTTP router end to end with real sockets: a Node server running createHttpHandler in front
// of real Node upstreams (plain echo, slow, flaky, TLS), driven by undici and curl.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { rm } from 'node:fs/promises';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import { request } from 'undici';
import type { Cluster, HttpConnectionManager, Route, RouteAction, RouteMatch, UpstreamTlsContext } from '../../../src/model/snapshot.js';
import { createHttpHandler, redirectLocation, splitAbsoluteForm } from '../../../src/runtime/chain/http.js';
import { setConnectionInfo } from '../../../src/runtime/connection-info.js';
import type { AccessLogEntry, Telemetry } from '../../../src/runtime/telemetry.js';
import { ClusterManager, type SecretMaterial } from '../../../src/runtime/upstream/cluster-manager.js';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../../helpers/certs.js';
import { curl } from '../../helpers/exec.js';

const origin = { resource: { kind: 'VirtualService', namespace: 'default', name: 'echo' }, path: 'spec.http' };

interface Echo {
  method: string;
  url: string;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  upstream: string;
  sni?: string;
}

/** A test upstream that records connections and answers JSON of what it received. */
class Upstream {
  server: net.Server;
  port = 0;
  connections = 0;
  requests = 0;
  hits = new Map<string, number>();
  #held: http.ServerResponse[] = [];
  #streams: http.ServerResponse[] = [];

  constructor(readonly name: string, tlsOpts?: https.ServerOptions) {
    const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => this.#handle(req, res);
    this.server = tlsOpts !== undefined ? https.createServer(tlsOpts, handler) : http.createServer(handler);
    this.server.on(tlsOpts !== undefined ? 'secureConnection' : 'connection', () => { this.connections++; });
  }

  async start(): Promise<this> {
    this.server.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    this.port = (this.server.address() as AddressInfo).port;
    return this;
  }

  #handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests++;
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname.includes('/slow')) {
      this.#held.push(res); // never answered; the proxy's route timeout must fire
      return;
    }
    if (url.pathname === '/cookies') {
      // Repeated fields and names in mixed case, as many servers send them.
      res.writeHead(200, ['Set-Cookie', 'a=1', 'Set-Cookie', 'b=2', 'X-Mixed-Case', 'yes', 'Content-Length', '2']);
      res.end('ok');
      return;
    }
    if (url.pathname === '/stream') {
      // First chunk now, the rest only after the client has seen the first: never held back.
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('first;');
      this.#streams.push(res);
      return;
    }
    const key = url.pathname;
    const hit = (this.hits.get(key) ?? 0) + 1;
    this.hits.set(key, hit);
    const fail = Number(url.searchParams.get('fail') ?? 0);
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (hit <= fail) {
        res.writeHead(503, { 'content-type': 'text/plain' });
        res.end(`fail ${hit}`);
        return;
      }
      const echo: Echo = {
        method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString(),
        upstream: this.name, sni: (req.socket as TLSSocket & { servername?: string | false }).servername || undefined,
      };
      res.writeHead(200, { 'content-type': 'application/json', 'x-upstream-secret': 'hidden', connection: 'keep-alive' });
      res.end(JSON.stringify(echo));
    });
  }

  /** Ends the responses held by /stream. */
  finishStreams(): void {
    for (const r of this.#streams.splice(0)) r.end('rest');
  }

  async close(): Promise<void> {
    for (const r of [...this.#held, ...this.#streams]) r.destroy();
    const s = this.server as http.Server;
    s.closeAllConnections();
    await new Promise<void>((r) => s.close(() => r()));
  }
}

class RecordingTelemetry implements Telemetry {
  entries: AccessLogEntry[] = [];
  counts: { name: string; labels: Record<string, string> | undefined }[] = [];
  logs: { level: string; msg: string; fields: Record<string, unknown> | undefined }[] = [];
  accessLog(e: AccessLogEntry): void { this.entries.push(e); }
  count(name: string, labels?: Record<string, string>): void { this.counts.push({ name, labels }); }
  observe(): void {}
  gauge(): void {}
  log(level: string, msg: string, fields?: Record<string, unknown>): void { this.logs.push({ level, msg, fields }); }
  byRequestId(id: string): AccessLogEntry[] { return this.entries.filter((e) => e.requestId === id); }
}

function r(name: string, matches: Partial<RouteMatch>[], action: RouteAction, extra: Partial<Route> = {}): Route {
  return { name, matches: matches.map((m) => ({ headers: [], queryParams: [], ...m })), action, origin, ...extra };
}

function to(cluster: string, extra: Partial<Extract<RouteAction, { kind: 'route' }>> = {}): RouteAction {
  return { kind: 'route', clusters: [{ cluster, weight: 100 }], ...extra };
}

function staticCluster(name: string, port: number, tls?: UpstreamTlsContext): Cluster {
  return {
    name, serviceHost: `${name}.svc`, servicePort: port, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2000, httpProtocol: 'http1', limits: {},
    ...(tls !== undefined ? { tls } : {}),
  };
}

async function closedPort(): Promise<number> {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((res) => s.close(() => res()));
  return port;
}

describe('HTTP proxy (createHttpHandler)', () => {
  let dir: string;
  let ca: Ca;
  let otherCa: Ca;
  let upCert: KeyPair;
  let clientCert: KeyPair;
  let a: Upstream;
  let b: Upstream;
  let secure: Upstream;
  let telemetry: RecordingTelemetry;
  let clusters: ClusterManager;
  let server: http.Server;
  let h2server: http2.Http2Server;
  let port: number;
  let h2port: number;
  let base: string;
  let hcm: HttpConnectionManager;

  before(async () => {
    dir = await certDir('tlsgate-http-');
    ca = await makeCa(dir, 'ca', '/O=up/CN=up-ca');
    otherCa = await makeCa(dir, 'other', '/O=other/CN=other-ca');
    upCert = await makeLeaf(dir, ca, 'up', { cn: 'secure.up.test', sans: ['DNS:secure.up.test'], serial: 3 });
    clientCert = await makeLeaf(dir, ca, 'client', { cn: 'client.example.com', o: 'client organization', sans: ['URI:spiffe://cluster.local/ns/foo/sa/sleep'], serial: 4 });
    a = await new Upstream('a').start();
    b = await new Upstream('b').start();
    secure = await new Upstream('secure', { cert: upCert.certPem, key: upCert.keyPem }).start();
    const closed = await closedPort();

    const upTls = (validationCa: string): UpstreamTlsContext => ({
      mode: 'SIMPLE', sni: 'secure.up.test', autoSni: false, validationCa, subjectAltNames: [], autoSanValidation: true,
      insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3',
    });
    const secrets: Record<string, SecretMaterial> = { 'up-ca': { caPem: ca.certPem }, 'other-ca': { caPem: otherCa.certPem } };
    clusters = new ClusterManager({
      a: staticCluster('a', a.port),
      b: staticCluster('b', b.port),
      closed: staticCluster('closed', closed),
      'tls-good': staticCluster('tls-good', secure.port, upTls('up-ca')),
      'tls-bad': staticCluster('tls-bad', secure.port, upTls('other-ca')),
    }, { secrets: (n) => secrets[n] });

    hcm = {
      kind: 'http',
      scheme: 'http',
      misdirectedDomains: ['other.test'],
      forwardClientCertDetails: 'SANITIZE_SET',
      xfccBy: 'spiffe://cluster.local/ns/istio-system/sa/gateway',
      http2: true,
      routeConfig: {
        name: 'http.test',
        virtualHosts: [
          { name: 'secure', domains: ['secure.test'], routes: [], requireTls: true },
          {
            name: 'echo', domains: ['echo.test', '*.echo.test'], requireTls: false, routes: [
              r('by-header', [{ headers: [{ name: 'x-route', matcher: { kind: 'exact', value: 'b' }, invert: false }] }], to('b')),
              r('by-query', [{ queryParams: [{ name: 'v', matcher: { kind: 'exact', value: '2' } }] }], to('b')),
              r('first', [{ path: { kind: 'prefix', value: '/order' } }], to('a')),
              r('second', [{ path: { kind: 'prefix', value: '/order/deep' } }], to('b')),
              r('weights', [{ path: { kind: 'prefix', value: '/weights' } }], { kind: 'route', clusters: [{ cluster: 'a', weight: 75 }, { cluster: 'b', weight: 25 }] }),
              r('rewrite-prefix', [{ path: { kind: 'prefix', value: '/old/' } }], to('a', { rewritePathPrefix: '/new/', rewriteAuthority: 'rewritten.test' })),
              r('rewrite-regex', [{ path: { kind: 'regex', value: '/re/[0-9]+/x' } }], to('a', { rewriteRegex: { pattern: '^/re/([0-9]+)/x$', substitution: '/id/\\1' } })),
              r('redirect', [{ path: { kind: 'exact', value: '/go' } }], { kind: 'redirect', scheme: 'https', authority: 'new.test', port: 8443, path: '/landing', code: 302 }),
              r('redirect-301', [{ path: { kind: 'exact', value: '/go301' } }], { kind: 'redirect', path: '/there', code: 301 }),
              r('direct', [{ path: { kind: 'exact', value: '/direct' } }], { kind: 'direct', status: 418, body: 'teapot' }),
              r('headers', [{ path: { kind: 'prefix', value: '/headers' } }], {
                kind: 'route', clusters: [{ cluster: 'a', weight: 1, requestHeaders: { set: [], add: [['x-dest', 'd']], remove: [] } }],
              }, {
                requestHeaders: { set: [['x-set', 's']], add: [['x-add', 'two']], remove: ['x-remove'] },
                responseHeaders: { set: [['x-resp', 'r']], add: [], remove: ['x-upstream-secret'] },
              }),
              r('slow', [{ path: { kind: 'prefix', value: '/slow' } }], to('a', { timeoutMs: 300 })),
              r('retry', [{ path: { kind: 'prefix', value: '/flaky' } }], to('a', { retry: { attempts: 3, retryOn: ['503'] } })),
              r('no-retry', [{ path: { kind: 'prefix', value: '/noretry' } }], to('a')),
              r('closed', [{ path: { kind: 'prefix', value: '/closed' } }], to('closed')),
              r('tls-good', [{ path: { kind: 'prefix', value: '/tls-good' } }], to('tls-good')),
              r('tls-bad', [{ path: { kind: 'prefix', value: '/tls-bad' } }], to('tls-bad')),
              r('all', [], to('a')),
            ],
          },
        ],
      },
    };
    telemetry = new RecordingTelemetry();
    const env = { clusters, telemetry, listenerPort: 0 };
    server = http.createServer(createHttpHandler(hcm, env));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    port = (server.address() as AddressInfo).port;
    base = `http://127.0.0.1:${port}`;
    h2server = http2.createServer({}, createHttpHandler(hcm, env));
    h2server.listen(0, '127.0.0.1');
    await once(h2server, 'listening');
    h2port = (h2server.address() as AddressInfo).port;
  });

  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((res) => server.close(() => res()));
    await new Promise<void>((res) => h2server.close(() => res()));
    await clusters.close();
    await Promise.all([a.close(), b.close(), secure.close()]);
    await rm(dir, { recursive: true, force: true });
  });

  async function get(path: string, headers: Record<string, string> = {}, opts: { method?: string; body?: string } = {}) {
    const res = await request(`${base}${path}`, {
      method: (opts.method ?? 'GET') as 'GET',
      headers: { host: 'echo.test', ...headers },
      ...(opts.body !== undefined ? { body: opts.body } : {}),
    });
    const text = await res.body.text();
    return { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) as Echo };
  }

  it('routes by header, query and path in first-match order', async () => {
    assert.equal((await get('/x', { 'x-route': 'b' })).json().upstream, 'b');
    assert.equal((await get('/x?v=2')).json().upstream, 'b');
    assert.equal((await get('/x?v=3')).json().upstream, 'a');
    // "/order/deep" also matches the earlier "/order" prefix, which wins.
    assert.equal((await get('/order/deep')).json().upstream, 'a');
    // Wildcard virtual host domain.
    assert.equal((await get('/x', { host: 'api.echo.test:8080' })).json().upstream, 'a');
  });

  it('splits weighted destinations about 75/25', async () => {
    const n = 1000;
    let toA = 0;
    const batch = 50;
    for (let i = 0; i < n; i += batch) {
      const rs = await Promise.all(Array.from({ length: batch }, () => get('/weights')));
      for (const x of rs) if (x.json().upstream === 'a') toA++;
    }
    const share = toA / n;
    assert.ok(share > 0.69 && share < 0.81, `a got ${share}`);
  });

  it('rewrites the path prefix, the authority and by regex', async () => {
    const e = (await get('/old/thing?q=1')).json();
    assert.equal(e.url, '/new/thing?q=1');
    assert.equal(e.headers.host, 'rewritten.test');
    assert.equal(e.headers['x-envoy-original-path'], '/old/thing?q=1');
    assert.equal((await get('/re/42/x')).json().url, '/id/42');
  });

  it('redirects with Location and code', async () => {
    const x = await get('/go?keep=1');
    assert.equal(x.status, 302);
    assert.equal(x.headers.location, 'https://new.test:8443/landing?keep=1');
    const y = await get('/go301', { host: 'echo.test:8080' });
    assert.equal(y.status, 301);
    assert.equal(y.headers.location, 'http://echo.test:8080/there');
    const z = await get('/any', { host: 'secure.test' });
    assert.equal(z.status, 301);
    assert.equal(z.headers.location, 'https://secure.test/any');
  });

  it('redirectLocation: derivePort and default ports', () => {
    const req = { scheme: 'http', authority: 'h.test:8080', path: '/p?q', listenerPort: 8080 };
    assert.equal(redirectLocation({ kind: 'redirect', scheme: 'https', code: 301, derivePort: 'FROM_PROTOCOL_DEFAULT' }, req), 'https://h.test/p?q');
    assert.equal(redirectLocation({ kind: 'redirect', code: 301, derivePort: 'FROM_REQUEST_PORT', path: '/n?x=1' }, req), 'http://h.test:8080/n?x=1');
    assert.equal(redirectLocation({ kind: 'redirect', scheme: 'https', code: 301 }, { ...req, authority: 'h.test:80' }), 'https://h.test/p?q');
    assert.equal(redirectLocation({ kind: 'redirect', authority: 'o.test', port: 80, code: 308 }, req), 'http://o.test/p?q');
  });

  it('forwardProxy: absolute-form targets route by their authority and port', async () => {
    assert.deepEqual(splitAbsoluteForm('http://h.test:81/p?q=1'), { authority: 'h.test:81', path: '/p?q=1', https: false });
    assert.deepEqual(splitAbsoluteForm('http://h.test?x'), { authority: 'h.test', path: '/?x', https: false });
    assert.equal(splitAbsoluteForm('/p'), undefined);
    const s2 = http.createServer(createHttpHandler({ ...hcm, forwardProxy: true }, { clusters, telemetry, listenerPort: 15001 }));
    s2.listen(0, '127.0.0.1');
    await once(s2, 'listening');
    try {
      const raw = await rawHttp((s2.address() as AddressInfo).port, 'GET http://echo.test:8080/old/abs?z=1 HTTP/1.0\r\nHost: echo.test:8080\r\n\r\n');
      const e = JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)) as Echo;
      assert.equal(e.url, '/new/abs?z=1');
    } finally {
      s2.closeAllConnections();
      await new Promise<void>((res) => s2.close(() => res()));
    }
  });

  it('answers a direct response', async () => {
    const x = await get('/direct');
    assert.equal(x.status, 418);
    assert.equal(x.text, 'teapot');
  });

  it('applies request and response header mutations (route and destination)', async () => {
    const x = await get('/headers', { 'x-remove': 'gone', 'x-add': 'one', 'x-set': 'client' });
    const e = x.json();
    assert.equal(e.headers['x-set'], 's');
    assert.equal(e.headers['x-add'], 'one, two');
    assert.equal(e.headers['x-remove'], undefined);
    assert.equal(e.headers['x-dest'], 'd');
    assert.equal(x.headers['x-resp'], 'r');
    assert.equal(x.headers['x-upstream-secret'], undefined);
  });

  it('forwards repeated response fields as separate lines, names lower-cased, over HTTP/1.1 and h2', async () => {
    const x = await get('/cookies');
    assert.equal(x.status, 200);
    assert.equal(x.text, 'ok');
    assert.deepEqual(x.headers['set-cookie'], ['a=1', 'b=2']);
    assert.equal(x.headers['x-mixed-case'], 'yes');
    const c = http2.connect(`http://127.0.0.1:${h2port}`);
    try {
      const st = c.request({ ':path': '/cookies', ':authority': 'echo.test' });
      const [h] = (await once(st, 'response')) as [http2.IncomingHttpHeaders];
      let body = '';
      st.setEncoding('utf8');
      st.on('data', (d: string) => { body += d; });
      await once(st, 'end');
      assert.equal(h[':status'], 200);
      assert.deepEqual(h['set-cookie'], ['a=1', 'b=2']);
      assert.equal(h['x-mixed-case'], 'yes');
      assert.equal(body, 'ok');
    } finally {
      c.close();
    }
  });

  it('streams a response body: the first chunk reaches the client before the upstream ends', async () => {
    const res = await request(`${base}/stream`, { headers: { host: 'echo.test' } });
    assert.equal(res.statusCode, 200);
    const it = res.body[Symbol.asyncIterator]();
    const first = await it.next();
    assert.equal(Buffer.from(first.value as Uint8Array).toString(), 'first;');
    a.finishStreams();
    let rest = '';
    for (let n = await it.next(); !n.done; n = await it.next()) rest += Buffer.from(n.value as Uint8Array).toString();
    assert.equal(rest, 'rest');
  });

  it('sets the gateway headers and strips hop-by-hop and forged ones', async () => {
    const x = await get('/plain', {
      'x-forwarded-for': '203.0.113.9', 'x-forwarded-client-cert': 'By=forged;Hash=00', 'x-envoy-internal': 'true',
      'x-request-id': 'client-id-1',
    });
    const h = x.json().headers;
    assert.equal(h.host, 'echo.test');
    assert.equal(h['x-forwarded-for'], '203.0.113.9, 127.0.0.1');
    assert.equal(h['x-forwarded-proto'], 'http');
    assert.equal(h['x-envoy-external-address'], '127.0.0.1');
    assert.equal(h['x-forwarded-client-cert'], undefined);
    assert.equal(h['x-envoy-internal'], undefined);
    assert.equal(h['x-request-id'], 'client-id-1');
    assert.equal(x.headers['x-upstream-secret'], 'hidden');
    // Headers named by Connection are hop-by-hop too (raw request: undici would not send this).
    const raw = await rawHttp(port, 'GET /hop HTTP/1.0\r\nHost: echo.test\r\nConnection: close, x-hop\r\nx-hop: drop me\r\nx-keep: yes\r\n\r\n');
    const rawEcho = JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)) as Echo;
    assert.equal(rawEcho.headers['x-hop'], undefined);
    assert.equal(rawEcho.headers['x-keep'], 'yes');
    // A malformed id is replaced by a fresh UUID.
    const y = (await get('/plain', { 'x-request-id': 'bad id with spaces' })).json().headers;
    assert.match(String(y['x-request-id']), /^[0-9a-f-]{36}$/);
  });

  it('404 for no route, 421 for a host of another server, 400 without Host', async () => {
    const x = await get('/x', { host: 'unknown.test' });
    assert.equal(x.status, 404);
    const y = await get('/x', { host: 'other.test' });
    assert.equal(y.status, 421);
    const raw = await rawHttp(port, 'GET / HTTP/1.0\r\n\r\n');
    assert.match(raw, /^HTTP\/1\.1 400/);
  });

  it('503 when the upstream port is closed, with the reason and counter', async () => {
    const before = telemetry.counts.filter((c) => c.name === 'upstream_connect_errors_total').length;
    const x = await get('/closed', { 'x-request-id': 'closed-1' });
    assert.equal(x.status, 503);
    const [entry, ...more] = telemetry.byRequestId('closed-1');
    assert.equal(more.length, 0);
    assert.equal(entry!.reason, 'upstream_connect_failed');
    assert.equal(entry!.upstreamErrorCode, 'ECONNREFUSED');
    assert.equal(telemetry.counts.filter((c) => c.name === 'upstream_connect_errors_total' && c.labels?.cluster === 'closed').length, before + 1);
  });

  it('504 when the route timeout fires against a slow upstream', async () => {
    const x = await get('/slow', { 'x-request-id': 'slow-1' });
    assert.equal(x.status, 504);
    assert.equal(telemetry.byRequestId('slow-1')[0]!.reason, 'upstream_timeout');
  });

  it('retries on 503 and counts the attempts', async () => {
    const ok = await get('/flaky/one?fail=2', { 'x-request-id': 'retry-1' });
    assert.equal(ok.status, 200);
    assert.equal(a.hits.get('/flaky/one'), 3);
    assert.equal(telemetry.byRequestId('retry-1')[0]!.upstreamAttempts, 3);
    const exhausted = await get('/flaky/two?fail=9');
    assert.equal(exhausted.status, 503);
    assert.equal(exhausted.text, 'fail 4', 'the last upstream answer is passed through');
    assert.equal(a.hits.get('/flaky/two'), 4);
    const none = await get('/noretry/three?fail=1');
    assert.equal(none.status, 503);
    assert.equal(a.hits.get('/noretry/three'), 1);
  });

  it('replays a small buffered body on retry', async () => {
    const x = await get('/flaky/body?fail=1', { 'content-type': 'text/plain' }, { method: 'POST', body: 'hello body' });
    assert.equal(x.status, 200);
    assert.equal(x.json().body, 'hello body');
    assert.equal(a.hits.get('/flaky/body'), 2);
  });

  it('streams a large upload (no retry buffering) and counts bytes', async () => {
    const big = 'x'.repeat(300_000);
    const x = await get('/upload', { 'x-request-id': 'upload-1' }, { method: 'PUT', body: big });
    assert.equal(x.json().body.length, big.length);
    const e = telemetry.byRequestId('upload-1')[0]!;
    assert.equal(e.bytesReceived, big.length);
    assert.equal(e.bytesSent, Buffer.byteLength(x.text));
  });

  it('reuses upstream connections (keep-alive)', async () => {
    const c0 = b.connections;
    const r0 = b.requests;
    for (let i = 0; i < 20; i++) await get('/k', { 'x-route': 'b' });
    assert.equal(b.requests - r0, 20);
    assert.ok(b.connections - c0 < 5, `${b.connections - c0} connections for 20 requests`);
  });

  it('writes one access-log entry per request with the documented fields', async () => {
    await get('/headers?z=1', { 'x-request-id': 'log-1' });
    const entries = telemetry.byRequestId('log-1');
    assert.equal(entries.length, 1);
    const e = entries[0]!;
    assert.equal(e.method, 'GET');
    assert.equal(e.authority, 'echo.test');
    assert.equal(e.path, '/headers?z=1');
    assert.equal(e.protocol, 'HTTP/1.1');
    assert.equal(e.status, 200);
    assert.equal(e.route, 'headers');
    assert.equal(e.upstreamCluster, 'a');
    assert.equal(e.upstreamEndpoint, `127.0.0.1:${a.port}`);
    assert.equal(e.reason, 'ok');
    assert.equal(e.downstreamAddress, '127.0.0.1');
    assert.equal(typeof e.durationMs, 'number');
    assert.ok(!Number.isNaN(Date.parse(String(e.time))));
    assert.ok(telemetry.counts.some((c) => c.name === 'requests_total' && c.labels?.route === 'headers' && c.labels.code_class === '2xx'));
  });

  it('serves h2 with prior knowledge (curl) and sends HTTP/1.1 upstream without pseudo-headers', async () => {
    const x = await curl(['--http2-prior-knowledge', '-H', 'x-forwarded-client-cert: forged', `http://echo.test:${h2port}/h2path?a=b`,
      '--resolve', `echo.test:${h2port}:127.0.0.1`]);
    assert.equal(x.status, 200, x.stderr);
    assert.equal(x.httpVersion, '2');
    const e = JSON.parse(x.body) as Echo;
    assert.equal(e.url, '/h2path?a=b');
    assert.equal(e.headers.host, `echo.test:${h2port}`);
    assert.equal(Object.keys(e.headers).some((k) => k.startsWith(':')), false);
    assert.equal(e.headers['x-forwarded-client-cert'], undefined);
    const d = await curl(['--http2-prior-knowledge', `http://echo.test:${h2port}/direct`, '--resolve', `echo.test:${h2port}:127.0.0.1`]);
    assert.equal(d.status, 418);
    assert.equal(d.body, 'teapot');
  });

  it('h2: repeated request fields reach the upstream combined once; forged gateway headers are replaced', async () => {
    const c = http2.connect(`http://127.0.0.1:${h2port}`);
    try {
      const st = c.request({
        ':path': '/h2dup', ':authority': 'echo.test', 'x-dup': ['a', 'b'], cookie: ['k1=1', 'k2=2'],
        'x-forwarded-for': '203.0.113.7', 'x-forwarded-proto': 'gopher', 'x-envoy-internal': 'true', 'x-request-id': 'trace-42',
      });
      let body = '';
      st.setEncoding('utf8');
      st.on('data', (d: string) => { body += d; });
      await once(st, 'end');
      const e = JSON.parse(body) as Echo;
      assert.equal(e.headers['x-dup'], 'a, b');
      assert.equal(e.headers.cookie, 'k1=1; k2=2');
      assert.equal(e.headers['x-forwarded-for'], '203.0.113.7, 127.0.0.1');
      assert.equal(e.headers['x-forwarded-proto'], 'http');
      assert.equal(e.headers['x-envoy-internal'], undefined);
      assert.equal(e.headers['x-request-id'], 'trace-42');
      assert.equal(e.headers.host, 'echo.test');
    } finally {
      c.close();
    }
  });

  it('originates TLS to a verified upstream and refuses a wrong CA with 503', async () => {
    const good = await get('/tls-good');
    assert.equal(good.status, 200);
    assert.equal(good.json().upstream, 'secure');
    assert.equal(good.json().sni, 'secure.up.test');
    const before = secure.requests;
    const bad = await get('/tls-bad', { 'x-request-id': 'tls-bad-1' });
    assert.equal(bad.status, 503);
    assert.equal(secure.requests, before, 'nothing was sent over an unverified connection');
    const e = telemetry.byRequestId('tls-bad-1')[0]!;
    assert.equal(e.reason, 'upstream_tls_failed');
    assert.equal(typeof e.upstreamErrorCode, 'string');
  });

  it('SANITIZE_SET replaces a forged XFCC with the connection\'s client certificate', async () => {
    // What the listener does after a TLS handshake with a client certificate.
    const peer = new X509Certificate(clientCert.certPem);
    const s2 = http.createServer(createHttpHandler(hcm, { clusters, telemetry, listenerPort: 443 }));
    s2.on('connection', (sock: net.Socket) => setConnectionInfo(sock, {
      id: 'c1', startMs: Date.now(), downstreamRemoteAddress: '192.0.2.7', downstreamRemotePort: 1234,
      downstreamLocalAddress: '127.0.0.1', downstreamLocalPort: 443, listener: '0.0.0.0_443', chain: 'default/gw/servers[0]',
      sni: 'echo.test', tlsVersion: 'TLSv1.3', alpn: 'http/1.1', peerCertificate: peer, peerCertificateVerified: true,
    }));
    s2.listen(0, '127.0.0.1');
    await once(s2, 'listening');
    try {
      const res = await request(`http://127.0.0.1:${(s2.address() as AddressInfo).port}/p`, {
        headers: { host: 'echo.test', 'x-forwarded-client-cert': 'By=forged;Hash=00', 'x-request-id': 'xfcc-1' },
      });
      const e = JSON.parse(await res.body.text()) as Echo;
      const xfcc = String(e.headers['x-forwarded-client-cert']);
      assert.ok(xfcc.startsWith(`By=spiffe://cluster.local/ns/istio-system/sa/gateway;Hash=${peer.fingerprint256.replace(/:/g, '').toLowerCase()};`), xfcc);
      assert.ok(xfcc.endsWith(';Subject="O=client organization,CN=client.example.com";URI=spiffe://cluster.local/ns/foo/sa/sleep'), xfcc);
      assert.equal(xfcc.includes('forged'), false);
      assert.equal(e.headers['x-forwarded-for'], '192.0.2.7');
      const log = telemetry.byRequestId('xfcc-1')[0]!;
      assert.equal(log.sni, 'echo.test');
      assert.equal(log.peerUriSan, 'spiffe://cluster.local/ns/foo/sa/sleep');
      assert.equal(log.listener, '0.0.0.0_443');
    } finally {
      s2.closeAllConnections();
      await new Promise<void>((res) => s2.close(() => res()));
    }
  });

  it('a downstream abort cancels the upstream request and is logged once', async () => {
    const held = a.requests;
    const sock = net.connect(port, '127.0.0.1');
    sock.on('error', () => undefined);
    await once(sock, 'connect');
    sock.write('GET /held/slow HTTP/1.1\r\nHost: echo.test\r\nx-request-id: abort-1\r\n\r\n');
    // Wait (bounded) until the upstream has the request, then hang up.
    for (let i = 0; i < 100 && a.requests === held; i++) await new Promise((res) => setTimeout(res, 10));
    sock.destroy();
    for (let i = 0; i < 100 && telemetry.byRequestId('abort-1').length === 0; i++) await new Promise((res) => setTimeout(res, 10));
    const entries = telemetry.byRequestId('abort-1');
    assert.equal(entries.length, 1);
    assert.equal(entries[0]!.reason, 'downstream_reset');
    for (let i = 0; i < 100 && clusters.stats('a')!.active > 0; i++) await new Promise((res) => setTimeout(res, 10));
    assert.equal(clusters.stats('a')!.active, 0);
  });
});

/** Sends raw bytes and returns what came back until the server closes or 2 s pass. */
async function rawHttp(port: number, text: string): Promise<string> {
  const sock = net.connect(port, '127.0.0.1');
  sock.on('error', () => undefined);
  await once(sock, 'connect');
  sock.write(text);
  let out = '';
  sock.on('data', (d: Buffer) => { out += d.toString(); });
  await Promise.race([once(sock, 'close'), new Promise((res) => setTimeout(res, 2000).unref())]);
  sock.destroy();
  return out;
}

/**
 * HTTP/2 to upstreams whose port says so, with the real CLI and real peers on 127.0.0.1:
 * - a plaintext HTTP/2 backend (h2c, prior knowledge) behind ServiceEntry ports GRPC and HTTP2
 *   gets HTTP/2, several requests share one session, a gRPC call gets its trailers back;
 * - a GRPCRoute to a Service with appProtocol kubernetes.io/h2c works, and `validate` no longer
 *   warns (TG4001) that gRPC goes out as HTTP/1.1;
 * - a stream reset is 503 upstream_reset, a backend that is down 503 upstream_connect_failed;
 * - 8 MiB request and response bodies cross intact;
 * - two sidecars: a GRPC port is carried as HTTP/2 inside the mesh mTLS (ALPN istio-h2) and
 *   reaches the app as HTTP/2 (h2c).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import https from 'node:https';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, resolveArgs } from '../helpers/exec.js';
import { freePort, freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { grpcFrame, h2Request, type H2Response } from '../helpers/http2-client.js';
import { H2Pool } from '../../src/runtime/upstream/h2-pool.js';

const MiB = 1024 * 1024;

/** Deterministic bytes for the large bodies (a repeated pattern with a position marker). */
function pattern(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32BE(i >>> 2, i);
  return b;
}
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Backend {
  port: number;
  sessions: number;
  versions: string[];
  close(): Promise<void>;
}

/** A plaintext HTTP/2 server (h2c with prior knowledge: it speaks nothing else). */
async function startH2cBackend(): Promise<Backend> {
  const big = pattern(8 * MiB);
  const server = http2.createServer();
  const state: Backend = { port: 0, sessions: 0, versions: [], close: async () => undefined };
  server.on('session', () => { state.sessions++; });
  server.on('request', (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    state.versions.push(req.httpVersion);
    const url = req.url;
    if (url === '/reset') {
      req.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
      return;
    }
    if (url === '/download') {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(big.length) });
      res.end(big);
      return;
    }
    const hash = createHash('sha256');
    let size = 0;
    req.on('data', (c: Buffer) => { size += c.length; hash.update(c); });
    req.on('end', () => {
      if (url.startsWith('/grpc.')) {
        // gRPC: one length-prefixed message, status in trailers (7 for the method named Deny).
        const msg = Buffer.from(`reply to ${url} (${size} bytes in)`);
        const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), msg]);
        frame.writeUInt32BE(msg.length, 1);
        res.writeHead(200, { 'content-type': 'application/grpc' });
        const deny = url.endsWith('/Deny');
        res.addTrailers({ 'grpc-status': deny ? '7' : '0', 'grpc-message': deny ? 'denied' : 'ok' });
        res.end(frame);
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({
        httpVersion: req.httpVersion, method: req.method, url, authority: req.headers[':authority'], scheme: req.headers[':scheme'],
        te: req.headers['te'] ?? null, connection: req.headers['connection'] ?? null, size, sha256: hash.digest('hex'),
      }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  state.port = (server.address() as AddressInfo).port;
  state.close = () => new Promise<void>((resolve) => {
    server.close(() => resolve());
    // Sessions the gateway keeps open would hold close() forever.
    setTimeout(resolve, 2_000).unref();
  });
  return state;
}

/** One request to the gateway over HTTP/2 (TLS); body and trailers collected. */
function h2Call(port: number, ca: string, opts: { authority: string; path: string; method?: string; headers?: Record<string, string>; body?: Buffer }): Promise<H2Response> {
  return h2Request(`https://127.0.0.1:${port}`, { ca, servername: opts.authority },
    { ':method': opts.method ?? 'GET', ':authority': opts.authority, ':path': opts.path, ...opts.headers }, opts.body);
}

/** HTTP/1.1 request to the gateway's HTTPS port, the body streamed in 64 KiB pieces. */
function h1Request(port: number, ca: string, host: string, method: string, pathname: string, body?: Buffer): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, method, path: pathname, headers: { host }, servername: host, ca, agent: false, timeout: 30_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
    });
    req.on('timeout', () => req.destroy(new Error('request timed out')));
    req.on('error', reject);
    if (body === undefined) {
      req.end();
      return;
    }
    let off = 0;
    const pump = (): void => {
      while (off < body.length) {
        const piece = body.subarray(off, off + 64 * 1024);
        off += piece.length;
        if (!req.write(piece)) {
          req.once('drain', pump);
          return;
        }
      }
      req.end();
    };
    pump();
  });
}

describe('HTTP/2 upstreams: h2c with prior knowledge and HTTP/2 inside mesh mTLS', () => {
  let dir: string;
  let ca: Ca;
  let leaf: KeyPair;
  let backend: Backend;
  let gw: Gateway;
  let HTTPS: number, GAPI: number, downPort: number;
  let configFile: string;
  const via = (host: string): string[] => ['--cacert', ca.cert, ...resolveArgs(host, HTTPS)];

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-h2c-'));
    ca = await makeCa(dir, 'ca', '/O=h2c/CN=h2c-ca');
    leaf = await makeLeaf(dir, ca, 'gw', { cn: 'grpc.local', sans: ['DNS:grpc.local', 'DNS:h2.local', 'DNS:down.local', 'DNS:api.example.com'], serial: 2 });
    backend = await startH2cBackend();
    [HTTPS, GAPI] = await freePorts(2) as [number, number];
    downPort = await freePort(); // nothing listens there
    const se = (name: string, protocol: string, target: number) => `---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}, namespace: istio-system}
spec:
  hosts: [${name}.internal]
  ports: [{number: 9000, name: p9000, protocol: ${protocol}, targetPort: ${target}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ${name}, namespace: istio-system}
spec:
  hosts: [${name}.local]
  gateways: [edge]
  http: [{route: [{destination: {host: ${name}.internal, port: {number: 9000}}}]}]
`;
    const yaml = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  servers:
  - port: {number: ${HTTPS}, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: ${leaf.cert}, privateKey: ${leaf.key}}
${se('grpc', 'GRPC', backend.port)}${se('h2', 'HTTP2', backend.port)}${se('down', 'GRPC', downPort)}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gapi, namespace: apps}
spec:
  gatewayClassName: tlsgate
  listeners:
  - name: https
    port: ${GAPI}
    protocol: HTTPS
    hostname: api.example.com
    tls: {certificateRefs: [{name: gapi-cert}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: apps}
spec:
  parentRefs: [{name: gapi, sectionName: https}]
  hostnames: [api.example.com]
  rules:
  - matches: [{method: {service: grpc.Echo}}]
    backendRefs: [{name: echo, port: 50051}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: apps}
spec: {ports: [{name: grpc, port: 50051, targetPort: ${backend.port}, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: apps, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: grpc, port: ${backend.port}}]
endpoints: [{addresses: [127.0.0.1]}]
---
${writeSecretYaml('gapi-cert', 'apps', 'kubernetes.io/tls', { 'tls.crt': leaf.certPem, 'tls.key': leaf.keyPem })}`;
    await mkdir(path.join(dir, 'config'));
    configFile = path.join(dir, 'config', 'gw.yaml');
    await writeFile(configFile, yaml);
    gw = await startTlsgate({ configPaths: [configFile] });
  });

  after(async () => {
    await gw?.stop();
    await backend?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('GRPC and HTTP2 ports: HTTP/1.1 from the client (over TLS), HTTP/2 (h2c) to the backend, one session for many requests', async () => {
    const before = backend.sessions;
    for (const host of ['grpc.local', 'h2.local']) {
      for (let i = 0; i < 3; i++) {
        const r = await curl(['--http1.1', ...via(host), '-H', 'Connection: keep-alive', '-H', 'TE: gzip', `https://${host}:${HTTPS}/echo/${i}`]);
        assert.equal(r.status, 200, r.stderr + r.body);
        const seen = JSON.parse(r.body) as { httpVersion: string; url: string; authority: string; scheme: string; method: string; te: string | null; connection: string | null };
        assert.equal(seen.httpVersion, '2.0');
        assert.equal(seen.url, `/echo/${i}`);
        assert.equal(seen.method, 'GET');
        assert.equal(seen.authority, `${host}:${HTTPS}`);
        assert.equal(seen.scheme, 'http');
        assert.equal(seen.connection, null);
        assert.equal(seen.te, null); // only "te: trailers" crosses into HTTP/2
      }
    }
    // Both clusters reach the same endpoint with the same connection settings: they share its
    // pool, so six requests (three per cluster, one after another) went over one session.
    assert.equal(backend.sessions - before, 1, `sessions opened: ${backend.sessions - before}`);
    assert.ok(backend.versions.every((v) => v === '2.0'));
  });

  it('concurrent requests are multiplexed on the one session', async () => {
    const before = backend.sessions;
    const rs = await Promise.all(Array.from({ length: 8 }, (_, i) => h1Request(HTTPS, ca.certPem, 'grpc.local', 'GET', `/par/${i}`)));
    for (const r of rs) assert.equal(r.status, 200);
    assert.equal(backend.sessions, before, 'the session of the first test is reused');
  });

  it('a gRPC call through an HTTP/2 downstream gets its trailers back (grpc-status 0 and 7)', async () => {
    const grpcHeaders = { 'content-type': 'application/grpc', te: 'trailers' };
    const ok = await h2Call(HTTPS, ca.certPem, { authority: 'grpc.local', path: '/grpc.Echo/Say', method: 'POST', headers: grpcHeaders, body: grpcFrame('hello') });
    assert.equal(ok.status, 200);
    assert.equal(ok.headers['content-type'], 'application/grpc');
    assert.equal(ok.body.subarray(5).toString(), 'reply to /grpc.Echo/Say (10 bytes in)');
    assert.equal(ok.trailers['grpc-status'], '0');
    assert.equal(ok.trailers['grpc-message'], 'ok');
    const denied = await h2Call(HTTPS, ca.certPem, { authority: 'grpc.local', path: '/grpc.Echo/Deny', method: 'POST', headers: grpcHeaders, body: grpcFrame('x') });
    assert.equal(denied.status, 200);
    assert.equal(denied.trailers['grpc-status'], '7');
    assert.equal(denied.trailers['grpc-message'], 'denied');
  });

  it('GRPCRoute to a Service with appProtocol kubernetes.io/h2c: the call goes out as HTTP/2, and validate does not warn', async () => {
    const n = backend.versions.length;
    const r = await h2Call(GAPI, ca.certPem, { authority: 'api.example.com', path: '/grpc.Echo/Say', method: 'POST',
      headers: { 'content-type': 'application/grpc', te: 'trailers' }, body: grpcFrame('hi') });
    assert.equal(r.status, 200, JSON.stringify(r.headers));
    assert.equal(r.trailers['grpc-status'], '0');
    assert.equal(r.body.subarray(5).toString(), 'reply to /grpc.Echo/Say (7 bytes in)');
    assert.deepEqual(backend.versions.slice(n), ['2.0']);
    const v = await runCli(['validate', '--config', configFile]);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    assert.doesNotMatch(v.stdout + v.stderr, /TG4001|HTTP\/1\.1/);
    assert.match(v.stdout, /0 error\(s\), 0 warning\(s\)/);
  });

  it('a stream reset by the backend is 503 upstream_reset; a backend that is down is 503 upstream_connect_failed', async () => {
    const r = await curl([...via('grpc.local'), `https://grpc.local:${HTTPS}/reset`]);
    assert.equal(r.status, 503, r.body);
    const e = await gw.waitForAccessLog((x) => x['path'] === '/reset');
    assert.equal(e['reason'], 'upstream_reset');
    // The session survives a reset stream: the next request still works.
    const again = await curl([...via('grpc.local'), `https://grpc.local:${HTTPS}/after-reset`]);
    assert.equal(again.status, 200, again.body);
    const d = await curl([...via('down.local'), `https://down.local:${HTTPS}/down`]);
    assert.equal(d.status, 503, d.body);
    const de = await gw.waitForAccessLog((x) => x['path'] === '/down');
    assert.equal(de['reason'], 'upstream_connect_failed');
  });

  it('8 MiB request body and 8 MiB response body cross intact', async () => {
    const body = pattern(8 * MiB);
    const up = await h1Request(HTTPS, ca.certPem, 'h2.local', 'POST', '/upload', body);
    assert.equal(up.status, 200);
    const seen = JSON.parse(up.body.toString()) as { size: number; sha256: string; httpVersion: string };
    assert.equal(seen.httpVersion, '2.0');
    assert.equal(seen.size, body.length);
    assert.equal(seen.sha256, sha(body));
    const down = await h1Request(HTTPS, ca.certPem, 'h2.local', 'GET', '/download');
    assert.equal(down.status, 200);
    assert.equal(down.body.length, 8 * MiB);
    assert.equal(sha(down.body), sha(body));
    // And over an HTTP/2 downstream.
    const down2 = await h2Call(HTTPS, ca.certPem, { authority: 'h2.local', path: '/download' });
    assert.equal(down2.status, 200);
    assert.equal(sha(down2.body), sha(body));
  });
});

describe('mesh: a GRPC port is HTTP/2 inside the sidecars\' mTLS', () => {
  let dir: string;
  let app: http2.Http2Server;
  let appPort: number;
  let server: Gateway;
  let client: Gateway;
  let inbound: number, outbound: number, serverOutbound: number;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-h2-mesh-'));
    const caDir = path.join(dir, 'ca');
    const init = await runCli(['ca', 'init', '--dir', caDir]);
    assert.equal(init.code, 0, init.stderr);
    [inbound, outbound, serverOutbound] = await freePorts(3) as [number, number, number];
    // A GRPC port's app speaks HTTP/2: the inbound side forwards in the protocol the request
    // arrived in (HTTP/2 here, as h2c).
    app = http2.createServer((req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ url: req.url, httpVersion: req.httpVersion, xfcc: req.headers['x-forwarded-client-cert'] ?? null }));
    });
    await new Promise<void>((resolve) => app.listen(0, '127.0.0.1', resolve));
    appPort = (app.address() as AddressInfo).port;
    const conf = path.join(dir, 'conf');
    await mkdir(conf);
    await writeFile(path.join(conf, 'services.yaml'), `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: greeter, namespace: foo}
spec:
  hosts: [greeter.foo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: grpc, protocol: GRPC}]
  endpoints:
  - address: 127.0.0.1
    ports: {grpc: ${inbound}}
    labels: {app: greeter, security.istio.io/tlsMode: istio}
`);
    const identity = (ns: string, sa: string) => ['--sidecar', '--namespace', ns, '--service-account', sa, '--ca-dir', caDir];
    [server, client] = await Promise.all([
      startTlsgate({ configPaths: [conf], args: [...identity('foo', 'greeter'), '--labels', 'app=greeter',
        '--inbound-port', String(inbound), '--app-port', String(appPort), '--outbound-port', String(serverOutbound)] }),
      startTlsgate({ configPaths: [conf], args: [...identity('default', 'sleep'), '--outbound-port', String(outbound)] }),
    ]);
  });

  after(async () => {
    for (const g of [client, server]) await g?.stop();
    // The server sidecar is gone, so are its sessions to the app; the timer only bounds the wait.
    await new Promise<void>((resolve) => { if (app) { app.close(() => resolve()); setTimeout(resolve, 2_000).unref(); } else resolve(); });
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('the client sidecar speaks HTTP/2 to the server sidecar (ALPN istio-h2), one mTLS session for several requests', async () => {
    for (let i = 0; i < 3; i++) {
      const r = await curl(['-x', `http://127.0.0.1:${outbound}`, `http://greeter.foo.svc.cluster.local:8000/hello/${i}`]);
      assert.equal(r.status, 200, r.stderr + r.body);
      const seen = JSON.parse(r.body) as { url: string; httpVersion: string; xfcc: string | null };
      assert.equal(seen.url, `/hello/${i}`);
      assert.equal(seen.httpVersion, '2.0');
      assert.match(seen.xfcc ?? '', /URI=spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep/);
      const e = await server.waitForAccessLog((x) => x['path'] === `/hello/${i}`);
      assert.equal(e['protocol'], 'HTTP/2');
    }
    const metrics = (await server.admin('/stats/prometheus')).body;
    const handshakes = [...metrics.matchAll(new RegExp(`tls_handshakes_total\\{listener="127\\.0\\.0\\.1_${inbound}"[^}]*result="success"[^}]*\\} (\\d+)`, 'g'))]
      .reduce((n, m) => n + Number(m[1]), 0);
    assert.equal(handshakes, 1, metrics.split('\n').filter((l) => l.includes('tls_handshakes_total')).join('\n'));
  });
});

describe('H2Pool against a real HTTP/2 server', () => {
  /** Runs one request through the pool; resolves with what the handler saw. */
  function send(pool: H2Pool, pathname: string): Promise<{ status?: number; body: string; error?: string }> {
    return new Promise((resolve) => {
      let status: number | undefined;
      const chunks: Buffer[] = [];
      pool.dispatch({ method: 'GET', path: pathname, headers: ['host', 'pool.test'], body: null }, {
        onConnect: () => undefined,
        onHeaders: (s) => { status = s; return true; },
        onData: (c) => { chunks.push(c); return true; },
        onComplete: () => resolve({ status, body: Buffer.concat(chunks).toString() }),
        onError: (e) => resolve({ status, body: '', error: (e as { code?: string }).code ?? e.message }),
      });
    });
  }

  it('respects the peer\'s max concurrent streams (queues beyond it on one connection); silence is a headers timeout', async () => {
    let inFlight = 0, maxInFlight = 0, sessions = 0;
    const server = http2.createServer({ settings: { maxConcurrentStreams: 1 } }, (req, res) => {
      if (req.url === '/silent') return; // never answers
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      setTimeout(() => { inFlight--; res.end(req.url); }, 30);
    });
    server.on('session', () => { sessions++; });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    const pool = new H2Pool({
      connect: (_name, cb) => {
        const sock = net.connect(port, '127.0.0.1');
        sock.once('connect', () => cb(null, sock));
        sock.once('error', (e) => cb(e, null));
      },
      scheme: 'http', defaultAuthority: `127.0.0.1:${port}`, connections: 1, keepAliveTimeoutMs: 5_000, idleTimeoutMs: 300,
    });
    try {
      const rs = await Promise.all(Array.from({ length: 4 }, (_, i) => send(pool, `/q${i}`)));
      assert.deepEqual(rs.map((r) => r.body), ['/q0', '/q1', '/q2', '/q3'], JSON.stringify(rs));
      assert.equal(maxInFlight, 1);
      assert.equal(sessions, 1);
      const silent = await send(pool, '/silent');
      assert.equal(silent.error, 'UND_ERR_HEADERS_TIMEOUT');
      // The session outlives a timed-out stream.
      assert.equal((await send(pool, '/after')).body, '/after');
      assert.equal(sessions, 1);
    } finally {
      await pool.destroy();
      await new Promise<void>((resolve) => { server.close(() => resolve()); setTimeout(resolve, 1_000).unref(); });
    }
  });
});

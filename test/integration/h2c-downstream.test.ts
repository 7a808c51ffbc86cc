/**
 * HTTP/2 over cleartext with prior knowledge (h2c) on plaintext HTTP ports, against the real CLI:
 * the first bytes of a connection pick the codec (the HTTP/2 preface or anything else), as
 * Envoy's AUTO codec does. Covered: curl --http2-prior-knowledge and plain curl on one port
 * (Istio Gateway servers of protocol HTTP and GRPC), 50 concurrent streams on one node:http2
 * session, a gRPC-shaped call, the HTTP/2 limits of TLS h2 applying to h2c too, hostile first
 * bytes (a stalled preface, a preface then garbage, random bytes), the access log, and a Gateway
 * API GRPCRoute on an HTTP listener served end to end.
 *
 * The backend answers HTTP/1.1 and h2c on one port (it tells them apart the same way), so these
 * tests hold whichever protocol the gateway uses upstream.
 */
import assert from 'node:assert/strict';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { encodeProxyV1 } from '../../src/runtime/listener/proxy-protocol.js';
import { certDir } from '../helpers/certs.js';
import { curl } from '../helpers/exec.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { localServiceEntry } from '../helpers/recording-telemetry.js';

const MAX_FIELDS = 50;
const PREFACE = 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n';
const { NGHTTP2_ENHANCE_YOUR_CALM } = http2.constants;

let dir: string;
let gw: Gateway;
let backend: Backend;
/** Istio Gateway server, protocol HTTP. */
let HTTP: number;
/** Istio Gateway server, protocol GRPC. */
let GRPC: number;
/** Gateway API listener, protocol HTTP, with a GRPCRoute and an HTTPRoute. */
let GAPI: number;
/** Istio Gateway server, protocol HTTP, behind a load balancer that sends the PROXY protocol. */
let PP: number;
const cfgFile = (): string => path.join(dir, 'config', 'all.yaml');

interface Seen { httpVersion: string; method: string; url: string; contentType: string; te: string; body: string; authority: string }

interface Backend { port: number; seen: Seen[]; close(): Promise<void> }

/** An upstream that serves HTTP/1.1 and h2c (prior knowledge) on one port and answers with what it saw. */
async function startBackend(): Promise<Backend> {
  const seen: Seen[] = [];
  const handler = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => { if (chunks.length < 100) chunks.push(c); });
    req.on('end', () => {
      const s: Seen = {
        httpVersion: req.httpVersion, method: req.method ?? '', url: req.url ?? '',
        contentType: String(req.headers['content-type'] ?? ''), te: String(req.headers.te ?? ''),
        body: Buffer.concat(chunks).toString('latin1'),
        authority: String(req.headers[':authority'] ?? req.headers.host ?? ''),
      };
      if (seen.length < 1000) seen.push(s);
      const body = JSON.stringify(s);
      if (s.contentType === 'application/grpc') {
        // A gRPC-shaped answer: one length-prefixed message carrying the request's path.
        const msg = Buffer.from(s.url);
        const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, msg.length]), msg]);
        (res as http.ServerResponse).writeHead(200, { 'content-type': 'application/grpc', 'x-backend-version': s.httpVersion });
        res.end(frame);
        return;
      }
      (res as http.ServerResponse).writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  };
  const h1 = http.createServer(handler as http.RequestListener);
  const h2 = http2.createServer(handler as (q: http2.Http2ServerRequest, r: http2.Http2ServerResponse) => void);
  h2.on('sessionError', () => {});
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sock.on('error', () => {});
    sockets.add(sock);
    sock.once('close', () => sockets.delete(sock));
    let got = Buffer.alloc(0);
    const onData = (c: Buffer): void => {
      got = Buffer.concat([got, c]);
      const n = Math.min(got.length, PREFACE.length);
      const differs = got.subarray(0, n).toString('latin1') !== PREFACE.slice(0, n);
      if (!differs && n < PREFACE.length) return;
      sock.removeListener('data', onData);
      sock.pause();
      sock.unshift(got);
      // An HTTP/2 session reads the put-back bytes itself; HTTP/1.1 needs the socket flowing.
      if (differs) { sock.resume(); h1.emit('connection', sock); } else h2.emit('connection', sock);
    };
    sock.on('data', onData);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    seen,
    close: () => new Promise<void>((r) => { for (const s of sockets) s.destroy(); server.close(() => r()); }),
  };
}

function config(): string {
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: h2c}
spec:
  servers:
  - port: {number: ${HTTP}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${GRPC}, name: grpc, protocol: GRPC}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: pp
  annotations:
    tlsgate.io/proxy-protocol: "true"
    tlsgate.io/proxy-protocol-trusted-cidrs: "127.0.0.1/32"
spec:
  servers:
  - port: {number: ${PP}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: h2c}
spec:
  hosts: ["*"]
  gateways: [h2c, pp]
  http:
  - route: [{destination: {host: backend.upstream.local}}]
---
${localServiceEntry('backend', 'backend.upstream.local', backend.port, 'HTTP')}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: apps}
spec:
  gatewayClassName: tlsgate
  listeners:
  - name: web
    port: ${GAPI}
    protocol: HTTP
    allowedRoutes: {kinds: [{kind: HTTPRoute}, {kind: GRPCRoute}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: web}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    backendRefs: [{name: backend, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: web}]
  hostnames: [web.example.com]
  rules: [{backendRefs: [{name: backend, port: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: apps}
spec: {ports: [{name: web, port: 80, targetPort: ${backend.port}}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-1, namespace: apps, labels: {kubernetes.io/service-name: backend}}
addressType: IPv4
ports: [{name: web, port: ${backend.port}}]
endpoints: [{addresses: [127.0.0.1]}]
`;
}

before(async () => {
  dir = await certDir('tlsgate-h2c-');
  backend = await startBackend();
  [HTTP, GRPC, GAPI, PP] = (await freePorts(4)) as [number, number, number, number];
  await mkdir(path.join(dir, 'config'));
  await writeFile(cfgFile(), config());
  gw = await startTlsgate({
    configPaths: [cfgFile()],
    args: ['--drain-timeout', '1s', '--request-headers-timeout', '1s', '--max-request-headers', String(MAX_FIELDS)],
  });
});

after(async () => {
  await gw?.stop();
  await backend?.close();
  await rm(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ clients

interface Outcome { status?: number; headers: http2.IncomingHttpHeaders; body: Buffer; rstCode: number }

function connect(port: number): http2.ClientHttp2Session {
  const c = http2.connect(`http://127.0.0.1:${port}`);
  c.on('error', () => {});
  return c;
}

function request(c: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders, body?: Buffer, timeoutMs = 10_000): Promise<Outcome> {
  return new Promise((resolve) => {
    const s = c.request({ ':path': '/', ...headers }, { endStream: body === undefined });
    let status: number | undefined;
    let got: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    const t = setTimeout(() => s.close(http2.constants.NGHTTP2_CANCEL), timeoutMs);
    s.on('response', (h) => { status = Number(h[':status']); got = h; });
    s.on('data', (d: Buffer) => { if (chunks.length < 1000) chunks.push(d); });
    s.on('error', () => {});
    s.on('close', () => { clearTimeout(t); resolve({ ...(status !== undefined ? { status } : {}), headers: got, body: Buffer.concat(chunks), rstCode: s.rstCode ?? 0 }); });
    if (body !== undefined) s.end(body);
  });
}

/** Writes raw bytes on a new connection and collects the reply until the gateway closes (bounded). */
function raw(port: number, data: string | Buffer, timeoutMs = 5_000): Promise<{ bytes: Buffer; closed: boolean; ms: number }> {
  return new Promise((resolve) => {
    const start = Date.now();
    const s = net.connect({ host: '127.0.0.1', port });
    const chunks: Buffer[] = [];
    const done = (closed: boolean): void => { clearTimeout(t); s.destroy(); resolve({ bytes: Buffer.concat(chunks), closed, ms: Date.now() - start }); };
    const t = setTimeout(() => done(false), timeoutMs);
    s.on('error', () => {});
    s.on('data', (c: Buffer) => { if (chunks.length < 64) chunks.push(c); });
    s.on('close', () => done(true));
    s.on('connect', () => { if (data.length > 0) s.write(data); });
  });
}

/** The frame types in a server's HTTP/2 byte stream (9-byte headers, RFC 9113 4.1). */
function frameTypes(b: Buffer): number[] {
  const types: number[] = [];
  for (let i = 0; i + 9 <= b.length && types.length < 100; i += 9 + b.readUIntBE(i, 3)) types.push(b[i + 3]!);
  return types;
}

const FRAME_GOAWAY = 0x7;

async function curlOk(port: number, args: string[], p: string): Promise<{ version: string; seen: Seen }> {
  const r = await curl([...args, `http://127.0.0.1:${port}${p}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.status, 200, r.body);
  return { version: r.httpVersion, seen: JSON.parse(r.body) as Seen };
}

// ------------------------------------------------------------------ tests

describe('h2c with prior knowledge on Istio Gateway HTTP ports', () => {
  for (const [name, port] of [['HTTP', () => HTTP], ['GRPC', () => GRPC]] as const) {
    it(`protocol ${name}: curl --http2-prior-knowledge gets HTTP/2 200 from the backend; plain curl on the same port is HTTP/1.1`, async () => {
      const h2 = await curlOk(port(), ['--http2-prior-knowledge'], `/h2c/${name}`);
      assert.equal(h2.version, '2');
      assert.equal(h2.seen.url, `/h2c/${name}`);
      const h1 = await curlOk(port(), [], `/h1/${name}`);
      assert.equal(h1.version, '1.1');
      assert.equal(h1.seen.url, `/h1/${name}`);
    });
  }

  it('an HTTP/1.1 request asking to upgrade to h2c (curl --http2) is served over HTTP/1.1', async () => {
    const r = await curlOk(HTTP, ['--http2'], '/upgrade');
    assert.equal(r.version, '1.1');
    assert.equal(r.seen.url, '/upgrade');
  });

  it('HTTP/1.1 keep-alive still works: two requests on one connection', async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const sockets: net.Socket[] = [];
      for (const p of ['/ka/1', '/ka/2']) {
        const r = await new Promise<{ status: number; body: string }>((resolve, reject) => {
          const req = http.get({ host: '127.0.0.1', port: HTTP, path: p, agent, timeout: 5_000 }, (res) => {
            sockets.push(res.socket);
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (d: string) => { body += d; });
            res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
          });
          req.on('timeout', () => req.destroy(new Error('timeout')));
          req.on('error', reject);
        });
        assert.equal(r.status, 200);
        assert.equal((JSON.parse(r.body) as Seen).url, p);
      }
      assert.equal(sockets[0], sockets[1], 'the second request reused the connection');
    } finally {
      agent.destroy();
    }
  });

  it('50 concurrent streams on one node:http2 session all get their own answer', async () => {
    const c = connect(HTTP);
    try {
      const all = await Promise.all(Array.from({ length: 50 }, (_, i) => request(c, { ':path': `/stream/${i}`, ':authority': 'any.example.com' })));
      all.forEach((r, i) => {
        assert.equal(r.status, 200, `stream ${i}`);
        assert.equal((JSON.parse(r.body.toString()) as Seen).url, `/stream/${i}`);
      });
    } finally {
      c.close();
    }
  });

  it('a gRPC-shaped call (POST application/grpc, te: trailers) gets the backend response', async () => {
    const c = connect(GRPC);
    try {
      const msg = Buffer.concat([Buffer.from([0, 0, 0, 0, 5]), Buffer.from('hello')]);
      const r = await request(c, { ':method': 'POST', ':path': '/echo.Echo/Say', ':authority': 'grpc.local', 'content-type': 'application/grpc', te: 'trailers' }, msg);
      assert.equal(r.status, 200);
      assert.equal(r.headers['content-type'], 'application/grpc');
      assert.equal(r.body.subarray(5).toString(), '/echo.Echo/Say');
      const seen = backend.seen.find((s) => s.url === '/echo.Echo/Say' && s.authority.startsWith('grpc.local'));
      assert.ok(seen, 'the backend got the call');
      assert.equal(seen.method, 'POST');
      assert.equal(seen.contentType, 'application/grpc');
      assert.equal(seen.body, msg.toString('latin1'));
    } finally {
      c.close();
    }
  });

  it('the HTTP/2 header limits of TLS h2 apply to h2c: too many fields reset the stream, the session goes on', async () => {
    const c = connect(HTTP);
    try {
      const fields = (n: number): http2.OutgoingHttpHeaders => Object.fromEntries(Array.from({ length: n }, (_, i) => [`x-field-${i}`, 'v']));
      assert.equal((await request(c, { ':path': '/limits/ok', ...fields(MAX_FIELDS) })).status, 200);
      const over = await request(c, { ':path': '/limits/over', ...fields(MAX_FIELDS + 1) });
      assert.equal(over.status, undefined);
      assert.equal(over.rstCode, NGHTTP2_ENHANCE_YOUR_CALM);
      assert.equal((await request(c, { ':path': '/limits/after' })).status, 200);
      assert.ok(!backend.seen.some((s) => s.url === '/limits/over'), 'never forwarded');
      assert.equal(c.remoteSettings.maxConcurrentStreams, 100, 'the same SETTINGS as the TLS h2 server');
    } finally {
      c.close();
    }
  });

  it('the access log says HTTP/2 for h2c requests and HTTP/1.1 for the others', async () => {
    await curlOk(HTTP, ['--http2-prior-knowledge'], '/log/h2c');
    await curlOk(HTTP, [], '/log/h1');
    const h2 = await gw.waitForAccessLog((e) => e.path === '/log/h2c');
    const h1 = await gw.waitForAccessLog((e) => e.path === '/log/h1');
    assert.equal(h2.protocol, 'HTTP/2');
    assert.equal(h2.status, 200);
    assert.equal(h1.protocol, 'HTTP/1.1');
    assert.equal(h2.alpn, undefined, 'no ALPN on cleartext');
  });
});

describe('PROXY protocol listeners', () => {
  it('the PROXY header is read first, then the preface picks HTTP/2; HTTP/1.1 still works there', async () => {
    const header = encodeProxyV1({ address: '203.0.113.7', port: 40001 }, { address: '198.51.100.1', port: PP });
    const c = http2.connect(`http://127.0.0.1:${PP}`, {
      createConnection: () => {
        const sock = net.connect({ host: '127.0.0.1', port: PP });
        sock.write(header); // queued ahead of the client's preface
        return sock;
      },
    });
    c.on('error', () => {});
    try {
      const r = await request(c, { ':path': '/pp/h2c', ':authority': 'pp.example.com' });
      assert.equal(r.status, 200);
      assert.equal((JSON.parse(r.body.toString()) as Seen).url, '/pp/h2c');
    } finally {
      c.close();
    }
    const entry = await gw.waitForAccessLog((e) => e.path === '/pp/h2c');
    assert.equal(entry.protocol, 'HTTP/2');
    assert.equal(entry.downstreamAddress, '203.0.113.7');
    const h1 = await raw(PP, Buffer.concat([encodeProxyV1({ address: '203.0.113.8', port: 40002 }, { address: '198.51.100.1', port: PP }),
      Buffer.from('GET /pp/h1 HTTP/1.1\r\nHost: pp.example.com\r\nConnection: close\r\n\r\n')]));
    assert.match(h1.bytes.toString('latin1'), /^HTTP\/1\.1 200 /);
  });
});

describe('hostile first bytes on a plaintext HTTP port', () => {
  it('a piece of the preface, then silence: closed by the request-headers timeout (408), the gateway serves on', async () => {
    const r = await raw(HTTP, 'PRI * HTTP/2.0\r\n', 6_000);
    assert.ok(r.closed, 'the gateway closed the connection');
    assert.ok(r.ms < 6_000, `closed after ${r.ms} ms`);
    assert.match(r.bytes.toString('latin1'), /^HTTP\/1\.1 408 /);
    await gw.waitForAccessLog((e) => e.reason === 'request_headers_timeout' && e.status === 408);
    assert.equal((await curlOk(HTTP, ['--http2-prior-knowledge'], '/after-stall')).version, '2');
  });

  it('a connection that sends nothing still gets 408 after the header timeout', async () => {
    const r = await raw(HTTP, '', 6_000);
    assert.ok(r.closed);
    assert.match(r.bytes.toString('latin1'), /^HTTP\/1\.1 408 /);
  });

  it('the preface then garbage: GOAWAY and close, nothing forwarded', async () => {
    const before = backend.seen.length;
    const r = await raw(HTTP, Buffer.concat([Buffer.from(PREFACE, 'latin1'), Buffer.from('this is not an HTTP/2 frame at all, no no no\r\n\r\n')]), 5_000);
    assert.ok(r.closed, 'closed');
    assert.ok(frameTypes(r.bytes).includes(FRAME_GOAWAY), `GOAWAY among ${JSON.stringify(frameTypes(r.bytes))}`);
    await sleep(100);
    assert.equal(backend.seen.length, before);
  });

  it('random bytes get the HTTP/1.1 400 they got before', async () => {
    const r = await raw(HTTP, Buffer.from('\x01\x02garbage\xff\xfe\r\n\r\n', 'latin1'));
    assert.match(r.bytes.toString('latin1'), /^HTTP\/1\.1 400 /);
  });

  it('a request line dripped byte by byte is still HTTP/1.1 (decided on its first byte)', async () => {
    const res = await new Promise<string>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: HTTP });
      const wire = Buffer.from('GET /drip HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n');
      let i = 0;
      let text = '';
      const iv = setInterval(() => { if (i < wire.length && !s.destroyed) s.write(wire.subarray(i, ++i)); }, 5);
      const done = (): void => { clearInterval(iv); clearTimeout(t); s.destroy(); resolve(text); };
      const t = setTimeout(done, 5_000);
      s.on('error', () => {});
      s.on('data', (c: Buffer) => { text += c.toString('latin1'); });
      s.on('close', done);
    });
    assert.match(res, /^HTTP\/1\.1 200 /);
    assert.match(res, /"url":"\/drip"/);
  });

  it('the gateway is still up and serving both protocols', async () => {
    assert.equal((await curlOk(HTTP, ['--http2-prior-knowledge'], '/still-up')).version, '2');
    assert.equal((await curlOk(HTTP, [], '/still-up')).version, '1.1');
  });
});

describe('Gateway API: GRPCRoute on an HTTP listener', () => {
  it('validates: the listener takes GRPCRoute (no InvalidRouteKinds) and the route is accepted', async () => {
    const r = await runCli(['validate', '--config', cfgFile()]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout, /InvalidRouteKinds|TG6002|NotAllowedByListeners/);
    const dump = await gw.admin('/config_dump');
    assert.match(dump.body, /parent apps\/edge\/web: Accepted=True/);
  });

  it('an h2c gRPC call reaches the backend by service/method; another method is not routed', async () => {
    const c = connect(GAPI);
    try {
      const msg = Buffer.concat([Buffer.from([0, 0, 0, 0, 2]), Buffer.from('hi')]);
      const grpc = { ':method': 'POST', ':authority': `grpc.example.com:${GAPI}`, 'content-type': 'application/grpc', te: 'trailers' };
      const ok = await request(c, { ...grpc, ':path': '/echo.Echo/Say' }, msg);
      assert.equal(ok.status, 200);
      assert.equal(ok.body.subarray(5).toString(), '/echo.Echo/Say');
      assert.ok(backend.seen.some((s) => s.url === '/echo.Echo/Say' && s.authority.startsWith('grpc.example.com') && s.body === msg.toString('latin1')));
      const other = await request(c, { ...grpc, ':path': '/echo.Echo/Shout' }, msg);
      assert.notEqual(other.status, 200);
      assert.ok(!backend.seen.some((s) => s.url === '/echo.Echo/Shout'), 'not forwarded');
      // The HTTPRoute of the same listener serves h2c too.
      const web = await request(c, { ':path': '/web', ':authority': 'web.example.com' });
      assert.equal(web.status, 200);
      assert.equal((JSON.parse(web.body.toString()) as Seen).url, '/web');
    } finally {
      c.close();
    }
  });
});

// Hardening (issue 7): limits, fail-closed rules and header hygiene, proved against a running
// gateway with real peers. One gateway serves three ports from one VirtualService:
//   H  plaintext HTTP          S  HTTPS SIMPLE          M  HTTPS MUTUAL with a CRL
// and runs with tight limits (--max-connections 40, 1 s handshake and header timeouts) so each
// limit can be hit quickly. Upstreams are Node echo servers and a TCP recorder.
import assert from 'node:assert/strict';
import { chmod, copyFile, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { run } from '../helpers/exec.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { REPO_ROOT, runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoReply, type EchoServer } from '../helpers/upstreams.js';

const MAX_CONNECTIONS = 40;

let dir: string;
let ca: Ca;
let server: KeyPair;
let good: KeyPair;
let expired: KeyPair;
let future: KeyPair;
let revoked: KeyPair;
let echo: EchoServer;
let recorder: net.Server;
const recorded: Buffer[] = [];
let gw: Gateway;
let H: number;
let S: number;
let M: number;
let hello: Buffer;

/** Revokes `cert` with `openssl ca -revoke` and writes the CRL (PEM) to `<dir>/ca.crl`. */
async function makeCrl(d: string, authority: Ca, revokedCert: string): Promise<string> {
  const db = path.join(d, 'crl-db');
  await mkdir(db, { recursive: true });
  await writeFile(path.join(db, 'index.txt'), '');
  await writeFile(path.join(db, 'crlnumber'), '01\n');
  const conf = path.join(db, 'ca.cnf');
  await writeFile(conf, ['[ca]', 'default_ca = crl_ca', '[crl_ca]', `database = ${path.join(db, 'index.txt')}`,
    `crlnumber = ${path.join(db, 'crlnumber')}`, 'default_md = sha256', 'default_crl_days = 30', ''].join('\n'));
  const out = path.join(d, 'ca.crl');
  for (const args of [
    ['ca', '-config', conf, '-revoke', revokedCert, '-keyfile', authority.key, '-cert', authority.cert],
    ['ca', '-config', conf, '-gencrl', '-keyfile', authority.key, '-cert', authority.cert, '-out', out],
  ]) {
    const r = await run('openssl', args, { cwd: db, timeoutMs: 30_000 });
    assert.equal(r.code, 0, r.stderr);
  }
  return out;
}

before(async () => {
  dir = await certDir('tlsgate-hardening-');
  ca = await makeCa(dir, 'ca', '/O=hardening/CN=hardening-ca');
  server = await makeLeaf(dir, ca, 'server', { cn: 'hard.example.com', sans: ['DNS:hard.example.com'], serial: 10 });
  good = await makeLeaf(dir, ca, 'good', { cn: 'good-client', serial: 11, extendedKeyUsage: ['clientAuth'] });
  expired = await makeLeaf(dir, ca, 'expired', { cn: 'expired-client', serial: 12, expired: true, extendedKeyUsage: ['clientAuth'] });
  const day = 24 * 3600 * 1000;
  future = await makeLeaf(dir, ca, 'future', {
    cn: 'future-client', serial: 13, notBefore: new Date(Date.now() + 10 * day), notAfter: new Date(Date.now() + 40 * day), extendedKeyUsage: ['clientAuth'],
  });
  revoked = await makeLeaf(dir, ca, 'revoked', { cn: 'revoked-client', serial: 14, extendedKeyUsage: ['clientAuth'] });
  const crl = await makeCrl(dir, ca, revoked.cert);
  await chmod(server.key, 0o600);
  hello = Buffer.from((await readFile(path.join(REPO_ROOT, 'test', 'fixtures', 'client-hello', 'node-sni-alpn.hex'), 'utf8')).trim(), 'hex');

  echo = await startEchoServer({ name: 'echo' });
  // An "upstream" that records what it is sent and never answers: a TLS client's first byte is 0x16.
  recorder = net.createServer((s) => {
    s.on('error', () => {});
    s.once('data', (d: Buffer) => { if (recorded.length < 100) recorded.push(d.subarray(0, 64)); s.destroy(); });
    setTimeout(() => s.destroy(), 2_000).unref();
  });
  await new Promise<void>((r) => recorder.listen(0, '127.0.0.1', r));
  const recPort = (recorder.address() as net.AddressInfo).port;

  [H, S, M] = (await freePorts(3)) as [number, number, number];
  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'all.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: hard}
spec:
  servers:
  - port: {number: ${H}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${S}, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: ${server.cert}, privateKey: ${server.key}}
  - port: {number: ${M}, name: mtls, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: MUTUAL, serverCertificate: ${server.cert}, privateKey: ${server.key}, caCertificates: ${ca.cert}, caCrl: ${crl}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hard}
spec:
  hosts: ["*"]
  gateways: [hard]
  http:
  - match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: slow.upstream.local}}]
  - match: [{uri: {prefix: /origination}}]
    route: [{destination: {host: recorder.upstream.local}}]
  - route: [{destination: {host: echo.upstream.local}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.upstream.local, slow.upstream.local]
  location: MESH_EXTERNAL
  ports: [{number: ${echo.port}, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow}
spec:
  host: slow.upstream.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http2MaxRequests: 1, http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: recorder}
spec:
  hosts: [recorder.upstream.local]
  location: MESH_EXTERNAL
  ports: [{number: ${recPort}, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: recorder}
spec:
  host: recorder.upstream.local
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ${ca.cert}, sni: recorder.upstream.local}
`);
  gw = await startTlsgate({
    configPaths: [cfg],
    args: ['--drain-timeout', '1s', '--max-connections', String(MAX_CONNECTIONS), '--handshake-timeout', '1s',
      '--request-headers-timeout', '1s', '--max-request-headers', '100', '--max-request-header-bytes', '16384'],
  });
});

after(async () => {
  await gw?.stop();
  await echo?.close();
  await new Promise<void>((r) => (recorder ? recorder.close(() => r()) : r()));
  await rm(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ clients

/** Writes raw bytes on a new connection and collects the reply until the gateway closes (bounded). */
function raw(port: number, data: string | Buffer, timeoutMs = 5_000): Promise<{ text: string; closed: boolean; ms: number }> {
  return new Promise((resolve) => {
    const start = Date.now();
    const s = net.connect({ host: '127.0.0.1', port });
    const chunks: Buffer[] = [];
    const done = (closed: boolean): void => { clearTimeout(t); s.destroy(); resolve({ text: Buffer.concat(chunks).toString('latin1'), closed, ms: Date.now() - start }); };
    const t = setTimeout(() => done(false), timeoutMs);
    s.on('error', () => {});
    s.on('data', (c: Buffer) => { if (chunks.length < 64) chunks.push(c); });
    s.on('close', () => done(true));
    s.on('connect', () => s.write(data));
  });
}

type Reply = { status: number; body: string } | { error: string };

function get(opts: https.RequestOptions & { tls: boolean }, timeoutMs = 5_000): Promise<Reply> {
  return new Promise((resolve) => {
    const mod = opts.tls ? https : http;
    const req = mod.request({ host: '127.0.0.1', agent: false, timeout: timeoutMs, ...opts }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', (e) => resolve({ error: e.message }));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (e: Error & { code?: string }) => resolve({ error: e.code ?? e.message }));
    req.end();
  });
}

const tlsOpts = (port: number, client?: KeyPair): https.RequestOptions & { tls: boolean } => ({
  tls: true, port, servername: 'hard.example.com', ca: ca.certPem,
  headers: { host: 'hard.example.com' },
  ...(client ? { cert: client.certPem, key: client.keyPem } : {}),
});

function status(r: Reply): number | string {
  return 'status' in r ? r.status : r.error;
}

async function metric(name: string, labelPart: string): Promise<number> {
  const m = await gw.admin('/stats/prometheus');
  let sum = 0;
  for (const line of m.body.split('\n')) {
    if (line.startsWith(`tlsgate_${name}{`) && line.includes(labelPart)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

// ------------------------------------------------------------------ tests

describe('mutual TLS fails closed', () => {
  it('serves a valid client certificate', async () => {
    const r = await get({ ...tlsOpts(M, good), path: '/ok' });
    assert.equal(status(r), 200);
  });
  for (const [name, pick] of [['no certificate', () => undefined], ['an expired certificate', () => expired],
    ['a not-yet-valid certificate', () => future], ['a revoked certificate (CRL)', () => revoked]] as const) {
    it(`refuses ${name}`, async () => {
      const before = echo.requests;
      const r = await get({ ...tlsOpts(M, pick()), path: '/must-not-pass' });
      assert.ok('error' in r, `expected a refused connection, got ${JSON.stringify(r)}`);
      assert.equal(echo.requests, before, 'the upstream saw nothing');
    });
  }
  it('logged the refusals with a reason', async () => {
    const refused = () => gw.accessLogs().filter((e) => e.kind === 'connection' && String(e.listener).endsWith(`_${M}`));
    for (let i = 0; i < 30 && refused().length < 4; i++) await sleep(100);
    const entries = refused();
    const reasons = new Set(entries.map((e) => e.reason));
    assert.ok(reasons.has('client_cert_required') || reasons.has('tls_handshake_failed'), [...reasons].join(','));
    assert.ok(entries.length >= 4, `${entries.length} refused connections logged`);
  });
});

describe('no plaintext fallback to a TLS upstream', () => {
  it('answers 503 upstream_tls_failed and the upstream only ever saw a ClientHello', async () => {
    recorded.length = 0;
    const r = await get({ tls: false, port: H, path: '/origination/secret?token=abc', headers: { host: 'hard.example.com' } });
    assert.equal(status(r), 503);
    const e = await gw.waitForAccessLog((x) => x.path === '/origination/secret?token=abc');
    assert.equal(e.reason, 'upstream_tls_failed');
    assert.ok(recorded.length >= 1, 'the upstream was dialled');
    for (const first of recorded) {
      assert.equal(first[0], 0x16, 'first byte is a TLS handshake record');
      assert.ok(!first.toString('latin1').includes('GET'), 'no plaintext HTTP');
    }
  });
});

describe('identity headers from clients are stripped', () => {
  const forged = 'By=spiffe://cluster.local/ns/x/sa/admin;URI=spiffe://cluster.local/ns/x/sa/admin';
  for (const [name, opts] of [['plaintext', { tls: false, port: 0 }], ['SIMPLE TLS', { tls: true, port: 0 }]] as const) {
    it(`on ${name}`, async () => {
      const base = opts.tls ? tlsOpts(S) : { tls: false, port: H };
      const r = await get({ ...base, path: '/xfcc', headers: { host: 'hard.example.com', 'x-forwarded-client-cert': forged, 'x-envoy-peer-metadata': 'forged' } });
      assert.equal(status(r), 200);
      const reply = JSON.parse((r as { body: string }).body) as EchoReply;
      assert.equal(reply.headers['x-forwarded-client-cert'], undefined);
      assert.equal(reply.headers['x-envoy-peer-metadata'], undefined);
    });
  }
});

describe('request smuggling is refused before routing', () => {
  const cases: Array<[string, string]> = [
    ['Content-Length with Transfer-Encoding', 'POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /evil HTTP/1.1\r\nHost: a\r\n\r\n'],
    ['two different Content-Lengths', 'POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde'],
    ['obs-fold', 'GET /smuggle HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n'],
    ['a bad chunk size', 'POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n'],
    ['Transfer-Encoding not ending in chunked', 'POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n'],
    ['a space before the colon', 'GET /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n'],
  ];
  for (const [name, wire] of cases) {
    it(name, async () => {
      const before = echo.replies.filter((x) => x.url.startsWith('/smuggle') || x.url === '/evil').length;
      const r = await raw(H, wire);
      assert.match(r.text, /^HTTP\/1\.1 400 /, JSON.stringify(r.text.slice(0, 80)));
      assert.ok(!r.text.includes('"server"'), 'no upstream reply');
      await sleep(100);
      assert.equal(echo.replies.filter((x) => x.url.startsWith('/smuggle') || x.url === '/evil').length, before, 'nothing forwarded');
    });
  }
  it('counts the 400s in requests_total and the access log', async () => {
    assert.ok(await metric('requests_total', 'code_class="4xx"') >= cases.length);
    assert.ok(gw.accessLogs().filter((e) => e.reason === 'bad_request' && e.status === 400).length >= cases.length);
  });
});

describe('header limits and timeouts', () => {
  it('a 20 KiB header block gets 431, counted', async () => {
    const r = await raw(H, `GET /big HTTP/1.1\r\nHost: a\r\nX-Big: ${'a'.repeat(20 * 1024)}\r\n\r\n`);
    assert.match(r.text, /^HTTP\/1\.1 431 /);
    await gw.waitForAccessLog((e) => e.status === 431 && e.reason === 'request_headers_too_large');
  });
  it('150 header fields get 431 (limit 100)', async () => {
    const fields = Array.from({ length: 150 }, (_, i) => `X-H${i}: v\r\n`).join('');
    const r = await raw(H, `GET /many HTTP/1.1\r\nHost: a\r\n${fields}\r\n`);
    assert.match(r.text, /^HTTP\/1\.1 431 /);
    assert.ok(!echo.replies.some((x) => x.url === '/many'));
  });
  it('99 header fields pass', async () => {
    const fields = Array.from({ length: 98 }, (_, i) => `X-H${i}: v\r\n`).join('');
    const r = await raw(H, `GET /many-ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n${fields}\r\n`);
    assert.match(r.text, /^HTTP\/1\.1 200 /);
  });
  it('slowloris: headers dripped byte by byte are cut off with 408 by the header timeout', async () => {
    const res = await new Promise<{ text: string; ms: number }>((resolve) => {
      const start = Date.now();
      const s = net.connect({ host: '127.0.0.1', port: H });
      const chunks: Buffer[] = [];
      const drip = Buffer.from('GET /slow HTTP/1.1\r\nHost: a\r\n' + 'X-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n'.repeat(10));
      let i = 0;
      const iv = setInterval(() => { if (i < drip.length && !s.destroyed) s.write(drip.subarray(i, ++i)); }, 50);
      const done = (): void => { clearInterval(iv); clearTimeout(t); s.destroy(); resolve({ text: Buffer.concat(chunks).toString(), ms: Date.now() - start }); };
      const t = setTimeout(done, 8_000);
      s.on('error', () => {});
      s.on('data', (c: Buffer) => chunks.push(c));
      s.on('close', done);
    });
    assert.match(res.text, /^HTTP\/1\.1 408 /);
    assert.ok(res.ms < 8_000, `closed after ${res.ms} ms`);
    await gw.waitForAccessLog((e) => e.reason === 'request_headers_timeout');
  });
  it('the header timeout does not cut an idle keep-alive connection between requests', async () => {
    const s = net.connect({ host: '127.0.0.1', port: H });
    s.on('error', () => {});
    let text = '';
    s.on('data', (c: Buffer) => { text += c.toString('latin1'); });
    await new Promise<void>((r) => s.once('connect', () => r()));
    const count = (): number => (text.match(/HTTP\/1\.1 200 /g) ?? []).length;
    s.write('GET /ka-1 HTTP/1.1\r\nHost: a\r\n\r\n');
    for (let i = 0; i < 50 && count() < 1; i++) await sleep(50);
    await sleep(2_500); // 2.5 x the 1 s header timeout, well under the 60 s keep-alive timeout
    s.write('GET /ka-2 HTTP/1.1\r\nHost: a\r\n\r\n');
    for (let i = 0; i < 50 && count() < 2; i++) await sleep(50);
    s.destroy();
    assert.equal(count(), 2, text.slice(0, 200));
    assert.ok(!text.includes(' 408 '));
  });
  it('a stalled TLS handshake is closed by --handshake-timeout', async () => {
    // A real ClientHello, then silence: the server's flight is sent, the client never finishes.
    const r = await raw(S, hello, 6_000);
    assert.ok(r.closed, 'closed by the gateway');
    assert.ok(r.text.length > 0, 'the server answered the hello');
    await gw.waitForAccessLog((e) => e.reason === 'tls_handshake_timeout' && String(e.listener).endsWith(`_${S}`));
  });
});

describe('connection limits', () => {
  it(`--max-connections ${MAX_CONNECTIONS}: the next connection is closed at once, then service resumes`, async () => {
    const held: net.Socket[] = [];
    try {
      for (let i = 0; i < MAX_CONNECTIONS; i++) {
        const s = net.connect({ host: '127.0.0.1', port: M });
        s.on('error', () => {});
        held.push(s);
        await new Promise<void>((r) => s.once('connect', () => r()));
      }
      await sleep(200);
      const before = await metric('downstream_connections_refused_total', 'reason="listener_overflow"');
      const r = await raw(M, Buffer.alloc(0), 3_000);
      assert.ok(r.closed && r.ms < 1_500, `closed after ${r.ms} ms`);
      assert.equal(await metric('downstream_connections_refused_total', 'reason="listener_overflow"'), before + 1);
    } finally {
      for (const s of held) s.destroy();
    }
    await sleep(300);
    assert.equal(status(await get({ ...tlsOpts(M, good), path: '/after-overflow' })), 200);
  });
  it('DestinationRule connectionPool: requests over the limit get 503 upstream_overflow', async () => {
    const rs = await Promise.all([0, 1, 2, 3].map(() => get({ tls: false, port: H, path: '/delay/800', headers: { host: 'hard.example.com' } })));
    const codes = rs.map(status);
    assert.ok(codes.includes(200), codes.join(','));
    assert.ok(codes.includes(503), codes.join(','));
    await gw.waitForAccessLog((e) => e.reason === 'upstream_overflow' && e.status === 503);
  });
});

describe('HTTP/2 abuse', () => {
  const ok = async (): Promise<number | string> => status(await get({ ...tlsOpts(S), path: '/still-up' }));

  /** A TLS connection that has spoken the HTTP/2 preface, for writing raw frames. */
  async function rawH2(): Promise<tls.TLSSocket> {
    const sock = tls.connect({ host: '127.0.0.1', port: S, servername: 'hard.example.com', ca: ca.certPem, ALPNProtocols: ['h2'] });
    sock.on('error', () => {});
    await new Promise<void>((r, j) => { sock.once('secureConnect', () => r()); sock.once('error', j); });
    assert.equal(sock.alpnProtocol, 'h2');
    sock.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), frame(0x4, 0, 0, Buffer.alloc(0))]));
    sock.resume(); // read and drop what the server sends
    return sock;
  }
  function frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
    const h = Buffer.alloc(9);
    h.writeUIntBE(payload.length, 0, 3);
    h[3] = type; h[4] = flags; h.writeUInt32BE(stream, 5);
    return Buffer.concat([h, payload]);
  }

  it('rapid reset: HEADERS then RST_STREAM, thousands of times, ends the session; others are served', async () => {
    const sock = await rawH2();
    let closedAfter = -1;
    sock.once('close', () => { closedAfter = sent; });
    // GET / on hard.example.com: indexed :method GET, :scheme https, :path /, literal :authority.
    const authority = Buffer.from('hard.example.com');
    const block = Buffer.concat([Buffer.from([0x82, 0x87, 0x84, 0x01, authority.length]), authority]);
    const rst = Buffer.alloc(4);
    rst.writeUInt32BE(http2.constants.NGHTTP2_CANCEL);
    let sent = 0;
    const start = Date.now();
    for (let batch = 0; batch < 100 && !sock.destroyed && closedAfter === -1; batch++) {
      const frames: Buffer[] = [];
      for (let i = 0; i < 50; i++) {
        const id = 2 * sent + 1;
        frames.push(frame(0x1, 0x5 /* END_STREAM|END_HEADERS */, id, block), frame(0x3, 0, id, rst));
        sent++;
      }
      sock.write(Buffer.concat(frames));
      await sleep(5);
    }
    for (let i = 0; i < 50 && closedAfter === -1; i++) await sleep(100);
    sock.destroy();
    assert.ok(closedAfter !== -1, `the gateway ended the session (${sent} streams sent)`);
    const guard = await metric('http2_premature_reset_closes_total', `_${S}"`);
    const t0 = Date.now();
    assert.equal(await ok(), 200);
    const servedMs = Date.now() - t0;
    assert.ok(servedMs < 5_000, `served in ${servedMs} ms`);
    assert.ok(gw.running);
    // For the report.
    console.log(`rapid reset: session closed after ${closedAfter} HEADERS+RST pairs (${Date.now() - start} ms); premature-reset closes ${guard}; a fresh client served in ${servedMs} ms`);
  });

  it('CONTINUATION flood: a header block that never ends is cut off', async () => {
    const sock = await rawH2();
    const closed = new Promise<number>((r) => { const t0 = Date.now(); sock.once('close', () => r(Date.now() - t0)); });
    // HEADERS (END_STREAM, no END_HEADERS) with `:method: GET`, then empty CONTINUATIONs forever.
    sock.write(frame(0x1, 0x1, 1, Buffer.from([0x82])));
    let sent = 0;
    for (let i = 0; i < 20_000 && !sock.destroyed; i++) {
      if (!sock.write(frame(0x9, 0, 1, Buffer.alloc(0)))) await new Promise((r) => { sock.once('drain', r); setTimeout(r, 200).unref(); });
      sent++;
    }
    const ms = await Promise.race([closed, sleep(5_000).then(() => -1)]);
    sock.destroy();
    assert.ok(ms >= 0, `gateway closed the connection (sent ${sent} CONTINUATION frames)`);
    assert.equal(await ok(), 200);
  });

  it('h2 to h1: no pseudo-headers or connection-specific headers reach the upstream', async () => {
    const client = http2.connect(`https://127.0.0.1:${S}`, { servername: 'hard.example.com', ca: ca.certPem });
    client.on('error', () => {});
    const body = await new Promise<string>((resolve, reject) => {
      const st = client.request({ ':path': '/h2h1', ':authority': 'hard.example.com', te: 'trailers' });
      const chunks: Buffer[] = [];
      st.on('data', (c: Buffer) => chunks.push(c));
      st.on('end', () => resolve(Buffer.concat(chunks).toString()));
      st.on('error', reject);
      st.end();
    });
    client.close();
    const reply = JSON.parse(body) as EchoReply;
    assert.equal(reply.httpVersion, '1.1');
    for (const name of Object.keys(reply.headers)) assert.ok(!name.startsWith(':'), name);
    for (const name of ['connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'http2-settings', 'proxy-connection']) {
      assert.equal(reply.headers[name] === undefined || (name === 'connection' && reply.headers[name] === 'keep-alive'), true, `${name}: ${String(reply.headers[name])}`);
    }
    assert.equal(reply.headers.host, 'hard.example.com');
  });
});

describe('secrets and the admin server', () => {
  it('validate warns about a world-readable key (TG5004)', async () => {
    const d = path.join(dir, 'perm');
    await mkdir(d);
    const key = path.join(d, 'open.key');
    await copyFile(server.key, key);
    await chmod(key, 0o644);
    await writeFile(path.join(d, 'gw.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: perm}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: ${server.cert}, privateKey: ${key}}
`);
    const r = await runCli(['validate', '-c', d]);
    assert.match(r.stdout + r.stderr, /TG5004/);
  });

  it('the admin server binds 127.0.0.1 unless told otherwise', async () => {
    const r = await runCli(['run', '--help']);
    assert.match(r.stdout, /--admin-address <addr>[\s\S]*?default: "127\.0\.0\.1"/);
  });

  it('no key material in logs, /config_dump, metrics or error replies', async () => {
    const outputs = [
      ...gw.logs(),
      (await gw.admin('/config_dump')).body,
      (await gw.admin('/stats/prometheus')).body,
      (await gw.admin('/server_info')).body,
      (await get({ tls: false, port: H, path: '/origination/x', headers: { host: 'hard.example.com' } }) as { body?: string }).body ?? '',
    ].join('\n');
    assert.ok(outputs.length > 1000, 'there is output to search');
    assert.ok(!outputs.includes('PRIVATE KEY'), 'no PEM key header');
    for (const pair of [server, good, ca]) {
      const lines = pair.keyPem.split('\n').filter((l) => l.length >= 60 && !l.startsWith('-----'));
      assert.ok(lines.length > 5);
      for (const l of lines.slice(1, 6)) assert.ok(!outputs.includes(l), 'key body line found in output');
    }
  });
});

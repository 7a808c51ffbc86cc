// Hostile input against a running PASSTHROUGH gateway (issue 3): random bytes, truncated hellos,
// a hello claiming 16 MB, silent and half-open connections. After each round the gateway is up,
// a good client is still served, the counters moved and the resident memory stays bounded.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { freePort } from '../helpers/ports.js';
import { REPO_ROOT, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startTcpEcho, type TcpServer } from '../helpers/upstreams.js';

const RSS_LIMIT_KB = 300 * 1024;

let dir: string;
let ca: Ca;
let leaf: KeyPair;
let upstream: TcpServer;
let gw: Gateway;
let P: number;
let hello: Buffer;

before(async () => {
  dir = await certDir();
  ca = await makeCa(dir, 'ca', '/O=hostile/CN=hostile-ca');
  leaf = await makeLeaf(dir, ca, 'good', { cn: 'good.example.com', sans: ['DNS:good.example.com'], serial: 5 });
  upstream = await startTcpEcho({ tls: { cert: leaf.cert, key: leaf.key } });
  hello = Buffer.from((await readFile(path.join(REPO_ROOT, 'test', 'fixtures', 'client-hello', 'node-sni-alpn.hex'), 'utf8')).trim(), 'hex');
  P = await freePort();
  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'all.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: pass
spec:
  servers:
  - port:
      number: ${P}
      name: tls
      protocol: TLS
    tls:
      mode: PASSTHROUGH
    hosts:
    - "*.example.com"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: good
spec:
  hosts:
  - good.example.com
  gateways:
  - pass
  tls:
  - match:
    - sniHosts:
      - good.example.com
    route:
    - destination:
        host: good.upstream.local
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: good
spec:
  hosts:
  - good.upstream.local
  location: MESH_EXTERNAL
  ports:
  - number: ${upstream.port}
    name: tls
    protocol: TLS
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
`);
  gw = await startTlsgate({
    configPaths: [cfg],
    args: ['--bind-address', '127.0.0.1', '--drain-grace', '0', '--drain-timeout', '1s', '--client-hello-timeout', '300ms', '--access-log', 'off'],
  });
});

after(async () => {
  await gw?.stop();
  await upstream?.close();
  await rm(dir, { recursive: true, force: true });
});

/** Opens a connection, writes `data` (optionally then FIN), resolves when the gateway ends it. */
function probe(data: Buffer | undefined, opts: { fin?: boolean; timeoutMs?: number } = {}): Promise<{ closed: boolean; got: Buffer; ms: number }> {
  return new Promise((resolve) => {
    const start = Date.now();
    const s = net.connect({ host: '127.0.0.1', port: P, allowHalfOpen: true });
    const chunks: Buffer[] = [];
    let size = 0;
    const t = setTimeout(() => { s.destroy(); resolve({ closed: false, got: Buffer.concat(chunks), ms: Date.now() - start }); }, opts.timeoutMs ?? 5_000);
    s.on('error', () => {});
    s.on('data', (c: Buffer) => { if (size < 4096) { chunks.push(c); size += c.length; } });
    // The gateway's FIN (or a reset) is what counts: this side is half-open capable on purpose.
    const closed = (): void => { clearTimeout(t); s.destroy(); resolve({ closed: true, got: Buffer.concat(chunks), ms: Date.now() - start }); };
    s.on('end', closed);
    s.on('close', closed);
    s.on('connect', () => {
      if (data) s.write(data);
      if (opts.fin) s.end();
    });
  });
}

/** A good client through the gateway: handshake with the upstream and an echoed line. */
function goodClient(): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: P, servername: 'good.example.com', ca: ca.certPem }, () => s.write('still here\n'));
    let got = '';
    s.setTimeout(5_000, () => s.destroy(new Error('good client timed out')));
    s.on('error', reject);
    s.on('data', (c: Buffer) => { got += c.toString(); if (got.endsWith('\n')) { s.end(); resolve(got); } });
  });
}

async function rssKb(): Promise<number> {
  const status = await readFile(`/proc/${gw.pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+)\s+kB/m.exec(status)?.[1] ?? 'NaN');
}

async function metric(name: string): Promise<number> {
  const res = await gw.admin('/stats/prometheus');
  let sum = 0;
  for (const m of res.body.matchAll(new RegExp(`^tlsgate_${name}(?:\\{[^}]*\\})? (\\S+)$`, 'gm'))) sum += Number(m[1]);
  return sum;
}

async function stillHealthy(): Promise<void> {
  assert.ok(gw.running, 'gateway exited');
  assert.equal(await goodClient(), 'still here\n');
  const rss = await rssKb();
  assert.ok(rss < RSS_LIMIT_KB, `RSS ${rss} kB`);
}

describe('hostile input on a PASSTHROUGH listener', () => {
  it('random bytes are closed (not_tls / malformed)', { timeout: 30_000 }, async () => {
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => {
      const b = randomBytes(64 + i * 80);
      if (i % 2 === 0) b[0] = 0x16; // half of them look like a handshake record at first
      return probe(b);
    }));
    for (const r of results) assert.ok(r.closed, 'a random-bytes connection stayed open');
    assert.ok(await metric('tls_inspector_tls_not_found_total') > 0);
    assert.ok(await metric('downstream_connections_refused_total') >= 50);
    await stillHealthy();
  });

  it('truncated hellos are closed: at FIN or at the ClientHello timeout', { timeout: 30_000 }, async () => {
    const cuts = [1, 3, 5, 6, 9, 40, Math.floor(hello.length / 2), hello.length - 1];
    const withFin = await Promise.all(cuts.map((n) => probe(hello.subarray(0, n), { fin: true })));
    for (const r of withFin) assert.ok(r.closed);
    const silentAfter = await Promise.all(cuts.map((n) => probe(hello.subarray(0, n))));
    for (const r of silentAfter) {
      assert.ok(r.closed);
      assert.ok(r.ms >= 250, `closed after ${r.ms} ms, before the ClientHello timeout`);
    }
    assert.ok(await metric('downstream_connections_refused_total') >= 66);
    await stillHealthy();
  });

  it('a hello claiming 16 MB is refused without buffering it', { timeout: 30_000 }, async () => {
    // One record of 16 KiB whose handshake header claims 0xFFFFFF bytes, followed by more records.
    const head = Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff]);
    const body = Buffer.concat([head, randomBytes(0x4000 - 4), ...Array.from({ length: 16 }, () => Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00]), randomBytes(0x4000)]))]);
    const results = await Promise.all(Array.from({ length: 10 }, () => probe(body)));
    for (const r of results) {
      assert.ok(r.closed);
      // A handshake_failure alert (21 03 03 00 02 02 28) comes back before the close.
      assert.equal(r.got[0], 0x15);
    }
    assert.ok(await metric('tls_inspector_client_hello_too_large_total') >= 10);
    await stillHealthy();
  });

  it('silent connections are closed at the ClientHello timeout', { timeout: 30_000 }, async () => {
    const results = await Promise.all(Array.from({ length: 30 }, () => probe(undefined)));
    for (const r of results) {
      assert.ok(r.closed);
      assert.ok(r.ms >= 250 && r.ms < 4_000, `closed after ${r.ms} ms`);
    }
    await stillHealthy();
  });

  it('200 half-open connections are all closed and the gateway keeps serving', { timeout: 60_000 }, async () => {
    const results = await Promise.all(Array.from({ length: 200 }, (_, i) => probe(hello.subarray(0, 4 + (i % 50)), { fin: i % 2 === 0, timeoutMs: 10_000 })));
    assert.equal(results.filter((r) => !r.closed).length, 0);
    await stillHealthy();
    const active = await gw.admin('/stats/prometheus');
    assert.equal(active.status, 200);
  });
});

// Upstream and environment faults (issue 7): each gives its documented status and access-log
// reason, and the gateway keeps serving. One plaintext HTTP port routes by path prefix to one
// faulty upstream per case; every upstream is a real peer on 127.0.0.1.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, type Ca } from '../helpers/certs.js';
import { freePort, sleep } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';

let dir: string;
let cfgDir: string;
let ca: Ca;
let gw: Gateway;
let P: number;
const servers: net.Server[] = [];
const echoes: EchoServer[] = [];

function tcpServer(onConn: (s: net.Socket) => void): Promise<number> {
  const srv = net.createServer((s) => { s.on('error', () => {}); onConn(s); });
  servers.push(srv);
  return new Promise((r) => srv.listen(0, '127.0.0.1', () => r((srv.address() as net.AddressInfo).port)));
}

interface Case { prefix: string; host: string; port: number; tls?: string; timeout?: string; resolution?: 'STATIC' | 'DNS' }

before(async () => {
  dir = await certDir('tlsgate-faults-');
  ca = await makeCa(dir, 'ca', '/O=faults/CN=faults-ca');
  const expired = await makeLeaf(dir, ca, 'expired', { cn: 'up.example.com', sans: ['DNS:up.example.com'], serial: 2, expired: true });
  const wrongName = await makeLeaf(dir, ca, 'wrong', { cn: 'other.example.com', sans: ['DNS:other.example.com'], serial: 3 });
  const good = await makeLeaf(dir, ca, 'good', { cn: 'up.example.com', sans: ['DNS:up.example.com'], serial: 4 });

  const refused = await freePort(); // nothing listens here
  // Headers and part of a 100 000-byte body, then a reset.
  const reset = await tcpServer((s) => s.once('data', () => {
    s.write('HTTP/1.1 200 OK\r\ncontent-length: 100000\r\ncontent-type: text/plain\r\n\r\n' + 'x'.repeat(1000));
    setTimeout(() => s.resetAndDestroy(), 100);
  }));
  const stall = await tcpServer((s) => { setTimeout(() => s.destroy(), 10_000).unref(); });
  const garbage = await tcpServer((s) => { s.write(randomBytes(512)); setTimeout(() => s.destroy(), 500); });
  for (const kp of [expired, wrongName, good]) echoes.push(await startEchoServer({ tls: { cert: kp.cert, key: kp.key }, name: kp.cert }));
  const echo = await startEchoServer({ name: 'plain' });
  echoes.push(echo);
  const tlsTo = (sni: string) => `{mode: SIMPLE, caCertificates: ${ca.cert}, sni: ${sni}}`;
  const cases: Case[] = [
    { prefix: '/refused', host: 'refused.up.local', port: refused },
    { prefix: '/reset', host: 'reset.up.local', port: reset },
    { prefix: '/stall', host: 'stall.up.local', port: stall, timeout: '500ms' },
    { prefix: '/garbage', host: 'garbage.up.local', port: garbage, tls: tlsTo('up.example.com') },
    { prefix: '/expired', host: 'expired.up.local', port: echoes[0]!.port, tls: tlsTo('up.example.com') },
    { prefix: '/wrong-name', host: 'wrong.up.local', port: echoes[1]!.port, tls: tlsTo('up.example.com') },
    { prefix: '/tls-ok', host: 'good.up.local', port: echoes[2]!.port, tls: tlsTo('up.example.com') },
    { prefix: '/dns', host: 'does-not-exist.invalid', port: echo.port, resolution: 'DNS' },
    { prefix: '/', host: 'plain.up.local', port: echo.port },
  ];
  P = await freePort();
  cfgDir = path.join(dir, 'config');
  await mkdir(cfgDir);
  const docs: string[] = [`apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: faults}
spec:
  servers:
  - port: {number: ${P}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: faults}
spec:
  hosts: ["*"]
  gateways: [faults]
  http:
${cases.map((c) => `  - match: [{uri: {prefix: ${c.prefix}}}]
    route: [{destination: {host: ${c.host}}}]${c.timeout ? `\n    timeout: ${c.timeout}` : ''}`).join('\n')}`];
  for (const [i, c] of cases.entries()) {
    docs.push(`apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se${i}}
spec:
  hosts: [${c.host}]
  location: MESH_EXTERNAL
  ports: [{number: ${c.port}, name: http, protocol: HTTP}]
  resolution: ${c.resolution ?? 'STATIC'}
${c.resolution === 'DNS' ? '' : '  endpoints: [{address: 127.0.0.1}]'}`);
    if (c.tls) docs.push(`apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr${i}}
spec:
  host: ${c.host}
  trafficPolicy:
    tls: ${c.tls}`);
  }
  await writeFile(path.join(cfgDir, 'all.yaml'), docs.join('\n---\n') + '\n');
  gw = await startTlsgate({ configPaths: [cfgDir], args: ['--drain-timeout', '1s'] });
});

after(async () => {
  await gw?.stop();
  for (const s of servers) await new Promise<void>((r) => s.close(() => r()));
  for (const e of echoes) await e.close();
  await rm(dir, { recursive: true, force: true });
});

function get(p: string, timeoutMs = 8_000): Promise<{ status: number; body: string; error?: string }> {
  return new Promise((resolve) => {
    let status = 0;
    const chunks: Buffer[] = [];
    const req = http.get({ host: '127.0.0.1', port: P, path: p, agent: false, timeout: timeoutMs, headers: { host: 'faults.example.com' } }, (res) => {
      status = res.statusCode ?? 0;
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', (e) => resolve({ status, body: Buffer.concat(chunks).toString(), error: e.message }));
      res.on('aborted', () => resolve({ status, body: Buffer.concat(chunks).toString(), error: 'aborted' }));
      res.on('end', () => resolve({ status, body: Buffer.concat(chunks).toString() }));
    });
    req.on('timeout', () => req.destroy(new Error('client timeout')));
    req.on('error', (e) => resolve({ status, body: Buffer.concat(chunks).toString(), error: e.message }));
  });
}

async function stillServing(): Promise<void> {
  const r = await get('/healthy');
  assert.equal(r.status, 200);
  assert.ok(gw.running);
}

const expectations: Array<[string, string, number, string | RegExp]> = [
  ['refuses the connection', '/refused', 503, 'upstream_connect_failed'],
  ['stalls past the route timeout', '/stall', 504, 'upstream_timeout'],
  ['answers a TLS port with garbage', '/garbage', 503, 'upstream_tls_failed'],
  ['presents an expired certificate', '/expired', 503, 'upstream_tls_failed'],
  ['presents a certificate for another name', '/wrong-name', 503, 'upstream_tls_failed'],
  ['has a DNS name that does not resolve', '/dns', 503, /^(no_healthy_upstream|upstream_connect_failed)$/],
];

describe('upstream faults give the documented status and reason', () => {
  it('the control: a good TLS upstream is served', async () => {
    assert.equal((await get('/tls-ok')).status, 200);
  });
  for (const [name, p, code, reason] of expectations) {
    it(`upstream ${name}: ${code}`, async () => {
      const t0 = Date.now();
      const r = await get(`${p}/x`);
      assert.equal(r.status, code, JSON.stringify(r));
      const e = await gw.waitForAccessLog((x) => x.path === `${p}/x`);
      if (typeof reason === 'string') assert.equal(e.reason, reason);
      else assert.match(String(e.reason), reason);
      assert.ok(Date.now() - t0 < 8_000);
      await stillServing();
    });
  }
  it('upstream resets mid-body: the client sees an incomplete response, reason upstream_reset', async () => {
    const r = await get('/reset/x');
    assert.equal(r.status, 200, 'headers were already sent');
    assert.ok(r.error !== undefined || r.body.length < 100_000, `got ${r.body.length} bytes, error ${r.error}`);
    assert.ok(r.body.length < 100_000);
    const e = await gw.waitForAccessLog((x) => x.path === '/reset/x');
    assert.equal(e.reason, 'upstream_reset');
    await stillServing();
  });
});

describe('the config directory removed while running', () => {
  it('keeps serving the last good config and /config_dump shows the failed apply', async () => {
    await rm(cfgDir, { recursive: true, force: true });
    let last: { ok?: boolean; message?: string } | undefined;
    for (let i = 0; i < 60; i++) {
      await sleep(200);
      const dump = JSON.parse((await gw.admin('/config_dump')).body) as { lastApply?: { ok?: boolean; message?: string } };
      last = dump.lastApply;
      if (last?.ok === false) break;
    }
    assert.equal(last?.ok, false, JSON.stringify(last));
    await stillServing();
    assert.equal((await get('/tls-ok')).status, 200);
    // For the report.
    console.log(`config dir removed: lastApply=${JSON.stringify(last)}`);
  });
});



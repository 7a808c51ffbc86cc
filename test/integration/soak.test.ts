// Soak (issue 7): a bounded mixed load, termination (HTTPS keep-alive), passthrough (a new TLS
// connection per exchange) and origination (HTTP in, TLS to the upstream), for SOAK_SECONDS
// (default 40). Meanwhile the config is edited every 5 s and the serving certificate is replaced
// on disk every 15 s, while hostile clients (1-byte drip, silent) keep connections open.
// Asserted: zero failed exchanges, no file-descriptor growth once the load has stopped, bounded
// RSS, and good clients served well under a generous bound throughout. The figures are printed
// (docs/security.md records them).
//   SOAK_SECONDS=300 node --test dist/test/integration/soak.test.js
import assert from 'node:assert/strict';
import { copyFile, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca } from '../helpers/certs.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { REPO_ROOT, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, startTcpEcho, type EchoServer, type TcpServer } from '../helpers/upstreams.js';

const SECONDS = Number(process.env.SOAK_SECONDS ?? '') > 0 ? Number(process.env.SOAK_SECONDS) : 40;
const RELOAD_EVERY_MS = 5_000;
const ROTATE_EVERY_MS = 15_000;
const WORKERS_PER_KIND = 3;
const HOSTILE_DRIP = 20;
const HOSTILE_SILENT = 30;

let dir: string;
let cfgDir: string;
let ca: Ca;
let gw: Gateway;
let echo: EchoServer;
let origin: EchoServer;
let passUp: TcpServer;
let T: number;
let P: number;
let O: number;
let hello: Buffer;

function config(gen: number): string {
  const cert = path.join(dir, 'serving', 'tls.crt');
  const key = path.join(dir, 'serving', 'tls.key');
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: soak}
spec:
  servers:
  - port: {number: ${T}, name: https, protocol: HTTPS}
    hosts: [term.example.com]
    tls: {mode: SIMPLE, serverCertificate: ${cert}, privateKey: ${key}}
  - port: {number: ${P}, name: tls, protocol: TLS}
    hosts: [pass.example.com]
    tls: {mode: PASSTHROUGH}
  - port: {number: ${O}, name: http, protocol: HTTP}
    hosts: [orig.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: term}
spec:
  hosts: [term.example.com]
  gateways: [soak]
  http:
  - route: [{destination: {host: echo.soak.local}}]
    headers: {response: {set: {x-generation: "${gen}"}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: [pass.example.com]
  gateways: [soak]
  tls:
  - match: [{sniHosts: [pass.example.com]}]
    route: [{destination: {host: pass.soak.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orig}
spec:
  hosts: [orig.example.com]
  gateways: [soak]
  http:
  - route: [{destination: {host: origin.soak.local}}]
    headers: {request: {set: {x-generation: "${gen}"}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.soak.local]
  location: MESH_EXTERNAL
  ports: [{number: ${echo.port}, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pass}
spec:
  hosts: [pass.soak.local]
  location: MESH_EXTERNAL
  ports: [{number: ${passUp.port}, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: origin}
spec:
  hosts: [origin.soak.local]
  location: MESH_EXTERNAL
  ports: [{number: ${origin.port}, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: origin}
spec:
  host: origin.soak.local
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ${ca.cert}, sni: up.example.com}
`;
}

/** Replaces the serving certificate and key on disk (each file by an atomic rename). */
async function rotate(n: number): Promise<void> {
  const d = path.join(dir, `rot-${n}`);
  const leaf = await makeLeaf(d, ca, 'tls', { cn: 'term.example.com', sans: ['DNS:term.example.com'], serial: 100 + n });
  const serving = path.join(dir, 'serving');
  await copyFile(leaf.key, path.join(serving, '.tls.key.new'));
  await copyFile(leaf.cert, path.join(serving, '.tls.crt.new'));
  await rename(path.join(serving, '.tls.key.new'), path.join(serving, 'tls.key'));
  await rename(path.join(serving, '.tls.crt.new'), path.join(serving, 'tls.crt'));
}

before(async () => {
  dir = await certDir('tlsgate-soak-');
  ca = await makeCa(dir, 'ca', '/O=soak/CN=soak-ca');
  const up = await makeLeaf(dir, ca, 'up', { cn: 'up.example.com', sans: ['DNS:up.example.com'], serial: 2 });
  const pass = await makeLeaf(dir, ca, 'pass', { cn: 'pass.example.com', sans: ['DNS:pass.example.com'], serial: 3 });
  await mkdir(path.join(dir, 'serving'));
  await rotate(0);
  hello = Buffer.from((await readFile(path.join(REPO_ROOT, 'test', 'fixtures', 'client-hello', 'node-sni-alpn.hex'), 'utf8')).trim(), 'hex');
  echo = await startEchoServer({ name: 'term' });
  origin = await startEchoServer({ name: 'origin', tls: { cert: up.cert, key: up.key } });
  passUp = await startTcpEcho({ tls: { cert: pass.cert, key: pass.key } });
  [T, P, O] = (await freePorts(3)) as [number, number, number];
  cfgDir = path.join(dir, 'config');
  await mkdir(cfgDir);
  await writeFile(path.join(cfgDir, 'soak.yaml'), config(0));
  gw = await startTlsgate({ configPaths: [cfgDir], args: ['--drain-timeout', '1s', '--access-log', 'off', '--client-hello-timeout', '10s'] });
});

after(async () => {
  await gw?.stop();
  await echo?.close();
  await origin?.close();
  await passUp?.close();
  await rm(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ measurement

async function fdCount(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length;
}

async function rssMb(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+) kB/.exec(status);
  return m ? Number(m[1]) / 1024 : 0;
}

interface Stats { ok: number; failed: number; maxMs: number; samples: number[]; errors: string[] }
const newStats = (): Stats => ({ ok: 0, failed: 0, maxMs: 0, samples: [], errors: [] });

function record(s: Stats, t0: number, err?: string): void {
  const ms = Date.now() - t0;
  if (err !== undefined) {
    s.failed++;
    if (s.errors.length < 20) s.errors.push(err);
    return;
  }
  s.ok++;
  s.maxMs = Math.max(s.maxMs, ms);
  if (s.samples.length < 100_000) s.samples.push(ms);
}

function p99(s: Stats): number {
  const a = [...s.samples].sort((x, y) => x - y);
  return a[Math.floor(a.length * 0.99)] ?? 0;
}

// ------------------------------------------------------------------ clients

/** Closes of idle keep-alive connections raced by a request on them (RFC 9112 9.3.1), retried once. */
let staleRetries = 0;

/**
 * An idempotent GET that fails on a reused keep-alive connection before any response byte is
 * retried once on a fresh connection, as HTTP clients do: a reload closes idle connections, and a
 * request already on the wire to such a connection is the inherent HTTP/1.1 race. Counted.
 */
async function withStaleRetry(once: () => Promise<void>): Promise<void> {
  try {
    await once();
  } catch (e) {
    if (!(e as { stale?: boolean }).stale) throw e;
    staleRetries++;
    await once();
  }
}

function staleError(req: http.ClientRequest, e: Error, gotResponse: boolean): Error {
  if (req.reusedSocket && !gotResponse && /ECONNRESET|socket hang up/.test(e.message)) Object.assign(e, { stale: true });
  return e;
}

function httpsGet(agent: https.Agent): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = false;
    const req = https.get({ host: '127.0.0.1', port: T, path: '/soak', agent, servername: 'term.example.com', ca: ca.certPem,
      headers: { host: 'term.example.com' }, timeout: 10_000 }, (res) => {
      got = true;
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`status ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (e) => reject(staleError(req, e, got)));
  });
}

function httpGet(agent: http.Agent): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = false;
    const req = http.get({ host: '127.0.0.1', port: O, path: '/soak', agent, headers: { host: 'orig.example.com' }, timeout: 10_000 }, (res) => {
      got = true;
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`status ${res.statusCode}`));
        const body = JSON.parse(Buffer.concat(chunks).toString()) as { tlsVersion: string | null };
        return body.tlsVersion ? resolve() : reject(new Error('origination was not TLS'));
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (e) => reject(staleError(req, e, got)));
  });
}

function passthrough(): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: P, servername: 'pass.example.com', ca: ca.certPem });
    const t = setTimeout(() => { s.destroy(); reject(new Error('timeout')); }, 10_000);
    let got = '';
    s.on('error', (e) => { clearTimeout(t); reject(e); });
    s.on('secureConnect', () => s.write('soak-ping'));
    s.on('data', (d: Buffer) => {
      got += d.toString();
      if (got === 'soak-ping') { clearTimeout(t); s.end(); resolve(); }
    });
  });
}

/** Keeps `n` hostile connections open: dripping a ClientHello a byte at a time, or silent. */
function hostile(kind: 'drip' | 'silent', n: number, stopAt: () => boolean): { opened: () => number; stop: () => void } {
  const open = new Set<net.Socket>();
  let opened = 0;
  const ports = [T, P, O];
  const spawn = (): void => {
    if (stopAt()) return;
    const s = net.connect({ host: '127.0.0.1', port: ports[opened % ports.length]! });
    opened++;
    open.add(s);
    s.on('error', () => {});
    s.resume(); // read what the gateway sends (a 408 or an alert), so its close is seen
    let i = 0;
    const iv = kind === 'drip' ? setInterval(() => { if (i < hello.length && !s.destroyed) s.write(hello.subarray(i, ++i)); }, 250) : undefined;
    s.once('close', () => { clearInterval(iv); open.delete(s); setTimeout(spawn, 50); });
  };
  for (let i = 0; i < n; i++) spawn();
  return { opened: () => opened, stop: () => { for (const s of open) s.destroy(); } };
}

test(`soak: ${SECONDS} s of mixed load with reloads every ${RELOAD_EVERY_MS / 1000} s, certificate rotations and hostile clients`, { timeout: (SECONDS + 60) * 1000 }, async () => {
  // Warm-up, then the baseline.
  const termAgent = new https.Agent({ keepAlive: true, maxSockets: WORKERS_PER_KIND });
  const origAgent = new http.Agent({ keepAlive: true, maxSockets: WORKERS_PER_KIND });
  for (let i = 0; i < 20; i++) { await httpsGet(termAgent); await httpGet(origAgent); await passthrough(); }
  termAgent.destroy();
  origAgent.destroy();
  await sleep(500);
  const fd0 = await fdCount(gw.pid);
  const rss0 = await rssMb(gw.pid);

  const stats = { termination: newStats(), passthrough: newStats(), origination: newStats() };
  const end = Date.now() + SECONDS * 1000;
  const stopped = (): boolean => Date.now() >= end;
  const tA = new https.Agent({ keepAlive: true, maxSockets: WORKERS_PER_KIND });
  const oA = new http.Agent({ keepAlive: true, maxSockets: WORKERS_PER_KIND });
  const loop = async (s: Stats, once: () => Promise<void>): Promise<void> => {
    while (!stopped()) {
      const t0 = Date.now();
      try { await once(); record(s, t0); } catch (e) { record(s, t0, (e as Error).message); }
    }
  };
  const drip = hostile('drip', HOSTILE_DRIP, stopped);
  const silent = hostile('silent', HOSTILE_SILENT, stopped);
  let reloads = 0;
  let rotations = 0;
  let rssMax = rss0;
  const control = (async () => {
    let nextReload = Date.now() + RELOAD_EVERY_MS;
    let nextRotate = Date.now() + ROTATE_EVERY_MS;
    while (!stopped()) {
      await sleep(250);
      rssMax = Math.max(rssMax, await rssMb(gw.pid));
      if (Date.now() >= nextReload) {
        reloads++;
        // Atomic replace (write, then rename), as editors and ConfigMap updates do.
        await writeFile(path.join(cfgDir, '.soak.yaml.tmp'), config(reloads));
        await rename(path.join(cfgDir, '.soak.yaml.tmp'), path.join(cfgDir, 'soak.yaml'));
        nextReload += RELOAD_EVERY_MS;
      }
      if (Date.now() >= nextRotate) {
        rotations++;
        await rotate(rotations);
        nextRotate += ROTATE_EVERY_MS;
      }
    }
  })();
  const workers: Promise<void>[] = [];
  for (let i = 0; i < WORKERS_PER_KIND; i++) {
    workers.push(loop(stats.termination, () => withStaleRetry(() => httpsGet(tA))));
    workers.push(loop(stats.passthrough, passthrough));
    workers.push(loop(stats.origination, () => withStaleRetry(() => httpGet(oA))));
  }
  await Promise.all([...workers, control]);
  drip.stop();
  silent.stop();
  tA.destroy();
  oA.destroy();

  // Connections closed: the gateway should be back to its baseline.
  let fd1 = await fdCount(gw.pid);
  for (let i = 0; i < 40 && fd1 > fd0 + 10; i++) { await sleep(250); fd1 = await fdCount(gw.pid); }
  const rss1 = await rssMb(gw.pid);
  // The last rotated certificate is the one served.
  const servedSerial = async (): Promise<number> => new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port: T, servername: 'term.example.com', ca: ca.certPem }, () => {
      const serial = parseInt(s.getPeerCertificate().serialNumber, 16);
      s.destroy();
      resolve(serial);
    });
    s.on('error', () => resolve(-1));
  });
  let serial = await servedSerial();
  for (let i = 0; i < 20 && serial !== 100 + rotations; i++) { await sleep(250); serial = await servedSerial(); }
  const dump = JSON.parse((await gw.admin('/config_dump')).body) as { generation?: number; lastApply?: { ok: boolean; generation: number; message: string } };
  const summary = {
    seconds: SECONDS, reloads, rotations, servedSerial: serial, staleKeepAliveRetries: staleRetries, hostileOpened: { drip: drip.opened(), silent: silent.opened() },
    generation: dump.lastApply?.generation,
    termination: { ok: stats.termination.ok, failed: stats.termination.failed, p99Ms: p99(stats.termination), maxMs: stats.termination.maxMs },
    passthrough: { ok: stats.passthrough.ok, failed: stats.passthrough.failed, p99Ms: p99(stats.passthrough), maxMs: stats.passthrough.maxMs },
    origination: { ok: stats.origination.ok, failed: stats.origination.failed, p99Ms: p99(stats.origination), maxMs: stats.origination.maxMs },
    fd: { start: fd0, end: fd1 }, rssMb: { start: Math.round(rss0), max: Math.round(rssMax), end: Math.round(rss1) },
    errors: [...stats.termination.errors, ...stats.passthrough.errors, ...stats.origination.errors].slice(0, 10),
  };
  console.log(`soak: ${JSON.stringify(summary)}`);

  for (const [kind, s] of Object.entries(stats)) {
    assert.equal(s.failed, 0, `${kind}: ${s.failed} failed (${s.errors.join('; ')})`);
    assert.ok(s.ok > 10, `${kind}: ${s.ok} served`);
    assert.ok(s.maxMs < 5_000, `${kind}: slowest exchange ${s.maxMs} ms`);
  }
  assert.ok(reloads >= Math.floor(SECONDS * 1000 / RELOAD_EVERY_MS) - 1, `${reloads} reloads`);
  assert.ok((dump.lastApply?.generation ?? 0) > 1, 'the reloads were applied');
  assert.equal(serial, 100 + rotations, 'the last rotated certificate is served');
  assert.ok(fd1 <= fd0 + 10, `fds ${fd0} -> ${fd1}`);
  assert.ok(rss1 < rss0 + 150 && rssMax < 600, `RSS ${rss0} -> max ${rssMax} -> ${rss1} MB`);
  assert.ok(gw.running);
});

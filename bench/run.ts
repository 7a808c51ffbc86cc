// Passthrough benchmark (issue 3): tlsgate PASSTHROUGH vs nginx `stream` + ssl_preread vs haproxy
// `mode tcp` + req.ssl_sni, all in front of one nginx TLS backend on loopback, measured in the
// same run, alternating A B C per round. Prints medians and ratios vs nginx and writes
// bench/results/<date>.md. Not a test: nothing here gates on a number.
//
//   npm run bench              3 rounds, 5 s per figure
//   npm run bench -- --quick   1 round, 2 s per figure
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile, open } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf } from '../test/helpers/certs.js';
import { run, stopChild, trackChild } from '../test/helpers/exec.js';
import { startNginx, type Nginx } from '../test/helpers/nginx.js';
import { freePorts, waitForPort } from '../test/helpers/ports.js';
import { REPO_ROOT, startTlsgate, type Gateway } from '../test/helpers/tlsgate.js';

const quick = process.argv.includes('--quick');
const ROUNDS = quick ? 1 : 3;
const SECONDS = quick ? 2 : 5;
const CONCURRENCY = 16;
const BIG_BYTES = 64 * 1024 * 1024;
const HOST = 'bench.example.com';

interface Proxy {
  name: string;
  port: number;
  pid: number;
  stop(): Promise<unknown>;
}

interface Figures {
  connsPerSec: number;
  reqsPerSec: number;
  mbPerSec: number;
}

/** New TLS connections per second: handshake + one small request + close, CONCURRENCY loops. */
async function newConnections(port: number, seconds: number): Promise<number> {
  const deadline = Date.now() + seconds * 1000;
  let done = 0;
  const one = (): Promise<void> => new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: HOST, rejectUnauthorized: false });
    let got = '';
    const t = setTimeout(() => s.destroy(), 5_000);
    s.on('error', () => {});
    s.on('secureConnect', () => s.write(`GET /small HTTP/1.1\r\nHost: ${HOST}\r\nConnection: close\r\n\r\n`));
    s.on('data', (c: Buffer) => { got += c.toString('latin1'); });
    s.on('close', () => {
      clearTimeout(t);
      if (got.startsWith('HTTP/1.1 200')) done++;
      resolve();
    });
  });
  const loop = async (): Promise<void> => { while (Date.now() < deadline) await one(); };
  const start = Date.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, loop));
  return done / ((Date.now() - start) / 1000);
}

/** Keep-alive requests per second through the tunnel: CONCURRENCY connections, sequential requests each. */
async function keepAlive(port: number, seconds: number): Promise<number> {
  const deadline = Date.now() + seconds * 1000;
  let done = 0;
  const conn = (): Promise<void> => new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: HOST, rejectUnauthorized: false });
    const req = Buffer.from(`GET /small HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`);
    let buf = '';
    const t = setTimeout(() => s.destroy(), (seconds + 10) * 1000);
    s.on('error', () => {});
    s.on('secureConnect', () => s.write(req));
    s.on('data', (c: Buffer) => {
      buf += c.toString('latin1');
      // Each response ends with the 3-byte body "ok\n".
      let i: number;
      while ((i = buf.indexOf('\r\n\r\nok\n')) >= 0) {
        buf = buf.slice(i + 7);
        done++;
        if (Date.now() >= deadline) { s.end(); return; }
        s.write(req);
      }
    });
    s.on('close', () => { clearTimeout(t); resolve(); });
  });
  const start = Date.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, conn));
  return done / ((Date.now() - start) / 1000);
}

/** Bulk download of a 64 MiB file with curl through the tunnel, MB/s (10^6 bytes). */
async function bulk(port: number): Promise<number> {
  const res = await run('curl', ['-sk', '--resolve', `${HOST}:${port}:127.0.0.1`, `https://${HOST}:${port}/big`, '-o', '/dev/null',
    '-w', '%{size_download} %{speed_download}'], { timeoutMs: 120_000 });
  const [size, speed] = res.stdout.trim().split(' ').map(Number);
  if (res.code !== 0 || size !== BIG_BYTES) throw new Error(`bulk download through ${port} failed: code ${res.code}, ${size} bytes, ${res.stderr}`);
  return (speed ?? 0) / 1e6;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function startHaproxy(dir: string, port: number, backend: number): Promise<Proxy> {
  const cfg = path.join(dir, 'haproxy.cfg');
  await writeFile(cfg, [
    'global',
    '  nbthread 1',
    '  maxconn 4096',
    'defaults',
    '  mode tcp',
    '  timeout connect 5s',
    '  timeout client 60s',
    '  timeout server 60s',
    'frontend tls_in',
    `  bind 127.0.0.1:${port}`,
    '  tcp-request inspect-delay 5s',
    '  tcp-request content accept if { req.ssl_hello_type 1 }',
    `  use_backend bench if { req.ssl_sni -i ${HOST} }`,
    'backend bench',
    `  server b1 127.0.0.1:${backend}`,
    '',
  ].join('\n'));
  const child: ChildProcess = spawn('haproxy', ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  child.stderr?.resume();
  await waitForPort(port, 10_000);
  return { name: 'haproxy', port, pid: child.pid ?? -1, stop: () => stopChild(child, 'SIGTERM', 5_000) };
}

async function main(): Promise<void> {
  for (const tool of ['/usr/sbin/nginx', '/usr/sbin/haproxy']) if (!existsSync(tool)) throw new Error(`${tool} is needed (apt-get install nginx libnginx-mod-stream haproxy)`);
  const dir = await certDir('tlsgate-bench-');
  const stops: (() => Promise<unknown>)[] = [];
  try {
    const ca = await makeCa(dir, 'bench-ca', '/O=bench/CN=bench-ca', { ec: true });
    const leaf = await makeLeaf(dir, ca, 'bench', { cn: HOST, sans: [`DNS:${HOST}`], serial: 1, ec: true });
    const big = path.join(dir, 'big.bin');
    const fh = await open(big, 'w');
    await fh.truncate(BIG_BYTES);
    await fh.close();
    const [backendPort, tgPort, nsPort, hpPort] = await freePorts(4) as [number, number, number, number];

    const backend: Nginx = await startNginx({
      http: [
        'server {',
        `  listen 127.0.0.1:${backendPort} ssl;`,
        `  ssl_certificate ${JSON.stringify(leaf.cert)};`,
        `  ssl_certificate_key ${JSON.stringify(leaf.key)};`,
        '  ssl_protocols TLSv1.2 TLSv1.3;',
        '  keepalive_requests 1000000;',
        '  access_log off;',
        `  location = /big { alias ${JSON.stringify(big)}; }`,
        "  location /small { default_type text/plain; return 200 'ok\\n'; }",
        '}',
      ].join('\n'),
    });
    stops.push(() => backend.stop());

    const cfg = path.join(dir, 'tlsgate');
    await mkdir(cfg);
    await writeFile(path.join(cfg, 'bench.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench}
spec:
  servers:
  - port: {number: ${tgPort}, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: ["${HOST}"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench}
spec:
  hosts: ["${HOST}"]
  gateways: [bench]
  tls:
  - match: [{sniHosts: ["${HOST}"]}]
    route: [{destination: {host: backend.bench.local}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend}
spec:
  hosts: [backend.bench.local]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tls: ${backendPort}}}]
`);
    const gw: Gateway = await startTlsgate({ configPaths: [cfg], cwd: REPO_ROOT, args: ['--bind-address', '127.0.0.1', '--drain-grace', '0', '--drain-timeout', '1s', '--access-log', 'off', '--log-level', 'warn'] });
    stops.push(() => gw.stop());
    const streamNginx = await startNginx({
      stream: [
        `map $ssl_preread_server_name $bench_upstream { ${HOST} bench_backend; default bench_backend_none; }`,
        `upstream bench_backend { server 127.0.0.1:${backendPort}; }`,
        'upstream bench_backend_none { server 127.0.0.1:1; }',
        `server { listen 127.0.0.1:${nsPort}; ssl_preread on; proxy_pass $bench_upstream; }`,
      ].join('\n'),
    });
    stops.push(() => streamNginx.stop());
    const haproxy = await startHaproxy(dir, hpPort, backendPort);
    stops.push(() => haproxy.stop());

    const proxies: Proxy[] = [
      { name: 'tlsgate', port: tgPort, pid: gw.pid, stop: () => gw.stop() },
      { name: 'nginx', port: nsPort, pid: streamNginx.pid, stop: () => streamNginx.stop() },
      haproxy,
    ];
    const samples = new Map<string, Figures[]>(proxies.map((p) => [p.name, []]));
    // Warm-up: one of each through every proxy (JIT, session caches of the backend).
    for (const p of proxies) { await newConnections(p.port, 0.3); await bulk(p.port); }
    for (let r = 0; r < ROUNDS; r++) {
      for (const p of proxies) {
        const f: Figures = {
          connsPerSec: await newConnections(p.port, SECONDS),
          reqsPerSec: await keepAlive(p.port, SECONDS),
          mbPerSec: await bulk(p.port),
        };
        samples.get(p.name)!.push(f);
        process.stderr.write(`round ${r + 1} ${p.name}: ${f.connsPerSec.toFixed(0)} conn/s, ${f.reqsPerSec.toFixed(0)} req/s, ${f.mbPerSec.toFixed(0)} MB/s\n`);
      }
    }
    const med = (name: string, k: keyof Figures) => median(samples.get(name)!.map((f) => f[k]));
    const rows: string[] = [
      '| proxy | new TLS conn/s | ratio | keep-alive req/s | ratio | bulk MB/s | ratio |',
      '|---|---:|---:|---:|---:|---:|---:|',
    ];
    for (const p of proxies) {
      const cells = (['connsPerSec', 'reqsPerSec', 'mbPerSec'] as const).map((k) => {
        const v = med(p.name, k);
        return `${v.toFixed(k === 'mbPerSec' ? 0 : 0)} | ${(v / med('nginx', k)).toFixed(2)}`;
      });
      rows.push(`| ${p.name} | ${cells.join(' | ')} |`);
    }
    const header = [
      `# Passthrough benchmark, ${new Date().toISOString()}`,
      '',
      `${quick ? 'Quick mode: 1 round' : `${ROUNDS} rounds`}, ${SECONDS} s per figure, concurrency ${CONCURRENCY}, alternating proxies each round; medians; ratio = proxy / nginx (higher is better).`,
      `Loopback, one nginx TLS backend (ECDSA P-256, TLS 1.3), ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), node ${process.version}, load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}.`,
      'Proxies: tlsgate PASSTHROUGH (access log off); nginx `stream` with `ssl_preread on` + map (one process); haproxy `mode tcp` + `req.ssl_sni` (nbthread 1).',
      'Client: Node tls.connect (new connection + one small request, and keep-alive), curl for a 64 MiB download. Client, proxies and backend share the machine.',
      '',
    ];
    const table = [...header, ...rows, ''].join('\n');
    process.stdout.write(table);
    const outDir = path.join(REPO_ROOT, 'bench', 'results');
    await mkdir(outDir, { recursive: true });
    const file = path.join(outDir, `${new Date().toISOString().slice(0, 10)}${quick ? '-quick' : ''}.md`);
    await writeFile(file, table);
    process.stdout.write(`written to ${path.relative(REPO_ROOT, file)}\n`);
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => {});
    await rm(dir, { recursive: true, force: true });
  }
}

main().then(() => process.exit(0), (e: Error) => {
  process.stderr.write(`bench failed: ${e.stack ?? e.message}\n`);
  process.exit(1);
});

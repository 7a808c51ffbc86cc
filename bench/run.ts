// Side-by-side benchmark (issues 3, 4 and 8): tlsgate against nginx and haproxy on every TLS path
// tlsgate serves, in one run, on loopback, with the same certificates, the same upstreams and the
// same worker count. Each round measures every scenario for every proxy in turn, and the order
// of the proxies turns by one each round (A B C, B C A, C A B, …) so that no proxy always goes
// first; the table shows medians over rounds, each round's ratio to nginx, latency percentiles where the load tool gives them, CPU
// time the proxy spent per operation (from /proc) and the ratio to nginx. Results go to
// bench/results/<date>[-quick].md. Not a test: nothing here gates on a number.
//
//   npm run bench                          5 rounds, 5 s per figure
//   npm run bench -- --quick               1 round, 2 s per figure (under 3 minutes)
//   npm run bench -- --rounds 7            more rounds (medians steadier; the default is 5)
//   npm run bench -- --rsa                 RSA-2048 server certificates instead of ECDSA P-256
//   npm run bench -- --workers 2           tlsgate --workers 2 / nginx worker_processes 2 / haproxy nbthread 2
//   npm run bench -- --only term-h1,orig   a subset of scenarios (names in SCENARIOS below)
//   npm run bench -- --profile /tmp/prof  tlsgate runs under node --cpu-prof (profile written at exit)
//   npm run bench -- --idle 10000          idle connections for the memory figure (default 2000)
//
// Load tools (Debian): wrk, h2load (nghttp2-client), openssl s_time, curl; nginx with the stream
// module and haproxy as the peers: apt-get install -y nginx libnginx-mod-stream haproxy wrk nghttp2-client
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { mkdir, rm, writeFile, open } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, writeSecretYaml, type KeyPair } from '../test/helpers/certs.js';
import { run, stopChild, trackChild } from '../test/helpers/exec.js';
import { freePorts, sleep, waitForPort } from '../test/helpers/ports.js';
import { REPO_ROOT, startTlsgate, type Gateway } from '../test/helpers/tlsgate.js';

// ------------------------------------------------------------------ options

function argValue(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
const quick = process.argv.includes('--quick');
const rsa = process.argv.includes('--rsa');
const WORKERS = Number(argValue('--workers') ?? '1');
const ONLY = argValue('--only')?.split(',');
/** Writes a CPU profile of tlsgate (node --cpu-prof) into this directory when it stops. */
const PROFILE_DIR = argValue('--profile');
// Quick mode opens fewer idle connections: on a loaded 2-core box 2,000 TLS handshakes per proxy
// take most of the 3-minute budget.
const IDLE_CONNS = Number(argValue('--idle') ?? (quick ? '1000' : '2000'));
// Five rounds: one round's ratio swings by ±10-15% on these shared machines; a median of five
// holds still better than one of three.
const ROUNDS = Number(argValue('--rounds') ?? (quick ? 1 : 5));
const SECONDS = Number(argValue('--seconds') ?? (quick ? 2 : 5));
/** Concurrent connections of the load generators. */
const CONCURRENCY = 16;
/** Parallel `openssl s_time` processes (each is one sequential client). */
const HANDSHAKE_CLIENTS = 4;
const BIG_BYTES = 64 * 1024 * 1024;
const HOST = 'bench.example.com';
const TICK_US = 1e6 / 100; // /proc/<pid>/stat times are in clock ticks (USER_HZ = 100 on Linux)

// ------------------------------------------------------------------ results

/** `xs` turned left by `n`: round n's order of the proxies. */
function rotate<T>(xs: readonly T[], n: number): T[] {
  const k = xs.length ? n % xs.length : 0;
  return [...xs.slice(k), ...xs.slice(0, k)];
}

interface Sample {
  value: number;
  p50Ms?: number;
  p99Ms?: number;
  /** Proxy CPU (user + system) per operation, µs. */
  cpuUs?: number;
}

interface Scenario {
  id: string;
  title: string;
  unit: string;
  /** Which proxies have this mode. */
  peers: readonly ProxyName[];
  measure(p: Proxies[ProxyName], seconds: number): Promise<{ value: number; ops: number; p50Ms?: number; p99Ms?: number }>;
}

type ProxyName = 'tlsgate' | 'nginx' | 'haproxy';

interface Ports {
  pass: number;
  term: number;
  mtls: number;
  orig: number;
  tcp: number;
  /** nginx only: passthrough with `proxy_half_close on` (each direction closed on its own, as tlsgate and haproxy do). */
  passHalfClose?: number;
}

interface ProxyProc {
  name: ProxyName;
  ports: Ports;
  pid: number;
  stop(): Promise<unknown>;
}
type Proxies = Record<ProxyName, ProxyProc>;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** user+system CPU ticks of pid and its direct children (nginx/tlsgate workers). */
function cpuTicks(pid: number): number {
  const pids = [pid];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const st = readFileSync(`/proc/${d}/stat`, 'latin1');
      const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
      if (Number(f[1]) === pid) pids.push(Number(d));
    } catch { /* gone */ }
  }
  let t = 0;
  for (const p of pids) {
    try {
      const st = readFileSync(`/proc/${p}/stat`, 'latin1');
      const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
      t += Number(f[11]) + Number(f[12]); // utime, stime (fields 14 and 15)
    } catch { /* gone */ }
  }
  return t;
}

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'latin1'));
  return m ? Number(m[1]) : NaN;
}

// ------------------------------------------------------------------ load generators

/** wrk: keep-alive HTTP/1.1 requests/s with p50/p99 latency. */
async function wrk(url: string, seconds: number): Promise<{ value: number; ops: number; p50Ms?: number; p99Ms?: number }> {
  const res = await run('wrk', ['-t1', `-c${CONCURRENCY}`, `-d${seconds}s`, '--latency', '-H', `Host: ${HOST}`, url], { timeoutMs: (seconds + 30) * 1000 });
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(res.stdout);
  const total = /(\d+) requests in/.exec(res.stdout);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(res.stdout);
  if (res.code !== 0 || !rps || !total) throw new Error(`wrk ${url} failed: ${res.stdout}${res.stderr}`);
  if (non2xx) {
    const probe = await run('curl', ['-sk', '-i', '-H', `Host: ${HOST}`, url], { timeoutMs: 10_000 });
    throw new Error(`wrk ${url}: ${non2xx[1]} non-2xx responses; one request answers:\n${probe.stdout.slice(0, 600)}`);
  }
  const pct = (p: string): number | undefined => {
    const m = new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s)`, 'm').exec(res.stdout);
    if (!m) return undefined;
    return Number(m[1]) * (m[2] === 'us' ? 0.001 : m[2] === 's' ? 1000 : 1);
  };
  return { value: Number(rps[1]), ops: Number(total[1]), p50Ms: pct('50'), p99Ms: pct('99') };
}

/** h2load: h2 requests/s over CONCURRENCY connections, 10 streams each; mean latency (it gives no percentiles). */
async function h2load(url: string, seconds: number): Promise<{ value: number; ops: number; p50Ms?: number }> {
  const res = await run('h2load', ['-t1', `-c${CONCURRENCY}`, '-m10', '-D', String(seconds), '-H', `:authority: ${HOST}`, url], { timeoutMs: (seconds + 30) * 1000 });
  const rps = /finished in [\d.]+m?s, ([\d.]+) req\/s/.exec(res.stdout);
  const ok = /requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded/.exec(res.stdout);
  const mean = /time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)/.exec(res.stdout);
  const proto = /Application protocol: (\S+)/.exec(res.stdout);
  if (!rps || !ok || Number(ok[1]) === 0) throw new Error(`h2load ${url} failed: ${res.stdout}${res.stderr}`);
  if (proto?.[1] !== 'h2') throw new Error(`h2load ${url} negotiated ${proto?.[1]}, not h2`);
  const ms = mean ? Number(mean[1]) * (mean[2] === 'us' ? 0.001 : mean[2] === 's' ? 1000 : 1) : undefined;
  return { value: Number(rps[1]), ops: Number(ok[1]), ...(ms !== undefined ? { p50Ms: ms } : {}) };
}

/**
 * TLS handshakes/s with `openssl s_time` (handshake, one HTTP/1.0 request, close): HANDSHAKE_CLIENTS
 * sequential clients in parallel. `-reuse` resumes one session over and over (TLS 1.3 tickets);
 * s_time prints `r` per resumed connection, which is checked.
 */
async function handshakes(port: number, seconds: number, opts: { reuse?: boolean; cert?: KeyPair } = {}): Promise<{ value: number; ops: number }> {
  // `-www` makes each connection one HTTP/1.0 request (read to close), so TLS 1.3 session
  // tickets are read before the close and `-reuse` really resumes.
  const args = ['s_time', '-connect', `127.0.0.1:${port}`, opts.reuse ? '-reuse' : '-new', '-time', String(seconds), '-www', '/small'];
  if (opts.cert) args.push('-cert', opts.cert.cert, '-key', opts.cert.key);
  const start = Date.now();
  const outs = await Promise.all(Array.from({ length: HANDSHAKE_CLIENTS }, () => run('openssl', args, { timeoutMs: (seconds + 30) * 1000 })));
  const elapsed = (Date.now() - start) / 1000;
  let n = 0;
  for (const o of outs) {
    const m = /(\d+) connections in [\d.]+s/.exec(o.stdout);
    if (o.code !== 0 || !m) throw new Error(`s_time to ${port} failed: ${o.stdout.slice(-500)}${o.stderr.slice(-500)}`);
    n += Number(m[1]);
    if (opts.reuse) {
      const marks = o.stdout.replace(/[^*r]/g, '');
      const reused = marks.length - marks.replace(/r/g, '').length;
      if (reused < marks.length / 2) throw new Error(`s_time -reuse to ${port}: only ${reused} of ${marks.length} connections resumed`);
    }
  }
  return { value: n / elapsed, ops: n };
}

/**
 * h2load speaking HTTP/1.1 through a passthrough: `--connect-to` dials the proxy while the URL's
 * host goes out as the SNI, so a C client can load the tunnel (wrk and s_time cannot send this
 * SNI). Returns requests/s over CONCURRENCY connections and the successful requests.
 */
async function h2loadH1(port: number, args: string[], timeoutS: number): Promise<{ rps: number; ok: number; seconds: number }> {
  const res = await run('h2load', ['--h1', '-t1', `-c${CONCURRENCY}`, `--connect-to=127.0.0.1:${port}`, ...args, `https://${HOST}/small`], { timeoutMs: timeoutS * 1000 });
  const fin = /finished in ([\d.]+)(m?s), ([\d.]+) req\/s/.exec(res.stdout);
  const ok = /requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded/.exec(res.stdout);
  const proto = /Application protocol: (\S+)/.exec(res.stdout);
  if (res.code !== 0 || !fin || !ok || Number(ok[2]) === 0) throw new Error(`h2load --h1 through ${port} failed: ${res.stdout}${res.stderr}`);
  if (proto?.[1] !== 'http/1.1') throw new Error(`h2load through ${port} negotiated ${proto?.[1]}, not http/1.1`);
  if (Number(ok[2]) < Number(ok[1])) throw new Error(`h2load through ${port}: ${Number(ok[1]) - Number(ok[2])} of ${ok[1]} requests failed`);
  // h2load counts any answer as succeeded: every one must be the backend's 200.
  const ok2xx = /status codes: (\d+) 2xx/.exec(res.stdout);
  if (Number(ok2xx?.[1] ?? 0) < Number(ok[2])) throw new Error(`h2load through ${port}: ${ok[2]} answers, ${ok2xx?.[1] ?? 0} of them 2xx: ${res.stdout}`);
  const seconds = Number(fin[1]) / (fin[2] === 'ms' ? 1000 : 1);
  return { rps: Number(fin[3]), ok: Number(ok[2]), seconds };
}

/** Connections per h2load batch in the new-connection figure: about 1-2 s each here. */
const NEW_CONN_BATCH = 2000;

/**
 * New TLS connections per second through a passthrough: handshake, one small request, close.
 * `Connection: close` makes h2load dial again for every request. Its `-D` mode does not stop once
 * the server closes every connection (it spins until killed, nghttp2 1.52), so the figure runs
 * `-n` batches until the time is up and divides all connections by h2load's own times.
 */
async function newConnections(port: number, seconds: number): Promise<{ value: number; ops: number }> {
  const deadline = Date.now() + seconds * 1000;
  let done = 0;
  let spent = 0;
  do {
    const r = await h2loadH1(port, ['-n', String(NEW_CONN_BATCH), '-H', 'Connection: close'], 60);
    done += r.ok;
    spent += r.seconds;
  } while (Date.now() < deadline);
  return { value: done / spent, ops: done };
}

/** Keep-alive requests per second through the passthrough tunnel: CONCURRENCY connections, one request at a time each. */
async function keepAliveTls(port: number, seconds: number): Promise<{ value: number; ops: number }> {
  const r = await h2loadH1(port, ['-D', String(seconds)], seconds + 30);
  return { value: r.rps, ops: r.ok };
}

/** Downloads per bulk figure: one 64 MiB download takes about 0.13 s here, too short to read alone. */
const BULK_DOWNLOADS = 4;

/** Bulk: the 64 MiB object downloaded BULK_DOWNLOADS times in a row with curl through the tunnel, MB/s (10^6 bytes). */
async function bulk(port: number): Promise<{ value: number; ops: number }> {
  let seconds = 0;
  for (let i = 0; i < BULK_DOWNLOADS; i++) {
    const res = await run('curl', ['-sk', '--resolve', `${HOST}:${port}:127.0.0.1`, `https://${HOST}:${port}/big`, '-o', '/dev/null',
      '-w', '%{size_download} %{time_total}'], { timeoutMs: 120_000 });
    const [size, time] = res.stdout.trim().split(' ').map(Number);
    if (res.code !== 0 || size !== BIG_BYTES) throw new Error(`bulk download through ${port} failed: code ${res.code}, ${size} bytes, ${res.stderr}`);
    seconds += time ?? 0;
  }
  const mb = (BULK_DOWNLOADS * BIG_BYTES) / 1e6;
  return { value: seconds > 0 ? mb / seconds : 0, ops: mb };
}

/**
 * Memory per idle connection: opens `n` TLS connections (handshake done, nothing sent), waits for
 * the proxy to settle, and returns its RSS growth per connection in KiB. Bounded: 50 handshakes in
 * flight, 60 s overall.
 */
async function idleMemory(pid: number, port: number, n: number, sni: boolean): Promise<{ value: number; ops: number }> {
  const before = rssKb(pid);
  const socks: tls.TLSSocket[] = [];
  const deadline = Date.now() + 60_000;
  let opened = 0;
  const worker = async (): Promise<void> => {
    while (opened < n && Date.now() < deadline) {
      opened++;
      await new Promise<void>((resolve) => {
        const s = tls.connect({ host: '127.0.0.1', port, ...(sni ? { servername: HOST } : {}), rejectUnauthorized: false });
        s.on('error', () => resolve());
        // The handshake timeout must not fire on the idle connection afterwards.
        s.once('secureConnect', () => { s.setTimeout(0); socks.push(s); resolve(); });
        s.setTimeout(10_000, () => { s.destroy(); resolve(); });
      });
    }
  };
  await Promise.all(Array.from({ length: 50 }, worker));
  await sleep(1000);
  const alive = socks.filter((s) => !s.destroyed).length;
  const after = rssKb(pid);
  for (const s of socks) s.destroy();
  await sleep(500);
  if (alive < n * 0.95) throw new Error(`only ${alive} of ${n} idle connections to ${port} stayed open`);
  return { value: (after - before) / alive, ops: alive };
}

// ------------------------------------------------------------------ scenarios

function buildScenarios(client: KeyPair): Scenario[] {
  const all: ProxyName[] = ['tlsgate', 'nginx', 'haproxy'];
  return [
    { id: 'pass-new', title: 'passthrough: new TLS conn/s (1 request each)', unit: 'conn/s', peers: all, measure: (p, s) => newConnections(p.ports.pass, s) },
    // nginx's default (proxy_half_close off) closes both directions at the first FIN (here the
    // backend's, after its response), so the client's close_notify and FIN are never relayed:
    // reads and writes per connection that tlsgate and haproxy make. This row holds nginx to the same work.
    { id: 'pass-new-hc', title: 'passthrough: new TLS conn/s, nginx `proxy_half_close on`', unit: 'conn/s', peers: ['tlsgate', 'nginx'], measure: (p, s) => newConnections(p.ports.passHalfClose ?? p.ports.pass, s) },
    { id: 'pass-ka', title: 'passthrough: keep-alive req/s', unit: 'req/s', peers: all, measure: (p, s) => keepAliveTls(p.ports.pass, s) },
    { id: 'pass-bulk', title: `passthrough: 64 MiB download ×${BULK_DOWNLOADS} MB/s`, unit: 'MB/s', peers: all, measure: (p) => bulk(p.ports.pass) },
    { id: 'term-h1', title: 'termination: keep-alive req/s HTTP/1.1', unit: 'req/s', peers: all, measure: (p, s) => wrk(`https://127.0.0.1:${p.ports.term}/small`, s) },
    { id: 'term-h2', title: 'termination: req/s h2 (10 streams/conn)', unit: 'req/s', peers: all, measure: (p, s) => h2load(`https://127.0.0.1:${p.ports.term}/small`, s) },
    { id: 'term-full', title: 'termination: full handshakes/s (+1 request)', unit: 'hs/s', peers: all, measure: (p, s) => handshakes(p.ports.term, s) },
    { id: 'term-resumed', title: 'termination: resumed handshakes/s (+1 request)', unit: 'hs/s', peers: all, measure: (p, s) => handshakes(p.ports.term, s, { reuse: true }) },
    { id: 'term-mutual', title: 'termination: MUTUAL full handshakes/s (+1 request)', unit: 'hs/s', peers: all, measure: (p, s) => handshakes(p.ports.mtls, s, { cert: client }) },
    { id: 'orig', title: 'origination: HTTP in, HTTPS upstream, keep-alive req/s', unit: 'req/s', peers: all, measure: (p, s) => wrk(`http://127.0.0.1:${p.ports.orig}/small`, s) },
    { id: 'tcp', title: 'TCP proxy (plain): keep-alive req/s', unit: 'req/s', peers: all, measure: (p, s) => wrk(`http://127.0.0.1:${p.ports.tcp}/small`, s) },
  ];
}

// ------------------------------------------------------------------ peers

async function startNginxConf(dir: string, name: string, body: string, workers: number, waitPorts: number[]): Promise<{ pid: number; stop(): Promise<unknown> }> {
  const d = path.join(dir, name);
  await mkdir(path.join(d, 'tmp'), { recursive: true });
  const q = (p: string): string => JSON.stringify(path.join(d, p));
  const streamModule = ['/usr/lib/nginx/modules/ngx_stream_module.so', '/usr/lib64/nginx/modules/ngx_stream_module.so'].find((p) => existsSync(p));
  const conf = [
    ...(streamModule ? [`load_module ${streamModule};`] : []),
    'daemon off;',
    // One worker: a single process (no master), like tlsgate --workers 1; more: master + N workers.
    workers === 1 ? 'master_process off;' : `worker_processes ${workers};`,
    `pid ${q('nginx.pid')};`,
    `error_log ${q('error.log')} warn;`,
    'worker_rlimit_nofile 40000;',
    'events { worker_connections 16384; }',
    body.replace(/@TMP@/g, path.join(d, 'tmp')),
  ].join('\n');
  const confPath = path.join(d, 'nginx.conf');
  await writeFile(confPath, conf);
  const child = spawn('/usr/sbin/nginx', ['-e', path.join(d, 'error.log'), '-p', d, '-c', confPath], { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  child.stderr?.resume();
  for (const p of waitPorts) await waitForPort(p, 10_000);
  return { pid: child.pid ?? -1, stop: () => stopChild(child, 'SIGQUIT', 5_000) };
}

function nginxHttpCommon(): string {
  return [
    '  access_log off;',
    '  client_body_temp_path @TMP@/body; proxy_temp_path @TMP@/proxy; fastcgi_temp_path @TMP@/fcgi; uwsgi_temp_path @TMP@/uwsgi; scgi_temp_path @TMP@/scgi;',
    '  keepalive_requests 1000000;',
  ].join('\n');
}

async function startHaproxy(dir: string, ports: Ports, be: { http: number; tls: number }, pems: { server: string; ca: string }): Promise<ProxyProc> {
  const cfg = path.join(dir, 'haproxy.cfg');
  await writeFile(cfg, [
    'global',
    `  nbthread ${WORKERS}`,
    '  maxconn 9000',
    '  tune.ssl.default-dh-param 2048',
    'defaults',
    '  timeout connect 5s',
    '  timeout client 60s',
    '  timeout server 60s',
    'frontend pass',
    '  mode tcp',
    `  bind 127.0.0.1:${ports.pass}`,
    '  tcp-request inspect-delay 5s',
    '  tcp-request content accept if { req.ssl_hello_type 1 }',
    `  use_backend be_tls if { req.ssl_sni -i ${HOST} }`,
    'frontend term',
    '  mode http',
    `  bind 127.0.0.1:${ports.term} ssl crt ${pems.server} alpn h2,http/1.1`,
    '  default_backend be_http',
    'frontend mtls',
    '  mode http',
    `  bind 127.0.0.1:${ports.mtls} ssl crt ${pems.server} ca-file ${pems.ca} verify required alpn h2,http/1.1`,
    '  default_backend be_http',
    'frontend orig',
    '  mode http',
    `  bind 127.0.0.1:${ports.orig}`,
    '  default_backend be_https',
    'frontend tcp',
    '  mode tcp',
    `  bind 127.0.0.1:${ports.tcp}`,
    '  default_backend be_tcp',
    'backend be_tls',
    '  mode tcp',
    `  server b1 127.0.0.1:${be.tls}`,
    'backend be_tcp',
    '  mode tcp',
    `  server b1 127.0.0.1:${be.http}`,
    'backend be_http',
    '  mode http',
    '  http-reuse always',
    `  server b1 127.0.0.1:${be.http}`,
    'backend be_https',
    '  mode http',
    '  http-reuse always',
    `  server b1 127.0.0.1:${be.tls} ssl verify required ca-file ${pems.ca} sni str(${HOST}) verifyhost ${HOST}`,
    '',
  ].join('\n'));
  const child: ChildProcess = spawn('haproxy', ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  let err = '';
  child.stderr?.on('data', (c: Buffer) => { if (err.length < 8192) err += c.toString(); });
  try {
    for (const p of Object.values(ports)) await waitForPort(p, 10_000);
  } catch (e) {
    throw new Error(`haproxy did not start: ${(e as Error).message}\n${err}`);
  }
  return { name: 'haproxy', ports, pid: child.pid ?? -1, stop: () => stopChild(child, 'SIGTERM', 5_000) };
}

function tlsgateConfig(p: Ports, be: { http: number; tls: number }, caFile: string): string {
  const se = (name: string, port: number, proto: string, target: number): string => `---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${name}.bench.local]
  location: MESH_EXTERNAL
  ports: [{number: ${port}, name: p${port}, protocol: ${proto}, targetPort: ${target}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`;
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench-pass}
spec:
  servers:
  - port: {number: ${p.pass}, name: pass, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: ["${HOST}"]
---
# A separate Gateway, so the passthrough VirtualService's host does not add an empty virtual host
# to the HTTP servers (Istio binds a VirtualService to every server of its gateways).
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench}
spec:
  servers:
  - port: {number: ${p.term}, name: term, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: bench-cred}
    hosts: ["*"]
  - port: {number: ${p.mtls}, name: mtls, protocol: HTTPS}
    tls: {mode: MUTUAL, credentialName: bench-mtls-cred}
    hosts: ["*"]
  - port: {number: ${p.orig}, name: orig, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${p.tcp}, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: ["${HOST}"]
  gateways: [bench-pass]
  tls:
  - match: [{sniHosts: ["${HOST}"]}]
    route: [{destination: {host: tlsbe.bench.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
  - match: [{port: ${p.orig}}]
    route: [{destination: {host: httpsbe.bench.local, port: {number: 443}}}]
  - route: [{destination: {host: httpbe.bench.local, port: {number: 80}}}]
  tcp:
  - match: [{port: ${p.tcp}}]
    route: [{destination: {host: tcpbe.bench.local, port: {number: 81}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpsbe}
spec:
  host: httpsbe.bench.local
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ${caFile}, sni: ${HOST}}
${se('tlsbe', 443, 'TLS', be.tls)}${se('httpsbe', 443, 'HTTPS', be.tls)}${se('httpbe', 80, 'HTTP', be.http)}${se('tcpbe', 81, 'TCP', be.http)}`;
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  for (const tool of ['/usr/sbin/nginx', '/usr/sbin/haproxy', '/usr/bin/wrk', '/usr/bin/h2load']) {
    if (!existsSync(tool)) throw new Error(`${tool} is needed (apt-get install -y nginx libnginx-mod-stream haproxy wrk nghttp2-client)`);
  }
  const benchStart = Date.now();
  const dir = await certDir('tlsgate-bench-');
  const stops: (() => Promise<unknown>)[] = [];
  // An interrupted run (Ctrl-C, a held run ended early) stops what it started, the backend too,
  // instead of leaving it behind.
  const onSignal = (): void => {
    void (async () => {
      for (const stop of [...stops].reverse()) await stop().catch(() => {});
      await rm(dir, { recursive: true, force: true });
      process.exit(130);
    })();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const ec = !rsa;
    const ca = await makeCa(dir, 'bench-ca', '/O=bench/CN=bench-ca', { ec: true });
    const leaf = await makeLeaf(dir, ca, 'bench', { cn: HOST, sans: [`DNS:${HOST}`], serial: 1, ec });
    const client = await makeLeaf(dir, ca, 'client', { cn: 'bench-client', sans: ['URI:spiffe://bench/client'], serial: 2, ec: true, extendedKeyUsage: ['clientAuth'] });
    const serverPem = path.join(dir, 'server.pem');
    await writeFile(serverPem, leaf.certPem + leaf.keyPem);
    const big = path.join(dir, 'big.bin');
    const fh = await open(big, 'w');
    await fh.truncate(BIG_BYTES);
    await fh.close();
    const ports = await freePorts(18);
    const be = { http: ports[0]!, tls: ports[1]! };
    const take = (i: number): Ports => ({ pass: ports[i]!, term: ports[i + 1]!, mtls: ports[i + 2]!, orig: ports[i + 3]!, tcp: ports[i + 4]! });
    const tgPorts = take(2);
    const ngPorts = { ...take(7), passHalfClose: ports[17]! };
    const hpPorts = take(12);

    // One backend for everyone: plain HTTP and TLS (ECDSA, TLS 1.3), one process.
    const backend = await startNginxConf(dir, 'backend', [
      'http {',
      nginxHttpCommon(),
      `  server { listen 127.0.0.1:${be.http} backlog=4096; location = /big { alias ${JSON.stringify(big)}; } location /small { default_type text/plain; return 200 'ok\\n'; } }`,
      `  server { listen 127.0.0.1:${be.tls} ssl backlog=4096; ssl_certificate ${JSON.stringify(leaf.cert)}; ssl_certificate_key ${JSON.stringify(leaf.key)};`,
      '    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:BE:10m;',
      `    location = /big { alias ${JSON.stringify(big)}; } location /small { default_type text/plain; return 200 'ok\\n'; } }`,
      '}',
    ].join('\n'), 1, [be.http, be.tls]);
    stops.push(() => backend.stop());

    const cfg = path.join(dir, 'tlsgate');
    await mkdir(cfg);
    await writeFile(path.join(cfg, 'bench.yaml'), tlsgateConfig(tgPorts, be, ca.cert));
    await writeFile(path.join(cfg, 'secrets.yaml'), [
      writeSecretYaml('bench-cred', 'default', 'kubernetes.io/tls', { 'tls.crt': leaf.certPem, 'tls.key': leaf.keyPem }),
      writeSecretYaml('bench-mtls-cred', 'default', 'kubernetes.io/tls', { 'tls.crt': leaf.certPem, 'tls.key': leaf.keyPem, 'ca.crt': ca.certPem }),
    ].join('---\n'));
    const tgArgs = ['--bind-address', '127.0.0.1', '--drain-grace', '0', '--drain-timeout', '1s', '--access-log', 'off', '--log-level', 'warn', '--workers', String(WORKERS),
      // --tlsgate-args "--relay js": extra `tlsgate run` flags, for A/B runs.
      ...(argValue('--tlsgate-args')?.split(/\s+/).filter(Boolean) ?? [])];
    // --cpu-prof is not allowed in NODE_OPTIONS: a wrapper entry point runs the CLI under the
    // in-process inspector's profiler and writes a .cpuprofile when the process exits.
    let main: string | undefined;
    if (PROFILE_DIR !== undefined) {
      main = path.join(dir, 'profiled-main.mjs');
      await mkdir(PROFILE_DIR, { recursive: true });
      const out = path.resolve(PROFILE_DIR, `tlsgate-${Date.now()}.cpuprofile`);
      await writeFile(main, [
        "import { Session } from 'node:inspector';",
        "import { writeFileSync } from 'node:fs';",
        'const s = new Session(); s.connect();',
        "s.post('Profiler.enable'); s.post('Profiler.setSamplingInterval', { interval: 200 }); s.post('Profiler.start');",
        // An in-process session answers synchronously, so this works inside 'exit'.
        `process.on('exit', () => s.post('Profiler.stop', (e, r) => { if (!e) writeFileSync(${JSON.stringify(out)}, JSON.stringify(r.profile)); }));`,
        `await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'src', 'cli', 'main.js'))});`,
      ].join('\n'));
    }
    const gw: Gateway = await startTlsgate({ configPaths: [cfg], cwd: REPO_ROOT, args: tgArgs, ...(main !== undefined ? { main } : {}) });
    stops.push(() => gw.stop());
    for (const p of Object.values(tgPorts)) await waitForPort(p, 10_000);

    const ng = await startNginxConf(dir, 'proxy', [
      'stream {',
      `  map $ssl_preread_server_name $bench_upstream { ${HOST} 127.0.0.1:${be.tls}; default 127.0.0.1:1; }`,
      `  server { listen 127.0.0.1:${ngPorts.pass} backlog=4096; ssl_preread on; proxy_pass $bench_upstream; }`,
      `  server { listen 127.0.0.1:${ngPorts.passHalfClose} backlog=4096; ssl_preread on; proxy_half_close on; proxy_pass $bench_upstream; }`,
      `  server { listen 127.0.0.1:${ngPorts.tcp} backlog=4096; proxy_pass 127.0.0.1:${be.http}; }`,
      '}',
      'http {',
      nginxHttpCommon(),
      `  upstream plain_be { server 127.0.0.1:${be.http}; keepalive 64; }`,
      `  upstream tls_be { server 127.0.0.1:${be.tls}; keepalive 64; }`,
      `  ssl_certificate ${JSON.stringify(leaf.cert)}; ssl_certificate_key ${JSON.stringify(leaf.key)};`,
      '  ssl_protocols TLSv1.2 TLSv1.3;',
      '  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering on;',
      `  server { listen 127.0.0.1:${ngPorts.term} ssl http2 backlog=4096; location / { proxy_pass http://plain_be; } }`,
      `  server { listen 127.0.0.1:${ngPorts.mtls} ssl http2 backlog=4096; ssl_client_certificate ${JSON.stringify(ca.cert)}; ssl_verify_client on; location / { proxy_pass http://plain_be; } }`,
      `  server { listen 127.0.0.1:${ngPorts.orig} backlog=4096; location / { proxy_pass https://tls_be; proxy_ssl_session_reuse on; proxy_ssl_server_name on; proxy_ssl_name ${HOST};`,
      `    proxy_ssl_verify on; proxy_ssl_trusted_certificate ${JSON.stringify(ca.cert)}; } }`,
      '}',
    ].join('\n'), WORKERS, Object.values(ngPorts));
    stops.push(() => ng.stop());
    const hp = await startHaproxy(dir, hpPorts, be, { server: serverPem, ca: ca.cert });
    stops.push(() => hp.stop());

    if (process.argv.includes('--hold')) {
      process.stderr.write(`holding 120 s: tlsgate admin ${gw.adminUrl}, ports ${JSON.stringify({ tlsgate: tgPorts, nginx: ngPorts, haproxy: hpPorts, backend: be })}, dir ${dir}\n`);
      await sleep(120_000);
    }
    const proxies: Proxies = {
      tlsgate: { name: 'tlsgate', ports: tgPorts, pid: gw.pid, stop: () => gw.stop() },
      nginx: { name: 'nginx', ports: ngPorts, pid: ng.pid, stop: () => ng.stop() },
      haproxy: hp,
    };
    const order: ProxyName[] = ['tlsgate', 'nginx', 'haproxy'];
    const scenarios = buildScenarios(client).filter((s) => ONLY === undefined || ONLY.includes(s.id));
    const samples = new Map<string, Sample[]>();
    const key = (s: string, p: ProxyName): string => `${s}/${p}`;

    // Warm-up: JIT, session caches, upstream pools. nginx and haproxy need none beyond what the
    // backend's caches get from tlsgate's, so quick mode warms tlsgate only.
    for (const name of quick ? (['tlsgate'] as const) : order) {
      const p = proxies[name];
      for (const s of scenarios) if (s.peers.includes(name) && s.id !== 'pass-bulk') {
        // Best effort: a cold h2 path can leave every stream of a 1 s warm-up unfinished; the
        // measured figure still fails loudly if the path is broken.
        await s.measure(p, 1).catch((e: Error) => process.stderr.write(`warm-up ${s.id} ${name}: ${e.message.split('\n')[0]}\n`));
      }
    }
    // One untimed download per proxy: the backend reads the 64 MiB object cold the first time, and
    // whoever went first (tlsgate, in every round's order) paid for it.
    const bulkScenario = scenarios.find((s) => s.id === 'pass-bulk');
    if (bulkScenario) {
      for (const name of bulkScenario.peers) {
        await bulkScenario.measure(proxies[name], 1).catch((e: Error) => process.stderr.write(`warm-up pass-bulk ${name}: ${e.message.split('\n')[0]}\n`));
      }
    }
    for (let r = 0; r < ROUNDS; r++) {
      for (const s of scenarios) {
        // Who goes first turns each round: a figure run right after another proxy's (the
        // backend's caches, the bench process's own garbage from the figure before) is not the
        // same as the first one, and a fixed order charged that to the same proxy every time.
        for (const name of rotate(s.peers, r)) {
          const p = proxies[name];
          const t0 = cpuTicks(p.pid);
          const m = await s.measure(p, SECONDS);
          const cpu = (cpuTicks(p.pid) - t0) * TICK_US;
          const sample: Sample = { value: m.value, ...(m.p50Ms !== undefined ? { p50Ms: m.p50Ms } : {}), ...(m.p99Ms !== undefined ? { p99Ms: m.p99Ms } : {}), ...(m.ops > 0 ? { cpuUs: cpu / m.ops } : {}) };
          const list = samples.get(key(s.id, name)) ?? [];
          list.push(sample);
          samples.set(key(s.id, name), list);
          process.stderr.write(`round ${r + 1} ${s.id} ${name}: ${m.value.toFixed(1)} ${s.unit}${m.p99Ms !== undefined ? ` p99 ${m.p99Ms.toFixed(2)} ms` : ''}${sample.cpuUs !== undefined ? ` ${sample.cpuUs.toFixed(0)} µs CPU/op` : ''}\n`);
        }
      }
    }

    // Memory per idle TLS connection (one round: RSS is not noisy the way throughput is).
    const memRows: string[] = [];
    if (WORKERS === 1 && (ONLY === undefined || ONLY.includes('memory'))) {
      // Termination first: RSS grows in steps, and heap left free by the passthrough phase (how
      // much depends on how passthrough connections are relayed) would hide part of the growth.
      for (const [label, port, sni] of [['termination', 'term', false], ['passthrough', 'pass', true]] as const) {
        const cells: string[] = [];
        let nginxKb = NaN;
        for (const name of order) {
          const m = await idleMemory(proxies[name].pid, proxies[name].ports[port], IDLE_CONNS, sni);
          if (name === 'nginx') nginxKb = m.value;
          cells.push(m.value.toFixed(1));
          process.stderr.write(`memory ${label} ${name}: ${m.value.toFixed(1)} KiB per idle connection (${m.ops} open)\n`);
        }
        memRows.push(`| ${label}: RSS per idle TLS connection (${IDLE_CONNS}) | KiB | ${cells.join(' | ')} | ${(Number(cells[0]) / nginxKb).toFixed(2)} |`);
      }
    }

    const f = (x: number | undefined, d = 0): string => (x === undefined || !Number.isFinite(x) ? '–' : x.toFixed(d));
    const rows = [
      '| scenario | unit | tlsgate | nginx | haproxy | tlsgate / nginx | per round | haproxy / nginx | p50 / p99 ms (tlsgate · nginx · haproxy) | CPU µs/op (tlsgate · nginx · haproxy) |',
      '|---|---|---:|---:|---:|---:|---|---:|---|---|',
    ];
    for (const s of scenarios) {
      const med = (name: ProxyName, k: keyof Sample): number | undefined => {
        const xs = (samples.get(key(s.id, name)) ?? []).map((x) => x[k]).filter((x): x is number => x !== undefined);
        return xs.length ? median(xs) : undefined;
      };
      const v = (n: ProxyName) => med(n, 'value');
      const lat = order.map((n) => {
        const a = med(n, 'p50Ms');
        const b = med(n, 'p99Ms');
        return a === undefined ? '–' : `${f(a, 2)}${b !== undefined ? `/${f(b, 2)}` : ''}`;
      }).join(' · ');
      const cpu = order.map((n) => f(med(n, 'cpuUs'))).join(' · ');
      const ratio = (n: ProxyName): string => {
        const a = v(n);
        const b = v('nginx');
        return a !== undefined && b !== undefined && b > 0 ? (a / b).toFixed(2) : '–';
      };
      // Each round's own ratio (the two figures measured minutes apart at most): the spread says
      // how far the median can be trusted.
      const tg = samples.get(key(s.id, 'tlsgate')) ?? [];
      const ng = samples.get(key(s.id, 'nginx')) ?? [];
      const rounds = tg.length > 1 && tg.length === ng.length
        ? tg.map((x, i) => (ng[i]!.value > 0 ? (x.value / ng[i]!.value).toFixed(2) : '–')).join(' ')
        : '–';
      rows.push(`| ${s.title} | ${s.unit} | ${f(v('tlsgate'))} | ${f(v('nginx'))} | ${f(v('haproxy'))} | **${ratio('tlsgate')}** | ${rounds} | ${ratio('haproxy')} | ${lat} | ${cpu} |`);
    }
    const memTable = memRows.length ? [
      '',
      '| memory (lower is better) | unit | tlsgate | nginx | haproxy | tlsgate / nginx |',
      '|---|---|---:|---:|---:|---:|',
      ...memRows,
    ] : [];
    const versions = {
      nginx: (await run('/usr/sbin/nginx', ['-v'])).stderr.trim().replace('nginx version: ', ''),
      haproxy: (await run('/usr/sbin/haproxy', ['-v'])).stdout.split('\n')[0]?.replace(/ - https.*/, '') ?? '?',
      wrk: (await run('wrk', ['--version'])).stdout.split('\n')[0]?.split(' [')[0] ?? '?',
      h2load: (await run('h2load', ['--version'])).stdout.trim(),
      openssl: (await run('openssl', ['version'])).stdout.trim(),
    };
    const argv = process.argv.slice(2).join(' ');
    const header = [
      `# Benchmark: tlsgate vs nginx vs haproxy, ${new Date().toISOString()}`,
      '',
      `Command: \`npm run bench${argv ? ` -- ${argv}` : ''}\` (${ROUNDS} round${ROUNDS > 1 ? 's' : ''}, ${SECONDS} s per figure, took ${((Date.now() - benchStart) / 1000).toFixed(0)} s).`,
      `Machine: \`nproc\` ${os.cpus().length} (${os.cpus()[0]?.model ?? '?'}), kernel ${os.release()}, node ${process.version}, nginx ${versions.nginx}, ${versions.haproxy}, ${versions.openssl}; load average at the end ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}.`,
      `Workers: tlsgate \`--workers ${WORKERS}\`, nginx ${WORKERS === 1 ? '`master_process off` (one process)' : `\`worker_processes ${WORKERS}\``}, haproxy \`nbthread ${WORKERS}\`. Access logs off everywhere.`,
      `Certificates: ${ec ? 'ECDSA P-256' : 'RSA-2048'} server certificate, ECDSA client certificate (MUTUAL), TLS 1.3 (each side's default ciphers); one nginx backend process (plain HTTP and TLS) behind all three.`,
      `Load: wrk (\`wrk -t1 -c${CONCURRENCY} -d${SECONDS}s --latency\`, ${versions.wrk}), h2load (\`h2load -t1 -c${CONCURRENCY} -m10 -D ${SECONDS}\`, ${versions.h2load}; mean latency only),`,
      `\`openssl s_time -new|-reuse -time ${SECONDS}\` x${HANDSHAKE_CLIENTS} in parallel (handshake + one HTTP/1.0 request), h2load over HTTP/1.1 through the passthroughs (\`h2load --h1 -t1 -c${CONCURRENCY} --connect-to\`, the SNI from the URL; new connections: \`-n ${NEW_CONN_BATCH} -H 'Connection: close'\` batches), curl for 64 MiB.`,
      'Every figure: median over rounds; each round runs each scenario on every proxy in turn, the order turning by one each round (tlsgate first in round 1, nginx in round 2, haproxy in round 3, and so on). Ratio > 1 is better than nginx; "per round" is each round\'s own tlsgate / nginx.',
      'CPU µs/op: user+system time of the proxy process(es) during the figure divided by operations (per MB for the download); lower is better. Load tools and backend share the same cores.',
      'Memory: VmRSS growth of the proxy process with the idle TLS connections open (handshake done, nothing sent), per connection.',
      '',
    ];
    const table = [...header, ...rows, ...memTable, ''].join('\n');
    process.stdout.write(table);
    const outDir = path.join(REPO_ROOT, 'bench', 'results');
    await mkdir(outDir, { recursive: true });
    const suffix = `${quick ? '-quick' : ''}${rsa ? '-rsa' : ''}${WORKERS > 1 ? `-w${WORKERS}` : ''}`;
    const file = path.join(outDir, `${new Date().toISOString().slice(0, 10)}${suffix}.md`);
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

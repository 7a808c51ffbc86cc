/**
 * etcd as the shared config store, with a real etcd (Debian's etcd-server) and three real
 * tlsgate replicas on one prefix, each on its own loopback address and the same port:
 * convergence after a push, a refused invalid push, etcd going away and coming back, a replica
 * that was down during a push, and a replica whose resume revision was compacted meanwhile.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { run, stopChild, trackChild } from '../helpers/exec.js';
import { freePort, freePorts, sleep, waitForPort } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { makeCa, makeLeaf } from '../helpers/certs.js';

const ETCD = '/usr/bin/etcd';
const ETCDCTL = '/usr/bin/etcdctl';
const haveEtcd = existsSync(ETCD) && existsSync(ETCDCTL);
const PREFIX = '/tlsgate/test';

const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

interface Etcd {
  clientPort: number;
  child: ChildProcess;
  stop(): Promise<void>;
}

let dataDir = '';
let clientPort = 0;
let peerPort = 0;

async function startEtcd(): Promise<Etcd> {
  const client = `http://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const child = spawn(ETCD, [
    '--name', 't', '--data-dir', dataDir,
    '--listen-client-urls', client, '--advertise-client-urls', client,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `t=${peer}`,
    '--log-level', 'error',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  const err: string[] = [];
  child.stderr!.on('data', (c: Buffer) => { if (err.length < 200) err.push(c.toString()); });
  try {
    await waitForPort(clientPort, 15_000);
    // Listening is not serving: wait for a committed read.
    const deadline = Date.now() + 15_000;
    for (;;) {
      const r = await etcdctl(['endpoint', 'health']);
      if (r.code === 0) break;
      if (Date.now() > deadline) throw new Error(`etcd not healthy: ${r.stderr}`);
      await sleep(100);
    }
  } catch (e) {
    await stopChild(child, 'SIGKILL', 2000);
    throw new Error(`${(e as Error).message}\n${err.join('')}`);
  }
  return { clientPort, child, stop: async () => { await stopChild(child, 'SIGTERM', 5000); } };
}

function etcdctl(args: string[]) {
  return run(ETCDCTL, ['--endpoints', `127.0.0.1:${clientPort}`, ...args], { env: { ...process.env, ETCDCTL_API: '3' }, timeoutMs: 10_000 });
}

/** The current store revision and the generation value, as etcdctl reads them. */
async function storeState(): Promise<{ revision: number; generation: string | null; keys: number }> {
  const r = await etcdctl(['get', '--prefix', `${PREFIX}/`, '-w', 'json']);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout) as { header: { revision: number }; kvs?: { key: string; value: string }[] };
  const kvs = j.kvs ?? [];
  const gen = kvs.find((kv) => Buffer.from(kv.key, 'base64').toString() === `${PREFIX}/.generation`);
  return { revision: j.header.revision, generation: gen ? Buffer.from(gen.value, 'base64').toString() : null, keys: kvs.length };
}

/**
 * A TCP forwarder in front of etcd for one replica, so that replica alone can lose etcd:
 * cut() closes the listener and every forwarded connection; restore() listens again.
 */
async function startCutter(target: number): Promise<{ port: number; cut(): Promise<void>; restore(): Promise<void>; close(): Promise<void> }> {
  const port = await freePort();
  const sockets = new Set<net.Socket>();
  let server: net.Server | undefined;
  const listen = () => new Promise<void>((resolve, reject) => {
    const s = net.createServer((down) => {
      const up = net.connect(target, '127.0.0.1');
      sockets.add(down).add(up);
      const drop = () => { down.destroy(); up.destroy(); sockets.delete(down); sockets.delete(up); };
      down.on('error', drop).on('close', drop);
      up.on('error', drop).on('close', drop);
      down.pipe(up).pipe(down);
    });
    s.once('error', reject);
    s.listen(port, '127.0.0.1', () => { server = s; resolve(); });
  });
  const cut = async () => {
    const s = server;
    server = undefined;
    for (const so of sockets) so.destroy();
    sockets.clear();
    if (s) await new Promise<void>((r) => s.close(() => r()));
  };
  await listen();
  return { port, cut, restore: listen, close: cut };
}

/** One GET to address:port, bounded; never rejects. */
function get(address: string, port: number, pathname: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve) => {
    const req = http.get({ host: address, port, path: pathname, timeout: 1000, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { if (body.length < 4096) body += c; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', () => resolve({ status: 0, body: '' }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', () => resolve({ status: 0, body: '' }));
  });
}

/** Polls until GET returns 200 with the body; resolves with the time it took (ms), or rejects. */
async function waitServes(address: string, port: number, pathname: string, body: string, since: number, timeoutMs = 10_000): Promise<number> {
  const deadline = since + timeoutMs;
  for (;;) {
    const r = await get(address, port, pathname);
    if (r.status === 200 && r.body === body) return Date.now() - since;
    if (Date.now() > deadline) throw new Error(`${address}:${port}${pathname} still answers ${r.status} ${JSON.stringify(r.body)} after ${timeoutMs} ms`);
    await sleep(20);
  }
}

interface Dump { sources: { kind: string; revision?: number; generation?: number | null; connected?: boolean; fullLoads?: number }[] }

async function etcdStatus(gw: Gateway): Promise<NonNullable<Dump['sources'][number]>> {
  const r = await gw.admin('/config_dump');
  const d = JSON.parse(r.body) as Dump;
  const s = d.sources.find((x) => x.kind === 'etcd');
  assert.ok(s, 'an etcd source in /config_dump');
  return s;
}

async function waitStatus(gw: Gateway, pred: (s: Awaited<ReturnType<typeof etcdStatus>>) => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await etcdStatus(gw);
    if (pred(s)) return;
    if (Date.now() > deadline) throw new Error(`${what}: not reached within ${timeoutMs} ms (status ${JSON.stringify(s)})`);
    await sleep(50);
  }
}

/** A Gateway on `port` and one VirtualService; each (path, body) pair is a directResponse route. */
function config(port: number, routes: [string, string][]): string {
  const http = routes.map(([p, b]) => `  - match: [{uri: {exact: ${p}}}]\n    directResponse: {status: 200, body: {string: "${b}"}}\n`).join('');
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  servers:
  - port: {number: ${port}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes, namespace: edge}
spec:
  hosts: ["*"]
  gateways: [edge/gw]
  http:
${http}---
apiVersion: v1
kind: Secret
metadata: {name: api-token, namespace: edge}
stringData: {token: not-a-real-secret-${routes.length}}
`;
}

let etcd: Etcd;
let gwPort = 0;
let workDir = '';
let configDir = '';
const replicas: Record<string, Gateway> = {};
const ADDRESSES = ['127.0.0.2', '127.0.0.3', '127.0.0.4'];
let cutter: Awaited<ReturnType<typeof startCutter>>;

function url(port = clientPort): string {
  return `etcd://127.0.0.1:${port}${PREFIX}`;
}

async function push(routes: [string, string][], dir = configDir) {
  await writeFile(path.join(dir, 'config.yaml'), config(gwPort, routes));
  const r = await runCli(['config', 'push', '--config', dir, '--to', url()]);
  return r;
}

async function startReplica(address: string): Promise<Gateway> {
  // The third replica reaches etcd through the cutter, so it can lose etcd on its own.
  const port = address === ADDRESSES[2] ? cutter.port : clientPort;
  const gw = await startTlsgate({ configPaths: [url(port)], args: ['--bind-address', address, '--access-log', 'off'], readyTimeoutMs: 45_000 });
  cleanups.push(() => gw.stop('SIGKILL'));
  return gw;
}

before(async () => {
  if (!haveEtcd) return;
  workDir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-etcd-'));
  cleanups.push(() => rm(workDir, { recursive: true, force: true }));
  dataDir = path.join(workDir, 'etcd');
  configDir = path.join(workDir, 'config');
  await mkdir(configDir);
  [clientPort, peerPort, gwPort] = await freePorts(3);
  etcd = await startEtcd();
  cleanups.push(() => etcd.stop());
  cutter = await startCutter(clientPort);
  cleanups.push(() => cutter.close());
});

const skip = haveEtcd ? false : `etcd not installed (${ETCD}): apt-get install etcd-server etcd-client`;

test('three replicas on one prefix serve a push within a second or so', { skip }, async (t) => {
  const first = await push([['/v1', 'one']]);
  assert.equal(first.code, 0, first.stderr);
  assert.match(first.stdout, /pushed generation 1 /);
  const started = await Promise.all(ADDRESSES.map((a) => startReplica(a)));
  ADDRESSES.forEach((a, i) => { replicas[a] = started[i]!; });
  for (const a of ADDRESSES) assert.equal((await get(a, gwPort, '/v1')).body, 'one');
  assert.equal((await get(ADDRESSES[0]!, gwPort, '/v2')).status, 404);

  const r = await push([['/v1', 'one'], ['/v2', 'two']]);
  const committed = Date.now();
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /~ \/tlsgate\/test\/networking\.istio\.io\/VirtualService\/edge\/routes/);
  assert.match(r.stdout, /~ \/tlsgate\/test\/core\/Secret\/edge\/api-token/);
  assert.doesNotMatch(r.stdout + r.stderr, /not-a-real-secret/, 'secret values are never printed');
  const times = await Promise.all(ADDRESSES.map((a) => waitServes(a, gwPort, '/v2', 'two', committed)));
  t.diagnostic(`convergence after push (ms from the push command's exit): ${times.join(', ')}`);
  for (const ms of times) assert.ok(ms < 3000, `converged in ${ms} ms`);

  const state = await storeState();
  for (const a of ADDRESSES) {
    const s = await etcdStatus(replicas[a]!);
    assert.equal(s.connected, true);
    assert.equal(s.generation, 2);
    assert.equal(s.revision, state.revision);
  }
  const metrics = (await replicas[ADDRESSES[0]!]!.admin('/stats/prometheus')).body;
  assert.match(metrics, new RegExp(`tlsgate_config_source_revision\\{source="etcd://127\\.0\\.0\\.1:${clientPort}/tlsgate/test"\\} ${state.revision}`));
  assert.match(metrics, /tlsgate_config_source_connected\{source="[^"]+"\} 1/);

  // get and diff agree with what was pushed.
  const got = await runCli(['config', 'get', '--from', url()]);
  assert.equal(got.code, 0, got.stderr);
  assert.match(got.stdout, /generation 2, revision \d+, 3 resource\(s\)/);
  assert.match(got.stdout, /kind: VirtualService[\s\S]*exact: \/v2/);
  const same = await runCli(['config', 'diff', '--config', configDir, '--from', url()]);
  assert.equal(same.code, 0, same.stdout + same.stderr);
  assert.match(same.stdout, /0 added, 0 changed, 0 removed, 3 unchanged/);
});

test('an invalid config is refused before anything is written', { skip }, async () => {
  const before = await storeState();
  const bad = path.join(workDir, 'bad');
  await mkdir(bad, { recursive: true });
  await writeFile(path.join(bad, 'config.yaml'), config(gwPort, [['/v3', 'three']]) + `---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls, namespace: edge}
spec:
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: no-such-secret}
`);
  const r = await runCli(['config', 'push', '--config', bad, '--to', url()]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stderr, /TG3003/);
  assert.match(r.stderr, /nothing was written/);
  assert.deepEqual(await storeState(), before, 'etcd unchanged');
  const diff = await runCli(['config', 'diff', '--config', bad, '--from', url()]);
  assert.equal(diff.code, 1);
  assert.match(diff.stdout, /\+ \/tlsgate\/test\/networking\.istio\.io\/Gateway\/edge\/tls/);
  for (const a of ADDRESSES) assert.equal((await get(a, gwPort, '/v3')).status, 404);
  // An empty directory would delete everything: refused unless asked for.
  const empty = path.join(workDir, 'empty');
  await mkdir(empty, { recursive: true });
  const none = await runCli(['config', 'push', '--config', empty, '--to', url()]);
  assert.equal(none.code, 1);
  assert.match(none.stderr, /--allow-empty/);
  assert.deepEqual(await storeState(), before, 'etcd unchanged');
});

test('etcd stops: every replica keeps serving and reports it; it comes back: they follow again', { skip }, async (t) => {
  await etcd.stop();
  for (const a of ADDRESSES) await waitStatus(replicas[a]!, (s) => s.connected === false, `${a} disconnected`);
  for (const a of ADDRESSES) assert.equal((await get(a, gwPort, '/v2')).body, 'two', `${a} keeps serving`);
  const metrics = (await replicas[ADDRESSES[1]!]!.admin('/stats/prometheus')).body;
  assert.match(metrics, /tlsgate_config_source_connected\{source="[^"]+"\} 0/);
  const refused = await push([['/v1', 'one'], ['/v2', 'two'], ['/v3', 'three']]);
  assert.notEqual(refused.code, 0, 'a push without etcd fails');

  etcd = await startEtcd();
  for (const a of ADDRESSES) await waitStatus(replicas[a]!, (s) => s.connected === true, `${a} reconnected`);
  const r = await push([['/v1', 'one'], ['/v2', 'two'], ['/v3', 'three']]);
  const committed = Date.now();
  assert.equal(r.code, 0, r.stderr);
  const times = await Promise.all(ADDRESSES.map((a) => waitServes(a, gwPort, '/v3', 'three', committed)));
  t.diagnostic(`convergence after etcd came back (ms): ${times.join(', ')}`);
  for (const ms of times) assert.ok(ms < 3000, `converged in ${ms} ms after reconnecting`);
});

test('a replica that was down during a push converges when it starts', { skip }, async () => {
  const b = ADDRESSES[1]!;
  await replicas[b]!.stop();
  const r = await push([['/v1', 'one'], ['/v4', 'four']]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /pushed generation 4 /);
  await waitServes(ADDRESSES[0]!, gwPort, '/v4', 'four', Date.now());
  replicas[b] = await startReplica(b);
  assert.equal((await get(b, gwPort, '/v4')).body, 'four');
  assert.equal((await get(b, gwPort, '/v2')).status, 404, 'the removed route is gone');
  assert.equal((await etcdStatus(replicas[b]!)).generation, 4);
});

test('a replica whose revision was compacted while it was cut off reloads the whole set', { skip }, async (t) => {
  const c = ADDRESSES[2]!;
  const gw = replicas[c]!;
  const before = await etcdStatus(gw);
  await cutter.cut();
  await waitStatus(gw, (s) => s.connected === false, `${c} cut off`);
  let r = await push([['/v1', 'one'], ['/v5', 'five']]);
  assert.equal(r.code, 0, r.stderr);
  r = await push([['/v1', 'one'], ['/v6', 'six']]);
  assert.equal(r.code, 0, r.stderr);
  const state = await storeState();
  const compacted = await etcdctl(['compact', String(state.revision)]);
  assert.equal(compacted.code, 0, compacted.stderr);
  // The others followed; the cut-off one still serves generation 4.
  await waitServes(ADDRESSES[0]!, gwPort, '/v6', 'six', Date.now());
  assert.equal((await get(c, gwPort, '/v4')).body, 'four');

  await cutter.restore();
  const restored = Date.now();
  const ms = await waitServes(c, gwPort, '/v6', 'six', restored, 15_000);
  t.diagnostic(`compacted replica served the latest generation ${ms} ms after etcd was reachable again`);
  const after = await etcdStatus(gw);
  assert.equal(after.connected, true);
  assert.equal(after.generation, 6);
  assert.equal(after.revision, state.revision);
  assert.ok((after.fullLoads ?? 0) > (before.fullLoads ?? 0), `a full reload happened (${JSON.stringify(after)})`);
  assert.equal((await get(c, gwPort, '/v5')).status, 404, 'the intermediate generation was never needed');
  assert.ok(ms < 15_000);
});

test('writes without a generation bump wait for the next generation (never a partial set)', { skip }, async () => {
  const a = ADDRESSES[0]!;
  const gw = replicas[a]!;
  const before = await etcdStatus(gw);
  // Hand-written change to one key, as a tool that bypasses `config push` would do.
  const key = `${PREFIX}/networking.istio.io/VirtualService/edge/routes`;
  const value = config(gwPort, [['/v1', 'one'], ['/v7', 'seven']]).split('---\n')[1]!;
  const put = await etcdctl(['put', key, value]);
  assert.equal(put.code, 0, put.stderr);
  await sleep(1500);
  assert.equal((await get(a, gwPort, '/v7')).status, 404, 'not applied without a generation');
  assert.equal((await etcdStatus(gw)).generation, before.generation);
  const bump = await etcdctl(['put', `${PREFIX}/.generation`, String((before.generation ?? 0) + 1)]);
  assert.equal(bump.code, 0, bump.stderr);
  await waitServes(a, gwPort, '/v7', 'seven', Date.now());
  assert.equal((await etcdStatus(gw)).generation, (before.generation ?? 0) + 1);
});

test('etcd with client-certificate TLS and password auth', { skip }, async (t) => {
  const dir = path.join(workDir, 'tls');
  const ca = await makeCa(dir, 'etcd-ca', '/CN=etcd test CA');
  const server = await makeLeaf(dir, ca, 'server', { cn: 'etcd', sans: ['IP:127.0.0.1', 'DNS:localhost'], serial: 1, extendedKeyUsage: ['serverAuth', 'clientAuth'] });
  const client = await makeLeaf(dir, ca, 'client', { cn: 'tlsgate-client', serial: 2, extendedKeyUsage: ['clientAuth'] });
  const [port, peer] = await freePorts(2);
  const curl = `https://127.0.0.1:${port}`;
  const child = spawn(ETCD, [
    '--name', 's', '--data-dir', path.join(workDir, 'etcd-tls'),
    '--listen-client-urls', curl, '--advertise-client-urls', curl,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `s=http://127.0.0.1:${peer}`,
    '--cert-file', server.cert, '--key-file', server.key, '--client-cert-auth', '--trusted-ca-file', ca.cert, '--log-level', 'error',
  ], { stdio: 'ignore' });
  trackChild(child);
  t.after(() => stopChild(child, 'SIGTERM', 5000));
  const ctl = (args: string[]) => run(ETCDCTL, ['--endpoints', curl, '--cacert', ca.cert, '--cert', client.cert, '--key', client.key, ...args],
    { env: { ...process.env, ETCDCTL_API: '3' }, timeoutMs: 10_000 });
  await waitForPort(port!, 15_000);
  for (let i = 0; (await ctl(['endpoint', 'health'])).code !== 0; i++) {
    assert.ok(i < 150, 'TLS etcd healthy');
    await sleep(100);
  }
  const password = 'pw-do-not-log-7f3a';
  for (const args of [['user', 'add', 'root', `--new-user-password=${password}`, '--interactive=false'], ['auth', 'enable']]) {
    const r = await ctl(args);
    assert.equal(r.code, 0, r.stderr);
  }
  const target = `etcd://127.0.0.1:${port}${PREFIX}`;
  const dirCfg = path.join(workDir, 'tls-config');
  await mkdir(dirCfg, { recursive: true });
  await writeFile(path.join(dirCfg, 'config.yaml'), config(gwPort, [['/tls', 'over-tls']]));
  const tlsArgs = ['--etcd-ca', ca.cert, '--etcd-cert', client.cert, '--etcd-key', client.key];

  const plain = await runCli(['config', 'push', '--config', dirCfg, '--to', target], { timeoutMs: 20_000 });
  assert.equal(plain.code, 1, 'no TLS: refused');
  const noAuth = await runCli(['config', 'push', '--config', dirCfg, '--to', target, ...tlsArgs], { timeoutMs: 20_000 });
  assert.equal(noAuth.code, 1, 'TLS but no user: refused');
  const wrong = await runCli(['config', 'push', '--config', dirCfg, '--to', target, ...tlsArgs, '--etcd-user', 'root'], { env: { TLSGATE_ETCD_PASSWORD: 'wrong' }, timeoutMs: 20_000 });
  assert.equal(wrong.code, 1, 'wrong password: refused');
  const ok = await runCli(['config', 'push', '--config', dirCfg, '--to', target, ...tlsArgs, '--etcd-user', 'root'], { env: { TLSGATE_ETCD_PASSWORD: password }, timeoutMs: 20_000 });
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stdout, /pushed generation 1 /);
  for (const r of [plain, noAuth, wrong, ok]) assert.ok(!(r.stdout + r.stderr).includes(password), 'the password is never printed');

  const gw = await startTlsgate({
    configPaths: [target], readyTimeoutMs: 45_000, env: { TLSGATE_ETCD_PASSWORD: password },
    args: ['--bind-address', '127.0.0.5', '--access-log', 'off', ...tlsArgs, '--etcd-user', 'root'],
  });
  t.after(() => gw.stop('SIGKILL'));
  assert.equal((await get('127.0.0.5', gwPort, '/tls')).body, 'over-tls');
  const s = await etcdStatus(gw);
  assert.equal(s.connected, true);
  assert.equal(s.generation, 1);
  assert.ok(!gw.logs().join('\n').includes(password));
  const dump = await gw.admin('/config_dump');
  assert.ok(!dump.body.includes(password) && !dump.body.includes('not-a-real-secret'), 'no password or secret value on /config_dump');
});

/**
 * `run --workers 2`: two processes share the listeners; the primary aggregates the admin API;
 * killing one worker drops none of the other worker's connections, and it is replaced.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePorts, sleep } from '../helpers/ports.js';
import { startTlsgate } from '../helpers/tlsgate.js';
import { startTcpEcho } from '../helpers/upstreams.js';

const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

interface WorkerStatus { pid: number; ready: boolean; connections: number }

function open(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.on('error', reject);
  });
}

/** Sends a line and waits for its echo; false when the connection is gone. */
function echoes(s: net.Socket, line: string): Promise<boolean> {
  return new Promise((resolve) => {
    if (s.destroyed) return resolve(false);
    let data = '';
    const done = (ok: boolean) => { s.off('data', onData); clearTimeout(t); resolve(ok); };
    const onData = (d: Buffer) => { data += d.toString(); if (data.includes(line)) done(true); };
    const t = setTimeout(() => done(false), 3000);
    s.on('data', onData);
    s.once('close', () => done(false));
    s.once('error', () => done(false));
    s.write(line);
  });
}

test('two workers share the listeners; killing one keeps the other\'s connections and it is replaced', async () => {
  const echo = await startTcpEcho();
  cleanups.push(() => echo.close());
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-workers-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const [tcpPort, httpPort] = await freePorts(2) as [number, number];
  await writeFile(path.join(dir, 'gw.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${tcpPort}, name: tcp, protocol: TCP}
    hosts: ["*"]
  - port: {number: ${httpPort}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp: [{route: [{destination: {host: echo.local, port: {number: 7}}}]}]
  http: [{directResponse: {status: 200, body: {string: "hi"}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.local]
  ports: [{number: 7, name: tcp, protocol: TCP, targetPort: ${echo.port}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`);
  const gw = await startTlsgate({ configPaths: [dir], args: ['--workers', '2'] });
  cleanups.push(() => gw.stop());
  const workers = async () => JSON.parse((await gw.admin('/workers')).body) as WorkerStatus[];
  let ws = await workers();
  assert.equal(ws.length, 2);
  assert.ok(ws.every((w) => w.ready));

  const socks: net.Socket[] = [];
  for (let i = 0; i < 12; i++) {
    const s = await open(tcpPort);
    s.on('error', () => {});
    socks.push(s);
    assert.ok(await echoes(s, `hello ${i}\n`));
  }
  cleanups.push(() => { for (const s of socks) s.destroy(); });
  ws = await workers();
  assert.equal(ws.reduce((a, w) => a + w.connections, 0), 12);
  // Kill the worker holding fewer connections (if one holds none, the other one).
  const sorted = [...ws].sort((a, b) => a.connections - b.connections);
  const victim = sorted[0]!.connections > 0 ? sorted[0]! : sorted[1]!;
  const survivor = ws.find((w) => w.pid !== victim.pid)!;
  process.kill(victim.pid, 'SIGKILL');
  await sleep(300);
  let alive = 0;
  for (let i = 0; i < socks.length; i++) if (await echoes(socks[i]!, `again ${i}\n`)) alive++;
  assert.equal(alive, survivor.connections, `the ${survivor.connections} connection(s) of worker ${survivor.pid} all survive`);

  // A replacement comes up; new connections work; the aggregated metrics cover both workers.
  for (let i = 0; i < 50; i++) {
    ws = await workers();
    if (ws.length === 2 && ws.every((w) => w.ready) && !ws.some((w) => w.pid === victim.pid)) break;
    await sleep(100);
  }
  assert.equal(ws.length, 2);
  assert.ok(!ws.some((w) => w.pid === victim.pid));
  const fresh = await open(tcpPort);
  fresh.on('error', () => {});
  assert.ok(await echoes(fresh, 'fresh\n'));
  fresh.destroy();
  assert.equal((await gw.admin('/ready')).status, 200);
  const metrics = (await gw.admin('/stats/prometheus')).body;
  assert.match(metrics, /tlsgate_downstream_connections_total\{listener="127\.0\.0\.1_\d+"\} \d+/);
  for (const s of socks) s.destroy();
  // SIGTERM drains every worker and the primary exits 0 (not killed after the harness's 10 s).
  const started = Date.now();
  assert.equal(await gw.stop('SIGTERM'), 0);
  assert.ok(Date.now() - started < 9000, 'the workers let go of their IPC channel and exited');
});

/**
 * `run --workers N`: N worker processes share the listeners (node:cluster with SCHED_NONE, so
 * the kernel balances accepts and no handle is passed per connection). Every worker loads the
 * same config and applies the same snapshot; the primary runs the admin server and aggregates:
 * /ready is 200 when every worker is ready, /stats/prometheus sums the workers' metrics,
 * /config_dump comes from one worker, /workers lists them. A worker that dies is replaced; the
 * others and their connections are untouched.
 */
import cluster, { type Worker } from 'node:cluster';
import * as http from 'node:http';
import { AggregatorRegistry } from 'prom-client';
import type { RunOptions } from './run.js';

interface WorkerStatus {
  pid: number;
  ready: boolean;
  connections: number;
  generation: number;
}

type Msg =
  | { t: 'tlsgate:status?'; id: number }
  | { t: 'tlsgate:status'; id: number; status: WorkerStatus }
  | { t: 'tlsgate:dump?'; id: number }
  | { t: 'tlsgate:dump'; id: number; body: string }
  | { t: 'tlsgate:failed'; message: string }
  | { t: 'tlsgate:ready' };

let nextId = 1;

function ask<T>(w: Worker, q: 'tlsgate:status?' | 'tlsgate:dump?', timeoutMs = 2000): Promise<T | undefined> {
  const id = nextId++;
  return new Promise((resolve) => {
    const timer = setTimeout(() => { w.off('message', on); resolve(undefined); }, timeoutMs);
    timer.unref();
    const on = (m: Msg) => {
      if ((m.t === 'tlsgate:status' || m.t === 'tlsgate:dump') && m.id === id) {
        clearTimeout(timer);
        w.off('message', on);
        resolve((m.t === 'tlsgate:status' ? m.status : m.body) as T);
      }
    };
    w.on('message', on);
    try { w.send({ t: q, id }); } catch { clearTimeout(timer); w.off('message', on); resolve(undefined); }
  });
}

/** The primary: forks, supervises, serves the aggregated admin API. Resolves with the exit code. */
export async function runPrimary(opts: RunOptions, workers: number): Promise<number> {
  cluster.schedulingPolicy = cluster.SCHED_NONE;
  cluster.setupPrimary({ args: process.argv.slice(2) });
  const aggregator = new AggregatorRegistry();
  let stopping = false;
  let failed = 0;
  const fork = () => {
    const w = cluster.fork({ TLSGATE_WORKER: '1' });
    w.on('message', (m: Msg) => {
      if (m.t === 'tlsgate:failed') { failed++; process.stderr.write(`tlsgate: worker ${w.process.pid} could not start: ${m.message}\n`); }
    });
    return w;
  };
  // The first worker goes alone: an invalid config or a port in use fails it, and then nothing
  // else starts and no admin port is bound (the same contract as a single-process `run`).
  const first = fork();
  const firstOk = await new Promise<boolean>((resolve) => {
    first.on('message', (m: Msg) => { if (m.t === 'tlsgate:ready') resolve(true); else if (m.t === 'tlsgate:failed') resolve(false); });
    first.once('exit', () => resolve(false));
  });
  if (!firstOk) {
    stopping = true;
    if (!first.isDead()) {
      const t = setTimeout(() => first.kill('SIGKILL'), 5000);
      await new Promise<void>((r) => first.once('exit', () => r()));
      clearTimeout(t);
    }
    return 1;
  }
  for (let i = 1; i < workers; i++) fork();
  cluster.on('exit', (w, code, signal) => {
    if (stopping) return;
    if (failed > 0 && code === 1) {
      // A config error fails every worker the same way: do not respawn in a loop.
      stopping = true;
      for (const o of Object.values(cluster.workers ?? {})) o?.kill('SIGTERM');
      process.exitCode = 1;
      admin.close();
      return;
    }
    process.stderr.write(`tlsgate: worker ${w.process.pid} exited (${signal ?? code}); starting a replacement\n`);
    fork();
  });

  const list = () => Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined && !w.isDead());
  const admin = http.createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', 'http://admin');
      const ws = list();
      if (url.pathname === '/ready') {
        const st = await Promise.all(ws.map((w) => ask<WorkerStatus>(w, 'tlsgate:status?')));
        const ok = !stopping && ws.length === workers && st.every((s) => s?.ready);
        res.writeHead(ok ? 200 : 503, { 'content-type': 'text/plain' }).end(ok ? 'LIVE\n' : 'NOT READY\n');
      } else if (url.pathname === '/workers') {
        const st = await Promise.all(ws.map((w) => ask<WorkerStatus>(w, 'tlsgate:status?')));
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(st.filter(Boolean), null, 2) + '\n');
      } else if (url.pathname === '/stats/prometheus' || url.pathname === '/metrics') {
        const body = await aggregator.clusterMetrics();
        res.writeHead(200, { 'content-type': aggregator.contentType }).end(body);
      } else if (url.pathname === '/config_dump' || url.pathname === '/certs') {
        const w = ws[0];
        const body = w ? await ask<string>(w, 'tlsgate:dump?') : undefined;
        if (body === undefined) res.writeHead(503, { 'content-type': 'text/plain' }).end('no worker answered\n');
        else res.writeHead(200, { 'content-type': 'application/json' }).end(body);
      } else {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /ready /workers /config_dump /stats/prometheus\n');
      }
    })().catch((e: Error) => { if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' }).end(`${e.message}\n`); });
  });
  admin.on('clientError', (_e, s) => s.destroy());
  await new Promise<void>((resolve, reject) => {
    admin.once('error', reject);
    admin.listen(opts.adminPort, opts.adminAddress, () => resolve());
  });

  return new Promise((resolve) => {
    const stop = (sig: NodeJS.Signals) => {
      if (stopping) { process.exit(130); }
      stopping = true;
      for (const w of list()) w.process.kill(sig);
      const check = setInterval(() => {
        if (list().length === 0) {
          clearInterval(check);
          admin.closeAllConnections();
          admin.close(() => resolve(process.exitCode === 1 ? 1 : 0));
        }
      }, 50);
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGTERM'));
    process.on('SIGHUP', () => { for (const w of list()) w.process.kill('SIGHUP'); });
  });
}

/** Wires a worker's IPC answers (status, config dump) and reports its metrics registry to the primary. */
export function serveWorkerIpc(status: () => WorkerStatus, dump: () => string, registries: Parameters<typeof AggregatorRegistry.setRegistries>[0]): void {
  AggregatorRegistry.setRegistries(registries);
  // Constructing one installs prom-client's worker-side listener that answers the primary.
  void new AggregatorRegistry();
  process.on('message', (m: Msg) => {
    if (m.t === 'tlsgate:status?') process.send?.({ t: 'tlsgate:status', id: m.id, status: status() });
    else if (m.t === 'tlsgate:dump?') process.send?.({ t: 'tlsgate:dump', id: m.id, body: dump() });
  });
}

export function reportWorkerReady(): void {
  process.send?.({ t: 'tlsgate:ready' });
}

export function reportWorkerFailure(message: string): void {
  // Then let go of the IPC channel: while it is open the worker process would never exit.
  process.send?.({ t: 'tlsgate:failed', message }, undefined, {}, () => process.disconnect?.());
}

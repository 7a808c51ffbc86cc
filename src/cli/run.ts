/**
 * `tlsgate run`: load, validate, translate, then serve. An invalid config prints its
 * diagnostics and exits non-zero without binding anything. SIGTERM/SIGINT drain: /ready turns
 * 503, listeners stop accepting after --drain-grace, open connections get until --drain-timeout.
 */
import type * as http from 'node:http';
import { formatDiagnostic, hasErrors, type Diagnostic } from '../config/diagnostics.js';
import { DataPlane } from '../runtime/lifecycle.js';
import { PromTelemetry } from '../admin/telemetry.js';
import { startAdminServer } from '../admin/server.js';
import { buildSnapshot, parseLabels } from './pipeline.js';

export interface RunOptions {
  config: string[];
  adminPort: number;
  adminAddress: string;
  bindAddress: string;
  labels?: string;
  namespace: string;
  accessLog: string;
  logLevel: 'debug' | 'info' | 'warn' | 'error';
  drainGraceMs: number;
  drainTimeoutMs: number;
  clientHelloTimeoutMs: number;
}

export interface RunningGateway {
  dataPlane: DataPlane;
  admin: http.Server;
  telemetry: PromTelemetry;
  stop(): Promise<void>;
}

export async function startGateway(opts: RunOptions, out: NodeJS.WritableStream = process.stderr): Promise<RunningGateway | undefined> {
  const labels = parseLabels(opts.labels);
  const translateOptions = {
    proxyNamespace: opts.namespace,
    bindAddress: opts.bindAddress,
    clientHelloTimeoutMs: opts.clientHelloTimeoutMs,
    ...(labels ? { labels } : {}),
  };
  const result = await buildSnapshot(opts.config, translateOptions);
  let diagnostics: Diagnostic[] = result.diagnostics;
  for (const d of diagnostics) if (d.severity !== 'info') out.write(formatDiagnostic(d) + '\n');
  if (hasErrors(diagnostics)) {
    out.write(`tlsgate: configuration has errors; nothing was started\n`);
    return undefined;
  }
  if (result.snapshot.listeners.length === 0) {
    out.write(`tlsgate: warning: no listener to serve (no Gateway server${labels ? ` matches --labels ${opts.labels}` : ''})\n`);
  }
  const telemetry = new PromTelemetry({ accessLog: opts.accessLog, logLevel: opts.logLevel });
  const dataPlane = new DataPlane({ telemetry });
  let draining = false;
  const admin = await startAdminServer({
    dataPlane,
    telemetry,
    diagnostics: () => diagnostics,
    draining: () => draining,
    configSources: () => opts.config,
  }, opts.adminAddress, opts.adminPort);
  const applied = await dataPlane.apply(result.snapshot);
  for (const w of applied.warnings) out.write(`warning: ${w}\n`);
  if (!applied.ok) {
    for (const e of applied.errors) out.write(`error: ${e}\n`);
    out.write('tlsgate: could not start; nothing is served\n');
    await new Promise<void>((r) => admin.close(() => r()));
    return undefined;
  }
  telemetry.set('config_generation', dataPlane.snapshot?.generation ?? 0);
  telemetry.set('config_last_apply_success', 1);
  const ports = dataPlane.boundPorts();
  telemetry.log('info', 'tlsgate serving', { listeners: ports, admin: `${opts.adminAddress}:${(admin.address() as { port: number }).port}` });

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      draining = true;
      if (opts.drainGraceMs > 0) await sleep(opts.drainGraceMs);
      await dataPlane.stopAccepting();
      const deadline = Date.now() + opts.drainTimeoutMs;
      while (dataPlane.activeConnections() > 0 && Date.now() < deadline) await sleep(50);
      await dataPlane.close();
      telemetry.flush();
      await new Promise<void>((r) => admin.close(() => r()));
    })();
    return stopping;
  };
  diagnostics = result.diagnostics;
  return { dataPlane, admin, telemetry, stop };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function runCommand(opts: RunOptions): Promise<number> {
  const gw = await startGateway(opts);
  if (!gw) return 1;
  return new Promise((resolve) => {
    let signals = 0;
    const onSignal = (sig: string) => {
      signals++;
      if (signals > 1) { gw.telemetry.flush(); process.exit(130); }
      gw.telemetry.log('info', `${sig}: draining`, { graceMs: opts.drainGraceMs, timeoutMs: opts.drainTimeoutMs });
      void gw.stop().then(() => resolve(0));
    };
    process.on('SIGTERM', () => onSignal('SIGTERM'));
    process.on('SIGINT', () => onSignal('SIGINT'));
  });
}

/**
 * `tlsgate run`: load, validate, translate, then serve, and keep serving through changes.
 *
 * - Start: an invalid config prints its diagnostics and exits non-zero without binding anything.
 * - Reload (a watched file changed, a certificate file changed, or SIGHUP): the new snapshot is
 *   built and applied atomically. A broken edit keeps the last good snapshot serving; its
 *   diagnostics show on /config_dump. Errors confined to routing resources (a VirtualService,
 *   DestinationRule, ...) only skip those resources; an error on a Gateway or a file that does
 *   not parse refuses the whole edit, so no port is left half-configured. Identical snapshots
 *   are no-ops.
 * - SIGTERM/SIGINT drain: /ready turns 503, listeners keep accepting for --drain-grace, then stop;
 *   open connections get until --drain-timeout (HTTP/2 GOAWAY, HTTP/1.1 connection: close).
 */
import type * as http from 'node:http';
import { createHash } from 'node:crypto';
import { formatDiagnostic, hasErrors, type Diagnostic } from '../config/diagnostics.js';
import type { Snapshot } from '../model/snapshot.js';
import { DataPlane } from '../runtime/lifecycle.js';
import type { DownstreamLimits } from '../runtime/listener/listener-runtime.js';
import { PromTelemetry } from '../admin/telemetry.js';
import { startAdminServer, configDump } from '../admin/server.js';
import { FileSource, contentHash, fileDigest } from '../sources/file-source.js';
import { buildSnapshotFrom, mergeResourceSets, parseLabels } from './pipeline.js';
import { ConfigSources } from '../sources/etcd-sources.js';
import type { EtcdConnectionOptions } from '../sources/etcd.js';
import { WorkloadIdentity } from '../mesh/identity.js';
import { setRelayMode, type RelayMode } from '../runtime/chain/native-relay.js';

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
  /** Downstream limits (--max-connections, --handshake-timeout, ...); absent fields take defaults. */
  limits?: Partial<DownstreamLimits>;
  /** Watch the config paths and certificate files (default true). */
  watch?: boolean;
  /** Worker processes sharing the listeners (node:cluster); 1 = this process serves. */
  workers?: number;
  /** Sidecar role: an outbound HTTP proxy for the app instead of Gateways. */
  sidecar?: boolean;
  outboundPort?: number;
  /** Sidecar inbound: terminate mesh mTLS on this port and forward to 127.0.0.1:appPort. */
  inboundPort?: number;
  appPort?: number;
  /** Mesh identity: the service account, and where certificates come from. */
  serviceAccount?: string;
  caDir?: string;
  caUrl?: string;
  caToken?: string;
  caRoot?: string;
  workloadCertTtlMs?: number;
  /** TLS and auth for `--config etcd://...` entries. */
  etcd?: EtcdConnectionOptions;
  /** Raw TCP relay: the native addon when built (auto), required (native), or stream pipes (js). */
  relay?: RelayMode;
}

export interface ApplyRecord {
  time: string;
  trigger: string;
  ok: boolean;
  /** Generation serving after this attempt. */
  generation: number;
  message: string;
  diagnostics: Diagnostic[];
}

export interface RunningGateway {
  dataPlane: DataPlane;
  admin: http.Server;
  telemetry: PromTelemetry;
  reload(trigger: string): Promise<ApplyRecord>;
  stop(): Promise<void>;
  /** /config_dump as JSON text. */
  dump(): string;
}

/**
 * What makes two snapshots "the same", so a reload that changes nothing keeps the serving
 * generation (no GOAWAY, no connection: close): everything but generation, plus the content of
 * file certificates. On a watcher-triggered reload their digests come from the watcher, which
 * read them when it noticed the change; `digestOf` answers undefined for a file to read here
 * instead (asynchronously): one not hashed yet, or any file under --no-watch, SIGHUP or etcd.
 */
async function snapshotKey(s: Snapshot, digestOf: (file: string) => string | undefined): Promise<string> {
  const h = createHash('sha256');
  h.update(JSON.stringify({ l: s.listeners, c: s.clusters, s: s.secrets }));
  for (const f of secretFiles(s)) h.update(f).update('\0').update(digestOf(f) ?? await fileDigest(f)).update('\0');
  return h.digest('hex');
}

function secretFiles(s: Snapshot): string[] {
  const out: string[] = [];
  for (const spec of Object.values(s.secrets)) {
    if (spec.source.kind !== 'file') continue;
    for (const f of [spec.source.certChainPath, spec.source.privateKeyPath, spec.source.caPath, spec.source.crlPath]) if (f) out.push(f);
  }
  return out;
}

/** On reload: may this snapshot be applied despite its errors? Only when no Gateway and no file is broken. */
function blockingErrors(ds: Diagnostic[]): Diagnostic[] {
  return ds.filter((d) => d.severity === 'error' && (!d.resource || d.resource.kind === 'Gateway' || d.resource.kind === 'Secret'));
}

export async function startGateway(opts: RunOptions, out: NodeJS.WritableStream = process.stderr): Promise<RunningGateway | undefined> {
  const labels = parseLabels(opts.labels);
  let relay: 'native' | 'js';
  try {
    relay = setRelayMode(opts.relay ?? 'auto');
  } catch (e) {
    out.write(`tlsgate: ${(e as Error).message}\n`);
    return undefined;
  }
  // A mesh identity (SPIFFE workload certificate) when a CA is given.
  let identity: WorkloadIdentity | undefined;
  if (opts.caDir || opts.caUrl) {
    try {
      identity = await WorkloadIdentity.fromFlags({
        namespace: opts.namespace, serviceAccount: opts.serviceAccount ?? 'default',
        ...(opts.caDir ? { caDir: opts.caDir } : {}), ...(opts.caUrl ? { caUrl: opts.caUrl } : {}),
        ...(opts.caToken ? { caToken: opts.caToken } : {}), ...(opts.caRoot ? { caRoot: opts.caRoot } : {}),
        ...(opts.workloadCertTtlMs ? { ttlMs: opts.workloadCertTtlMs } : {}),
      });
    } catch (e) {
      out.write(`tlsgate: cannot obtain a workload certificate: ${(e as Error).message}\n`);
      return undefined;
    }
  }
  const sidecar = opts.sidecar ? {
    outboundAddress: opts.bindAddress,
    outboundPort: opts.outboundPort ?? 15001,
    ...(opts.appPort ? { inbound: { address: opts.bindAddress, port: opts.inboundPort ?? 15006, appPort: opts.appPort } } : {}),
  } : undefined;
  const translateOptions = {
    proxyNamespace: opts.namespace,
    bindAddress: opts.bindAddress,
    clientHelloTimeoutMs: opts.clientHelloTimeoutMs,
    ...(labels ? { labels } : {}),
    ...(sidecar ? { sidecar } : {}),
    ...(identity ? { identity: identity.spiffeId } : {}),
  };
  // Config sources: files and directories, and etcd prefixes (read once here, then watched).
  let onSourceChange = (): void => {};
  let sources: ConfigSources;
  try {
    sources = new ConfigSources(opts.config, opts.etcd ?? {}, () => onSourceChange());
  } catch (e) {
    identity?.close();
    out.write(`tlsgate: ${(e as Error).message}\n`);
    return undefined;
  }
  for (const w of sources.warnings(opts.etcd ?? {})) out.write(`tlsgate: warning: ${w}\n`);
  try {
    await sources.start();
  } catch (e) {
    sources.close();
    identity?.close();
    out.write(`tlsgate: cannot read the configuration: ${(e as Error).message}\n`);
    return undefined;
  }
  const build = async () => {
    const loaded = await sources.load();
    return { ...(await buildSnapshotFrom(mergeResourceSets(loaded.parts), translateOptions)), used: loaded.used };
  };
  // The config files as the first build read them: an edit made before the watcher took its own
  // first look (/ready answers before that) is compared against this, so it is not lost.
  const loadedHash = sources.filePaths.length > 0 ? await contentHash(sources.filePaths) : undefined;
  const first = await build();
  for (const d of first.diagnostics) if (d.severity !== 'info') out.write(formatDiagnostic(d) + '\n');
  if (hasErrors(first.diagnostics)) {
    out.write(`tlsgate: configuration has errors; nothing was started\n`);
    sources.close();
    identity?.close();
    return undefined;
  }
  if (first.snapshot.listeners.length === 0) {
    out.write(`tlsgate: warning: no listener to serve (no Gateway server${labels ? ` matches --labels ${opts.labels}` : ''})\n`);
  }
  const telemetry = new PromTelemetry({ accessLog: opts.accessLog, logLevel: opts.logLevel });
  const dataPlane = new DataPlane({ telemetry, ...(opts.limits ? { limits: opts.limits } : {}) });
  identity?.registerWith(dataPlane.certStore);
  let draining = false;
  let lastApply: ApplyRecord | undefined;
  let servingDiagnostics: Diagnostic[] = first.diagnostics;
  const adminState = {
    dataPlane,
    telemetry,
    diagnostics: () => servingDiagnostics,
    lastApply: () => lastApply,
    draining: () => draining,
    configSources: () => opts.config,
    sourceStatus: () => sources.status(),
  };
  const admin = await startAdminServer(adminState, opts.adminAddress, opts.adminPort);
  const applied = await dataPlane.apply(first.snapshot);
  for (const w of applied.warnings) out.write(`warning: ${w}\n`);
  if (!applied.ok) {
    for (const e of applied.errors) out.write(`error: ${e}\n`);
    if (applied.errors.some((e) => /workload|mesh-roots/.test(e)) && !identity) {
      out.write('hint: ISTIO_MUTUAL needs a mesh identity: start with --ca-dir <dir> (or --ca-url, --ca-token, --ca-root) and --service-account\n');
    }
    identity?.close();
    out.write('tlsgate: could not start; nothing is served\n');
    sources.close();
    await new Promise<void>((r) => admin.close(() => r()));
    return undefined;
  }
  // The watcher's digests of certificate files (set once it started; read directly before that).
  let source: FileSource | undefined;
  const digestOf = (f: string) => source?.digestOf(f);
  const record = (r: Omit<ApplyRecord, 'time' | 'generation'>): ApplyRecord => {
    lastApply = { time: new Date().toISOString(), generation: dataPlane.snapshot?.generation ?? 0, ...r };
    // Expiry of every certificate in use, labelled by Secret name (bounded: config-defined).
    for (const name of Object.keys(dataPlane.snapshot?.secrets ?? {})) {
      const leaf = dataPlane.certStore.get(name)?.leaf;
      if (leaf) telemetry.set('certificate_expiry_timestamp_seconds', new Date(leaf.notAfter).getTime() / 1000, { secret: name });
    }
    telemetry.set('config_generation', lastApply.generation);
    telemetry.set('config_last_apply_success', r.ok ? 1 : 0);
    telemetry.set('config_last_apply_timestamp_seconds', Date.now() / 1000);
    return lastApply;
  };
  // Recorded before anything else is awaited: /ready answers 200 as soon as apply() returns.
  record({ trigger: 'start', ok: true, message: 'applied', diagnostics: [] });
  let currentKey = await snapshotKey(first.snapshot, digestOf);
  sources.markServed(first.used);
  sources.setTelemetry(telemetry);
  telemetry.log('info', 'tlsgate serving', { listeners: dataPlane.boundPorts(), admin: `${opts.adminAddress}:${(admin.address() as { port: number }).port}`, generation: dataPlane.snapshot?.generation, relay });
  telemetry.set('tcp_relay_info', 1, { relay });

  // Reloads run one at a time; a change during a reload triggers one more.
  let reloading: Promise<ApplyRecord> | undefined;
  let pending = false;
  /**
   * Builds from files that hold still: a writer that truncates then writes (shell redirection,
   * writeFile) shows an empty file for a moment, and a snapshot built from that would drop
   * listeners. So read only after the content was unchanged for a short while, and build again
   * if it changed while being read.
   */
  const buildStable = async () => {
    const paths = sources.filePaths;
    if (paths.length === 0) return build();
    for (let i = 0; ; i++) {
      const before = await contentHash(paths);
      await sleep(40);
      if ((await contentHash(paths)) !== before && i < 25) continue;
      const r = await build();
      if ((await contentHash(paths)) === before || i >= 25) return r;
    }
  };
  const doReload = async (trigger: string): Promise<ApplyRecord> => {
    const r = await buildStable();
    const blocking = blockingErrors(r.diagnostics);
    if (blocking.length) {
      for (const d of blocking) telemetry.log('warn', 'config rejected: ' + formatDiagnostic(d));
      return record({ trigger, ok: false, message: `edit rejected (${blocking.length} blocking error(s)); the last good config keeps serving`, diagnostics: r.diagnostics });
    }
    // A watcher-triggered reload reuses the digests the watcher just computed; SIGHUP and etcd
    // triggers read certificate files afresh (the watcher may not have polled them yet).
    const key = await snapshotKey(r.snapshot, trigger === 'change' ? digestOf : () => undefined);
    if (key === currentKey) {
      servingDiagnostics = r.diagnostics;
      sources.markServed(r.used);
      return record({ trigger, ok: true, message: 'no change', diagnostics: r.diagnostics });
    }
    const res = await dataPlane.apply(r.snapshot);
    if (!res.ok) {
      for (const e of res.errors) telemetry.log('warn', 'config rejected: ' + e);
      return record({ trigger, ok: false, message: `edit rejected: ${res.errors.join('; ')}; the last good config keeps serving`, diagnostics: r.diagnostics });
    }
    currentKey = key;
    servingDiagnostics = r.diagnostics;
    sources.markServed(r.used);
    source?.setExtraFiles(secretFiles(r.snapshot));
    const skipped = r.diagnostics.filter((d) => d.severity === 'error');
    for (const d of skipped) telemetry.log('warn', 'resource skipped: ' + formatDiagnostic(d));
    telemetry.log('info', 'config applied', { generation: dataPlane.snapshot?.generation, trigger, skipped: skipped.length });
    return record({ trigger, ok: true, message: skipped.length ? `applied; ${skipped.length} resource error(s) skipped` : 'applied', diagnostics: r.diagnostics });
  };
  const reload = (trigger: string): Promise<ApplyRecord> => {
    if (reloading) {
      pending = true;
      return reloading;
    }
    reloading = doReload(trigger).catch((e: Error) => record({ trigger, ok: false, message: `reload failed: ${e.message}`, diagnostics: [] }))
      .finally(() => {
        reloading = undefined;
        if (pending) { pending = false; void reload('change'); }
      });
    return reloading;
  };

  // A renewed workload certificate: re-apply the serving snapshot so new handshakes use it
  // (contexts are keyed by certificate content); open connections keep theirs.
  identity?.onRotate((e) => {
    const snap = dataPlane.snapshot;
    if (!snap) return;
    void dataPlane.apply(snap).then((r) => {
      telemetry.log(r.ok ? 'info' : 'warn', r.ok ? 'workload certificate rotated' : 'workload certificate rotation not applied', { spiffeId: e.spiffeId, serial: e.serial, errors: r.errors });
      if (r.ok) record({ trigger: 'certificate-rotation', ok: true, message: `workload certificate ${e.serial} in use`, diagnostics: [] });
    });
  });

  // A new whole etcd generation is applied like a file edit (always watched: it is the point of a store).
  onSourceChange = () => void reload('etcd');

  if (opts.watch !== false) {
    // The backstop poll: every 5 s while every directory that matters is watched on a local
    // filesystem, every 500 ms otherwise (see FileSource).
    source = new FileSource(sources.filePaths, () => void reload('change'), { pollMs: 500, watchedPollMs: 5_000 });
    source.setExtraFiles(secretFiles(first.snapshot));
    await source.start();
    if (loadedHash !== undefined && (await contentHash(sources.filePaths)) !== loadedHash) void reload('change');
  }

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      draining = true;
      source?.close();
      sources.close();
      if (opts.drainGraceMs > 0) await sleep(opts.drainGraceMs);
      await dataPlane.stopAccepting();
      const deadline = Date.now() + opts.drainTimeoutMs;
      while (dataPlane.activeConnections() > 0 && Date.now() < deadline) {
        dataPlane.closeIdle();
        await sleep(50);
      }
      await dataPlane.close();
      identity?.close();
      telemetry.flush();
      const closed = new Promise<void>((r) => admin.close(() => r()));
      admin.closeAllConnections();
      await closed;
    })();
    return stopping;
  };
  return { dataPlane, admin, telemetry, reload, stop, dump: () => JSON.stringify(configDump(adminState), null, 2) + '\n' };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function runCommand(opts: RunOptions): Promise<number> {
  const workers = opts.workers ?? 1;
  const isWorker = process.env['TLSGATE_WORKER'] === '1';
  if (workers > 1 && !isWorker) {
    const { runPrimary } = await import('./workers.js');
    return runPrimary(opts, workers);
  }
  // Signal handlers go in before anything is served: /ready answers 200 while startGateway is
  // still finishing, and a SIGTERM in that window must drain, not kill the process outright.
  let gw: RunningGateway | undefined;
  let early: string | undefined;
  let signals = 0;
  let resolveDone: (code: number) => void = () => {};
  const done = new Promise<number>((r) => { resolveDone = r; });
  const onSignal = (sig: string) => {
    signals++;
    if (!gw) { early = sig; return; }
    if (signals > 1) { gw.telemetry.flush(); process.exit(130); }
    gw.telemetry.log('info', `${sig}: draining`, { graceMs: opts.drainGraceMs, timeoutMs: opts.drainTimeoutMs });
    void gw.stop().then(() => resolveDone(0));
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGHUP', () => {
    if (!gw) return;
    gw.telemetry.log('info', 'SIGHUP: reloading');
    void gw.reload('SIGHUP');
  });
  // A worker's own admin server is private (an ephemeral loopback port); the primary serves the API.
  gw = await startGateway(isWorker ? { ...opts, adminPort: 0, adminAddress: '127.0.0.1' } : opts);
  if (isWorker) {
    const { serveWorkerIpc, reportWorkerFailure, reportWorkerReady } = await import('./workers.js');
    if (!gw) { reportWorkerFailure('configuration or certificate errors (see above)'); return 1; }
    const g = gw;
    serveWorkerIpc(() => ({
      pid: process.pid, ready: g.dataPlane.ready, connections: g.dataPlane.activeConnections(), generation: g.dataPlane.snapshot?.generation ?? 0,
    }), () => g.dump(), [g.telemetry.registry]);
    reportWorkerReady();
  }
  if (!gw) return 1;
  if (early) { signals = 0; onSignal(early); }
  // A worker's IPC channel to the primary keeps its event loop alive: let go once drained.
  return isWorker ? done.then((code) => { process.disconnect?.(); return code; }) : done;
}

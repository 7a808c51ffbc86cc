/**
 * The Telemetry implementation: access-log entries as JSON lines through pino with an
 * asynchronous destination (writes are batched off the request path), operational logs on
 * stderr, and Prometheus metrics through prom-client. Metric names get the `tlsgate_` prefix;
 * label values never come from clients (no SNI or Host labels) so cardinality stays bounded.
 */
import pino, { type Logger } from 'pino';
import * as client from 'prom-client';
import type { AccessLogEntry, Telemetry } from '../runtime/telemetry.js';
import { LoopDelayMonitor } from './loop-delay.js';

export interface TelemetryOptions {
  /** 'stdout' (default), 'off', or a file path. */
  accessLog?: string;
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  /** Access-log entries kept in memory for the dashboard (default 200; 0 keeps none). */
  recentEntries?: number;
}

/** Called with each access-log entry; runs on the request path, so it must only queue. */
export type AccessLogListener = (entry: AccessLogEntry) => void;

type Metric = client.Counter<string> | client.Gauge<string> | client.Histogram<string>;

/** Increments of one label set not yet handed to prom-client. */
interface Cell {
  values: Record<string, string>;
  pending: number;
  /** Histograms: observations not yet handed over (at most SAMPLES_HELD). */
  samples?: number[];
}

/** A histogram cell hands its observations to prom-client at collection or when this many wait. */
const SAMPLES_HELD = 256;

/** Cells by label value, one level per label name (sorted), the last level holding the cells. */
type CellTree = Map<string, CellTree | Cell>;

interface Entry {
  m: Metric;
  labels: string[];
  cells: CellTree;
  /** Every cell of the tree, for collection. */
  all: Cell[];
}

function flushSamples(m: client.Histogram<string>, c: Cell): void {
  const s = c.samples;
  if (s === undefined || s.length === 0) return;
  for (const v of s) m.observe(c.values, v);
  s.length = 0;
}

function flushCells(m: Metric, cells: readonly Cell[]): void {
  if (m instanceof client.Histogram) {
    for (const c of cells) flushSamples(m, c);
    return;
  }
  for (const c of cells) {
    if (c.pending === 0) continue;
    (m as client.Counter<string>).inc(c.values, c.pending);
    c.pending = 0;
  }
}

const HELP: Record<string, string> = {
  downstream_connections_total: 'Connections accepted, per listener',
  downstream_connections_active: 'Open downstream connections, per listener',
  downstream_connections_refused_total: 'Connections closed before a filter chain took them, by reason',
  tls_handshakes_total: 'Downstream TLS handshakes by result and reason',
  tls_inspector_sni_found_total: 'ClientHellos with SNI',
  native_routed_connections_total: 'Connections the native relay routed by an SNI it learned, with no call into JS',
  tls_inspector_sni_not_found_total: 'ClientHellos without SNI',
  tls_inspector_tls_not_found_total: 'Connections whose first bytes were not a ClientHello',
  tls_inspector_client_hello_too_large_total: 'ClientHellos over the size cap',
  requests_total: 'HTTP requests by listener, route and status class',
  upstream_connect_errors_total: 'Upstream connect failures per cluster',
  upstream_connect_seconds: 'Upstream connect latency per cluster',
  tcp_connections_total: 'Proxied TCP/passthrough connections by termination reason',
};

export class PromTelemetry implements Telemetry {
  readonly registry = new client.Registry();
  /** The event-loop delay gauges' sampler (runs while the loop is busy). */
  readonly loopDelay: LoopDelayMonitor;
  readonly #metrics = new Map<string, Entry>();
  readonly #accessDest: ReturnType<typeof pino.destination> | undefined;
  readonly #log: Logger;
  // The last N entries, as a fixed-size ring: the dashboard's "recent requests" without reading logs.
  readonly #ring: (AccessLogEntry | undefined)[];
  #ringNext = 0;
  readonly #listeners = new Set<AccessLogListener>();
  readonly #collectHooks = new Set<() => void>();
  /** Each metric's collect calls this; the hooks run once per read of the registry. */
  #hooksRan = false;

  #beforeCollect(): void {
    if (this.#hooksRan || this.#collectHooks.size === 0) return;
    this.#hooksRan = true;
    // Every metric of one read is collected in the same tick; the next read runs the hooks again.
    queueMicrotask(() => { this.#hooksRan = false; });
    for (const h of this.#collectHooks) {
      try { h(); } catch { /* a hook must never break a scrape */ }
    }
  }

  onCollect(hook: () => void): () => void {
    this.#collectHooks.add(hook);
    return () => { this.#collectHooks.delete(hook); };
  }

  constructor(opts: TelemetryOptions = {}) {
    this.#ring = new Array<AccessLogEntry | undefined>(Math.max(0, Math.min(opts.recentEntries ?? 200, 10_000)));
    const where = opts.accessLog ?? 'stdout';
    if (where !== 'off') {
      this.#accessDest = pino.destination({ dest: where === 'stdout' ? 1 : where, sync: false, minLength: 0, mkdir: true });
    }
    this.#log = pino({ level: opts.logLevel ?? 'info', base: null, messageKey: 'msg' }, pino.destination({ dest: 2, sync: true }));
    // prom-client's event-loop delay sampler runs all the time and woke an idle proxy 10 times a
    // second: its timer is parked (about 24 days) and its seven delay gauges are replaced by ones
    // whose sampler runs only while the loop is busy (loop-delay.ts), at the same 100 ms.
    client.collectDefaultMetrics({ register: this.registry, prefix: 'tlsgate_', eventLoopMonitoringPrecision: 2 ** 31 - 1 });
    this.loopDelay = new LoopDelayMonitor(this.registry, 'tlsgate_', { resolutionMs: 100 });
  }

  accessLog(entry: AccessLogEntry): void {
    if (this.#ring.length > 0) {
      this.#ring[this.#ringNext] = entry;
      this.#ringNext = (this.#ringNext + 1) % this.#ring.length;
    }
    for (const l of this.#listeners) {
      try { l(entry); } catch { /* a dashboard subscriber must never break a request */ }
    }
    // Serialised here rather than through a pino logger: pino with the level formatter removed
    // wrote lines starting with `{,`, which no JSON reader accepts.
    if (this.#accessDest === undefined) return;
    let line: string;
    try {
      line = JSON.stringify(entry);
    } catch {
      return; // an entry that cannot be serialised must never break a request
    }
    this.#accessDest.write(line + '\n');
  }

  /** The most recent access-log entries, oldest first (at most `recentEntries`). */
  recent(limit = Infinity): AccessLogEntry[] {
    const n = this.#ring.length;
    const out: AccessLogEntry[] = [];
    for (let i = 0; i < n; i++) {
      const e = this.#ring[(this.#ringNext + i) % n];
      if (e !== undefined) out.push(e);
    }
    return limit < out.length ? out.slice(out.length - limit) : out;
  }

  /** Subscribes to access-log entries as they are written; returns the unsubscribe function. */
  subscribe(listener: AccessLogListener): () => void {
    this.#listeners.add(listener);
    return () => { this.#listeners.delete(listener); };
  }

  #entry(kind: 'counter' | 'gauge' | 'histogram', name: string, labels: Record<string, string> | undefined): Entry {
    let e = this.#metrics.get(name);
    if (!e) {
      const labelNames = Object.keys(labels ?? {}).sort();
      const cells: CellTree = new Map();
      const all: Cell[] = [];
      const cfg = { name: `tlsgate_${name}`, help: HELP[name] ?? name.replace(/_/g, ' '), labelNames, registers: [this.registry] };
      // Counters and gauges hand their pending increments to prom-client when they are read.
      // Histograms likewise hand over their held observations.
      const collect = (): void => {
        this.#beforeCollect();
        flushCells(m, all);
      };
      const m: Metric = kind === 'counter' ? new client.Counter({ ...cfg, collect })
        : kind === 'gauge' ? new client.Gauge({ ...cfg, collect })
        : new client.Histogram({ ...cfg, collect, buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10] });
      e = { m, labels: labelNames, cells, all };
      this.#metrics.set(name, e);
    }
    return e;
  }

  #values(e: Entry, labels: Record<string, string> | undefined): Record<string, string> {
    const values: Record<string, string> = {};
    for (const l of e.labels) values[l] = labels?.[l] ?? '';
    return values;
  }

  /**
   * The accumulator of one label set. Counting runs per request and per connection; prom-client's
   * inc() validates and hashes the label object every call, so the hot path only adds to a number
   * found by a string key, and prom-client sees the sum when the metric is collected.
   */
  #cell(kind: 'counter' | 'gauge' | 'histogram', name: string, labels: Record<string, string> | undefined): { e: Entry; cell: Cell } {
    const e = this.#entry(kind, name, labels);
    // One Map level per label, keyed by the value itself: label values are mostly the same string
    // objects call after call (listener and route names), whose hashes V8 keeps, so no key string
    // is built or hashed per call.
    let node: CellTree = e.cells;
    const n = e.labels.length;
    for (let i = 0; i < n - 1; i++) {
      const v = labels?.[e.labels[i]!] ?? '';
      let next = node.get(v) as CellTree | undefined;
      if (next === undefined) node.set(v, (next = new Map()));
      node = next;
    }
    const last = n === 0 ? '' : labels?.[e.labels[n - 1]!] ?? '';
    let cell = node.get(last) as Cell | undefined;
    if (cell === undefined) {
      cell = { values: this.#values(e, labels), pending: 0 };
      node.set(last, cell);
      e.all.push(cell);
      // The series exists from its first use, as it did when every call went to prom-client.
      if (kind === 'histogram') cell.samples = [];
      else (e.m as client.Counter<string>).inc(cell.values, 0);
    }
    return { e, cell };
  }

  counter(name: string, labels?: Record<string, string>): (by?: number) => void {
    const { cell } = this.#cell('counter', name, labels);
    return (by = 1) => {
      if (by >= 0) cell.pending += by;
    };
  }

  /** Whether an access-log entry has anywhere to go: the log, the recent ring or a subscriber. */
  get accessLogEnabled(): boolean {
    return this.#accessDest !== undefined || this.#ring.length > 0 || this.#listeners.size > 0;
  }

  count(name: string, labels?: Record<string, string>, by = 1): void {
    // A counter never goes down (prom-client would throw at collection time).
    if (!(by >= 0)) return;
    this.#cell('counter', name, labels).cell.pending += by;
  }

  gauge(name: string, delta: number, labels?: Record<string, string>): void {
    if (!Number.isFinite(delta)) return;
    this.#cell('gauge', name, labels).cell.pending += delta;
  }

  observe(name: string, seconds: number, labels?: Record<string, string>): void {
    if (!Number.isFinite(seconds)) return;
    // Held in the label set's cell like counter increments (prom-client hashes the labels per call).
    const { e, cell } = this.#cell('histogram', name, labels);
    cell.samples!.push(seconds);
    if (cell.samples!.length >= SAMPLES_HELD) flushSamples(e.m as client.Histogram<string>, cell);
  }

  /** Sets a gauge to an absolute value (config generation, certificate expiry). */
  set(name: string, value: number, labels?: Record<string, string>): void {
    const { e, cell } = this.#cell('gauge', name, labels);
    cell.pending = 0; // increments before an absolute value are superseded by it
    (e.m as client.Gauge<string>).set(cell.values, value);
  }

  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.#log[level](fields ?? {}, msg);
  }

  flush(): void {
    try { this.#accessDest?.flushSync(); } catch { /* not ready yet or closed */ }
  }
}

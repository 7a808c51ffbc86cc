/**
 * The Telemetry implementation: access-log entries as JSON lines through pino with an
 * asynchronous destination (writes are batched off the request path), operational logs on
 * stderr, and Prometheus metrics through prom-client. Metric names get the `tlsgate_` prefix;
 * label values never come from clients (no SNI or Host labels) so cardinality stays bounded.
 */
import pino, { type Logger } from 'pino';
import * as client from 'prom-client';
import type { AccessLogEntry, Telemetry } from '../runtime/telemetry.js';

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

const HELP: Record<string, string> = {
  downstream_connections_total: 'Connections accepted, per listener',
  downstream_connections_active: 'Open downstream connections, per listener',
  downstream_connections_refused_total: 'Connections closed before a filter chain took them, by reason',
  tls_handshakes_total: 'Downstream TLS handshakes by result and reason',
  tls_inspector_sni_found_total: 'ClientHellos with SNI',
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
  readonly #metrics = new Map<string, { m: Metric; labels: string[] }>();
  readonly #accessDest: ReturnType<typeof pino.destination> | undefined;
  readonly #log: Logger;
  // The last N entries, as a fixed-size ring: the dashboard's "recent requests" without reading logs.
  readonly #ring: (AccessLogEntry | undefined)[];
  #ringNext = 0;
  readonly #listeners = new Set<AccessLogListener>();

  constructor(opts: TelemetryOptions = {}) {
    this.#ring = new Array<AccessLogEntry | undefined>(Math.max(0, Math.min(opts.recentEntries ?? 200, 10_000)));
    const where = opts.accessLog ?? 'stdout';
    if (where !== 'off') {
      this.#accessDest = pino.destination({ dest: where === 'stdout' ? 1 : where, sync: false, minLength: 0, mkdir: true });
    }
    this.#log = pino({ level: opts.logLevel ?? 'info', base: null, messageKey: 'msg' }, pino.destination({ dest: 2, sync: true }));
    client.collectDefaultMetrics({ register: this.registry, prefix: 'tlsgate_' });
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

  #get(kind: 'counter' | 'gauge' | 'histogram', name: string, labels: Record<string, string> | undefined): { m: Metric; values: Record<string, string> } {
    let e = this.#metrics.get(name);
    if (!e) {
      const labelNames = Object.keys(labels ?? {}).sort();
      const cfg = { name: `tlsgate_${name}`, help: HELP[name] ?? name.replace(/_/g, ' '), labelNames, registers: [this.registry] };
      const m = kind === 'counter' ? new client.Counter(cfg)
        : kind === 'gauge' ? new client.Gauge(cfg)
        : new client.Histogram({ ...cfg, buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10] });
      e = { m, labels: labelNames };
      this.#metrics.set(name, e);
    }
    const values: Record<string, string> = {};
    for (const l of e.labels) values[l] = labels?.[l] ?? '';
    return { m: e.m, values };
  }

  count(name: string, labels?: Record<string, string>, by = 1): void {
    const { m, values } = this.#get('counter', name, labels);
    (m as client.Counter<string>).inc(values, by);
  }

  gauge(name: string, delta: number, labels?: Record<string, string>): void {
    const { m, values } = this.#get('gauge', name, labels);
    (m as client.Gauge<string>).inc(values, delta);
  }

  observe(name: string, seconds: number, labels?: Record<string, string>): void {
    const { m, values } = this.#get('histogram', name, labels);
    (m as client.Histogram<string>).observe(values, seconds);
  }

  /** Sets a gauge to an absolute value (config generation, certificate expiry). */
  set(name: string, value: number, labels?: Record<string, string>): void {
    const { m, values } = this.#get('gauge', name, labels);
    (m as client.Gauge<string>).set(values, value);
  }

  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.#log[level](fields ?? {}, msg);
  }

  flush(): void {
    try { this.#accessDest?.flushSync(); } catch { /* not ready yet or closed */ }
  }
}

/**
 * What the data plane reports: access-log entries and counters. The runtime only calls this
 * interface; admin/ provides the implementation (pino off the request path, prom-client), and
 * tests can pass their own. Keeping it an interface keeps runtime/ free of admin/ imports.
 */

/** Documented termination / failure reasons (docs/access-log.md). */
export type Reason =
  | 'ok'
  | 'no_route' // HTTP: no virtual host / route matched (404)
  | 'misdirected_request' // HTTP: Host belongs to another server on this listener (421)
  | 'https_redirect'
  | 'redirect'
  | 'direct_response'
  | 'no_filter_chain' // no chain for the SNI / transport
  | 'no_sni' // TLS without SNI and no catch-all chain
  | 'no_sni_match' // SNI present but unknown
  | 'not_tls' // plaintext on a TLS-only listener
  | 'listener_overflow' // connection refused: the listener is at --max-connections
  | 'client_hello_timeout'
  | 'client_hello_too_large'
  | 'client_hello_malformed'
  | 'downstream_closed_early'
  | 'tls_handshake_failed'
  | 'tls_handshake_timeout'
  | 'client_cert_required'
  | 'client_cert_rejected'
  | 'invalid_backend' // HTTP 500 / connection closed: the weights chose a Gateway API backendRef that did not resolve
  | 'no_healthy_upstream' // 503
  | 'upstream_connect_failed' // 503
  | 'upstream_connect_timeout' // 503
  | 'upstream_tls_failed' // 503 / close
  | 'upstream_reset' // 502/503
  | 'upstream_timeout' // 504
  | 'upstream_overflow' // 503: circuit breaker
  | 'downstream_reset'
  | 'idle_timeout'
  | 'bad_request'
  | 'request_headers_timeout' // HTTP 408: headers not complete within --request-headers-timeout
  | 'request_headers_too_large' // HTTP 431: header block over the size or count limit
  | 'proxy_protocol_untrusted' // a PROXY header from a peer not in the trusted CIDRs
  | 'proxy_protocol_missing' // a PROXY-protocol listener got no header
  | 'proxy_protocol_malformed'
  | 'proxy_protocol_timeout'
  | 'internal_error';

export interface AccessLogEntry {
  [key: string]: unknown;
}

export interface Telemetry {
  /** One entry per HTTP request or per TCP/passthrough connection. Must not block. */
  accessLog(entry: AccessLogEntry): void;
  /** Increment a named counter with bounded labels (no client-controlled values). */
  count(name: string, labels?: Record<string, string>, by?: number): void;
  /** Observe a duration in seconds on a named histogram. */
  observe(name: string, seconds: number, labels?: Record<string, string>): void;
  /** Gauge add (+1/-1) for active counts. */
  gauge(name: string, delta: number, labels?: Record<string, string>): void;
  /** Operational log (warnings, errors); never secrets. */
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
  /**
   * Optional: an incrementer for one counter and label set, for callers that count the same
   * series on every request and keep the function (no label object or lookup per increment).
   * Equivalent to `(by) => count(name, labels, by)`.
   */
  counter?(name: string, labels?: Record<string, string>): (by?: number) => void;
  /** Optional: whether access-log entries go anywhere (a file, stdout, the recent-requests ring or a subscriber). */
  readonly accessLogEnabled?: boolean;
  /**
   * Optional: `hook` runs whenever metrics are read, before they are, to count what is kept
   * elsewhere (the native relay's refusals); returns the unsubscribe function.
   */
  onCollect?(hook: () => void): () => void;
}

/** `telemetry.counter` when it has one, else a function over `count` with the same effect. */
export function counterOf(t: Telemetry, name: string, labels?: Record<string, string>): (by?: number) => void {
  if (t.counter !== undefined) return t.counter(name, labels);
  return (by = 1) => t.count(name, labels, by);
}

/** A Telemetry that drops everything (unit tests of pure parts). */
export const nullTelemetry: Telemetry = {
  accessLog() {},
  count() {},
  observe() {},
  gauge() {},
  log() {},
};

/**
 * The data plane: apply(snapshot) binds new listeners, swaps the config of existing ones and
 * drains removed ones; secrets are loaded and validated before the swap, so a snapshot whose
 * certificates cannot be used is refused whole and the previous one keeps serving.
 */
import * as http from 'node:http';
import * as http2 from 'node:http2';
import type * as net from 'node:net';
import type { SecureContext } from 'node:tls';
import type { FilterChain, Listener, Snapshot } from '../model/snapshot.js';
import type { Telemetry } from './telemetry.js';
import { DEFAULT_LIMITS, ListenerRuntime, type ChainRuntime, type DownstreamLimits } from './listener/listener-runtime.js';
import { CertStore } from './pki/cert-store.js';
import { SecureContextCache } from './pki/context-cache.js';
import { ClusterManager } from './upstream/cluster-manager.js';
import { createHttpHandler } from './chain/http.js';
import { handleConnect } from './chain/connect.js';

export interface ApplyResult {
  ok: boolean;
  errors: string[];
  warnings: string[];
}

export interface DataPlaneOptions {
  telemetry: Telemetry;
  /** Downstream limits from flags; each absent field takes its default (DEFAULT_LIMITS). */
  limits?: Partial<DownstreamLimits>;
}

/** HTTP/1.1 keep-alive idle timeout. */
const KEEP_ALIVE_TIMEOUT_MS = 60_000;

/** Idle HTTP/2 session (no frames either way) before it is closed: Envoy's stream idle default. */
const H2_SESSION_IDLE_MS = 300_000;

/**
 * HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and cancels them before any
 * response makes us do the routing and upstream work for nothing. Once a session has opened
 * PREMATURE_RESET_MIN_STREAMS streams, more than half of them reset by the client within
 * PREMATURE_RESET_LIFETIME_MS of opening closes it with GOAWAY ENHANCE_YOUR_CALM (Envoy's rule).
 */
const PREMATURE_RESET_MIN_STREAMS = 200;
const PREMATURE_RESET_LIFETIME_MS = 1_000;

function guardPrematureResets(session: http2.ServerHttp2Session, onClose: () => void): void {
  let total = 0;
  let premature = 0;
  let closing = false;
  session.on('stream', (stream: http2.ServerHttp2Stream) => {
    total++;
    const opened = performance.now();
    stream.once('close', () => {
      if (stream.rstCode === 0 || stream.headersSent || performance.now() - opened > PREMATURE_RESET_LIFETIME_MS) return;
      premature++;
      if (total >= PREMATURE_RESET_MIN_STREAMS && premature * 2 > total && !closing && !session.destroyed) {
        closing = true;
        onClose();
        // GOAWAY refuses further streams at once; the socket goes after the frame had time to leave.
        session.goaway(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
        setTimeout(() => session.destroy(), 100).unref();
      }
    });
  });
}

/** The status line Node's HTTP/1.1 parser errors map to; the rest are 400. */
function clientErrorStatus(code: string | undefined): { status: number; text: string; reason: 'bad_request' | 'request_headers_timeout' | 'request_headers_too_large' } {
  if (code === 'HPE_HEADER_OVERFLOW') return { status: 431, text: 'Request Header Fields Too Large', reason: 'request_headers_too_large' };
  if (code === 'ERR_HTTP_REQUEST_TIMEOUT') return { status: 408, text: 'Request Timeout', reason: 'request_headers_timeout' };
  return { status: 400, text: 'Bad Request', reason: 'bad_request' };
}

/** A header list's size as HTTP/2 counts it (RFC 9113 6.5.2): name + value + 32 octets per field. */
function headerListSize(raw: readonly string[]): number {
  let n = 0;
  for (let i = 0; i + 1 < raw.length; i += 2) n += raw[i]!.length + raw[i + 1]!.length + 32;
  return n;
}

type HttpServers = { h1: http.Server; h2?: http2.Http2Server };

/** Everything built for one snapshot generation. */
class Generation implements ChainRuntime {
  readonly #http = new Map<FilterChain, HttpServers>();
  readonly #contexts = new Map<FilterChain, SecureContext | { error: string }>();
  readonly #sessions = new Set<http2.ServerHttp2Session>();
  /** Set when a newer generation took over or the process drains: finish, then close. */
  #retired = false;
  limits: DownstreamLimits = DEFAULT_LIMITS;

  constructor(
    readonly snapshot: Snapshot,
    readonly clusters: ClusterManager,
    readonly telemetry: Telemetry,
    private readonly certs: CertStore,
    private readonly contextCache: SecureContextCache,
  ) {}

  serverContext(chain: FilterChain): SecureContext | { error: string } {
    let c = this.#contexts.get(chain);
    if (!c) {
      c = this.contextCache.getServerContext(chain.tls!, (n) => this.certs.get(n));
      this.#contexts.set(chain, c);
    }
    return c;
  }

  serveHttp(chain: FilterChain, socket: net.Socket, listener: Listener): void {
    if (chain.filter.kind !== 'http') return;
    let s = this.#http.get(chain);
    if (!s) {
      const handler = createHttpHandler(chain.filter, { clusters: this.clusters, telemetry: this.telemetry, listenerPort: listener.port });
      // HTTP/1.1 on a retired generation: answer, then close (`connection: close`), so the
      // client's next request opens a connection that uses the newest config.
      const h1Handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
        if (this.#retired) res.shouldKeepAlive = false;
        // Node keeps the first maxHeadersCount fields and drops the rest silently; one more than
        // the limit is allowed in, so reaching it means the client sent too many.
        if (req.rawHeaders.length > 2 * limits.maxRequestHeaders) {
          res.shouldKeepAlive = false;
          res.writeHead(431, { 'content-type': 'text/plain', connection: 'close' }).end('too many request headers\n');
          this.#clientError(listener.name, 431, 'request_headers_too_large', req.socket);
          return;
        }
        (handler as http.RequestListener)(req, res);
      };
      const limits = this.limits;
      const h1 = http.createServer({
        keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
        headersTimeout: limits.requestHeadersTimeoutMs,
        requestTimeout: Math.max(300_000, limits.requestHeadersTimeoutMs),
        maxHeaderSize: limits.maxRequestHeaderBytes,
        // Node checks the header and request timeouts on this interval (default 30 s).
        connectionsCheckingInterval: Math.min(1_000, limits.requestHeadersTimeoutMs),
      }, h1Handler);
      h1.maxHeadersCount = limits.maxRequestHeaders + 1;
      // Node enforces headersTimeout/requestTimeout only for servers that emitted 'listening'
      // (that starts its connection tracking); ours never listen, sockets are handed over.
      h1.emit('listening');
      h1.on('clientError', (e: Error & { code?: string }, sock: net.Socket) => {
        // A parse error, an oversized header block or a header timeout: answer with the status
        // when nothing was written on this connection yet, count it, then close. Never forwarded.
        const { status, text, reason } = clientErrorStatus(e.code);
        const started = (sock as { _httpMessage?: { headersSent?: boolean } })._httpMessage;
        if (sock.writable && started?.headersSent !== true) {
          sock.end(`HTTP/1.1 ${status} ${text}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`);
          setTimeout(() => sock.destroy(), 1_000).unref();
        } else sock.destroy();
        this.#clientError(listener.name, status, reason, sock, e.code);
      });
      const tunnels = chain.filter.connectRoutes;
      if (tunnels?.length) {
        h1.on('connect', (req: http.IncomingMessage, sock: net.Socket, head: Buffer) =>
          handleConnect(tunnels, req, sock, head, { clusters: this.clusters, telemetry: this.telemetry, clientHelloTimeoutMs: listener.clientHelloTimeoutMs }));
      }
      s = { h1 };
      if (chain.tls) {
        // The TLS handshake is ours; this server only speaks HTTP/2 (or HTTP/1.1 by ALPN) over it.
        // Over the field count, nghttp2 resets the stream (ENHANCE_YOUR_CALM); its count includes
        // the four request pseudo-headers, so the same number of fields as HTTP/1.1 gets in.
        // The size limit is our SETTINGS_MAX_HEADER_LIST_SIZE, which Node enforces (same reset)
        // only once the client acknowledged those SETTINGS: the requests a client sends with its
        // preface are checked here instead, and get the 431 HTTP/1.1 would.
        const h2Handler = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
          if (headerListSize(req.rawHeaders) > limits.maxRequestHeaderBytes) {
            res.writeHead(431, { 'content-type': 'text/plain' }).end('request header fields too large\n');
            this.#clientError(listener.name, 431, 'request_headers_too_large', req.socket as net.Socket);
            return;
          }
          (handler as unknown as (q: http2.Http2ServerRequest, r: http2.Http2ServerResponse) => void)(req, res);
        };
        const h2 = http2.createServer({
          settings: { maxConcurrentStreams: 100, maxHeaderListSize: limits.maxRequestHeaderBytes },
          maxHeaderListPairs: limits.maxRequestHeaders + 4,
        }, h2Handler);
        h2.setTimeout(H2_SESSION_IDLE_MS);
        h2.on('sessionError', () => {});
        h2.on('session', (session: http2.ServerHttp2Session) => {
          if (this.#retired) { session.close(); return; }
          this.#sessions.add(session);
          session.once('close', () => this.#sessions.delete(session));
          guardPrematureResets(session, () => this.telemetry.count('http2_premature_reset_closes_total', { listener: listener.name }));
        });
        s.h2 = h2;
      }
      this.#http.set(chain, s);
    }
    // ALPN decided the protocol during our handshake: h2 goes to the HTTP/2 server, anything
    // else (http/1.1 or no ALPN) to the HTTP/1.1 server, exactly as an https.Server would.
    const alpn = (socket as { alpnProtocol?: string | false }).alpnProtocol;
    if (s.h2 && (alpn === 'h2' || alpn === 'istio-h2')) {
      s.h2.emit('connection', socket);
    } else {
      s.h1.emit('connection', socket);
    }
  }

  /** A request refused by the HTTP/1.1 codec (never reached the router): one access-log entry and count. */
  #clientError(listener: string, status: number, reason: string, sock: net.Socket, code?: string): void {
    try {
      this.telemetry.count('requests_total', { listener, route: '', code_class: '4xx' });
      this.telemetry.accessLog({
        time: new Date().toISOString(), downstreamAddress: sock.remoteAddress, listener, status, reason, detail: code,
      });
    } catch {
      // telemetry never breaks a connection
    }
  }

  /** Wraps up idle keep-alive connections of this generation's HTTP servers. */
  closeIdle(): void {
    for (const s of this.#http.values()) s.h1.closeIdleConnections();
  }

  /**
   * A newer generation took over (or the process drains): HTTP/1.1 connections close after their
   * next response; HTTP/2 sessions get GOAWAY and finish their streams.
   */
  retire(): void {
    this.#retired = true;
    // Idle keep-alive connections are not closed here: a client may already be writing its next
    // request on one, and it would see a reset. Their next response says `connection: close`, or
    // the keep-alive timeout ends them. After that window nothing idle is left to race with, and
    // close() stops the servers' header-timeout tracking (which keeps the generation alive).
    const t = setTimeout(() => { for (const s of this.#http.values()) s.h1.close(); },
      KEEP_ALIVE_TIMEOUT_MS + this.limits.requestHeadersTimeoutMs + 2_000);
    t.unref();
    for (const s of this.#sessions) s.close();
  }
}

export class DataPlane {
  readonly #listeners = new Map<string, ListenerRuntime>();
  readonly #certs = new CertStore();
  readonly #contexts = new SecureContextCache();
  #clusters: ClusterManager | undefined;
  #current: Generation | undefined;
  #generation = 0;
  #ready = false;

  constructor(private readonly opts: DataPlaneOptions) {}

  get ready(): boolean {
    return this.#ready;
  }

  get snapshot(): Snapshot | undefined {
    return this.#current?.snapshot;
  }

  get certStore(): CertStore {
    return this.#certs;
  }

  /** Ports actually bound, by listener name. */
  boundPorts(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [n, l] of this.#listeners) out[n] = l.boundPort();
    return out;
  }

  async apply(input: Snapshot): Promise<ApplyResult> {
    const errors: string[] = [];
    const warnings: string[] = [];
    // 1. Secrets first: a snapshot with unusable certificates is refused whole.
    for (const spec of Object.values(input.secrets)) {
      const r = await this.#certs.load(spec);
      if ('error' in r && typeof r.error === 'string') errors.push(r.error);
      else if ('warnings' in r) warnings.push(...r.warnings);
    }
    if (errors.length) return { ok: false, errors, warnings };
    const snapshot: Snapshot = { ...input, generation: ++this.#generation };
    const secretLookup = (n: string) => this.#certs.get(n);
    if (!this.#clusters) this.#clusters = new ClusterManager(snapshot.clusters, { secrets: secretLookup });
    else this.#clusters.update(snapshot.clusters);
    const gen = new Generation(snapshot, this.#clusters, this.opts.telemetry, this.#certs, this.#contexts);
    gen.limits = { ...DEFAULT_LIMITS, ...this.opts.limits };
    // Build every terminating context now so a bad certificate fails the apply, not a handshake.
    for (const l of snapshot.listeners) {
      for (const fc of l.filterChains) {
        if (!fc.tls) continue;
        const c = gen.serverContext(fc);
        if ('error' in c && typeof (c as { error?: unknown }).error === 'string') errors.push(`${fc.name}: ${(c as { error: string }).error}`);
      }
    }
    if (errors.length) { this.#generation--; return { ok: false, errors, warnings }; }

    // 2. Bind added listeners before the swap; roll back on failure.
    const added: ListenerRuntime[] = [];
    for (const l of snapshot.listeners) {
      if (this.#listeners.has(l.name)) continue;
      const lr = new ListenerRuntime({ config: l, runtime: gen });
      try {
        await lr.listen();
        added.push(lr);
      } catch (e) {
        errors.push(`cannot bind ${l.address}:${l.port} (${l.name}): ${(e as Error).message}`);
      }
    }
    if (errors.length) {
      await Promise.all(added.map((a) => a.stopAccepting()));
      this.#generation--;
      return { ok: false, errors, warnings };
    }
    // 3. Swap.
    for (const a of added) this.#listeners.set(a.name, a);
    const keep = new Set(snapshot.listeners.map((l) => l.name));
    for (const l of snapshot.listeners) this.#listeners.get(l.name)!.update({ config: l, runtime: gen });
    const previous = this.#current;
    this.#current = gen;
    for (const [name, lr] of this.#listeners) {
      if (keep.has(name)) continue;
      this.#listeners.delete(name);
      void lr.stopAccepting();
    }
    previous?.retire();
    this.#ready = true;
    return { ok: true, errors, warnings };
  }

  /** Stops accepting on every listener (drain); open connections continue. */
  async stopAccepting(): Promise<void> {
    this.#ready = false;
    await Promise.all([...this.#listeners.values()].map((l) => l.stopAccepting()));
    this.#current?.retire();
  }

  /** During a drain: close HTTP/1.1 connections as they go idle. */
  closeIdle(): void {
    this.#current?.closeIdle();
  }

  activeConnections(): number {
    let n = 0;
    for (const l of this.#listeners.values()) n += l.connections;
    return n;
  }

  async close(): Promise<void> {
    await this.stopAccepting();
    for (const l of this.#listeners.values()) l.closeAll();
    this.#current?.retire();
    await this.#clusters?.close();
  }
}

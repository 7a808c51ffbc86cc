/**
 * The data plane: apply(snapshot) binds new listeners, swaps the config of existing ones and
 * drains removed ones; secrets are loaded and validated before the swap, so a snapshot whose
 * certificates cannot be used is refused whole and the previous one keeps serving.
 */
import * as http from 'node:http';
import * as http2 from 'node:http2';
import type * as net from 'node:net';
import type { SecureContext } from 'node:tls';
import type { FilterChain, HttpConnectionManager, Listener, Snapshot } from '../model/snapshot.js';
import type { Telemetry } from './telemetry.js';
import { DEFAULT_LIMITS, ListenerRuntime, type ChainRuntime, type DownstreamLimits } from './listener/listener-runtime.js';
import { CertStore } from './pki/cert-store.js';
import { SecureContextCache } from './pki/context-cache.js';
import { ClusterManager } from './upstream/cluster-manager.js';
import { createHttpHandler } from './chain/http.js';
import { handleConnect } from './chain/connect.js';
import { forgetAllFastRoutes, keepaliveExact, nativeRelayBusy } from './chain/native-relay.js';

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

/** The connection preface of HTTP/2 (RFC 9113 3.4): what a client with prior knowledge (h2c) sends first. */
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');
const EMPTY = Buffer.alloc(0);

/**
 * 'h2' when the bytes start with the whole preface, 'h1' as soon as one byte differs from it,
 * undefined while they are a proper prefix of it (more bytes needed).
 */
function prefaceKind(b: Buffer): 'h1' | 'h2' | undefined {
  const n = b.length < H2_PREFACE.length ? b.length : H2_PREFACE.length;
  for (let i = 0; i < n; i++) if (b[i] !== H2_PREFACE[i]) return 'h1';
  return n === H2_PREFACE.length ? 'h2' : undefined;
}

type HttpServers = { h1: http.Server; h2?: http2.Http2Server };

/** Everything built for one snapshot generation. */
class Generation implements ChainRuntime {
  readonly #http = new Map<FilterChain, HttpServers>();
  readonly #handlers = new Map<FilterChain, ReturnType<typeof createHttpHandler>>();
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

  serveHttp(chain: FilterChain, socket: net.Socket, listener: Listener, head?: Buffer): void {
    if (chain.filter.kind !== 'http') return;
    let s = this.#http.get(chain);
    if (!s) {
      s = { h1: this.#h1Server(chain, listener) };
      this.#http.set(chain, s);
    }
    if (chain.tls) {
      // ALPN decided the protocol during our handshake: h2 goes to the HTTP/2 server, anything
      // else (http/1.1 or no ALPN) to the HTTP/1.1 server, exactly as an https.Server would.
      const alpn = (socket as { alpnProtocol?: string | false }).alpnProtocol;
      if (alpn === 'h2' || alpn === 'istio-h2') this.#h2Server(chain, s, listener).emit('connection', socket);
      else s.h1.emit('connection', socket);
      return;
    }
    // Plaintext: HTTP/2 with prior knowledge (h2c) or HTTP/1.1, told apart by the first bytes,
    // as Envoy's AUTO codec does on every HTTP port. Bytes the listener already read usually
    // decide; if not (none yet, or a piece of the preface) they are put back and read again.
    // A chain without http2 (a sidecar's forward proxy, whose routing needs HTTP/1.1's
    // absolute-form targets) is HTTP/1.1 only.
    if (!chain.filter.http2) {
      if (head !== undefined && head.length > 0) socket.unshift(head);
      s.h1.emit('connection', socket);
      return;
    }
    if (head !== undefined && head.length > 0) {
      const kind = prefaceKind(head);
      socket.unshift(head);
      if (kind !== undefined) { this.#handOver(chain, s, listener, socket, kind); return; }
    }
    this.#sniff(chain, s, listener, socket);
  }

  /**
   * Reads a plaintext connection until its first bytes are or are not the HTTP/2 preface: at most
   * 24 bytes are held, and a byte that differs decides at once (an HTTP/1.1 request line does on
   * its first or second byte). A peer that stops before deciding gets what HTTP/1.1 gives a
   * request whose headers never complete: 408 after the request-headers timeout, then close.
   */
  #sniff(chain: FilterChain, s: HttpServers, listener: Listener, socket: net.Socket): void {
    let seen: Buffer = EMPTY;
    const finish = (): void => {
      clearTimeout(timer);
      socket.removeListener('data', onData);
      socket.removeListener('close', finish);
    };
    const onData = (chunk: Buffer): void => {
      seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      const kind = prefaceKind(seen);
      if (kind === undefined) return;
      finish();
      if (kind === 'h1') {
        // Still flowing: the bytes put back reach the HTTP/1.1 parser as its first 'data'.
        socket.unshift(seen);
        s.h1.emit('connection', socket);
        return;
      }
      socket.pause();
      socket.unshift(seen);
      this.#handOver(chain, s, listener, socket, kind);
    };
    const timer = setTimeout(() => {
      finish();
      if (socket.destroyed) return;
      socket.end('HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
      setTimeout(() => socket.destroy(), 1_000).unref();
      this.#clientError(listener.name, 408, 'request_headers_timeout', socket, 'ERR_HTTP_REQUEST_TIMEOUT');
    }, this.limits.requestHeadersTimeoutMs);
    timer.unref();
    if (socket.destroyed) { clearTimeout(timer); return; }
    // Only 'close' besides 'data' (each listener is paid for by every HTTP/1.1 connection): a peer
    // that half-closes before deciding is left to the timer.
    socket.on('data', onData);
    socket.on('close', finish);
    socket.resume();
  }

  /**
   * The replayed bytes wait in the paused socket's buffer. The HTTP/2 session reads them from
   * there itself (flowing, they would be emitted before it listens); the HTTP/1.1 server only
   * takes 'data' events, so the socket flows again (from the next tick, once it listens).
   */
  #handOver(chain: FilterChain, s: HttpServers, listener: Listener, socket: net.Socket, kind: 'h1' | 'h2'): void {
    if (socket.destroyed) return;
    if (kind === 'h2') {
      this.#h2Server(chain, s, listener).emit('connection', socket);
      return;
    }
    socket.resume();
    s.h1.emit('connection', socket);
  }

  #h1Server(chain: FilterChain, listener: Listener): http.Server {
    const handler = this.#handlerOf(chain, listener);
    const limits = this.limits;
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
    const tunnels = (chain.filter as HttpConnectionManager).connectRoutes;
    if (tunnels?.length) {
      h1.on('connect', (req: http.IncomingMessage, sock: net.Socket, head: Buffer) =>
        handleConnect(tunnels, req, sock, head, { clusters: this.clusters, telemetry: this.telemetry, clientHelloTimeoutMs: listener.clientHelloTimeoutMs }));
    }
    return h1;
  }

  /**
   * The chain's HTTP/2 server, built on first use: by ALPN h2 on a TLS chain, by the connection
   * preface (h2c, prior knowledge) on a plaintext one. Same limits either way.
   */
  #h2Server(chain: FilterChain, s: HttpServers, listener: Listener): http2.Http2Server {
    if (s.h2 !== undefined) return s.h2;
    const handler = this.#handlerOf(chain, listener);
    const limits = this.limits;
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
    return h2;
  }

  /** One request handler per chain, shared by its HTTP/1.1 and HTTP/2 servers. */
  #handlerOf(chain: FilterChain, listener: Listener): ReturnType<typeof createHttpHandler> {
    let s = this.#handlers.get(chain);
    if (s === undefined) {
      s = createHttpHandler(chain.filter as HttpConnectionManager, { clusters: this.clusters, telemetry: this.telemetry, listenerPort: listener.port });
      this.#handlers.set(chain, s);
    }
    return s;
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
    if (!keepaliveExact() && Object.values(input.clusters).some((c) => c.tcpKeepalive !== undefined)) {
      warnings.push('connectionPool.tcp.tcpKeepalive: the native addon is not built, so Node sets keep-alive itself, with a 1s interval and 10 probes whatever the DestinationRule says (time is kept)');
    }
    const snapshot: Snapshot = { ...input, generation: ++this.#generation };
    const secretLookup = (n: string) => this.#certs.get(n);
    // The first apply creates the clusters; later ones change them only once nothing can refuse
    // the apply any more (below), so a refused config leaves the upstreams as they were.
    const firstApply = !this.#clusters;
    if (!this.#clusters) this.#clusters = new ClusterManager(snapshot.clusters, { secrets: secretLookup });
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
    if (!firstApply) {
      this.#clusters.update(snapshot.clusters);
      // The addon's learned routes name the previous clusters' endpoints and slots.
      forgetAllFastRoutes();
    }
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
    // The relay thread ends its connections and sends their records over in a moment: wait for
    // them (bounded), or their access-log lines would be lost with the process.
    for (let i = 0; i < 100 && nativeRelayBusy(); i++) await new Promise((r) => setTimeout(r, 10));
    this.#current?.retire();
    await this.#clusters?.close();
  }
}

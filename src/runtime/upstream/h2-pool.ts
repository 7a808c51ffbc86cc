/**
 * HTTP/2 sessions to one upstream endpoint over sockets the cluster manager dials: h2c with prior
 * knowledge on plaintext, HTTP/2 inside Istio mTLS (whatever ALPN the peer picked from the
 * cluster's list), or plain TLS. Node's HTTP/2 client decides nothing here from ALPN: the cluster
 * says HTTP/2, so HTTP/2 is spoken.
 *
 * One session serves many requests at once (multiplexed) up to the peer's
 * SETTINGS_MAX_CONCURRENT_STREAMS; beyond that another session is opened while the connection
 * limit allows, else requests wait in a FIFO queue. A session that received GOAWAY, closed or
 * failed takes no new streams; the next request gets a new one.
 *
 * It speaks the handler protocol of pool.ts (onConnect / onHeaders / onData / onComplete /
 * onError), with error codes the cluster manager classifies: a stream reset or a session gone
 * mid-response is upstream_reset, silence past the stream idle timeout is
 * UND_ERR_HEADERS_TIMEOUT / UND_ERR_BODY_TIMEOUT.
 */
import * as http2 from 'node:http2';
import type * as net from 'node:net';
import type { Readable } from 'node:stream';
import { PendingRequest, QueuedPool, followBody, poolError, type Connector, type PoolRawHeaders, type PoolRequest } from './pool.js';

export interface H2PoolOptions {
  connect: Connector;
  /** 'http' (h2c) or 'https' (TLS, including Istio mTLS): the :scheme of requests. */
  scheme: 'http' | 'https';
  /** :authority for a request that carries no Host: the endpoint's address. */
  defaultAuthority: string;
  /** At most this many sessions (default: no limit). */
  connections?: number;
  /** A session takes no new stream after this many; it closes once its streams are done. */
  maxRequestsPerConnection?: number;
  /** An idle session (no stream) is closed after this long. */
  keepAliveTimeoutMs: number;
  /** No frame on a stream for this long while it waits for the response: the request fails. */
  idleTimeoutMs: number;
}

/** What Node assumes the peer allows until its SETTINGS arrive. */
const INITIAL_STREAMS = 100;
/** Upper bound on streams per session, whatever the peer allows. */
const MAX_STREAMS = 1000;
/** Largest response header list we accept from the upstream (as the HTTP/1.1 pool's head cap). */
const MAX_HEADER_LIST = 64 * 1024;

/** Request fields that only mean something to one HTTP/1.1 connection (RFC 9113 §8.2.2). */
const CONNECTION_SPECIFIC = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'host', 'http2-settings']);

/** One HTTP/2 connection and its streams. */
class Session {
  readonly streams = new Set<Exchange2>();
  started = 0;
  /** Takes no new stream (GOAWAY, request limit, closing); closes when its last stream is done. */
  draining = false;
  closed = false;
  #settings = false;
  #idleTimer: NodeJS.Timeout | undefined;

  constructor(readonly pool: H2Pool, readonly session: http2.ClientHttp2Session, readonly servername: string | undefined) {
    session.on('error', () => undefined); // streams report what concerns them; 'close' follows
    session.on('remoteSettings', () => {
      this.#settings = true;
      this.pool.drive();
    });
    session.on('goaway', () => this.drain());
    session.once('close', () => {
      this.closed = true;
      this.draining = true;
      this.#clearIdle();
      this.pool.sessionDone(this);
    });
    this.#armIdle();
  }

  /** Streams this session may still open now. */
  get capacity(): number {
    if (this.closed || this.draining || this.session.destroyed || this.session.closed) return 0;
    // Until the peer's SETTINGS arrive (one round trip) only one stream: a peer that allows fewer
    // than we guessed would refuse the rest.
    let max = 1;
    if (this.#settings) max = Math.min(MAX_STREAMS, this.session.remoteSettings.maxConcurrentStreams ?? MAX_STREAMS);
    const lim = this.pool.opts.maxRequestsPerConnection;
    if (lim !== undefined) max = Math.min(max, lim - this.started + this.streams.size);
    return max - this.streams.size;
  }

  start(p: PendingRequest): void {
    this.#clearIdle();
    this.started++;
    const ex = new Exchange2(this, p);
    this.streams.add(ex);
    const lim = this.pool.opts.maxRequestsPerConnection;
    if (lim !== undefined && this.started >= lim) this.drain();
    ex.start();
  }

  streamDone(ex: Exchange2): void {
    if (!this.streams.delete(ex)) return;
    if (this.streams.size === 0) {
      if (this.draining) this.close();
      else this.#armIdle();
    }
    this.pool.drive();
  }

  drain(): void {
    if (this.draining) return;
    this.draining = true;
    this.#clearIdle();
    if (this.streams.size === 0) this.close();
  }

  /** Graceful: streams in flight finish, then the connection closes. */
  close(): void {
    this.draining = true;
    this.#clearIdle();
    if (!this.session.closed && !this.session.destroyed) this.session.close();
  }

  destroy(err: Error): void {
    this.draining = true;
    this.#clearIdle();
    for (const ex of [...this.streams]) ex.fail(err, true);
    this.session.destroy();
  }

  #armIdle(): void {
    this.#clearIdle();
    this.#idleTimer = setTimeout(() => this.close(), this.pool.opts.keepAliveTimeoutMs);
    this.#idleTimer.unref();
  }

  #clearIdle(): void {
    if (this.#idleTimer !== undefined) clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
  }
}

/** One request on one stream. Exactly one of onComplete / onError reaches the handler. */
class Exchange2 {
  #stream: http2.ClientHttp2Stream | undefined;
  #done = false;
  #gotHeaders = false;
  #paused = false;
  #trailers: PoolRawHeaders | null = null;
  #bodyCleanup: (() => void) | undefined;

  constructor(readonly s: Session, readonly p: PendingRequest) {}

  start(): void {
    const { req, handler } = this.p;
    let aborted = false;
    handler.onConnect((err?: Error) => {
      if (this.#done || aborted) return;
      aborted = true;
      this.fail(err ?? poolError('UND_ERR_ABORTED', 'request aborted'), true);
    });
    if (aborted) return;
    let headers: http2.OutgoingHttpHeaders;
    try {
      headers = this.#headers(req);
    } catch (e) {
      this.fail(e as Error, false);
      return;
    }
    const body = req.body;
    const endStream = body === null || (Buffer.isBuffer(body) && body.length === 0);
    let stream: http2.ClientHttp2Stream;
    try {
      stream = this.s.session.request(headers, { endStream });
    } catch (e) {
      // The session went away between the capacity check and now (GOAWAY, close): try another.
      const code = (e as { code?: string }).code;
      if (code === 'ERR_HTTP2_INVALID_SESSION' || code === 'ERR_HTTP2_GOAWAY_SESSION' || code === 'ERR_HTTP2_OUT_OF_STREAMS') {
        this.#done = true;
        this.s.drain();
        this.s.streamDone(this);
        this.s.pool.requeue(this.p);
        return;
      }
      this.fail(Object.assign(e as Error, { code: 'UND_ERR_INVALID_ARG' }), false);
      return;
    }
    this.#stream = stream;
    stream.on('error', (e: Error & { code?: string }) => this.#onStreamError(e));
    stream.on('response', (h: http2.IncomingHttpHeaders & http2.IncomingHttpStatusHeader) => this.#onResponse(h));
    stream.on('trailers', (t: http2.IncomingHttpHeaders) => {
      this.#trailers = toRaw(t);
    });
    stream.on('end', () => this.#complete());
    stream.on('close', () => this.#onClose());
    stream.setTimeout(this.s.pool.opts.idleTimeoutMs, () => this.#onTimeout());
    if (!endStream) {
      if (Buffer.isBuffer(body)) stream.end(body);
      else this.#streamBody(body as Readable, stream);
    }
  }

  #headers(req: PoolRequest): http2.OutgoingHttpHeaders {
    const out: http2.OutgoingHttpHeaders = Object.create(null) as http2.OutgoingHttpHeaders;
    let authority: string | undefined;
    const add = (rawName: string, value: string | string[]): void => {
      const name = rawName.toLowerCase();
      if (name === 'host') {
        authority ??= Array.isArray(value) ? value[0] : value;
        return;
      }
      if (name.startsWith(':') || CONNECTION_SPECIFIC.has(name)) return;
      // TE is allowed in HTTP/2 only as "trailers" (gRPC sends exactly that).
      if (name === 'te') {
        const v = Array.isArray(value) ? value.join(',') : value;
        if (!/(^|,)\s*trailers\s*(;|,|$)/i.test(v)) return;
        value = 'trailers';
      }
      const cur = out[name];
      if (cur === undefined) out[name] = value;
      else out[name] = [...(Array.isArray(cur) ? cur : [String(cur)]), ...(Array.isArray(value) ? value : [value])];
    };
    const h = req.headers;
    if (Array.isArray(h)) for (let i = 0; i + 1 < h.length; i += 2) add(h[i] as string, h[i + 1]!);
    else for (const k of Object.keys(h)) add(k, h[k]!);
    out[':method'] = req.method;
    out[':path'] = req.path;
    out[':scheme'] = this.s.pool.opts.scheme;
    out[':authority'] = authority ?? this.s.pool.opts.defaultAuthority;
    return out;
  }

  #streamBody(body: Readable, stream: http2.ClientHttp2Stream): void {
    const onDrain = (): void => { body.resume(); };
    let detach: (() => void) | undefined;
    const cleanup = (): void => {
      detach?.();
      stream.off('drain', onDrain);
      this.#bodyCleanup = undefined;
    };
    this.#bodyCleanup = cleanup;
    stream.on('drain', onDrain);
    detach = followBody(body, (c) => {
      if (!stream.write(c)) body.pause();
    }, () => {
      cleanup();
      stream.end();
    }, (err) => {
      cleanup();
      this.fail(err, true);
    });
  }

  #onResponse(h: http2.IncomingHttpHeaders & http2.IncomingHttpStatusHeader): void {
    if (this.#done) return;
    const status = Number(h[':status']);
    if (!Number.isInteger(status) || status < 200) return; // informational: the final response follows
    this.#gotHeaders = true;
    const stream = this.#stream!;
    const raw = toRaw(h);
    if (!this.p.handler.onHeaders(status, raw, this.#resume, '')) this.#pause();
    if (this.#done) return;
    stream.on('data', (chunk: Buffer) => {
      if (this.#done) return;
      if (!this.p.handler.onData(chunk)) this.#pause();
    });
    if (this.#paused) stream.pause();
  }

  #pause(): void {
    this.#paused = true;
    this.#stream?.pause();
  }

  #resume = (): void => {
    if (!this.#paused || this.#done) return;
    this.#paused = false;
    this.#stream?.resume();
  };

  #complete(): void {
    if (this.#done) return;
    this.#done = true;
    this.#bodyCleanup?.();
    const trailers = this.#trailers;
    const stream = this.#stream;
    // The response is complete; the rest of a request body, if any, is not wanted any more.
    if (stream !== undefined && !stream.writableEnded && !stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_NO_ERROR);
    this.s.streamDone(this);
    this.p.handler.onComplete(trailers);
  }

  #onStreamError(e: Error & { code?: string }): void {
    if (this.#done) return;
    const stream = this.#stream;
    if (this.#refused(stream, /REFUSED_STREAM/.test(e.message))) return;
    // ERR_HTTP2_STREAM_ERROR (a reset), ERR_HTTP2_SESSION_ERROR, socket errors: all upstream_reset.
    if (typeof e.code !== 'string' || e.code.startsWith('UND_ERR_CONNECT') || e.code === 'ECONNREFUSED') Object.assign(e, { code: 'UND_ERR_SOCKET' });
    this.fail(e, false);
  }

  #onClose(): void {
    if (this.#done) return;
    const stream = this.#stream!;
    if (this.#refused(stream)) return;
    const rst = stream.rstCode;
    this.fail(rst !== undefined && rst !== http2.constants.NGHTTP2_NO_ERROR
      ? poolError('UND_ERR_SOCKET', `upstream reset the stream (HTTP/2 error code ${rst})`)
      : poolError('UND_ERR_SOCKET', 'upstream closed the stream before the response ended'), false);
  }

  /** REFUSED_STREAM before any response: nothing was processed, so it is sent again once. */
  #refused(stream: http2.ClientHttp2Stream | undefined, said = false): boolean {
    if (stream === undefined || this.#gotHeaders || this.p.retried) return false;
    if (!said && stream.rstCode !== http2.constants.NGHTTP2_REFUSED_STREAM) return false;
    const body = this.p.req.body;
    if (body !== null && !Buffer.isBuffer(body)) return false; // a stream body was consumed
    this.#done = true;
    this.p.retried = true;
    this.#bodyCleanup?.();
    this.s.streamDone(this);
    this.s.pool.requeue(this.p);
    return true;
  }

  #onTimeout(): void {
    if (this.#done) return;
    if (this.#paused) return; // our own downstream is slow, not the upstream
    const ms = this.s.pool.opts.idleTimeoutMs;
    this.fail(this.#gotHeaders
      ? poolError('UND_ERR_BODY_TIMEOUT', `upstream sent no body bytes for ${ms} ms`)
      : poolError('UND_ERR_HEADERS_TIMEOUT', `upstream sent no response for ${ms} ms`), true);
  }

  /** Ends the request with an error; `cancel` resets the stream (our side gave up). */
  fail(err: Error, cancel: boolean): void {
    if (this.#done) return;
    this.#done = true;
    this.#bodyCleanup?.();
    const stream = this.#stream;
    if (stream !== undefined && !stream.destroyed) {
      if (cancel && !stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      else if (!stream.closed) stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
    }
    this.s.streamDone(this);
    this.p.handler.onError(err);
  }
}

/** Response fields as the handler's list (pseudo-headers dropped; set-cookie stays a list). */
function toRaw(h: http2.IncomingHttpHeaders): PoolRawHeaders {
  const out: PoolRawHeaders = [];
  for (const k of Object.keys(h)) {
    if (k.charCodeAt(0) === 58 /* : */) continue;
    const v = h[k];
    if (v !== undefined) out.push(k, v);
  }
  return out;
}

export class H2Pool extends QueuedPool {
  readonly opts: H2PoolOptions;
  readonly #sessions = new Set<Session>();

  constructor(opts: H2PoolOptions) {
    super();
    this.opts = opts;
  }

  requeue(p: PendingRequest): void {
    this.queue.unshift(p);
    queueMicrotask(() => this.drive());
  }

  sessionDone(s: Session): void {
    if (!this.#sessions.delete(s)) return;
    this.drive();
  }

  drive(): void {
    while (this.queue.length > 0 && !this.destroyed) {
      const next = this.queue[0]!;
      const name = next.req.servername;
      let best: Session | undefined;
      for (const s of this.#sessions) {
        if (s.servername === name && s.capacity > 0) {
          best = s;
          break;
        }
      }
      if (best !== undefined) {
        this.queue.shift();
        best.start(next);
        continue;
      }
      // Every session is full (or none is up): one more, within the connection limit. A session
      // being dialled serves everything queued once it is up, so one dial at a time is enough.
      if (this.connecting > 0) break;
      const limit = this.opts.connections ?? Infinity;
      let open = 0;
      for (const s of this.#sessions) if (!s.closed) open++;
      if (open >= limit) {
        // At the limit: an idle session made for another server name gives way.
        const other = [...this.#sessions].find((s) => s.servername !== name && s.streams.size === 0);
        if (other === undefined) break;
        this.#sessions.delete(other);
        other.close();
      }
      this.#dial(name);
      break;
    }
    this.maybeClosed();
  }

  #dial(servername: string | undefined): void {
    this.connecting++;
    this.opts.connect(servername, (err, socket) => {
      this.connecting--;
      if (err !== null || socket === null) {
        // Nothing to wait for with this server name: everything queued for it fails now.
        const hasSession = [...this.#sessions].some((s) => s.servername === servername && !s.draining);
        const e = err ?? poolError('UND_ERR_SOCKET', 'connect failed');
        if (hasSession) {
          const i = this.queue.findIndex((p) => p.req.servername === servername);
          if (i >= 0) this.queue.splice(i, 1)[0]!.handler.onError(e);
        } else {
          const failed = this.queue.filter((p) => p.req.servername === servername);
          for (let i = this.queue.length - 1; i >= 0; i--) if (this.queue[i]!.req.servername === servername) this.queue.splice(i, 1);
          for (const p of failed) p.handler.onError(e);
        }
        this.drive();
        return;
      }
      if (this.destroyed) {
        socket.destroy();
        return;
      }
      this.#open(socket, servername);
      this.drive();
    });
  }

  #open(socket: net.Socket, servername: string | undefined): void {
    const authority = `${this.opts.scheme}://${this.opts.defaultAuthority}`;
    let session: http2.ClientHttp2Session;
    try {
      session = http2.connect(authority, {
        createConnection: () => socket,
        settings: { enablePush: false, maxHeaderListSize: MAX_HEADER_LIST },
        peerMaxConcurrentStreams: INITIAL_STREAMS,
        maxHeaderListPairs: 1024,
      });
    } catch {
      socket.destroy();
      return;
    }
    this.#sessions.add(new Session(this, session, servername));
  }

  protected settle(): boolean {
    for (const s of this.#sessions) s.drain();
    return this.#sessions.size === 0;
  }

  protected destroyAll(err: Error): void {
    for (const s of [...this.#sessions]) s.destroy(err);
    this.#sessions.clear();
  }
}

/**
 * HTTP/1.1 connections to one upstream endpoint: keep-alive, a connection limit with a FIFO queue,
 * no pipelining. It replaces a general-purpose client on the hot path: a request head goes out in
 * one write (with a small buffered body, one writev), and the response head is parsed from the
 * socket's buffer with a single search for its end and one split, instead of a parser callback and
 * a string per field.
 *
 * It speaks the handler protocol the cluster manager's Exchange already implements (onConnect /
 * onHeaders / onData / onComplete / onError), so the exchange logic above it is the same for this
 * pool and for the HTTP/2 one.
 *
 * The response parser is strict, because a proxy that frames a response differently from the
 * client can be made to smuggle one: a head over 64 KiB, obs-fold lines, bare control characters,
 * Content-Length together with Transfer-Encoding, differing Content-Length values, and malformed
 * chunk sizes all fail the request (upstream_reset) and close the connection.
 */
import type { Readable } from 'node:stream';
import type * as net from 'node:net';
import { PendingRequest, QueuedPool, followBody, poolError, type Connector, type PoolRequest } from './pool.js';


export interface H1PoolOptions {
  connect: Connector;
  /** Host header for a request that carries none (HTTP/1.1 requires one): the endpoint's address. */
  defaultHost: string;
  /** At most this many connections (default: no limit). */
  connections?: number;
  /** Close a connection after it served this many requests. */
  maxRequestsPerConnection?: number;
  /** How long an idle connection is kept (shortened by the upstream's `Keep-Alive: timeout=`). */
  keepAliveTimeoutMs: number;
  /** No byte in either direction for this long while a request is in flight: the request fails. */
  idleTimeoutMs: number;
}

/** Largest response head (status line and fields) accepted. */
export const MAX_HEAD_BYTES = 64 * 1024;
const MAX_CHUNK_LINE = 4096;
const MAX_PIECES = 1024;

const CRLFCRLF = Buffer.from('\r\n\r\n');
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** Control characters other than HTAB are not allowed in a field value (nor in what we send). */
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]/;
const LAST_CHUNK = Buffer.from('0\r\n\r\n');
const CRLF = Buffer.from('\r\n');
const PAYLOAD_METHODS = new Set(['POST', 'PUT', 'PATCH']);
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'DELETE', 'PUT']);


const enum Body { None, Length, Chunked, UntilClose }
const enum Chunk { Size, Data, DataEnd, Trailers }

/** One connection and the one request on it. */
class Conn {
  requests = 0;
  /** Idle in the pool, or serving `current`. */
  current: PendingRequest | undefined;
  keepAliveMs: number;
  #buf: Buffer | null = null;
  #headDone = false;
  #mode = Body.None;
  #remaining = 0;
  #chunk = Chunk.Size;
  #trailers: string[] = [];
  #trailerBytes = 0;
  #pieces = 0;
  #reusable = true;
  #sawResponseByte = false;
  #requestSent = false;
  #paused = false;
  #closed = false;
  #body: Readable | undefined;
  #bodyListeners: (() => void) | undefined;

  constructor(readonly pool: H1Pool, readonly socket: net.Socket, readonly servername: string | undefined) {
    this.keepAliveMs = pool.opts.keepAliveTimeoutMs;
    socket.on('data', (d: Buffer) => this.#onData(d));
    socket.on('error', (e: Error) => this.#onClose(e));
    socket.on('close', () => this.#onClose(undefined));
    socket.on('end', () => this.#onEnd());
    socket.on('timeout', () => this.#onTimeout());
    socket.on('drain', () => this.#body?.resume());
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Starts a request on this (idle, open) connection. */
  start(p: PendingRequest): void {
    this.current = p;
    this.requests++;
    this.#buf = null;
    this.#headDone = false;
    this.#mode = Body.None;
    this.#chunk = Chunk.Size;
    this.#trailers = [];
    this.#trailerBytes = 0;
    this.#pieces = 0;
    this.#sawResponseByte = false;
    this.#requestSent = false;
    this.#paused = false;
    this.socket.setTimeout(this.pool.opts.idleTimeoutMs);
    let aborted: Error | undefined;
    let connecting = true;
    p.handler.onConnect((err?: Error) => {
      if (this.current !== p || aborted !== undefined) return;
      aborted = err ?? poolError('UND_ERR_ABORTED', 'request aborted');
      if (connecting) {
        // Aborted while it waited for a connection: nothing was written, the connection stays good.
        this.current = undefined;
        this.socket.setTimeout(this.keepAliveMs);
        p.handler.onError(aborted);
        this.pool.connIdle(this);
        return;
      }
      this.#fail(aborted);
    });
    connecting = false;
    if (aborted !== undefined || this.current !== p) return;
    try {
      this.#write(p.req);
    } catch (e) {
      this.#fail(e as Error);
    }
  }

  #write(req: PoolRequest): void {
    const h = req.headers;
    let head = `${req.method} ${req.path} HTTP/1.1\r\n`;
    let length: number | undefined;
    let host = false;
    const add = (name: string, value: string | string[]): void => {
      if (Array.isArray(value)) {
        for (const v of value) add(name, v);
        return;
      }
      if (!TOKEN.test(name) || BAD_VALUE.test(value)) throw poolError('UND_ERR_INVALID_ARG', `invalid request header ${JSON.stringify(name)}`);
      if (name.length === 4 && name.toLowerCase() === 'host') host = true;
      else if (name.length === 14 && name.toLowerCase() === 'content-length') {
        const n = Number(value);
        if (length !== undefined && length !== n) throw poolError('UND_ERR_INVALID_ARG', 'conflicting content-length');
        length = n;
      }
      head += `${name}: ${value}\r\n`;
    };
    if (Array.isArray(h)) for (let i = 0; i + 1 < h.length; i += 2) add(h[i] as string, h[i + 1]!);
    else for (const k of Object.keys(h)) add(k, h[k]!);
    if (!host) head += `host: ${this.pool.opts.defaultHost}\r\n`;
    if (BAD_VALUE.test(req.path) || req.path.includes(' ')) throw poolError('UND_ERR_INVALID_ARG', 'invalid request target');
    const body = req.body;
    const s = this.socket;
    if (body === null || Buffer.isBuffer(body)) {
      const size = body === null ? 0 : body.length;
      if (length === undefined) {
        if (size > 0 || PAYLOAD_METHODS.has(req.method)) head += `content-length: ${size}\r\n`;
      } else if (length !== size) throw poolError('UND_ERR_REQ_CONTENT_LENGTH_MISMATCH', 'request body length differs from content-length');
      head += '\r\n';
      if (size === 0) s.write(head, 'latin1');
      else if (size <= 16 * 1024) s.write(Buffer.concat([Buffer.from(head, 'latin1'), body!]));
      else {
        s.cork();
        s.write(head, 'latin1');
        s.write(body!);
        s.uncork();
      }
      this.#requestSent = true;
      return;
    }
    const chunked = length === undefined;
    if (chunked) head += 'transfer-encoding: chunked\r\n';
    head += '\r\n';
    s.write(head, 'latin1');
    this.#streamBody(body, chunked, length ?? -1);
  }

  #streamBody(body: Readable, chunked: boolean, declared: number): void {
    let sent = 0;
    const s = this.socket;
    const onData = (c: Buffer): void => {
      if (c.length === 0) return;
      sent += c.length;
      if (!chunked && sent > declared) {
        this.#fail(poolError('UND_ERR_REQ_CONTENT_LENGTH_MISMATCH', 'request body longer than content-length'));
        return;
      }
      let ok: boolean;
      if (chunked) {
        s.cork();
        s.write(`${c.length.toString(16)}\r\n`, 'latin1');
        s.write(c);
        ok = s.write(CRLF);
        s.uncork();
      } else ok = s.write(c);
      if (!ok) body.pause();
    };
    let detach: (() => void) | undefined;
    const cleanup = (): void => {
      detach?.();
      this.#body = undefined;
      this.#bodyListeners = undefined;
    };
    this.#body = body;
    this.#bodyListeners = cleanup;
    detach = followBody(body, onData, () => {
      cleanup();
      if (!chunked && sent !== declared) {
        this.#fail(poolError('UND_ERR_REQ_CONTENT_LENGTH_MISMATCH', 'request body shorter than content-length'));
        return;
      }
      if (chunked) s.write(LAST_CHUNK);
      this.#requestSent = true;
    }, (err) => {
      cleanup();
      if (this.current !== undefined) this.#fail(err);
    });
  }

  // ---- response

  #onData(d: Buffer): void {
    const p = this.current;
    if (p === undefined) {
      // Bytes on an idle connection: nothing may come unasked in HTTP/1.1.
      this.#destroy();
      return;
    }
    this.#sawResponseByte = true;
    if (this.#buf === null) {
      this.#buf = d;
      this.#pieces = 0;
    } else {
      // Only a head, a chunk-size line or trailers wait for more bytes; each is capped in size,
      // and the number of pieces is capped too, so a trickling upstream cannot make us copy the
      // growing buffer without bound.
      if (++this.#pieces > MAX_PIECES) {
        this.#protocolError('response arrived in too many small pieces');
        return;
      }
      this.#buf = Buffer.concat([this.#buf, d]);
    }
    this.#parse();
  }

  #parse(): void {
    while (this.#buf !== null && this.current !== undefined && !this.#paused) {
      if (!this.#headDone) {
        if (!this.#parseHead()) return;
        continue;
      }
      if (!this.#parseBody()) return;
    }
  }

  /** Parses one response head from #buf; false when more bytes are needed (or the request ended). */
  #parseHead(): boolean {
    const buf = this.#buf!;
    const end = buf.indexOf(CRLFCRLF);
    if (end < 0) {
      if (buf.length > MAX_HEAD_BYTES) this.#fail(poolError('UND_ERR_HEADERS_OVERFLOW', 'upstream response head too large'));
      return false;
    }
    if (end > MAX_HEAD_BYTES) {
      this.#fail(poolError('UND_ERR_HEADERS_OVERFLOW', 'upstream response head too large'));
      return false;
    }
    const lines = buf.toString('latin1', 0, end).split('\r\n');
    this.#buf = end + 4 < buf.length ? buf.subarray(end + 4) : null;
    const status = lines[0]!;
    // HTTP/1.x SP 3DIGIT SP reason
    if (status.length < 12 || !status.startsWith('HTTP/1.') || status.charCodeAt(8) !== 32 || (status.length > 12 && status.charCodeAt(12) !== 32)) {
      return this.#protocolError('malformed status line');
    }
    const minor = status.charCodeAt(7) - 48;
    const code = Number(status.slice(9, 12));
    if ((minor !== 0 && minor !== 1) || !Number.isInteger(code) || code < 100 || BAD_VALUE.test(status)) return this.#protocolError('malformed status line');
    const raw: string[] = [];
    let length = -1;
    let te: string | undefined;
    let connection: string | undefined;
    let keepAlive: string | undefined;
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i]!;
      const colon = line.indexOf(':');
      if (colon <= 0) return this.#protocolError('malformed header line');
      const name = line.slice(0, colon);
      if (!TOKEN.test(name)) return this.#protocolError('malformed header name');
      const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, '');
      if (BAD_VALUE.test(value)) return this.#protocolError('control character in a header value');
      raw.push(name, value);
      switch (name.length) {
        case 14:
          if (name.toLowerCase() === 'content-length') {
            for (const part of value.split(',')) {
              const v = part.trim();
              if (!/^\d{1,15}$/.test(v)) return this.#protocolError('invalid content-length');
              const n = Number(v);
              if (length !== -1 && length !== n) return this.#protocolError('conflicting content-length');
              length = n;
            }
          }
          break;
        case 17:
          if (name.toLowerCase() === 'transfer-encoding') te = te === undefined ? value : `${te}, ${value}`;
          break;
        case 10:
          if (name.toLowerCase() === 'connection') connection = connection === undefined ? value : `${connection}, ${value}`;
          else if (name.toLowerCase() === 'keep-alive') keepAlive = value;
          break;
      }
    }
    if (code < 200) {
      // 100 Continue, 103 Early Hints: informational, the real response follows. 101 is never
      // asked for (no upgrade goes through a pool).
      if (code === 101) return this.#protocolError('unexpected 101 Switching Protocols');
      return true;
    }
    const p = this.current!;
    this.#headDone = true;
    const conn = connection?.toLowerCase();
    if (minor === 0 ? !(conn?.includes('keep-alive') ?? false) : (conn?.includes('close') ?? false)) this.#reusable = false;
    if (keepAlive !== undefined) {
      // The upstream's own idle limit, less a second so we never reuse a connection it is closing.
      const m = /timeout\s*=\s*(\d+)/i.exec(keepAlive);
      if (m) {
        const ms = Number(m[1]) * 1000 - 1000;
        if (ms <= 0) this.#reusable = false;
        else this.keepAliveMs = Math.min(this.pool.opts.keepAliveTimeoutMs, ms);
      }
    }
    const noBody = p.req.method === 'HEAD' || code === 204 || code === 304;
    if (noBody) this.#mode = Body.None;
    else if (te !== undefined) {
      if (length !== -1) return this.#protocolError('both content-length and transfer-encoding');
      const codings = te.toLowerCase().split(',').map((c) => c.trim());
      if (codings.at(-1) === 'chunked') {
        if (codings.indexOf('chunked') !== codings.length - 1) return this.#protocolError('chunked applied twice');
        this.#mode = Body.Chunked;
      } else {
        this.#mode = Body.UntilClose;
        this.#reusable = false;
      }
    } else if (length >= 0) {
      this.#mode = Body.Length;
      this.#remaining = length;
    } else {
      this.#mode = Body.UntilClose;
      this.#reusable = false;
    }
    const statusText = status.length > 13 ? status.slice(13) : '';
    if (!p.handler.onHeaders(code, raw, this.#resume, statusText)) this.#pause();
    if (this.current !== p) return false;
    if (this.#mode === Body.None || (this.#mode === Body.Length && this.#remaining === 0)) {
      this.#complete(null);
      return false;
    }
    return true;
  }

  #resume = (): void => {
    if (!this.#paused || this.#closed) return;
    this.#paused = false;
    this.socket.resume();
    // Bytes already buffered continue now, outside the caller's stack.
    if (this.#buf !== null) queueMicrotask(() => this.#parse());
  };

  #pause(): void {
    this.#paused = true;
    this.socket.pause();
  }

  #deliver(chunk: Buffer): boolean {
    const p = this.current!;
    if (!p.handler.onData(chunk)) this.#pause();
    return this.current === p;
  }

  /** Consumes body bytes from #buf; false when more are needed (or the request ended). */
  #parseBody(): boolean {
    const buf = this.#buf!;
    switch (this.#mode) {
      case Body.UntilClose:
        this.#buf = null;
        this.#deliver(buf);
        return false;
      case Body.Length: {
        const n = Math.min(this.#remaining, buf.length);
        this.#remaining -= n;
        // Anything past the declared length is not part of this response: it is not ours to read.
        if (n < buf.length) this.#reusable = false;
        this.#buf = null;
        if (!this.#deliver(n === buf.length ? buf : buf.subarray(0, n))) return false;
        if (this.#remaining === 0) this.#complete(null);
        return false;
      }
      case Body.Chunked:
        return this.#parseChunked(buf);
      default:
        return false;
    }
  }

  #parseChunked(buf: Buffer): boolean {
    switch (this.#chunk) {
      case Chunk.Size: {
        const eol = buf.indexOf(CRLF);
        if (eol < 0) {
          if (buf.length > MAX_CHUNK_LINE) return this.#protocolError('chunk size line too long');
          return false;
        }
        const line = buf.toString('latin1', 0, eol);
        const semi = line.indexOf(';');
        const hex = (semi >= 0 ? line.slice(0, semi) : line).trim();
        if (!/^[0-9a-fA-F]{1,12}$/.test(hex) || BAD_VALUE.test(line)) return this.#protocolError('invalid chunk size');
        const size = parseInt(hex, 16);
        this.#buf = eol + 2 < buf.length ? buf.subarray(eol + 2) : null;
        if (size === 0) this.#chunk = Chunk.Trailers;
        else {
          this.#remaining = size;
          this.#chunk = Chunk.Data;
        }
        return true;
      }
      case Chunk.Data: {
        const n = Math.min(this.#remaining, buf.length);
        this.#remaining -= n;
        this.#buf = n < buf.length ? buf.subarray(n) : null;
        if (this.#remaining === 0) this.#chunk = Chunk.DataEnd;
        return this.#deliver(n === buf.length ? buf : buf.subarray(0, n));
      }
      case Chunk.DataEnd: {
        if (buf.length < 2) return false;
        if (buf[0] !== 13 || buf[1] !== 10) return this.#protocolError('missing CRLF after chunk data');
        this.#buf = buf.length > 2 ? buf.subarray(2) : null;
        this.#chunk = Chunk.Size;
        return true;
      }
      case Chunk.Trailers: {
        const eol = buf.indexOf(CRLF);
        if (eol < 0) {
          if (this.#trailerBytes + buf.length > MAX_HEAD_BYTES) return this.#protocolError('trailers too large');
          return false;
        }
        this.#trailerBytes += eol + 2;
        if (this.#trailerBytes > MAX_HEAD_BYTES) return this.#protocolError('trailers too large');
        const line = buf.toString('latin1', 0, eol);
        this.#buf = eol + 2 < buf.length ? buf.subarray(eol + 2) : null;
        if (line === '') {
          // Anything after the last chunk is not part of this response.
          if (this.#buf !== null) this.#reusable = false;
          this.#buf = null;
          this.#complete(this.#trailers.length > 0 ? this.#trailers : null);
          return false;
        }
        const colon = line.indexOf(':');
        if (colon <= 0 || !TOKEN.test(line.slice(0, colon))) return this.#protocolError('malformed trailer');
        const value = line.slice(colon + 1).trim();
        if (BAD_VALUE.test(value)) return this.#protocolError('control character in a trailer');
        this.#trailers.push(line.slice(0, colon), value);
        return true;
      }
    }
  }

  #protocolError(what: string): false {
    this.#fail(poolError('UND_ERR_RESPONSE_PARSE', `upstream sent an invalid HTTP/1.1 response: ${what}`));
    return false;
  }

  #complete(trailers: string[] | null): void {
    const p = this.current!;
    // Bytes past the end of this response were not asked for: the connection is out of step.
    if (this.#buf !== null) this.#reusable = false;
    this.#buf = null;
    p.handler.onComplete(trailers);
    if (this.current !== p) return;
    if (this.#requestSent) this.#release();
    else {
      // The response came before the whole request body (a 413, say): the rest of the body
      // cannot be sent without a request to go with it, so this connection ends here.
      this.#reusable = false;
      this.#release();
    }
  }

  /** The request is over: back to the pool, or closed. */
  #release(): void {
    this.#bodyListeners?.();
    this.current = undefined;
    const max = this.pool.opts.maxRequestsPerConnection;
    if (this.#paused) {
      this.#paused = false;
      this.socket.resume();
    }
    if (!this.#reusable || this.#closed || (max !== undefined && this.requests >= max)) {
      this.#destroy();
      this.pool.connDone(this);
      return;
    }
    this.socket.setTimeout(this.keepAliveMs);
    this.pool.connIdle(this);
  }

  /** Ends the current request with an error and closes the connection. */
  #fail(err: Error): void {
    const p = this.current;
    this.#bodyListeners?.();
    this.current = undefined;
    this.#destroy();
    this.pool.connDone(this);
    if (p !== undefined) p.handler.onError(err);
  }

  #onEnd(): void {
    // The upstream finished sending. A response read until close ends here.
    const p = this.current;
    if (p !== undefined && this.#headDone && this.#mode === Body.UntilClose) {
      if (this.#buf !== null) {
        const b = this.#buf;
        this.#buf = null;
        if (!this.#deliver(b)) return;
      }
      this.#reusable = false;
      this.#complete(null);
      return;
    }
    if (p === undefined) this.#destroy();
  }

  #onTimeout(): void {
    const p = this.current;
    if (p === undefined) {
      // Idle keep-alive limit.
      this.#destroy();
      this.pool.connDone(this);
      return;
    }
    if (this.#paused) return; // our own downstream is slow, not the upstream
    this.#fail(this.#headDone
      ? poolError('UND_ERR_BODY_TIMEOUT', `upstream sent no body bytes for ${this.pool.opts.idleTimeoutMs} ms`)
      : poolError('UND_ERR_HEADERS_TIMEOUT', `upstream sent no response for ${this.pool.opts.idleTimeoutMs} ms`));
  }

  #onClose(err: Error | undefined): void {
    const p = this.current;
    if (p === undefined) {
      // Idle (or already finished with): out of the pool, whoever closed it. connDone is idempotent.
      this.#closed = true;
      this.pool.connDone(this);
      return;
    }
    if (this.#headDone && this.#mode === Body.UntilClose && err === undefined) {
      this.#onEnd();
      return;
    }
    this.#closed = true;
    this.#bodyListeners?.();
    this.current = undefined;
    this.socket.destroy();
    this.pool.connDone(this);
    // A kept-alive connection the upstream closed as we reused it: nothing of the request was
    // answered, so a request without a body that may be repeated is sent again, once.
    if (!this.#sawResponseByte && this.requests > 1 && !p.retried && p.req.body === null && IDEMPOTENT.has(p.req.method)) {
      p.retried = true;
      this.pool.requeue(p);
      return;
    }
    const e = err ?? poolError('UND_ERR_SOCKET', 'upstream closed the connection before the response ended');
    if ((e as { code?: string }).code === undefined) Object.assign(e, { code: 'UND_ERR_SOCKET' });
    p.handler.onError(e);
  }

  #destroy(): void {
    this.#closed = true;
    this.socket.destroy();
  }

  /** Pool shutdown: ends the request in flight, if any. */
  destroy(err: Error): void {
    const p = this.current;
    this.#bodyListeners?.();
    this.current = undefined;
    this.#destroy();
    if (p !== undefined) p.handler.onError(err);
  }
}

export class H1Pool extends QueuedPool {
  readonly opts: H1PoolOptions;
  readonly #conns = new Set<Conn>();
  /** Most recently used last (reused first: its socket is the warmest). */
  readonly #idle: Conn[] = [];

  constructor(opts: H1PoolOptions) {
    super();
    this.opts = opts;
  }

  requeue(p: PendingRequest): void {
    this.queue.unshift(p);
    this.drive();
  }

  connIdle(c: Conn): void {
    this.#idle.push(c);
    this.drive();
  }

  connDone(c: Conn): void {
    if (!this.#conns.delete(c)) return;
    const i = this.#idle.indexOf(c);
    if (i >= 0) this.#idle.splice(i, 1);
    this.drive();
  }

  drive(): void {
    while (this.queue.length > 0 && !this.destroyed) {
      const next = this.queue[0]!;
      const name = next.req.servername;
      let conn: Conn | undefined;
      for (let i = this.#idle.length - 1; i >= 0; i--) {
        const c = this.#idle[i]!;
        if (c.servername === name && !c.closed) {
          conn = c;
          this.#idle.splice(i, 1);
          break;
        }
      }
      if (conn !== undefined) {
        this.queue.shift();
        conn.start(next);
        continue;
      }
      const limit = this.opts.connections ?? Infinity;
      if (this.#conns.size + this.connecting >= limit) {
        // At the limit: an idle connection made for another server name gives way.
        const other = this.#idle.shift();
        if (other === undefined) break;
        this.#conns.delete(other);
        other.destroy(poolError('UND_ERR_CLOSED', 'closed for another server name'));
      }
      // A connection for the head of the queue; whoever is first when it is up gets it. More
      // dials than waiting requests are never in flight.
      if (this.connecting >= this.queue.length) break;
      this.#dial(name);
    }
    this.maybeClosed();
  }

  #dial(servername: string | undefined): void {
    this.connecting++;
    this.opts.connect(servername, (err, socket) => {
      this.connecting--;
      if (err !== null || socket === null) {
        // The request waiting longest gets the failure; the others get dials of their own.
        const p = this.queue.shift();
        if (p !== undefined) p.handler.onError(err ?? poolError('UND_ERR_SOCKET', 'connect failed'));
        this.drive();
        return;
      }
      if (this.destroyed) {
        socket.destroy();
        return;
      }
      const c = new Conn(this, socket, servername);
      this.#conns.add(c);
      this.connIdle(c);
    });
  }

  protected settle(): boolean {
    for (const c of this.#conns) if (c.current !== undefined) return false;
    for (const c of [...this.#conns]) c.destroy(poolError('UND_ERR_CLOSED', 'pool closed'));
    this.#conns.clear();
    this.#idle.length = 0;
    return true;
  }

  protected destroyAll(err: Error): void {
    for (const c of [...this.#conns]) c.destroy(err);
    this.#conns.clear();
    this.#idle.length = 0;
  }
}

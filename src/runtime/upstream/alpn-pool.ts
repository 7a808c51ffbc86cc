/**
 * TLS origination that offers both `h2` and `http/1.1`: the upstream's ALPN answer decides which
 * protocol is spoken, as Envoy's automatic HTTP protocol selection does.
 *
 * The first connection is dialled before either pool exists. The protocol it negotiated picks the
 * pool (HTTP/2 sessions or HTTP/1.1 connections), and the socket becomes that pool's first
 * connection, so learning the protocol costs no extra handshake. Later connections are dialled by
 * that pool; one that negotiates the other protocol (the upstream was reconfigured) is closed,
 * its request fails with upstream_reset, and requests after it go to the other pool.
 */
import type * as net from 'node:net';
import type { TLSSocket } from 'node:tls';
import { poolError, type Connector, type PoolHandler, type PoolRequest, type UpstreamPool } from './pool.js';

export type AlpnProtocol = 'h2' | 'http1';

function negotiated(socket: net.Socket): AlpnProtocol {
  return (socket as TLSSocket).alpnProtocol === 'h2' ? 'h2' : 'http1';
}

export class AlpnPool implements UpstreamPool {
  #proto: AlpnProtocol | undefined;
  readonly #pools: Partial<Record<AlpnProtocol, UpstreamPool>> = {};
  /** Requests that arrived before the first connection told the protocol. */
  #waiting: { req: PoolRequest; handler: PoolHandler }[] = [];
  #probing = false;
  /** The probe's socket, until the chosen pool takes it as its first connection. */
  #spare: { socket: net.Socket; servername: string | undefined } | undefined;
  #closed = false;
  /** Resolves close() once a probe in flight has handed its requests over. */
  #probed: (() => void) | undefined;

  /**
   * @param dial opens one TLS connection offering h2 and http/1.1
   * @param make builds the pool for a protocol, dialling through the connector it is given
   */
  constructor(
    private readonly dial: Connector,
    private readonly make: (proto: AlpnProtocol, connect: Connector) => UpstreamPool,
  ) {}

  /** The protocol the upstream chose, once a connection told it. */
  get protocol(): AlpnProtocol | undefined {
    return this.#proto;
  }

  dispatch(req: PoolRequest, handler: PoolHandler): boolean {
    if (this.#closed) {
      queueMicrotask(() => handler.onError(poolError('UND_ERR_CLOSED', 'the upstream pool is closed')));
      return false;
    }
    if (this.#proto !== undefined) return this.#pool(this.#proto).dispatch(req, handler);
    this.#waiting.push({ req, handler });
    if (!this.#probing) this.#probe(req.servername);
    return true;
  }

  #probe(servername: string | undefined): void {
    this.#probing = true;
    this.dial(servername, (err, socket) => {
      this.#probing = false;
      const waiting = this.#waiting;
      this.#waiting = [];
      if (err !== null || socket === null) {
        // Each waiting request fails as a dial of its own would have (the next one probes again).
        const e = err ?? poolError('UND_ERR_SOCKET', 'connect failed');
        for (const w of waiting) w.handler.onError(e);
      } else {
        // Also when close() was called meanwhile: requests that were accepted still get served.
        this.#proto = negotiated(socket);
        this.#spare = { socket, servername };
        const pool = this.#pool(this.#proto);
        for (const w of waiting) pool.dispatch(w.req, w.handler);
      }
      const probed = this.#probed;
      this.#probed = undefined;
      probed?.();
    });
  }

  #pool(proto: AlpnProtocol): UpstreamPool {
    const existing = this.#pools[proto];
    if (existing !== undefined) return existing;
    const pool = this.make(proto, (servername, cb) => {
      const spare = this.#spare;
      if (spare !== undefined && spare.servername === servername) {
        this.#spare = undefined;
        if (!spare.socket.destroyed) {
          cb(null, spare.socket);
          return;
        }
      }
      this.dial(servername, (err, socket) => {
        if (err !== null || socket === null) {
          cb(err, null);
          return;
        }
        const got = negotiated(socket);
        if (got !== proto) {
          socket.destroy();
          this.#proto = got;
          cb(poolError('UND_ERR_SOCKET', `the upstream now negotiates ${got === 'h2' ? 'HTTP/2' : 'HTTP/1.1'} by ALPN`), null);
          return;
        }
        cb(null, socket);
      });
    });
    this.#pools[proto] = pool;
    return pool;
  }

  #dropSpare(): void {
    this.#spare?.socket.destroy();
    this.#spare = undefined;
  }

  /** Requests accepted so far finish (a probe in flight first hands its requests over). */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#probing) await new Promise<void>((resolve) => { this.#probed = resolve; });
    await Promise.all(Object.values(this.#pools).map((p) => p.close()));
    this.#dropSpare();
  }

  async destroy(): Promise<void> {
    this.#closed = true;
    this.#dropSpare();
    const err = poolError('UND_ERR_DESTROYED', 'the upstream pool was destroyed');
    for (const w of this.#waiting.splice(0)) w.handler.onError(err);
    this.#probed?.();
    this.#probed = undefined;
    await Promise.all(Object.values(this.#pools).map((p) => p.destroy()));
  }
}

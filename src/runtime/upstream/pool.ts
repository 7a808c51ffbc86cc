/**
 * What the cluster manager's per-endpoint pools share: the request, the handler protocol (the
 * one undici's dispatch speaks, so its Pool fits too), the pool interface and the error shape.
 */
import type * as net from 'node:net';
import type { Readable } from 'node:stream';

/** Header fields as the handler receives them: name, value, name, value (names as the peer sent them). */
export type PoolRawHeaders = (string | string[] | Buffer | (Buffer | string)[])[];

export interface PoolRequest {
  method: string;
  path: string;
  /** The list form (name, value, …); a value may be a list (one line per entry). */
  headers: (string | string[])[] | Record<string, string | string[]>;
  body: Readable | Buffer | null;
  /** TLS server name for the connection (connections are reused only for the same one). */
  servername?: string;
}

export interface PoolHandler {
  onConnect(abort: (err?: Error) => void): void;
  /** Returns false to pause the body after this call; `resume` continues it. */
  onHeaders(statusCode: number, rawHeaders: PoolRawHeaders, resume: () => void, statusText: string): boolean;
  onData(chunk: Buffer): boolean;
  onComplete(trailers: PoolRawHeaders | null): void;
  onError(err: Error): void;
}

/** What the cluster manager needs from any per-endpoint pool (h1-pool, h2-pool, or undici's Pool). */
export interface UpstreamPool {
  dispatch(req: PoolRequest, handler: PoolHandler): boolean;
  close(): Promise<void>;
  destroy(): Promise<void>;
}

export type Connector = (servername: string | undefined, cb: (err: Error | null, socket: net.Socket | null) => void) => void;

/** An error carrying the code the cluster manager classifies (codes as undici names them). */
export function poolError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(message), { code });
}

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

/**
 * Feeds a request body to `onData` until it ends (`onEnd`) or goes away first (`onGone`: its
 * error, or a close before its end); the listeners are off before either runs. Returns the
 * function that takes them off (for a request that fails meanwhile). Both pools send bodies so.
 */
export function followBody(body: Readable, onData: (chunk: Buffer) => void, onEnd: () => void, onGone: (err: Error) => void): () => void {
  const end = (): void => {
    detach();
    onEnd();
  };
  // The client went away (or its body failed) before the whole body was read.
  const gone = (err?: Error): void => {
    detach();
    onGone(err instanceof Error ? err : poolError('UND_ERR_ABORTED', 'request body ended early'));
  };
  const close = (): void => {
    if (!body.readableEnded) gone();
  };
  const detach = (): void => {
    body.off('data', onData);
    body.off('end', end);
    body.off('error', gone);
    body.off('close', close);
  };
  body.on('data', onData);
  body.once('end', end);
  body.once('error', gone);
  body.once('close', close);
  if (body.readableEnded) end();
  else body.resume();
  return detach;
}

/** A request waiting for, or being served on, a connection. */
export class PendingRequest {
  /** Already sent again once (a stale connection, a refused stream): never a second time. */
  retried = false;
  constructor(readonly req: PoolRequest, readonly handler: PoolHandler) {}
}

/**
 * What our pools share: requests wait in FIFO order, the subclass's `drive()` serves them on its
 * connections, and close() resolves once nothing is queued or being dialled and `settle()` has
 * closed every connection.
 */
export abstract class QueuedPool implements UpstreamPool {
  protected readonly queue: PendingRequest[] = [];
  protected connecting = 0;
  protected closing = false;
  protected destroyed = false;
  #scheduled = false;
  #closed: (() => void) | undefined;

  dispatch(req: PoolRequest, handler: PoolHandler): boolean {
    if (this.closing || this.destroyed) {
      queueMicrotask(() => handler.onError(poolError('UND_ERR_CLOSED', 'the upstream pool is closed')));
      return false;
    }
    this.queue.push(new PendingRequest(req, handler));
    // Handlers are never called from inside dispatch (the caller has not seen its control yet).
    if (!this.#scheduled) {
      this.#scheduled = true;
      queueMicrotask(this.#scheduledDrive);
    }
    return true;
  }

  #scheduledDrive = (): void => {
    this.#scheduled = false;
    this.drive();
  };

  /** Serves the queue as far as the connections allow, then calls maybeClosed(). */
  abstract drive(): void;

  /** While closing: closes the connections that are done; true once none is left. */
  protected abstract settle(): boolean;

  /** Ends every connection now; requests on them fail with `err`. */
  protected abstract destroyAll(err: Error): void;

  protected maybeClosed(): void {
    if (!this.closing || this.#closed === undefined) return;
    if (this.queue.length > 0 || this.connecting > 0) return;
    if (!this.settle()) return;
    const done = this.#closed;
    this.#closed = undefined;
    done();
  }

  /** Lets requests in flight and queued finish, then closes every connection. */
  close(): Promise<void> {
    this.closing = true;
    return new Promise((resolve) => {
      const prev = this.#closed;
      this.#closed = () => {
        prev?.();
        resolve();
      };
      this.maybeClosed();
    });
  }

  /** Closes everything now; requests in flight and queued fail. */
  destroy(): Promise<void> {
    this.destroyed = true;
    this.closing = true;
    const err = poolError('UND_ERR_DESTROYED', 'the upstream pool was destroyed');
    for (const p of this.queue.splice(0)) p.handler.onError(err);
    this.destroyAll(err);
    const done = this.#closed;
    this.#closed = undefined;
    done?.();
    return Promise.resolve();
  }
}

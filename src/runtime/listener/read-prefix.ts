/**
 * The socket side shared by the first-bytes readers (PROXY header, ClientHello): read until a
 * parser decides, with a byte cap and an unref'd timeout, then pause the socket, detach every
 * listener added here and hand back what was read, so the caller can replay it.
 *
 * Buffering: the first read is used as it is (no copy); later reads go into one owned store that
 * grows by doubling (a 1-byte drip costs O(n) copies) and never past `cap`; the read that crosses
 * the cap is concatenated once, since the parser decides within `cap` bytes.
 */
import type * as net from 'node:net';

export interface ReadPrefixOptions {
  timeoutMs: number;
  /** Most bytes the parser needs to decide. */
  cap: number;
  /** Smallest store allocated when a second read arrives. */
  minStore: number;
}

/**
 * `decide(view)` returns a result once the bytes suffice (it must decide by `cap` bytes), else
 * undefined; `ended(why, view)` builds the result for a peer that closed or a timeout.
 * Never rejects.
 */
export function readPrefix<R>(
  socket: net.Socket, opts: ReadPrefixOptions,
  decide: (view: Buffer) => R | undefined,
  ended: (why: 'closed' | 'timeout', view: Buffer) => R,
): Promise<R> {
  return new Promise<R>((resolve) => {
    const { cap } = opts;
    let store: Buffer | undefined;
    let view: Buffer = EMPTY;
    let done = false;

    const finish = (result: R): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.removeListener('data', onData);
      socket.removeListener('end', onEnd);
      socket.removeListener('close', onEnd);
      socket.removeListener('error', onEnd);
      socket.pause();
      resolve(result);
    };

    const onData = (chunk: Buffer): void => {
      if (done) return;
      const len = view.length;
      const total = len + chunk.length;
      if (len === 0) {
        view = chunk;
      } else if (total > cap) {
        view = Buffer.concat([view, chunk], total);
      } else {
        if (store === undefined || store.length < total) {
          const grown = Buffer.allocUnsafe(Math.min(cap, Math.max(2 * total, opts.minStore)));
          view.copy(grown, 0, 0, len);
          store = grown;
        }
        chunk.copy(store, len);
        view = store.subarray(0, total);
      }
      const r = decide(view);
      if (r !== undefined) finish(r);
    };

    const onEnd = (): void => finish(ended('closed', view));

    const timer = setTimeout(() => finish(ended('timeout', view)), Math.max(0, opts.timeoutMs));
    timer.unref();

    // 'error' counts as closed; the caller's own error listener (attached at accept) stays.
    socket.on('error', onEnd);
    if (socket.destroyed || socket.readableEnded) {
      onEnd();
      return;
    }
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('data', onData);
    socket.resume();
  });
}

const EMPTY = Buffer.alloc(0);

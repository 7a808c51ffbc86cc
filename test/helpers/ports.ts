// Port helpers for integration tests: every peer binds 127.0.0.1 on a port the kernel picked.
import net from 'node:net';

/** Asks the kernel for a free TCP port on 127.0.0.1 (listen(0), read it, close). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      if (address === null || typeof address === 'string') {
        server.close();
        reject(new Error('listen(0) returned no TCP address'));
        return;
      }
      server.close(() => resolve(address.port));
    });
  });
}

/** Several distinct free ports (the kernel does not hand out a port twice while it is bound). */
export async function freePorts(count: number): Promise<number[]> {
  const ports = new Set<number>();
  for (let attempt = 0; ports.size < count && attempt < count * 10; attempt++) ports.add(await freePort());
  if (ports.size < count) throw new Error(`could not find ${count} distinct free ports`);
  return [...ports];
}

/** Resolves true once a TCP connect to host:port succeeds once. */
export function canConnect(port: number, host = '127.0.0.1', timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host });
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.on('error', () => done(false));
    socket.on('connect', () => done(true));
  });
}

/** Polls every 50 ms until something accepts on host:port; rejects after timeoutMs. */
export async function waitForPort(port: number, timeoutMs = 10_000, host = '127.0.0.1'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await canConnect(port, host, Math.min(1000, Math.max(50, deadline - Date.now())))) return;
    await sleep(50);
  }
  throw new Error(`nothing accepted on ${host}:${port} within ${timeoutMs} ms`);
}

// Not unref()'d on purpose: a test awaiting it must keep the event loop alive.
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

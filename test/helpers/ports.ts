// Port helpers for integration tests: every peer binds 127.0.0.1 on a port the kernel picked.
import { readFileSync } from 'node:fs';
import net from 'node:net';

// Ports are picked below the kernel's ephemeral range: a port that listen(0) handed out and we
// released can be taken by any outgoing connect() before the peer we start binds it (the suite
// makes thousands of connections), and a lost race shows up as EADDRINUSE in an unrelated test.
const handedOut = new Set<number>();

function ephemeralRange(): [number, number] {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (Number.isInteger(low) && Number.isInteger(high)) return [low!, high!];
  } catch {
    // not Linux: fall through to the usual default
  }
  return [32768, 60999];
}

/** The range we pick from: [15000, ephemeral low) when it is wide enough, else none. */
const PICK_RANGE: [number, number] | undefined = (() => {
  const [low] = ephemeralRange();
  return low - 15000 >= 2000 ? [15000, low - 1] : undefined;
})();

function tryListen(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once('error', () => resolve(undefined));
    server.listen({ port, host: '127.0.0.1', exclusive: true }, () => {
      const address = server.address();
      server.close(() => resolve(address !== null && typeof address !== 'string' ? address.port : undefined));
    });
  });
}

/** A free TCP port on 127.0.0.1, never one this process handed out before. */
export async function freePort(): Promise<number> {
  if (PICK_RANGE !== undefined) {
    const [from, to] = PICK_RANGE;
    for (let attempt = 0; attempt < 200; attempt++) {
      const port = from + Math.floor(Math.random() * (to - from + 1));
      if (handedOut.has(port)) continue;
      if ((await tryListen(port)) === port) {
        handedOut.add(port);
        return port;
      }
    }
  }
  // Fallback: let the kernel pick (listen(0)).
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = await tryListen(0);
    if (port !== undefined && !handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error('could not find a free port on 127.0.0.1');
}

/** Several distinct free ports. */
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

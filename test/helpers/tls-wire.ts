// Small tools for tests that speak TLS on the wire: time bounds, a raw dial, a ClientHello captured
// from Node's own TLS client, byte builders for synthetic hellos, and one Prometheus series read.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import type { Gateway } from './tlsgate.js';
import { sleep } from './ports.js';

/** `p`, or a rejection naming `what` after `ms`. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms); });
  return Promise.race([p, bound]).finally(() => clearTimeout(timer));
}

/** Polls until `probe` returns something other than undefined (failure after `ms`). */
export async function until<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) assert.fail(`${what}: not within ${ms} ms`);
    await sleep(25);
  }
}

/** When each client address dial() made last began connecting ("127.0.0.1:port" -> Date.now()). */
const dialled = new Map<string, number>();

/** A connected, half-open capable TCP socket to `host`:`port` (errors after the connect are ignored). */
export function dial(port: number, host = '127.0.0.1'): Promise<net.Socket> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port, allowHalfOpen: true, noDelay: true });
    s.once('error', reject);
    s.once('connect', () => {
      dialled.set(`${host}:${s.localPort}`, started);
      s.off('error', reject);
      s.on('error', () => {});
      resolve(s);
    });
  });
}

/**
 * The gateway's access-log entry for the client at `down` (as dial() left it), optionally of one
 * kind: the newest whose connection started after that client began connecting (client ports are
 * reused, and the native relay writes its lines in batches, so an older line for the same port
 * may be there first).
 */
export function accessEntry(gw: Gateway, down: string, kind?: string): Promise<Record<string, unknown>> {
  // The gateway's start time comes from another clock reading than ours: a little slack.
  const since = (dialled.get(down) ?? 0) - 50;
  return until(`access-log entry for ${down}`, () => gw.accessLogs().filter((e) => e.downstream === down && (kind === undefined || e.kind === kind)
    && Date.parse(String(e.time)) >= since).at(-1));
}

/**
 * The first TLS record Node's client writes: its whole ClientHello. `opts` is the SNI (undefined:
 * none) or the client's options.
 */
export async function captureHello(opts: string | undefined | tls.ConnectionOptions): Promise<Buffer> {
  const o: tls.ConnectionOptions = typeof opts === 'object' ? opts : { servername: opts };
  const server = net.createServer();
  const got = new Promise<Buffer>((resolve) => server.once('connection', (s: net.Socket) => {
    s.on('error', () => {});
    let buf = Buffer.alloc(0);
    s.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      if (buf.length >= 5 && buf.length >= 5 + buf.readUInt16BE(3)) { resolve(buf.subarray(0, 5 + buf.readUInt16BE(3))); s.destroy(); }
    });
  }));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const c = tls.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port, rejectUnauthorized: false, ...o });
  c.on('error', () => {});
  try {
    return await within(got, 5_000, `ClientHello capture (${o.servername ?? 'no SNI'})`);
  } finally {
    c.destroy();
    server.close();
  }
}

/** What a TLS client saw of one exchange through the gateway (wire bytes counted on the raw socket). */
export interface Exchange { cn: string; issuer: string; authorized: boolean; reply: string; down: string; written: number; read: number }

/** A TLS client through the gateway: handshake (offering `alpn`, if any), one echoed line, close. */
export async function tlsExchange(port: number, servername: string, ca: string, line = 'ping\n', alpn?: string[], host = '127.0.0.1'): Promise<Exchange> {
  const raw = await dial(port, host);
  const down = `${host}:${raw.localPort}`;
  const closed = new Promise((resolve) => raw.once('close', resolve));
  const s = tls.connect({ socket: raw, servername, ca, ...(alpn !== undefined ? { ALPNProtocols: alpn } : {}) });
  s.on('error', () => {});
  try {
    await within(once(s, 'secureConnect'), 5_000, `handshake with ${servername}`);
    const cert = s.getPeerCertificate();
    let reply = '';
    const echoed = new Promise<void>((resolve) => s.on('data', (c: Buffer) => { reply += c.toString(); if (reply.length >= line.length) resolve(); }));
    s.write(line);
    await within(echoed, 5_000, 'echo');
    s.end();
    await within(closed, 5_000, 'close after end');
    return { cn: String(cert.subject?.CN), issuer: String(cert.issuer?.CN), authorized: s.authorized, reply, down, written: raw.bytesWritten, read: raw.bytesRead };
  } finally {
    s.destroy();
  }
}

/** The sum of `tlsgate_<name>` series whose labels include `labels`, from the admin endpoint. */
export async function promMetric(gw: Gateway, name: string, labels: Record<string, string> = {}): Promise<number> {
  const body = (await gw.admin('/stats/prometheus')).body;
  let sum = 0;
  for (const m of body.matchAll(new RegExp(`^tlsgate_${name}(?:\\{([^}]*)\\})? (\\S+)$`, 'gm'))) {
    if (Object.entries(labels).every(([k, v]) => (m[1] ?? '').includes(`${k}="${v}"`))) sum += Number(m[2]);
  }
  return sum;
}

// ---- byte builders for synthetic ClientHellos

export const u8 = (n: number): Buffer => Buffer.from([n & 0xff]);
export const u16 = (n: number): Buffer => Buffer.from([(n >> 8) & 0xff, n & 0xff]);
export const u24 = (n: number): Buffer => Buffer.from([(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);

/** A TLS extension: type, length, body. */
export function ext(type: number, body: Buffer): Buffer {
  return Buffer.concat([u16(type), u16(body.length), body]);
}

/** server_name with one host_name. */
export function sniExt(name: string | Buffer): Buffer {
  const n = typeof name === 'string' ? Buffer.from(name, 'latin1') : name;
  return ext(0, Buffer.concat([u16(n.length + 3), u8(0), u16(n.length), n]));
}

/** ALPN with these protocol names. */
export function alpnExt(names: readonly (string | Buffer)[]): Buffer {
  const list = Buffer.concat(names.map((p) => {
    const b = typeof p === 'string' ? Buffer.from(p, 'latin1') : p;
    return Buffer.concat([u8(b.length), b]);
  }));
  return ext(16, Buffer.concat([u16(list.length), list]));
}

/** A ClientHello handshake message with these extensions (one TLS 1.3 suite, no session id). */
export function helloMsg(exts: Buffer[], legacyVersion = 0x0303): Buffer {
  const e = Buffer.concat(exts);
  const body = Buffer.concat([
    u16(legacyVersion),
    Buffer.alloc(32, 7),
    u8(0),
    u16(2),
    u16(0x1301),
    u8(1),
    u8(0),
    ...(exts.length > 0 ? [u16(e.length), e] : []),
  ]);
  return Buffer.concat([u8(1), u24(body.length), body]);
}

/** A handshake message framed into records carrying at most `fragment` bytes each. */
export function frameHandshake(msg: Buffer, fragment = 16384): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < msg.length; i += fragment) {
    const f = msg.subarray(i, Math.min(msg.length, i + fragment));
    parts.push(Buffer.from([22, 3, 1]), u16(f.length), f);
  }
  return Buffer.concat(parts);
}

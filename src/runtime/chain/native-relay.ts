/**
 * The optional native TCP relay (native/relay.c, built by node-gyp at install into
 * build/Release/relay.node): moves bytes between two raw TCP sockets from one epoll set on Node's event
 * loop (recv/send through one buffer, splice(2) through a pipe for what waits), so passthrough and plain
 * TCP bytes never cross into JS. When the addon is missing (not built, not
 * Linux) or the relay mode is `js`, tcp-proxy.ts uses its JS pipe relay.
 *
 * The mode is process-wide: `tlsgate run --relay auto|native|js` sets it once at start.
 *
 * For a plain TCP upstream the addon also dials (connectNativeRelay): Node then never builds a
 * socket for the upstream at all, which is most of what a short relayed connection costs.
 * TLSGATE_NATIVE_CONNECT=0 keeps dialling in JS (the upstream socket is then handed over as before).
 *
 * Native accept (listenNative): for a TLS-inspecting listener the relay accepts and reads
 * the ClientHello itself; JS gets the bytes (AcceptedHello), routes them, and either has the addon
 * dial and relay (connectAccepted), asks for more bytes (moreAccepted), or takes the descriptor
 * into a Node socket (adoptAccepted) for everything else. TLSGATE_NATIVE_ACCEPT=0 (or native
 * connect off) keeps Node accepting.
 *
 * Learned routes (learnFastRoute): once JS has routed an SNI of an accepted connection to plain
 * TCP, the addon routes the next ones naming it by itself, and hands JS records of them in
 * batches (onFast) for the counters and the access log. TLSGATE_NATIVE_ROUTES=0 turns it off.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type net from 'node:net';
import type { Cluster } from '../../model/snapshot.js';
import { activeSlots } from '../upstream/active-slots.js';

/** DestinationRule connectionPool.tcp.tcpKeepalive, translated. */
export type TcpKeepalive = NonNullable<Cluster['tcpKeepalive']>;

export type RelayMode = 'auto' | 'native' | 'js';

/** What the addon reports once per relayed connection (bytes moved natively, and why it ended). */
export interface NativeRelayResult {
  /** Bytes read from the downstream socket / written to the upstream one. */
  downRead: number;
  upWritten: number;
  /** Bytes read from the upstream socket / written to the downstream one. */
  upRead: number;
  downWritten: number;
  reason: 'ok' | 'downstream_reset' | 'upstream_reset' | 'idle_timeout' | 'stopped' | 'internal_error'
    // Only for connectNativeRelay: the dial failed (refused, unreachable) or took too long.
    | 'upstream_connect_failed' | 'upstream_connect_timeout';
}

/** Why the addon reported an accepted connection's bytes now. */
export type HelloStatus = 'data' | 'closed' | 'timeout' | 'reset';
const HELLO_STATUS: readonly HelloStatus[] = ['data', 'closed', 'timeout', 'reset'];

/**
 * Bytes the relay read from a connection it accepted (only those new since its previous
 * report), and the connection, which awaits a decision: exactly one of moreAccepted,
 * connectAccepted, adoptAccepted or closeAccepted, made synchronously in the handler.
 */
export interface AcceptedHello {
  id: number;
  /** Valid only during the handler (it is a view of a buffer the next report reuses): copy what is kept. */
  bytes: Buffer;
  status: HelloStatus;
  /** Only with a connection's first report. */
  remoteAddress?: string;
  remotePort?: number;
  /** Only when the listener is bound to a wildcard address ('' otherwise). */
  localAddress?: string;
  localPort?: number;
  /** Only with the first report: how long ago the addon accepted the connection. */
  ageMs?: number;
}

export interface NativeListenerLimits {
  /** Most bytes read before JS must decide (maxClientHelloBytes + a record header). */
  helloCapBytes: number;
  helloTimeoutMs: number;
  maxConnections: number;
}

interface Addon {
  init(onDone: (id: number, downRead: number, upWritten: number, upRead: number, downWritten: number, reason: string) => void,
    onHello?: (lid: number, id: number, fd: number, bytes: Buffer | number, status: number, ra?: string, rp?: number, la?: string, lp?: number,
      ageMs?: number) => void,
    helloBuffer?: Buffer): void;
  listen(fd: number, helloCapBytes: number, helloTimeoutMs: number, maxConnections: number, wildcard: boolean): number;
  configureListener(lid: number, helloCapBytes: number, helloTimeoutMs: number, maxConnections: number): void;
  listenerStats(lid: number): [number, number];
  unlisten(lid: number, wantFd: boolean): number;
  closeListenerConnections(lid: number): void;
  busy?(): boolean;
  release(lid: number): void;
  more(id: number): void;
  adopt(id: number): number;
  closeAccepted(id: number): void;
  acceptedConnect(id: number, ip: string, port: number, connectTimeoutMs: number, idleTimeoutMs: number, prefix: Buffer, keepalive: number): number;
  start(downFd: number, upFd: number, idleTimeoutMs: number, downEof: boolean, upEof: boolean): number;
  connect(downFd: number, ip: string, port: number, connectTimeoutMs: number, idleTimeoutMs: number, downEof: boolean, head: Buffer, keepalive: number): number;
  setKeepalive?(fd: number, keepalive: number): boolean;
  keepaliveOf?(fd: number): [number, number, number, number];
  stop(id: number): void;
  setFast?(onFast: (count: number, extras: unknown[] | undefined) => void, records: Float64Array, slots: Int32Array): void;
  /** -1: not learned; else how many connections the route it replaced had started. */
  fastLearn?(lid: number, sni: string | null, maxHelloBytes: number, log: boolean, routeId: number, targets: FastTargetSpec[]): number;
  /** [routeId, started, ...] of the routes forgotten. */
  fastForget?(lid: number): number[];
  scanHello?(bytes: Buffer, maxBytes: number): [string, string | undefined, string | undefined, boolean];
  /** The record layout the addon writes (FAST_STRIDE in native/relay.c). */
  fastStride?: number;
}

/**
 * One target of a learned route, as the addon takes it (see fastLearn in native/relay.c): weight,
 * policy, cluster slot, maxConnections, connect and idle timeouts, endpoints, keep-alive.
 */
type FastTargetSpec = [number, number, number, number, number, number, [string, number, number, number][], number];

let addon: Addon | undefined;
let loadError: string | undefined;
let loaded = false;
let mode: RelayMode = 'auto';
const pending = new Map<number, (r: NativeRelayResult) => void>();
/** connectNativeRelay connections not yet connected: their onConnected. */
const dialling = new Map<number, () => void>();
const nativeConnect = process.env.TLSGATE_NATIVE_CONNECT !== '0';
const nativeAccept = process.env.TLSGATE_NATIVE_ACCEPT !== '0';
/**
 * The addon copies each report's hello bytes here and passes their length (a Buffer per report
 * costs more than the rest of the report); longer reports (a raised maxClientHelloBytes) come as
 * their own Buffer.
 */
const helloBuffer = Buffer.allocUnsafeSlow(64 * 1024 + 1024);
/** The last accepted connection a decision was made for (see the hello handler's check). */
let decided = 0;
/** Accepting listeners: their hello handlers. */
const acceptors = new Map<number, (h: AcceptedHello) => void>();
const EMPTY = Buffer.alloc(0);

// ---- learned routes -----------------------------------------------------------------------------

/** Doubles per record in `fastRecords` (FAST_STRIDE in native/relay.c; the addon's fastStride). */
export const FAST_STRIDE = 16;
export const FAST_START = 1;
export const FAST_CONNECTED = 2;
export const FAST_END = 3;
/** END records carry the reason as an index into this list (enum reason in native/relay.c). */
export const FAST_REASONS: readonly NativeRelayResult['reason'][] = ['ok', 'downstream_reset', 'upstream_reset', 'idle_timeout', 'stopped',
  'internal_error', 'upstream_connect_failed', 'upstream_connect_timeout'];
const fastRecords = new Float64Array(FAST_STRIDE * 1024);

/**
 * What JS does for each record of a learned route's connections (counters, the access log):
 * `buf[at ...]` is one record (FAST_STRIDE doubles); a START of a route learned with `log` has
 * its addresses and hello fields in `start` (valid during the call only), else `start` is
 * undefined.
 */
export type FastRouteHandler = (buf: Float64Array, at: number, start: FastStart | undefined) => void;

/** A start record's addresses and hello fields (the SNI is the route's own). */
export interface FastStart {
  remoteAddress: string;
  remotePort: number;
  localAddress: string;
  localPort: number;
  /** The ALPN protocols the client offered ([] for none); shared between connections: never changed. */
  alpn: readonly string[];
  ech: boolean;
}

const NO_ALPN: readonly string[] = Object.freeze([]);
/** The addon's ALPN table as JS has been told it (fast_start_fields in native/relay.c). */
const alpnTable: (readonly string[])[] = [];
const startFields: FastStart = { remoteAddress: '', remotePort: 0, localAddress: '', localPort: 0, alpn: NO_ALPN, ech: false };
/** The last IPv4 address of one kind (peer, local) and its text: clients repeat. */
interface LastAddress { n: number; text: string }
const lastPeer: LastAddress = { n: -1, text: '' };
const lastLocal: LastAddress = { n: -1, text: '' };

/**
 * An address as the addon wrote it: an IPv4 address as a number, -1 for a string in extras (at
 * `extras[x]`), -2 for none.
 */
function addressText(v: number, last: LastAddress, extras: unknown[] | undefined, x: number): string {
  if (v === -2) return '';
  if (v === -1) return String(extras?.[x] ?? '');
  if (v !== last.n) {
    last.n = v;
    last.text = `${v >>> 24}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}`;
  }
  return last.text;
}

/**
 * Reads a START record's fields into `startFields`. Always run, in record order, for every START
 * with fields (also of routes JS no longer knows): a new ALPN list updates the mirror here.
 */
function readStart(buf: Float64Array, at: number, extras: unknown[] | undefined): FastStart {
  let x = buf[at + 10]!;
  const f = startFields;
  const peer = buf[at + 5]!;
  f.remoteAddress = addressText(peer, lastPeer, extras, x);
  if (peer === -1) x++;
  f.remotePort = buf[at + 7]!;
  const local = buf[at + 8]!;
  f.localAddress = addressText(local, lastLocal, extras, x);
  if (local === -1) x++;
  f.localPort = buf[at + 9]!;
  const flags = buf[at + 15]!;
  f.ech = (flags & 1) !== 0;
  const a = buf[at + 14]!;
  if (a < 0) {
    f.alpn = NO_ALPN;
  } else {
    if ((flags & 2) !== 0) alpnTable[a] = Object.freeze(decodeAlpn(String(extras?.[x] ?? '')));
    f.alpn = alpnTable[a] ?? NO_ALPN;
  }
  return f;
}

/** ALPN protocol names from the extension's list as sent (length-prefixed, latin1). */
function decodeAlpn(list: string): string[] {
  const out: string[] = [];
  for (let p = 0; p < list.length;) {
    const n = list.charCodeAt(p);
    out.push(list.slice(p + 1, p + 1 + n));
    p += 1 + n;
  }
  return out;
}

interface LearnedRoute {
  handler: FastRouteHandler;
  /** Connections started on it (START records had) and not yet ended. */
  live: number;
  /** START records had. */
  started: number;
  /**
   * Once forgotten: how many connections the addon started on it. Their records may still be on
   * the way (batched), so the route stays until all of them have started and ended.
   */
  expected: number;
  forgotten: boolean;
}
const fastRoutes = new Map<number, LearnedRoute>();
/** Per listener: the route each learned SNI ('' for none: key '\0') has now. */
const learnedBy = new Map<number, Map<string, number>>();
let nextRouteId = 0;
/** TLSGATE_NATIVE_ROUTES=0: JS routes every accepted connection itself (for comparisons). */
const fastEnabled = process.env.TLSGATE_NATIVE_ROUTES !== '0';

function onFast(count: number, extras: unknown[] | undefined): void {
  const buf = fastRecords;
  for (let i = 0; i < count; i++) {
    const at = i * FAST_STRIDE;
    const kind = buf[at]!;
    const start = kind === FAST_START && buf[at + 10]! >= 0 ? readStart(buf, at, extras) : undefined;
    const id = buf[at + 2]!;
    const r = fastRoutes.get(id);
    if (r === undefined) continue;
    if (kind === FAST_START) {
      r.live++;
      r.started++;
    } else if (kind === FAST_END && --r.live === 0 && r.forgotten && r.started >= r.expected) {
      fastRoutes.delete(id);
    }
    try {
      r.handler(buf, at, start);
    } catch {
      // As with every report: a handler never takes the process down.
    }
  }
}

/** True when the addon can route accepted connections by itself (learned routes). */
export function fastRoutesAvailable(): boolean {
  return addon?.fastLearn !== undefined && fastWired && fastEnabled;
}
let fastWired = false;

/**
 * The addon routes connections on listener `lid` whose ClientHello names `sni` (undefined: no
 * SNI) by itself from now on: a weighted pick of `targets`, an endpoint by each cluster's policy,
 * dial and relay; `handler` gets the records. Replaces what the SNI had. False when the
 * listener's table is full or the addon cannot.
 */
export function learnFastRoute(lid: number, sni: string | undefined, opts: { maxHelloBytes: number; log: boolean },
  targets: FastTargetSpec[], handler: FastRouteHandler): boolean {
  const a = addon;
  if (!a?.fastLearn || !fastWired || !fastEnabled) return false;
  const id = ++nextRouteId;
  let replacedStarted: number;
  try {
    replacedStarted = a.fastLearn(lid, sni ?? null, Math.max(0, Math.floor(opts.maxHelloBytes)), opts.log, id, targets);
  } catch {
    return false; // a target the addon cannot take (JS keeps routing this SNI)
  }
  if (typeof replacedStarted !== 'number' || replacedStarted < 0) return false;
  fastRoutes.set(id, { handler, live: 0, started: 0, expected: 0, forgotten: false });
  let m = learnedBy.get(lid);
  if (m === undefined) learnedBy.set(lid, (m = new Map()));
  const key = sni ?? '\0';
  const prev = m.get(key);
  if (prev !== undefined) retire(prev, replacedStarted);
  m.set(key, id);
  return true;
}

/** Whether listener `lid` has a learned route for `sni` now. */
export function fastRouteLearned(lid: number, sni: string | undefined): boolean {
  return learnedBy.get(lid)?.has(sni ?? '\0') === true;
}

/** A route the addon no longer picks, which had started `started` connections. */
function retire(id: number, started: number): void {
  const r = fastRoutes.get(id);
  if (r === undefined) return;
  r.forgotten = true;
  r.expected = started;
  if (r.live === 0 && r.started >= started) fastRoutes.delete(id);
}

/** Listener `lid`'s learned routes go (a new config); connections on them go on and still report. */
export function forgetFastRoutes(lid: number): void {
  const m = learnedBy.get(lid);
  if (m === undefined) return;
  learnedBy.delete(lid);
  const pairs = addon?.fastForget?.(lid);
  const started = new Map<number, number>();
  if (Array.isArray(pairs)) for (let i = 0; i + 1 < pairs.length; i += 2) started.set(pairs[i]!, pairs[i + 1]!);
  // A route the addon did not name (no memory for the list): what has reached JS so far.
  for (const id of m.values()) retire(id, started.get(id) ?? fastRoutes.get(id)?.started ?? 0);
}

/** Every listener's learned routes go (clusters or endpoints changed). */
export function forgetAllFastRoutes(): void {
  for (const lid of [...learnedBy.keys()]) forgetFastRoutes(lid);
}

/** The addon's own ClientHello reader (tests hold it to client-hello.ts); undefined without the addon. */
export function scanHelloNative(bytes: Buffer, maxBytes: number): { kind: string; sni?: string; alpn?: string; ech: boolean } | undefined {
  const a = load();
  if (!a?.scanHello) return undefined;
  const [kind, sni, alpn, ech] = a.scanHello(bytes, maxBytes);
  return { kind, ...(sni !== undefined ? { sni } : {}), ...(alpn !== undefined ? { alpn } : {}), ech };
}

/** build/Release/relay.node from the package root (this file is dist/src/runtime/chain/ when compiled). */
function addonPath(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'build', 'Release', 'relay.node');
    if (existsSync(candidate)) return candidate;
    if (existsSync(path.join(dir, 'package.json'))) return candidate;
    dir = path.dirname(dir);
  }
  return path.join(dir, 'build', 'Release', 'relay.node');
}

function load(): Addon | undefined {
  if (loaded) return addon;
  loaded = true;
  if (process.platform !== 'linux') {
    loadError = `splice(2) is Linux-only (platform ${process.platform})`;
    return undefined;
  }
  const file = addonPath();
  if (!existsSync(file)) {
    loadError = `${file} is not built (npm run build:native)`;
    return undefined;
  }
  try {
    const a = createRequire(import.meta.url)(file) as Addon;
    a.init((id, downRead, upWritten, upRead, downWritten, reason) => {
      if (reason === 'connected') {
        const up = dialling.get(id);
        dialling.delete(id);
        try {
          up?.();
        } catch {
          // As below: a report handler never takes the process down.
        }
        return;
      }
      dialling.delete(id);
      const cb = pending.get(id);
      if (!cb) return;
      pending.delete(id);
      try {
        cb({ downRead, upWritten, upRead, downWritten, reason: reason as NativeRelayResult['reason'] });
      } catch {
        // The connection is already closed; nothing a report handler does may take the process down.
      }
    }, (lid, id, fd, bytes, status, ra, rp, la, lp, ageMs) => {
      const on = acceptors.get(lid);
      try {
        if (on === undefined) throw new Error('listener gone');
        on({ id, bytes: typeof bytes === 'number' ? helloBuffer.subarray(0, bytes) : bytes, status: HELLO_STATUS[status] ?? 'reset',
          remoteAddress: ra, remotePort: rp, localAddress: la, localPort: lp, ageMs });
      } catch {
        // A handler that threw, or a listener that is gone: no decision was made.
      }
      // Every report must end in a decision, or the descriptor would stay with the addon for good.
      if (decided !== id) {
        try { a.closeAccepted(id); } catch { /* decided after all */ }
      }
    }, helloBuffer);
    // An addon built for another record layout (a stale build) routes nothing by itself.
    if (a.setFast && a.fastStride === FAST_STRIDE) {
      a.setFast(onFast, fastRecords, activeSlots);
      fastWired = true;
    }
    addon = a;
  } catch (e) {
    loadError = (e as Error).message;
  }
  return addon;
}

/** True when the addon is built and loads on this platform. */
export function nativeRelayAvailable(): boolean {
  return load() !== undefined;
}

/** Why the addon is not available (undefined when it is). */
export function nativeRelayUnavailableReason(): string | undefined {
  load();
  return addon ? undefined : loadError;
}

/**
 * Sets the process-wide relay mode. `native` when the addon is unavailable throws, so the
 * caller can refuse to start. Returns the relay that will actually be used.
 */
export function setRelayMode(m: RelayMode): 'native' | 'js' {
  if (m === 'native' && !nativeRelayAvailable()) {
    throw new Error(`--relay native: the native relay is not available: ${nativeRelayUnavailableReason()}`);
  }
  mode = m;
  return relayInUse();
}

/** The relay raw TCP connections get: `native` (the addon) or `js` (stream pipe). */
export function relayInUse(): 'native' | 'js' {
  return mode !== 'js' && nativeRelayAvailable() ? 'native' : 'js';
}

/** Connections currently relayed natively (not yet reported back). */
export function nativeRelayActive(): number {
  return pending.size;
}

/**
 * Hands two connected sockets' descriptors to the relay. The caller must have stopped
 * reading and writing them; it keeps them open until `onDone`, which runs exactly once (also
 * after `stopNativeRelay`). Throws when setup fails (out of descriptors): nothing was started.
 */
export function startNativeRelay(
  downFd: number, upFd: number, opts: { idleTimeoutMs: number; downEof: boolean; upEof: boolean },
  onDone: (r: NativeRelayResult) => void,
): number {
  const a = load();
  if (!a) throw new Error(`native relay unavailable: ${loadError}`);
  const id = a.start(downFd, upFd, Math.max(0, Math.floor(opts.idleTimeoutMs)), opts.downEof, opts.upEof);
  pending.set(id, onDone);
  return id;
}

/** True when plain TCP upstreams are dialled by the addon (native relay in use, not TLSGATE_NATIVE_CONNECT=0). */
export function nativeConnectInUse(): boolean {
  return nativeConnect && relayInUse() === 'native';
}

/**
 * Like startNativeRelay, but the relay dials `ip`:`port` itself (non-blocking connect,
 * bounded by `connectTimeoutMs`), writes `head` (bytes already read from the downstream, PROXY
 * header first) and then relays. `onConnected` runs once if the connect succeeds, before `onDone`;
 * a failed or timed-out connect ends with reason upstream_connect_failed / upstream_connect_timeout.
 * `onDone` runs exactly once. Throws when setup fails (not an IP address, out of descriptors):
 * nothing was started.
 */
export function connectNativeRelay(
  downFd: number, ip: string, port: number,
  opts: { connectTimeoutMs: number; idleTimeoutMs: number; downEof: boolean; head: Buffer | undefined; keepalive: TcpKeepalive | undefined },
  onConnected: () => void, onDone: (r: NativeRelayResult) => void,
): number {
  const a = load();
  if (!a) throw new Error(`native relay unavailable: ${loadError}`);
  const id = a.connect(downFd, ip, port, Math.max(1, Math.floor(opts.connectTimeoutMs)), Math.max(0, Math.floor(opts.idleTimeoutMs)),
    opts.downEof, opts.head ?? EMPTY, keepaliveWord(opts.keepalive));
  pending.set(id, onDone);
  dialling.set(id, onConnected);
  return id;
}

/**
 * A cluster's TCP keep-alive as the addon takes it: -1 off; else time << 24 | interval << 8 |
 * probes, each 0 for the OS default (time and interval at most 32767 s, probes at most 127).
 */
export function keepaliveWord(k: TcpKeepalive | undefined): number {
  if (k === undefined) return -1;
  return (k.timeS ?? 0) * 2 ** 24 + (k.intervalS ?? 0) * 256 + (k.probes ?? 0);
}

/**
 * TCP keep-alive on a socket Node dialled, as `k` says. The addon sets SO_KEEPALIVE and each
 * value given, leaving the others at the OS default. Node's own setKeepAlive (the fallback
 * without the addon) also sets a 1 s probe interval and 10 probes: false then.
 */
export function setSocketKeepalive(socket: net.Socket, k: TcpKeepalive): boolean {
  const fd = socketFd(socket);
  const a = load();
  // The addon's answer stands even when an option failed: Node's would set other values still.
  if (a?.setKeepalive && fd !== undefined) return a.setKeepalive(fd, keepaliveWord(k));
  socket.setKeepAlive(true, (k.timeS ?? 7200) * 1000);
  return false;
}

/** The descriptor under a connected Node socket (a TLS socket's too), if it has one. */
function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/**
 * A socket's keep-alive as the kernel has it (SO_KEEPALIVE, idle and interval seconds, probes),
 * for tests and diagnostics; undefined without the addon or a descriptor.
 */
export function socketKeepalive(socket: net.Socket): { on: boolean; timeS: number; intervalS: number; probes: number } | undefined {
  const fd = socketFd(socket);
  const v = fd !== undefined ? load()?.keepaliveOf?.(fd) : undefined;
  return v === undefined ? undefined : { on: v[0] > 0, timeS: v[1], intervalS: v[2], probes: v[3] };
}

/** Whether setSocketKeepalive can set keep-alive exactly as configured (the addon is there). */
export function keepaliveExact(): boolean {
  return load()?.setKeepalive !== undefined;
}

/** Ends a natively relayed connection; its `onDone` follows with reason `stopped`. */
export function stopNativeRelay(id: number): void {
  if (pending.has(id)) addon?.stop(id);
}

/** True when TLS-inspecting listeners are accepted by the addon (native connect in use, not TLSGATE_NATIVE_ACCEPT=0). */
export function nativeAcceptInUse(): boolean {
  return nativeAccept && nativeConnectInUse();
}

/**
 * The relay accepts on (a dup of) the listening socket `fd` from now on and reports each
 * connection's first bytes to `onHello`; the caller closes its own listening handle. The
 * listener keeps the process alive until unlistenNative. Throws when the addon cannot.
 */
export function listenNative(fd: number, limits: NativeListenerLimits, wildcard: boolean, onHello: (h: AcceptedHello) => void): number {
  const a = load();
  if (!a) throw new Error(`native relay unavailable: ${loadError}`);
  const lid = a.listen(fd, ...limitArgs(limits), wildcard);
  acceptors.set(lid, onHello);
  return lid;
}

function limitArgs(l: NativeListenerLimits): [number, number, number] {
  const u32 = (n: number) => Math.max(0, Math.min(0xffffffff, Math.floor(n)));
  return [Math.max(1, u32(l.helloCapBytes)), u32(l.helloTimeoutMs), u32(l.maxConnections)];
}

/** New limits for connections accepted from now on (a config swap). */
export function configureNativeListener(lid: number, limits: NativeListenerLimits): void {
  addon?.configureListener(lid, ...limitArgs(limits));
}

/** Connections accepted and not yet closed (adopted ones until released), and refusals over the limit since the last call. */
export function nativeListenerStats(lid: number): { open: number; refused: number } {
  const [open, refused] = addon?.listenerStats(lid) ?? [0, 0];
  return { open, refused };
}

/**
 * Stops accepting; connections already accepted go on (their hellos are still reported). With
 * `wantFd`, returns a new descriptor of the listening socket for Node to accept on, else -1.
 */
export function unlistenNative(lid: number, wantFd: boolean): number {
  // The hello handler stays: connections accepted before this still report their first bytes.
  return addon?.unlisten(lid, wantFd) ?? -1;
}

/** Drops a stopped listener's hello handler once none of its connections is left in the addon. */
export function forgetNativeListener(lid: number): void {
  acceptors.delete(lid);
}

/** Ends every connection the addon holds from this listener (closeAll). */
export function closeNativeListenerConnections(lid: number): void {
  addon?.closeListenerConnections(lid);
}

/**
 * Whether the addon's relay thread still holds connections, or records JS has not had yet: a
 * shutdown that just closed every connection waits for their last records (the access log).
 */
export function nativeRelayBusy(): boolean {
  return addon?.busy?.() === true;
}

/** An adopted connection closed: it no longer counts against its listener's limit. */
export function releaseAccepted(lid: number): void {
  addon?.release(lid);
}

/** The bytes so far did not decide: report again when more arrive (or close / timeout). */
export function moreAccepted(id: number): void {
  decided = id;
  addon!.more(id);
}

/** The connection's descriptor, now the caller's (for `new net.Socket({ fd })`). */
export function adoptAccepted(id: number): number {
  decided = id;
  return addon!.adopt(id);
}

/** Closes an accepted connection without a word to the client. */
export function closeAccepted(id: number): void {
  decided = id;
  addon!.closeAccepted(id);
}

/**
 * The addon dials `ip`:`port` for an accepted connection and relays; `prefix` (a PROXY header)
 * and then every byte read from the client go first. Reports as connectNativeRelay does. Throws
 * when setup fails, after closing the connection.
 */
export function connectAccepted(
  id: number, ip: string, port: number,
  opts: { connectTimeoutMs: number; idleTimeoutMs: number; prefix: Buffer | undefined; keepalive: TcpKeepalive | undefined },
  onConnected: () => void, onDone: (r: NativeRelayResult) => void,
): void {
  const a = addon!;
  decided = id;
  a.acceptedConnect(id, ip, port, Math.max(1, Math.floor(opts.connectTimeoutMs)), Math.max(0, Math.floor(opts.idleTimeoutMs)), opts.prefix ?? EMPTY,
    keepaliveWord(opts.keepalive));
  pending.set(id, onDone);
  dialling.set(id, onConnected);
}

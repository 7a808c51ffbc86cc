/**
 * TCP proxying for passthrough chains, TCP servers and TLS-terminated TCP: pick a weighted
 * cluster, connect (the cluster's connect timeout, and upstream TLS when the cluster has it),
 * replay the bytes the listener already read, then relay both ways with backpressure (pipe),
 * half-close propagation and an idle timeout. One access-log entry per connection.
 *
 * Closing: each side's FIN is forwarded as a FIN (both sockets are half-open capable), and a
 * socket closes by itself once both of its directions are done. When one side has closed and the
 * other still has bytes queued, those bytes are flushed before it is closed too: a bulk download
 * whose server closes right after the last byte must not lose its tail.
 *
 * Native relay: when both sides are raw TCP sockets (passthrough, plain TCP, CONNECT tunnels
 * without upstream TLS) and the native relay addon is in use (native-relay.ts), JS stops reading both
 * sockets, forwards what it already holds (replay, PROXY header, bytes buffered in the streams),
 * waits until those writes reached the kernel, and hands both descriptors to the relay.
 * The JS sockets stay open, untouched, until the addon reports the connection done; destroying
 * one meanwhile (closeAll, drain) stops the native relay. Access-log bytes add the addon's
 * counts to what JS moved itself.
 *
 * Native connect: for a plain TCP cluster (no upstream TLS) with an IP endpoint, the addon also
 * dials. The cluster manager picks the endpoint and counts it active (reserveTcp); JS stops
 * reading the client, hands the addon its descriptor, the address and the bytes already read,
 * and creates no upstream socket at all. The addon reports the connect (endpoint, connect time)
 * and then the end, or a connect failure / timeout as the end.
 */
import type * as net from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Cluster, TcpProxy, WeightedCluster } from '../../model/snapshot.js';
import { isIP } from 'node:net';
import { encodeProxyV1, encodeProxyV2, sslTlvs } from '../listener/proxy-protocol.js';
import type { ConnectionInfo } from '../connection-info.js';
import { isoTime } from '../iso-time.js';
import { counterOf, type Reason, type Telemetry } from '../telemetry.js';
import { subjectAltNames } from './xfcc.js';
import { connectAccepted, connectNativeRelay, nativeConnectInUse, relayInUse, startNativeRelay, stopNativeRelay, type NativeRelayResult,
  FAST_CONNECTED, FAST_END, FAST_REASONS, FAST_START, type FastRouteHandler, type TcpKeepalive } from './native-relay.js';
import type { FastClusterTarget } from '../upstream/cluster-manager.js';

/** An endpoint picked and counted active for one connection that the native relay dials itself. */
export interface TcpReservation {
  /** IP address (v4 or v6) and port to dial. */
  address: string;
  port: number;
  /** "ip:port" for the access log. */
  endpoint: string;
  /** The cluster's connect timeout. */
  timeoutMs: number;
  /** The cluster's TCP keep-alive (none when undefined). */
  keepalive: TcpKeepalive | undefined;
  /** Ends the endpoint's and cluster's active count (idempotent). */
  release(): void;
}

export interface TcpConnector {
  connectTcp(cluster: string, opts: { timeoutMs?: number; sni?: string }): Promise<{ socket: net.Socket; endpoint: string }>;
  /**
   * Picks an endpoint of a plain TCP cluster and counts it active without dialing; an error
   * (carrying its reason) when connectTcp would fail at once; undefined when connectTcp must be
   * used (TLS origination, unix socket or unresolved endpoints).
   */
  reserveTcp?(cluster: string): TcpReservation | (Error & { reason?: Reason; code?: string }) | undefined;
  /** The cluster's settings (PROXY protocol toward it). */
  get?(cluster: string): Cluster | undefined;
  /** What the native relay needs to pick and dial this cluster's endpoints by itself (learned routes). */
  fastTarget?(cluster: string): FastClusterTarget | undefined;
}

/** The PROXY header announcing the downstream client to an upstream that asked for one. */
export function proxyHeaderFor(version: 'v1' | 'v2', info: ConnectionInfo): Buffer {
  const source = { address: info.downstreamRemoteAddress, port: info.downstreamRemotePort };
  const destination = { address: info.downstreamLocalAddress, port: info.downstreamLocalPort };
  const valid = isIP(source.address) !== 0 && isIP(destination.address) !== 0;
  if (version === 'v1') return valid ? encodeProxyV1(source, destination) : encodeProxyV1(undefined, undefined, 'UNKNOWN');
  const peer = info.peerCertificate;
  const cn = peer?.subject?.split('\n').find((l) => l.startsWith('CN='))?.slice(3);
  const uri = peer ? subjectAltNames(peer).uri[0] : undefined;
  const tlvs = sslTlvs({
    ...(info.alpn ? { alpn: info.alpn } : info.alpnOffered?.[0] ? { alpn: info.alpnOffered[0] } : {}),
    ...(info.sni ? { authority: info.sni } : {}),
    ...(info.tlsVersion ? { tlsVersion: info.tlsVersion } : {}),
    ...(info.cipher ? { cipher: info.cipher } : {}),
    ...(cn ? { clientCn: cn } : {}),
    ...(uri ? { clientUriSan: uri } : {}),
    ...(peer ? { verified: info.peerCertificateVerified === true } : {}),
  });
  return valid ? encodeProxyV2({ command: 'PROXY', source, destination, tlvs }) : encodeProxyV2({ command: 'LOCAL', tlvs });
}

export interface TcpProxyEnv {
  clusters: TcpConnector;
  telemetry: Telemetry;
}

/** How long a side may take to flush its queued bytes once the other side has closed. */
const FLUSH_GRACE_MS = 30_000;
/** Offered ALPN lists are client-controlled: the access log keeps a bounded prefix. */
const MAX_LOGGED_ALPN = 256;

/** Weighted pick over clusters (weights are small integers; no allocation). */
export function pickWeighted(list: readonly WeightedCluster[], rnd = Math.random): WeightedCluster | undefined {
  if (list.length === 1) return list[0];
  let total = 0;
  for (const w of list) total += w.weight;
  if (total <= 0) return undefined;
  let r = rnd() * total;
  for (const w of list) {
    r -= w.weight;
    if (r < 0) return w;
  }
  return list[list.length - 1];
}

function boundedAlpn(info: ConnectionInfo): string | undefined {
  const s = info.alpn ?? info.alpnOffered?.join(',');
  return s !== undefined && s.length > MAX_LOGGED_ALPN ? `${s.slice(0, MAX_LOGGED_ALPN)}…` : s || undefined;
}

/** Closes `s` once everything written to it has been handed to the kernel (bounded wait). */
function closeAfterFlush(s: net.Socket): void {
  if (s.destroyed) return;
  if (!s.writableEnded) s.end();
  if (s.writableFinished) {
    s.destroy();
    return;
  }
  const t = setTimeout(() => s.destroy(), FLUSH_GRACE_MS);
  t.unref();
  s.once('finish', () => {
    clearTimeout(t);
    s.destroy();
  });
  s.once('close', () => clearTimeout(t));
}

interface StreamHandle {
  fd?: number;
  reading?: boolean;
  readStop?(): number;
  readStart?(): number;
}

const EMPTY = Buffer.alloc(0);
const noRead = (): void => {};

/** A plain TCP socket's libuv handle (not TLS: those bytes must be encrypted in JS). */
function rawHandle(s: net.Socket): StreamHandle | undefined {
  if (s instanceof TLSSocket) return undefined;
  const h = (s as unknown as { _handle?: StreamHandle | null })._handle;
  return h && typeof h.fd === 'number' && h.fd >= 0 && typeof h.readStop === 'function' && typeof h.readStart === 'function' ? h : undefined;
}

/** No more bytes enter this stream from the kernel, and the stream never asks for more. */
function stopReads(s: net.Socket, h: StreamHandle): void {
  h.readStop!();
  h.reading = false;
  (s as unknown as { _read: () => void })._read = noRead;
}

/** Undoes stopReads (the native relay could not start). */
function restartReads(s: net.Socket, h: StreamHandle): void {
  delete (s as unknown as { _read?: unknown })._read;
  if (s.destroyed) return;
  h.reading = true;
  h.readStart!();
}

/** Moves what the stream already buffered into `out`. */
function drainInto(s: net.Socket, out: Buffer[]): void {
  for (let c: Buffer | null; (c = s.read() as Buffer | null) !== null;) out.push(c);
}

/** Bytes of one connection, downstream and upstream views. */
interface TcpBytes {
  received: number;
  sent: number;
  upstreamSent: number;
  upstreamReceived: number;
}

/** The one access-log entry and the end-of-connection counters of a proxied TCP connection. */
function logTcpEnd(telemetry: Telemetry, info: ConnectionInfo, proxy: TcpProxy, cluster: string | undefined, endpoint: string,
  bytes: TcpBytes, reason: Reason, endMs = Date.now()): void {
  logTcpEntry(telemetry, info, proxy, cluster, endpoint, bytes, reason, endMs);
  tcpEndCounter(telemetry, info.listener)(bytes, reason);
}

/** The access-log entry of a proxied TCP connection. */
function logTcpEntry(telemetry: Telemetry, info: ConnectionInfo, proxy: TcpProxy, cluster: string | undefined, endpoint: string,
  bytes: TcpBytes, reason: Reason, endMs: number): void {
  telemetry.accessLog({
    time: isoTime(info.startMs),
    kind: 'tcp',
    downstream: `${info.downstreamRemoteAddress}:${info.downstreamRemotePort}`,
    listener: info.listener,
    chain: info.chain,
    sni: info.sni,
    ech: info.ech || undefined,
    alpn: boundedAlpn(info),
    tlsVersion: info.tlsVersion,
    peerSubject: info.peerCertificate?.subject?.replace(/\n/g, ','),
    // The mesh identity (SPIFFE ID) of an mTLS peer, as the HTTP entries log it.
    peerUriSan: info.peerCertificate !== undefined ? subjectAltNames(info.peerCertificate).uri[0] : undefined,
    route: proxy.name,
    cluster,
    upstream: endpoint || undefined,
    bytesReceived: bytes.received,
    bytesSent: bytes.sent,
    upstreamBytesSent: bytes.upstreamSent,
    upstreamBytesReceived: bytes.upstreamReceived,
    durationMs: endMs - info.startMs,
    reason,
  });
}

type TcpEndCounter = (bytes: TcpBytes, reason: Reason) => void;
/** Per telemetry and listener: its end-of-connection counters (listener names come from config). */
const endCounters = new WeakMap<Telemetry, Map<string, TcpEndCounter>>();

/**
 * The end-of-connection counters of proxied TCP connections on `listener`, made once per
 * listener and kept, each series bound on its first use: every connection counts the same few.
 */
function tcpEndCounter(telemetry: Telemetry, listener: string): TcpEndCounter {
  let byListener = endCounters.get(telemetry);
  if (byListener === undefined) endCounters.set(telemetry, (byListener = new Map()));
  let f = byListener.get(listener);
  if (f === undefined) byListener.set(listener, (f = newTcpEndCounter(telemetry, listener)));
  return f;
}

function newTcpEndCounter(telemetry: Telemetry, listener: string): TcpEndCounter {
  const ends = new Map<Reason, (by?: number) => void>();
  let received: ((by?: number) => void) | undefined;
  let sent: ((by?: number) => void) | undefined;
  return (bytes, reason) => {
    let ended = ends.get(reason);
    if (ended === undefined) ends.set(reason, (ended = counterOf(telemetry, 'tcp_connections_total', { listener, reason })));
    ended();
    if (bytes.received > 0) (received ??= counterOf(telemetry, 'downstream_bytes_total', { listener, direction: 'received' }))(bytes.received);
    if (bytes.sent > 0) (sent ??= counterOf(telemetry, 'downstream_bytes_total', { listener, direction: 'sent' }))(bytes.sent);
  };
}

/** What a learned route's records are accounted with (see fastRouteHandler). */
export interface FastRouteContext {
  telemetry: Telemetry;
  listener: string;
  chain: string;
  proxy: TcpProxy;
  /** Per target: the cluster, and its endpoints' labels in the order the addon was given them. */
  clusters: string[];
  endpoints: string[][];
  /** The SNI the route was learned for (the addon routes only hellos naming exactly it). */
  sni: string | undefined;
  /** What a routed hello counts before it is proxied (downstream connections, the SNI, the chain). */
  onStart(): void;
  /** A start record's connection info (access log on), from the addresses the addon read. */
  newInfo(remoteAddress: string, remotePort: number, localAddress: string, localPort: number, ageMs: number): ConnectionInfo;
  /** The route was learned without the access log, which is on now: learn it again. */
  stale(): void;
}

/**
 * The accounting of connections the native relay routed by itself on a learned route: the same
 * counters, gauge, histogram and access-log entry proxyTcpAccepted gives a connection JS routed
 * (the endpoint counts are the addon's own, in the shared slots).
 */
export function fastRouteHandler(ctx: FastRouteContext): FastRouteHandler {
  const { telemetry, proxy } = ctx;
  const listenerLabels = { listener: ctx.listener };
  const clusterLabels = ctx.clusters.map((cluster) => ({ cluster }));
  const countEnd = tcpEndCounter(telemetry, ctx.listener);
  /** Connections with an access-log entry to come: their info, and the endpoint once connected. */
  const open = new Map<number, { info: ConnectionInfo; endpoint: string }>();
  return (buf, at, start) => {
    const kind = buf[at]!;
    const target = buf[at + 3]!;
    const id = buf[at + 11]!;
    if (kind === FAST_START) {
      ctx.onStart();
      telemetry.gauge('downstream_connections_active', 1, listenerLabels);
      if (start !== undefined) {
        const info = ctx.newInfo(start.remoteAddress, start.remotePort, start.localAddress, start.localPort, buf[at + 12]!);
        if (ctx.sni !== undefined) info.sni = ctx.sni;
        info.alpnOffered = start.alpn;
        if (start.ech) info.ech = true;
        info.chain = ctx.chain;
        open.set(id, { info, endpoint: '' });
      } else if (telemetry.accessLogEnabled === true) {
        ctx.stale();
      }
      return;
    }
    if (kind === FAST_CONNECTED) {
      telemetry.observe('upstream_connect_seconds', buf[at + 5]! / 1000, clusterLabels[target]);
      const o = open.get(id);
      if (o !== undefined) o.endpoint = ctx.endpoints[target]?.[buf[at + 4]!] ?? '';
      return;
    }
    if (kind !== FAST_END) return;
    const native = FAST_REASONS[buf[at + 5]!] ?? 'internal_error';
    if (native === 'upstream_connect_failed' || native === 'upstream_connect_timeout') telemetry.count('upstream_connect_errors_total', clusterLabels[target]);
    const reason: Reason = native === 'ok' || native === 'stopped' ? 'ok' : native;
    telemetry.gauge('downstream_connections_active', -1, listenerLabels);
    const bytes = { received: buf[at + 10]! + buf[at + 6]!, sent: buf[at + 9]!, upstreamSent: buf[at + 7]!, upstreamReceived: buf[at + 8]! };
    countEnd(bytes, reason);
    const o = open.get(id);
    if (o === undefined) return;
    open.delete(id);
    // The end as the relay saw it (the record may have waited for its batch).
    logTcpEntry(telemetry, o.info, proxy, ctx.clusters[target], o.endpoint, bytes, reason, Date.now() - buf[at + 13]!);
  };
}

/**
 * Native accept's fast path: the addon accepted the connection and read `helloBytes` bytes, JS
 * routed them to this TCP proxy, and the picked cluster is plain TCP with an IP endpoint. The
 * addon dials, sends a PROXY header if the cluster asked for one and the bytes it read, and
 * relays; no Node socket is made on either side. Returns false, having done nothing, when this
 * connection needs the socket path (proxyTcp with the same `target`): TLS origination, names to
 * resolve, a unix socket, or an error that path reports.
 */
export function proxyTcpAccepted(id: number, helloBytes: number, proxy: TcpProxy, target: WeightedCluster | undefined,
  info: ConnectionInfo, env: TcpProxyEnv): boolean {
  if (target === undefined || env.clusters.reserveTcp === undefined) return false;
  const cluster = env.clusters.get?.(target.cluster);
  if (cluster === undefined || cluster.tls !== undefined || cluster.invalidBackend !== undefined) return false;
  const res = env.clusters.reserveTcp(target.cluster);
  if (res === undefined || res instanceof Error) return false;
  const { telemetry } = env;
  const labels = { listener: info.listener };
  let endpoint = '';
  const end = (native: NativeRelayResult | undefined, reason: Reason) => {
    res.release();
    telemetry.gauge('downstream_connections_active', -1, labels);
    logTcpEnd(telemetry, info, proxy, target.cluster, endpoint, {
      received: helloBytes + (native?.downRead ?? 0),
      sent: native?.downWritten ?? 0,
      upstreamSent: native?.upWritten ?? 0,
      upstreamReceived: native?.upRead ?? 0,
    }, reason);
  };
  telemetry.gauge('downstream_connections_active', 1, labels);
  const pp = cluster.proxyProtocol;
  dialByAddon(telemetry, target.cluster, res, (connectTimeoutMs, onConnected, onDone) => {
    // A throw here has closed the connection (out of descriptors for pipes, say).
    connectAccepted(id, res.address, res.port, {
      connectTimeoutMs, idleTimeoutMs: cluster.limits.tcpIdleTimeoutMs ?? proxy.idleTimeoutMs,
      prefix: pp ? proxyHeaderFor(pp, info) : undefined, keepalive: res.keepalive,
    }, onConnected, onDone);
  }, () => { endpoint = res.endpoint; }, (r, why) => end(r, why ?? 'ok'));
  return true;
}

/**
 * A dial by the addon toward a reserved endpoint (`start` calls connectNativeRelay or
 * connectAccepted), with what both native dials account for: the connect time once connected,
 * connect errors, and a dial that could not start ending as upstream_connect_failed. `done` runs
 * once, with the addon's report (none when the dial could not start) and the reason to log
 * (undefined for a normal end).
 */
function dialByAddon(telemetry: Telemetry, cluster: string, res: TcpReservation,
  start: (connectTimeoutMs: number, onConnected: () => void, onDone: (r: NativeRelayResult) => void) => void,
  connected: () => void, done: (r: NativeRelayResult | undefined, why: Reason | undefined) => void): void {
  const dialled = Date.now();
  try {
    start(res.timeoutMs > 0 ? res.timeoutMs : 10_000, () => {
      connected();
      telemetry.observe('upstream_connect_seconds', (Date.now() - dialled) / 1000, { cluster });
    }, (r) => {
      if (r.reason === 'upstream_connect_failed' || r.reason === 'upstream_connect_timeout') {
        telemetry.count('upstream_connect_errors_total', { cluster });
      }
      done(r, r.reason === 'ok' || r.reason === 'stopped' ? undefined : r.reason);
    });
  } catch (e) {
    telemetry.log('warn', 'native relay could not dial the upstream', { error: (e as Error).message });
    telemetry.count('upstream_connect_errors_total', { cluster });
    done(undefined, 'upstream_connect_failed');
  }
}

/**
 * `target`: the cluster already picked for this connection (native accept's fast path declined
 * it); picked here otherwise.
 */
export function proxyTcp(down: net.Socket, replay: Buffer | undefined, proxy: TcpProxy, info: ConnectionInfo, env: TcpProxyEnv,
  picked?: WeightedCluster): void {
  const { telemetry } = env;
  let up: net.Socket | undefined;
  let endpoint = '';
  let reason: Reason = 'ok';
  let done = false;
  let downClosed = false;
  let upClosed = false;
  const target = picked ?? pickWeighted(proxy.clusters);
  const labels = { listener: info.listener };

  /** While the native relay runs: its id; its report finishes the connection. */
  let nativeId: number | undefined;
  let native: NativeRelayResult | undefined;
  /** Native connect: the endpoint counted active for this connection, released at its end. */
  let reservation: TcpReservation | undefined;

  const finish = (why?: Reason) => {
    if (why && reason === 'ok') reason = why;
    if (done) return;
    if (nativeId !== undefined) {
      stopNativeRelay(nativeId);
      return;
    }
    done = true;
    reservation?.release();
    down.destroy();
    up?.destroy();
    telemetry.gauge('downstream_connections_active', -1, labels);
    logTcpEnd(telemetry, info, proxy, target?.cluster, endpoint, {
      // Downstream view: bytes the client sent us / we sent the client.
      received: down.bytesRead + (native?.downRead ?? 0) + (down instanceof TLSSocket ? 0 : info.preReadBytes ?? 0),
      sent: down.bytesWritten + (native?.downWritten ?? 0),
      // Upstream view: bytes we sent the upstream (replay included) / it sent us.
      // (With native connect there is no JS upstream socket: the addon's counts are all of it.)
      upstreamSent: (up?.bytesWritten ?? 0) + (native?.upWritten ?? 0),
      upstreamReceived: (up?.bytesRead ?? 0) + (native?.upRead ?? 0),
    }, reason);
  };

  // A FIN from the client must reach the upstream without closing our write side (the listener
  // already accepts half-open sockets; a terminated TLSSocket needs it set here).
  down.allowHalfOpen = true;
  down.on('error', () => finish('downstream_reset'));
  down.on('close', () => {
    // Destroyed from outside (closeAll) while relayed natively: end that relay too.
    if (nativeId !== undefined) return stopNativeRelay(nativeId);
    downClosed = true;
    if (!up || upClosed) finish();
    else closeAfterFlush(up);
  });
  down.pause();
  telemetry.gauge('downstream_connections_active', 1, labels);

  let idleMs = proxy.idleTimeoutMs;

  /** The JS relay: stream pipes with backpressure; `first` goes to the upstream before the rest. */
  const relayJs = (upstream: net.Socket, first: Buffer[]) => {
    const idle = idleMs;
    if (idle > 0) {
      // 'timeout' fires after `idle` ms with no reads or writes on that socket.
      const onIdle = () => finish('idle_timeout');
      down.setTimeout(idle, onIdle);
      upstream.setTimeout(idle, onIdle);
    }
    for (const b of first) upstream.write(b);
    // pipe() gives backpressure and, with end: true, forwards a FIN as a half-close (also for
    // a side whose 'end' was already emitted).
    down.pipe(upstream);
    upstream.pipe(down);
    down.resume();
  };

  /**
   * To the native relay: no more JS reads, everything JS holds written and handed to the kernel
   * (the empty writes complete after every earlier write on that socket), then the descriptors.
   */
  const handOff = (upstream: net.Socket, dh: StreamHandle, uh: StreamHandle, first: Buffer[]) => {
    let downEof = down.readableEnded;
    let upEof = upstream.readableEnded;
    down.once('end', () => { downEof = true; });
    upstream.once('end', () => { upEof = true; });
    stopReads(down, dh);
    stopReads(upstream, uh);
    const toUp = first;
    const toDown: Buffer[] = [];
    drainInto(down, toUp);
    drainInto(upstream, toDown);
    let waiting = 1;
    const begin = () => {
      if (done || down.destroyed || upstream.destroyed) return; // their 'close' handlers finish
      down.setTimeout(0);
      upstream.setTimeout(0);
      try {
        nativeId = startNativeRelay(dh.fd!, uh.fd!, { idleTimeoutMs: idleMs, downEof, upEof }, (r) => {
          nativeId = undefined;
          native = r;
          finish(r.reason === 'ok' || r.reason === 'stopped' ? undefined : r.reason);
        });
      } catch (e) {
        // Out of descriptors for pipes, say: this connection stays on the JS relay.
        telemetry.log('warn', 'native relay could not start; using the JS relay for this connection', { error: (e as Error).message });
        restartReads(down, dh);
        restartReads(upstream, uh);
        relayJs(upstream, []);
      }
    };
    const written = () => {
      // setImmediate: an 'end' the drain reached is emitted on the next tick; see it first.
      if (--waiting === 0) setImmediate(begin);
    };
    for (const b of toUp) { waiting++; upstream.write(b, written); }
    for (const b of toDown) { waiting++; down.write(b, written); }
    waiting += 2;
    upstream.write(EMPTY, written);
    down.write(EMPTY, written);
    written();
  };

  /** Native connect: the addon dials `res`, writes what JS already read, then relays. */
  const dialNative = (dh: StreamHandle, res: TcpReservation, pp: 'v1' | 'v2' | undefined) => {
    // Everything for the upstream, in order: PROXY header, the replayed bytes, whatever the
    // stream still buffered. The client socket is read no more by JS.
    const head: Buffer[] = [];
    if (pp) head.push(proxyHeaderFor(pp, info));
    if (replay && replay.length) head.push(replay);
    drainInto(down, head);
    // EOF already taken from the kernel (pushed into the stream; its 'end' comes later).
    const downEof = down.readableEnded || (down as unknown as { _readableState?: { ended?: boolean } })._readableState?.ended === true;
    down.setTimeout(0);
    dialByAddon(telemetry, target!.cluster, res, (connectTimeoutMs, onConnected, onDone) => {
      nativeId = connectNativeRelay(dh.fd!, res.address, res.port, {
        connectTimeoutMs, idleTimeoutMs: idleMs, downEof,
        head: head.length === 0 ? undefined : head.length === 1 ? head[0] : Buffer.concat(head), keepalive: res.keepalive,
      }, onConnected, onDone);
    }, () => { endpoint = res.endpoint; }, (r, why) => {
      // Out of descriptors, say (no report): this connection fails as a dial that could not open a socket would.
      nativeId = undefined;
      native = r;
      finish(why);
    });
  };

  if (!target) {
    finish('no_healthy_upstream');
    return;
  }
  const cluster = env.clusters.get?.(target.cluster);
  if (cluster?.invalidBackend !== undefined) {
    finish('invalid_backend');
    return;
  }
  // The destination's DestinationRule idle timeout wins over the route's default.
  idleMs = cluster?.limits.tcpIdleTimeoutMs ?? proxy.idleTimeoutMs;
  const started = Date.now();
  const connectFailed = (err: Error & { code?: string; reason?: Reason }) => {
    telemetry.count('upstream_connect_errors_total', { cluster: target.cluster });
    finish(err.reason ?? (err.code === 'ETIMEDOUT' || err.code === 'UND_ERR_CONNECT_TIMEOUT' ? 'upstream_connect_timeout' : 'upstream_connect_failed'));
  };

  if (cluster !== undefined && cluster.tls === undefined && env.clusters.reserveTcp !== undefined && nativeConnectInUse()) {
    const dh = rawHandle(down);
    const res = dh ? env.clusters.reserveTcp(target.cluster) : undefined;
    if (res instanceof Error) {
      connectFailed(res);
      return;
    }
    if (res !== undefined) {
      reservation = res;
      stopReads(down, dh!);
      // Bytes JS wrote to the client before this (a CONNECT tunnel's 200) reach the kernel before
      // the relay writes anything there; usually they already have.
      const pp = cluster.proxyProtocol;
      if (down.writableLength === 0) dialNative(dh!, res, pp);
      else down.write(EMPTY, () => { if (!done && !down.destroyed) dialNative(dh!, res, pp); });
      return;
    }
  }

  env.clusters.connectTcp(target.cluster, {}).then(
    ({ socket, endpoint: ep }) => {
      endpoint = ep;
      telemetry.observe('upstream_connect_seconds', (Date.now() - started) / 1000, { cluster: target.cluster });
      if (done || downClosed) {
        socket.destroy();
        finish();
        return;
      }
      up = socket;
      socket.allowHalfOpen = true;
      socket.on('error', () => finish('upstream_reset'));
      socket.on('close', () => {
        if (nativeId !== undefined) return stopNativeRelay(nativeId);
        upClosed = true;
        if (downClosed) finish();
        else closeAfterFlush(down);
      });
      const pp = cluster?.proxyProtocol;
      const first: Buffer[] = [];
      if (pp) first.push(proxyHeaderFor(pp, info));
      if (replay && replay.length) first.push(replay);
      const downHandle = rawHandle(down);
      const upHandle = rawHandle(socket);
      if (downHandle && upHandle && relayInUse() === 'native') handOff(socket, downHandle, upHandle, first);
      else relayJs(socket, first);
    },
    connectFailed,
  );
}

/**
 * One bound listener. For each connection: read the first bytes (ClientHello when the listener
 * inspects TLS), select a filter chain, then terminate TLS, pass it through, or hand plaintext
 * on. The listener holds the Listener config of the newest snapshot; a connection keeps the
 * config it was accepted with, so a swap never changes an open connection.
 *
 * Native accept: a TLS-inspecting listener without PROXY protocol is accepted by the relay
 * addon when it is in use (native-relay.ts). The addon reads the first bytes; a ClientHello
 * routed to a plain TCP upstream is dialled and relayed by the addon with no Node socket at all,
 * and every other connection becomes a Node socket here (adopted) and takes the usual path with
 * the bytes already read. A swap to a config the addon cannot serve (no inspection, PROXY
 * protocol) hands the listening socket back to Node.
 */
import * as net from 'node:net';
import { closeSync } from 'node:fs';
import * as tls from 'node:tls';
import type { FilterChain, Listener } from '../../model/snapshot.js';
import { newConnectionId, setConnectionInfo, type ConnectionInfo } from '../connection-info.js';
import type { Reason, Telemetry } from '../telemetry.js';
import { readClientHello, type ClientHelloResult } from './client-hello.js';
import { readProxyHeader, trustedMatcher } from './proxy-protocol.js';
import { tlsAlert, ALERT_UNRECOGNIZED_NAME, ALERT_HANDSHAKE_FAILURE, ALERT_INTERNAL_ERROR } from './tls-alert.js';
import { selectFilterChain } from './chain-select.js';
import { fastRouteHandler, pickWeighted, proxyTcp, proxyTcpAccepted, type TcpConnector } from '../chain/tcp-proxy.js';
import {
  adoptAccepted, closeAccepted, closeNativeListenerConnections, configureNativeListener, forgetNativeListener, listenNative, moreAccepted, nativeAcceptInUse,
  nativeListenerStats, releaseAccepted, unlistenNative, type AcceptedHello, type NativeListenerLimits,
  fastRouteLearned, fastRoutesAvailable, forgetFastRoutes, learnFastRoute,
} from '../chain/native-relay.js';
import { ClientHelloScanner, RECORD_HEADER_LENGTH, resultOf } from './client-hello.js';
import { checkPeerCertificate, handshakeVerification } from '../pki/verify.js';
import { serverSocketOptions } from '../pki/context-cache.js';
import type { SecureContext } from 'node:tls';
import { isoTime } from '../iso-time.js';

/** What a listener needs from the rest of the data plane for one snapshot generation. */
export interface ChainRuntime {
  /** The secure context of a terminating chain, or an error (missing/invalid secret). */
  serverContext(chain: FilterChain): SecureContext | { error: string };
  /**
   * Hands an HTTP connection (plaintext socket or finished TLSSocket) to the chain's HTTP server.
   * `head`: bytes of a plaintext socket already read by the listener (ClientHello inspection) and
   * not yet put back; serveHttp replays them.
   */
  serveHttp(chain: FilterChain, socket: net.Socket, listener: Listener, head?: Buffer): void;
  clusters: TcpConnector;
  telemetry: Telemetry;
  /** Process-wide downstream limits (flags); defaults apply when absent. */
  limits?: DownstreamLimits;
}

/** Downstream limits that come from flags rather than from Istio config (docs/security.md). */
export interface DownstreamLimits {
  /** Open connections per listener; the next one is closed at once (`listener_overflow`). */
  maxConnections: number;
  /** Downstream TLS handshake, from the end of the ClientHello to 'secure'. */
  handshakeTimeoutMs: number;
  /** HTTP/1.1: the whole request header block must arrive within this (slowloris). */
  requestHeadersTimeoutMs: number;
  /** HTTP/1.1 header block size in bytes (431 beyond). */
  maxRequestHeaderBytes: number;
  /** Header fields per request (431 beyond). */
  maxRequestHeaders: number;
}

export const DEFAULT_LIMITS: DownstreamLimits = {
  maxConnections: 100_000,
  handshakeTimeoutMs: 10_000,
  requestHeadersTimeoutMs: 10_000,
  maxRequestHeaderBytes: 16 * 1024,
  maxRequestHeaders: 100,
};

export interface ListenerState {
  config: Listener;
  runtime: ChainRuntime;
}

/** Compiled PROXY-protocol trust checks, per listener config. */
const trustedByListener = new WeakMap<Listener, (addr?: string) => boolean>();

type Labels = Readonly<Record<string, string>>;

/**
 * Counter label sets of one listener config, built once: the per-connection counters then pass
 * the same objects every time instead of allocating a label object per call (read-only: shared).
 */
interface ListenerLabels {
  listener: Labels;
  handshakeOk: Labels;
  /** filter_chain_connections_total, by chain, then by transport. */
  chains: Map<FilterChain, { tls: Labels; raw_buffer: Labels }>;
}

const labelsByListener = new WeakMap<Listener, ListenerLabels>();

function labelsOf(config: Listener): ListenerLabels {
  let l = labelsByListener.get(config);
  if (l === undefined) {
    const listener = config.name;
    l = {
      listener: { listener },
      handshakeOk: { listener, result: 'success', reason: 'ok' },
      chains: new Map(),
    };
    labelsByListener.set(config, l);
  }
  return l;
}

/**
 * Whether a TLS hello's filter chain on this listener follows from its SNI alone, so the native
 * relay may remember SNI -> route: no chain matches on ALPN, and a chain matching destination
 * subnets only where every connection has the same local address (a listener not on a wildcard).
 */
const routesBySni = new WeakMap<Listener, boolean>();
function routedBySniAlone(config: Listener, fixedLocal: boolean): boolean {
  let ok = routesBySni.get(config);
  if (ok === undefined) {
    ok = config.filterChains.every((fc) => fc.match.applicationProtocols.length === 0 && (fixedLocal || !fc.match.destinationSubnets?.length));
    routesBySni.set(config, ok);
  }
  return ok;
}

function chainLabels(config: Listener, chain: FilterChain, transport: 'tls' | 'raw_buffer'): Labels {
  const all = labelsOf(config).chains;
  let c = all.get(chain);
  if (c === undefined) {
    const base = { listener: config.name, chain: chain.name };
    c = { tls: { ...base, transport: 'tls' }, raw_buffer: { ...base, transport: 'raw_buffer' } };
    all.set(chain, c);
  }
  return c[transport];
}

/**
 * TLSSocket options of a terminating chain, built once per (chain, secure context): TLSSocket
 * copies its options, so one object serves every connection. ALPN goes in already encoded (the
 * wire format), which Node takes as it is instead of re-encoding the list per connection.
 */
const socketOptionsByChain = new WeakMap<FilterChain, { ctx: SecureContext; opts: tls.TLSSocketOptions }>();

function socketOptionsFor(chain: FilterChain, ctx: SecureContext): tls.TLSSocketOptions {
  const hit = socketOptionsByChain.get(chain);
  if (hit !== undefined && hit.ctx === ctx) return hit.opts;
  const opts = serverSocketOptions(chain.tls!, ctx);
  const alpn = opts.ALPNProtocols;
  // A name over 255 bytes cannot be encoded: left as a list, Node reports it as it always did.
  if (Array.isArray(alpn) && alpn.every((n) => typeof n === 'string' && Buffer.byteLength(n, 'latin1') <= 255)) {
    opts.ALPNProtocols = encodeAlpn(alpn as string[]);
  }
  socketOptionsByChain.set(chain, { ctx, opts });
  return opts;
}

/** ALPN protocol_name_list: each name as one length byte and its bytes (RFC 7301 3.1). */
function encodeAlpn(names: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  for (const n of names) {
    const b = Buffer.from(n, 'latin1');
    parts.push(Buffer.from([b.length]), b);
  }
  return Buffer.concat(parts);
}

/** Whether the addon can accept for this listener config (it reads a ClientHello; nothing before it). */
function acceptsNatively(config: Listener): boolean {
  return config.inspector === 'tls-inspector' && config.proxyProtocol === undefined && nativeAcceptInUse();
}

function nativeLimits(config: Listener, runtime: ChainRuntime): NativeListenerLimits {
  return {
    helloCapBytes: Math.max(0, config.maxClientHelloBytes) + RECORD_HEADER_LENGTH,
    helloTimeoutMs: config.clientHelloTimeoutMs,
    maxConnections: (runtime.limits ?? DEFAULT_LIMITS).maxConnections,
  };
}

/** An accepted connection whose bytes so far did not decide yet. */
interface PendingHello {
  info: ConnectionInfo;
  state: ListenerState;
  scanner: ClientHelloScanner;
  /** The bytes so far: store[0, len), the store growing by doubling (a drip costs O(n) copies). */
  store: Buffer;
  len: number;
}

export class ListenerRuntime {
  #server: net.Server;
  /** While the addon accepts for this listener: its id, and the unsubscribe of the hook that reads its refusals. */
  #native: { lid: number; unhook: () => void } | undefined;
  readonly #hellos = new Map<number, PendingHello>();
  /** Adopted sockets still open (the addon counts them too). */
  #adopted = 0;
  /** The bound address, kept for when the Node server no longer listens (native accept). */
  #bound: net.AddressInfo | undefined;
  #state: ListenerState;
  readonly #sockets = new Set<net.Socket>();
  #accepting = true;
  /**
   * The local address of every accepted socket when the listener is bound to one specific
   * address (not a wildcard): known without a getsockname() per connection.
   */
  #local: { address: string; port: number } | undefined;

  constructor(state: ListenerState) {
    this.#state = state;
    // allowHalfOpen: a client's FIN must reach the upstream without closing our write side.
    this.#server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (s) => this.#onConnection(s));
    this.#server.on('error', (e) => state.runtime.telemetry.log('error', 'listener error', { listener: state.config.name, error: e.message }));
  }

  get name(): string {
    return this.#state.config.name;
  }

  get connections(): number {
    // Natively accepted connections, adopted ones included, are counted by the addon.
    return this.#lid !== undefined ? this.#nativeStats() + this.#sockets.size - this.#adopted : this.#sockets.size;
  }

  listen(): Promise<void> {
    const { address, port } = this.#state.config;
    return new Promise((resolve, reject) => {
      const onErr = (e: Error) => reject(e);
      this.#server.once('error', onErr);
      this.#server.listen({ host: address, port, backlog: 1024 }, () => {
        this.#server.off('error', onErr);
        const a = this.#server.address();
        if (typeof a === 'object' && a !== null) {
          this.#bound = a;
          if (a.address !== '0.0.0.0' && a.address !== '::') this.#local = { address: a.address, port: a.port };
        }
        if (acceptsNatively(this.#state.config)) this.#acceptNatively();
        resolve();
      });
    });
  }

  /** The port actually bound (differs from config when config asked for 0). */
  boundPort(): number {
    return this.#bound?.port ?? this.#state.config.port;
  }

  /** Swaps in a newer snapshot's listener; open connections keep what they started with. */
  update(state: ListenerState): void {
    this.#state = state;
    const n = this.#native;
    if (n === undefined) return;
    // What the addon learned was routed by the previous config and clusters.
    forgetFastRoutes(n.lid);
    if (acceptsNatively(state.config)) {
      configureNativeListener(n.lid, nativeLimits(state.config, state.runtime));
      return;
    }
    // The addon cannot serve this config (a server-speaks-first TCP port, PROXY protocol):
    // Node accepts on the same listening socket again.
    this.#stopNative(true);
  }

  /** Stops accepting; open connections continue until they end or `closeAll` is called. */
  stopAccepting(): Promise<void> {
    this.#accepting = false;
    if (this.#native !== undefined) this.#stopNative(false);
    // close() stops accepting now; its callback waits for every connection to end, which is
    // the drain's business, so do not wait for it here.
    if (this.#server.listening) this.#server.close();
    return Promise.resolve();
  }

  closeAll(): void {
    for (const s of this.#sockets) s.destroy();
    if (this.#lid !== undefined) closeNativeListenerConnections(this.#lid);
    // Those waiting for more bytes are closed by the addon without another report.
    this.#hellos.clear();
  }

  /** The addon listener id, kept after it stopped accepting (its connections may still run). */
  #lid: number | undefined;

  /**
   * From now on the relay accepts on this listener's socket; Node's handle is closed. In a
   * cluster worker, the handle's own close is called, not cluster's wrapper: the primary keeps
   * the shared socket for workers that start later.
   */
  #acceptNatively(): void {
    const handle = (this.#server as unknown as { _handle?: { fd?: number; close?: () => void } | null })._handle;
    const fd = handle?.fd;
    if (handle == null || typeof fd !== 'number' || fd < 0) return;
    const { config, runtime } = this.#state;
    let lid: number;
    try {
      lid = listenNative(fd, nativeLimits(config, runtime), this.#local === undefined, (h) => this.#onNativeHello(lid, h));
    } catch (e) {
      runtime.telemetry.log('warn', 'native accept unavailable for this listener; Node accepts', { listener: config.name, error: (e as Error).message });
      return;
    }
    // Refusals are counted by the addon; metrics readers see them as of the read.
    const unhook = runtime.telemetry.onCollect?.(() => this.#nativeStats(lid)) ?? (() => {});
    this.#native = { lid, unhook };
    this.#lid = lid;
    const own = Object.getPrototypeOf(handle) as { close?: (this: unknown) => void };
    if (typeof own.close === 'function') own.close.call(handle);
    (this.#server as unknown as { _handle: unknown })._handle = null;
  }

  /** Stops native accept; with `toNode`, Node accepts on the same socket again. */
  #stopNative(toNode: boolean): void {
    const n = this.#native!;
    this.#native = undefined;
    forgetFastRoutes(n.lid);
    n.unhook();
    this.#nativeStats(n.lid);
    let fd = -1;
    try {
      fd = unlistenNative(n.lid, toNode && this.#accepting);
    } catch (e) {
      this.#state.runtime.telemetry.log('error', 'cannot hand the listening socket back to Node', { listener: this.name, error: (e as Error).message });
    }
    // Connections it accepted still report; its handler goes once the last of them has closed.
    const lid = n.lid;
    const sweep = setInterval(() => {
      if (this.#nativeStats(lid) > 0 || this.#hellos.size > 0) return;
      clearInterval(sweep);
      forgetNativeListener(lid);
    }, 1000);
    sweep.unref();
    if (fd < 0) return;
    this.#server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (s) => this.#onConnection(s));
    this.#server.on('error', (e) => this.#state.runtime.telemetry.log('error', 'listener error', { listener: this.name, error: e.message }));
    // exclusive: in a cluster worker, accept on this descriptor here rather than ask the primary.
    this.#server.listen({ fd, exclusive: true });
  }

  /** Turns the addon's refusals (over maxConnections) into the counter; returns its open count. */
  #nativeStats(lid = this.#lid): number {
    if (lid === undefined) return 0;
    const { open, refused } = nativeListenerStats(lid);
    if (refused > 0) {
      this.#state.runtime.telemetry.count('downstream_connections_refused_total', { listener: this.name, reason: 'listener_overflow' }, refused);
    }
    return open;
  }

  /**
   * A report from the addon for a connection it accepted: the bytes new since the last one. Until
   * they decide, more are asked for; then the connection takes the fast path or becomes a socket.
   */
  #onNativeHello(lid: number, h: AcceptedHello): void {
    let p = this.#hellos.get(h.id);
    if (p === undefined) {
      const state = this.#state;
      const { config } = state;
      const info = this.#newInfo(config, h.remoteAddress, h.remotePort, h.localAddress, h.localPort);
      // The connection began at the accept (a silent client's first report is its timeout).
      if (h.ageMs !== undefined && h.ageMs > 0) info.startMs -= Math.round(h.ageMs);
      state.runtime.telemetry.count('downstream_connections_total', labelsOf(config).listener);
      if (!acceptsNatively(config)) {
        // Accepted just before a swap to a config the addon cannot serve: the socket path, from the start.
        const socket = this.#adopt(lid, h.id, info, h.bytes.length);
        if (socket === undefined) return;
        if (h.bytes.length) socket.unshift(Buffer.from(h.bytes));
        if (config.proxyProtocol) this.#proxyProtocol(socket, info, state);
        else this.#inspect(socket, info, state);
        return;
      }
      p = { info, state, scanner: new ClientHelloScanner(config.maxClientHelloBytes), store: h.bytes, len: h.bytes.length };
    } else if (h.bytes.length) {
      const need = p.len + h.bytes.length;
      if (p.store.length < need) {
        const grown = Buffer.allocUnsafe(Math.max(2 * need, 1024));
        p.store.copy(grown, 0, 0, p.len);
        p.store = grown;
      }
      h.bytes.copy(p.store, p.len);
      p.len = need;
    }
    const { config } = p.state;
    const view = p.store.subarray(0, p.len);
    const hello = resultOf(p.scanner.scan(view), view, config.maxClientHelloBytes + RECORD_HEADER_LENGTH)
      ?? (h.status === 'data' ? undefined : { kind: h.status === 'timeout' ? 'timeout' as const : 'closed' as const, bytes: view });
    if (hello === undefined) {
      // Kept across reports: a copy of its own (the report's bytes are a reused buffer's view).
      if (p.store === h.bytes) p.store = Buffer.from(h.bytes);
      this.#hellos.set(h.id, p);
      moreAccepted(h.id);
      return;
    }
    this.#hellos.delete(h.id);
    const { info, state } = p;
    if (hello.kind === 'tls' && h.status !== 'reset') {
      // The fast path: a ClientHello routed to plain TCP, dialled and relayed by the addon (also
      // when the client already half-closed: the addon forwards that FIN after the bytes).
      const sel = selectFilterChain(config, { sni: hello.sni, alpn: hello.alpn, transport: 'tls', localAddress: info.downstreamLocalAddress });
      const chain = sel.chain;
      if (chain !== undefined && chain.tls === undefined && chain.filter.kind === 'tcp') {
        const { runtime } = state;
        const target = pickWeighted(chain.filter.clusters);
        if (hello.sni !== undefined) info.sni = hello.sni;
        info.alpnOffered = hello.alpn;
        if (hello.ech) info.ech = true;
        info.chain = chain.name;
        const env = { clusters: runtime.clusters, telemetry: runtime.telemetry };
        runtime.telemetry.count(hello.sni !== undefined ? 'tls_inspector_sni_found_total' : 'tls_inspector_sni_not_found_total', labelsOf(config).listener);
        runtime.telemetry.count('filter_chain_connections_total', chainLabels(config, chain, 'tls'));
        if (proxyTcpAccepted(h.id, view.length, chain.filter, target, info, env)) {
          this.#learnRoute(lid, hello.sni, chain, state);
          return;
        }
        // The socket path for this one, with the same pick (a weighted split stays as configured).
        const socket = this.#adopt(lid, h.id, info, view.length);
        if (socket === undefined) return;
        proxyTcp(socket, Buffer.from(view), chain.filter, info, env, target);
        return;
      }
    }
    if (hello.kind === 'closed' || hello.kind === 'timeout') {
      // Nothing to say to the client: the addon closes it; no socket is made for a refusal.
      closeAccepted(h.id);
      this.#refuse(undefined, info, config, hello.kind === 'timeout' ? 'client_hello_timeout' : 'downstream_closed_early');
      return;
    }
    const socket = this.#adopt(lid, h.id, info, view.length);
    if (socket === undefined) return;
    hello.bytes = Buffer.from(view); // replayed later: its own copy
    this.#onHello(socket, hello, info, state);
  }

  /**
   * Lets the addon route the next connections naming `sni` itself, as JS just routed this one:
   * when the chain follows from the SNI alone and every cluster of its TCP proxy is one the addon
   * can pick endpoints of (fastTarget). Learned once per SNI and config.
   */
  #learnRoute(lid: number, sni: string | undefined, chain: FilterChain, state: ListenerState): void {
    const { config, runtime } = state;
    if (chain.filter.kind !== 'tcp' || !fastRoutesAvailable() || fastRouteLearned(lid, sni) || !routedBySniAlone(config, this.#local !== undefined)) return;
    const proxy = chain.filter;
    const { clusters, telemetry } = runtime;
    const targets: Parameters<typeof learnFastRoute>[3] = [];
    const names: string[] = [];
    const endpoints: string[][] = [];
    for (const w of proxy.clusters) {
      const t = clusters.fastTarget?.(w.cluster);
      const c = clusters.get?.(w.cluster);
      if (t === undefined || c === undefined) return;
      targets.push([w.weight, t.policy, t.clusterSlot, t.maxConnections, t.connectTimeoutMs, c.limits.tcpIdleTimeoutMs ?? proxy.idleTimeoutMs, t.hosts, t.keepalive]);
      names.push(w.cluster);
      endpoints.push(t.labels);
    }
    const count = (name: string, labels: Record<string, string>) => telemetry.counter?.(name, labels) ?? ((by?: number) => telemetry.count(name, labels, by));
    const downstream = count('downstream_connections_total', labelsOf(config).listener);
    const inspected = count(sni !== undefined ? 'tls_inspector_sni_found_total' : 'tls_inspector_sni_not_found_total', labelsOf(config).listener);
    const routed = count('filter_chain_connections_total', chainLabels(config, chain, 'tls'));
    const native = count('native_routed_connections_total', labelsOf(config).listener);
    learnFastRoute(lid, sni, { maxHelloBytes: config.maxClientHelloBytes, log: telemetry.accessLogEnabled !== false }, targets, fastRouteHandler({
      telemetry, listener: config.name, chain: chain.name, proxy, clusters: names, endpoints, sni,
      onStart: () => {
        downstream();
        inspected();
        routed();
        native();
      },
      newInfo: (ra, rp, la, lp, ageMs) => {
        const info = this.#newInfo(config, ra, rp, la, lp);
        if (ageMs > 0) info.startMs -= Math.round(ageMs);
        return info;
      },
      stale: () => forgetFastRoutes(lid),
    }));
  }

  /**
   * The accepted connection as a Node socket (paused), counted like one Node accepted itself; it
   * counts against the addon's limit until it closes. Undefined (the descriptor closed, logged)
   * when Node cannot open it.
   */
  #adopt(lid: number, id: number, info: ConnectionInfo, preRead: number): net.Socket | undefined {
    const fd = adoptAccepted(id);
    if (preRead > 0) info.preReadBytes = preRead;
    let socket: net.Socket;
    try {
      socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true, pauseOnCreate: true } as net.SocketConstructorOpts);
    } catch (e) {
      closeSync(fd);
      releaseAccepted(lid);
      this.#state.runtime.telemetry.log('warn', 'cannot open an accepted connection', { listener: this.name, error: (e as Error).message });
      return undefined;
    }
    socket.setNoDelay(true);
    socket.on('error', () => {}); // each stage adds its own handling; never crash on a reset
    this.#sockets.add(socket);
    this.#adopted++;
    socket.once('close', () => {
      this.#sockets.delete(socket);
      this.#adopted--;
      releaseAccepted(lid);
    });
    setConnectionInfo(socket, info);
    return socket;
  }

  /** A new connection's info; the local address is the listener's own unless it is a wildcard. */
  #newInfo(config: Listener, remoteAddress?: string, remotePort?: number, localAddress?: string, localPort?: number): ConnectionInfo {
    const local = this.#local;
    return {
      id: newConnectionId(),
      startMs: Date.now(),
      downstreamRemoteAddress: remoteAddress ?? '',
      downstreamRemotePort: remotePort ?? 0,
      downstreamLocalAddress: local !== undefined ? local.address : localAddress ?? '',
      downstreamLocalPort: local !== undefined ? local.port : localPort ?? 0,
      listener: config.name,
    };
  }

  #onConnection(socket: net.Socket): void {
    const { config, runtime } = this.#state;
    const { telemetry } = runtime;
    socket.on('error', () => {}); // each stage adds its own handling; never crash on a reset
    if (!this.#accepting) { socket.destroy(); return; }
    if (this.#sockets.size >= (runtime.limits ?? DEFAULT_LIMITS).maxConnections) {
      // Over the limit: close at once, without reading a byte or logging per connection (a flood
      // must not turn into a log flood); the counter says how many.
      socket.destroy();
      telemetry.count('downstream_connections_refused_total', { listener: config.name, reason: 'listener_overflow' });
      return;
    }
    this.#sockets.add(socket);
    socket.once('close', () => this.#sockets.delete(socket));
    // The local address is asked of the socket only on a wildcard listener (a getsockname()).
    const info = this.#newInfo(config, socket.remoteAddress, socket.remotePort,
      this.#local === undefined ? socket.localAddress : undefined, this.#local === undefined ? socket.localPort : undefined);
    setConnectionInfo(socket, info);
    telemetry.count('downstream_connections_total', labelsOf(config).listener);
    if (config.proxyProtocol) {
      this.#proxyProtocol(socket, info, this.#state);
      return;
    }
    this.#inspect(socket, info, this.#state);
  }

  /**
   * PROXY protocol first (before the ClientHello): only trusted peers (the load balancers) may
   * send it, and on such a listener they must. The header's source becomes the downstream address.
   */
  #proxyProtocol(socket: net.Socket, info: ConnectionInfo, state: ListenerState): void {
    const { config } = state;
    const pp = config.proxyProtocol!;
    let trusted = trustedByListener.get(config);
    if (!trusted) trustedByListener.set(config, (trusted = trustedMatcher(pp.trustedCidrs)));
    if (!trusted(socket.remoteAddress)) return this.#refuse(socket, info, config, 'proxy_protocol_untrusted');
    socket.resume();
    void readProxyHeader(socket, { timeoutMs: pp.headerTimeoutMs }).then((r) => {
      if (socket.destroyed) return;
      if (r.kind !== 'proxy') {
        const reason = r.kind === 'timeout' ? 'proxy_protocol_timeout' : r.kind === 'closed' ? 'downstream_closed_early' : r.kind === 'not-proxy' ? 'proxy_protocol_missing' : 'proxy_protocol_malformed';
        return this.#refuse(socket, info, config, reason, r.kind === 'malformed' ? r.detail : undefined);
      }
      info.proxyPeer = `${info.downstreamRemoteAddress}:${info.downstreamRemotePort}`;
      if (r.command === 'PROXY' && r.source && r.destination) {
        info.downstreamRemoteAddress = r.source.address;
        info.downstreamRemotePort = r.source.port;
        info.downstreamLocalAddress = r.destination.address;
        info.downstreamLocalPort = r.destination.port;
      }
      if (r.rest.length) socket.unshift(r.rest);
      socket.pause();
      this.#inspect(socket, info, state);
    }, () => socket.destroy());
  }

  #inspect(socket: net.Socket, info: ConnectionInfo, state0: ListenerState): void {
    const { config } = state0;
    if (config.inspector === 'none') {
      const sel = selectFilterChain(config, { transport: 'raw_buffer', localAddress: info.downstreamLocalAddress });
      if (!sel.chain) return this.#refuse(socket, info, config, 'no_filter_chain');
      socket.resume();
      this.#dispatch(socket, undefined, sel.chain, info, state0);
      return;
    }
    // The reply is handled after the read callback has returned (a microtask), never inside the
    // socket's own 'data' dispatch: the chain may hand the socket to a TLSSocket or HTTP parser.
    void readClientHello(socket, { timeoutMs: config.clientHelloTimeoutMs, maxBytes: config.maxClientHelloBytes }).then(
      (hello) => this.#onHello(socket, hello, info, state0),
      (e: Error) => this.#refuse(socket, info, config, 'internal_error', e.message),
    );
  }

  #onHello(socket: net.Socket, hello: ClientHelloResult, info: ConnectionInfo, state: ListenerState): void {
    // A client that reset mid-hello destroyed the socket: still logged and counted, as any early close.
    if (socket.destroyed && hello.kind !== 'closed') return;
    const { config, runtime } = state;
    const { telemetry } = runtime;
    switch (hello.kind) {
      case 'tls': {
        if (hello.sni !== undefined) info.sni = hello.sni;
        info.alpnOffered = hello.alpn;
        if (hello.ech) info.ech = true;
        telemetry.count(hello.sni !== undefined ? 'tls_inspector_sni_found_total' : 'tls_inspector_sni_not_found_total', labelsOf(config).listener);
        const sel = selectFilterChain(config, { sni: hello.sni, alpn: hello.alpn, transport: 'tls', localAddress: info.downstreamLocalAddress });
        if (!sel.chain) {
          socket.write(tlsAlert(ALERT_UNRECOGNIZED_NAME));
          return this.#refuse(socket, info, config, sel.reason);
        }
        this.#dispatch(socket, hello.bytes, sel.chain, info, state);
        return;
      }
      case 'not-tls': {
        telemetry.count('tls_inspector_tls_not_found_total', labelsOf(config).listener);
        const sel = selectFilterChain(config, { transport: 'raw_buffer', localAddress: info.downstreamLocalAddress });
        if (!sel.chain) return this.#refuse(socket, info, config, 'not_tls');
        this.#dispatch(socket, hello.bytes, sel.chain, info, state);
        return;
      }
      case 'too-large':
        telemetry.count('tls_inspector_client_hello_too_large_total', labelsOf(config).listener);
        socket.write(tlsAlert(ALERT_HANDSHAKE_FAILURE));
        return this.#refuse(socket, info, config, 'client_hello_too_large');
      case 'malformed':
        socket.write(tlsAlert(ALERT_HANDSHAKE_FAILURE));
        return this.#refuse(socket, info, config, 'client_hello_malformed', hello.detail);
      case 'timeout':
        return this.#refuse(socket, info, config, 'client_hello_timeout');
      case 'closed':
        return this.#refuse(socket, info, config, 'downstream_closed_early');
    }
  }

  /** Closes a connection no chain takes, counted and logged (`socket` undefined: the addon already closed it). */
  #refuse(socket: net.Socket | undefined, info: ConnectionInfo, config: Listener, reason: Reason, detail?: string): void {
    const { telemetry } = this.#state.runtime;
    if (socket !== undefined) {
      socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
    }
    telemetry.count('downstream_connections_refused_total', { listener: config.name, reason });
    telemetry.accessLog({
      time: isoTime(info.startMs),
      kind: 'connection',
      downstream: `${info.downstreamRemoteAddress}:${info.downstreamRemotePort}`,
      listener: config.name,
      sni: info.sni,
      ech: info.ech || undefined,
      alpnOffered: info.alpnOffered?.join(','),
      durationMs: Date.now() - info.startMs,
      reason,
      detail,
    });
  }

  #dispatch(socket: net.Socket, replay: Buffer | undefined, chain: FilterChain, info: ConnectionInfo, state: ListenerState): void {
    info.chain = chain.name;
    const { runtime, config } = state;
    // Per chain and by what the first bytes were: for a sidecar's inbound port this is "how many
    // connections arrive in plaintext under PERMISSIVE", the number to watch before going STRICT.
    runtime.telemetry.count('filter_chain_connections_total',
      chainLabels(config, chain, replay !== undefined && replay.length > 0 && replay[0] === 0x16 ? 'tls' : 'raw_buffer'));
    if (chain.tls) {
      this.#terminate(socket, replay, chain, info, state);
      return;
    }
    switch (chain.filter.kind) {
      case 'tcp':
        proxyTcp(socket, replay, chain.filter, info, { clusters: runtime.clusters, telemetry: runtime.telemetry });
        return;
      case 'http':
        // The bytes already read go along: they may already tell HTTP/1.1 from HTTP/2 (h2c).
        runtime.serveHttp(chain, socket, config, replay);
        return;
      case 'reject':
        if (replay && replay.length && replay[0] === 0x16) socket.write(tlsAlert(ALERT_UNRECOGNIZED_NAME));
        this.#refuse(socket, info, config, 'no_filter_chain', chain.filter.reason);
    }
  }

  #terminate(raw: net.Socket, replay: Buffer | undefined, chain: FilterChain, info: ConnectionInfo, state: ListenerState): void {
    const { runtime, config } = state;
    const { telemetry } = runtime;
    const tlsCtx = chain.tls!;
    const ctx = runtime.serverContext(chain);
    if ('error' in ctx && typeof (ctx as { error?: unknown }).error === 'string') {
      raw.write(tlsAlert(ALERT_INTERNAL_ERROR));
      telemetry.log('warn', 'no usable certificate for filter chain', { chain: chain.name, error: (ctx as { error: string }).error });
      return this.#refuse(raw, info, config, 'tls_handshake_failed', (ctx as { error: string }).error);
    }
    if (replay && replay.length) raw.unshift(replay);
    const sock = new tls.TLSSocket(raw, socketOptionsFor(chain, ctx as SecureContext));
    setConnectionInfo(sock, info);
    let secured = false;
    const timer = setTimeout(() => {
      if (!secured) { fail('tls_handshake_timeout'); }
    }, (runtime.limits ?? DEFAULT_LIMITS).handshakeTimeoutMs);
    timer.unref();
    const fail = (reason: Reason, detail?: string) => {
      clearTimeout(timer);
      telemetry.count('tls_handshakes_total', { listener: config.name, result: 'failure', reason });
      sock.destroy();
      this.#refuse(raw, info, config, reason, detail);
    };
    sock.on('error', (e: Error & { code?: string }) => {
      if (!secured) {
        const msg = e.code ?? e.message;
        fail(/CERTIFICATE|PEER_DID_NOT_RETURN/i.test(msg) ? 'client_cert_required' : 'tls_handshake_failed', msg);
      }
    });
    sock.once('secure', () => {
      secured = true;
      clearTimeout(timer);
      // tls.Server clears this itself; the HTTP/2 server waits for a 'secureConnect' that a
      // server-side socket never emits while it is still set.
      (sock as unknown as { secureConnecting: boolean }).secureConnecting = false;
      info.tlsVersion = sock.getProtocol() ?? undefined;
      info.alpn = sock.alpnProtocol || undefined;
      info.cipher = sock.getCipher()?.name;
      // Without a CertificateRequest the client cannot send a certificate, so there is nothing to
      // verify: skip the peer lookups (asking OpenSSL for the verify result of a connection without
      // a peer certificate builds an Error, stack trace included), and leave authorized false with
      // no authorizationError, as tls.Server does for a server that does not request certificates.
      if (tlsCtx.requestClientCertificate) {
        const peer = sock.getPeerX509Certificate();
        const v = handshakeVerification(sock);
        sock.authorized = v.authorized;
        if (v.authorizationError) sock.authorizationError = new Error(v.authorizationError);
        const check = checkPeerCertificate(peer, tlsCtx, v.authorized, v.authorizationError);
        if (peer) {
          info.peerCertificate = peer;
          info.peerCertificateVerified = v.authorized;
        }
        if (!check.ok) {
          telemetry.count('tls_handshakes_total', { listener: config.name, result: 'failure', reason: 'client_cert_rejected' });
          sock.destroy();
          this.#refuse(raw, info, config, 'client_cert_rejected', check.reason);
          return;
        }
      }
      telemetry.count('tls_handshakes_total', labelsOf(config).handshakeOk);
      switch (chain.filter.kind) {
        case 'http':
          runtime.serveHttp(chain, sock, config);
          return;
        case 'tcp':
          proxyTcp(sock, undefined, chain.filter, info, { clusters: runtime.clusters, telemetry });
          return;
        case 'reject':
          sock.destroy();
          this.#refuse(raw, info, config, 'no_filter_chain', chain.filter.reason);
      }
    });
  }
}

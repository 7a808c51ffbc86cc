/**
 * Upstream clusters at runtime: endpoint discovery (STATIC, DNS), load balancing, one pool per
 * endpoint for HTTP (HTTP/1.1 keep-alive without pipelining, or multiplexed HTTP/2 sessions; bounded
 * connections), raw TCP/TLS connections
 * for TCP proxying, TLS origination and circuit breaking.
 *
 * Every failure becomes an UpstreamError carrying a documented access-log reason, never a throw:
 * - no endpoint (empty cluster, DNS failure, unknown cluster)  -> no_healthy_upstream (503)
 * - TCP connect refused/unreachable                           -> upstream_connect_failed (503)
 * - connect timeout                                            -> upstream_connect_timeout (503)
 * - TLS material missing, handshake or verification failure     -> upstream_tls_failed (503)
 * - connection reset / closed mid-request / protocol error      -> upstream_reset (503)
 * - upstream idle (no bytes for streamIdleTimeoutMs)            -> upstream_timeout (504)
 * - maxRequests / maxPendingRequests reached                    -> upstream_overflow (503)
 *
 * TLS origination fails closed: when cluster.tls is present and its material cannot be loaded the
 * request fails; there is no plaintext fallback.
 *
 * Pools are keyed by endpoint address and every setting that shapes a connection, so `update()`
 * keeps the pools (and their warm connections) of endpoints that did not change and closes the
 * others gracefully (in-flight requests finish).
 */
import { X509Certificate, createHash } from 'node:crypto';
import * as net from 'node:net';
import type { Readable } from 'node:stream';
import { Readable as ReadableStream } from 'node:stream';
import * as tls from 'node:tls';
import { Pool } from 'undici';
import type { buildConnector } from 'undici';
import type { Cluster, Endpoint } from '../../model/snapshot.js';
import type { Reason } from '../telemetry.js';
import { subjectAltNames } from '../chain/xfcc.js';
import type { TcpReservation } from '../chain/tcp-proxy.js';
import { keepaliveWord, setSocketKeepalive } from '../chain/native-relay.js';
import { DnsCache, DnsError } from './dns.js';
import { H1Pool } from './h1-pool.js';
import type { Connector, PoolHandler, PoolRequest, UpstreamPool } from './pool.js';
import { AlpnPool } from './alpn-pool.js';
import { H2Pool } from './h2-pool.js';
import { createLoadBalancer, type LoadBalancer } from './load-balancer.js';
import { activeSlots, claimSlot, transferSlot } from './active-slots.js';

// ------------------------------------------------------------------ public types

/** Certificate material a secret name resolves to (runtime/pki provides the resolver). */
export interface SecretMaterial {
  certChainPem?: string;
  privateKeyPem?: string;
  caPem?: string;
  /** The secret stands for the system trust store. */
  systemRoots?: boolean;
}

export type SecretResolver = (name: string) => SecretMaterial | undefined;

export interface ClusterManagerOptions {
  secrets?: SecretResolver;
  dns?: DnsCache;
  /** Random source for load balancing (tests pass a seeded one). */
  random?: () => number;
  /** Upstream inactivity limit while waiting for headers or body bytes (default 300 s, Envoy's stream idle timeout). */
  streamIdleTimeoutMs?: number;
}

/** Why an upstream attempt failed, with the documented reason and the low-level code. */
export class UpstreamError extends Error {
  readonly reason: Reason;
  /** Low-level code: errno (ECONNREFUSED), TLS error (CERT_HAS_EXPIRED, ERR_TLS_CERT_ALTNAME_INVALID), undici code. */
  readonly code: string | undefined;
  readonly cluster: string;
  /** "ip:port" of the endpoint tried, when one was picked. */
  readonly endpoint: string | undefined;

  constructor(reason: Reason, message: string, opts: { code?: string; cluster: string; endpoint?: string; cause?: unknown }) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'UpstreamError';
    this.reason = reason;
    this.code = opts.code;
    this.cluster = opts.cluster;
    this.endpoint = opts.endpoint;
  }

  /** The request never reached an upstream connection (retry condition connect-failure). */
  get connectFailure(): boolean {
    return this.reason === 'upstream_connect_failed' || this.reason === 'upstream_connect_timeout' ||
      this.reason === 'upstream_tls_failed';
  }

  /** HTTP status a proxy answers with for this failure. */
  get status(): number {
    if (this.reason === 'upstream_timeout') return 504;
    if (this.reason === 'internal_error') return 500;
    return 503;
  }
}

export interface UpstreamRequest {
  method: string;
  /** Request target (path and query). */
  path: string;
  /** An object, or the list form name, value, name, value… (lower-case names), sent as given. */
  headers: Record<string, string | string[]> | (string | string[])[];
  /** Stream (piped with backpressure), fully buffered body, or none. */
  body: Readable | Buffer | null;
  /** The Host the request carries; the SNI when the cluster uses autoSni. */
  host: string;
  /** The protocol the request arrived in; picks the upstream one for httpProtocol 'downstream' (default http1). */
  downstreamProtocol?: 'http1' | 'h2';
}

/** Control over one in-flight upstream request. */
export interface UpstreamControl {
  /** "ip:port" (or socket path) once an endpoint was picked. */
  readonly endpoint: string | undefined;
  pause(): void;
  resume(): void;
  /** Cancels the request; the handler then gets onError with `err` (or an upstream_reset). */
  abort(err?: Error): void;
}

/**
 * Header fields as undici hands them over, name and value alternating: Buffers from HTTP/1.1
 * (names in the peer's case), a value may be a list. rawName / rawValue / rawHeadersToObject read it.
 */
export type RawHeaders = readonly (Buffer | string | (Buffer | string)[])[];

/**
 * Callbacks of one upstream request. Exactly one of onEnd / onError ends it; none is called
 * synchronously from `dispatch`. `pause()` called inside onHeaders / onData stops the body after
 * that chunk.
 */
export interface UpstreamHandler {
  onHeaders(ctl: UpstreamControl, statusCode: number, rawHeaders: RawHeaders): void;
  onData(ctl: UpstreamControl, chunk: Buffer): void;
  onEnd(ctl: UpstreamControl, rawTrailers: RawHeaders): void;
  onError(ctl: UpstreamControl, err: UpstreamError): void;
}

export interface UpstreamResponse {
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  body: Readable;
  endpoint: string;
}

// ------------------------------------------------------------------ TLS origination

/** Settings for `tls.connect` to a cluster's endpoint, or why there are none. */
export type TlsConnectResult =
  | { ok: true; options: tls.ConnectionOptions; servername: string | undefined }
  | { ok: false; reason: 'upstream_tls_failed'; message: string };

interface ContextCacheEntry {
  ca: string | undefined;
  cert: string | undefined;
  key: string | undefined;
  context: tls.SecureContext;
}

/** SecureContexts keyed by the secrets they were built from; rebuilt only when material changes. */
export class TlsContextCache {
  readonly #entries = new Map<string, ContextCacheEntry>();

  get(key: string, ca: string | undefined, cert: string | undefined, key_: string | undefined,
    minVersion: tls.SecureVersion, maxVersion: tls.SecureVersion): tls.SecureContext {
    const e = this.#entries.get(key);
    if (e !== undefined && e.ca === ca && e.cert === cert && e.key === key_) return e.context;
    const context = tls.createSecureContext({
      ...(ca !== undefined ? { ca } : {}),
      ...(cert !== undefined ? { cert, key: key_ } : {}),
      minVersion,
      maxVersion,
    });
    if (this.#entries.size > 1024) this.#entries.clear();
    this.#entries.set(key, { ca, cert, key: key_, context });
    return context;
  }
}

/** SNI for a request: the cluster's fixed `sni`, else the request Host with autoSni; never an IP. */
export function upstreamServerName(cluster: Cluster, host: string | undefined): string | undefined {
  const t = cluster.tls;
  if (t === undefined) return undefined;
  let name = t.sni !== undefined && t.sni !== '' ? t.sni : (t.autoSni && host !== undefined ? hostOnly(host) : undefined);
  if (name === '' || (name !== undefined && net.isIP(name) !== 0)) name = undefined;
  return name;
}

function hostOnly(host: string): string {
  if (host.startsWith('[')) return host.slice(1, Math.max(1, host.indexOf(']')));
  const c = host.lastIndexOf(':');
  return (c === -1 || host.indexOf(':') !== c ? host : host.slice(0, c)).toLowerCase();
}

/**
 * `tls.connect` options for originating TLS to an endpoint of `cluster`: SNI, trust (system roots
 * or the validationCa secret), client certificate (MUTUAL / ISTIO_MUTUAL), server identity check
 * (the subjectAltNames list when given, else the SNI), versions and ALPN. Missing material is an
 * error, never a reason to skip verification.
 */
export function tlsConnectOptions(
  cluster: Cluster,
  host: string | undefined,
  secrets: SecretResolver,
  opts: { alpn?: string[]; cache?: TlsContextCache } = {},
): TlsConnectResult {
  const t = cluster.tls;
  if (t === undefined) return { ok: false, reason: 'upstream_tls_failed', message: `cluster ${cluster.name} has no TLS settings` };
  const servername = upstreamServerName(cluster, host);

  let ca: string | undefined;
  if (!t.insecureSkipVerify && t.validationCa !== '' && t.validationCa !== 'system') {
    const m = secrets(t.validationCa);
    if (m === undefined || (m.caPem === undefined && m.systemRoots !== true)) {
      return { ok: false, reason: 'upstream_tls_failed', message: `CA secret ${t.validationCa} is not available` };
    }
    ca = m.systemRoots === true ? undefined : m.caPem;
  }

  let cert: string | undefined;
  let key: string | undefined;
  if (t.mode !== 'SIMPLE' || t.clientCertificate !== undefined) {
    const name = t.clientCertificate;
    const m = name === undefined ? undefined : secrets(name);
    if (m?.certChainPem === undefined || m.privateKeyPem === undefined) {
      if (t.mode !== 'SIMPLE') {
        return { ok: false, reason: 'upstream_tls_failed', message: `client certificate secret ${name ?? '(none)'} is not available` };
      }
    } else {
      cert = m.certChainPem;
      key = m.privateKeyPem;
    }
  }

  // Keyed by content, not only by name: a rotated client certificate or CA gets a new context.
  const cacheKey = createHash('sha256').update(`${t.minVersion}|${t.maxVersion}|${t.insecureSkipVerify}\0${ca ?? ''}\0${cert ?? ''}\0${key ?? ''}`).digest('hex');
  let secureContext: tls.SecureContext;
  try {
    secureContext = opts.cache !== undefined
      ? opts.cache.get(cacheKey, ca, cert, key, t.minVersion, t.maxVersion)
      : tls.createSecureContext({ ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert, key } : {}), minVersion: t.minVersion, maxVersion: t.maxVersion });
  } catch (err) {
    // Bad PEM: say which secret, never its content.
    return { ok: false, reason: 'upstream_tls_failed', message: `cannot load TLS material for cluster ${cluster.name}: ${(err as Error).message.split('\n')[0]}` };
  }

  const sans = t.subjectAltNames;
  const checkServerIdentity = t.insecureSkipVerify
    ? () => undefined
    : sans.length > 0
      ? (_name: string, peer: tls.PeerCertificate) => checkSubjectAltNames(sans, peer)
      : !t.autoSanValidation
        // ISTIO_MUTUAL without subjectAltNames: any identity the mesh CA issued is accepted.
        ? () => undefined
      : (name: string, peer: tls.PeerCertificate) =>
        // Without an expected name (no SNI, IP endpoint) only the chain is verified, as Envoy does.
        servername === undefined ? undefined : tls.checkServerIdentity(name, peer);

  const options: tls.ConnectionOptions = {
    secureContext,
    rejectUnauthorized: !t.insecureSkipVerify,
    checkServerIdentity,
    minVersion: t.minVersion,
    maxVersion: t.maxVersion,
  };
  if (servername !== undefined) options.servername = servername;
  const alpn = opts.alpn ?? t.alpn;
  if (alpn.length > 0) options.ALPNProtocols = alpn;
  return { ok: true, options, servername };
}

/** Any expected SAN presented by the certificate (DNS with certificate wildcards, IP, URI exact). */
function checkSubjectAltNames(expected: readonly string[], peer: tls.PeerCertificate): Error | undefined {
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(peer.raw);
  } catch {
    return Object.assign(new Error('upstream certificate cannot be parsed'), { code: 'ERR_TLS_CERT_ALTNAME_INVALID' });
  }
  let uris: string[] | undefined;
  for (const want of expected) {
    if (want.includes(':') && net.isIP(want) === 0) {
      uris ??= subjectAltNames(x509).uri;
      if (uris.includes(want)) return undefined;
    } else if (net.isIP(want) !== 0) {
      if (x509.checkIP(want) !== undefined) return undefined;
    } else if (x509.checkHost(want, { subject: 'never', wildcards: true, partialWildcards: false }) !== undefined) {
      return undefined;
    }
  }
  return Object.assign(new Error(`upstream certificate presents none of the expected SANs [${expected.join(', ')}]`), {
    code: 'ERR_TLS_CERT_ALTNAME_INVALID',
  });
}

// ------------------------------------------------------------------ hosts and clusters

const kReason = Symbol('tlsgate.upstreamReason');

/**
 * HTTP/1.1 upstreams go through our own pool (h1-pool.ts); HTTP/2 over plaintext (h2c) or Istio
 * mTLS through h2-pool.ts; plain TLS offering h2 through alpn-pool.ts, which picks one of the two
 * by the upstream's ALPN answer. A 'downstream'
 * cluster has both an HTTP/1.1 and an HTTP/2 pool per host and picks by the request.
 * TLSGATE_H1_CLIENT=undici sends HTTP/1.1 and ALPN-negotiated HTTP/2 through undici instead,
 * to compare the clients.
 */
const H1_CLIENT = process.env['TLSGATE_H1_CLIENT'] === 'undici' ? 'undici' : 'own';
type TaggedError = Error & { code?: string; [kReason]?: Reason };

/** One endpoint address (after DNS) and its pool(s); shared by clusters with identical settings. */
class Host {
  /** Where `active` lives (see active-slots.ts); -1: a field of its own (every slot taken). */
  #slot: number;
  #active = 0;
  pool: UpstreamPool | undefined;
  /** The h2c pool of an httpProtocol 'downstream' cluster, for requests that arrived as HTTP/2. */
  h2Pool: UpstreamPool | undefined;
  /** "ip:port" (IPv6 in brackets) or the socket path; computed once, read on every request. */
  readonly label: string;
  constructor(
    readonly key: string,
    readonly address: string,
    readonly port: number,
    readonly weight: number,
    readonly settings: ClusterSettings,
  ) {
    this.label = address.startsWith('/') ? address : `${net.isIPv6(address) ? `[${address}]` : address}:${port}`;
    this.#slot = claimSlot(this);
  }

  /** Requests or connections in flight, the native relay's included. */
  get active(): number {
    return this.#slot >= 0 ? activeSlots[this.#slot]! : this.#active;
  }

  /** Atomically: the addon's relay thread counts in the same slot. */
  addActive(d: number): void {
    if (this.#slot >= 0) Atomics.add(activeSlots, this.#slot, d);
    else this.#active += d;
  }

  get slot(): number {
    return this.#slot;
  }

  /** Replaces `prev` (same endpoint, new weight): its count, and its slot, which the addon may still count in. */
  takeOver(prev: Host): void {
    if (prev.#slot >= 0) {
      transferSlot(prev, this, prev.#slot, this.#slot);
      this.#slot = prev.#slot;
      prev.#slot = -1;
    } else {
      this.#active = prev.#active;
    }
  }
}

/** The parts of a Cluster that shape its connections (a changed setting means new pools). */
interface ClusterSettings {
  cluster: Cluster;
  /** Stable text of the fields below, part of every pool key. */
  fingerprint: string;
}

class ClusterState {
  readonly lb: LoadBalancer<Host>;
  /** Where `active` lives (see active-slots.ts); -1: a field of its own. */
  readonly slot: number;
  #active = 0;
  pending = 0;
  /** STATIC: computed once; DNS: rebuilt when the resolved addresses change. */
  hosts: Host[] = [];
  dnsInputs: (string[] | undefined)[] = [];
  readonly settings: ClusterSettings;
  /** The last TLS material check (see ClusterManager#tlsMaterialError) and what it was made from. */
  tlsCheck: {
    ca: SecretMaterial | undefined; cert: SecretMaterial | undefined; caPem: string | undefined; certPem: string | undefined;
    keyPem: string | undefined; systemRoots: boolean | undefined; error: string | undefined;
  } | undefined;
  /** SNI without autoSni (it does not depend on the request), once known; null until then. */
  fixedSni: string | undefined | null = null;

  /** Connections or requests in flight, the native relay's included. */
  get active(): number {
    return this.slot >= 0 ? activeSlots[this.slot]! : this.#active;
  }

  /** Atomically: the addon's relay thread counts in the same slot. */
  addActive(d: number): void {
    if (this.slot >= 0) Atomics.add(activeSlots, this.slot, d);
    else this.#active += d;
  }

  constructor(readonly cluster: Cluster, random: (() => number) | undefined) {
    this.slot = claimSlot(this);
    this.lb = createLoadBalancer<Host>(cluster.lbPolicy, random === undefined ? {} : { random });
    this.settings = {
      cluster,
      fingerprint: JSON.stringify([cluster.connectTimeoutMs, cluster.httpProtocol, cluster.tls ?? null,
        cluster.limits.maxConnections ?? null, cluster.limits.maxRequestsPerConnection ?? null,
        cluster.limits.idleTimeoutMs ?? null]),
    };
  }
}

function hostKey(address: string, port: number, s: ClusterSettings): string {
  return `${address}|${port}|${s.fingerprint}`;
}

function isHostname(ep: Endpoint): boolean {
  return !ep.address.startsWith('/') && net.isIP(ep.address) === 0;
}

// ------------------------------------------------------------------ the manager

const PLACEHOLDER_SNI = 'no-sni.tlsgate.invalid';

export class ClusterManager {
  readonly #secrets: SecretResolver;
  readonly #dns: DnsCache;
  readonly #random: (() => number) | undefined;
  readonly #idleMs: number;
  readonly #tlsCache = new TlsContextCache();
  #clusters = new Map<string, ClusterState>();
  /** Hosts by key, shared across clusters and snapshots; swept after updates. */
  #hosts = new Map<string, Host>();
  #closed = false;

  constructor(clusters: Record<string, Cluster>, opts: ClusterManagerOptions = {}) {
    this.#secrets = opts.secrets ?? (() => undefined);
    this.#dns = opts.dns ?? new DnsCache();
    this.#random = opts.random;
    this.#idleMs = opts.streamIdleTimeoutMs ?? 300_000;
    this.update(clusters);
  }

  /** The cluster definition by name. */
  get(name: string): Cluster | undefined {
    return this.#clusters.get(name)?.cluster;
  }

  /** In-flight request count of a cluster (for tests and admin). */
  stats(name: string): { active: number; pending: number } | undefined {
    const s = this.#clusters.get(name);
    return s === undefined ? undefined : { active: s.active, pending: s.pending };
  }

  /** TLS options for a cluster (see tlsConnectOptions), using this manager's secrets and context cache. */
  tlsConnectOptions(clusterName: string, host: string | undefined, alpn?: string[]): TlsConnectResult {
    const s = this.#clusters.get(clusterName);
    if (s === undefined) return { ok: false, reason: 'upstream_tls_failed', message: `unknown cluster ${clusterName}` };
    return tlsConnectOptions(s.cluster, host, this.#secrets, { cache: this.#tlsCache, ...(alpn !== undefined ? { alpn } : {}) });
  }

  /**
   * Replaces the cluster set. Pools of endpoints whose address and connection settings did not
   * change are kept; the others are closed gracefully.
   */
  update(clusters: Record<string, Cluster>): void {
    const next = new Map<string, ClusterState>();
    for (const [name, c] of Object.entries(clusters)) {
      const s = new ClusterState(c, this.#random);
      if (c.discovery === 'STATIC') s.hosts = this.#hostsFor(s, c.endpoints.map((ep) => [ep, [ep.address]]));
      next.set(name, s);
    }
    this.#clusters = next;
    this.#sweep();
  }

  /**
   * Closes every pool: in-flight requests get `graceMs` to finish, then their connections are
   * destroyed (a stuck upstream cannot hold shutdown forever).
   */
  async close(graceMs = 5_000): Promise<void> {
    this.#closed = true;
    this.#clusters = new Map();
    const pools = [...this.#hosts.values()].flatMap((h) => [h.pool, h.h2Pool]).filter((p): p is UpstreamPool => p !== undefined);
    this.#hosts.clear();
    await Promise.allSettled(pools.map((p) => closePool(p, graceMs)));
  }

  #hostsFor(s: ClusterState, resolved: [Endpoint, string[]][]): Host[] {
    const out: Host[] = [];
    for (const [ep, addrs] of resolved) {
      for (const address of addrs) {
        const key = hostKey(address, ep.port, s.settings);
        let h = this.#hosts.get(key);
        if (h === undefined || h.weight !== ep.weight) {
          const prev = h;
          h = new Host(key, address, ep.port, ep.weight, s.settings);
          if (prev !== undefined) {
            h.pool = prev.pool;
            h.h2Pool = prev.h2Pool;
            h.takeOver(prev);
          }
          this.#hosts.set(key, h);
        }
        out.push(h);
      }
    }
    return out;
  }

  /** Closes pools no cluster refers to any more. */
  #sweep(): void {
    const live = new Set<string>();
    for (const s of this.#clusters.values()) for (const h of s.hosts) live.add(h.key);
    for (const [key, h] of this.#hosts) {
      if (live.has(key)) continue;
      this.#hosts.delete(key);
      for (const pool of [h.pool, h.h2Pool]) if (pool !== undefined) closePool(pool, 30_000).catch(() => undefined);
      h.pool = undefined;
      h.h2Pool = undefined;
    }
  }

  /** Hosts of a cluster now: an array, a DNS error, or a promise when names must be resolved. */
  #currentHosts(s: ClusterState): Host[] | UpstreamError | Promise<Host[] | UpstreamError> {
    const c = s.cluster;
    if (c.discovery === 'STATIC') return s.hosts;
    if (c.discovery === 'ORIGINAL_DST') {
      return new UpstreamError('no_healthy_upstream', `cluster ${c.name}: ORIGINAL_DST discovery is not supported yet`, { cluster: c.name, code: 'ORIGINAL_DST_UNSUPPORTED' });
    }
    // DNS: every endpoint address that is a name is resolved; all its addresses become hosts.
    const inputs: (string[] | undefined)[] = new Array(c.endpoints.length);
    let missing = false;
    for (let i = 0; i < c.endpoints.length; i++) {
      const ep = c.endpoints[i]!;
      if (!isHostname(ep)) {
        inputs[i] = [ep.address];
        continue;
      }
      const hit = this.#dns.cached(ep.address);
      if (hit instanceof DnsError) inputs[i] = [];
      else if (hit === undefined) missing = true;
      else inputs[i] = hit;
    }
    if (!missing) return this.#dnsHosts(s, inputs);
    return Promise.all(c.endpoints.map((ep) => (isHostname(ep) ? this.#dns.resolve(ep.address).catch(() => [] as string[]) : Promise.resolve([ep.address]))))
      .then((all) => this.#dnsHosts(s, all));
  }

  #dnsHosts(s: ClusterState, inputs: (string[] | undefined)[]): Host[] | UpstreamError {
    // The DNS cache keeps array identity for an unchanged answer, so this is a cheap check.
    let same = inputs.length === s.dnsInputs.length;
    for (let i = 0; same && i < inputs.length; i++) same = inputs[i] === s.dnsInputs[i];
    if (!same) {
      s.dnsInputs = inputs;
      s.hosts = this.#hostsFor(s, s.cluster.endpoints.map((ep, i) => [ep, inputs[i] ?? []]));
      this.#sweep();
    }
    if (s.hosts.length === 0) {
      return new UpstreamError('no_healthy_upstream', `cluster ${s.cluster.name}: no endpoint resolved`, { cluster: s.cluster.name, code: 'DNS_NO_ADDRESS' });
    }
    return s.hosts;
  }

  #pool(h: Host, downstreamProtocol: 'http1' | 'h2' | undefined): UpstreamPool {
    const c = h.settings.cluster;
    // 'downstream': requests that arrived as HTTP/2 take a second pool, of HTTP/2 connections.
    if (c.httpProtocol === 'downstream' && downstreamProtocol === 'h2') {
      h.h2Pool ??= this.#newH2Pool(h, c, c.tls?.mode === 'ISTIO_MUTUAL' ? ['istio-h2', 'istio', 'h2'] : ['h2']);
      return h.h2Pool;
    }
    if (h.pool !== undefined) return h.pool;
    const useTls = c.tls !== undefined;
    const istio = c.tls?.mode === 'ISTIO_MUTUAL';
    const idleMs = c.limits.idleTimeoutMs ?? 60_000;
    // An HTTP2/GRPC port speaks HTTP/2 whatever ALPN says, as Envoy does: h2c with prior knowledge
    // on plaintext, HTTP/2 inside Istio mTLS (ALPN istio-h2, istio, h2 from the cluster). Plain TLS
    // keeps negotiating by ALPN below, so a server that picks http/1.1 still gets HTTP/1.1.
    if (c.httpProtocol === 'h2' && (!useTls || istio)) {
      h.pool = this.#newH2Pool(h, c, c.tls?.alpn);
      return h.pool;
    }
    // Istio mTLS carries HTTP/1.1 under its own ALPN (istio-http/1.1); h2 by ALPN for plain TLS.
    const allowH2 = useTls && !istio && c.httpProtocol === 'h2';
    const dialer = (alpn: string[] | undefined): Connector =>
      (servername, cb) => this.#dial(h, c, servername === PLACEHOLDER_SNI ? undefined : servername, c.connectTimeoutMs, alpn, cb);
    const h1 = (connect: Connector): UpstreamPool => new H1Pool({
      connect,
      ...(c.limits.maxConnections !== undefined && c.limits.maxConnections > 0 ? { connections: c.limits.maxConnections } : {}),
      ...(c.limits.maxRequestsPerConnection !== undefined && c.limits.maxRequestsPerConnection > 0
        ? { maxRequestsPerConnection: c.limits.maxRequestsPerConnection } : {}),
      defaultHost: h.address.startsWith('/') ? 'localhost' : h.label,
      keepAliveTimeoutMs: idleMs,
      idleTimeoutMs: this.#idleMs,
    });
    if (H1_CLIENT !== 'undici') {
      if (allowH2) {
        // Plain TLS offering h2 and http/1.1: the upstream's ALPN answer picks the pool.
        h.pool = new AlpnPool(dialer(['h2', 'http/1.1']), (proto, connect) => (proto === 'h2' ? this.#newH2Pool(h, c, undefined, connect) : h1(connect)));
        return h.pool;
      }
      h.pool = h1(dialer(useTls ? (istio ? ['istio-http/1.1', 'istio'] : ['http/1.1']) : undefined));
      return h.pool;
    }
    const origin = h.address.startsWith('/')
      ? `${useTls ? 'https' : 'http'}://localhost`
      : `${useTls ? 'https' : 'http'}://${net.isIPv6(h.address) ? `[${h.address}]` : h.address}:${h.port}`;
    const idle = idleMs;
    const opts: Pool.Options = {
      pipelining: 1,
      keepAliveTimeout: idle,
      keepAliveMaxTimeout: idle,
      headersTimeout: this.#idleMs,
      bodyTimeout: this.#idleMs,
      allowH2,
      connect: this.#connector(h, istio ? ['istio-http/1.1', 'istio'] : allowH2 ? ['h2', 'http/1.1'] : ['http/1.1']),
    };
    if (c.limits.maxConnections !== undefined && c.limits.maxConnections > 0) opts.connections = c.limits.maxConnections;
    if (c.limits.maxRequestsPerConnection !== undefined && c.limits.maxRequestsPerConnection > 0) {
      opts.maxRequestsPerClient = c.limits.maxRequestsPerConnection;
    }
    const pool = new Pool(origin, opts);
    // A pool-level error has no request to report to; per-request errors reach the handler.
    pool.on('connectionError', () => undefined);
    // undici's dispatch takes the same request fields and handler protocol.
    h.pool = pool as unknown as UpstreamPool;
    return h.pool;
  }

  /** HTTP/2 with prior knowledge to one host: h2c on plaintext, else over TLS offering `alpn`. */
  #newH2Pool(h: Host, c: Cluster, alpn: string[] | undefined, connect?: Connector): UpstreamPool {
    return new H2Pool({
      connect: connect ?? ((servername, cb) => this.#dial(h, c, servername === PLACEHOLDER_SNI ? undefined : servername, c.connectTimeoutMs, alpn, cb)),
      scheme: c.tls !== undefined ? 'https' : 'http',
      defaultAuthority: h.address.startsWith('/') ? 'localhost' : h.label,
      ...(c.limits.maxConnections !== undefined && c.limits.maxConnections > 0 ? { connections: c.limits.maxConnections } : {}),
      ...(c.limits.maxRequestsPerConnection !== undefined && c.limits.maxRequestsPerConnection > 0
        ? { maxRequestsPerConnection: c.limits.maxRequestsPerConnection } : {}),
      keepAliveTimeoutMs: c.limits.idleTimeoutMs ?? 60_000,
      idleTimeoutMs: this.#idleMs,
    });
  }

  /** An undici connector that dials this host itself, so connect and TLS failures are classified. */
  #connector(h: Host, alpn: string[]): buildConnector.connector {
    return (opts, cb) => {
      const c = h.settings.cluster;
      const sniHint = opts.servername === PLACEHOLDER_SNI || opts.servername == null ? undefined : opts.servername;
      this.#dial(h, c, sniHint, c.connectTimeoutMs, alpn, (err, socket) => {
        if (err !== null || socket === null) cb(err ?? new Error('connect failed'), null);
        else cb(null, socket);
      });
    };
  }

  /** Opens a TCP (and with cluster.tls, TLS) connection to one host; calls back once. */
  #dial(
    h: Host,
    c: Cluster,
    requestHost: string | undefined,
    timeoutMs: number,
    alpn: string[] | undefined,
    cb: (err: TaggedError | null, socket: net.Socket | null) => void,
  ): void {
    let done = false;
    let tlsOpts: tls.ConnectionOptions | undefined;
    if (c.tls !== undefined) {
      const r = tlsConnectOptions(c, requestHost, this.#secrets, { cache: this.#tlsCache, ...(alpn !== undefined ? { alpn } : {}) });
      if (!r.ok) {
        const e: TaggedError = Object.assign(new Error(r.message), { code: 'TLS_MATERIAL_UNAVAILABLE', [kReason]: 'upstream_tls_failed' as Reason });
        process.nextTick(cb, e, null);
        return;
      }
      tlsOpts = r.options;
    }
    const finish = (err: TaggedError | null, sock: net.Socket | null): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err !== null && sock !== null) sock.destroy();
      cb(err, err === null ? sock : null);
    };
    const target = h.address.startsWith('/') ? { path: h.address } : { host: h.address, port: h.port };
    let socket: net.Socket;
    if (tlsOpts !== undefined) {
      // TLS session resumption toward this endpoint and name: a resumed handshake skips the
      // certificate exchange and most of the CPU of a full one.
      const sessionKey = `${h.address}|${h.port}|${tlsOpts.servername ?? ''}|${tlsOpts.secureContext ? contextId(tlsOpts.secureContext) : ''}`;
      const session = upstreamSessions.get(sessionKey);
      const ts = tls.connect({ ...target, ...tlsOpts, ...(session ? { session } : {}) });
      ts.on('session', (sess: Buffer) => rememberSession(sessionKey, sess));
      socket = ts;
      ts.once('secureConnect', () => {
        // rejectUnauthorized already destroyed a socket whose chain failed; this covers the rest.
        if (!ts.authorized && tlsOpts!.rejectUnauthorized !== false) {
          const e: TaggedError = Object.assign(new Error(`upstream TLS verification failed: ${String(ts.authorizationError)}`), {
            code: String(ts.authorizationError), [kReason]: 'upstream_tls_failed' as Reason,
          });
          finish(e, ts);
          return;
        }
        finish(null, ts);
      });
      ts.setNoDelay(true);
    } else {
      // As a connect option it is set once on the new socket (the setter would set it now and
      // again once connected).
      socket = net.connect({ ...target, noDelay: true });
      socket.once('connect', () => finish(null, socket));
    }
    let connected = false;
    const keepalive = c.tcpKeepalive;
    socket.once('connect', () => {
      connected = true;
      // None unless the DestinationRule asks (connectionPool.tcp.tcpKeepalive), as Envoy does.
      if (keepalive !== undefined && !('path' in target)) setSocketKeepalive(socket, keepalive);
    });
    socket.on('error', (err: TaggedError) => {
      if (done) return;
      // An error before TCP connected is a connect failure; after, during the handshake, a TLS failure.
      err[kReason] = tlsOpts !== undefined && connected ? 'upstream_tls_failed' : 'upstream_connect_failed';
      finish(err, socket);
    });
    socket.once('close', () => {
      if (!done) {
        finish(Object.assign(new Error('upstream closed during connect'), {
          code: 'ECONNRESET', [kReason]: (tlsOpts !== undefined && connected ? 'upstream_tls_failed' : 'upstream_connect_failed') as Reason,
        }), socket);
      }
    });
    const timer = setTimeout(() => {
      finish(Object.assign(new Error(`connect timeout after ${timeoutMs} ms`), {
        code: 'UND_ERR_CONNECT_TIMEOUT', [kReason]: 'upstream_connect_timeout' as Reason,
      }), socket);
    }, timeoutMs > 0 ? timeoutMs : 10_000);
    timer.unref();
  }

  /**
   * Sends one HTTP request to a cluster. The handler is called asynchronously; the returned control
   * pauses/resumes the response (backpressure) and aborts the request (downstream gone, timeout).
   */
  dispatch(clusterName: string, req: UpstreamRequest, handler: UpstreamHandler): UpstreamControl {
    const ex = new Exchange(clusterName, handler);
    const s = this.#clusters.get(clusterName);
    if (this.#closed || s === undefined) {
      ex.fail(new UpstreamError('no_healthy_upstream', `unknown cluster ${clusterName}`, { cluster: clusterName, code: 'UNKNOWN_CLUSTER' }));
      return ex;
    }
    const lim = s.cluster.limits;
    if ((lim.maxRequests !== undefined && s.active >= lim.maxRequests) ||
      (lim.maxPendingRequests !== undefined && s.pending >= lim.maxPendingRequests)) {
      ex.fail(new UpstreamError('upstream_overflow', `cluster ${clusterName} is at its request limit`, { cluster: clusterName, code: 'OVERFLOW' }));
      return ex;
    }
    ex.begin(s);
    const hosts = this.#currentHosts(s);
    if (hosts instanceof Promise) {
      hosts.then((hs) => this.#send(ex, s, hs, req), (err: unknown) => ex.fail(
        new UpstreamError('no_healthy_upstream', `cluster ${clusterName}: ${String(err)}`, { cluster: clusterName, cause: err })));
    } else this.#send(ex, s, hosts, req);
    return ex;
  }

  /**
   * Why a TLS cluster cannot originate now (missing or unloadable material), or undefined. The
   * full tlsConnectOptions (PEM hashing, context lookup) runs only when the material the cluster
   * names changed since the last request, not on every request.
   */
  #tlsMaterialError(s: ClusterState): string | undefined {
    const t = s.cluster.tls!;
    const ca = t.validationCa !== '' ? this.#secrets(t.validationCa) : undefined;
    const cert = t.clientCertificate !== undefined ? this.#secrets(t.clientCertificate) : undefined;
    const k = s.tlsCheck;
    if (k !== undefined && k.ca === ca && k.cert === cert && k.caPem === ca?.caPem && k.certPem === cert?.certChainPem &&
      k.keyPem === cert?.privateKeyPem && k.systemRoots === ca?.systemRoots) return k.error;
    const r = tlsConnectOptions(s.cluster, undefined, this.#secrets, { cache: this.#tlsCache });
    const error = r.ok ? undefined : r.message;
    s.tlsCheck = { ca, cert, caPem: ca?.caPem, certPem: cert?.certChainPem, keyPem: cert?.privateKeyPem, systemRoots: ca?.systemRoots, error };
    if (s.fixedSni === null && !t.autoSni) s.fixedSni = upstreamServerName(s.cluster, undefined);
    return error;
  }

  #send(ex: Exchange, s: ClusterState, hosts: Host[] | UpstreamError, req: UpstreamRequest): void {
    if (ex.aborted) {
      ex.fail(ex.abortError());
      return;
    }
    if (hosts instanceof UpstreamError) {
      ex.fail(hosts);
      return;
    }
    const h = s.lb.pick(hosts);
    if (h === undefined) {
      ex.fail(new UpstreamError('no_healthy_upstream', `cluster ${s.cluster.name} has no endpoints`, { cluster: s.cluster.name, code: 'NO_ENDPOINTS' }));
      return;
    }
    ex.attach(h);
    const c = s.cluster;
    let servername: string | undefined;
    if (c.tls !== undefined) {
      // Fail before queueing when the TLS material is missing (fail closed, no plaintext retry).
      const error = this.#tlsMaterialError(s);
      if (error !== undefined) {
        ex.fail(new UpstreamError('upstream_tls_failed', error, { cluster: c.name, endpoint: h.label, code: 'TLS_MATERIAL_UNAVAILABLE' }));
        return;
      }
      // Pools reuse a connection only for the same servername; a constant placeholder keeps a
      // cluster without SNI on its warm connections.
      servername = (c.tls.autoSni || s.fixedSni === null ? upstreamServerName(c, req.host) : s.fixedSni) ?? PLACEHOLDER_SNI;
    }
    // undici reads `servername` as a dispatch option too, and takes the list form with array values.
    const opts: PoolRequest = { method: req.method, path: req.path, headers: req.headers, body: req.body };
    if (servername !== undefined) opts.servername = servername;
    try {
      this.#pool(h, req.downstreamProtocol).dispatch(opts, ex as unknown as PoolHandler);
    } catch (err) {
      ex.fail(classify(err, c.name, h.label));
    }
  }

  /**
   * Convenience over dispatch: resolves with the status, headers and a body stream (paused while
   * the consumer does not read), or rejects with an UpstreamError.
   */
  request(clusterName: string, req: UpstreamRequest & { signal?: AbortSignal }): Promise<UpstreamResponse> {
    return new Promise<UpstreamResponse>((resolve, reject) => {
      let body: ReadableStream | undefined;
      const ctl = this.dispatch(clusterName, req, {
        onHeaders(c, statusCode, raw) {
          body = new ReadableStream({ read: () => c.resume() });
          body.on('close', () => { if (!body!.readableEnded) c.abort(); });
          // The reader sees a failure through its read; one before it attached must not go uncaught.
          body.on('error', () => undefined);
          resolve({ statusCode, headers: rawHeadersToObject(raw), body, endpoint: c.endpoint ?? '' });
        },
        onData(c, chunk) {
          if (body !== undefined && !body.push(chunk)) c.pause();
        },
        onEnd() {
          body?.push(null);
        },
        onError(_c, err) {
          if (body === undefined) reject(err);
          else body.destroy(err);
        },
      });
      if (req.signal !== undefined) {
        if (req.signal.aborted) ctl.abort();
        else req.signal.addEventListener('abort', () => ctl.abort(), { once: true });
      }
    });
  }

  /**
   * A raw connection to an endpoint of a cluster, for TCP proxying: plain TCP, or TLS when the
   * cluster originates TLS (fail closed). The endpoint's active count covers the connection's life.
   */
  connectTcp(clusterName: string, opts: { timeoutMs?: number; sni?: string } = {}): Promise<{ socket: net.Socket | tls.TLSSocket; endpoint: string }> {
    const s = this.#clusters.get(clusterName);
    if (this.#closed || s === undefined) {
      return Promise.reject(new UpstreamError('no_healthy_upstream', `unknown cluster ${clusterName}`, { cluster: clusterName, code: 'UNKNOWN_CLUSTER' }));
    }
    const lim = s.cluster.limits;
    if (lim.maxConnections !== undefined && s.active >= lim.maxConnections) {
      return Promise.reject(new UpstreamError('upstream_overflow', `cluster ${clusterName} is at its connection limit`, { cluster: clusterName, code: 'OVERFLOW' }));
    }
    const hosts = this.#currentHosts(s);
    // STATIC endpoints and cached DNS answers are at hand: dial now, in the one promise the
    // caller gets (no extra promise and microtask per connection). Only a DNS lookup waits.
    if (Array.isArray(hosts)) return new Promise((resolve, reject) => this.#connectTcpTo(s, hosts, opts, resolve, reject));
    if (hosts instanceof UpstreamError) return Promise.reject(hosts);
    return hosts.then((hs) => new Promise((resolve, reject) => {
      if (hs instanceof UpstreamError) reject(hs);
      else this.#connectTcpTo(s, hs, opts, resolve, reject);
    }));
  }

  /** connectTcp once the hosts are known: pick one, count it active for the connection's life, dial. */
  #connectTcpTo(
    s: ClusterState, hosts: Host[], opts: { timeoutMs?: number; sni?: string },
    resolve: (r: { socket: net.Socket | tls.TLSSocket; endpoint: string }) => void, reject: (e: UpstreamError) => void,
  ): void {
    const clusterName = s.cluster.name;
    const h = s.lb.pick(hosts);
    if (h === undefined) {
      reject(new UpstreamError('no_healthy_upstream', `cluster ${clusterName} has no endpoints`, { cluster: clusterName, code: 'NO_ENDPOINTS' }));
      return;
    }
    h.addActive(1);
    s.addActive(1);
    this.#dial(h, s.cluster, opts.sni, opts.timeoutMs ?? s.cluster.connectTimeoutMs, undefined, (err, socket) => {
      if (err !== null || socket === null) {
        h.addActive(-1);
        s.addActive(-1);
        reject(classify(err, clusterName, h.label));
        return;
      }
      socket.once('close', () => {
        h.addActive(-1);
        s.addActive(-1);
      });
      resolve({ socket, endpoint: h.label });
    });
  }

  /**
   * connectTcp for a caller that dials by itself (the native relay): the same checks, pick and
   * active count, no socket. `release()` ends the count (once, when the connection is over or its
   * connect failed). An UpstreamError when connectTcp would fail at once; undefined when
   * connectTcp must be used instead: TLS origination, endpoints that are not all IP addresses
   * (unix sockets), or a DNS answer not cached yet (nothing picked or counted then).
   */
  /**
   * A plain TCP cluster whose endpoints are fixed IP addresses, as the native relay needs it to
   * pick and dial by itself: the policy, the endpoints and the slots their counts live in.
   * Undefined for anything else (TLS origination, PROXY protocol, DNS, a unix socket, no
   * endpoints): those stay with reserveTcp / connectTcp.
   */
  fastTarget(clusterName: string): FastClusterTarget | undefined {
    const s = this.#clusters.get(clusterName);
    if (this.#closed || s === undefined || s.slot < 0) return undefined;
    const c = s.cluster;
    if (c.tls !== undefined || c.proxyProtocol !== undefined || c.invalidBackend !== undefined || c.discovery !== 'STATIC') return undefined;
    const hosts = s.hosts;
    if (hosts.length === 0 || !allIpLiterals(hosts) || hosts.some((h) => h.slot < 0)) return undefined;
    return {
      policy: POLICY_INDEX[s.lb.policy],
      clusterSlot: s.slot,
      maxConnections: c.limits.maxConnections ?? -1,
      connectTimeoutMs: c.connectTimeoutMs > 0 ? c.connectTimeoutMs : 10_000,
      keepalive: keepaliveWord(c.tcpKeepalive),
      hosts: hosts.map((h) => [h.address, h.port, h.weight, h.slot]),
      labels: hosts.map((h) => h.label),
    };
  }

  reserveTcp(clusterName: string): TcpReservation | UpstreamError | undefined {
    const s = this.#clusters.get(clusterName);
    if (this.#closed || s === undefined) return new UpstreamError('no_healthy_upstream', `unknown cluster ${clusterName}`, { cluster: clusterName, code: 'UNKNOWN_CLUSTER' });
    if (s.cluster.tls !== undefined) return undefined;
    const lim = s.cluster.limits;
    if (lim.maxConnections !== undefined && s.active >= lim.maxConnections) {
      return new UpstreamError('upstream_overflow', `cluster ${clusterName} is at its connection limit`, { cluster: clusterName, code: 'OVERFLOW' });
    }
    const hosts = this.#currentHosts(s);
    if (hosts instanceof UpstreamError) return hosts;
    if (!Array.isArray(hosts) || !allIpLiterals(hosts)) return undefined;
    const h = s.lb.pick(hosts);
    if (h === undefined) return new UpstreamError('no_healthy_upstream', `cluster ${clusterName} has no endpoints`, { cluster: clusterName, code: 'NO_ENDPOINTS' });
    h.addActive(1);
    s.addActive(1);
    let held = true;
    return {
      address: h.address, port: h.port, endpoint: h.label, timeoutMs: s.cluster.connectTimeoutMs, keepalive: s.cluster.tcpKeepalive,
      release: () => {
        if (!held) return;
        held = false;
        h.addActive(-1);
        s.addActive(-1);
      },
    };
  }
}

/** What the native relay needs to pick an endpoint of a cluster itself (see fastTarget). */
export interface FastClusterTarget {
  policy: 0 | 1 | 2;
  clusterSlot: number;
  /** -1: no limit. */
  maxConnections: number;
  connectTimeoutMs: number;
  /** The cluster's TCP keep-alive (keepaliveWord). */
  keepalive: number;
  /** [address, port, weight, slot] per endpoint, in the balancer's order. */
  hosts: [string, number, number, number][];
  /** Each endpoint's "ip:port", for the access log. */
  labels: string[];
}

const POLICY_INDEX = { ROUND_ROBIN: 0, LEAST_REQUEST: 1, RANDOM: 2 } as const;

/** Host lists whose addresses are all IP literals without a zone (the native relay dials those). */
const ipLiteralLists = new WeakMap<readonly { address: string }[], boolean>();

function allIpLiterals(hosts: readonly { address: string }[]): boolean {
  let ok = ipLiteralLists.get(hosts);
  if (ok === undefined) {
    ok = !hosts.some((x) => net.isIP(x.address) === 0 || x.address.includes('%'));
    ipLiteralLists.set(hosts, ok);
  }
  return ok;
}

/** Graceful pool close bounded by `graceMs`, then destroy. */
async function closePool(pool: UpstreamPool, graceMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'late'>((resolve) => {
    timer = setTimeout(() => resolve('late'), graceMs);
    timer.unref();
  });
  const r = await Promise.race([pool.close().then(() => 'closed' as const), deadline]);
  clearTimeout(timer);
  if (r === 'late') await pool.destroy().catch(() => undefined);
}

/** Maps any error from undici or our connector to an UpstreamError. */
function classify(err: unknown, cluster: string, endpoint: string | undefined): UpstreamError {
  if (err instanceof UpstreamError) return err;
  const e = (err ?? {}) as TaggedError;
  const code = typeof e.code === 'string' ? e.code : undefined;
  const msg = typeof e.message === 'string' ? e.message : String(err);
  const base = { cluster, ...(endpoint !== undefined ? { endpoint } : {}), ...(code !== undefined ? { code } : {}), cause: err };
  const tagged = e[kReason];
  if (tagged !== undefined) return new UpstreamError(tagged, msg, base);
  switch (code) {
    case 'UND_ERR_HEADERS_TIMEOUT':
    case 'UND_ERR_BODY_TIMEOUT':
      return new UpstreamError('upstream_timeout', msg, base);
    case 'UND_ERR_CONNECT_TIMEOUT':
      return new UpstreamError('upstream_connect_timeout', msg, base);
    case 'ECONNREFUSED':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new UpstreamError('upstream_connect_failed', msg, base);
    case 'UND_ERR_INVALID_ARG':
    case 'UND_ERR_NOT_SUPPORTED':
      return new UpstreamError('internal_error', msg, base);
    default:
      return new UpstreamError('upstream_reset', msg, base);
  }
}

/**
 * One upstream request: undici's handler on one side, our UpstreamHandler on the other. It speaks
 * undici's original handler protocol (onConnect / onHeaders / onData / onComplete / onError): the
 * controller protocol wraps such a handler in two more objects and parses the response headers
 * and trailers into objects on every request, which the router only turns back into a list.
 */
class Exchange implements UpstreamControl {
  #abort: ((err?: Error) => void) | undefined;
  #resume: (() => void) | undefined;
  #state: ClusterState | undefined;
  #host: Host | undefined;
  #done = false;
  #abortErr: Error | undefined;
  aborted = false;
  #pending = false;
  #paused = false;

  constructor(
    private readonly clusterName: string,
    private readonly handler: UpstreamHandler,
  ) {}

  get endpoint(): string | undefined {
    return this.#host?.label;
  }

  /** Counts the request on its cluster (active and pending until undici writes it). */
  begin(s: ClusterState): void {
    this.#state = s;
    s.addActive(1);
    s.pending++;
    this.#pending = true;
  }

  attach(h: Host): void {
    this.#host = h;
    h.addActive(1);
  }

  abortError(): UpstreamError {
    return this.#abortErr instanceof UpstreamError ? this.#abortErr
      : new UpstreamError('upstream_reset', 'request aborted', { cluster: this.clusterName, code: 'ABORTED', ...(this.#host !== undefined ? { endpoint: this.#host.label } : {}), cause: this.#abortErr });
  }

  /** Ends the exchange with an error, asynchronously (never inside dispatch). */
  fail(err: UpstreamError): void {
    if (this.#done) return;
    this.#done = true;
    this.#release();
    queueMicrotask(() => this.handler.onError(this, err));
  }

  #release(): void {
    const s = this.#state;
    if (s === undefined) return;
    this.#state = undefined;
    s.addActive(-1);
    if (this.#pending) s.pending--;
    this.#pending = false;
    if (this.#host !== undefined) this.#host.addActive(-1);
  }

  /** Takes effect when the current chunk returns to undici (onData answers false). */
  pause(): void {
    this.#paused = true;
  }

  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#resume?.();
  }

  abort(err?: Error): void {
    if (this.aborted || this.#done) return;
    this.aborted = true;
    this.#abortErr = err;
    // Before undici took the request there is nothing to cancel; #send sees `aborted`.
    this.#abort?.(err ?? new Error('aborted'));
  }

  // ---- undici handler

  onConnect(abort: (err?: Error) => void): void {
    this.#abort = abort;
    if (this.#pending && this.#state !== undefined) {
      this.#state.pending--;
      this.#pending = false;
    }
    if (this.aborted) abort(this.#abortErr ?? new Error('aborted'));
  }

  onHeaders(statusCode: number, rawHeaders: RawHeaders, resume: () => void): boolean {
    this.#resume = resume;
    if (statusCode < 200 || this.#done) return true;
    this.handler.onHeaders(this, statusCode, rawHeaders);
    return !this.#paused;
  }

  onData(chunk: Buffer): boolean {
    if (!this.#done) this.handler.onData(this, chunk);
    return !this.#paused;
  }

  onComplete(rawTrailers: RawHeaders | Record<string, string | string[]> | null): void {
    if (this.#done) return;
    this.#done = true;
    this.#release();
    // HTTP/1.1 hands over a list; undici's HTTP/2 client an object.
    this.handler.onEnd(this, rawTrailers == null ? EMPTY_RAW : Array.isArray(rawTrailers) ? rawTrailers as RawHeaders : objectToRaw(rawTrailers as Record<string, string | string[]>));
  }

  onError(err: Error): void {
    if (this.#done) return;
    this.#done = true;
    const endpoint = this.#host?.label;
    this.#release();
    const e = this.aborted && err === this.#abortErr ? this.abortError() : classify(err, this.clusterName, endpoint);
    this.handler.onError(this, e);
  }

  onUpgrade(): void {
    // Never asked for (no CONNECT or upgrade requests go through pools).
    this.onError(new Error('unexpected upgrade'));
  }
}

const EMPTY_RAW: RawHeaders = Object.freeze([]) as RawHeaders;

function objectToRaw(o: Record<string, string | string[] | undefined>): RawHeaders {
  const out: (string | string[])[] = [];
  for (const k of Object.keys(o)) {
    const v = o[k];
    if (v !== undefined) out.push(k, v);
  }
  return out;
}

/** Header name as text, lower-cased (HTTP/1.1 names arrive as Buffers in the peer's case). */
export function rawName(n: Buffer | string | (Buffer | string)[]): string {
  const s = typeof n === 'string' ? n : Array.isArray(n) ? String(n[0] ?? '') : n.toString('latin1');
  return s.toLowerCase();
}

/** Header value as text; a list (HTTP/2 set-cookie) as its entries. */
export function rawValue(v: Buffer | string | (Buffer | string)[]): string | string[] {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) return v.map((x) => (typeof x === 'string' ? x : x.toString('latin1')));
  return v.toString('latin1');
}

/** Raw header list -> object keyed by lower-case name; repeated names become arrays. */
export function rawHeadersToObject(raw: RawHeaders): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = Object.create(null) as Record<string, string | string[]>;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = rawName(raw[i]!);
    const v = rawValue(raw[i + 1]!);
    const cur = out[name];
    if (cur === undefined) out[name] = v;
    else if (Array.isArray(cur)) { if (Array.isArray(v)) cur.push(...v); else cur.push(v); }
    else out[name] = Array.isArray(v) ? [cur, ...v] : [cur, v];
  }
  return out;
}

/** Upstream TLS sessions, bounded; keyed by endpoint, SNI and the secure context used. */
const upstreamSessions = new Map<string, Buffer>();
const MAX_UPSTREAM_SESSIONS = 1024;

function rememberSession(key: string, sess: Buffer): void {
  upstreamSessions.delete(key);
  upstreamSessions.set(key, sess);
  if (upstreamSessions.size > MAX_UPSTREAM_SESSIONS) upstreamSessions.delete(upstreamSessions.keys().next().value as string);
}

const contextIds = new WeakMap<tls.SecureContext, number>();
let nextContextId = 1;
function contextId(c: tls.SecureContext): number {
  let id = contextIds.get(c);
  if (id === undefined) contextIds.set(c, (id = nextContextId++));
  return id;
}

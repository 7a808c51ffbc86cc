/**
 * Per-connection facts the listener learns (addresses, SNI, ALPN, TLS version, peer certificate)
 * and that later stages (HTTP routing, XFCC, access logs) need. Stored on the socket under a
 * symbol: the HTTP/2 compat API hands out a Proxy of the socket that forwards property reads, so
 * a symbol property is reachable from `req.socket` for both HTTP/1.1 and HTTP/2, where a WeakMap
 * keyed by the socket would not be.
 */
import { randomBytes, type X509Certificate } from 'node:crypto';

export const CONNECTION_INFO = Symbol.for('tlsgate.connectionInfo');

export interface ConnectionInfo {
  /** Unique per connection (see newConnectionId). */
  id: string;
  startMs: number;
  downstreamRemoteAddress: string;
  downstreamRemotePort: number;
  downstreamLocalAddress: string;
  downstreamLocalPort: number;
  listener: string;
  /** Filter chain name (Gateway server) that took the connection. */
  chain?: string;
  sni?: string;
  ech?: boolean;
  alpnOffered?: readonly string[];
  alpn?: string;
  tlsVersion?: string;
  cipher?: string;
  peerCertificate?: X509Certificate;
  /** Chain verified against the configured CA (false for OPTIONAL_MUTUAL + insecureSkipVerify with a bad cert). */
  peerCertificateVerified?: boolean;
  /** The load balancer that sent the PROXY header ("ip:port"), when one did. */
  proxyPeer?: string;
  /** Own identity (URI SAN) for XFCC By=, when the proxy has one. */
  localIdentity?: string;
  /**
   * Bytes read from the client before its socket existed (native accept reads the ClientHello,
   * then hands the socket over): counted in bytesReceived, since the socket's own count misses them.
   */
  preReadBytes?: number;
}

export function getConnectionInfo(socket: unknown): ConnectionInfo | undefined {
  if (socket === null || typeof socket !== 'object') return undefined;
  return (socket as Record<symbol, ConnectionInfo | undefined>)[CONNECTION_INFO];
}

export function setConnectionInfo(socket: object, info: ConnectionInfo): void {
  (socket as Record<symbol, ConnectionInfo>)[CONNECTION_INFO] = info;
}

/** Random per process, so ids from several workers or restarts do not collide. */
const ID_PREFIX = `${randomBytes(6).toString('hex')}-`;
let idSeq = 0;

/**
 * A connection id unique within this process run and, through the random prefix, across
 * processes: a counter rather than a UUID, because it is made for every accepted connection.
 */
export function newConnectionId(): string {
  idSeq++;
  return ID_PREFIX + idSeq.toString(36);
}

/**
 * Per-connection facts the listener learns (addresses, SNI, ALPN, TLS version, peer certificate)
 * and that later stages (HTTP routing, XFCC, access logs) need. Stored on the socket under a
 * symbol: the HTTP/2 compat API hands out a Proxy of the socket that forwards property reads, so
 * a symbol property is reachable from `req.socket` for both HTTP/1.1 and HTTP/2, where a WeakMap
 * keyed by the socket would not be.
 */
import type { X509Certificate } from 'node:crypto';

export const CONNECTION_INFO = Symbol.for('tlsgate.connectionInfo');

export interface ConnectionInfo {
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
  alpnOffered?: string[];
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
}

export function getConnectionInfo(socket: unknown): ConnectionInfo | undefined {
  if (socket === null || typeof socket !== 'object') return undefined;
  return (socket as Record<symbol, ConnectionInfo | undefined>)[CONNECTION_INFO];
}

export function setConnectionInfo(socket: object, info: ConnectionInfo): void {
  (socket as Record<symbol, ConnectionInfo>)[CONNECTION_INFO] = info;
}

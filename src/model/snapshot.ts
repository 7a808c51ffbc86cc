/**
 * The Snapshot: an immutable value in Envoy's vocabulary that the data plane runs.
 *
 *   Listener(address:port) -> FilterChain(match: SNI / transport / ALPN) -> filter
 *     filter = HttpConnectionManager (route table) | TcpProxy (weighted clusters)
 *   Cluster(endpoints, load balancing, upstream TLS)
 *   Secret(named certificate material, from files or inline PEM)
 *
 * The runtime imports only this module from model/: never YAML, never Istio resource types.
 * Every object carries `origin`, naming the Istio resource and field it came from, so logs,
 * metrics and `explain` can speak the user's language.
 */
import type { Diagnostic, ResourceRef } from '../config/diagnostics.js';

export type TlsVersion = 'TLSv1' | 'TLSv1.1' | 'TLSv1.2' | 'TLSv1.3';

/** Where a snapshot object came from, for logs, config_dump and explain. */
export interface Origin {
  resource: ResourceRef;
  /** Field path inside the resource, e.g. `spec.servers[0]` or `spec.http[2]`. */
  path: string;
}

// ---------------------------------------------------------------- secrets

/**
 * Named certificate material. translate decides *which* material a server or cluster uses;
 * runtime/pki loads, validates and watches it. Names are stable across snapshots so the
 * runtime can keep a loaded secret when nothing changed.
 */
export interface SecretSpec {
  name: string; // e.g. "file:/etc/certs/a.pem|/etc/certs/a.key" or "kubernetes://istio-system/httpbin-credential"
  source:
    | { kind: 'file'; certChainPath?: string; privateKeyPath?: string; caPath?: string; crlPath?: string }
    | { kind: 'inline'; certChain?: string; privateKey?: string; ca?: string; crl?: string }
    | { kind: 'system-roots' }
    | { kind: 'workload' } // the proxy's own mesh identity (ISTIO_MUTUAL)
    | { kind: 'mesh-roots' }; // the mesh CA bundle (ISTIO_MUTUAL)
  origin?: Origin;
}

// ---------------------------------------------------------------- downstream TLS

export interface DownstreamTlsContext {
  /** Istio mode this context implements (for logs/explain). */
  mode: 'SIMPLE' | 'MUTUAL' | 'OPTIONAL_MUTUAL' | 'ISTIO_MUTUAL';
  /** Secret names holding cert chain + key (one or two: RSA and ECDSA). */
  certificates: string[];
  /** Secret name holding the CA bundle for client certificates (MUTUAL / OPTIONAL_MUTUAL / ISTIO_MUTUAL). */
  validationCa?: string;
  /** Secret name holding a CRL for client certificates. */
  crl?: string;
  /** Ask for a client certificate (CertificateRequest). */
  requestClientCertificate: boolean;
  /** Refuse the handshake without a valid client certificate. */
  requireClientCertificate: boolean;
  /** OPTIONAL_MUTUAL + insecureSkipVerify: an invalid client cert is let through (and flagged). */
  allowInvalidClientCertificate: boolean;
  /** Client certificate checks after chain verification: any SAN in the list (exact). */
  matchSubjectAltNames: string[];
  /** base64 SHA-256 of the client SPKI; either list matching accepts. */
  verifyCertificateSpki: string[];
  /** lower-case hex SHA-256 of the client certificate DER, colons removed. */
  verifyCertificateHash: string[];
  minVersion: TlsVersion;
  maxVersion: TlsVersion;
  /** OpenSSL cipher names for TLS <= 1.2; empty = defaults. */
  cipherSuites: string[];
  ecdhCurves: string[];
  /** ALPN protocols offered, in preference order; empty = no ALPN. */
  alpn: string[];
}

// ---------------------------------------------------------------- HTTP

export type StringMatcher =
  | { kind: 'exact'; value: string; ignoreCase?: boolean }
  | { kind: 'prefix'; value: string; ignoreCase?: boolean }
  | { kind: 'regex'; value: string }
  | { kind: 'present' };

export interface HeaderMatcher {
  name: string; // lower-case
  matcher: StringMatcher;
  invert: boolean; // withoutHeaders
}

export interface RouteMatch {
  path?: StringMatcher;
  method?: StringMatcher;
  authority?: StringMatcher;
  scheme?: StringMatcher;
  headers: HeaderMatcher[];
  queryParams: { name: string; matcher: StringMatcher }[];
  /** Gateway server port the request arrived on, when the match names one. */
  port?: number;
}

export interface HeaderMutation {
  set: [string, string][];
  add: [string, string][];
  remove: string[];
}

export interface WeightedCluster {
  cluster: string; // Cluster name
  weight: number;
  requestHeaders?: HeaderMutation;
  responseHeaders?: HeaderMutation;
}

export interface RetryPolicy {
  attempts: number; // retries, not counting the first try
  perTryTimeoutMs?: number;
  retryOn: string[]; // Envoy conditions: 5xx, gateway-error, connect-failure, reset, retriable-4xx, refused-stream, or status codes
}

export type RouteAction =
  | {
      kind: 'route';
      clusters: WeightedCluster[];
      rewritePathPrefix?: string; // replace the matched prefix (prefix match) ...
      rewritePath?: string; // ... or the whole path
      rewriteRegex?: { pattern: string; substitution: string };
      rewriteAuthority?: string;
      timeoutMs?: number; // 0/undefined = none
      retry?: RetryPolicy;
    }
  | {
      kind: 'redirect';
      scheme?: string;
      authority?: string;
      port?: number;
      derivePort?: 'FROM_PROTOCOL_DEFAULT' | 'FROM_REQUEST_PORT';
      path?: string;
      code: number;
    }
  | { kind: 'direct'; status: number; body?: string; bodyBase64?: string };

export interface Route {
  name: string; // "<ns>/<vs>#http[i]"
  matches: RouteMatch[]; // OR; empty = match everything
  action: RouteAction;
  requestHeaders?: HeaderMutation;
  responseHeaders?: HeaderMutation;
  origin: Origin;
}

export interface VirtualHost {
  name: string;
  /** Lower-case host patterns: exact names, "*.suffix" wildcards, or "*". Ports stripped. */
  domains: string[];
  routes: Route[];
  /** httpsRedirect: every request gets a 301 to https. */
  requireTls: boolean;
}

export interface RouteConfiguration {
  name: string; // "http.80" or "https.443.<portName>.<gateway>.<ns>"
  virtualHosts: VirtualHost[];
}

export interface HttpConnectionManager {
  kind: 'http';
  routeConfig: RouteConfiguration;
  /** Scheme the downstream used: sets x-forwarded-proto and redirect defaults. */
  scheme: 'http' | 'https';
  /**
   * Host patterns served by *other* filter chains of this listener. A request whose Host matches
   * one of these (and no virtual host here) is answered 421 Misdirected Request.
   */
  misdirectedDomains: string[];
  /** XFCC handling (Envoy forward_client_cert_details). */
  forwardClientCertDetails: 'SANITIZE' | 'SANITIZE_SET' | 'APPEND_FORWARD';
  /** The proxy's own identity for XFCC By= (URI SAN), when it has one. */
  xfccBy?: string;
  /** Serve HTTP/2 too: by ALPN on TLS (the chain's ALPN list offers h2), with prior knowledge (h2c) on plaintext. */
  http2: boolean;
  /**
   * A sidecar's outbound proxy: requests arrive in absolute form (`GET http://host:port/path`,
   * the app's HTTP_PROXY); the authority's port (80 when absent) is the port routes match on.
   */
  forwardProxy?: boolean;
  /**
   * Sidecar outbound: how `CONNECT host:port` tunnels (the app's HTTPS_PROXY) are routed, in
   * order. A route with serverNames needs the tunnelled ClientHello's SNI; one with hosts is
   * chosen by the CONNECT target host.
   */
  connectRoutes?: ConnectTunnelRoute[];
}

export interface ConnectTunnelRoute {
  name: string;
  /** CONNECT target port; undefined = any. */
  port?: number;
  /** SNI patterns (VirtualService tls[].match[].sniHosts); empty = not chosen by SNI. */
  serverNames: string[];
  /** CONNECT target host patterns (tcp routes, ServiceEntry hosts); empty = not chosen by host. */
  hosts: string[];
  proxy: TcpProxy;
}

// ---------------------------------------------------------------- TCP

export interface TcpProxy {
  kind: 'tcp';
  name: string; // route name for logs, e.g. "istio-system/bookinfo-sni#tls[0]"
  clusters: WeightedCluster[];
  idleTimeoutMs: number;
  origin?: Origin;
}

/** The action of a filter chain that has no route: refuse (e.g. PASSTHROUGH server with no VS). */
export interface Reject {
  kind: 'reject';
  reason: string;
}

export type NetworkFilter = HttpConnectionManager | TcpProxy | Reject;

// ---------------------------------------------------------------- listeners

export interface FilterChainMatch {
  /** SNI patterns: exact or "*.suffix"; empty = any (including no SNI). */
  serverNames: string[];
  /** 'tls' = the first bytes were a ClientHello; 'raw_buffer' = they were not; undefined = either. */
  transportProtocol?: 'tls' | 'raw_buffer';
  /** ALPN offered by the client must include one of these; empty = any. */
  applicationProtocols: string[];
  /** Destination subnets (CIDRs) of the connection's local address; empty = any. */
  destinationSubnets?: string[];
}

export interface FilterChain {
  name: string; // e.g. "istio-system/mygateway/servers[0]" or "...#tls[0].match[1]"
  match: FilterChainMatch;
  /** Present when TLS is terminated on this chain. */
  tls?: DownstreamTlsContext;
  filter: NetworkFilter;
  origin?: Origin;
}

export interface Listener {
  name: string; // "<address>_<port>"
  address: string;
  port: number;
  /**
   * How the listener inspects the first bytes:
   * - 'tls-inspector': wait for a ClientHello (SNI/ALPN) before choosing a chain;
   * - 'none': plain protocol, the only chain is used at once (server-speaks-first works).
   */
  inspector: 'tls-inspector' | 'none';
  filterChains: FilterChain[];
  clientHelloTimeoutMs: number;
  maxClientHelloBytes: number;
  /** Which Istio servers produced this listener (for explain/config_dump). */
  origins: Origin[];
  /**
   * PROXY protocol (v1 or v2) required before the first bytes, accepted only from these
   * peers; anyone else is closed. From the Gateway annotations tlsgate.io/proxy-protocol*.
   */
  proxyProtocol?: { trustedCidrs: string[]; headerTimeoutMs: number };
}

// ---------------------------------------------------------------- clusters

export interface Endpoint {
  address: string; // IP or hostname (DNS resolution) or unix path
  port: number;
  weight: number;
  labels: Record<string, string>;
}

export interface UpstreamTlsContext {
  mode: 'SIMPLE' | 'MUTUAL' | 'ISTIO_MUTUAL';
  /** ISTIO_MUTUAL chosen by auto mTLS (endpoint labels), not by a DestinationRule. */
  autoMtls?: boolean;
  /** SNI to send; undefined with autoSni = the request's Host (HTTP) or nothing. */
  sni?: string;
  autoSni: boolean;
  /** Secret name of the CA bundle; 'system' roots when the secret source is system-roots. */
  validationCa: string;
  crl?: string;
  /** Secret with the client cert and key (MUTUAL / ISTIO_MUTUAL). */
  clientCertificate?: string;
  /** SANs the server certificate must present (any); empty = check the SNI/host name. */
  subjectAltNames: string[];
  /** With subjectAltNames empty: verify the server name against the SNI (or Host). */
  autoSanValidation: boolean;
  insecureSkipVerify: boolean;
  alpn: string[];
  minVersion: TlsVersion;
  maxVersion: TlsVersion;
}

export interface Cluster {
  name: string; // "outbound|<port>|<subset>|<host>"
  serviceHost: string;
  servicePort: number;
  subset?: string;
  /** How endpoint addresses are found. */
  discovery: 'STATIC' | 'DNS' | 'ORIGINAL_DST';
  endpoints: Endpoint[];
  lbPolicy: 'ROUND_ROBIN' | 'LEAST_REQUEST' | 'RANDOM';
  connectTimeoutMs: number;
  /**
   * Upstream HTTP protocol when the cluster carries HTTP. 'downstream' follows each request's
   * downstream protocol: HTTP/2 in, HTTP/2 out (h2c with prior knowledge on plaintext); HTTP/1.1
   * in, HTTP/1.1 out (Envoy's use_downstream_protocol_config, as Istio's inbound clusters use).
   */
  httpProtocol: 'http1' | 'h2' | 'downstream';
  tls?: UpstreamTlsContext;
  /** Send a PROXY protocol header on each upstream connection (DestinationRule annotation). */
  proxyProtocol?: 'v1' | 'v2';
  /**
   * Set on the stand-in for a Gateway API backendRef that did not resolve: the share of requests
   * (500) or connections (closed) the weights send to it fails, as the Gateway API requires,
   * instead of going to the valid backends. The text says why.
   */
  invalidBackend?: string;
  limits: {
    maxConnections?: number;
    maxPendingRequests?: number;
    maxRequests?: number;
    maxRequestsPerConnection?: number;
    idleTimeoutMs?: number;
    /**
     * TCP proxying toward this cluster: no bytes either way for this long closes both sides
     * (DestinationRule connectionPool.tcp.idleTimeout; 0 = never). Overrides TcpProxy.idleTimeoutMs.
     */
    tcpIdleTimeoutMs?: number;
  };
  /**
   * TCP keep-alive on every upstream connection (DestinationRule connectionPool.tcp.tcpKeepalive):
   * SO_KEEPALIVE, and each value given (whole seconds, a probe count); one left out keeps the
   * OS default. Absent: no keep-alive, as Envoy and Istio do by default.
   */
  tcpKeepalive?: { timeS?: number; intervalS?: number; probes?: number };
  origin?: Origin;
}

// ---------------------------------------------------------------- the whole

export interface ResourceStatus {
  resource: ResourceRef;
  state: 'ok' | 'warning' | 'disabled';
  messages: string[];
}

export interface Snapshot {
  /** Monotonic per process; assigned by the lifecycle, 0 in translate output. */
  generation: number;
  listeners: Listener[];
  clusters: Record<string, Cluster>;
  secrets: Record<string, SecretSpec>;
  statuses: ResourceStatus[];
  diagnostics: Diagnostic[];
}

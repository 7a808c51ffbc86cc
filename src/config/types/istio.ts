/**
 * Istio resource specs (networking.istio.io v1/v1beta1/v1alpha3 share one schema;
 * security.istio.io v1/v1beta1). Field names are Istio's YAML names. Enums are the exact strings
 * Istio accepts. Optional everywhere the proto is optional; the loader's schema has already
 * checked types, so translate can trust these shapes.
 */

export const SERVER_TLS_MODES = ['PASSTHROUGH', 'SIMPLE', 'MUTUAL', 'AUTO_PASSTHROUGH', 'ISTIO_MUTUAL', 'OPTIONAL_MUTUAL'] as const;
export type ServerTlsMode = typeof SERVER_TLS_MODES[number];

export const CLIENT_TLS_MODES = ['DISABLE', 'SIMPLE', 'MUTUAL', 'ISTIO_MUTUAL'] as const;
export type ClientTlsMode = typeof CLIENT_TLS_MODES[number];

export const TLS_PROTOCOL_VERSIONS = ['TLS_AUTO', 'TLSV1_0', 'TLSV1_1', 'TLSV1_2', 'TLSV1_3'] as const;
export type TlsProtocolVersion = typeof TLS_PROTOCOL_VERSIONS[number];

/** Port protocols, upper-cased (Istio parses them case-insensitively). */
export const PORT_PROTOCOLS = ['HTTP', 'HTTPS', 'GRPC', 'GRPC-WEB', 'HTTP2', 'HTTP_PROXY', 'MONGO', 'TCP', 'TLS', 'REDIS', 'MYSQL', 'UDP'] as const;
export type PortProtocol = typeof PORT_PROTOCOLS[number];

export const LB_SIMPLE = ['UNSPECIFIED', 'LEAST_CONN', 'RANDOM', 'PASSTHROUGH', 'ROUND_ROBIN', 'LEAST_REQUEST'] as const;
export type LbSimple = typeof LB_SIMPLE[number];

export const SE_LOCATIONS = ['MESH_EXTERNAL', 'MESH_INTERNAL'] as const;
export const SE_RESOLUTIONS = ['NONE', 'STATIC', 'DNS', 'DNS_ROUND_ROBIN', 'DYNAMIC_DNS'] as const;
export type SeResolution = typeof SE_RESOLUTIONS[number];

export const PEER_AUTH_MODES = ['UNSET', 'DISABLE', 'PERMISSIVE', 'STRICT'] as const;
export type PeerAuthMode = typeof PEER_AUTH_MODES[number];

// ---------------------------------------------------------------- Gateway

export interface GatewaySpec {
  selector?: Record<string, string>;
  servers?: Server[];
}

export interface Server {
  port: GatewayPort;
  hosts: string[];
  tls?: ServerTlsSettings;
  bind?: string;
  name?: string;
  defaultEndpoint?: string;
}

export interface GatewayPort {
  number: number;
  protocol: string; // case-insensitive PortProtocol
  name: string;
  targetPort?: number;
}

export interface ServerTlsSettings {
  httpsRedirect?: boolean;
  mode?: ServerTlsMode; // omitted = PASSTHROUGH (proto default)
  serverCertificate?: string;
  privateKey?: string;
  caCertificates?: string;
  caCrl?: string;
  credentialName?: string;
  credentialNames?: string[];
  caCertCredentialName?: string;
  tlsCertificates?: { serverCertificate?: string; privateKey?: string; caCertificates?: string }[];
  subjectAltNames?: string[];
  verifyCertificateSpki?: string[];
  verifyCertificateHash?: string[];
  minProtocolVersion?: TlsProtocolVersion;
  maxProtocolVersion?: TlsProtocolVersion;
  cipherSuites?: string[];
  ecdhCurves?: string[];
  insecureSkipVerify?: boolean;
}

// ---------------------------------------------------------------- VirtualService

export interface StringMatch {
  exact?: string;
  prefix?: string;
  regex?: string;
}

export interface VirtualServiceSpec {
  hosts?: string[];
  gateways?: string[];
  http?: HttpRoute[];
  tls?: TlsRoute[];
  tcp?: TcpRoute[];
  exportTo?: string[];
}

export interface PortSelector {
  number?: number;
}

export interface Destination {
  host: string;
  subset?: string;
  port?: PortSelector;
}

export interface HeaderOperations {
  set?: Record<string, string>;
  add?: Record<string, string>;
  remove?: string[];
}

export interface Headers {
  request?: HeaderOperations;
  response?: HeaderOperations;
}

export interface HttpRouteDestination {
  destination: Destination;
  weight?: number;
  headers?: Headers;
}

export interface HttpMatchRequest {
  name?: string;
  uri?: StringMatch;
  scheme?: StringMatch;
  method?: StringMatch;
  authority?: StringMatch;
  headers?: Record<string, StringMatch>;
  withoutHeaders?: Record<string, StringMatch>;
  queryParams?: Record<string, StringMatch>;
  ignoreUriCase?: boolean;
  port?: number;
  gateways?: string[];
  sourceLabels?: Record<string, string>;
  sourceNamespace?: string;
  statPrefix?: string;
}

export interface HttpRedirect {
  uri?: string;
  authority?: string;
  port?: number;
  derivePort?: 'FROM_PROTOCOL_DEFAULT' | 'FROM_REQUEST_PORT';
  scheme?: string;
  redirectCode?: number;
}

export interface HttpRewrite {
  uri?: string;
  authority?: string;
  uriRegexRewrite?: { match: string; rewrite: string };
}

export interface HttpRetry {
  attempts?: number;
  perTryTimeout?: string;
  retryOn?: string;
  retryRemoteLocalities?: boolean;
  retryIgnorePreviousHosts?: boolean;
  backoff?: string;
}

export interface HttpDirectResponse {
  status: number;
  body?: { string?: string; bytes?: string };
}

export interface HttpRoute {
  name?: string;
  match?: HttpMatchRequest[];
  route?: HttpRouteDestination[];
  redirect?: HttpRedirect;
  directResponse?: HttpDirectResponse;
  delegate?: { name?: string; namespace?: string };
  rewrite?: HttpRewrite;
  timeout?: string;
  retries?: HttpRetry;
  fault?: unknown;
  mirror?: Destination;
  mirrors?: unknown[];
  mirrorPercentage?: { value?: number };
  mirrorPercent?: number;
  corsPolicy?: unknown;
  headers?: Headers;
}

export interface RouteDestination {
  destination: Destination;
  weight?: number;
}

export interface TlsMatchAttributes {
  sniHosts: string[];
  destinationSubnets?: string[];
  port?: number;
  sourceLabels?: Record<string, string>;
  gateways?: string[];
  sourceNamespace?: string;
}

export interface TlsRoute {
  match: TlsMatchAttributes[];
  route: RouteDestination[];
}

export interface L4MatchAttributes {
  destinationSubnets?: string[];
  port?: number;
  sourceLabels?: Record<string, string>;
  gateways?: string[];
  sourceNamespace?: string;
}

export interface TcpRoute {
  match?: L4MatchAttributes[];
  route: RouteDestination[];
}

// ---------------------------------------------------------------- DestinationRule

export interface ClientTlsSettings {
  mode?: ClientTlsMode; // omitted = DISABLE
  clientCertificate?: string;
  privateKey?: string;
  caCertificates?: string;
  caCrl?: string;
  credentialName?: string;
  subjectAltNames?: string[];
  sni?: string;
  insecureSkipVerify?: boolean;
}

export interface LoadBalancerSettings {
  simple?: LbSimple;
  consistentHash?: unknown;
  localityLbSetting?: unknown;
  warmupDurationSecs?: string;
  warmup?: unknown;
}

export interface ConnectionPoolSettings {
  tcp?: {
    maxConnections?: number;
    connectTimeout?: string;
    tcpKeepalive?: { probes?: number; time?: string; interval?: string };
    maxConnectionDuration?: string;
    idleTimeout?: string;
  };
  http?: {
    http1MaxPendingRequests?: number;
    http2MaxRequests?: number;
    maxRequestsPerConnection?: number;
    maxRetries?: number;
    idleTimeout?: string;
    h2UpgradePolicy?: 'DEFAULT' | 'DO_NOT_UPGRADE' | 'UPGRADE';
    useClientProtocol?: boolean;
    maxConcurrentStreams?: number;
  };
}

export interface PortTrafficPolicy {
  port?: PortSelector;
  loadBalancer?: LoadBalancerSettings;
  connectionPool?: ConnectionPoolSettings;
  outlierDetection?: unknown;
  tls?: ClientTlsSettings;
}

export interface TrafficPolicy {
  loadBalancer?: LoadBalancerSettings;
  connectionPool?: ConnectionPoolSettings;
  outlierDetection?: unknown;
  tls?: ClientTlsSettings;
  portLevelSettings?: PortTrafficPolicy[];
  tunnel?: unknown;
  proxyProtocol?: unknown;
}

export interface Subset {
  name: string;
  labels?: Record<string, string>;
  trafficPolicy?: TrafficPolicy;
}

export interface DestinationRuleSpec {
  host: string;
  trafficPolicy?: TrafficPolicy;
  subsets?: Subset[];
  exportTo?: string[];
  workloadSelector?: { matchLabels?: Record<string, string> };
}

// ---------------------------------------------------------------- ServiceEntry / WorkloadEntry

export interface ServicePort {
  number: number;
  protocol?: string;
  name: string;
  targetPort?: number;
}

export interface WorkloadEntrySpec {
  address?: string;
  ports?: Record<string, number>;
  labels?: Record<string, string>;
  network?: string;
  locality?: string;
  weight?: number;
  serviceAccount?: string;
}

export interface ServiceEntrySpec {
  hosts: string[];
  addresses?: string[];
  ports?: ServicePort[];
  location?: typeof SE_LOCATIONS[number];
  resolution?: SeResolution;
  endpoints?: WorkloadEntrySpec[];
  workloadSelector?: { labels?: Record<string, string> };
  exportTo?: string[];
  subjectAltNames?: string[];
}

// ---------------------------------------------------------------- PeerAuthentication

export interface PeerAuthenticationSpec {
  selector?: { matchLabels?: Record<string, string> };
  mtls?: { mode?: PeerAuthMode };
  portLevelMtls?: Record<string, { mode?: PeerAuthMode }>;
}

/**
 * The sidecar's outbound side: an HTTP forward proxy the application reaches through
 * HTTP_PROXY. It serves what Istio's sidecars serve for outbound HTTP:
 * - VirtualServices that apply to `mesh` (no `gateways`, or `gateways` naming `mesh`), in Istio
 *   order, with `match.port` compared against the port the application addressed;
 * - then, for every ServiceEntry host and HTTP port, the service itself (Istio's default route),
 *   so a ServiceEntry alone makes a host reachable, with its DestinationRule (TLS origination,
 *   load balancing) applied.
 * Destinations with no port and no ServiceEntry use port 80.
 */
import type { Cluster, ConnectTunnelRoute, DownstreamTlsContext, FilterChain, HttpConnectionManager, Listener, Route, TcpProxy, VirtualHost } from '../snapshot.js';
import type { PeerAuthMode } from '../../config/types/istio.js';
import type { ClusterBuilder } from './clusters.js';
import type { TranslateContext } from './context.js';
import { byAge } from './gateways.js';
import { buildHttpRoutes, matchApplies, normaliseGateways } from './http-routes.js';
import { fqdn } from './hosts.js';

const HTTP_PORT_PROTOCOLS = new Set(['HTTP', 'HTTP2', 'GRPC', 'GRPC-WEB', '']);

export interface SidecarOptions {
  outboundAddress: string;
  outboundPort: number;
}

function visible(exportTo: string[] | undefined, ownNs: string, proxyNs: string): boolean {
  if (!exportTo || exportTo.length === 0) return true;
  return exportTo.some((x) => x === '*' || x === proxyNs || (x === '.' && ownNs === proxyNs));
}

export function buildSidecarOutbound(ctx: TranslateContext, clusters: ClusterBuilder, opts: SidecarOptions): Listener {
  const proxyNs = ctx.options.proxyNamespace;
  const byDomain = new Map<string, VirtualHost>();
  const order: string[] = [];
  const add = (domains: string[], routes: Route[]) => {
    for (const d of domains) {
      let vh = byDomain.get(d);
      if (!vh) {
        vh = { name: d, domains: [d], routes: [], requireTls: false };
        byDomain.set(d, vh);
        order.push(d);
      }
      vh.routes.push(...routes);
    }
  };
  const hostNames = (h: string, ns: string): string[] => {
    const l = h.toLowerCase();
    const f = fqdn(l, ns);
    return f === l ? [l] : [l, f];
  };

  for (const vs of [...ctx.resources.virtualServices].sort(byAge)) {
    const gws = normaliseGateways(vs.spec.gateways, vs.metadata.namespace);
    if (!gws.includes('mesh') || !visible(vs.spec.exportTo, vs.metadata.namespace, proxyNs)) continue;
    if (!vs.spec.http?.length) continue;
    const routes = buildHttpRoutes(ctx, clusters, vs, { gatewayKey: 'mesh', port: undefined, vsGateways: gws }, 80);
    add((vs.spec.hosts ?? []).flatMap((h) => hostNames(h, vs.metadata.namespace)), routes);
  }

  for (const se of [...ctx.resources.serviceEntries].sort(byAge)) {
    if (!visible(se.spec.exportTo, se.metadata.namespace, proxyNs)) continue;
    for (const host of se.spec.hosts) {
      const routes: Route[] = [];
      for (const p of se.spec.ports ?? []) {
        if (!HTTP_PORT_PROTOCOLS.has((p.protocol ?? '').toUpperCase())) continue;
        const cluster = clusters.clusterFor({
          owner: se, path: 'spec.ports', destination: { host, port: { number: p.number } }, carries: 'http',
        });
        if (!cluster) continue;
        routes.push({
          name: `${se.metadata.namespace}/${se.metadata.name}#${host}:${p.number}`,
          matches: [{ headers: [], queryParams: [], port: p.number }],
          action: { kind: 'route', clusters: [{ cluster, weight: 100 }], retry: { attempts: 2, retryOn: ['connect-failure', 'refused-stream', 'unavailable', 'cancelled', '503'] } },
          origin: ctx.origin(se, 'spec.hosts'),
        });
      }
      if (routes.length) add(hostNames(host, se.metadata.namespace), routes);
    }
  }

  const hcm: HttpConnectionManager = {
    kind: 'http',
    routeConfig: { name: 'outbound', virtualHosts: order.map((d) => byDomain.get(d)!) },
    scheme: 'http',
    misdirectedDomains: [],
    forwardClientCertDetails: 'SANITIZE',
    // h2c too (gRPC clients): an HTTP/2 request names its destination in :authority.
    http2: true,
    forwardProxy: true,
    connectRoutes: connectRoutes(ctx, clusters),
  };
  const chain: FilterChain = { name: 'sidecar-outbound', match: { serverNames: [], applicationProtocols: [] }, filter: hcm };
  return {
    name: `${opts.outboundAddress}_${opts.outboundPort}`,
    address: opts.outboundAddress,
    port: opts.outboundPort,
    inspector: 'none',
    filterChains: [chain],
    clientHelloTimeoutMs: ctx.options.clientHelloTimeoutMs,
    maxClientHelloBytes: ctx.options.maxClientHelloBytes,
    origins: [],
  };
}

const TUNNEL_PORT_PROTOCOLS = new Set(['HTTPS', 'TLS', 'TCP', 'MONGO', 'REDIS', 'MYSQL']);

/** CONNECT tunnels: mesh VirtualService tls[] (by SNI) and tcp[] (by host), then ServiceEntry ports. */
function connectRoutes(ctx: TranslateContext, clusters: ClusterBuilder): ConnectTunnelRoute[] {
  const proxyNs = ctx.options.proxyNamespace;
  const out: ConnectTunnelRoute[] = [];
  for (const vs of [...ctx.resources.virtualServices].sort(byAge)) {
    const gws = normaliseGateways(vs.spec.gateways, vs.metadata.namespace);
    if (!gws.includes('mesh') || !visible(vs.spec.exportTo, vs.metadata.namespace, proxyNs)) continue;
    const scope = { gatewayKey: 'mesh', port: undefined, vsGateways: gws };
    const hosts = (vs.spec.hosts ?? []).flatMap((h) => [h.toLowerCase(), fqdn(h.toLowerCase(), vs.metadata.namespace)]);
    (vs.spec.tls ?? []).forEach((tr, i) => {
      tr.match.forEach((m, j) => {
        if (!matchApplies(m, vs.metadata.namespace, scope)) return;
        const proxy = tunnelProxy(ctx, clusters, vs, `spec.tls[${i}]`, tr.route, m.port);
        if (!proxy) return;
        const r: ConnectTunnelRoute = { name: `${vs.metadata.namespace}/${vs.metadata.name}#tls[${i}].match[${j}]`, serverNames: m.sniHosts.map((x) => x.toLowerCase()), hosts: [], proxy };
        if (m.port !== undefined) r.port = m.port;
        out.push(r);
      });
    });
    (vs.spec.tcp ?? []).forEach((tr, i) => {
      const matches = tr.match?.length ? tr.match.filter((m) => matchApplies(m, vs.metadata.namespace, scope)) : [{} as { port?: number }];
      for (const m of matches) {
        const proxy = tunnelProxy(ctx, clusters, vs, `spec.tcp[${i}]`, tr.route, m.port);
        if (!proxy) continue;
        const r: ConnectTunnelRoute = { name: `${vs.metadata.namespace}/${vs.metadata.name}#tcp[${i}]`, serverNames: [], hosts, proxy };
        if (m.port !== undefined) r.port = m.port;
        out.push(r);
      }
    });
  }
  for (const se of [...ctx.resources.serviceEntries].sort(byAge)) {
    if (!visible(se.spec.exportTo, se.metadata.namespace, proxyNs)) continue;
    for (const p of se.spec.ports ?? []) {
      if (!TUNNEL_PORT_PROTOCOLS.has((p.protocol ?? '').toUpperCase())) continue;
      for (const host of se.spec.hosts) {
        const cluster = clusters.clusterFor({ owner: se, path: 'spec.ports', destination: { host, port: { number: p.number } }, carries: 'tcp' });
        if (!cluster) continue;
        out.push({
          name: `${se.metadata.namespace}/${se.metadata.name}#${host}:${p.number}`,
          port: p.number,
          serverNames: [],
          hosts: [host.toLowerCase()],
          proxy: { kind: 'tcp', name: `${se.metadata.namespace}/${se.metadata.name}#${host}:${p.number}`, clusters: [{ cluster, weight: 100 }], idleTimeoutMs: ctx.options.tcpIdleTimeoutMs },
        });
      }
    }
  }
  return out;
}

function tunnelProxy(ctx: TranslateContext, clusters: ClusterBuilder, vs: { metadata: { namespace: string; name: string } } & Parameters<ClusterBuilder['clusterFor']>[0]['owner'],
  path: string, route: { destination: { host: string; subset?: string; port?: { number?: number } }; weight?: number }[], port: number | undefined): TcpProxy | undefined {
  const anyWeight = route.some((d) => d.weight !== undefined);
  const weighted = [];
  for (let k = 0; k < route.length; k++) {
    const d = route[k]!;
    const c = clusters.clusterFor({ owner: vs, path: `${path}.route[${k}].destination`, destination: d.destination, ...(port !== undefined ? { fallbackPort: port } : { fallbackPort: 443 }), carries: 'tcp' });
    if (!c) return undefined;
    weighted.push({ cluster: c, weight: route.length === 1 ? 100 : anyWeight ? (d.weight ?? 0) : 1 });
  }
  return { kind: 'tcp', name: `${vs.metadata.namespace}/${vs.metadata.name}#${path.replace('spec.', '')}`, clusters: weighted, idleTimeoutMs: ctx.options.tcpIdleTimeoutMs };
}

/**
 * PeerAuthentication for this workload and port, with Istio's precedence: a policy selecting
 * the workload (its namespace) > the namespace-wide policy > the mesh-wide policy in the root
 * namespace; UNSET inherits; nothing at all means PERMISSIVE. portLevelMtls applies to
 * workload-selecting policies, keyed by the application (container) port.
 */
export function effectivePeerAuthentication(ctx: TranslateContext, appPort: number): { mode: Exclude<PeerAuthMode, 'UNSET'>; from: string } {
  const ns = ctx.options.proxyNamespace;
  const labels = ctx.options.labels ?? {};
  const pas = [...ctx.resources.peerAuthentications].sort(byAge);
  const selects = (sel: Record<string, string> | undefined) => sel !== undefined && Object.keys(sel).length > 0 && Object.entries(sel).every(([k, v]) => labels[k] === v);
  const workload = pas.find((p) => p.metadata.namespace === ns && selects(p.spec.selector?.matchLabels));
  const nsWide = pas.find((p) => p.metadata.namespace === ns && !Object.keys(p.spec.selector?.matchLabels ?? {}).length);
  const mesh = pas.find((p) => p.metadata.namespace === 'istio-system' && !Object.keys(p.spec.selector?.matchLabels ?? {}).length);
  const layers: [string, PeerAuthMode | undefined][] = [];
  if (workload) {
    layers.push([`${workload.metadata.namespace}/${workload.metadata.name} portLevelMtls[${appPort}]`, workload.spec.portLevelMtls?.[String(appPort)]?.mode]);
    layers.push([`${workload.metadata.namespace}/${workload.metadata.name}`, workload.spec.mtls?.mode]);
  }
  if (nsWide) layers.push([`${nsWide.metadata.namespace}/${nsWide.metadata.name}`, nsWide.spec.mtls?.mode]);
  if (mesh) layers.push([`${mesh.metadata.namespace}/${mesh.metadata.name}`, mesh.spec.mtls?.mode]);
  for (const [from, mode] of layers) if (mode && mode !== 'UNSET') return { mode, from };
  return { mode: 'PERMISSIVE', from: 'default' };
}

const MTLS_HTTP_ALPN = ['istio-http/1.0', 'istio-http/1.1', 'istio-h2'];
const MTLS_TCP_ALPN = ['istio-peer-exchange', 'istio'];

/**
 * The sidecar's inbound side on --inbound-port: Istio mTLS from other sidecars is terminated and
 * forwarded in plaintext to 127.0.0.1:<app-port> (HTTP gets XFCC with both identities, and goes
 * to the app in the protocol it arrived in: HTTP/2 as h2c, HTTP/1.1 as HTTP/1.1);
 * PERMISSIVE also accepts plaintext and passes an app's own TLS through; STRICT accepts only
 * mTLS; DISABLE only plaintext (and TLS it does not terminate).
 */
export function buildSidecarInbound(ctx: TranslateContext, inbound: { address: string; port: number; appPort: number }): { listener: Listener; cluster: Cluster } {
  const pa = effectivePeerAuthentication(ctx, inbound.appPort);
  const clusterName = `inbound|${inbound.appPort}||`;
  const cluster: Cluster = {
    name: clusterName, serviceHost: '127.0.0.1', servicePort: inbound.appPort, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port: inbound.appPort, weight: 1, labels: {} }],
    // A gRPC app gets the HTTP/2 its callers sent, an HTTP/1.1 app the HTTP/1.1 (as Istio does).
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: ctx.options.connectTimeoutMs, httpProtocol: 'downstream', limits: {},
  };
  const tcp: TcpProxy = { kind: 'tcp', name: `inbound|${inbound.appPort}`, clusters: [{ cluster: clusterName, weight: 100 }], idleTimeoutMs: ctx.options.tcpIdleTimeoutMs };
  const mtls = (alpn: string[]): DownstreamTlsContext => ({
    mode: 'ISTIO_MUTUAL',
    certificates: [ctx.addSecret({ name: 'workload', source: { kind: 'workload' } })],
    validationCa: ctx.addSecret({ name: 'mesh-roots', source: { kind: 'mesh-roots' } }),
    requestClientCertificate: true, requireClientCertificate: true, allowInvalidClientCertificate: false,
    matchSubjectAltNames: [], verifyCertificateSpki: [], verifyCertificateHash: [],
    minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3', cipherSuites: [], ecdhCurves: [], alpn,
  });
  const hcm: HttpConnectionManager = {
    kind: 'http',
    routeConfig: {
      name: `inbound|${inbound.appPort}`,
      virtualHosts: [{
        name: 'inbound', domains: ['*'], requireTls: false,
        routes: [{ name: `inbound|${inbound.appPort}`, matches: [], action: { kind: 'route', clusters: [{ cluster: clusterName, weight: 100 }] }, origin: { resource: { kind: 'Sidecar', namespace: ctx.options.proxyNamespace, name: 'inbound' }, path: `port ${inbound.appPort}` } }],
      }],
    },
    scheme: 'http',
    misdirectedDomains: [],
    forwardClientCertDetails: 'APPEND_FORWARD',
    http2: true,
  };
  if (ctx.options.identity) hcm.xfccBy = ctx.options.identity;
  const chains: FilterChain[] = [];
  const tag = `peerauthentication=${pa.mode} (${pa.from})`;
  if (pa.mode !== 'DISABLE') {
    chains.push({ name: `inbound mtls http; ${tag}`, match: { serverNames: [], transportProtocol: 'tls', applicationProtocols: MTLS_HTTP_ALPN }, tls: mtls(['istio-h2', 'istio-http/1.1', 'istio-http/1.0']), filter: hcm });
    chains.push({ name: `inbound mtls tcp; ${tag}`, match: { serverNames: [], transportProtocol: 'tls', applicationProtocols: MTLS_TCP_ALPN }, tls: mtls(MTLS_TCP_ALPN), filter: tcp });
  }
  if (pa.mode !== 'STRICT') {
    chains.push({ name: `inbound tls passthrough; ${tag}`, match: { serverNames: [], transportProtocol: 'tls', applicationProtocols: [] }, filter: tcp });
    chains.push({ name: `inbound plaintext; ${tag}`, match: { serverNames: [], transportProtocol: 'raw_buffer', applicationProtocols: [] }, filter: tcp });
  }
  return {
    cluster,
    listener: {
      name: `${inbound.address}_${inbound.port}`,
      address: inbound.address,
      port: inbound.port,
      inspector: 'tls-inspector',
      filterChains: chains,
      clientHelloTimeoutMs: ctx.options.clientHelloTimeoutMs,
      maxClientHelloBytes: ctx.options.maxClientHelloBytes,
      origins: [],
    },
  };
}

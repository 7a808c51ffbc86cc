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
import type { FilterChain, HttpConnectionManager, Listener, Route, VirtualHost } from '../snapshot.js';
import type { ClusterBuilder } from './clusters.js';
import type { TranslateContext } from './context.js';
import { byAge } from './gateways.js';
import { buildHttpRoutes, normaliseGateways } from './http-routes.js';
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
    http2: false,
    forwardProxy: true,
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

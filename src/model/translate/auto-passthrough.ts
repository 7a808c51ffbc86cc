/**
 * AUTO_PASSTHROUGH servers (Istio's multi-network / east-west gateways): no VirtualService is
 * involved; the client (a sidecar in another network) names the destination in its SNI as
 * `outbound_.<port>_.<subset>_.<host>` and the gateway forwards the still-encrypted mTLS stream
 * to that service, subset and port. Only mesh-internal services covered by the server hosts are
 * reachable, and only for clients offering one of Istio's mTLS ALPN values, so a plain TLS client
 * that happens to guess a name is not let in.
 */
import type { DestinationRuleResource, ServiceEntryResource } from '../../config/resource.js';
import type { FilterChain, TcpProxy } from '../snapshot.js';
import type { ClusterBuilder } from './clusters.js';
import type { Locatable, TranslateContext } from './context.js';
import { fqdn, hostSubsetOf } from './hosts.js';

/** ALPN values Istio's sidecars send on mesh mTLS connections. */
export const ISTIO_MTLS_ALPN: readonly string[] = ['istio', 'istio-peer-exchange', 'istio-http/1.0', 'istio-http/1.1', 'istio-h2'];

/** The SNI an Istio client sends for a service port (and subset; empty = none). */
export function autoPassthroughSni(port: number, subset: string, host: string): string {
  return `outbound_.${port}_.${subset || ''}_.${host}`;
}

export interface AutoPassthroughServer {
  /** The Gateway, for diagnostics and origins. */
  gw: Locatable;
  gwNamespace: string;
  gwKey: string;
  path: string;
  port: number;
  /** Server hosts, split into namespace and host pattern. */
  hosts: readonly { ns: string; host: string }[];
}

function exportedTo(exportTo: string[] | undefined, owner: string, ns: string): boolean {
  if (!exportTo || exportTo.length === 0) return true;
  return exportTo.some((x) => x === '*' || x === ns || (x === '.' && owner === ns));
}

/** The server host entry that covers a ServiceEntry host, if any. */
function covered(server: AutoPassthroughServer, se: ServiceEntryResource, host: string): boolean {
  return server.hosts.some((h) => {
    if (h.ns !== '*' && (h.ns === '.' ? se.metadata.namespace !== server.gwNamespace : se.metadata.namespace !== h.ns)) return false;
    return hostSubsetOf(host, h.host);
  });
}

function destinationRuleFor(ctx: TranslateContext, host: string, seNs: string): DestinationRuleResource | undefined {
  let best: DestinationRuleResource | undefined;
  for (const dr of ctx.resources.destinationRules) {
    if (dr.spec.workloadSelector) continue;
    const h = fqdn(dr.spec.host.toLowerCase(), dr.metadata.namespace);
    if (h === host || dr.spec.host.toLowerCase() === host || h === fqdn(host, seNs)) return dr;
    if (h.startsWith('*.') && hostSubsetOf(host, h) && (!best || h.length > fqdn(best.spec.host, best.metadata.namespace).length)) best = dr;
  }
  return best;
}

/**
 * Passthrough chains for one AUTO_PASSTHROUGH server. `claimed` is the per-port SNI registry
 * shared with the other TLS servers of the listener (a name is served once).
 */
export function autoPassthroughChains(ctx: TranslateContext, clusters: ClusterBuilder, server: AutoPassthroughServer, claimed: Map<string, string>): FilterChain[] {
  const chains: FilterChain[] = [];
  const who = `${server.gwKey} ${server.path}`;
  const ses = [...ctx.resources.serviceEntries].sort((a, b) => (a.metadata.namespace + '/' + a.metadata.name < b.metadata.namespace + '/' + b.metadata.name ? -1 : 1));
  for (const se of ses) {
    if ((se.spec.location ?? 'MESH_EXTERNAL') !== 'MESH_INTERNAL') continue;
    if (!exportedTo(se.spec.exportTo, se.metadata.namespace, server.gwNamespace)) continue;
    se.spec.hosts.forEach((raw) => {
      const host = raw.toLowerCase();
      // A wildcard host names no single service an SNI could point at.
      if (host.startsWith('*') || !covered(server, se, host)) return;
      const dr = destinationRuleFor(ctx, host, se.metadata.namespace);
      const subsets = ['', ...(dr?.spec.subsets ?? []).map((s) => s.name)];
      (se.spec.ports ?? []).forEach((p, pi) => {
        for (const subset of subsets) {
          const sni = autoPassthroughSni(p.number, subset, host);
          if (claimed.has(sni)) {
            ctx.warn('TG3016', se, `spec.hosts`, `SNI "${sni}" on port ${server.port} is already claimed by ${claimed.get(sni)}; the AUTO_PASSTHROUGH route of ${who} is skipped`);
            continue;
          }
          const name = clusters.clusterFor({
            owner: se,
            path: `spec.ports[${pi}]`,
            destination: { host, port: { number: p.number }, ...(subset ? { subset } : {}) },
            carries: 'tcp',
          });
          if (!name) continue;
          const cluster = sniDnatCluster(clusters, name, sni);
          claimed.set(sni, who);
          const proxy: TcpProxy = {
            kind: 'tcp',
            name: `${server.gwKey}/${server.path}#auto_passthrough`,
            clusters: [{ cluster, weight: 100 }],
            idleTimeoutMs: ctx.options.tcpIdleTimeoutMs,
            origin: ctx.origin(server.gw, server.path),
          };
          chains.push({
            name: `${server.gwKey}/${server.path}#${sni}`,
            match: { serverNames: [sni], transportProtocol: 'tls', applicationProtocols: [...ISTIO_MTLS_ALPN] },
            filter: proxy,
            origin: ctx.origin(se, `spec.ports[${pi}]`),
          });
        }
      });
    });
  }
  return chains;
}

/**
 * The client's own mTLS session passes through untouched, so the cluster must not originate TLS
 * again. When the regular cluster does (a DestinationRule, auto mTLS), a copy without TLS is
 * registered under Istio's SNI-DNAT cluster name (the SNI itself).
 */
function sniDnatCluster(clusters: ClusterBuilder, name: string, sni: string): string {
  const c = clusters.clusters[name];
  if (!c || !c.tls) return name;
  if (!clusters.clusters[sni]) {
    const { tls: _tls, ...rest } = c;
    clusters.clusters[sni] = { ...rest, name: sni };
  }
  return sni;
}

/**
 * Gateways -> Listeners. Servers of every served Gateway are grouped by (bind, port), as istiod
 * merges them:
 * - plaintext HTTP servers on one port share one listener and one route table `http.<port>`;
 * - TLS servers (HTTPS/TLS) each get their own filter chain, selected by SNI; a host may appear
 *   in only one TLS server per port (a later server repeating one is skipped);
 * - a server whose protocol class conflicts with the port's first server is skipped;
 * - PASSTHROUGH servers get one chain per VirtualService `tls[].match[]`, keyed on its sniHosts.
 */
import type { GatewayResource, VirtualServiceResource } from '../../config/resource.js';
import type { Server } from '../../config/types/istio.js';
import type { FilterChain, HttpConnectionManager, Listener, Origin, Route, TcpProxy, VirtualHost } from '../snapshot.js';
import type { ClusterBuilder } from './clusters.js';
import type { TranslateContext } from './context.js';
import { checkHostPattern, hostSubsetOf, hostsOverlap, moreSpecific, splitServerHost, fqdn } from './hosts.js';
import { buildHttpRoutes, matchApplies, normaliseGateways, type BindingScope } from './http-routes.js';
import { downstreamTls } from './tls-context.js';
import { autoPassthroughChains } from './auto-passthrough.js';

type ProtocolClass = 'http' | 'tls' | 'tcp';

const HTTP_PROTOCOLS = new Set(['HTTP', 'HTTP2', 'GRPC', 'GRPC-WEB', 'HTTP_PROXY']);
const TLS_PROTOCOLS = new Set(['HTTPS', 'TLS']);
const TCP_PROTOCOLS = new Set(['TCP', 'MONGO', 'REDIS', 'MYSQL']);

interface ServerEntry {
  gw: GatewayResource;
  gwKey: string;
  index: number;
  path: string;
  server: Server;
  protocol: string;
  cls: ProtocolClass;
  hosts: { ns: string; host: string }[];
  address: string;
  port: number;
}

/** Gateways this proxy serves: all of them without --labels, else those whose selector matches. */
export function servedGateways(ctx: TranslateContext): GatewayResource[] {
  const labels = ctx.options.labels;
  const gws = [...ctx.resources.gateways].sort(byAge);
  if (!labels) return gws;
  return gws.filter((g) => Object.entries(g.spec.selector ?? {}).every(([k, v]) => labels[k] === v));
}

export function byAge(a: { metadata: { creationTimestamp?: string; namespace: string; name: string } }, b: typeof a): number {
  const ta = a.metadata.creationTimestamp ?? '', tb = b.metadata.creationTimestamp ?? '';
  if (ta !== tb) return ta < tb ? -1 : 1;
  const ka = `${a.metadata.namespace}/${a.metadata.name}`, kb = `${b.metadata.namespace}/${b.metadata.name}`;
  return ka < kb ? -1 : ka > kb ? 1 : 0;
}

export function buildListeners(ctx: TranslateContext, clusters: ClusterBuilder): Listener[] {
  const gateways = servedGateways(ctx);
  const served = new Set(gateways.map((g) => `${g.metadata.namespace}/${g.metadata.name}`));
  const all = new Set(ctx.resources.gateways.map((g) => `${g.metadata.namespace}/${g.metadata.name}`));
  const vss = [...ctx.resources.virtualServices].sort(byAge);
  for (const vs of vss) {
    ctx.touch(vs);
    normaliseGateways(vs.spec.gateways, vs.metadata.namespace).forEach((g, i) => {
      if (g !== 'mesh' && !all.has(g)) ctx.warn('TG3008', vs, `spec.gateways[${i}]`, `Gateway "${g}" is not defined in the configuration: routes bound to it are not served`);
    });
  }

  // Validate servers and group them by bind address and port.
  const groups = new Map<string, ServerEntry[]>();
  for (const gw of gateways) {
    ctx.touch(gw);
    const gwKey = `${gw.metadata.namespace}/${gw.metadata.name}`;
    const servers = gw.spec.servers ?? [];
    if (servers.length === 0) ctx.error('TG2001', gw, 'spec.servers', 'a Gateway must have at least one server');
    const portNames = new Map<string, number>();
    servers.forEach((server, index) => {
      const e = validateServer(ctx, gw, gwKey, server, index);
      if (!e) return;
      const prev = portNames.get(server.port.name);
      if (prev !== undefined) {
        ctx.error('TG3012', gw, `spec.servers[${index}].port.name`, `port name "${server.port.name}" is already used by spec.servers[${prev}]: port names must be unique within a Gateway`);
        return;
      }
      portNames.set(server.port.name, index);
      const key = `${e.address}_${e.port}`;
      const list = groups.get(key) ?? [];
      list.push(e);
      groups.set(key, list);
    });
  }

  const listeners: Listener[] = [];
  for (const [name, entries] of groups) {
    const l = buildListener(ctx, clusters, name, entries, vss);
    if (l) listeners.push(l);
  }
  listeners.sort((a, b) => a.port - b.port || (a.address < b.address ? -1 : 1));

  // Report VirtualServices bound to served gateways whose hosts match no server.
  for (const vs of vss) {
    const gws = normaliseGateways(vs.spec.gateways, vs.metadata.namespace).filter((g) => served.has(g));
    if (gws.length === 0) continue;
    const matchesSome = gateways.some((gw) => gws.includes(`${gw.metadata.namespace}/${gw.metadata.name}`) &&
      (gw.spec.servers ?? []).some((s) => bindDomains(vs, gw, s.hosts ?? []).length > 0));
    if (!matchesSome) ctx.warn('TG3007', vs, 'spec.hosts', `hosts ${JSON.stringify(vs.spec.hosts ?? [])} match no server host of Gateway ${gws.join(', ')}: this VirtualService is not applied there`);
  }
  return listeners;
}

function validateServer(ctx: TranslateContext, gw: GatewayResource, gwKey: string, server: Server, index: number): ServerEntry | undefined {
  const path = `spec.servers[${index}]`;
  const protocol = server.port.protocol.toUpperCase();
  let ok = true;
  if (server.port.targetPort !== undefined) {
    ctx.error('TG3001', gw, `${path}.port.targetPort`, 'targetPort has no impact on Gateways', 'remove it');
    ok = false;
  }
  const cls: ProtocolClass | undefined = HTTP_PROTOCOLS.has(protocol) ? 'http' : TLS_PROTOCOLS.has(protocol) ? 'tls' : TCP_PROTOCOLS.has(protocol) ? 'tcp' : undefined;
  if (!cls) {
    ctx.error('TG4001', gw, `${path}.port.protocol`, `not supported yet: protocol ${protocol} on a Gateway`, 'valid values: HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, REDIS, MYSQL');
    return undefined;
  }
  if (protocol === 'HTTP_PROXY' || protocol === 'GRPC-WEB') {
    ctx.error('TG4001', gw, `${path}.port.protocol`, `not supported yet: protocol ${protocol}`);
    return undefined;
  }
  const hosts = (server.hosts ?? []).map((h, i) => {
    const sh = splitServerHost(h);
    const e = checkHostPattern(sh.host, { allowIp: true });
    if (e) { ctx.error('TG3011', gw, `${path}.hosts[${i}]`, e); ok = false; }
    if (sh.ns !== '*' && sh.ns !== '.' && !/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(sh.ns)) {
      ctx.error('TG3011', gw, `${path}.hosts[${i}]`, `invalid namespace "${sh.ns}" in host "${h}"`, 'use "*/host", "./host" or "<namespace>/host"'); ok = false;
    }
    return sh;
  });
  if (hosts.length === 0) { ctx.error('TG2001', gw, `${path}.hosts`, 'a server must have at least one host'); ok = false; }
  const tls = server.tls;
  if (cls === 'tls' && !tls) { ctx.error('TG3001', gw, `${path}.tls`, `a ${protocol} server needs tls settings`, 'set tls.mode: SIMPLE (terminate) or PASSTHROUGH'); ok = false; }
  if (tls) {
    const hasCert = Boolean(tls.credentialName || tls.credentialNames?.length || tls.serverCertificate || tls.privateKey || tls.caCertificates || tls.tlsCertificates?.length);
    if (cls === 'tcp') { ctx.error('TG3001', gw, `${path}.tls`, `a ${protocol} server cannot have tls settings`, 'use protocol TLS for TLS over TCP'); ok = false; }
    if (cls === 'http') {
      if ((tls.mode !== undefined && tls.mode !== 'PASSTHROUGH') || hasCert) {
        ctx.error('TG3001', gw, `${path}.tls`, `a plaintext ${protocol} server can only set tls.httpsRedirect`, 'use protocol HTTPS to terminate TLS');
        ok = false;
      }
    } else if (tls.httpsRedirect) {
      ctx.warn('TG3001', gw, `${path}.tls.httpsRedirect`, `httpsRedirect only applies to plaintext HTTP servers; it has no effect on a ${protocol} server`);
    }
    const mode = tls.mode ?? 'PASSTHROUGH';
    if (cls === 'tls') {
      if ((mode === 'PASSTHROUGH' || mode === 'AUTO_PASSTHROUGH') && hasCert) ctx.warn('TG5006', gw, `${path}.tls`, `${mode} mode does not use certificates: they are ignored`);
    }
  }
  if (server.bind && server.bind.startsWith('unix://')) { ctx.error('TG4001', gw, `${path}.bind`, 'not supported yet: unix domain socket bind'); ok = false; }
  if (server.defaultEndpoint !== undefined) { ctx.error('TG4001', gw, `${path}.defaultEndpoint`, 'not supported yet: defaultEndpoint'); ok = false; }
  if (!ok) return undefined;
  return {
    gw, gwKey, index, path, server, protocol, cls, hosts,
    address: server.bind ?? ctx.options.bindAddress,
    port: server.port.number,
  };
}

/** The domains a VirtualService serves through a server: VS hosts intersected with server hosts. */
function bindDomains(vs: VirtualServiceResource, gw: GatewayResource, serverHosts: string[]): string[] {
  if (!visibleTo(vs, gw.metadata.namespace)) return [];
  const out: string[] = [];
  for (const h of vs.spec.hosts ?? []) {
    const vh = fqdnAtGateway(h, vs.metadata.namespace);
    for (const raw of serverHosts) {
      const sh = splitServerHost(raw);
      if (sh.ns !== '*' && !(sh.ns === '.' ? vs.metadata.namespace === gw.metadata.namespace : vs.metadata.namespace === sh.ns)) continue;
      if (hostsOverlap(vh, sh.host)) {
        const d = moreSpecific(vh, sh.host);
        if (!out.includes(d)) out.push(d);
      }
    }
  }
  return out;
}

/** At a gateway, VS hosts are DNS names as written (short names expand in the VS namespace). */
function fqdnAtGateway(h: string, ns: string): string {
  return h === '*' ? '*' : fqdn(h, ns);
}

function visibleTo(vs: VirtualServiceResource, ns: string): boolean {
  const e = vs.spec.exportTo;
  if (!e || e.length === 0) return true;
  return e.some((x) => x === '*' || x === ns || (x === '.' && vs.metadata.namespace === ns));
}

function sniNames(hosts: { host: string }[]): string[] {
  const names = [...new Set(hosts.map((h) => h.host))].sort();
  return names.includes('*') ? [] : names;
}

function buildListener(ctx: TranslateContext, clusters: ClusterBuilder, name: string, entries: ServerEntry[], vss: VirtualServiceResource[]): Listener | undefined {
  const first = entries[0]!;
  const accepted: ServerEntry[] = [];
  for (const e of entries) {
    if (e.cls !== first.cls) {
      ctx.warn('TG3005', e.gw, `${e.path}.port`, `port ${e.port} is already served as ${first.protocol} by ${first.gwKey} ${first.path}; this ${e.protocol} server is skipped`,
        'use another port, or the same protocol class (HTTPS and TLS can share a port)');
      continue;
    }
    if (e.cls === 'tcp' && accepted.length > 0) {
      ctx.warn('TG3005', e.gw, `${e.path}.port`, `port ${e.port} already has a TCP server (${first.gwKey} ${first.path}); this server is skipped`);
      continue;
    }
    accepted.push(e);
  }
  const origins: Origin[] = accepted.map((e) => ctx.origin(e.gw, e.path));
  const listener: Listener = {
    name,
    address: first.address,
    port: first.port,
    inspector: first.cls === 'tls' ? 'tls-inspector' : 'none',
    filterChains: [],
    clientHelloTimeoutMs: ctx.options.clientHelloTimeoutMs,
    maxClientHelloBytes: ctx.options.maxClientHelloBytes,
    origins,
  };
  const pp = proxyProtocolOf(ctx, accepted);
  if (pp) listener.proxyProtocol = pp;
  if (first.cls === 'http') listener.filterChains.push(httpPlaintextChain(ctx, clusters, accepted, vss));
  else if (first.cls === 'tcp') listener.filterChains.push(...tcpChains(ctx, clusters, first, vss, undefined));
  else listener.filterChains.push(...tlsChains(ctx, clusters, accepted, vss));
  if (listener.filterChains.length === 0) return undefined;
  computeMisdirected(listener);
  return listener;
}

/** 421: each terminating HTTP chain learns the hosts that other chains of its listener own. */
export function computeMisdirected(listener: Listener): void {
  for (const fc of listener.filterChains) {
    if (fc.filter.kind !== 'http' || !fc.tls) continue;
    const mine = new Set(fc.match.serverNames);
    const others = new Set<string>();
    for (const o of listener.filterChains) if (o !== fc) for (const n of o.match.serverNames) if (!mine.has(n)) others.add(n);
    fc.filter.misdirectedDomains = [...others].sort();
  }
}

function scopeFor(vs: VirtualServiceResource, e: ServerEntry): BindingScope {
  return { gatewayKey: e.gwKey, port: e.port, vsGateways: normaliseGateways(vs.spec.gateways, vs.metadata.namespace) };
}

/** Virtual hosts of one route table from the VSs bound to the given servers. */
function virtualHosts(ctx: TranslateContext, clusters: ClusterBuilder, servers: ServerEntry[], vss: VirtualServiceResource[]): VirtualHost[] {
  const byDomain = new Map<string, VirtualHost>();
  const order: string[] = [];
  const add = (domain: string, routes: Route[], requireTls: boolean) => {
    let vh = byDomain.get(domain);
    if (!vh) {
      vh = { name: domain, domains: [domain], routes: [], requireTls };
      byDomain.set(domain, vh);
      order.push(domain);
    }
    vh.routes.push(...routes);
    vh.requireTls ||= requireTls;
  };
  for (const e of servers) {
    const requireTls = e.server.tls?.httpsRedirect === true && e.cls === 'http';
    const covered = new Set<string>();
    for (const vs of vss) {
      const scope = scopeFor(vs, e);
      if (!scope.vsGateways.includes(e.gwKey)) continue;
      const domains = bindDomains(vs, e.gw, e.server.hosts ?? []);
      if (domains.length === 0) continue;
      if ((vs.spec.tls?.length || vs.spec.tcp?.length) && !vs.spec.http?.length) {
        ctx.warn('TG3015', vs, vs.spec.tls?.length ? 'spec.tls' : 'spec.tcp', `${e.gwKey} ${e.path} carries HTTP (${e.protocol}${e.server.tls?.mode ? ' ' + e.server.tls.mode : ''}); tls/tcp routes do not apply there: requests get 404`,
          'use http routes, or set the server to PASSTHROUGH (tls routes) / protocol TCP or TLS (tcp routes)');
      }
      const routes = requireTls ? [] : buildHttpRoutes(ctx, clusters, vs, scope);
      for (const d of domains) { add(d, routes, requireTls); covered.add(d); }
    }
    // httpsRedirect answers every host of the server, even those no VirtualService claims.
    if (requireTls) for (const h of e.hosts) if (!covered.has(h.host)) add(h.host, [], true);
  }
  return order.map((d) => byDomain.get(d)!);
}

function httpPlaintextChain(ctx: TranslateContext, clusters: ClusterBuilder, servers: ServerEntry[], vss: VirtualServiceResource[]): FilterChain {
  const port = servers[0]!.port;
  const hcm: HttpConnectionManager = {
    kind: 'http',
    routeConfig: { name: `http.${port}`, virtualHosts: virtualHosts(ctx, clusters, servers, vss) },
    scheme: 'http',
    misdirectedDomains: [],
    forwardClientCertDetails: 'SANITIZE',
    // Every plaintext HTTP port also serves HTTP/2 with prior knowledge, whatever its protocol.
    http2: true,
  };
  return {
    name: servers.map((s) => `${s.gwKey}/${s.path}`).join(','),
    match: { serverNames: [], applicationProtocols: [] },
    filter: hcm,
    origin: ctx.origin(servers[0]!.gw, servers[0]!.path),
  };
}

function tlsChains(ctx: TranslateContext, clusters: ClusterBuilder, servers: ServerEntry[], vss: VirtualServiceResource[]): FilterChain[] {
  const chains: FilterChain[] = [];
  const claimed = new Map<string, string>(); // SNI pattern -> who
  const catchAll = { taken: '' };
  for (const e of servers) {
    const mode = e.server.tls?.mode ?? 'PASSTHROUGH';
    if (mode === 'PASSTHROUGH') {
      chains.push(...passthroughChains(ctx, clusters, e, vss, claimed));
      continue;
    }
    if (mode === 'AUTO_PASSTHROUGH') {
      const auto = autoPassthroughChains(ctx, clusters, { gw: e.gw, gwNamespace: e.gw.metadata.namespace, gwKey: e.gwKey, path: e.path, port: e.port, hosts: e.hosts }, claimed);
      if (auto.length === 0) {
        ctx.warn('TG3025', e.gw, `${e.path}.hosts`, `AUTO_PASSTHROUGH server on port ${e.port} covers no ServiceEntry with location MESH_INTERNAL: every connection to it is closed`,
          'add a MESH_INTERNAL ServiceEntry whose hosts match the server hosts (e.g. "*.local")');
      }
      chains.push(...auto);
      continue;
    }
    const names = sniNames(e.hosts);
    const dup = names.find((n) => claimed.has(n)) ?? (names.length === 0 && catchAll.taken ? '*' : undefined);
    if (dup) {
      ctx.warn('TG3006', e.gw, `${e.path}.hosts`, `host "${dup}" is already served on port ${e.port} by ${claimed.get(dup) ?? catchAll.taken}; this server is skipped`,
        'a host may appear in only one TLS server per port');
      continue;
    }
    const tls = downstreamTls(ctx, e.gw, e.path, e.server.tls!, e.protocol);
    if (!tls) continue;
    const who = `${e.gwKey} ${e.path}`;
    for (const n of names) claimed.set(n, who);
    if (names.length === 0) catchAll.taken = who;
    if (e.protocol === 'HTTPS') {
      const hcm: HttpConnectionManager = {
        kind: 'http',
        routeConfig: { name: `https.${e.port}.${e.server.port.name}.${e.gw.metadata.name}.${e.gw.metadata.namespace}`, virtualHosts: virtualHosts(ctx, clusters, [e], vss) },
        scheme: 'https',
        misdirectedDomains: [],
        forwardClientCertDetails: 'SANITIZE_SET',
        http2: true,
        ...(ctx.options.identity ? { xfccBy: ctx.options.identity } : {}),
      };
      chains.push({ name: `${e.gwKey}/${e.path}`, match: { serverNames: names, applicationProtocols: [] }, tls, filter: hcm, origin: ctx.origin(e.gw, e.path) });
    } else {
      for (const c of tcpChains(ctx, clusters, e, vss, names)) chains.push({ ...c, tls });
    }
  }
  // Envoy picks the most specific SNI regardless of order; keep a stable order for dumps.
  return chains;
}

function passthroughChains(ctx: TranslateContext, clusters: ClusterBuilder, e: ServerEntry, vss: VirtualServiceResource[], claimed: Map<string, string>): FilterChain[] {
  const chains: FilterChain[] = [];
  for (const vs of vss) {
    const scope = scopeFor(vs, e);
    if (!scope.vsGateways.includes(e.gwKey)) continue;
    if (bindDomains(vs, e.gw, e.server.hosts ?? []).length === 0) continue;
    if (vs.spec.http?.length && !vs.spec.tls?.length) {
      ctx.warn('TG3017', vs, 'spec.http', `${e.gwKey} ${e.path} passes TLS through without terminating it; http routes do not apply there`, 'add tls routes with sniHosts, or terminate TLS with mode SIMPLE');
    }
    (vs.spec.tls ?? []).forEach((tr, i) => {
      tr.match.forEach((m, j) => {
        const mpath = `spec.tls[${i}].match[${j}]`;
        if (!matchApplies(m, vs.metadata.namespace, scope)) return;
        const snis: string[] = [];
        m.sniHosts.forEach((raw, k) => {
          const s = raw.toLowerCase();
          const vsHosts = (vs.spec.hosts ?? []).map((h) => fqdnAtGateway(h, vs.metadata.namespace));
          if (!vsHosts.some((h) => hostSubsetOf(s, h) || hostSubsetOf(s, h.replace(/\.svc\.cluster\.local$/, '')))) {
            ctx.error('TG3013', vs, `${mpath}.sniHosts[${k}]`, `SNI host "${raw}" is not a compatible subset of any of the virtual service hosts: ${JSON.stringify(vs.spec.hosts ?? [])}`);
            return;
          }
          const who = claimed.get(s);
          if (who) {
            ctx.warn('TG3016', vs, `${mpath}.sniHosts[${k}]`, `SNI "${raw}" on port ${e.port} is already claimed by ${who}; this claim is skipped`);
            return;
          }
          claimed.set(s, `VirtualService ${vs.metadata.namespace}/${vs.metadata.name} ${mpath}`);
          snis.push(s);
        });
        if (snis.length === 0) return;
        const proxy = tcpProxyFor(ctx, clusters, vs, `spec.tls[${i}]`, tr.route, e.port);
        if (!proxy) return;
        const fc: FilterChain = {
          name: `${vs.metadata.namespace}/${vs.metadata.name}#tls[${i}].match[${j}]`,
          match: { serverNames: snis.includes('*') ? [] : snis, transportProtocol: 'tls', applicationProtocols: [] },
          filter: proxy,
          origin: ctx.origin(vs, mpath),
        };
        if (m.destinationSubnets?.length) fc.match.destinationSubnets = m.destinationSubnets;
        chains.push(fc);
      });
    });
  }
  if (chains.length === 0) {
    ctx.warn('TG3014', e.gw, e.path, `PASSTHROUGH server on port ${e.port} has no VirtualService tls route: every connection to it is closed`,
      'add a VirtualService bound to this Gateway with tls[].match[].sniHosts');
  }
  return chains;
}

/** TCP chains for a TCP server (or a terminated TLS server): the first tcp route that applies wins. */
function tcpChains(ctx: TranslateContext, clusters: ClusterBuilder, e: ServerEntry, vss: VirtualServiceResource[], serverNames: string[] | undefined): FilterChain[] {
  const chains: FilterChain[] = [];
  let catchAll = false;
  for (const vs of vss) {
    if (catchAll) break;
    const scope = scopeFor(vs, e);
    if (!scope.vsGateways.includes(e.gwKey)) continue;
    if (bindDomains(vs, e.gw, e.server.hosts ?? []).length === 0) continue;
    if (!vs.spec.tcp?.length) {
      if (vs.spec.http?.length) ctx.warn('TG3017', vs, 'spec.http', `${e.gwKey} ${e.path} is ${e.protocol}: http routes do not apply there`, 'use tcp routes');
      if (vs.spec.tls?.length) ctx.warn('TG3015', vs, 'spec.tls', `${e.gwKey} ${e.path} is ${e.protocol}${e.server.tls?.mode ? ' ' + e.server.tls.mode : ''}: tls routes apply only to PASSTHROUGH servers`, 'use tcp routes');
      continue;
    }
    for (let i = 0; i < vs.spec.tcp.length && !catchAll; i++) {
      const tr = vs.spec.tcp[i]!;
      const matches = tr.match?.length ? tr.match.filter((m) => matchApplies(m, vs.metadata.namespace, scope)) : (scope.vsGateways.includes(e.gwKey) ? [{}] : []);
      for (const m of matches as { destinationSubnets?: string[] }[]) {
        const proxy = tcpProxyFor(ctx, clusters, vs, `spec.tcp[${i}]`, tr.route, e.port);
        if (!proxy) continue;
        const fc: FilterChain = {
          name: `${e.gwKey}/${e.path}`,
          match: { serverNames: serverNames ?? [], applicationProtocols: [] },
          filter: proxy,
          origin: ctx.origin(e.gw, e.path),
        };
        if (m.destinationSubnets?.length) fc.match.destinationSubnets = m.destinationSubnets;
        else catchAll = true;
        chains.push(fc);
        if (catchAll) break;
      }
    }
  }
  if (chains.length === 0) {
    chains.push({
      name: `${e.gwKey}/${e.path}`,
      match: { serverNames: serverNames ?? [], applicationProtocols: [] },
      filter: { kind: 'reject', reason: 'no_route' },
      origin: ctx.origin(e.gw, e.path),
    });
    ctx.warn('TG3022', e.gw, e.path, `${e.protocol} server on port ${e.port} has no VirtualService tcp route: connections to it are closed`,
      'add a VirtualService bound to this Gateway with a tcp route');
  }
  return chains;
}

function tcpProxyFor(ctx: TranslateContext, clusters: ClusterBuilder, vs: VirtualServiceResource, path: string, route: { destination: { host: string; subset?: string; port?: { number?: number } }; weight?: number }[], port: number): TcpProxy | undefined {
  if (!route?.length) {
    ctx.error('TG2001', vs, `${path}.route`, 'a tls/tcp route needs at least one route destination');
    return undefined;
  }
  const anyWeight = route.some((d) => d.weight !== undefined);
  const weighted = [];
  for (let k = 0; k < route.length; k++) {
    const d = route[k]!;
    const name = clusters.clusterFor({ owner: vs, path: `${path}.route[${k}].destination`, destination: d.destination, fallbackPort: port, carries: 'tcp' });
    if (!name) return undefined;
    weighted.push({ cluster: name, weight: route.length === 1 ? 100 : anyWeight ? (d.weight ?? 0) : 1 });
  }
  if (weighted.every((w) => w.weight === 0)) {
    ctx.error('TG2005', vs, `${path}.route`, 'all destination weights are 0: no connection can be routed');
    return undefined;
  }
  const idx = path.match(/\[(\d+)\]$/)?.[1];
  return {
    kind: 'tcp',
    name: `${vs.metadata.namespace}/${vs.metadata.name}#${path.replace('spec.', '').replace(/\[\d+\]$/, '')}[${idx}]`,
    clusters: weighted,
    idleTimeoutMs: ctx.options.tcpIdleTimeoutMs,
    origin: ctx.origin(vs, path),
  };
}

const PP_ANNOTATION = 'tlsgate.io/proxy-protocol';
const PP_CIDRS_ANNOTATION = 'tlsgate.io/proxy-protocol-trusted-cidrs';

/**
 * PROXY protocol on a listener, from the annotations of the Gateways whose servers share it:
 * `tlsgate.io/proxy-protocol: "true"` and `tlsgate.io/proxy-protocol-trusted-cidrs:
 * "10.0.0.0/8,127.0.0.1/32"` (required: no peer is trusted by default).
 */
function proxyProtocolOf(ctx: TranslateContext, servers: ServerEntry[]): Listener['proxyProtocol'] {
  let out: Listener['proxyProtocol'];
  const seen = new Set<GatewayResource>();
  for (const e of servers) {
    if (seen.has(e.gw)) continue;
    seen.add(e.gw);
    const v = e.gw.metadata.annotations[PP_ANNOTATION];
    if (v === undefined) continue;
    if (v !== 'true' && v !== 'false') {
      ctx.error('TG2003', e.gw, `metadata.annotations["${PP_ANNOTATION}"]`, `invalid value "${v}"`, 'valid values: "true", "false"');
      continue;
    }
    if (v === 'false') continue;
    const cidrs = (e.gw.metadata.annotations[PP_CIDRS_ANNOTATION] ?? '').split(',').map((x) => x.trim()).filter(Boolean);
    if (cidrs.length === 0) {
      ctx.error('TG2001', e.gw, `metadata.annotations["${PP_CIDRS_ANNOTATION}"]`, 'PROXY protocol needs the peers allowed to send it', 'e.g. "10.0.0.0/8" for the load balancer\'s addresses');
      continue;
    }
    for (const c of cidrs) {
      if (!/^[0-9a-fA-F:.]+(\/\d{1,3})?$/.test(c)) ctx.error('TG2005', e.gw, `metadata.annotations["${PP_CIDRS_ANNOTATION}"]`, `"${c}" is not an IP address or CIDR`);
    }
    if (!out) out = { trustedCidrs: cidrs, headerTimeoutMs: 5000 };
  }
  return out;
}

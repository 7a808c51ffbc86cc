/**
 * What the dashboard draws, computed on the server from the running Snapshot and the loaded
 * certificates: a map (listener -> filter chain -> route -> cluster -> endpoint) where each hop
 * says what happens to TLS there, the certificates with their time left, and the hop ids an
 * explanation passes through. The browser only renders these plain objects, so the map, its
 * table view and the tests all read the same data.
 */
import { isIP } from 'node:net';
import type { Cluster, FilterChain, Listener, NetworkFilter, Snapshot, WeightedCluster } from '../../model/snapshot.js';
import type { LoadedSecret } from '../../runtime/pki/cert-store.js';
import type { CertInfo } from '../../runtime/pki/cert-info.js';
import { explain, type CertFacts, type ExplainQuery, type Explanation, type SecretFacts } from '../../explain/explain.js';
import type { AdminState } from '../server.js';

/**
 * What happens to TLS at a hop:
 * - terminated: this proxy ends the client's TLS (SIMPLE; MUTUAL also checks a client certificate)
 * - passthrough: the bytes are TLS this proxy cannot read; it forwards them by SNI
 * - originated: this proxy starts TLS to the upstream (SIMPLE / MUTUAL)
 * - mtls: Istio mutual TLS with workload certificates (ISTIO_MUTUAL), terminated or originated here
 * - tls-in-mtls: a client's own TLS carried inside this proxy's mTLS (double encryption)
 * - opaque: bytes forwarded as they came (inside an mTLS hop these may be TLS of their own)
 * - plaintext: no TLS on this hop
 */
export type TlsMark = 'terminated' | 'terminated-mutual' | 'passthrough' | 'originated' | 'originated-mutual' | 'mtls' | 'tls-in-mtls' | 'opaque' | 'plaintext' | 'rejected';

export const MARK_TEXT: Record<TlsMark, string> = {
  'terminated': 'TLS terminated here',
  'terminated-mutual': 'TLS terminated here, client certificate required',
  'passthrough': 'TLS passed through opaque (routed by SNI)',
  'originated': 'TLS originated here',
  'originated-mutual': 'TLS originated here with a client certificate',
  'mtls': 'Istio mTLS (ISTIO_MUTUAL)',
  'tls-in-mtls': 'client TLS inside Istio mTLS (double encryption)',
  'opaque': 'bytes forwarded as they came',
  'plaintext': 'plaintext',
  'rejected': 'connections refused',
};

export interface CertView {
  secret: string;
  role: 'leaf' | 'chain' | 'ca';
  subject: string;
  issuer: string;
  sans: string[];
  notBefore: string;
  notAfter: string;
  serialNumber: string;
  fingerprintSha256: string;
  /** Seconds until notAfter (negative when expired). */
  secondsLeft: number;
  level: 'ok' | 'soon' | 'urgent' | 'expired';
}

export interface HopCert {
  secret: string;
  /** 'server' = presented to clients; 'client' = presented to upstreams; 'ca' = used to verify peers. */
  use: 'server' | 'client' | 'ca';
  subject?: string;
  sans?: string[];
  notBefore?: string;
  notAfter?: string;
  fingerprintSha256?: string;
  level?: CertView['level'];
  note?: string;
}

export interface MapEndpoint { id: string; address: string; port: number; weight: number }

export interface MapCluster {
  id: string;
  name: string;
  serviceHost: string;
  servicePort: number;
  mark: TlsMark;
  tlsMode?: string;
  sni?: string;
  verify?: string;
  certs: HopCert[];
  endpoints: MapEndpoint[];
  origin?: string;
}

export interface MapRoute {
  id: string;
  name: string;
  kind: 'http' | 'redirect' | 'direct' | 'tcp' | 'connect';
  /** Hosts or SNI names the route applies to, and its match in words. */
  hosts: string[];
  match: string;
  mark: TlsMark;
  clusters: { name: string; id: string; weight: number }[];
  origin?: string;
}

export interface MapChain {
  id: string;
  name: string;
  serverNames: string[];
  transport: string;
  alpn: string[];
  mark: TlsMark;
  tlsMode?: string;
  certs: HopCert[];
  filter: NetworkFilter['kind'];
  routes: MapRoute[];
  origin?: string;
}

export interface MapListener {
  id: string;
  name: string;
  address: string;
  port: number;
  inspector: Listener['inspector'];
  role: 'gateway' | 'sidecar-outbound' | 'sidecar-inbound';
  chains: MapChain[];
}

export interface ProxyMap {
  generation: number;
  listeners: MapListener[];
  clusters: MapCluster[];
}

const DAY = 86_400;

/**
 * How worried to be: long-lived certificates by days left (30 / 7); short-lived ones (a week or
 * less, like mesh workload certificates renewed at half-life) by the share of their life left.
 */
export function certLevel(secondsLeft: number, lifetimeSeconds = Infinity): CertView['level'] {
  if (secondsLeft <= 0) return 'expired';
  if (lifetimeSeconds <= 7 * DAY) return secondsLeft < lifetimeSeconds * 0.1 ? 'urgent' : secondsLeft < lifetimeSeconds * 0.4 ? 'soon' : 'ok';
  return secondsLeft < 7 * DAY ? 'urgent' : secondsLeft < 30 * DAY ? 'soon' : 'ok';
}

const life = (c: CertInfo) => (c.notAfter.getTime() - c.notBefore.getTime()) / 1000;

function sanList(c: CertInfo): string[] {
  return [...c.sans.dns.map((x) => `DNS:${x}`), ...c.sans.ip.map((x) => `IP:${x}`), ...c.sans.uri.map((x) => `URI:${x}`), ...c.sans.email.map((x) => `email:${x}`)];
}

function originText(o: { resource: { kind: string; namespace: string; name: string }; path: string } | undefined): string | undefined {
  return o ? `${o.resource.kind} ${o.resource.namespace}/${o.resource.name} ${o.path}` : undefined;
}

function hopCert(lookup: (n: string) => LoadedSecret | undefined, secret: string, use: HopCert['use'], now: number): HopCert {
  const s = lookup(secret);
  const h: HopCert = { secret, use };
  if (!s) {
    h.note = 'not loaded';
    return h;
  }
  if (use === 'ca') {
    if (s.systemRoots) {
      h.note = 'system roots';
      return h;
    }
    const ca = s.caCerts[0];
    if (ca) Object.assign(h, { subject: ca.subject, notAfter: ca.notAfter.toISOString(), fingerprintSha256: ca.fingerprintSha256, level: certLevel((ca.notAfter.getTime() - now) / 1000, life(ca)) });
    if (s.caCerts.length > 1) h.note = `${s.caCerts.length} CA certificates`;
    return h;
  }
  if (s.leaf) {
    Object.assign(h, {
      subject: s.leaf.subject, sans: sanList(s.leaf), notAfter: s.leaf.notAfter.toISOString(),
      fingerprintSha256: s.leaf.fingerprintSha256, notBefore: s.leaf.notBefore.toISOString(), level: certLevel((s.leaf.notAfter.getTime() - now) / 1000, life(s.leaf)),
    });
  }
  return h;
}

function clusterMark(c: Cluster | undefined): TlsMark {
  if (!c?.tls) return 'plaintext';
  if (c.tls.mode === 'ISTIO_MUTUAL') return 'mtls';
  return c.tls.mode === 'MUTUAL' ? 'originated-mutual' : 'originated';
}

function chainMark(ch: FilterChain): TlsMark {
  if (ch.filter.kind === 'reject') return 'rejected';
  if (ch.tls) {
    if (ch.tls.mode === 'ISTIO_MUTUAL') return 'mtls';
    return ch.tls.requireClientCertificate ? 'terminated-mutual' : 'terminated';
  }
  if (ch.match.transportProtocol === 'tls' || (ch.match.serverNames.length > 0 && ch.filter.kind === 'tcp')) return 'passthrough';
  return 'plaintext';
}

const clusterId = (name: string) => `K:${name}`;
const listenerId = (l: Listener) => `L:${l.name}`;
const chainId = (l: Listener, i: number) => `C:${l.name}#${i}`;
const routeId = (l: Listener, i: number, name: string) => `R:${l.name}#${i}:${name}`;

function weighted(ws: WeightedCluster[]): MapRoute['clusters'] {
  return ws.map((w) => ({ name: w.cluster, id: clusterId(w.cluster), weight: w.weight }));
}

function matchText(m: { path?: { kind: string; value?: string }; port?: number; method?: { kind: string; value?: string }; headers: unknown[] }[]): string {
  if (m.length === 0) return 'any request';
  return m.map((x) => {
    const parts: string[] = [];
    if (x.path) parts.push(x.path.kind === 'present' ? 'path' : `path ${x.path.kind} ${x.path.value ?? ''}`);
    if (x.method) parts.push(`method ${x.method.value ?? ''}`);
    if (x.port !== undefined) parts.push(`port ${x.port}`);
    if (x.headers.length) parts.push(`${x.headers.length} header match(es)`);
    return parts.length ? parts.join(', ') : 'any request';
  }).join(' or ');
}

function listenerRole(l: Listener): MapListener['role'] {
  if (l.filterChains.some((c) => c.filter.kind === 'http' && c.filter.forwardProxy)) return 'sidecar-outbound';
  if (l.filterChains.some((c) => c.filter.kind === 'tcp' && c.filter.name.startsWith('inbound|')) || l.name.startsWith('inbound')) return 'sidecar-inbound';
  return 'gateway';
}

function routesOf(l: Listener, i: number, ch: FilterChain, clusters: Record<string, Cluster>, chainM: TlsMark): MapRoute[] {
  const f = ch.filter;
  const out: MapRoute[] = [];
  if (f.kind === 'http') {
    for (const vh of f.routeConfig.virtualHosts) {
      for (const r of vh.routes) {
        const a = r.action;
        const kind: MapRoute['kind'] = a.kind === 'route' ? 'http' : a.kind === 'redirect' ? 'redirect' : 'direct';
        out.push({
          id: routeId(l, i, r.name), name: r.name, kind, hosts: vh.domains, match: matchText(r.matches),
          // HTTP is read in the clear here; how it leaves is the cluster's mark.
          mark: 'plaintext',
          clusters: a.kind === 'route' ? weighted(a.clusters) : [],
          ...(r.origin ? { origin: originText(r.origin) } : {}),
        });
      }
    }
    for (const c of f.connectRoutes ?? []) {
      const up = c.proxy.clusters.map((w) => clusters[w.cluster]);
      // A tunnel chosen by SNI carries the client's TLS; into an ISTIO_MUTUAL cluster that is TLS inside mTLS.
      const inner: TlsMark = c.serverNames.length > 0 || c.port === 443 ? 'passthrough' : 'opaque';
      const mark: TlsMark = up.some((x) => x?.tls?.mode === 'ISTIO_MUTUAL') ? (inner === 'passthrough' ? 'tls-in-mtls' : 'mtls') : inner;
      out.push({
        id: routeId(l, i, c.name), name: c.name, kind: 'connect', hosts: c.serverNames.length ? c.serverNames : c.hosts,
        match: `CONNECT${c.port !== undefined ? ` port ${c.port}` : ''}${c.serverNames.length ? ' by SNI' : ' by host'}`,
        mark, clusters: weighted(c.proxy.clusters), ...(c.proxy.origin ? { origin: originText(c.proxy.origin) } : {}),
      });
    }
  } else if (f.kind === 'tcp') {
    const up = f.clusters.map((w) => clusters[w.cluster]);
    let mark: TlsMark = chainM === 'passthrough' ? 'passthrough' : 'opaque';
    // mTLS ended here and the payload goes on as is: on an egress gateway that payload is the client's TLS.
    if (chainM === 'mtls' && ch.match.serverNames.length > 0 && up.every((x) => !x?.tls)) mark = 'tls-in-mtls';
    out.push({
      id: routeId(l, i, f.name), name: f.name, kind: 'tcp', hosts: ch.match.serverNames, match: ch.match.serverNames.length ? `SNI ${ch.match.serverNames.join(', ')}` : 'any connection',
      mark, clusters: weighted(f.clusters), ...(f.origin ? { origin: originText(f.origin) } : {}),
    });
  }
  return out;
}

export function buildMap(snap: Snapshot | undefined, lookup: (n: string) => LoadedSecret | undefined, now = Date.now()): ProxyMap {
  if (!snap) return { generation: 0, listeners: [], clusters: [] };
  const listeners: MapListener[] = snap.listeners.map((l) => ({
    id: listenerId(l), name: l.name, address: l.address, port: l.port, inspector: l.inspector, role: listenerRole(l),
    chains: l.filterChains.map((ch, i) => {
      const mark = chainMark(ch);
      const certs: HopCert[] = [];
      if (ch.tls) {
        for (const s of ch.tls.certificates) certs.push(hopCert(lookup, s, 'server', now));
        if (ch.tls.validationCa && ch.tls.requestClientCertificate) certs.push(hopCert(lookup, ch.tls.validationCa, 'ca', now));
      }
      return {
        id: chainId(l, i), name: ch.name, serverNames: ch.match.serverNames, transport: ch.match.transportProtocol ?? 'any',
        alpn: ch.match.applicationProtocols, mark, ...(ch.tls ? { tlsMode: ch.tls.mode } : {}), certs, filter: ch.filter.kind,
        routes: routesOf(l, i, ch, snap.clusters, mark), ...(ch.origin ? { origin: originText(ch.origin) } : {}),
      };
    }),
  }));
  const clusters: MapCluster[] = Object.values(snap.clusters).map((c) => {
    const certs: HopCert[] = [];
    if (c.tls?.clientCertificate) certs.push(hopCert(lookup, c.tls.clientCertificate, 'client', now));
    if (c.tls && !c.tls.insecureSkipVerify) certs.push(hopCert(lookup, c.tls.validationCa, 'ca', now));
    const view: MapCluster = {
      id: clusterId(c.name), name: c.name, serviceHost: c.serviceHost, servicePort: c.servicePort, mark: clusterMark(c), certs,
      endpoints: c.endpoints.map((e) => ({ id: `E:${c.name}@${e.address}:${e.port}`, address: e.address, port: e.port, weight: e.weight })),
    };
    if (c.tls) {
      view.tlsMode = c.tls.mode;
      if (c.tls.sni) view.sni = c.tls.sni;
      view.verify = c.tls.insecureSkipVerify ? 'not verified (insecureSkipVerify)' : c.tls.subjectAltNames.length ? `SAN one of ${c.tls.subjectAltNames.join(', ')}` : c.tls.autoSanValidation ? 'name must match the SNI' : 'chain only';
    }
    const o = originText(c.origin);
    if (o) view.origin = o;
    return view;
  });
  return { generation: snap.generation, listeners, clusters };
}

/** Every certificate of every loaded secret (system roots left out), soonest expiry first. */
export function certViews(snap: Snapshot | undefined, lookup: (n: string) => LoadedSecret | undefined, now = Date.now()): CertView[] {
  if (!snap) return [];
  const out: CertView[] = [];
  for (const spec of Object.values(snap.secrets)) {
    const s = lookup(spec.name);
    if (!s || s.systemRoots) continue;
    for (const c of [...s.chain, ...s.caCerts]) {
      const secondsLeft = Math.floor((c.notAfter.getTime() - now) / 1000);
      out.push({
        secret: spec.name, role: s.chain.includes(c) ? (c === s.leaf ? 'leaf' : 'chain') : 'ca', subject: c.subject, issuer: c.issuer,
        sans: sanList(c), notBefore: c.notBefore.toISOString(), notAfter: c.notAfter.toISOString(), serialNumber: c.serialNumber,
        fingerprintSha256: c.fingerprintSha256, secondsLeft, level: certLevel(secondsLeft, life(c)),
      });
    }
  }
  return out.sort((a, b) => a.secondsLeft - b.secondsLeft);
}

// ------------------------------------------------------------------ explain

export class TargetError extends Error {}

/**
 * The dashboard's Explain input: a URL (https://, http://, tls://, tcp://) or an SNI and a port.
 * @example parseExplainTarget('https://app.example.local:8443/x') // TLS to 8443 with SNI app.example.local, GET /x
 */
export function parseExplainTarget(target: string | undefined, sni: string | undefined, port: number | undefined): ExplainQuery {
  if (target) {
    const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(target);
    const scheme = m?.[1]?.toLowerCase();
    if (!scheme || !['https', 'http', 'tls', 'tcp'].includes(scheme)) throw new TargetError('use a URL such as https://host:port/path, http://host:port/path, tls://host:port or tcp://host:port, or give SNI and port');
    let url: URL;
    try { url = new URL(target); } catch { throw new TargetError(`"${target}" is not a valid URL`); }
    const host = url.hostname.replace(/^\[|\]$/g, '').toLowerCase();
    const p = port ?? (url.port ? Number(url.port) : scheme === 'https' ? 443 : scheme === 'http' ? 80 : undefined);
    if (p === undefined) throw new TargetError(`${scheme}:// needs a port`);
    const name = sni ?? (isIP(host) ? undefined : host);
    const tls = scheme === 'https' || scheme === 'tls';
    const q: ExplainQuery = { target, port: p, transport: tls ? 'tls' : 'raw_buffer', alpn: scheme === 'https' ? ['h2', 'http/1.1'] : [] };
    if (tls && name) q.sni = name;
    if (scheme === 'https' || scheme === 'http') q.http = { authority: url.host, path: `${url.pathname || '/'}${url.search}`, method: 'GET', headers: {} };
    return q;
  }
  if (port === undefined) throw new TargetError('give a URL, or an SNI and a port');
  const q: ExplainQuery = { target: `tls sni=${sni ?? ''} port=${port}`, port, transport: 'tls', alpn: [] };
  if (sni) q.sni = sni.toLowerCase();
  return q;
}

function facts(c: CertInfo): CertFacts {
  return { subject: c.subject, issuer: c.issuer, sans: sanList(c), notAfter: c.notAfter.toISOString().slice(0, 10), fingerprintSha256: c.fingerprintSha256 };
}

/** The hop ids of the map an explanation passes through, in order. */
export function explainPath(snap: Snapshot, e: Explanation): string[] {
  const ids: string[] = [];
  const l = e.listener ? snap.listeners.find((x) => x.name === e.listener!.name) : undefined;
  if (!l) return ids;
  ids.push(listenerId(l));
  const i = e.chain ? l.filterChains.findIndex((c) => c.name === e.chain!.name) : -1;
  if (i < 0) return ids;
  ids.push(chainId(l, i));
  const routeName = e.http?.route?.name ?? e.tcp?.name;
  if (routeName) ids.push(routeId(l, i, routeName));
  for (const c of e.clusters) {
    if (!c.found) continue;
    ids.push(clusterId(c.name));
    const cl = snap.clusters[c.name];
    for (const ep of cl?.endpoints ?? []) ids.push(`E:${c.name}@${ep.address}:${ep.port}`);
  }
  return ids;
}

export function explainLive(state: AdminState, query: ExplainQuery): { explanation: Explanation; path: string[] } | undefined {
  const snap = state.dataPlane.snapshot;
  if (!snap) return undefined;
  const store = state.dataPlane.certStore;
  const secrets = (name: string): SecretFacts | undefined => {
    const s = store.get(name);
    if (!s) return undefined;
    const f: SecretFacts = {};
    if (s.leaf) f.leaf = facts(s.leaf);
    if (s.caCerts.length && !s.systemRoots) f.ca = s.caCerts.map(facts);
    return f;
  };
  const explanation = explain(snap, query, { secrets, diagnostics: state.diagnostics(), baseDir: process.cwd() });
  return { explanation, path: explainPath(snap, explanation) };
}

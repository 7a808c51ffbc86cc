/**
 * `explain`: the path one connection (and, for HTTP, one request) would take through a Snapshot,
 * decided by the same functions the data plane calls: selectFilterChain for the filter chain,
 * selectVirtualHost / matchRoute / isMisdirected for HTTP, redirectLocation for redirects.
 * Nothing is re-decided here; this module only describes the decisions and, when nothing
 * matches, searches the configuration for what came closest and why it did not apply.
 *
 * Pure: certificate facts come in through a lookup (the CLI loads them with CertStore), and the
 * resources (for near-miss hints) are passed in. The result is a plain, stable object (`--json`)
 * that `renderExplanation` turns into the human hop-by-hop text.
 */
import { relative } from 'node:path';
import type { Diagnostic } from '../config/diagnostics.js';
import type { GatewayResource, ResourceSet } from '../config/resource.js';
import type {
  Cluster, FilterChain, HttpConnectionManager, Listener, Origin, Route, RouteAction, RouteMatch, SecretSpec, Snapshot,
  StringMatcher, TcpProxy, VirtualHost, WeightedCluster,
} from '../model/snapshot.js';
import { selectFilterChain } from '../runtime/listener/chain-select.js';
import { hostPort, isMisdirected, matchRoute, normalizeHost, selectVirtualHost } from '../runtime/chain/route-match.js';
import { redirectLocation, splitAbsoluteForm } from '../runtime/chain/http.js';
import { connectCandidates, selectTunnelRoute } from '../runtime/chain/connect.js';

// ------------------------------------------------------------------ inputs

/** What the client does: which port it connects to, what its first bytes say, what it asks. */
export interface ExplainQuery {
  /** The target as the user typed it, echoed in the output. */
  target: string;
  port: number;
  /** Prefer the listener bound to this address when several share the port. */
  address?: string;
  /** 'tls' = the client starts with a ClientHello; 'raw_buffer' = plaintext. */
  transport: 'tls' | 'raw_buffer';
  sni?: string;
  alpn: string[];
  /** Present when the client speaks HTTP over the connection. */
  http?: ExplainHttpRequest;
  /** Sidecar roles (`--sidecar`): the app through the outbound proxy, or a peer at the inbound port. */
  sidecar?: SidecarQuery;
}

/**
 * outbound: the app sends an absolute-form request (HTTP_PROXY), or `connect` opens a CONNECT
 * tunnel (HTTPS_PROXY) whose first bytes are the app's own ClientHello with SNI `query.sni`.
 * inbound: a peer connects to the inbound port (query.port) that serves 127.0.0.1:appPort.
 */
export type SidecarQuery =
  | { role: 'outbound'; connect?: { host: string; port: number } }
  | { role: 'inbound'; appPort: number };

export interface ExplainHttpRequest {
  authority: string;
  path: string;
  method: string;
  headers: Record<string, string>;
}

/** Facts about one certificate, as the CLI reads them through CertStore. */
export interface CertFacts {
  subject: string;
  issuer: string;
  sans: string[];
  /** YYYY-MM-DD (UTC): a date, so the output does not change from day to day. */
  notAfter: string;
  fingerprintSha256: string;
}

/** What the CLI could load for a secret: its leaf, its CA bundle, or why it could not. */
export interface SecretFacts {
  leaf?: CertFacts;
  ca?: CertFacts[];
  error?: string;
}

export interface ExplainOptions {
  /** Loaded certificate facts by secret name; undefined = not loaded. */
  secrets?: (name: string) => SecretFacts | undefined;
  /** The resources the snapshot came from: used only for near-miss hints. */
  resources?: ResourceSet;
  /** Translate/load diagnostics: a skipped server or route is explained with the one that skipped it. */
  diagnostics?: readonly Diagnostic[];
  /** The proxy's --labels, to say when a Gateway is not served by this proxy. */
  labels?: Record<string, string>;
  /** Paths under this directory are shown relative to it (stable output across machines). */
  baseDir?: string;
}

// ------------------------------------------------------------------ the result

export type ExplainOutcome =
  | 'forwarded' // a cluster receives the connection or request
  | 'redirect' // HTTP redirect (route redirect or httpsRedirect)
  | 'direct_response' // a route answers by itself
  | 'no_listener'
  | 'no_filter_chain' // no SNI match, no SNI, not TLS
  | 'rejected' // the chain exists but closes connections (no route)
  | 'tls_mismatch' // client and listener disagree on TLS
  | 'bad_request' // HTTP 400 (no Host)
  | 'not_found' // HTTP 404
  | 'misdirected'; // HTTP 421

export interface CertificateExplanation {
  secret: string;
  source: string;
  leaf?: CertFacts;
  ca?: CertFacts[];
  error?: string;
}

export interface ClusterExplanation {
  name: string;
  weight?: number;
  /** Share of traffic in percent when weighted, rounded to 0.1. */
  percent?: number;
  found: boolean;
  serviceHost?: string;
  servicePort?: number;
  subset?: string;
  discovery?: Cluster['discovery'];
  endpoints?: { address: string; port: number; weight: number }[];
  lbPolicy?: Cluster['lbPolicy'];
  connectTimeoutMs?: number;
  httpProtocol?: Cluster['httpProtocol'];
  origin?: string;
  upstreamTls:
    | { mode: 'plaintext' }
    | {
        mode: 'SIMPLE' | 'MUTUAL' | 'ISTIO_MUTUAL';
        sni?: string;
        autoSni: boolean;
        ca: CertificateExplanation;
        clientCertificate?: CertificateExplanation;
        subjectAltNames: string[];
        verifyName: string; // what the certificate's name is checked against, in words
        insecureSkipVerify: boolean;
        alpn: string[];
        versions: string;
      }
    | undefined;
  notes: string[];
}

export interface Explanation {
  target: string;
  client: { port: number; transport: 'tls' | 'raw_buffer'; sni?: string; alpn: string[]; http?: ExplainHttpRequest & { scheme?: string } };
  outcome: ExplainOutcome;
  /** true when a path exists (CLI exit 0). */
  matched: boolean;
  /** One sentence: what happens to the connection/request. */
  summary: string;
  listener?: { name: string; address: string; port: number; inspector: Listener['inspector']; servers: string[] };
  chain?: {
    name: string;
    origin?: string;
    serverNames: string[];
    /** How the chain was chosen. */
    selectedBy: 'sni_exact' | 'sni_wildcard' | 'catch_all' | 'plaintext';
    pattern?: string;
  };
  tls?: {
    action: 'terminate' | 'passthrough' | 'none';
    mode?: string;
    clientCertificate?: 'required' | 'optional' | 'optional (invalid allowed)' | 'not requested';
    versions?: string;
    alpn?: string[];
    certificates?: CertificateExplanation[];
    clientCa?: CertificateExplanation;
    subjectAltNames?: string[];
  };
  http?: {
    routeConfig: string;
    scheme: string;
    virtualHost?: { name: string; domains: string[]; matchedBy: 'exact' | 'wildcard' | 'any'; pattern: string };
    route?: { name: string; origin?: string; match: string };
    status?: number;
    location?: string;
    action?: string;
  };
  tcp?: { name: string; origin?: string; idleTimeoutMs: number };
  mesh?: MeshExplanation;
  clusters: ClusterExplanation[];
  /** Why nothing matched and what came closest. */
  nearest: string[];
  notes: string[];
}

/** Sidecar roles: how the request was routed, and where mTLS wraps the stream. */
export interface MeshExplanation {
  role: 'sidecar-outbound' | 'sidecar-inbound';
  /** Outbound HTTP: the port routes matched on (from the absolute-form authority; 80 by default). */
  routePort?: number;
  /** Outbound CONNECT: the tunnel and the route that took it. */
  tunnel?: {
    target: string;
    /** true when a tls route claims the port, so the tunnelled ClientHello's SNI decides. */
    routedBySni: boolean;
    route?: string;
    selectedBy?: 'sni' | 'host';
    pattern?: string;
  };
  /** Inbound: the PeerAuthentication in effect for the app port. */
  peerAuthentication?: { mode: string; from: string };
  /** Where mTLS wraps the stream, in words: one line per cluster (outbound) or for the hop (inbound). */
  wrapping: string[];
}

// ------------------------------------------------------------------ helpers

function originText(o: Origin | undefined): string | undefined {
  if (!o) return undefined;
  return `${o.resource.kind} ${o.resource.namespace}/${o.resource.name} ${o.path}`;
}

/**
 * Absolute paths near `baseDir` (itself, below it, or up to two levels above) become relative, so
 * output does not depend on where the repository is checked out. Other paths stay absolute.
 */
function relativize(s: string, baseDir: string | undefined): string {
  if (!baseDir) return s;
  const relOne = (p: string): string => {
    if (!p.startsWith('/')) return p;
    const r = relative(baseDir, p);
    return r.startsWith('../../../') ? p : r === '' ? '.' : r;
  };
  if (s.startsWith('file://')) return 'file://' + s.slice('file://'.length).split('|').map(relOne).join('|');
  // A path starts at a "/" that does not follow a word character, ":" or "/" (URLs, route names).
  return s.replace(/(?<![\w:/.\]-])\/[\w.@%+~-][^\s|"',;()]*/g, relOne);
}

function sniCovers(pattern: string, name: string): boolean {
  if (pattern === '*') return true;
  if (pattern.startsWith('*.')) return name.length > pattern.length - 1 && name.endsWith(pattern.slice(1));
  return pattern === name;
}

/** Levenshtein distance, bounded input (host names). */
function editDistance(a: string, b: string): number {
  if (a.length > 255 || b.length > 255) return Math.max(a.length, b.length);
  let prev = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/** Labels shared at the right end: "a.example.com" and "*.example.com" share 2. */
function sharedSuffixLabels(a: string, b: string): number {
  const x = a.split('.').reverse(), y = b.split('.').reverse();
  let n = 0;
  while (n < x.length && n < y.length && x[n] === y[n] && x[n] !== '*') n++;
  return n;
}

/** Why a host pattern does not cover a name, in words; undefined when it does. */
function whyNotCovered(pattern: string, name: string): string | undefined {
  if (sniCovers(pattern, name)) return undefined;
  if (pattern.startsWith('*.') && name === pattern.slice(2)) return `"${pattern}" does not cover the bare domain "${name}" (a wildcard needs at least one label before it)`;
  if (!pattern.startsWith('*.') && name.startsWith('*.')) return `"${pattern}" is an exact name`;
  const d = editDistance(pattern.replace(/^\*\./, ''), name.split('.').slice(pattern.startsWith('*.') ? 1 : 0).join('.'));
  if (d > 0 && d <= 2) return `"${pattern}" differs from "${name}" by ${d} character(s): a typo?`;
  if (pattern.startsWith('*.')) return `"${name}" does not end in "${pattern.slice(1)}"`;
  return `"${pattern}" is a different name`;
}

/** The host pattern nearest to `name`: most labels shared at the end, then smallest edit distance. */
function nearestPattern(name: string, patterns: readonly string[]): string | undefined {
  let best: { p: string; shared: number; dist: number } | undefined;
  for (const p of patterns) {
    if (p === '*') continue;
    const shared = sharedSuffixLabels(p, name);
    const dist = editDistance(p, name);
    if (!best || shared > best.shared || (shared === best.shared && dist < best.dist)) best = { p, shared, dist };
  }
  if (!best) return undefined;
  // Only a real neighbour: something in common at the end, or a near-typo.
  return best.shared > 0 || best.dist <= 3 ? best.p : undefined;
}

function matcherText(m: StringMatcher): string {
  switch (m.kind) {
    case 'exact': return `exact "${m.value}"${m.ignoreCase ? ' (ignore case)' : ''}`;
    case 'prefix': return `prefix "${m.value}"${m.ignoreCase ? ' (ignore case)' : ''}`;
    case 'regex': return `regex "${m.value}"`;
    case 'present': return 'present';
  }
}

/** A RouteMatch in Istio's words: `uri prefix "/api", header x-env exact "dev"`. */
export function describeRouteMatch(m: RouteMatch | undefined): string {
  if (!m) return 'no match conditions (takes every request)';
  const parts: string[] = [];
  if (m.path) parts.push(`uri ${matcherText(m.path)}`);
  if (m.method) parts.push(`method ${matcherText(m.method)}`);
  if (m.authority) parts.push(`authority ${matcherText(m.authority)}`);
  if (m.scheme) parts.push(`scheme ${matcherText(m.scheme)}`);
  for (const h of m.headers) parts.push(`${h.invert ? 'without header' : 'header'} ${h.name} ${matcherText(h.matcher)}`);
  for (const q of m.queryParams) parts.push(`query ${q.name} ${matcherText(q.matcher)}`);
  if (m.port !== undefined) parts.push(`port ${m.port}`);
  return parts.length ? parts.join(', ') : 'an empty match (takes every request)';
}

function describeAction(a: RouteAction): string {
  switch (a.kind) {
    case 'route': {
      const extra: string[] = [];
      if (a.rewritePathPrefix !== undefined) extra.push(`rewrite uri prefix to "${a.rewritePathPrefix}"`);
      if (a.rewritePath !== undefined) extra.push(`rewrite path to "${a.rewritePath}"`);
      if (a.rewriteRegex) extra.push(`rewrite path /${a.rewriteRegex.pattern}/ -> "${a.rewriteRegex.substitution}"`);
      if (a.rewriteAuthority !== undefined) extra.push(`rewrite authority to "${a.rewriteAuthority}"`);
      if (a.timeoutMs) extra.push(`timeout ${a.timeoutMs}ms`);
      if (a.retry) extra.push(`retries ${a.retry.attempts} on ${a.retry.retryOn.join(',')}`);
      return `route to ${a.clusters.length} cluster(s)${extra.length ? '; ' + extra.join('; ') : ''}`;
    }
    case 'redirect': return `redirect ${a.code}`;
    case 'direct': return `direct response ${a.status}${a.body !== undefined ? ` body ${JSON.stringify(a.body.length > 60 ? a.body.slice(0, 57) + '...' : a.body)}` : ''}`;
  }
}

function versions(min: string, max: string): string {
  return min === max ? min : `${min}-${max}`;
}

// ------------------------------------------------------------------ the explainer

class Explainer {
  readonly out: Explanation;
  constructor(private readonly snap: Snapshot, private readonly q: ExplainQuery, private readonly opts: ExplainOptions) {
    const client: Explanation['client'] = { port: q.port, transport: q.transport, alpn: [...q.alpn] };
    if (q.sni !== undefined) client.sni = q.sni;
    if (q.http) client.http = { ...q.http, headers: { ...q.http.headers } };
    this.out = { target: q.target, client, outcome: 'no_listener', matched: false, summary: '', clusters: [], nearest: [], notes: [] };
  }

  rel(s: string): string {
    return relativize(s, this.opts.baseDir);
  }

  run(): Explanation {
    this.decide();
    // A fixed key order, so --json output diffs cleanly.
    const o = this.out;
    const keys: (keyof Explanation)[] = ['target', 'client', 'outcome', 'matched', 'summary', 'listener', 'chain', 'tls', 'http', 'tcp', 'mesh', 'clusters', 'nearest', 'notes'];
    const ordered: Record<string, unknown> = {};
    for (const k of keys) if (o[k] !== undefined) ordered[k] = o[k];
    return ordered as unknown as Explanation;
  }

  decide(): void {
    const { q, snap } = this;
    const onPort = snap.listeners.filter((l) => l.port === q.port);
    if (onPort.length === 0) {
      this.fail('no_listener', `no listener on port ${q.port}: the connection is refused`);
      const ports = snap.listeners.map((l) => `${l.port} (${l.inspector === 'tls-inspector' ? 'TLS' : 'plaintext'})`);
      this.out.nearest.push(ports.length ? `listening ports: ${ports.join(', ')}` : 'this configuration has no listener at all');
      const name = q.sni ?? (q.http ? normalizeHost(q.http.authority) : undefined);
      if (name) {
        for (const other of snap.listeners) {
          const r = selectFilterChain(other, other.inspector === 'none' ? { transport: 'raw_buffer' } : { transport: 'tls', sni: name, alpn: q.alpn });
          if (r.chain && (other.inspector === 'none' ? !r.chain.tls : r.chain.match.serverNames.length > 0)) {
            this.out.nearest.push(`${name} is served on port ${other.port} (${other.inspector === 'none' ? 'plaintext' : 'TLS'}, chain ${r.chain.name})`);
          }
        }
      }
      this.skippedServers(undefined);
      return;
    }
    const l = (q.address !== undefined ? onPort.find((x) => x.address === q.address) : undefined) ?? onPort.find((x) => x.address === '0.0.0.0') ?? onPort[0]!;
    if (onPort.length > 1) this.out.notes.push(`${onPort.length} listeners share port ${q.port} (${onPort.map((x) => x.address).join(', ')}); showing ${l.address} (use --address to pick)`);
    this.out.listener = {
      name: l.name, address: l.address, port: l.port, inspector: l.inspector,
      servers: l.origins.map((o) => originText(o)!),
    };

    // The runtime reads no ClientHello on a plaintext listener: every connection is raw bytes.
    const transport = l.inspector === 'none' ? 'raw_buffer' : q.transport;
    const sel = selectFilterChain(l, transport === 'tls' ? { transport, sni: q.sni, alpn: q.alpn } : { transport });
    if (q.sidecar?.role === 'inbound') this.inboundPolicy(l);
    if (!sel.chain) {
      if (q.sidecar?.role === 'inbound' && this.out.mesh?.peerAuthentication) this.inboundRefused(l, sel.reason);
      else this.noChain(l, sel.reason);
      return;
    }
    const fc = sel.chain;
    this.describeChain(l, fc, transport);

    // Client and listener disagree on TLS.
    if (l.inspector === 'none' && q.transport === 'tls') {
      if (fc.filter.kind === 'tcp') {
        this.out.notes.push('this port is plaintext TCP: the ClientHello is forwarded as bytes, TLS (if any) is between the client and the upstream');
      } else {
        this.fail('tls_mismatch', `port ${q.port} serves plaintext ${fc.filter.kind === 'http' ? 'HTTP' : 'TCP'}: a TLS ClientHello is not understood (the client sees a handshake error)`);
        this.out.nearest.push(`use http:// for port ${q.port}`, ...this.tlsPorts());
        return;
      }
    }
    if (transport === 'raw_buffer' && fc.tls) {
      this.fail('tls_mismatch', `port ${q.port} terminates TLS on chain ${fc.name}: plaintext bytes fail the handshake`);
      this.out.nearest.push(`use https:// (or --sni) for port ${q.port}`);
      return;
    }

    switch (fc.filter.kind) {
      case 'reject':
        this.fail('rejected', `chain ${fc.name} has no route: the connection is closed (${fc.filter.reason})`);
        this.diagnosticsFor(fc.origin);
        return;
      case 'tcp':
        this.tcp(fc.filter);
        if (q.sidecar?.role === 'inbound') this.inboundWrapping(fc);
        return;
      case 'http':
        if (q.sidecar?.role === 'outbound' && q.sidecar.connect) {
          if (fc.filter.forwardProxy === true) this.connect(fc.filter, q.sidecar.connect);
          else this.fail('rejected', `port ${q.port} is not a sidecar outbound proxy: CONNECT is not served here`);
          return;
        }
        this.http(l, fc.filter);
        if (q.sidecar?.role === 'inbound') this.inboundWrapping(fc);
        return;
    }
  }

  fail(outcome: ExplainOutcome, summary: string): void {
    this.out.outcome = outcome;
    this.out.matched = false;
    this.out.summary = summary;
  }

  ok(outcome: ExplainOutcome, summary: string): void {
    this.out.outcome = outcome;
    this.out.matched = true;
    this.out.summary = summary;
  }

  tlsPorts(): string[] {
    const ports = this.snap.listeners.filter((l) => l.inspector === 'tls-inspector').map((l) => String(l.port));
    return ports.length ? [`TLS ports: ${ports.join(', ')}`] : [];
  }

  // ---------------------------------------------------------------- chain

  describeChain(l: Listener, fc: FilterChain, transport: 'tls' | 'raw_buffer'): void {
    const { q } = this;
    let selectedBy: NonNullable<Explanation['chain']>['selectedBy'];
    let pattern: string | undefined;
    if (l.inspector === 'none') selectedBy = 'plaintext';
    else if (q.sni !== undefined && transport === 'tls' && fc.match.serverNames.includes(q.sni)) { selectedBy = 'sni_exact'; pattern = q.sni; }
    else if (q.sni !== undefined && transport === 'tls' && fc.match.serverNames.length > 0) {
      selectedBy = 'sni_wildcard';
      pattern = fc.match.serverNames.filter((n) => n.startsWith('*.') && sniCovers(n, q.sni!)).sort((a, b) => b.length - a.length)[0];
    } else selectedBy = 'catch_all';
    const chain: NonNullable<Explanation['chain']> = { name: fc.name, serverNames: [...fc.match.serverNames], selectedBy };
    const o = originText(fc.origin);
    if (o) chain.origin = o;
    if (pattern !== undefined) chain.pattern = pattern;
    this.out.chain = chain;
    if (fc.match.destinationSubnets?.length) this.out.notes.push(`chain ${fc.name} also requires destination subnets ${fc.match.destinationSubnets.join(', ')}; explain does not know the local address and assumes it matches`);
    if (fc.match.applicationProtocols.length) this.out.notes.push(`chain ${fc.name} requires ALPN ${fc.match.applicationProtocols.join(',')}`);

    if (fc.tls) {
      const t = fc.tls;
      const tls: NonNullable<Explanation['tls']> = {
        action: 'terminate',
        mode: t.mode,
        clientCertificate: t.requireClientCertificate ? 'required' : t.requestClientCertificate ? (t.allowInvalidClientCertificate ? 'optional (invalid allowed)' : 'optional') : 'not requested',
        versions: versions(t.minVersion, t.maxVersion),
        alpn: [...t.alpn],
        certificates: t.certificates.map((n) => this.cert(n)),
      };
      if (t.validationCa) tls.clientCa = this.cert(t.validationCa);
      if (t.matchSubjectAltNames.length) tls.subjectAltNames = [...t.matchSubjectAltNames];
      this.out.tls = tls;
      const offered = q.alpn;
      if (t.alpn.length && offered.length && q.transport === 'tls') {
        const agreed = t.alpn.find((p) => offered.includes(p));
        this.out.notes.push(agreed ? `ALPN negotiates ${agreed}` : `no common ALPN protocol (client offers ${offered.join(',')}, server ${t.alpn.join(',')}): the handshake proceeds without ALPN`);
      }
    } else if (l.inspector === 'tls-inspector' && fc.filter.kind !== 'http') {
      this.out.tls = { action: 'passthrough' };
    } else {
      this.out.tls = { action: 'none' };
    }
  }

  cert(name: string): CertificateExplanation {
    const spec: SecretSpec | undefined = this.snap.secrets[name];
    const c: CertificateExplanation = { secret: this.rel(name), source: spec ? spec.source.kind : 'unknown' };
    if (spec?.source.kind === 'system-roots') return c;
    const f = this.opts.secrets?.(name);
    if (!f) {
      if (spec?.source.kind === 'workload' || spec?.source.kind === 'mesh-roots') c.error = `${spec.source.kind} material comes from the mesh CA at run time`;
      else c.error = 'not loaded';
      return c;
    }
    if (f.leaf) c.leaf = f.leaf;
    if (f.ca?.length) c.ca = f.ca;
    if (f.error) c.error = this.rel(f.error);
    return c;
  }

  // ---------------------------------------------------------------- no chain

  noChain(l: Listener, reason: 'no_sni' | 'no_sni_match' | 'not_tls' | 'no_filter_chain'): void {
    const { q } = this;
    const names = [...new Set(l.filterChains.flatMap((c) => c.match.serverNames))].sort();
    switch (reason) {
      case 'no_sni':
        this.fail('no_filter_chain', `the client sent no SNI and no chain on port ${q.port} accepts a connection without one: the handshake is refused`);
        break;
      case 'no_sni_match':
        this.fail('no_filter_chain', `no filter chain on port ${q.port} matches SNI "${q.sni}": the handshake is refused (unrecognized_name)`);
        break;
      case 'not_tls':
        this.fail('no_filter_chain', `port ${q.port} expects TLS (it routes by SNI) and the client sent plaintext: the connection is closed`);
        break;
      case 'no_filter_chain':
        this.fail('no_filter_chain', `no filter chain on port ${q.port} accepts this connection`);
    }
    this.out.nearest.push(names.length ? `server names on port ${q.port}: ${names.join(', ')}` : `port ${q.port} has no server names`);
    if (reason === 'no_sni_match' && q.sni !== undefined) {
      const near = nearestPattern(q.sni, names);
      const why = near === undefined ? undefined : whyNotCovered(near, q.sni);
      // "a different name" helps nobody: only typos and wildcard slips are worth a line.
      if (why && !why.endsWith('is a different name')) this.out.nearest.push(`nearest: ${why}`);
    }
    if (reason === 'not_tls') this.out.nearest.push(`use https:// or --sni for port ${q.port}`);
    this.skippedServers(q.sni);
    if (q.sni !== undefined) this.nearVirtualServices(q.sni);
  }

  /** Gateway servers on this port that were skipped or are not served, with the reason. */
  skippedServers(sni: string | undefined): void {
    const res = this.opts.resources;
    if (!res) return;
    const labels = this.opts.labels;
    for (const gw of res.gateways) {
      const key = `${gw.metadata.namespace}/${gw.metadata.name}`;
      (gw.spec.servers ?? []).forEach((s, i) => {
        if (s.port?.number !== this.q.port) return;
        const hosts = (s.hosts ?? []).map((h) => (h.includes('/') ? h.slice(h.indexOf('/') + 1) : h).toLowerCase());
        if (sni !== undefined && !hosts.some((h) => sniCovers(h, sni))) return;
        const where = `Gateway ${key} spec.servers[${i}] (${s.port.protocol}${s.tls?.mode ? ' ' + s.tls.mode : ''}, hosts ${hosts.join(', ')})`;
        if (labels && !selectorMatches(gw, labels)) {
          this.out.nearest.push(`${where} is not served by this proxy: selector ${JSON.stringify(gw.spec.selector ?? {})} does not match --labels ${Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(',')}`);
          return;
        }
        const ds = this.diagnosticsAt('Gateway', gw.metadata.namespace, gw.metadata.name, `spec.servers[${i}]`);
        if (ds.length) for (const d of ds) this.out.nearest.push(`${where}: ${d}`);
        else if (sni !== undefined) this.out.nearest.push(`${where} covers "${sni}"`);
      });
    }
  }

  /** VirtualServices whose hosts cover (or nearly match) the name, and why they did not apply. */
  nearVirtualServices(name: string): void {
    const res = this.opts.resources;
    if (!res) return;
    for (const vs of res.virtualServices) {
      const key = `${vs.metadata.namespace}/${vs.metadata.name}`;
      const hosts = [...(vs.spec.hosts ?? []), ...(vs.spec.tls ?? []).flatMap((t) => t.match.flatMap((m) => m.sniHosts ?? []))].map((h) => h.toLowerCase());
      const covering = hosts.find((h) => sniCovers(h, name));
      const gws = vs.spec.gateways?.length ? vs.spec.gateways.join(', ') : 'mesh (no gateways: sidecars only)';
      if (covering) {
        const ds = this.diagnosticsAt('VirtualService', vs.metadata.namespace, vs.metadata.name, 'spec');
        const why = ds.length ? ds.join('; ') : `bound to gateways: ${gws}`;
        this.out.nearest.push(`VirtualService ${key} has host "${covering}": ${why}`);
        continue;
      }
      const near = nearestPattern(name, hosts);
      if (near && editDistance(near.replace(/^\*\./, ''), name) <= 2) this.out.nearest.push(`VirtualService ${key} has host "${near}": ${whyNotCovered(near, name)}`);
    }
  }

  /** Diagnostics (warnings and errors) at a resource path or below it, formatted. */
  diagnosticsAt(kind: string, ns: string, name: string, path: string): string[] {
    const out: string[] = [];
    for (const d of this.opts.diagnostics ?? []) {
      if (d.severity === 'info' || !d.resource) continue;
      if (d.resource.kind !== kind || d.resource.namespace !== ns || d.resource.name !== name) continue;
      const p = d.path ?? '';
      if (path !== 'spec' && !(p === path || p.startsWith(path + '.') || p.startsWith(path + '['))) continue;
      const line = d.location ? ` (${this.rel(d.location.file)}:${d.location.line})` : '';
      out.push(`${d.severity} ${d.code} ${p}: ${this.rel(d.message)}${line}`);
    }
    return out;
  }

  diagnosticsFor(o: Origin | undefined): void {
    if (!o) return;
    for (const d of this.diagnosticsAt(o.resource.kind, o.resource.namespace, o.resource.name, o.path)) this.out.nearest.push(d);
  }

  // ---------------------------------------------------------------- TCP

  tcp(p: TcpProxy): void {
    const t: NonNullable<Explanation['tcp']> = { name: p.name, idleTimeoutMs: p.idleTimeoutMs };
    const o = originText(p.origin);
    if (o) t.origin = o;
    this.out.tcp = t;
    this.clusters(p.clusters);
    const how = this.out.tls?.action === 'passthrough' ? 'passed through (still encrypted)' : this.out.tls?.action === 'terminate' ? 'decrypted and proxied' : 'proxied';
    this.ok('forwarded', `the connection is ${how} to ${this.clusterSummary()}`);
  }

  clusterSummary(): string {
    const cs = this.out.clusters;
    if (cs.length === 1) return cs[0]!.name;
    return cs.map((c) => `${c.name} (${c.percent}%)`).join(', ');
  }

  clusters(list: readonly WeightedCluster[]): void {
    const total = list.reduce((s, w) => s + w.weight, 0);
    for (const w of list) {
      const c = this.cluster(w.cluster);
      c.weight = w.weight;
      c.percent = total > 0 ? Math.round((w.weight / total) * 1000) / 10 : 0;
      this.out.clusters.push(c);
    }
  }

  cluster(name: string): ClusterExplanation {
    const c = this.snap.clusters[name];
    if (!c) return { name, found: false, upstreamTls: undefined, notes: ['cluster is not in the snapshot: requests get 503'] };
    const e: ClusterExplanation = {
      name, found: true, serviceHost: c.serviceHost, servicePort: c.servicePort, discovery: c.discovery,
      endpoints: c.endpoints.map((x) => ({ address: x.address, port: x.port, weight: x.weight })),
      lbPolicy: c.lbPolicy, connectTimeoutMs: c.connectTimeoutMs, httpProtocol: c.httpProtocol,
      upstreamTls: { mode: 'plaintext' }, notes: [],
    };
    if (c.subset) e.subset = c.subset;
    const o = originText(c.origin);
    if (o) e.origin = o;
    if (c.endpoints.length === 0 && c.discovery !== 'ORIGINAL_DST') e.notes.push('no endpoints: requests get 503');
    if (c.discovery === 'ORIGINAL_DST') e.notes.push('original destination: at a gateway that is the gateway itself (503)');
    if (c.tls) {
      const t = c.tls;
      const verifyName = t.insecureSkipVerify ? 'not verified (insecureSkipVerify)'
        : t.subjectAltNames.length ? `SAN one of ${t.subjectAltNames.join(', ')}`
          : t.mode === 'ISTIO_MUTUAL' ? 'any identity the mesh CA issued (the chain is checked against the mesh roots; no SAN is pinned)'
          : t.sni !== undefined ? `SAN must match SNI ${t.sni}`
            : t.autoSni ? 'SAN must match the request Host' : 'chain only (no name to check)';
      const up: Exclude<ClusterExplanation['upstreamTls'], undefined | { mode: 'plaintext' }> = {
        mode: t.mode, autoSni: t.autoSni, ca: this.cert(t.validationCa), subjectAltNames: [...t.subjectAltNames],
        verifyName, insecureSkipVerify: t.insecureSkipVerify, alpn: [...t.alpn], versions: versions(t.minVersion, t.maxVersion),
      };
      if (t.sni !== undefined) up.sni = t.sni;
      if (t.clientCertificate) up.clientCertificate = this.cert(t.clientCertificate);
      e.upstreamTls = up;
    }
    return e;
  }

  // ---------------------------------------------------------------- HTTP

  http(l: Listener, hcm: HttpConnectionManager): void {
    const { q } = this;
    const defaultAuthority = q.sidecar?.role === 'inbound' ? `127.0.0.1:${q.sidecar.appPort}` : q.sni ?? '';
    const req: ExplainHttpRequest = q.http ?? { authority: defaultAuthority, path: '/', method: 'GET', headers: {} };
    if (!q.http) this.out.notes.push(`no request given: assuming GET / with Host ${req.authority || '(none)'}`);
    let authority = req.headers['host'] ?? req.authority;
    let routePort = l.port;
    if (hcm.forwardProxy === true && q.sidecar?.role === 'outbound') {
      // As the runtime does: the absolute-form target names the destination and its port.
      const abs = splitAbsoluteForm(`http://${req.authority}${req.path}`);
      if (abs) {
        authority = abs.authority;
        routePort = hostPort(authority) ?? 80;
      }
      this.mesh('sidecar-outbound').routePort = routePort;
    }
    const h: NonNullable<Explanation['http']> = { routeConfig: hcm.routeConfig.name, scheme: hcm.scheme };
    this.out.http = h;
    if (this.out.client.http) this.out.client.http.scheme = hcm.scheme;
    if (authority === '') {
      h.status = 400;
      this.fail('bad_request', 'the request has no Host: 400');
      return;
    }
    const vh = selectVirtualHost(hcm.routeConfig, authority);
    if (!vh) {
      const host = normalizeHost(authority);
      if (isMisdirected(hcm, authority)) {
        h.status = 421;
        const owner = l.filterChains.find((c) => c.filter !== (hcm as unknown) && c.match.serverNames.some((n) => sniCovers(n, host)));
        this.fail('misdirected', `Host ${host} belongs to another filter chain of this listener${owner ? ` (${owner.name})` : ''}: 421 Misdirected Request (open a new connection with SNI ${host})`);
      } else {
        h.status = 404;
        this.fail('not_found', `no virtual host of ${hcm.routeConfig.name} serves Host ${host}: 404`);
      }
      const domains = hcm.routeConfig.virtualHosts.flatMap((v) => v.domains);
      this.out.nearest.push(domains.length ? `virtual hosts: ${domains.join(', ')}` : `route table ${hcm.routeConfig.name} has no virtual host (no VirtualService bound to this server)`);
      const near = nearestPattern(host, domains);
      const why = near === undefined ? undefined : whyNotCovered(near, host);
      if (why && h.status === 404 && !why.endsWith('is a different name')) this.out.nearest.push(`nearest: ${why}`);
      if (h.status === 404) {
        for (const o of l.origins) for (const d of this.diagnosticsAt(o.resource.kind, o.resource.namespace, o.resource.name, o.path)) this.out.nearest.push(d);
        this.nearVirtualServices(host);
      }
      return;
    }
    const host = normalizeHost(authority);
    const exact = vh.domains.find((d) => d === host);
    const wild = exact ? undefined : vh.domains.filter((d) => d.startsWith('*.') && sniCovers(d, host)).sort((a, b) => b.length - a.length)[0];
    h.virtualHost = { name: vh.name, domains: [...vh.domains], matchedBy: exact ? 'exact' : wild ? 'wildcard' : 'any', pattern: exact ?? wild ?? '*' };

    if (vh.requireTls && hcm.scheme !== 'https') {
      // Same Location the HTTP handler writes for httpsRedirect.
      const loc = `https://${hostPort(authority) === 80 ? host : authority}${req.path}`;
      h.status = 301;
      h.location = loc;
      h.action = 'httpsRedirect';
      this.ok('redirect', `the server sets httpsRedirect: 301 to ${loc}`);
      return;
    }
    const sel = matchRoute(vh, { path: req.path, method: req.method, authority, scheme: hcm.scheme, headers: lowerKeys(req.headers), port: routePort });
    if (!sel) {
      h.status = 404;
      this.fail('not_found', `no route of virtual host ${vh.name} matches ${req.method} ${req.path}: 404`);
      this.triedRoutes(vh);
      return;
    }
    this.route(l, hcm, sel.route, sel.match, authority, req);
  }

  triedRoutes(vh: VirtualHost): void {
    if (vh.routes.length === 0) this.out.nearest.push(`virtual host ${vh.name} has no route`);
    for (const r of vh.routes) {
      const conds = r.matches.length ? r.matches.map((m) => describeRouteMatch(m)).join(' | ') : describeRouteMatch(undefined);
      this.out.nearest.push(`route ${r.name} (${r.origin.path}) needs: ${conds}`);
    }
  }

  route(l: Listener, hcm: HttpConnectionManager, r: Route, m: RouteMatch | undefined, authority: string, req: ExplainHttpRequest): void {
    const h = this.out.http!;
    const route: NonNullable<NonNullable<Explanation['http']>['route']> = { name: r.name, match: describeRouteMatch(m) };
    const o = originText(r.origin);
    if (o) route.origin = o;
    h.route = route;
    const a = r.action;
    h.action = describeAction(a);
    switch (a.kind) {
      case 'redirect': {
        const loc = redirectLocation(a, { scheme: hcm.scheme, authority, path: req.path, listenerPort: l.port });
        h.status = a.code;
        h.location = loc;
        this.ok('redirect', `${a.code} redirect to ${loc}`);
        return;
      }
      case 'direct':
        h.status = a.status;
        this.ok('direct_response', `the route answers ${a.status} itself (no upstream)`);
        return;
      case 'route':
        this.clusters(a.clusters);
        this.ok('forwarded', `${req.method} ${req.path} is proxied to ${this.clusterSummary()}`);
        if (this.q.sidecar?.role === 'outbound') this.outboundWrapping(false);
    }
  }

  // ---------------------------------------------------------------- sidecar

  mesh(role: MeshExplanation['role']): MeshExplanation {
    this.out.mesh ??= { role, wrapping: [] };
    return this.out.mesh;
  }

  /** CONNECT host:port on the outbound proxy: the tunnel route, chosen as handleConnect chooses it. */
  connect(hcm: HttpConnectionManager, target: { host: string; port: number }): void {
    const { q } = this;
    const t = `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
    const mesh = this.mesh('sidecar-outbound');
    const routes = hcm.connectRoutes ?? [];
    const cand = connectCandidates(routes, t);
    if (!cand) {
      this.fail('bad_request', `CONNECT ${t} is not host:port: 400`);
      return;
    }
    const tunnel: NonNullable<MeshExplanation['tunnel']> = { target: t, routedBySni: cand.bySni.length > 0 };
    mesh.tunnel = tunnel;
    const list = () => {
      const lines = routes.map((r) => `tunnel route ${r.name}: port ${r.port ?? 'any'}, ${r.serverNames.length ? `SNI ${r.serverNames.join(', ')}` : `host ${r.hosts.join(', ')}`}`);
      this.out.nearest.push(...(lines.length ? lines : ['no tunnel routes: no mesh VirtualService has tls/tcp routes and no ServiceEntry has a TLS/HTTPS/TCP port']));
    };
    if (cand.bySni.length === 0 && !cand.byHost) {
      this.fail('not_found', `no tunnel route for CONNECT ${t}: 404 (nothing claims port ${target.port} by SNI, and no route names host ${cand.host})`);
      list();
      this.nearVirtualServices(cand.host);
      return;
    }
    const sel = selectTunnelRoute(cand, q.sni);
    if (!sel) {
      this.fail('rejected', `CONNECT ${t} is answered 200, then a tls route claims port ${target.port} and none matches SNI ${q.sni ?? '(none)'}, and no route names host ${cand.host}: the tunnel is closed`);
      list();
      return;
    }
    tunnel.route = sel.route.name;
    tunnel.selectedBy = sel.by;
    const name = sel.by === 'sni' ? q.sni! : cand.host;
    const pats = sel.by === 'sni' ? sel.route.serverNames : sel.route.hosts;
    const pattern = pats.find((p) => p === name) ?? pats.filter((p) => sniCovers(p, name)).sort((a, b) => b.length - a.length)[0];
    if (pattern !== undefined) tunnel.pattern = pattern;
    this.tcp(sel.route.proxy);
    const how = sel.by === 'sni' ? `by the SNI ${name} of the app's ClientHello` : `by the CONNECT host ${name}`;
    this.ok('forwarded', `CONNECT ${t} opens a tunnel (200), routed ${how} to ${this.clusterSummary()}`);
    this.outboundWrapping(true);
  }

  /** Outbound: where TLS starts for each cluster, in words. */
  outboundWrapping(tunnel: boolean): void {
    const mesh = this.mesh('sidecar-outbound');
    const many = this.out.clusters.length > 1;
    for (const c of this.out.clusters) {
      if (!c.found) continue;
      const eps = c.endpoints!.length ? c.endpoints!.map((x) => `${x.address}:${x.port}`).join(', ') : `${c.serviceHost}:${c.servicePort} (no endpoints)`;
      const u = c.upstreamTls;
      const inner = this.q.sni !== undefined ? `the app's TLS (SNI ${this.q.sni})` : 'the app\'s bytes';
      let line: string;
      if (u && u.mode === 'ISTIO_MUTUAL') {
        const auto = this.snap.clusters[c.name]?.tls?.autoMtls === true ? ' (auto mTLS: every endpoint is labelled security.istio.io/tlsMode: istio and no DestinationRule sets TLS)' : '';
        line = tunnel
          ? `${inner} travel${this.q.sni !== undefined ? 's' : ''} inside Istio mTLS (ISTIO_MUTUAL) from this sidecar to ${eps}, SNI ${u.sni ?? '(none)'}${this.q.sni !== undefined ? ': double encryption' : ''}${auto}`
          : `plaintext from the app; Istio mTLS (ISTIO_MUTUAL) from this sidecar to ${eps}, SNI ${u.sni ?? '(none)'}${auto}`;
      } else if (u && u.mode !== 'plaintext') {
        const sni = u.sni ?? (u.autoSni ? 'the request Host' : '(none)');
        line = tunnel
          ? `${inner} ${this.q.sni !== undefined ? 'is' : 'are'} wrapped in TLS originated here (${u.mode}) to ${eps}, SNI ${sni}${this.q.sni !== undefined ? ' (TLS inside TLS)' : ''}`
          : `plaintext from the app; TLS originated here (${u.mode}) to ${eps}, SNI ${sni}`;
      } else {
        line = tunnel
          ? `${inner} ${this.q.sni !== undefined ? 'is' : 'are'} passed through opaque to ${eps}: this sidecar neither decrypts nor wraps ${this.q.sni !== undefined ? 'it' : 'them'}`
          : `plaintext from the app and plaintext to ${eps}: no TLS on this hop`;
      }
      mesh.wrapping.push(many ? `${c.name}: ${line}` : line);
    }
  }

  /** Inbound: the PeerAuthentication the chains were built for (every chain name carries it). */
  inboundPolicy(l: Listener): void {
    const mesh = this.mesh('sidecar-inbound');
    for (const fc of l.filterChains) {
      const m = /peerauthentication=(\w+) \((.*)\)$/.exec(fc.name);
      if (m) {
        mesh.peerAuthentication = { mode: m[1]!, from: m[2]! };
        return;
      }
    }
  }

  inboundRefused(l: Listener, reason: 'no_sni' | 'no_sni_match' | 'not_tls' | 'no_filter_chain'): void {
    const pa = this.out.mesh!.peerAuthentication!;
    const accepted = [...new Set(l.filterChains.flatMap((c) => c.match.applicationProtocols))];
    const what = reason === 'not_tls' ? 'plaintext' : `TLS with ALPN ${this.q.alpn.length ? this.q.alpn.join(',') : '(none)'}`;
    const only = pa.mode === 'STRICT' ? 'accepts only Istio mTLS' : 'has no chain for this connection';
    this.fail('no_filter_chain', `PeerAuthentication ${pa.mode} (${pa.from}) ${only}: ${what} is refused (the connection is closed)`);
    this.out.nearest.push(`Istio mTLS is recognised by ALPN: ${accepted.join(', ')}`);
    if (pa.mode === 'STRICT') this.out.nearest.push('send mTLS from a sidecar (--alpn istio), or set PeerAuthentication PERMISSIVE for this workload or port');
    this.out.mesh!.wrapping.push(`nothing reaches the app: ${what} never gets past this sidecar`);
  }

  inboundWrapping(fc: FilterChain): void {
    const mesh = this.mesh('sidecar-inbound');
    const q = this.q;
    const app = q.sidecar?.role === 'inbound' ? `127.0.0.1:${q.sidecar.appPort}` : 'the app';
    const pa = mesh.peerAuthentication;
    const http = fc.filter.kind === 'http';
    if (fc.tls?.mode === 'ISTIO_MUTUAL') {
      mesh.wrapping.push(`Istio mTLS (ISTIO_MUTUAL) from the peer ends here: its workload certificate must chain to the mesh roots; then plaintext ${http ? 'HTTP (with XFCC naming the peer)' : 'TCP'} to ${app}`);
    } else if (q.transport === 'tls' && fc.match.transportProtocol === 'tls') {
      const istio = q.alpn.some((p) => p === 'istio' || p.startsWith('istio-'));
      mesh.wrapping.push(istio
        ? `PeerAuthentication ${pa?.mode ?? ''} does not terminate mesh mTLS: the peer's mTLS bytes reach ${app} as they are, and the app cannot speak it`
        : `TLS that is not Istio mTLS is passed through to ${app} untouched: the app terminates it`);
    } else {
      mesh.wrapping.push(`plaintext accepted (PeerAuthentication ${pa?.mode ?? 'PERMISSIVE'}): no mTLS on this hop; plaintext to ${app}`);
    }
  }
}

function lowerKeys(h: Record<string, string>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) out[k.toLowerCase()] = v;
  return out;
}

function selectorMatches(gw: GatewayResource, labels: Record<string, string>): boolean {
  return Object.entries(gw.spec.selector ?? {}).every(([k, v]) => labels[k] === v);
}

/**
 * Explains the path of one connection through a snapshot.
 * @example explain(snapshot, { target: 'https://a.example.com/', port: 443, transport: 'tls', sni: 'a.example.com', alpn: ['h2', 'http/1.1'], http: { authority: 'a.example.com', path: '/', method: 'GET', headers: {} } })
 */
export function explain(snapshot: Snapshot, query: ExplainQuery, options: ExplainOptions = {}): Explanation {
  return new Explainer(snapshot, query, options).run();
}

// ------------------------------------------------------------------ human text

const PAD = 10;

/** How the cluster line names the upstream HTTP protocol (HTTP/1.1 goes unsaid). */
const UPSTREAM_PROTOCOL: Record<Cluster['httpProtocol'], string> = {
  http1: '',
  h2: '; HTTP/2 upstream',
  downstream: '; upstream protocol follows the downstream',
};

function row(label: string, text: string): string {
  return `  ${label.padEnd(PAD)} ${text}`;
}

function cont(text: string): string {
  return `  ${''.padEnd(PAD)}   ${text}`;
}

/** A secret name for people: file sources as their paths. */
function secretLabel(name: string): string {
  if (!name.startsWith('file://')) return name;
  const parts = name.slice('file://'.length).split('|');
  const what = ['cert', 'key', 'ca', 'crl'];
  return parts.map((p, i) => (p ? `${what[i]} ${p}` : '')).filter(Boolean).join(', ');
}

/** A certificate block: the first line under `label`, its facts indented below it. */
function certLines(label: string, c: CertificateExplanation, nested: boolean): string[] {
  const head = (text: string) => (nested ? cont(`${label} ${text}`) : row(label, text));
  const sub = (text: string) => (nested ? cont(`  ${text}`) : cont(text));
  if (c.source === 'system-roots') return [head('system roots (the CA bundle shipped with Node.js)')];
  if ((c.source === 'workload' || c.source === 'mesh-roots') && !c.leaf && !c.ca) {
    return [head(c.source === 'workload' ? 'this proxy\'s workload certificate (SPIFFE, from the mesh CA at run time)' : 'the mesh roots (from the mesh CA at run time)')];
  }
  const lines = [head(secretLabel(c.secret))];
  const facts = (f: CertFacts) => [
    sub(`subject ${f.subject || '(empty)'}`),
    sub(`issuer  ${f.issuer || '(empty)'}`),
    ...(f.sans.length ? [sub(`SANs    ${f.sans.join(', ')}`)] : []),
    sub(`expires ${f.notAfter}`),
    sub(`sha256  ${f.fingerprintSha256}`),
  ];
  if (c.leaf) lines.push(...facts(c.leaf));
  for (const [i, ca] of (c.ca ?? []).entries()) {
    if (c.ca!.length > 1) lines.push(sub(`CA #${i + 1}`));
    lines.push(...facts(ca));
  }
  if (c.error) lines.push(sub(`cannot be loaded: ${c.error}`));
  return lines;
}

/** The human hop-by-hop text of an explanation. */
export function renderExplanation(e: Explanation): string {
  const out: string[] = [`explain ${e.target}`];
  const c = e.client;
  const cl = [c.transport === 'tls' ? `TLS, SNI ${c.sni ?? '(none)'}` : 'plaintext'];
  if (c.transport === 'tls' && c.alpn.length) cl.push(`ALPN ${c.alpn.join(',')}`);
  cl.push(`port ${c.port}`);
  if (c.http?.method === 'CONNECT') cl.push(`CONNECT ${c.http.authority}, then TLS inside the tunnel with SNI ${c.sni ?? '(none)'}${c.alpn.length ? `, ALPN ${c.alpn.join(',')}` : ''}`);
  else if (c.http && e.mesh?.role === 'sidecar-outbound') cl.push(`${c.http.method} http://${c.http.authority}${c.http.path} (absolute form, through HTTP_PROXY)`);
  else if (c.http) cl.push(`${c.http.method} ${c.http.path} Host ${c.http.headers['host'] ?? c.http.authority}`);
  out.push(row('client', cl.join('; ')));
  if (e.listener) {
    const l = e.listener;
    out.push(row('listener', `${l.address}:${l.port} (${l.inspector === 'tls-inspector' ? 'reads the ClientHello, routes by SNI' : 'plaintext'})`));
    for (const s of l.servers) out.push(cont(`from ${s}`));
  }
  if (e.chain) {
    const ch = e.chain;
    const why = ch.selectedBy === 'sni_exact' ? `SNI exact match "${ch.pattern}"`
      : ch.selectedBy === 'sni_wildcard' ? `SNI matched wildcard "${ch.pattern}"`
        : ch.selectedBy === 'catch_all' ? 'catch-all (no server names: any SNI or none)'
          : 'the only chain of a plaintext port';
    out.push(row('chain', `${ch.name}: ${why}`));
    if (ch.origin && !(e.listener?.servers ?? []).includes(ch.origin)) out.push(cont(`from ${ch.origin}`));
  }
  if (e.tls) {
    const t = e.tls;
    if (t.action === 'terminate') {
      out.push(row('tls', `terminate ${t.mode}; client certificate ${t.clientCertificate}; ${t.versions}; ALPN ${t.alpn?.length ? t.alpn.join(',') : 'none'}`));
      for (const cert of t.certificates ?? []) out.push(...certLines('cert', cert, false));
      if (t.clientCa) out.push(...certLines('client CA', t.clientCa, false));
      if (t.subjectAltNames?.length) out.push(row('client SAN', `one of ${t.subjectAltNames.join(', ')}`));
    } else if (t.action === 'passthrough') {
      out.push(row('tls', 'passthrough: not terminated here, the bytes go to the upstream as they are'));
    } else {
      out.push(row('tls', 'none (plaintext)'));
    }
  }
  if (e.http) {
    const h = e.http;
    out.push(row('http', `route table ${h.routeConfig} (${h.scheme})`));
    if (h.virtualHost) out.push(row('vhost', `${h.virtualHost.name}: ${h.virtualHost.matchedBy === 'exact' ? 'exact domain' : h.virtualHost.matchedBy === 'wildcard' ? `wildcard "${h.virtualHost.pattern}"` : 'catch-all "*"'}`));
    if (h.route) {
      out.push(row('route', `${h.route.name} (${h.route.origin ?? ''})`));
      out.push(cont(`matched: ${h.route.match}`));
    }
    if (h.action) out.push(row('action', h.action));
    if (h.location) out.push(cont(`Location: ${h.location}`));
  }
  if (e.mesh?.tunnel) {
    const t = e.mesh.tunnel;
    out.push(row('tunnel', `CONNECT ${t.target}: ${t.routedBySni ? `a tls route claims port ${t.target.slice(t.target.lastIndexOf(':') + 1)}, so the SNI of the app's ClientHello decides` : 'routed by the CONNECT host'}`));
    if (t.route) out.push(cont(`route ${t.route}: ${t.selectedBy === 'sni' ? 'SNI' : 'host'} ${t.pattern === undefined ? 'match' : `"${t.pattern}"`}`));
  }
  if (e.tcp) {
    out.push(row('tcp', `${e.tcp.name}${e.tcp.origin ? ` (${e.tcp.origin})` : ''}; idle timeout ${e.tcp.idleTimeoutMs}ms`));
  }
  if (e.mesh?.routePort !== undefined) out.push(row('mesh', `sidecar outbound: routes match on port ${e.mesh.routePort} (the port the app addressed)`));
  if (e.mesh?.peerAuthentication) out.push(row('mesh', `sidecar inbound: PeerAuthentication ${e.mesh.peerAuthentication.mode} (from ${e.mesh.peerAuthentication.from})`));
  for (const k of e.clusters) {
    out.push(row('cluster', `${k.name}${k.percent !== undefined && e.clusters.length > 1 ? ` (weight ${k.weight}, ${k.percent}%)` : ''}`));
    if (!k.found) {
      for (const n of k.notes) out.push(cont(n));
      continue;
    }
    const eps = k.endpoints!.map((x) => `${x.address}:${x.port}${x.weight !== 1 ? ` (weight ${x.weight})` : ''}`);
    out.push(cont(`endpoints ${eps.length ? eps.join(', ') : '(none)'} (${k.discovery})`));
    out.push(cont(`lb ${k.lbPolicy}; connect timeout ${k.connectTimeoutMs}ms${UPSTREAM_PROTOCOL[k.httpProtocol ?? 'http1']}`));
    const u = k.upstreamTls;
    if (!u || u.mode === 'plaintext') out.push(cont('upstream plaintext'));
    else {
      out.push(cont(`upstream TLS ${u.mode}; SNI ${u.sni ?? (u.autoSni ? '(request Host)' : '(none)')}; ${u.versions}${u.alpn.length ? `; ALPN ${u.alpn.join(',')}` : ''}`));
      out.push(cont(`verify: ${u.verifyName}`));
      out.push(...certLines('CA', u.ca, true));
      if (u.clientCertificate) out.push(...certLines('client cert', u.clientCertificate, true));
    }
    for (const n of k.notes) out.push(cont(n));
  }
  for (const w of e.mesh?.wrapping ?? []) out.push(row('mtls', w));
  out.push(row('result', `${e.matched ? 'OK' : 'NO MATCH'}: ${e.summary}`));
  for (const n of e.nearest) out.push(cont(n));
  for (const n of e.notes) out.push(row('note', n));
  return out.join('\n') + '\n';
}

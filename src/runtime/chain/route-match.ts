/**
 * HTTP routing decisions, pure: which virtual host a Host/:authority selects and which route of
 * that host a request takes. No I/O, no allocation beyond what a request needs.
 *
 * Virtual host: the Host is lower-cased and its port stripped, then looked up as an exact domain
 * (a Map), then as the longest `*.suffix` wildcard (one Map probe per label, longest first), then
 * `*`. Route: Istio's rule, the first route (in list order) whose matches contain one that holds;
 * the conditions inside one RouteMatch are AND-ed, the matches of a route OR-ed, and a route with
 * no matches takes everything.
 *
 * Istio regexes are RE2 and must match the whole value, so every regex is compiled once per
 * RouteConfiguration, anchored as `^(?:…)$`. A pattern JavaScript cannot compile never matches
 * (translate is where such a pattern should have been reported).
 */
import type {
  HeaderMatcher,
  HttpConnectionManager,
  Route,
  RouteConfiguration,
  RouteMatch,
  StringMatcher,
  VirtualHost,
} from '../../model/snapshot.js';

/** What a route decision looks at. `path` is the request target as received (query included). */
export interface RouteRequest {
  path: string;
  method: string;
  authority: string;
  scheme: string;
  headers: Readonly<Record<string, string | string[] | undefined>>;
  /** The listener (gateway server) port the request arrived on. */
  port: number;
}

/** The route chosen and the match that selected it (undefined when the route has no matches). */
export interface RouteSelection {
  route: Route;
  match: RouteMatch | undefined;
}

// ------------------------------------------------------------------ compiled forms

type ValueTest = (value: string) => boolean;

interface CompiledHeader {
  name: string;
  /** undefined = presence only. */
  test: ValueTest | undefined;
  invert: boolean;
}

interface CompiledMatch {
  source: RouteMatch;
  path: ValueTest | undefined;
  /** Prefix matches look at the whole :path (as Envoy does); exact and regex at the path without the query. */
  pathIncludesQuery: boolean;
  method: ValueTest | undefined;
  authority: ValueTest | undefined;
  scheme: ValueTest | undefined;
  headers: CompiledHeader[];
  query: { name: string; test: ValueTest | undefined }[];
  port: number | undefined;
}

interface CompiledRoute {
  route: Route;
  matches: CompiledMatch[];
}

interface CompiledDomains {
  exact: Map<string, VirtualHost>;
  /** Keyed by the suffix with its leading dot, e.g. ".example.com" for "*.example.com". */
  wildcard: Map<string, VirtualHost>;
  star: VirtualHost | undefined;
}

const compiledConfigs = new WeakMap<RouteConfiguration, CompiledDomains>();
const compiledHosts = new WeakMap<VirtualHost, CompiledRoute[]>();
const compiledMisdirected = new WeakMap<HttpConnectionManager, CompiledDomainSet>();

const never: ValueTest = () => false;

/** Compiles one Istio StringMatch into a test; regexes are anchored to the whole value. */
export function compileStringMatcher(m: StringMatcher): ValueTest | undefined {
  switch (m.kind) {
    case 'exact': {
      const want = m.ignoreCase === true ? m.value.toLowerCase() : m.value;
      return m.ignoreCase === true ? (v) => v.toLowerCase() === want : (v) => v === want;
    }
    case 'prefix': {
      const want = m.ignoreCase === true ? m.value.toLowerCase() : m.value;
      return m.ignoreCase === true
        ? (v) => v.length >= want.length && v.slice(0, want.length).toLowerCase() === want
        : (v) => v.startsWith(want);
    }
    case 'regex': {
      const re = anchoredRegex(m.value);
      return re === undefined ? never : (v) => re.test(v);
    }
    case 'present':
      return undefined;
  }
}

/** `^(?:pattern)$`, or undefined if JavaScript cannot compile the pattern. */
export function anchoredRegex(pattern: string, flags = ''): RegExp | undefined {
  try {
    return new RegExp(`^(?:${pattern})$`, flags);
  } catch {
    return undefined;
  }
}

function compileMatch(m: RouteMatch): CompiledMatch {
  return {
    source: m,
    path: m.path === undefined ? undefined : compileStringMatcher(m.path),
    pathIncludesQuery: m.path?.kind === 'prefix',
    method: m.method === undefined ? undefined : compileStringMatcher(m.method),
    authority: m.authority === undefined ? undefined : compileStringMatcher(m.authority),
    scheme: m.scheme === undefined ? undefined : compileStringMatcher(m.scheme),
    headers: m.headers.map((h: HeaderMatcher) => ({
      name: h.name.toLowerCase(),
      test: compileStringMatcher(h.matcher),
      invert: h.invert,
    })),
    query: m.queryParams.map((q) => ({ name: q.name, test: compileStringMatcher(q.matcher) })),
    port: m.port,
  };
}

function compileRoutes(vh: VirtualHost): CompiledRoute[] {
  let routes = compiledHosts.get(vh);
  if (routes === undefined) {
    routes = vh.routes.map((route) => ({ route, matches: route.matches.map(compileMatch) }));
    compiledHosts.set(vh, routes);
  }
  return routes;
}

function compileConfig(rc: RouteConfiguration): CompiledDomains {
  const out: CompiledDomains = { exact: new Map(), wildcard: new Map(), star: undefined };
  for (const vh of rc.virtualHosts) {
    for (const raw of vh.domains) {
      const d = stripPort(raw.toLowerCase());
      // The first virtual host naming a domain keeps it, as translate emits them in priority order.
      if (d === '*') out.star ??= vh;
      else if (d.startsWith('*.')) {
        const suffix = d.slice(1);
        if (!out.wildcard.has(suffix)) out.wildcard.set(suffix, vh);
      } else if (!out.exact.has(d)) out.exact.set(d, vh);
    }
    compileRoutes(vh);
  }
  compiledConfigs.set(rc, out);
  return out;
}

// ------------------------------------------------------------------ hosts

/** Lower-case host without port; handles `[v6]:port`. Cheap when already normalized. */
export function normalizeHost(host: string): string {
  return stripPort(host).toLowerCase();
}

function stripPort(host: string): string {
  if (host.charCodeAt(0) === 91 /* [ */) {
    const end = host.indexOf(']');
    return end === -1 ? host : host.slice(0, end + 1);
  }
  const colon = host.lastIndexOf(':');
  // A bare IPv6 literal has several colons: leave it alone.
  if (colon === -1 || host.indexOf(':') !== colon) return host;
  return host.slice(0, colon);
}

/** The port written in a Host header, or undefined. */
export function hostPort(host: string): number | undefined {
  const end = host.charCodeAt(0) === 91 ? host.indexOf(']') : -1;
  const colon = host.lastIndexOf(':');
  if (colon === -1 || colon < end || (end === -1 && host.indexOf(':') !== colon)) return undefined;
  const n = Number(host.slice(colon + 1));
  return Number.isInteger(n) && n > 0 && n <= 65535 ? n : undefined;
}

function lookupDomain(d: CompiledDomains, host: string): VirtualHost | undefined {
  const exact = d.exact.get(host);
  if (exact !== undefined) return exact;
  if (d.wildcard.size > 0) {
    // Longest suffix first: ".b.example.com" before ".example.com". A wildcard needs at least one
    // character before the dot, so the probe starts after index 0.
    for (let i = host.indexOf('.', 1); i !== -1; i = host.indexOf('.', i + 1)) {
      const vh = d.wildcard.get(host.slice(i));
      if (vh !== undefined) return vh;
    }
  }
  return d.star;
}

/**
 * The virtual host serving `host` (a Host or :authority value, any case, port allowed).
 * @example selectVirtualHost(rc, 'API.example.com:8443') // the vhost with domain "api.example.com" or "*.example.com" or "*"
 */
export function selectVirtualHost(rc: RouteConfiguration, host: string): VirtualHost | undefined {
  const d = compiledConfigs.get(rc) ?? compileConfig(rc);
  // Only `*` (a common gateway config): the host need not be normalised to be looked up.
  if (d.exact.size === 0 && d.wildcard.size === 0) return d.star;
  return lookupDomain(d, normalizeHost(host));
}

interface CompiledDomainSet {
  exact: Set<string>;
  suffixes: string[];
  star: boolean;
}

/**
 * True when `host` belongs to another filter chain of this listener (hcm.misdirectedDomains) and no
 * virtual host here serves it: the answer is 421 Misdirected Request rather than 404.
 */
export function isMisdirected(hcm: HttpConnectionManager, host: string): boolean {
  if (hcm.misdirectedDomains.length === 0) return false;
  let set = compiledMisdirected.get(hcm);
  if (set === undefined) {
    set = { exact: new Set(), suffixes: [], star: false };
    for (const raw of hcm.misdirectedDomains) {
      const d = stripPort(raw.toLowerCase());
      if (d === '*') set.star = true;
      else if (d.startsWith('*.')) set.suffixes.push(d.slice(1));
      else set.exact.add(d);
    }
    compiledMisdirected.set(hcm, set);
  }
  const h = normalizeHost(host);
  let hit = set.star || set.exact.has(h);
  for (let i = 0; !hit && i < set.suffixes.length; i++) {
    const s = set.suffixes[i]!;
    hit = h.length > s.length && h.endsWith(s);
  }
  return hit && selectVirtualHost(hcm.routeConfig, h) === undefined;
}

// ------------------------------------------------------------------ routes

function headerValue(headers: RouteRequest['headers'], name: string): string | undefined {
  const v = headers[name];
  if (v === undefined) return undefined;
  // Envoy matches a repeated header against its values joined with ",".
  return typeof v === 'string' ? v : v.join(',');
}

/** Lazily parsed query string of one request (only routes with queryParams pay for it). */
class QueryView {
  #params: Map<string, string> | undefined;
  constructor(private readonly query: string) {}
  get(name: string): string | undefined {
    if (this.#params === undefined) {
      this.#params = new Map();
      // Bounded by the request target length, which the HTTP parser already caps.
      for (const part of this.query.split('&')) {
        if (part === '') continue;
        const eq = part.indexOf('=');
        const k = decode(eq === -1 ? part : part.slice(0, eq));
        // First occurrence wins, as in Envoy's query parameter matcher.
        if (!this.#params.has(k)) this.#params.set(k, eq === -1 ? '' : decode(part.slice(eq + 1)));
      }
    }
    return this.#params.get(name);
  }
}

function decode(s: string): string {
  if (s.indexOf('%') === -1 && s.indexOf('+') === -1) return s;
  try {
    return decodeURIComponent(s.replace(/\+/g, ' '));
  } catch {
    return s;
  }
}

function matchOne(m: CompiledMatch, req: RouteRequest, pathOnly: string, query: QueryView | undefined): boolean {
  if (m.port !== undefined && m.port !== req.port) return false;
  if (m.path !== undefined && !m.path(m.pathIncludesQuery ? req.path : pathOnly)) return false;
  if (m.method !== undefined && !m.method(req.method)) return false;
  if (m.authority !== undefined && !m.authority(req.authority)) return false;
  if (m.scheme !== undefined && !m.scheme(req.scheme)) return false;
  for (let i = 0; i < m.headers.length; i++) {
    const h = m.headers[i]!;
    const v = headerValue(req.headers, h.name);
    const ok = v !== undefined && (h.test === undefined || h.test(v));
    if (ok === h.invert) return false;
  }
  if (m.query.length > 0) {
    const q = query ?? new QueryView('');
    for (let i = 0; i < m.query.length; i++) {
      const p = m.query[i]!;
      const v = q.get(p.name);
      if (v === undefined || (p.test !== undefined && !p.test(v))) return false;
    }
  }
  return true;
}

/**
 * The first route of `vhost` that the request matches, with the match that selected it.
 * @example matchRoute(vh, { path: '/api/v1?x=1', method: 'GET', authority: 'a.example.com', scheme: 'https', headers: {}, port: 443 })
 */
export function matchRoute(vhost: VirtualHost, req: RouteRequest): RouteSelection | undefined {
  const routes = compileRoutes(vhost);
  const qm = req.path.indexOf('?');
  const pathOnly = qm === -1 ? req.path : req.path.slice(0, qm);
  const query = qm === -1 ? undefined : new QueryView(req.path.slice(qm + 1));
  for (let r = 0; r < routes.length; r++) {
    const cr = routes[r]!;
    if (cr.matches.length === 0) return { route: cr.route, match: undefined };
    for (let i = 0; i < cr.matches.length; i++) {
      if (matchOne(cr.matches[i]!, req, pathOnly, query)) return { route: cr.route, match: cr.matches[i]!.source };
    }
  }
  return undefined;
}

/** The first route of `vhost` that the request matches. */
export function selectRoute(vhost: VirtualHost, req: RouteRequest): Route | undefined {
  return matchRoute(vhost, req)?.route;
}

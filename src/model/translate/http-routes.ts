/**
 * VirtualService `http[]` -> Routes for one Gateway server. Order is Istio's: the first route
 * whose any-match succeeds wins. Matches scoped to other gateways or ports are dropped here, so
 * the runtime only evaluates what can apply to this listener.
 */
import type { VirtualServiceResource } from '../../config/resource.js';
import type { HeaderOperations, HttpMatchRequest, HttpRoute, StringMatch } from '../../config/types/istio.js';
import type { HeaderMutation, Route, RouteAction, RouteMatch, StringMatcher, WeightedCluster, RetryPolicy } from '../snapshot.js';
import type { ClusterBuilder } from './clusters.js';
import { parseDuration, type TranslateContext } from './context.js';

/** Istio's default retry policy when `retries` is not set. */
const DEFAULT_RETRY: RetryPolicy = { attempts: 2, retryOn: ['connect-failure', 'refused-stream', 'unavailable', 'cancelled', '503'] };

export interface BindingScope {
  gatewayKey: string; // "ns/name", or "mesh" for sidecars
  /** The server port; undefined for a sidecar's outbound proxy, where the request's port decides at run time. */
  port: number | undefined;
  vsGateways: string[]; // the VS top-level gateways, normalised to ns/name or "mesh"
}

export function normaliseGateways(list: string[] | undefined, ns: string): string[] {
  return (list && list.length ? list : ['mesh']).map((g) => (g === 'mesh' || g.includes('/') ? g : `${ns}/${g}`));
}

/** Whether a match entry applies to this gateway/port (per-match gateways override the VS list). */
export function matchApplies(m: { gateways?: string[]; port?: number }, vsNs: string, scope: BindingScope): boolean {
  const gws = m.gateways?.length ? normaliseGateways(m.gateways, vsNs) : scope.vsGateways;
  if (!gws.includes(scope.gatewayKey)) return false;
  return m.port === undefined || scope.port === undefined || m.port === scope.port;
}

export function buildHttpRoutes(ctx: TranslateContext, clusters: ClusterBuilder, vs: VirtualServiceResource, scope: BindingScope, fallbackPort?: number): Route[] {
  const routes: Route[] = [];
  const ns = vs.metadata.namespace;
  (vs.spec.http ?? []).forEach((hr, i) => {
    const path = `spec.http[${i}]`;
    let matches: RouteMatch[] = [];
    if (hr.match && hr.match.length > 0) {
      for (let j = 0; j < hr.match.length; j++) {
        const m = hr.match[j]!;
        if (!matchApplies(m, ns, scope)) continue;
        const rm = routeMatch(ctx, vs, `${path}.match[${j}]`, m);
        if (rm && scope.port === undefined && m.port !== undefined) rm.port = m.port;
        if (rm) matches.push(rm);
      }
      if (matches.length === 0) return; // no match entry applies to this gateway/port
    } else if (!scope.vsGateways.includes(scope.gatewayKey)) {
      return;
    }
    const action = routeAction(ctx, clusters, vs, path, hr, scope.port ?? fallbackPort);
    if (!action) return;
    const route: Route = {
      name: hr.name ? `${ns}/${vs.metadata.name}#${hr.name}` : `${ns}/${vs.metadata.name}#http[${i}]`,
      matches,
      action,
      origin: ctx.origin(vs, path),
    };
    const rq = mutation(hr.headers?.request), rs = mutation(hr.headers?.response);
    if (rq) route.requestHeaders = rq;
    if (rs) route.responseHeaders = rs;
    routes.push(route);
    matches = [];
  });
  return routes;
}

function stringMatcher(ctx: TranslateContext, vs: VirtualServiceResource, path: string, s: StringMatch, ignoreCase = false): StringMatcher | undefined {
  if (s.exact !== undefined) return ignoreCase ? { kind: 'exact', value: s.exact, ignoreCase } : { kind: 'exact', value: s.exact };
  if (s.prefix !== undefined) return ignoreCase ? { kind: 'prefix', value: s.prefix, ignoreCase } : { kind: 'prefix', value: s.prefix };
  if (s.regex !== undefined) {
    try {
      new RegExp(`^(?:${s.regex})$`);
    } catch (e) {
      ctx.error('TG3020', vs, `${path}.regex`, `regular expression does not compile: ${(e as Error).message}`);
      return undefined;
    }
    return { kind: 'regex', value: s.regex };
  }
  return { kind: 'present' };
}

const PSEUDO_HEADER_KEYS = new Set(['uri', 'scheme', 'method', 'authority']);

function routeMatch(ctx: TranslateContext, vs: VirtualServiceResource, path: string, m: HttpMatchRequest): RouteMatch | undefined {
  const rm: RouteMatch = { headers: [], queryParams: [] };
  let ok = true;
  const sm = (p: string, s: StringMatch | undefined, ic = false) => {
    if (!s) return undefined;
    const r = stringMatcher(ctx, vs, p, s, ic);
    if (!r) ok = false;
    return r;
  };
  const uri = sm(`${path}.uri`, m.uri, m.ignoreUriCase === true);
  if (uri) rm.path = uri;
  const method = sm(`${path}.method`, m.method);
  if (method) rm.method = method;
  const authority = sm(`${path}.authority`, m.authority);
  if (authority) rm.authority = authority;
  const scheme = sm(`${path}.scheme`, m.scheme);
  if (scheme) rm.scheme = scheme;
  for (const [key, invert] of [['headers', false], ['withoutHeaders', true]] as const) {
    for (const [name, s] of Object.entries(m[key] ?? {})) {
      const lname = name.toLowerCase();
      if (PSEUDO_HEADER_KEYS.has(lname)) {
        ctx.warn('TG2004', vs, `${path}.${key}.${name}`, `header key "${name}" is ignored here: use the ${lname} match field`);
        continue;
      }
      const r = sm(`${path}.${key}.${name}`, s);
      if (r) rm.headers.push({ name: lname, matcher: r, invert });
    }
  }
  for (const [name, s] of Object.entries(m.queryParams ?? {})) {
    const r = sm(`${path}.queryParams.${name}`, s);
    if (r) rm.queryParams.push({ name, matcher: r });
  }
  if (m.sourceLabels || m.sourceNamespace) {
    ctx.warn('TG2004', vs, `${path}.${m.sourceLabels ? 'sourceLabels' : 'sourceNamespace'}`, 'sourceLabels/sourceNamespace select sidecar workloads; they do not apply at a gateway and are ignored here');
  }
  return ok ? rm : undefined;
}

function mutation(ops: HeaderOperations | undefined): HeaderMutation | undefined {
  if (!ops) return undefined;
  const m: HeaderMutation = {
    set: Object.entries(ops.set ?? {}).map(([k, v]) => [k.toLowerCase(), v]),
    add: Object.entries(ops.add ?? {}).map(([k, v]) => [k.toLowerCase(), v]),
    remove: (ops.remove ?? []).map((k) => k.toLowerCase()),
  };
  return m.set.length || m.add.length || m.remove.length ? m : undefined;
}

function routeAction(ctx: TranslateContext, clusters: ClusterBuilder, vs: VirtualServiceResource, path: string, hr: HttpRoute, port: number | undefined): RouteAction | undefined {
  for (const f of ['delegate', 'fault', 'mirror', 'mirrors', 'mirrorPercentage', 'mirrorPercent', 'corsPolicy'] as const) {
    if (hr[f] !== undefined) {
      ctx.error('TG4001', vs, `${path}.${f}`, `not supported yet: ${f}`, 'remove the field, or serve this route with Istio');
      return undefined;
    }
  }
  if (hr.redirect) {
    const r = hr.redirect;
    const a: RouteAction = { kind: 'redirect', code: r.redirectCode ?? 301 };
    if (r.scheme) a.scheme = r.scheme;
    if (r.authority) a.authority = r.authority;
    if (r.port) a.port = r.port;
    if (r.derivePort) a.derivePort = r.derivePort;
    if (r.uri) a.path = r.uri;
    return a;
  }
  if (hr.directResponse) {
    const d = hr.directResponse;
    const a: RouteAction = { kind: 'direct', status: d.status };
    if (d.body?.string !== undefined) a.body = d.body.string;
    else if (d.body?.bytes !== undefined) a.bodyBase64 = d.body.bytes;
    return a;
  }
  if (!hr.route || hr.route.length === 0) {
    ctx.error('TG2001', vs, `${path}.route`, 'an http route needs one of route, redirect or directResponse');
    return undefined;
  }
  const weighted: WeightedCluster[] = [];
  const anyWeight = hr.route.some((d) => d.weight !== undefined);
  for (let k = 0; k < hr.route.length; k++) {
    const d = hr.route[k]!;
    const name = clusters.clusterFor({ owner: vs, path: `${path}.route[${k}].destination`, destination: d.destination, fallbackPort: port, carries: 'http' });
    if (!name) return undefined;
    const weight = hr.route.length === 1 ? 100 : anyWeight ? (d.weight ?? 0) : 1;
    const wc: WeightedCluster = { cluster: name, weight };
    const rq = mutation(d.headers?.request), rs = mutation(d.headers?.response);
    if (rq) wc.requestHeaders = rq;
    if (rs) wc.responseHeaders = rs;
    weighted.push(wc);
  }
  if (weighted.every((w) => w.weight === 0)) {
    ctx.error('TG2005', vs, `${path}.route`, 'all destination weights are 0: no traffic can be routed');
    return undefined;
  }
  const a: RouteAction & { kind: 'route' } = { kind: 'route', clusters: weighted };
  if (hr.rewrite) {
    if (hr.rewrite.uri !== undefined) a.rewritePathPrefix = hr.rewrite.uri;
    if (hr.rewrite.authority !== undefined) a.rewriteAuthority = hr.rewrite.authority;
    if (hr.rewrite.uriRegexRewrite) {
      try {
        new RegExp(hr.rewrite.uriRegexRewrite.match);
        a.rewriteRegex = { pattern: hr.rewrite.uriRegexRewrite.match, substitution: hr.rewrite.uriRegexRewrite.rewrite };
      } catch (e) {
        ctx.error('TG3020', vs, `${path}.rewrite.uriRegexRewrite.match`, `regular expression does not compile: ${(e as Error).message}`);
        return undefined;
      }
    }
  }
  const t = parseDuration(hr.timeout);
  if (t !== undefined) {
    if (Number.isNaN(t)) { ctx.error('TG2005', vs, `${path}.timeout`, `invalid duration "${hr.timeout}"`, 'use e.g. 500ms, 10s, 1m'); return undefined; }
    if (t > 0) a.timeoutMs = t;
  }
  if (hr.retries) {
    const r = hr.retries;
    const attempts = r.attempts ?? 0;
    if (attempts > 0) {
      const rp: RetryPolicy = { attempts, retryOn: (r.retryOn ?? 'connect-failure,refused-stream,unavailable,cancelled,503').split(',').map((x) => x.trim()).filter(Boolean) };
      const pt = parseDuration(r.perTryTimeout);
      if (pt !== undefined) {
        if (Number.isNaN(pt) || pt < 1) { ctx.error('TG2005', vs, `${path}.retries.perTryTimeout`, `invalid perTryTimeout "${r.perTryTimeout}" (at least 1ms)`); return undefined; }
        rp.perTryTimeoutMs = pt;
      }
      a.retry = rp;
    }
    if (r.retryRemoteLocalities !== undefined) ctx.warn('TG2004', vs, `${path}.retries.retryRemoteLocalities`, 'retryRemoteLocalities has no effect: tlsgate has no localities');
  } else {
    a.retry = DEFAULT_RETRY;
  }
  return a;
}

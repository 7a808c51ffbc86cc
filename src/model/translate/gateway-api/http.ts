/**
 * HTTPRoute rules -> Routes. One Route per (rule, match), so the Gateway API's precedence can be
 * expressed as list order (the runtime takes the first route that matches):
 *   Exact path > longest PathPrefix > RegularExpression > method > most headers > most query
 *   params > oldest route > namespace/name > rule order > match order.
 * PathPrefix is element-wise (`/abc` matches `/abc` and `/abc/x`, never `/abcd`), expressed as an
 * anchored regex unless the prefix is `/`.
 */
import type { GatewayApiResource } from '../../../config/resource.js';
import type { HeaderMutation, Route, RouteAction, RouteMatch, WeightedCluster } from '../../snapshot.js';
import type { TranslateContext } from '../context.js';
import type { GatewayApiRefs } from './refs.js';
import type { StatusBook } from './status.js';
import { specOf, type GrpcMatch, type GrpcRouteSpec, type HeaderOps, type HttpFilter, type HttpMatch, type HttpRule, type RouteSpec } from './types.js';

/** A route with what orders it among the routes of one virtual host. */
export interface RankedRoute {
  route: Route;
  rank: readonly (number | string)[];
}

export function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Gateway API durations: up to four `<n><unit>` pairs, units h, m, s, ms. NaN when malformed. */
export function parseGatewayDuration(v: string): number {
  if (!/^([0-9]{1,5}(h|m|s|ms)){1,4}$/.test(v)) return NaN;
  let ms = 0;
  for (const m of v.matchAll(/([0-9]+)(ms|h|m|s)/g)) {
    const n = Number(m[1]);
    ms += m[2] === 'h' ? n * 3_600_000 : m[2] === 'm' ? n * 60_000 : m[2] === 's' ? n * 1000 : n;
  }
  return ms;
}

function mutation(ops: HeaderOps | undefined): HeaderMutation | undefined {
  if (!ops) return undefined;
  const m: HeaderMutation = {
    set: (ops.set ?? []).map((h) => [h.name.toLowerCase(), h.value]),
    add: (ops.add ?? []).map((h) => [h.name.toLowerCase(), h.value]),
    remove: (ops.remove ?? []).map((h) => h.toLowerCase()),
  };
  return m.set.length || m.add.length || m.remove.length ? m : undefined;
}

/** Normalised PathPrefix value: no trailing slash ("" for "/"). */
function prefixOf(v: string): string {
  return v === '/' ? '' : v.replace(/\/+$/, '');
}

function compiles(re: string): string | undefined {
  try { new RegExp(`^(?:${re})$`); return undefined; } catch (e) { return (e as Error).message; }
}

export class HttpRouteBuilder {
  readonly #cache = new Map<GatewayApiResource, RankedRoute[]>();

  constructor(private readonly ctx: TranslateContext, private readonly refs: GatewayApiRefs, private readonly book: StatusBook) {}

  /** The ranked routes of one HTTPRoute (built once, shared by every listener it attaches to). */
  routes(hr: GatewayApiResource, age: number): RankedRoute[] {
    let out = this.#cache.get(hr);
    if (out) return out;
    out = [];
    const spec = specOf<RouteSpec>(hr);
    (spec.rules ?? [{}]).forEach((rule: HttpRule, i) => {
      const path = `spec.rules[${i}]`;
      const action = this.#action(hr, path, rule);
      const filters = rule.filters ?? [];
      const reqH = mutation(filters.find((f) => f.type === 'RequestHeaderModifier')?.requestHeaderModifier);
      const resH = mutation(filters.find((f) => f.type === 'ResponseHeaderModifier')?.responseHeaderModifier);
      const matches = rule.matches?.length ? rule.matches : [{ path: { type: 'PathPrefix' as const, value: '/' } }];
      matches.forEach((m, j) => {
        const built = this.#match(hr, `${path}.matches[${j}]`, m);
        if (!built) return;
        const route: Route = {
          name: `${hr.metadata.namespace}/${hr.metadata.name}#rules[${i}]${rule.matches?.length ? `.matches[${j}]` : ''}`,
          matches: [built.match],
          action: this.#rewriteFor(action, built.prefix),
          origin: this.ctx.origin(hr, rule.matches?.length ? `${path}.matches[${j}]` : path),
        };
        if (reqH) route.requestHeaders = reqH;
        if (resH) route.responseHeaders = resH;
        out!.push({ route, rank: [...built.rank, age, `${hr.metadata.namespace}/${hr.metadata.name}`, i, j] });
      });
    });
    this.#cache.set(hr, out);
    return out;
  }

  /**
   * The ranked routes of one GRPCRoute. A gRPC call is an HTTP/2 POST to `/<service>/<method>`,
   * so a method match is a path match: Exact service and method is an exact path, one of them
   * alone or RegularExpression is an anchored regex. Ranked by the spec's gRPC precedence
   * (characters of the service, of the method, number of headers), then age and name.
   */
  grpcRoutes(gr: GatewayApiResource, age: number): RankedRoute[] {
    let out = this.#cache.get(gr);
    if (out) return out;
    out = [];
    const spec = specOf<GrpcRouteSpec>(gr);
    (spec.rules ?? [{}]).forEach((rule, i) => {
      const path = `spec.rules[${i}]`;
      const { matches: _matches, ...rest } = rule;
      const action = this.#action(gr, path, rest as HttpRule, true);
      const filters = rule.filters ?? [];
      const reqH = mutation(filters.find((f) => f.type === 'RequestHeaderModifier')?.requestHeaderModifier);
      const resH = mutation(filters.find((f) => f.type === 'ResponseHeaderModifier')?.responseHeaderModifier);
      const matches: GrpcMatch[] = rule.matches?.length ? rule.matches : [{}];
      matches.forEach((m, j) => {
        const built = this.#grpcMatch(gr, `${path}.matches[${j}]`, m);
        if (!built) return;
        const route: Route = {
          name: `${gr.metadata.namespace}/${gr.metadata.name}#rules[${i}]${rule.matches?.length ? `.matches[${j}]` : ''}`,
          matches: [built.match],
          action,
          origin: this.ctx.origin(gr, rule.matches?.length ? `${path}.matches[${j}]` : path),
        };
        if (reqH) route.requestHeaders = reqH;
        if (resH) route.responseHeaders = resH;
        out!.push({ route, rank: [...built.rank, age, `${gr.metadata.namespace}/${gr.metadata.name}`, i, j] });
      });
    });
    this.#cache.set(gr, out);
    return out;
  }

  #grpcMatch(gr: GatewayApiResource, path: string, m: GrpcMatch): { match: RouteMatch; rank: (number | string)[] } | undefined {
    const rm: RouteMatch = { headers: [], queryParams: [] };
    const mm = m.method;
    const type = mm?.type ?? 'Exact';
    const service = mm?.service ?? '', method = mm?.method ?? '';
    if (mm && service === '' && method === '') {
      this.#unsupported(gr, `${path}.method`, 'one or both of service and method must be set');
      return undefined;
    }
    if (type === 'Exact') {
      if (service !== '' && !/^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$/.test(service)) { this.#unsupported(gr, `${path}.method.service`, `service "${service}" is not a valid gRPC service name`); return undefined; }
      if (method !== '' && !/^[A-Za-z_][A-Za-z_0-9]*$/.test(method)) { this.#unsupported(gr, `${path}.method.method`, `method "${method}" is not a valid gRPC method name`); return undefined; }
      if (service !== '' && method !== '') rm.path = { kind: 'exact', value: `/${service}/${method}` };
      else if (service !== '') rm.path = { kind: 'regex', value: `/${escapeRegex(service)}/[^/]+` };
      else if (method !== '') rm.path = { kind: 'regex', value: `/[^/]+/${escapeRegex(method)}` };
      else rm.path = { kind: 'prefix', value: '/' };
    } else {
      for (const [field, re] of [['service', service], ['method', method]] as const) {
        // Standalone too: `a)|(.*` compiles once wrapped in a group but would escape it.
        const err = re === '' ? undefined : compiles(re) ?? (() => { try { new RegExp(re); return undefined; } catch (e) { return (e as Error).message; } })();
        if (err) { this.ctx.warn('TG3020', gr, `${path}.method.${field}`, `regular expression does not compile: ${err}: this match is skipped`); return undefined; }
      }
      rm.path = { kind: 'regex', value: `/(?:${service || '[^/]+'})/(?:${method || '[^/]+'})` };
    }
    const headers = m.headers ?? [];
    for (let k = 0; k < headers.length; k++) {
      const h = headers[k]!;
      if (h.type === 'RegularExpression') {
        const err = compiles(h.value);
        if (err) { this.ctx.warn('TG3020', gr, `${path}.headers[${k}].value`, `regular expression does not compile: ${err}: this match is skipped`); return undefined; }
      }
      rm.headers.push({ name: h.name.toLowerCase(), matcher: h.type === 'RegularExpression' ? { kind: 'regex', value: h.value } : { kind: 'exact', value: h.value }, invert: false });
    }
    return { match: rm, rank: [-service.length, -method.length, -headers.length] };
  }

  #match(hr: GatewayApiResource, path: string, m: HttpMatch): { match: RouteMatch; rank: number[]; prefix?: string } | undefined {
    const rm: RouteMatch = { headers: [], queryParams: [] };
    const type = m.path?.type ?? 'PathPrefix';
    const value = m.path?.value ?? '/';
    let kindRank = 1, len = 0, prefix: string | undefined;
    if (!value.startsWith('/') && type !== 'RegularExpression') {
      this.#unsupported(hr, `${path}.path.value`, `path "${value}" must start with "/"`);
      return undefined;
    }
    if (type === 'Exact') { rm.path = { kind: 'exact', value }; kindRank = 0; len = value.length; }
    else if (type === 'PathPrefix') {
      prefix = prefixOf(value);
      rm.path = prefix === '' ? { kind: 'prefix', value: '/' } : { kind: 'regex', value: `${escapeRegex(prefix)}(/.*)?` };
      len = prefix.length + 1;
    } else {
      const err = compiles(value);
      if (err) { this.ctx.warn('TG3020', hr, `${path}.path.value`, `regular expression does not compile: ${err}: this match is skipped`); return undefined; }
      rm.path = { kind: 'regex', value }; kindRank = 2; len = value.length;
    }
    for (const [field, list] of [['headers', m.headers ?? []], ['queryParams', m.queryParams ?? []]] as const) {
      for (let k = 0; k < list.length; k++) {
        const h = list[k]!;
        if (h.type === 'RegularExpression') {
          const err = compiles(h.value);
          if (err) { this.ctx.warn('TG3020', hr, `${path}.${field}[${k}].value`, `regular expression does not compile: ${err}: this match is skipped`); return undefined; }
        }
        const matcher = h.type === 'RegularExpression' ? { kind: 'regex' as const, value: h.value } : { kind: 'exact' as const, value: h.value };
        if (field === 'headers') rm.headers.push({ name: h.name.toLowerCase(), matcher, invert: false });
        else rm.queryParams.push({ name: h.name, matcher });
      }
    }
    if (m.method) rm.method = { kind: 'exact', value: m.method };
    // Smaller sorts first.
    const rank = [kindRank, -len, m.method ? 0 : 1, -(m.headers?.length ?? 0), -(m.queryParams?.length ?? 0)];
    const out: { match: RouteMatch; rank: number[]; prefix?: string } = { match: rm, rank };
    if (prefix !== undefined) out.prefix = prefix;
    return out;
  }

  #unsupported(hr: GatewayApiResource, path: string, message: string): void {
    this.ctx.warn('TG6016', hr, path, `${message} (UnsupportedValue)`);
    this.book.set(hr, '', { type: 'Accepted', status: 'False', reason: 'UnsupportedValue', message });
  }

  /** The action of a rule before per-match prefix rewrites. */
  #action(hr: GatewayApiResource, path: string, rule: HttpRule, grpc = false): RouteAction {
    const fail: RouteAction = { kind: 'direct', status: 500, body: 'no valid backend\n' };
    const filters = rule.filters ?? [];
    const known = grpc ? ['RequestHeaderModifier', 'ResponseHeaderModifier'] : ['RequestHeaderModifier', 'ResponseHeaderModifier', 'RequestRedirect', 'URLRewrite'];
    for (let k = 0; k < filters.length; k++) {
      const f = filters[k]!;
      if (!known.includes(f.type)) {
        this.ctx.warn('TG4001', hr, `${path}.filters[${k}]`, `not supported yet: filter ${f.type}: requests matched by this rule get 500`);
        return fail;
      }
    }
    const redirect = filters.find((f) => f.type === 'RequestRedirect')?.requestRedirect;
    const rewrite = filters.find((f) => f.type === 'URLRewrite')?.urlRewrite;
    if (redirect && rewrite) {
      this.#unsupported(hr, `${path}.filters`, 'RequestRedirect and URLRewrite cannot be used together');
      return fail;
    }
    if (redirect) {
      const a: RouteAction = { kind: 'redirect', code: redirect.statusCode ?? 302 };
      if (redirect.scheme) a.scheme = redirect.scheme;
      if (redirect.hostname) a.authority = redirect.hostname;
      // Port unset: the scheme's well-known port when the scheme changes, else the request's.
      if (redirect.port !== undefined) a.port = redirect.port;
      else a.derivePort = redirect.scheme ? 'FROM_PROTOCOL_DEFAULT' : 'FROM_REQUEST_PORT';
      if (redirect.path?.type === 'ReplaceFullPath') a.path = redirect.path.replaceFullPath ?? '/';
      else if (redirect.path?.type === 'ReplacePrefixMatch') {
        this.ctx.warn('TG4001', hr, `${path}.filters`, 'not supported yet: RequestRedirect path ReplacePrefixMatch: requests matched by this rule get 500');
        return fail;
      }
      return a;
    }
    const weighted: WeightedCluster[] = [];
    const invalid: WeightedCluster[] = [];
    const refs = rule.backendRefs ?? [];
    refs.forEach((b, k) => {
      const cluster = this.refs.backend(hr, `${path}.backendRefs[${k}]`, b, 'http', grpc);
      if (!cluster) {
        if ((b.weight ?? 1) > 0) invalid.push({ cluster: this.refs.invalidBackend(hr, `${path}.backendRefs[${k}]`), weight: b.weight ?? 1 });
        return;
      }
      const wc: WeightedCluster = { cluster, weight: b.weight ?? 1 };
      const bf: HttpFilter[] = b.filters ?? [];
      const rq = mutation(bf.find((f) => f.type === 'RequestHeaderModifier')?.requestHeaderModifier);
      const rs = mutation(bf.find((f) => f.type === 'ResponseHeaderModifier')?.responseHeaderModifier);
      if (rq) wc.requestHeaders = rq;
      if (rs) wc.responseHeaders = rs;
      weighted.push(wc);
    });
    if (weighted.length === 0 || weighted.every((w) => w.weight === 0)) {
      if (refs.length === 0) this.ctx.info('TG6016', hr, path, 'rule has no backendRefs and no redirect: requests matched by it get 500');
      return fail;
    }
    // An invalid backendRef keeps its share: those requests get 500 (Gateway API), not a valid backend.
    weighted.push(...invalid);
    const a: RouteAction & { kind: 'route' } = { kind: 'route', clusters: weighted };
    if (rewrite?.hostname) a.rewriteAuthority = rewrite.hostname;
    if (rewrite?.path?.type === 'ReplaceFullPath') a.rewritePath = rewrite.path.replaceFullPath ?? '/';
    else if (rewrite?.path?.type === 'ReplacePrefixMatch') a.rewritePathPrefix = rewrite.path.replacePrefixMatch ?? '/';
    // Fields of a rule that tlsgate does not implement are named, never silently dropped.
    const extra = rule as unknown as Record<string, unknown>;
    for (const f of ['retry', 'sessionPersistence'] as const) {
      if (extra[f] !== undefined) this.ctx.warn('TG4001', hr, `${path}.${f}`, `not supported yet: ${f}: it has no effect`, 'remove it, or expect requests to behave as without it');
    }
    if (rule.timeouts?.backendRequest !== undefined) {
      this.ctx.warn('TG4001', hr, `${path}.timeouts.backendRequest`, 'not supported yet: timeouts.backendRequest: it has no effect (timeouts.request applies)');
    }
    if (rule.timeouts?.request !== undefined) {
      const t = parseGatewayDuration(rule.timeouts.request);
      if (Number.isNaN(t)) this.ctx.warn('TG2005', hr, `${path}.timeouts.request`, `invalid duration "${rule.timeouts.request}": ignored`, 'use e.g. 500ms, 10s, 1m30s');
      else if (t > 0) a.timeoutMs = t;
    }
    return a;
  }

  /**
   * ReplacePrefixMatch needs the matched prefix: element-wise, so `/abc` -> `/xyz` turns `/abc/d`
   * into `/xyz/d`, and a replacement `/` never leaves `//`.
   */
  #rewriteFor(a: RouteAction, prefix: string | undefined): RouteAction {
    if (a.kind !== 'route' || a.rewritePathPrefix === undefined) return a;
    const { rewritePathPrefix, ...rest } = a;
    const repl = rewritePathPrefix === '/' ? '/' : rewritePathPrefix.replace(/\/+$/, '');
    if (prefix === undefined) return { ...rest, rewritePath: rewritePathPrefix }; // Exact/regex: the whole path was the match
    if (prefix === '') return { ...rest, rewriteRegex: { pattern: '^/', substitution: repl === '/' ? '/' : repl + '/' } };
    return { ...rest, rewriteRegex: repl === '/' ? { pattern: `^${escapeRegex(prefix)}/?`, substitution: '/' } : { pattern: `^${escapeRegex(prefix)}`, substitution: repl } };
  }
}

/** Orders ranked routes: smaller rank first, element by element. */
export function compareRank(a: RankedRoute, b: RankedRoute): number {
  for (let i = 0; i < Math.max(a.rank.length, b.rank.length); i++) {
    const x = a.rank[i], y = b.rank[i];
    if (x === y) continue;
    if (x === undefined) return -1;
    if (y === undefined) return 1;
    return x < y ? -1 : 1;
  }
  return 0;
}

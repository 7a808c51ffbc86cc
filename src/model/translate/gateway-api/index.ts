/**
 * Kubernetes Gateway API (gateway.networking.k8s.io) -> the same Snapshot the Istio resources
 * become. Gateways of class `tlsgate` or `istio` (or of a GatewayClass whose controllerName is
 * `tlsgate.io/gateway-controller`) are served:
 * - listeners are validated and grouped by port; HTTP listeners of a port share one route table,
 *   HTTPS and TLS listeners get one filter chain each, chosen by SNI (their hostname);
 * - routes attach to listeners through parentRefs (sectionName, port), allowedRoutes (namespaces,
 *   kinds) and hostname intersection; HTTPRoute and GRPCRoute rules are ordered by the spec's
 *   precedence (a gRPC method is the path /<service>/<method>);
 * - TLSRoutes on Passthrough listeners become SNI chains that pipe bytes; TCPRoutes take a port;
 * - backends are Service clusters (refs.ts) with BackendTLSPolicy, DestinationRules and the
 *   Gateway's backend client certificate;
 * - what a controller would write to `status` is computed (StatusBook) and reported.
 * Pure, like the rest of translate.
 */
import type { GatewayApiResource } from '../../../config/resource.js';
import type { DownstreamTlsContext, FilterChain, HttpConnectionManager, Listener, ResourceStatus, TcpProxy, VirtualHost, WeightedCluster } from '../../snapshot.js';
import type { ClusterBuilder } from '../clusters.js';
import type { TranslateContext } from '../context.js';
import { byAge, computeMisdirected } from '../gateways.js';
import { checkHostPattern, hostSubsetOf } from '../hosts.js';
import { ISTIO_CIPHER_SUITES } from '../tls-context.js';
import { compareRank, HttpRouteBuilder, type RankedRoute } from './http.js';
import { GatewayApiRefs } from './refs.js';
import { StatusBook } from './status.js';
import { GROUP, groupOf, specOf, type FrontendValidation, type GatewaySpec, type LabelSelector, type ListenerSpec, type RouteSpec } from './types.js';

export { mergeStatuses } from './status.js';
export { parseGatewayDuration } from './http.js';

export const CONTROLLER_NAME = 'tlsgate.io/gateway-controller';
/** Class names served without a GatewayClass object, so Istio users' YAML works unchanged. */
export const BUILTIN_CLASSES = ['tlsgate', 'istio'];
const TERMINATE_MODE_OPTION = 'gateway.istio.io/tls-terminate-mode';
const CIPHER_OPTION = 'gateway.istio.io/tls-cipher-suites';
const ROUTE_KINDS = ['HTTPRoute', 'GRPCRoute', 'TLSRoute', 'TCPRoute'];
/** Route kinds whose rules match nothing: the apiVersions where the spec allows a single rule. */
const ONE_RULE_VERSIONS = new Set([`${GROUP}/v1`, `${GROUP}/v1alpha3`]);
const SUPPORTED_KINDS = new Set(['GatewayClass', 'Gateway', ...ROUTE_KINDS, 'BackendTLSPolicy', 'ReferenceGrant']);

type Cls = 'http' | 'tls' | 'tcp';

interface Attachment { route: GatewayApiResource; hosts: string[]; age: number; scope: string }

interface ListenerEntry {
  gw: GatewayApiResource;
  gwKey: string;
  spec: ListenerSpec;
  path: string;
  scope: string; // status scope: "listener <name>"
  protocol: string;
  cls: Cls;
  hostname?: string;
  port: number;
  address: string;
  passthrough: boolean;
  tls?: DownstreamTlsContext;
  kinds: Set<string>;
  accepted: boolean;
  programmed: boolean;
  routes: Attachment[];
}

export interface GatewayApiOutput {
  listeners: Listener[];
  statuses: ResourceStatus[];
  /** The Gateway and listener each built listener came from (for conflicts when merging). */
  owners: Map<Listener, { gw: GatewayApiResource; path: string }>;
}

/**
 * The hostnames a route serves through a listener (Gateway API intersection): with no listener
 * hostname every route hostname; with no route hostnames the listener's; otherwise the more
 * specific of each overlapping pair. `*` stands for "any".
 */
export function intersectHostnames(listenerHost: string | undefined, routeHosts: readonly string[]): string[] {
  const lh = listenerHost?.toLowerCase();
  if (routeHosts.length === 0) return [lh ?? '*'];
  const out: string[] = [];
  for (const raw of routeHosts) {
    const rh = raw.toLowerCase();
    const h = lh === undefined ? rh : hostSubsetOf(rh, lh) ? rh : hostSubsetOf(lh, rh) ? lh : undefined;
    if (h !== undefined && !out.includes(h)) out.push(h);
  }
  return out;
}

/** allowedRoutes.namespaces.selector, evaluated on the only namespace label known without Namespace objects. */
export function selectorMatchesNamespace(sel: LabelSelector | undefined, ns: string): boolean {
  const labels: Record<string, string> = { 'kubernetes.io/metadata.name': ns };
  if (!sel) return true;
  for (const [k, v] of Object.entries(sel.matchLabels ?? {})) if (labels[k] !== v) return false;
  for (const e of sel.matchExpressions ?? []) {
    const has = e.key in labels, val = labels[e.key];
    const ok = e.operator === 'In' ? has && (e.values ?? []).includes(val!)
      : e.operator === 'NotIn' ? !has || !(e.values ?? []).includes(val!)
        : e.operator === 'Exists' ? has : !has;
    if (!ok) return false;
  }
  return true;
}

function classOf(protocol: string): Cls | undefined {
  return protocol === 'HTTP' ? 'http' : protocol === 'HTTPS' || protocol === 'TLS' ? 'tls' : protocol === 'TCP' ? 'tcp' : undefined;
}

function ageIndex(list: GatewayApiResource[]): Map<GatewayApiResource, number> {
  return new Map([...list].sort(byAge).map((r, i) => [r, i]));
}

export function translateGatewayApi(ctx: TranslateContext, clusters: ClusterBuilder): GatewayApiOutput {
  const all = ctx.resources.gatewayApi;
  const book = new StatusBook();
  const owners = new Map<Listener, { gw: GatewayApiResource; path: string }>();
  if (all.length === 0) return { listeners: [], statuses: [], owners };
  const refs = new GatewayApiRefs(ctx, clusters, book);
  const http = new HttpRouteBuilder(ctx, refs, book);
  refs.touchGrants();
  for (const r of all) {
    if (!SUPPORTED_KINDS.has(r.kind)) ctx.warn('TG4001', r, 'kind', `not supported yet: ${r.kind} (${r.apiVersion}): ignored`);
  }

  // Classes: the built-in names, plus GatewayClasses that name our controller.
  const classes = new Map<string, boolean>(BUILTIN_CLASSES.map((c) => [c, true]));
  for (const gc of all.filter((r) => r.kind === 'GatewayClass')) {
    const ours = (gc.spec as { controllerName?: string }).controllerName === CONTROLLER_NAME;
    classes.set(gc.metadata.name, ours);
    ctx.touch(gc);
    if (ours) book.set(gc, '', { type: 'Accepted', status: 'True', reason: 'Accepted', message: `handled by ${CONTROLLER_NAME}` });
  }

  const gateways = all.filter((r) => r.kind === 'Gateway').sort(byAge);
  const served = new Set<string>();
  const entries: ListenerEntry[] = [];
  const byGateway = new Map<string, ListenerEntry[]>();
  for (const gw of gateways) {
    ctx.touch(gw);
    const spec = specOf<GatewaySpec>(gw);
    const key = `${gw.metadata.namespace}/${gw.metadata.name}`;
    if (classes.get(spec.gatewayClassName) !== true) {
      ctx.info('TG6001', gw, 'spec.gatewayClassName', `gatewayClassName "${spec.gatewayClassName}" is not handled by tlsgate: this Gateway is not served`,
        `use gatewayClassName tlsgate or istio, or a GatewayClass with controllerName ${CONTROLLER_NAME}`);
      continue;
    }
    served.add(key);
    const list: ListenerEntry[] = [];
    const names = new Set<string>();
    (spec.listeners ?? []).forEach((l, i) => {
      const e = validateListener(ctx, refs, book, gw, spec, l, i);
      if (names.has(l.name)) {
        ctx.warn('TG6002', gw, `spec.listeners[${i}].name`, `listener name "${l.name}" is used twice in this Gateway: the later one is not accepted`);
        if (e) { e.accepted = false; book.set(gw, e.scope, { type: 'Accepted', status: 'False', reason: 'Invalid', message: 'duplicate listener name' }); }
      }
      names.add(l.name);
      if (e) list.push(e);
    });
    byGateway.set(key, list);
    entries.push(...list);
  }
  detectConflicts(ctx, book, entries);

  // Routes attach to listeners.
  for (const kind of ROUTE_KINDS) {
    const routes = all.filter((r) => r.kind === kind);
    const ages = ageIndex(routes);
    for (const route of [...routes].sort(byAge)) {
      ctx.touch(route);
      attachRoute(ctx, book, route, ages.get(route)!, gateways, served, byGateway);
    }
  }

  // Listeners by bind address and port.
  const groups = new Map<string, ListenerEntry[]>();
  for (const e of entries) {
    if (!e.accepted) continue;
    const k = `${e.address}_${e.port}`;
    groups.set(k, [...(groups.get(k) ?? []), e]);
  }
  const listeners: Listener[] = [];
  for (const [name, list] of groups) {
    const first = list[0]!;
    const listener: Listener = {
      name, address: first.address, port: first.port,
      inspector: first.cls === 'tls' ? 'tls-inspector' : 'none',
      filterChains: [],
      clientHelloTimeoutMs: ctx.options.clientHelloTimeoutMs,
      maxClientHelloBytes: ctx.options.maxClientHelloBytes,
      origins: list.map((e) => ctx.origin(e.gw, e.path)),
    };
    if (first.cls === 'http') listener.filterChains.push(httpChain(ctx, book, http, list));
    else if (first.cls === 'tcp') {
      const fc = tcpChain(ctx, refs, first);
      if (fc) listener.filterChains.push(fc);
    } else listener.filterChains.push(...tlsChains(ctx, book, refs, http, list));
    computeMisdirected(listener);
    for (const e of list) {
      e.programmed = true;
      book.set(e.gw, e.scope, { type: 'Programmed', status: 'True', reason: 'Programmed', message: `${e.routes.length} route(s) attached` });
    }
    if (listener.filterChains.length > 0) {
      listeners.push(listener);
      owners.set(listener, { gw: first.gw, path: first.path });
    }
  }
  for (const gw of gateways) {
    const key = `${gw.metadata.namespace}/${gw.metadata.name}`;
    if (!served.has(key)) continue;
    const list = byGateway.get(key) ?? [];
    const declared = specOf<GatewaySpec>(gw).listeners ?? [];
    const ok = new Set(list.filter((e) => e.accepted).map((e) => e.spec));
    const invalid = declared.filter((l) => !ok.has(l)).map((l) => l.name);
    if (invalid.length === 0) book.set(gw, '', { type: 'Accepted', status: 'True', reason: 'Accepted', message: '' });
    else {
      // The spec's ListenersNotValid: accepted with the valid listeners only, or not at all.
      const accepted = declared.length - invalid.length;
      book.set(gw, '', { type: 'Accepted', status: accepted > 0 ? 'True' : 'False', reason: 'ListenersNotValid', message: `listener(s) not accepted: ${invalid.join(', ')}` });
    }
    const programmed = list.filter((e) => e.programmed).length;
    if (programmed > 0) {
      book.set(gw, '', { type: 'Programmed', status: 'True', reason: 'Programmed', message: `${programmed} of ${declared.length} listener(s) programmed` });
      ctx.info('TG6011', gw, 'spec.listeners', `Accepted, Programmed: ${programmed} of ${declared.length} listener(s) served`);
    } else {
      book.set(gw, '', { type: 'Programmed', status: 'False', reason: 'Invalid', message: 'no listener could be programmed' });
    }
  }
  backendClientCertificates(ctx, refs, book, clusters, gateways.filter((g) => served.has(`${g.metadata.namespace}/${g.metadata.name}`)), entries);
  listeners.sort((a, b) => a.port - b.port || (a.address < b.address ? -1 : 1));
  return { listeners, statuses: book.statuses(), owners };
}

/**
 * Gateway `spec.tls.backend.clientCertificateRef`: the certificate a Gateway presents to backends
 * it reaches over TLS (BackendTLSPolicy). Clusters are shared by every Gateway whose routes send
 * to the Service, so the certificate is added where all of those Gateways agree on it; a Service
 * reached from Gateways with different certificates (or one without) gets none, and that is said.
 */
function backendClientCertificates(ctx: TranslateContext, refs: GatewayApiRefs, book: StatusBook, clusters: ClusterBuilder, gateways: GatewayApiResource[], entries: ListenerEntry[]): void {
  const certs = new Map<string, { secret: string | undefined; gw: GatewayApiResource }>();
  for (const gw of gateways) {
    const ref = specOf<GatewaySpec>(gw).tls?.backend?.clientCertificateRef;
    if (!ref) continue;
    const path = 'spec.tls.backend.clientCertificateRef';
    const r = refs.certificate(gw, ref);
    if ('reason' in r) {
      ctx.warn(r.reason === 'RefNotPermitted' ? 'TG6005' : 'TG6004', gw, path, `${r.message}: no client certificate is presented to backends (${r.reason})`);
      book.set(gw, '', { type: 'ResolvedRefs', status: 'False', reason: r.reason, message: r.message });
      certs.set(`${gw.metadata.namespace}/${gw.metadata.name}`, { secret: undefined, gw });
    } else certs.set(`${gw.metadata.namespace}/${gw.metadata.name}`, { secret: r.secret, gw });
  }
  if (certs.size === 0) return;
  const routeGateways = new Map<GatewayApiResource, Set<string>>();
  for (const e of entries) {
    if (!e.accepted) continue;
    for (const a of e.routes) routeGateways.set(a.route, new Set([...(routeGateways.get(a.route) ?? []), e.gwKey]));
  }
  for (const [name, routes] of refs.policyClusters()) {
    const gws = new Set([...routes].flatMap((r) => [...(routeGateways.get(r) ?? [])]));
    const wanted = new Set([...gws].map((g) => certs.get(g)?.secret));
    const cluster = clusters.clusters[name];
    if (!cluster?.tls || gws.size === 0) continue;
    if (wanted.size > 1) {
      const owner = [...gws].map((g) => certs.get(g)?.gw).find((g) => g !== undefined)!;
      ctx.warn('TG4001', owner, 'spec.tls.backend.clientCertificateRef', `not supported yet: ${cluster.serviceHost} port ${cluster.servicePort} is reached from Gateways with different backend client certificates (${[...gws].join(', ')}): none is presented to it`);
      continue;
    }
    const secret = [...wanted][0];
    if (secret !== undefined) cluster.tls = { ...cluster.tls, mode: 'MUTUAL', clientCertificate: secret };
  }
}

// ------------------------------------------------------------------ listeners

function validateListener(ctx: TranslateContext, refs: GatewayApiRefs, book: StatusBook, gw: GatewayApiResource, spec: GatewaySpec, l: ListenerSpec, i: number): ListenerEntry | undefined {
  const path = `spec.listeners[${i}]`;
  const scope = `listener ${l.name}`;
  const protocol = String(l.protocol ?? '');
  const reject = (field: string, reason: string, message: string, hint?: string) => {
    ctx.warn('TG6002', gw, `${path}${field ? '.' + field : ''}`, `${message}: the listener is not accepted (${reason})`, hint);
    book.set(gw, scope, { type: 'Accepted', status: 'False', reason, message });
    book.set(gw, scope, { type: 'Programmed', status: 'False', reason: 'Invalid', message: 'not accepted' });
    return undefined;
  };
  const cls = classOf(protocol);
  if (!cls) return reject('protocol', 'UnsupportedProtocol', `protocol "${protocol}" is not supported`, 'valid values: HTTP, HTTPS, TLS, TCP');
  let hostname: string | undefined;
  if (l.hostname !== undefined && l.hostname !== '') {
    if (cls === 'tcp') return reject('hostname', 'Invalid', 'hostname must not be set for protocol TCP');
    const h = l.hostname.toLowerCase();
    const err = checkHostPattern(h, { allowStar: false, allowIp: false });
    if (err) return reject('hostname', 'Invalid', err);
    hostname = h;
  }
  const tlsSpec = l.tls;
  if ((cls === 'http' || cls === 'tcp') && tlsSpec) return reject('tls', 'Invalid', `tls must not be set for protocol ${protocol}`, 'use HTTPS or TLS to carry TLS');
  if (cls === 'tls' && !tlsSpec) return reject('tls', 'Invalid', `protocol ${protocol} needs tls settings`, 'set tls.mode (Terminate with certificateRefs, or Passthrough)');
  const passthrough = tlsSpec?.mode === 'Passthrough';
  if (protocol === 'HTTPS' && passthrough) return reject('tls.mode', 'Invalid', 'tls mode must be Terminate for protocol HTTPS', 'use protocol TLS with a TLSRoute to pass TLS through');

  // Route kinds this listener takes. HTTP takes GRPCRoute as HTTPS does: plaintext listeners
  // serve HTTP/2 with prior knowledge (h2c) next to HTTP/1.1.
  const supported = protocol === 'TLS' ? (passthrough ? ['TLSRoute'] : ['TLSRoute', 'TCPRoute']) : cls === 'tcp' ? ['TCPRoute']
    : ['HTTPRoute', 'GRPCRoute'];
  const kinds = new Set<string>();
  const asked = l.allowedRoutes?.kinds;
  if (asked?.length) {
    asked.forEach((k, j) => {
      if (groupOf(k, GROUP) === GROUP && supported.includes(k.kind)) kinds.add(k.kind);
      else {
        ctx.warn('TG6002', gw, `${path}.allowedRoutes.kinds[${j}]`, `route kind ${k.kind} is not supported on a ${protocol}${passthrough ? ' Passthrough' : ''} listener (InvalidRouteKinds)`, `supported here: ${supported.join(', ')}`);
        book.set(gw, scope, { type: 'ResolvedRefs', status: 'False', reason: 'InvalidRouteKinds', message: `${k.kind} is not supported here` });
      }
    });
  } else supported.forEach((k) => kinds.add(k));
  if (l.allowedRoutes?.namespaces?.from === 'Selector') {
    const keys = [...Object.keys(l.allowedRoutes.namespaces.selector?.matchLabels ?? {}), ...(l.allowedRoutes.namespaces.selector?.matchExpressions ?? []).map((e) => e.key)];
    if (keys.some((k) => k !== 'kubernetes.io/metadata.name')) {
      ctx.info('TG6007', gw, `${path}.allowedRoutes.namespaces.selector`, 'tlsgate reads no Namespace objects: a namespace selector sees only the label kubernetes.io/metadata.name (other labels never match)');
    }
  }

  const entry: ListenerEntry = {
    gw, gwKey: `${gw.metadata.namespace}/${gw.metadata.name}`, spec: l, path, scope, protocol, cls, port: l.port,
    address: ctx.options.bindAddress, passthrough, kinds, accepted: true, programmed: false, routes: [],
  };
  if (hostname !== undefined) entry.hostname = hostname;
  if (cls === 'tls' && !passthrough) {
    const tls = terminateTls(ctx, refs, book, gw, spec, entry);
    if (!tls) { entry.accepted = false; return entry; }
    entry.tls = tls;
  } else if (passthrough && tlsSpec?.certificateRefs?.length) {
    ctx.info('TG5006', gw, `${path}.tls.certificateRefs`, 'Passthrough mode does not use certificates: they are ignored');
  }
  book.set(gw, scope, { type: 'Accepted', status: 'True', reason: 'Accepted', message: '' });
  book.set(gw, scope, { type: 'ResolvedRefs', status: 'True', reason: 'ResolvedRefs', message: '' });
  return entry;
}

/** The downstream TLS of a Terminate listener; null when a reference fails (listener not programmed). */
function terminateTls(ctx: TranslateContext, refs: GatewayApiRefs, book: StatusBook, gw: GatewayApiResource, spec: GatewaySpec, e: ListenerEntry): DownstreamTlsContext | null {
  const tls = e.spec.tls!;
  const p = `${e.path}.tls`;
  const fail = (code: string, field: string, reason: string, message: string, accepted?: string) => {
    ctx.warn(code, gw, `${p}${field ? '.' + field : ''}`, `${message}: the listener is not programmed (${reason})`);
    book.set(gw, e.scope, { type: 'ResolvedRefs', status: 'False', reason, message });
    if (accepted) book.set(gw, e.scope, { type: 'Accepted', status: 'False', reason: accepted, message });
    book.set(gw, e.scope, { type: 'Programmed', status: 'False', reason: 'Invalid', message: 'references not resolved' });
    return null;
  };
  const options = tls.options ?? {};
  const mode = (options[TERMINATE_MODE_OPTION] ?? 'SIMPLE').toUpperCase();
  for (const k of Object.keys(options)) {
    if (k !== TERMINATE_MODE_OPTION && k !== CIPHER_OPTION) ctx.warn('TG4001', gw, `${p}.options.${k}`, `not supported yet: tls option "${k}": ignored`);
  }
  if (!['SIMPLE', 'MUTUAL', 'OPTIONAL_MUTUAL', 'ISTIO_MUTUAL', 'ISTIO_SIMPLE'].includes(mode)) {
    return fail('TG6002', `options.${TERMINATE_MODE_OPTION}`, 'UnsupportedValue', `${TERMINATE_MODE_OPTION} "${options[TERMINATE_MODE_OPTION]}" is not valid (MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL, ISTIO_SIMPLE)`, 'Invalid');
  }
  const certificates: string[] = [];
  let ca: string | undefined;
  if (mode === 'ISTIO_MUTUAL' || mode === 'ISTIO_SIMPLE') {
    certificates.push(ctx.addSecret({ name: 'workload', source: { kind: 'workload' } }));
    if (mode === 'ISTIO_MUTUAL') ca = ctx.addSecret({ name: 'mesh-roots', source: { kind: 'mesh-roots' } });
  } else {
    const crefs = tls.certificateRefs ?? [];
    if (crefs.length === 0) return fail('TG6004', 'certificateRefs', 'InvalidCertificateRef', 'Terminate mode needs certificateRefs (a Secret with tls.crt and tls.key)', 'Invalid');
    if (crefs.length > 2) ctx.warn('TG4001', gw, `${p}.certificateRefs[2]`, 'not supported yet: more than 2 certificateRefs (one RSA and one ECDSA); the rest are ignored');
    for (let k = 0; k < Math.min(2, crefs.length); k++) {
      const r = refs.certificate(gw, crefs[k]!);
      if ('reason' in r) return fail(r.reason === 'RefNotPermitted' ? 'TG6005' : 'TG6004', `certificateRefs[${k}]`, r.reason, r.message);
      certificates.push(r.secret);
      ca ??= r.ca;
    }
    if ((mode === 'MUTUAL' || mode === 'OPTIONAL_MUTUAL') && !ca) {
      return fail('TG6004', `options.${TERMINATE_MODE_OPTION}`, 'InvalidCertificateRef', `${mode} needs a client CA: put ca.crt in the certificate Secret`);
    }
  }
  let requireClient = mode === 'MUTUAL' || mode === 'ISTIO_MUTUAL';
  let requestClient = requireClient || mode === 'OPTIONAL_MUTUAL';
  let allowInvalid = false;
  let dmode: DownstreamTlsContext['mode'] = mode === 'ISTIO_MUTUAL' ? 'ISTIO_MUTUAL' : mode === 'MUTUAL' ? 'MUTUAL' : mode === 'OPTIONAL_MUTUAL' ? 'OPTIONAL_MUTUAL' : 'SIMPLE';

  // Client certificates: the listener's own frontendValidation, else the Gateway's per-port, else default.
  let fv: FrontendValidation | undefined, fvPath = '';
  if (tls.frontendValidation) { fv = tls.frontendValidation; fvPath = `${p}.frontendValidation`; }
  else if (e.protocol === 'HTTPS') {
    const pp = (spec.tls?.frontend?.perPort ?? []).findIndex((x) => x.port === e.port);
    if (pp >= 0) { fv = spec.tls!.frontend!.perPort![pp]!.tls?.validation; fvPath = `spec.tls.frontend.perPort[${pp}].tls.validation`; }
    else if (spec.tls?.frontend?.default?.validation) { fv = spec.tls.frontend.default.validation; fvPath = 'spec.tls.frontend.default.validation'; }
  }
  if (fv) {
    const cas = fv.caCertificateRefs ?? [];
    if (cas.length === 0) return fail('TG6012', '', 'NoValidCACertificate', `${fvPath} has no caCertificateRefs`, 'NoValidCACertificate');
    if (cas.length > 1) ctx.warn('TG4001', gw, `${fvPath}.caCertificateRefs[1]`, 'not supported yet: more than one caCertificateRef; only the first is used');
    const r = refs.caBundle(gw, cas[0]!, true);
    if ('reason' in r) {
      ctx.warn(r.reason === 'RefNotPermitted' ? 'TG6005' : 'TG6012', gw, `${fvPath}.caCertificateRefs[0]`, `${r.message}: listener ${e.spec.name} is not programmed (${r.reason})`);
      book.set(gw, e.scope, { type: 'ResolvedRefs', status: 'False', reason: r.reason, message: r.message });
      book.set(gw, e.scope, { type: 'Accepted', status: 'False', reason: 'NoValidCACertificate', message: 'no valid CA certificate for client validation' });
      book.set(gw, e.scope, { type: 'Programmed', status: 'False', reason: 'Invalid', message: 'references not resolved' });
      return null;
    }
    ca = r.secret;
    requestClient = true;
    if (fv.mode === 'AllowInsecureFallback') {
      requireClient = false;
      allowInvalid = true;
      dmode = 'OPTIONAL_MUTUAL';
      ctx.warn('TG6015', gw, `${fvPath}.mode`, 'AllowInsecureFallback lets clients in without a valid certificate: the backend must authorize them (InsecureFrontendValidationMode)');
      book.set(gw, '', { type: 'InsecureFrontendValidationMode', status: 'True', reason: 'ConfigurationChanged', message: `listener ${e.spec.name} accepts clients without a valid certificate` });
    } else {
      requireClient = true;
      dmode = 'MUTUAL';
    }
  }
  const cipherSuites = (options[CIPHER_OPTION] ?? '').split(',').map((x) => x.trim()).filter(Boolean);
  for (const c of cipherSuites) if (!ISTIO_CIPHER_SUITES.includes(c)) ctx.warn('TG2003', gw, `${p}.options.${CIPHER_OPTION}`, `unknown cipher suite "${c}"`, `valid values: ${ISTIO_CIPHER_SUITES.join(', ')}`);
  const out: DownstreamTlsContext = {
    mode: dmode, certificates, requestClientCertificate: requestClient, requireClientCertificate: requireClient,
    allowInvalidClientCertificate: allowInvalid, matchSubjectAltNames: [], verifyCertificateSpki: [], verifyCertificateHash: [],
    minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3', cipherSuites: cipherSuites.filter((c) => ISTIO_CIPHER_SUITES.includes(c)), ecdhCurves: [],
    alpn: e.protocol === 'HTTPS' ? ['h2', 'http/1.1'] : [],
  };
  if (ca && requestClient) out.validationCa = ca;
  return out;
}

/**
 * Listeners sharing a port must be distinct and compatible: one protocol class per port (HTTPS
 * and TLS share one filter-chain table; plaintext HTTP beside them is a ProtocolConflict, as a TCP
 * listener beside anything is) and a hostname at most once per class. The spec forbids picking a
 * winner among conflicting listeners, across Gateways too: every listener of a conflict is
 * Conflicted and none of them is accepted; the other listeners of the port keep serving.
 */
function detectConflicts(ctx: TranslateContext, book: StatusBook, entries: ListenerEntry[]): void {
  const byPort = new Map<string, ListenerEntry[]>();
  for (const e of entries) {
    if (!e.accepted) continue;
    const k = `${e.address}_${e.port}`;
    byPort.set(k, [...(byPort.get(k) ?? []), e]);
  }
  const who = (o: ListenerEntry) => `${o.gwKey} listener ${o.spec.name} (${o.protocol}${o.hostname ? ' ' + o.hostname : ''})`;
  const mark = (e: ListenerEntry, reason: 'ProtocolConflict' | 'HostnameConflict', message: string) => {
    e.accepted = false;
    ctx.warn('TG6003', e.gw, e.path, `${message}: the listener is Conflicted, neither accepted nor programmed (${reason})`,
      reason === 'ProtocolConflict' ? 'put HTTP, HTTPS/TLS and TCP listeners on different ports' : 'give each listener of a port its own hostname');
    book.set(e.gw, e.scope, { type: 'Conflicted', status: 'True', reason, message });
    book.set(e.gw, e.scope, { type: 'Accepted', status: 'False', reason, message });
    book.set(e.gw, e.scope, { type: 'Programmed', status: 'False', reason: 'Invalid', message: 'conflicted' });
  };
  for (const list of byPort.values()) {
    if (list.length < 2) continue;
    const classes = new Set(list.map((e) => e.cls));
    if (classes.size > 1 || classes.has('tcp')) {
      for (const e of list) {
        const others = list.filter((o) => o !== e).map(who).join(', ');
        mark(e, 'ProtocolConflict', `port ${e.port} is also claimed by ${others}${classes.has('tcp') && classes.size === 1 ? ' (one TCP listener per port)' : ''}`);
      }
      continue;
    }
    for (const e of list) {
      const same = list.filter((o) => o !== e && (o.hostname ?? '') === (e.hostname ?? ''));
      if (same.length > 0) mark(e, 'HostnameConflict', `hostname "${e.hostname ?? '(any)'}" on port ${e.port} is also claimed by ${same.map(who).join(', ')}`);
    }
  }
}

// ------------------------------------------------------------------ attachment

function attachRoute(ctx: TranslateContext, book: StatusBook, route: GatewayApiResource, age: number, gateways: GatewayApiResource[], served: Set<string>, byGateway: Map<string, ListenerEntry[]>): void {
  const spec = specOf<RouteSpec>(route);
  const rules = spec.rules ?? [];
  if ((route.kind === 'TCPRoute' || route.kind === 'TLSRoute') && rules.length > 1 && ONE_RULE_VERSIONS.has(route.apiVersion)) {
    // v1 (and TLSRoute v1alpha3) allow one rule: the API server would refuse this object.
    const message = `${route.apiVersion} ${route.kind} allows one rule, this one has ${rules.length}`;
    ctx.warn('TG6018', route, 'spec.rules', `${message}: the route is not accepted (UnsupportedValue)`, `merge the backendRefs into one rule, or use apiVersion ${GROUP}/v1alpha2 (its rules all apply, backends split by weight)`);
    (spec.parentRefs ?? []).forEach((pr) => book.set(route, `parent ${pr.namespace ?? route.metadata.namespace}/${pr.name}${pr.sectionName ? '/' + pr.sectionName : ''}${pr.port ? ':' + pr.port : ''}`, { type: 'Accepted', status: 'False', reason: 'UnsupportedValue', message }));
    return;
  }
  const hostnames = route.kind === 'TCPRoute' ? [] : (spec.hostnames ?? []);
  hostnames.forEach((h, i) => {
    const err = checkHostPattern(h.toLowerCase(), { allowStar: false, allowIp: false });
    if (err) ctx.warn('TG3011', route, `spec.hostnames[${i}]`, err);
  });
  (spec.parentRefs ?? []).forEach((pr, j) => {
    const path = `spec.parentRefs[${j}]`;
    const kind = pr.kind ?? 'Gateway', group = groupOf(pr, GROUP);
    const ns = pr.namespace ?? route.metadata.namespace;
    const scope = `parent ${ns}/${pr.name}${pr.sectionName ? '/' + pr.sectionName : ''}${pr.port ? ':' + pr.port : ''}`;
    const notAccepted = (code: string, reason: string, message: string, hint?: string) => {
      ctx.warn(code, route, path, `${message}: the route is not attached there (${reason})`, hint);
      book.set(route, scope, { type: 'Accepted', status: 'False', reason, message });
    };
    if (kind === 'Service' && group === '') {
      ctx.info('TG6014', route, path, `parentRef Service ${ns}/${pr.name} is a mesh route (for sidecars): a gateway does not serve it`);
      return;
    }
    if (kind !== 'Gateway' || group !== GROUP) return notAccepted('TG6006', 'NoMatchingParent', `parentRef kind ${group}/${kind} is not supported`, 'use a Gateway');
    const gwKey = `${ns}/${pr.name}`;
    if (!gateways.some((g) => `${g.metadata.namespace}/${g.metadata.name}` === gwKey)) {
      return notAccepted('TG6006', 'NoMatchingParent', `Gateway ${gwKey} is not in the configuration`);
    }
    if (!served.has(gwKey)) return; // another controller's Gateway: not ours to report on
    const candidates = (byGateway.get(gwKey) ?? []).filter((e) => (pr.sectionName === undefined || e.spec.name === pr.sectionName) && (pr.port === undefined || e.port === pr.port));
    if (candidates.length === 0) {
      return notAccepted('TG6006', 'NoMatchingParent', `Gateway ${gwKey} has no listener${pr.sectionName ? ` named "${pr.sectionName}"` : ''}${pr.port ? ` on port ${pr.port}` : ''}`);
    }
    let attached = 0;
    const reasons: { code: string; reason: string; message: string }[] = [];
    for (const e of candidates) {
      if (!e.accepted) { reasons.push({ code: 'TG6006', reason: 'NoMatchingParent', message: `listener ${e.spec.name} is not accepted` }); continue; }
      if (!e.kinds.has(route.kind)) { reasons.push({ code: 'TG6007', reason: 'NotAllowedByListeners', message: `listener ${e.spec.name} (${e.protocol}${e.passthrough ? ' Passthrough' : ''}) does not take ${route.kind}s (allowed: ${[...e.kinds].join(', ') || 'none'})` }); continue; }
      const from = e.spec.allowedRoutes?.namespaces?.from ?? 'Same';
      const rns = route.metadata.namespace;
      const nsOk = from === 'All' || (from === 'Same' && rns === e.gw.metadata.namespace) || (from === 'Selector' && selectorMatchesNamespace(e.spec.allowedRoutes?.namespaces?.selector, rns));
      if (!nsOk) { reasons.push({ code: 'TG6007', reason: 'NotAllowedByListeners', message: `listener ${e.spec.name} allows routes from ${from === 'Same' ? `namespace "${e.gw.metadata.namespace}" only` : from === 'Selector' ? 'selected namespaces' : 'no namespace'}, not "${rns}"` }); continue; }
      const hosts = route.kind === 'TCPRoute' ? ['*'] : intersectHostnames(e.hostname, hostnames);
      if (hosts.length === 0) { reasons.push({ code: 'TG6008', reason: 'NoMatchingListenerHostname', message: `hostnames ${JSON.stringify(hostnames)} do not intersect listener ${e.spec.name} hostname "${e.hostname}"` }); continue; }
      e.routes.push({ route, hosts, age, scope });
      attached++;
    }
    if (attached > 0) {
      book.set(route, scope, { type: 'Accepted', status: 'True', reason: 'Accepted', message: `attached to ${attached} listener(s)` });
      ctx.info('TG6011', route, path, `Accepted by Gateway ${gwKey} (${attached} listener(s))`);
    } else {
      const r = reasons.find((x) => x.reason === 'NoMatchingListenerHostname') ?? reasons.find((x) => x.reason === 'NotAllowedByListeners') ?? reasons[0]!;
      notAccepted(r.code, r.reason, reasons.map((x) => x.message).join('; '));
    }
  });
  if (!book.get(route, '', 'ResolvedRefs')) book.set(route, '', { type: 'ResolvedRefs', status: 'True', reason: 'ResolvedRefs', message: '' });
}

// ------------------------------------------------------------------ chains

/**
 * An HTTPRoute and a GRPCRoute on one listener whose hostnames intersect: the spec keeps exactly
 * one, the older (then namespace/name first); the other loses those hostnames there.
 */
function dropMixedKinds(ctx: TranslateContext, book: StatusBook, e: ListenerEntry): Attachment[] {
  // Attachment ages are per kind: compare the routes' own timestamps.
  const sorted = [...e.routes].sort((a, b) => byAge(a.route, b.route));
  const kept: Attachment[] = [];
  for (const a of sorted) {
    if (a.route.kind !== 'HTTPRoute' && a.route.kind !== 'GRPCRoute') { kept.push(a); continue; }
    const rivals = kept.filter((k) => (k.route.kind === 'HTTPRoute' || k.route.kind === 'GRPCRoute') && k.route.kind !== a.route.kind);
    const overlaps = (h: string) => rivals.find((r) => r.hosts.some((x) => hostSubsetOf(h, x) || hostSubsetOf(x, h)));
    const hosts = a.hosts.filter((h) => !overlaps(h));
    if (hosts.length < a.hosts.length) {
      const lost = a.hosts.filter((h) => overlaps(h));
      const by = overlaps(lost[0]!)!.route;
      const message = `listener ${e.spec.name} already routes ${lost.join(', ')} with the older ${by.kind} ${by.metadata.namespace}/${by.metadata.name}`;
      ctx.warn('TG6016', a.route, 'spec.hostnames', `${message}: an HTTPRoute and a GRPCRoute cannot share a hostname on one listener (UnsupportedValue)`, 'give the GRPCRoute its own hostname or listener');
      book.set(a.route, a.scope, { type: 'Accepted', status: 'False', reason: 'UnsupportedValue', message });
    }
    if (hosts.length > 0) kept.push({ ...a, hosts });
  }
  return kept;
}

function virtualHosts(ctx: TranslateContext, book: StatusBook, http: HttpRouteBuilder, list: ListenerEntry[]): VirtualHost[] {
  const byDomain = new Map<string, RankedRoute[]>();
  for (const e of list) {
    for (const a of dropMixedKinds(ctx, book, e)) {
      if (a.route.kind !== 'HTTPRoute' && a.route.kind !== 'GRPCRoute') continue;
      const ranked = a.route.kind === 'GRPCRoute' ? http.grpcRoutes(a.route, a.age) : http.routes(a.route, a.age);
      for (const h of a.hosts) {
        const cur = byDomain.get(h) ?? [];
        for (const r of ranked) if (!cur.includes(r)) cur.push(r);
        byDomain.set(h, cur);
      }
    }
  }
  // Exact names first, then wildcards longest first, then "*": the order a dump reads best in.
  const order = [...byDomain.keys()].sort((a, b) => {
    const ra = a === '*' ? 2 : a.startsWith('*.') ? 1 : 0, rb = b === '*' ? 2 : b.startsWith('*.') ? 1 : 0;
    return ra - rb || b.length - a.length || (a < b ? -1 : a > b ? 1 : 0);
  });
  return order.map((d) => ({ name: d, domains: [d], routes: byDomain.get(d)!.sort(compareRank).map((r) => r.route), requireTls: false }));
}

function httpChain(ctx: TranslateContext, book: StatusBook, http: HttpRouteBuilder, list: ListenerEntry[]): FilterChain {
  const first = list[0]!;
  const hcm: HttpConnectionManager = {
    kind: 'http',
    routeConfig: { name: `http.${first.port}`, virtualHosts: virtualHosts(ctx, book, http, list) },
    scheme: 'http', misdirectedDomains: [], forwardClientCertDetails: 'SANITIZE', http2: true,
  };
  return { name: list.map((e) => `${e.gwKey}/${e.spec.name}`).join(','), match: { serverNames: [], applicationProtocols: [] }, filter: hcm, origin: ctx.origin(first.gw, first.path) };
}

/**
 * The TCP proxy of a TCPRoute/TLSRoute. Their rules have no matches, so every rule applies to
 * every connection: with several rules (v1alpha2 allows up to 16) the backends of all of them
 * share the connections by weight, as if written in one rule.
 */
function tcpProxy(ctx: TranslateContext, refs: GatewayApiRefs, route: GatewayApiResource): TcpProxy | undefined {
  const rules = specOf<RouteSpec>(route).rules ?? [];
  const weighted: WeightedCluster[] = [];
  const invalid: WeightedCluster[] = [];
  rules.forEach((rule, i) => (rule.backendRefs ?? []).forEach((b, k) => {
    const cluster = refs.backend(route, `spec.rules[${i}].backendRefs[${k}]`, b, 'tcp');
    if (!cluster) {
      // Its share of connections is closed (Gateway API), not sent to a valid backend.
      if ((b.weight ?? 1) > 0) invalid.push({ cluster: refs.invalidBackend(route, `spec.rules[${i}].backendRefs[${k}]`), weight: b.weight ?? 1 });
      return;
    }
    const w = weighted.find((x) => x.cluster === cluster);
    if (w) w.weight += b.weight ?? 1; // the same backend named in two rules: one entry, weights added
    else weighted.push({ cluster, weight: b.weight ?? 1 });
  }));
  if (weighted.length === 0 || weighted.every((w) => w.weight === 0)) return undefined;
  weighted.push(...invalid);
  const what = rules.length > 1 ? 'spec.rules' : 'spec.rules[0]';
  return { kind: 'tcp', name: `${route.metadata.namespace}/${route.metadata.name}#${rules.length > 1 ? 'rules' : 'rules[0]'}`, clusters: weighted, idleTimeoutMs: ctx.options.tcpIdleTimeoutMs, origin: ctx.origin(route, what) };
}

function tcpChain(ctx: TranslateContext, refs: GatewayApiRefs, e: ListenerEntry): FilterChain | undefined {
  const [first, ...rest] = e.routes.sort((a, b) => a.age - b.age);
  for (const r of rest) ctx.warn('TG6003', r.route, 'spec.parentRefs', `listener ${e.gwKey}/${e.spec.name} already carries the older ${first!.route.kind} ${first!.route.metadata.namespace}/${first!.route.metadata.name}: this route gets no traffic there`);
  if (!first) return undefined;
  const proxy = tcpProxy(ctx, refs, first.route);
  return {
    name: `${e.gwKey}/${e.spec.name}`,
    match: { serverNames: [], applicationProtocols: [] },
    filter: proxy ?? { kind: 'reject', reason: 'no valid backend' },
    origin: ctx.origin(e.gw, e.path),
  };
}

function tlsChains(ctx: TranslateContext, book: StatusBook, refs: GatewayApiRefs, http: HttpRouteBuilder, list: ListenerEntry[]): FilterChain[] {
  const chains: FilterChain[] = [];
  const claimed = new Map<string, string>();
  for (const e of list) {
    const names = e.hostname ? [e.hostname] : [];
    if (e.protocol === 'HTTPS') {
      const hcm: HttpConnectionManager = {
        kind: 'http',
        routeConfig: { name: `https.${e.port}.${e.spec.name}.${e.gw.metadata.name}.${e.gw.metadata.namespace}`, virtualHosts: virtualHosts(ctx, book, http, [e]) },
        scheme: 'https', misdirectedDomains: [], forwardClientCertDetails: 'SANITIZE_SET', http2: true,
        ...(ctx.options.identity ? { xfccBy: ctx.options.identity } : {}),
      };
      chains.push({ name: `${e.gwKey}/${e.spec.name}`, match: { serverNames: names, applicationProtocols: [] }, tls: e.tls!, filter: hcm, origin: ctx.origin(e.gw, e.path) });
      continue;
    }
    if (!e.passthrough) {
      const fc = tcpChain(ctx, refs, e);
      chains.push({ ...(fc ?? { name: `${e.gwKey}/${e.spec.name}`, filter: { kind: 'reject', reason: 'no route' }, origin: ctx.origin(e.gw, e.path) }), match: { serverNames: names, applicationProtocols: [] }, tls: e.tls! });
      continue;
    }
    // Passthrough: one chain per TLSRoute hostname (SNI), the oldest route keeping a contested name.
    for (const a of e.routes.sort((x, y) => x.age - y.age)) {
      const mine = a.hosts.filter((h) => {
        const who = claimed.get(h);
        if (who) { ctx.warn('TG6003', a.route, 'spec.hostnames', `SNI "${h}" on port ${e.port} is already routed by ${who}: this route gets no traffic for it`); return false; }
        claimed.set(h, `${a.route.kind} ${a.route.metadata.namespace}/${a.route.metadata.name}`);
        return true;
      });
      if (mine.length === 0) continue;
      const proxy = tcpProxy(ctx, refs, a.route);
      chains.push({
        name: `${a.route.metadata.namespace}/${a.route.metadata.name}@${e.gwKey}/${e.spec.name}`,
        match: { serverNames: mine.includes('*') ? [] : mine, transportProtocol: 'tls', applicationProtocols: [] },
        filter: proxy ?? { kind: 'reject', reason: 'no valid backend' },
        origin: ctx.origin(a.route, (specOf<RouteSpec>(a.route).rules ?? []).length > 1 ? 'spec.rules' : 'spec.rules[0]'),
      });
    }
  }
  return chains;
}

// ------------------------------------------------------------------ merging with Istio listeners

/**
 * Adds the Gateway API listeners to the Istio ones. On a shared address:port, TLS listeners merge
 * their filter chains when no SNI is claimed twice, and plaintext HTTP listeners merge their
 * virtual hosts (Istio's first); anything else is a conflict: the Gateway API listener is skipped.
 */
export function mergeListeners(ctx: TranslateContext, istio: Listener[], out: GatewayApiOutput): Listener[] {
  const result = [...istio];
  for (const l of out.listeners) {
    const same = result.find((x) => x.address === l.address && x.port === l.port);
    if (!same) { result.push(l); continue; }
    const owner = out.owners.get(l)!;
    const conflict = (why: string) => ctx.warn('TG6013', owner.gw, owner.path, `port ${l.port} is already served by an Istio Gateway (${why}): this Gateway API listener is skipped`, 'use another port');
    if (same.inspector === 'tls-inspector' && l.inspector === 'tls-inspector') {
      const names = new Set(same.filterChains.flatMap((c) => (c.match.serverNames.length ? c.match.serverNames : ['*'])));
      const clash = l.filterChains.flatMap((c) => (c.match.serverNames.length ? c.match.serverNames : ['*'])).find((n) => names.has(n));
      if (clash) { conflict(`SNI "${clash}" is claimed by both`); continue; }
      same.filterChains.push(...l.filterChains);
      same.origins.push(...l.origins);
      computeMisdirected(same);
      continue;
    }
    const a = same.filterChains[0], b = l.filterChains[0];
    if (same.inspector === 'none' && l.inspector === 'none' && same.filterChains.length === 1 && a?.filter.kind === 'http' && b?.filter.kind === 'http' && !a.tls && !b.tls) {
      const taken = new Set(a.filter.routeConfig.virtualHosts.flatMap((v) => v.domains));
      for (const vh of b.filter.routeConfig.virtualHosts) {
        const dup = vh.domains.find((d) => taken.has(d));
        if (dup) ctx.warn('TG6013', owner.gw, owner.path, `host "${dup}" on port ${l.port} is already routed by an Istio VirtualService: the Gateway API routes for it are skipped`);
        else a.filter.routeConfig.virtualHosts.push(vh);
      }
      same.origins.push(...l.origins);
      continue;
    }
    conflict(`as ${same.inspector === 'tls-inspector' ? 'TLS' : 'plaintext'}`);
  }
  return result.sort((x, y) => x.port - y.port || (x.address < y.address ? -1 : 1));
}

/**
 * References out of Gateway API resources: ReferenceGrants, certificateRefs (Secrets), CA refs
 * (ConfigMap `ca.crt`), and backendRefs -> Clusters (Services with their EndpointSlices or
 * Endpoints, Istio ServiceEntry hosts), with BackendTLSPolicy origination on Service clusters.
 */
import type { GatewayApiResource, KubeObjectResource } from '../../../config/resource.js';
import type { Cluster, Endpoint, UpstreamTlsContext } from '../../snapshot.js';
import type { ClusterBuilder } from '../clusters.js';
import type { TranslateContext } from '../context.js';
import { byAge } from '../gateways.js';
import { checkHostPattern } from '../hosts.js';
import type { StatusBook } from './status.js';
import { GROUP, groupOf, specOf, type BackendRef, type BackendTlsPolicySpec, type ObjectRef, type ReferenceGrantSpec } from './types.js';

type Rec = Record<string, unknown>;
const isRec = (v: unknown): v is Rec => typeof v === 'object' && v !== null && !Array.isArray(v);

export class GatewayApiRefs {
  readonly #grants: GatewayApiResource[];
  readonly #kube: KubeObjectResource[];
  /** "<ns>/<service>" -> policies targeting it, oldest first. */
  readonly #policies = new Map<string, { policy: GatewayApiResource; index: number; sectionName?: string }[]>();
  readonly #policyTls = new Map<GatewayApiResource, UpstreamTlsContext | null>();
  /** Clusters whose TLS comes from a valid BackendTLSPolicy -> the routes that send to them. */
  readonly #policyClusters = new Map<string, Set<GatewayApiResource>>();

  constructor(private readonly ctx: TranslateContext, private readonly clusters: ClusterBuilder, private readonly book: StatusBook) {
    const gw = ctx.resources.gatewayApi;
    this.#grants = gw.filter((r) => r.kind === 'ReferenceGrant');
    this.#kube = ctx.resources.kube ?? [];
    this.#indexPolicies(gw.filter((r) => r.kind === 'BackendTLSPolicy').sort(byAge));
  }

  /** Whether a reference from `from` (kind in its namespace) to `to` in another namespace is granted. */
  granted(from: { group: string; kind: string; namespace: string }, to: { group: string; kind: string; namespace: string; name: string }): boolean {
    if (from.namespace === to.namespace) return true;
    for (const g of this.#grants) {
      if (g.metadata.namespace !== to.namespace) continue;
      const s = specOf<ReferenceGrantSpec>(g);
      const fromOk = (s.from ?? []).some((f) => groupOf(f, '') === from.group && f.kind === from.kind && f.namespace === from.namespace);
      const toOk = (s.to ?? []).some((t) => groupOf(t, '') === to.group && t.kind === to.kind && (t.name === undefined || t.name === '' || t.name === to.name));
      if (fromOk && toOk) return true;
    }
    return false;
  }

  /** Marks every ReferenceGrant as seen (they have no status of their own). */
  touchGrants(): void {
    for (const g of this.#grants) this.ctx.touch(g);
  }

  /**
   * A certificateRef -> snapshot secret name, or a failure with its status reason. The Secret must
   * hold tls.crt and tls.key (or Istio's cert/key).
   */
  certificate(owner: GatewayApiResource, ref: ObjectRef): { secret: string; ca?: string } | { reason: string; message: string } {
    const group = groupOf(ref, ''), kind = ref.kind ?? 'Secret';
    if (group !== '' || kind !== 'Secret') return { reason: 'InvalidCertificateRef', message: `certificateRef kind ${group ? group + '/' : ''}${kind} is not supported: use a Secret` };
    const ns = ref.namespace ?? owner.metadata.namespace;
    if (!this.granted({ group: GROUP, kind: owner.kind, namespace: owner.metadata.namespace }, { group: '', kind: 'Secret', namespace: ns, name: ref.name })) {
      return { reason: 'RefNotPermitted', message: `Secret ${ns}/${ref.name} is in another namespace and no ReferenceGrant in "${ns}" allows ${owner.kind}s from "${owner.metadata.namespace}" to use it` };
    }
    const s = this.ctx.resources.secrets.find((x) => x.metadata.namespace === ns && x.metadata.name === ref.name);
    if (!s) return { reason: 'InvalidCertificateRef', message: `Secret ${ns}/${ref.name} not found` };
    const text = (k: string) => (s.data[k] && s.data[k]!.length > 0 ? s.data[k]!.toString('utf8') : undefined);
    let cert = text('tls.crt'), key = text('tls.key');
    if (!(cert && key)) { cert = text('cert'); key = text('key'); }
    if (!(cert && key)) return { reason: 'InvalidCertificateRef', message: `Secret ${ns}/${ref.name} has no tls.crt and tls.key (found: ${Object.keys(s.data).sort().join(', ') || 'none'})` };
    const base = `kubernetes://${ns}/${ref.name}`;
    const origin = { resource: { kind: 'Secret', namespace: ns, name: ref.name }, path: 'data' };
    const secret = this.ctx.addSecret({ name: base, source: { kind: 'inline', certChain: cert, privateKey: key }, origin });
    const caText = text('ca.crt') ?? text('cacert');
    const out: { secret: string; ca?: string } = { secret };
    if (caText) out.ca = this.ctx.addSecret({ name: `${base}-cacert`, source: { kind: 'inline', ca: caText }, origin });
    return out;
  }

  /**
   * A CA reference (frontend validation, BackendTLSPolicy): a ConfigMap (or Secret) with `ca.crt`.
   * `crossNamespace`: whether a ReferenceGrant may allow another namespace (BackendTLSPolicy: never).
   */
  caBundle(owner: GatewayApiResource, ref: ObjectRef, crossNamespace: boolean): { secret: string } | { reason: string; message: string } {
    const group = groupOf(ref, ''), kind = ref.kind ?? 'ConfigMap';
    if (group !== '' || (kind !== 'ConfigMap' && kind !== 'Secret')) {
      return { reason: 'InvalidCACertificateKind', message: `CA reference kind ${group ? group + '/' : ''}${kind} is not supported: use a ConfigMap with ca.crt` };
    }
    const ns = ref.namespace ?? owner.metadata.namespace;
    if (ns !== owner.metadata.namespace && (!crossNamespace || !this.granted({ group: GROUP, kind: owner.kind, namespace: owner.metadata.namespace }, { group: '', kind, namespace: ns, name: ref.name }))) {
      return { reason: 'RefNotPermitted', message: `${kind} ${ns}/${ref.name} is in another namespace${crossNamespace ? ` and no ReferenceGrant in "${ns}" allows it` : ''}` };
    }
    let pem: string | undefined;
    if (kind === 'ConfigMap') {
      const cm = this.ctx.resources.configMaps.find((x) => x.metadata.namespace === ns && x.metadata.name === ref.name);
      if (!cm) return { reason: 'InvalidCACertificateRef', message: `ConfigMap ${ns}/${ref.name} not found` };
      pem = cm.data['ca.crt'];
    } else {
      const s = this.ctx.resources.secrets.find((x) => x.metadata.namespace === ns && x.metadata.name === ref.name);
      if (!s) return { reason: 'InvalidCACertificateRef', message: `Secret ${ns}/${ref.name} not found` };
      pem = s.data['ca.crt']?.toString('utf8');
    }
    if (!pem || !pem.includes('-----BEGIN CERTIFICATE-----')) return { reason: 'InvalidCACertificateRef', message: `${kind} ${ns}/${ref.name} has no PEM certificate under key ca.crt` };
    const name = `${kind === 'ConfigMap' ? 'configmap' : 'kubernetes'}://${ns}/${ref.name}`;
    return { secret: this.ctx.addSecret({ name, source: { kind: 'inline', ca: pem }, origin: { resource: { kind, namespace: ns, name: ref.name }, path: 'data' } }) };
  }

  // ------------------------------------------------------------------ backends

  /**
   * A backendRef -> cluster name. Failures are reported (TG6005/TG6009) and set the route's
   * ResolvedRefs condition; `undefined` is returned and the caller answers 500 / closes.
   */
  backend(route: GatewayApiResource, path: string, ref: BackendRef, carries: 'http' | 'tcp', grpc = false): string | undefined {
    const group = groupOf(ref, ''), kind = ref.kind ?? 'Service';
    const ns = ref.namespace ?? route.metadata.namespace;
    const fail = (code: string, reason: string, message: string, hint?: string) => {
      this.ctx.warn(code, route, path, `${message} (${reason})`, hint);
      this.book.set(route, '', { type: 'ResolvedRefs', status: 'False', reason, message });
      return undefined;
    };
    if (group === 'networking.istio.io' && kind === 'Hostname') {
      if (ref.port === undefined) return fail('TG6009', 'BackendNotFound', `backendRef Hostname "${ref.name}" needs a port`);
      return this.clusters.clusterFor({ owner: route, path, destination: { host: ref.name, port: { number: ref.port } }, fallbackPort: ref.port, carries });
    }
    if (group !== '' || kind !== 'Service') return fail('TG6009', 'InvalidKind', `backendRef kind ${group ? group + '/' : ''}${kind} is not supported`, 'use a Service, or kind Hostname with group networking.istio.io for a ServiceEntry host');
    if (!this.granted({ group: GROUP, kind: route.kind, namespace: route.metadata.namespace }, { group: '', kind: 'Service', namespace: ns, name: ref.name })) {
      return fail('TG6005', 'RefNotPermitted', `Service ${ns}/${ref.name} is in another namespace and no ReferenceGrant in "${ns}" allows ${route.kind}s from "${route.metadata.namespace}"`,
        `add a ReferenceGrant in "${ns}" from ${route.kind} in "${route.metadata.namespace}" to Service`);
    }
    if (ref.port === undefined) return fail('TG6009', 'BackendNotFound', `backendRef Service ${ns}/${ref.name} needs a port`);
    const host = `${ref.name}.${ns}.svc.cluster.local`;
    const name = `outbound|${ref.port}||${host}`;
    const known = this.clusters.clusters[name];
    if (known) {
      if (grpc && known.httpProtocol !== 'h2') this.#h1ForGrpc(route, path, host);
      this.#policyClusters.get(name)?.add(route);
      return name;
    }
    const svc = this.#kube.find((k) => k.kind === 'Service' && k.metadata.namespace === ns && k.metadata.name === ref.name);
    const cluster: Cluster = {
      name, serviceHost: host, servicePort: ref.port, discovery: 'STATIC', endpoints: [], lbPolicy: 'LEAST_REQUEST',
      connectTimeoutMs: this.ctx.options.connectTimeoutMs, httpProtocol: 'http1', limits: {}, origin: this.ctx.origin(route, path),
    };
    let portName: string | undefined;
    if (!svc) {
      // Inside a cluster the name resolves; the status still says what a controller would.
      cluster.discovery = 'DNS';
      cluster.endpoints.push({ address: host, port: ref.port, weight: 1, labels: {} });
      this.ctx.warn('TG6009', route, path, `Service ${ns}/${ref.name} is not in the configuration: its cluster resolves ${host} by DNS (BackendNotFound)`,
        'add the Service (and an EndpointSlice) to the configuration, or use kind Hostname with a ServiceEntry host');
      this.book.set(route, '', { type: 'ResolvedRefs', status: 'False', reason: 'BackendNotFound', message: `Service ${ns}/${ref.name} not found` });
    } else {
      const ports = Array.isArray(svc.spec.ports) ? (svc.spec.ports as Rec[]) : [];
      const sp = ports.find((p) => p.port === ref.port);
      if (!sp) return fail('TG6009', 'BackendNotFound', `port ${ref.port} is not a port of Service ${ns}/${ref.name} (ports: ${ports.map((p) => String(p.port)).join(', ') || 'none'})`);
      portName = typeof sp.name === 'string' ? sp.name : undefined;
      if (sp.appProtocol === 'kubernetes.io/h2c' || sp.appProtocol === 'h2c' || sp.appProtocol === 'grpc') cluster.httpProtocol = 'h2';
      cluster.endpoints = this.#endpoints(svc, sp, ref.port);
      if (cluster.endpoints.length === 0) {
        const ip = svc.spec.clusterIP;
        if (typeof ip === 'string' && ip !== '' && ip !== 'None') cluster.endpoints.push({ address: ip, port: ref.port, weight: 1, labels: {} });
        else { cluster.discovery = 'DNS'; cluster.endpoints.push({ address: host, port: ref.port, weight: 1, labels: {} }); }
      }
    }
    // gRPC is HTTP/2 end to end (the backend may also say so with appProtocol h2c/grpc).
    if (grpc && carries === 'http') cluster.httpProtocol = 'h2';
    // A DestinationRule for the Service applies as in Istio; for TLS a BackendTLSPolicy wins
    // (it is the Gateway API's own statement about this backend), and both are named.
    const fromDr = this.clusters.serviceDestinationRule(cluster, host, ns, carries);
    const tls = this.#policyFor(ns, ref.name, portName, carries, cluster);
    if (tls) {
      cluster.tls = tls;
      if (cluster.endpoints.length > 0) this.#policyClusters.set(name, new Set([route]));
      if (fromDr?.tls) {
        const policy = this.#policyName(ns, ref.name, portName);
        this.ctx.warn('TG6017', fromDr.dr, fromDr.tlsPath, `BackendTLSPolicy ${policy} also sets TLS for Service ${ns}/${ref.name} port ${ref.port}: the policy is used for Gateway API routes and this tls block is not`,
          'remove one of the two; keep the DestinationRule for connection pool or load balancer settings');
      }
    } else if (fromDr && fromDr.tls === null) {
      // The rule asked for TLS and is invalid (reported): never plaintext, no endpoints (503).
      cluster.endpoints = [];
      cluster.discovery = 'STATIC';
      cluster.tls = { mode: 'SIMPLE', autoSni: false, validationCa: this.ctx.addSecret({ name: 'system', source: { kind: 'system-roots' } }), subjectAltNames: [], autoSanValidation: true, insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' };
    } else if (fromDr?.tls) cluster.tls = fromDr.tls;
    this.clusters.clusters[name] = cluster;
    return name;
  }

  /**
   * The stand-in cluster for a backendRef that did not resolve (already reported): no endpoints,
   * `invalidBackend` set, so the requests its weight draws get 500 and connections are closed.
   */
  invalidBackend(route: GatewayApiResource, path: string): string {
    const name = `invalid|${route.kind}/${route.metadata.namespace}/${route.metadata.name}#${path}`;
    if (!this.clusters.clusters[name]) {
      this.clusters.clusters[name] = {
        name, serviceHost: '', servicePort: 0, discovery: 'STATIC', endpoints: [], lbPolicy: 'ROUND_ROBIN',
        connectTimeoutMs: this.ctx.options.connectTimeoutMs, httpProtocol: 'http1', limits: {},
        invalidBackend: `${route.kind} ${route.metadata.namespace}/${route.metadata.name} ${path} did not resolve (see the route's ResolvedRefs condition)`,
        origin: this.ctx.origin(route, path),
      };
    }
    return name;
  }

  /** The clusters a valid BackendTLSPolicy originates TLS to, with the routes sending to each. */
  policyClusters(): ReadonlyMap<string, ReadonlySet<GatewayApiResource>> {
    return this.#policyClusters;
  }

  /**
   * gRPC to a port whose cluster already exists as HTTP/1.1 (made for an earlier HTTP route, the
   * port not declared HTTP/2): one cluster speaks one protocol, so these calls will fail.
   */
  #h1ForGrpc(route: GatewayApiResource, path: string, host: string): void {
    this.ctx.warn('TG4001', route, path, `not supported yet: gRPC to ${host} over a cluster that speaks HTTP/1.1 (the port is not declared HTTP/2, and another route reaches it too); requests go out as HTTP/1.1`,
      'set appProtocol: kubernetes.io/h2c (or grpc) on the Service port, so every route reaches it over HTTP/2');
  }

  #policyName(ns: string, svc: string, portName: string | undefined): string {
    const list = this.#policies.get(`${ns}/${svc}`) ?? [];
    const hit = list.find((x) => x.sectionName !== undefined && x.sectionName === portName) ?? list.find((x) => x.sectionName === undefined);
    return hit ? `${hit.policy.metadata.namespace}/${hit.policy.metadata.name}` : '?';
  }

  /** EndpointSlices labelled for the Service (else its Endpoints object), ready addresses only. */
  #endpoints(svc: KubeObjectResource, sp: Rec, port: number): Endpoint[] {
    const ns = svc.metadata.namespace, name = svc.metadata.name;
    const spName = typeof sp.name === 'string' ? sp.name : '';
    const target = typeof sp.targetPort === 'number' ? sp.targetPort : port;
    const out: Endpoint[] = [];
    const slices = this.#kube.filter((k) => k.kind === 'EndpointSlice' && k.metadata.namespace === ns && k.metadata.labels['kubernetes.io/service-name'] === name);
    for (const s of slices) {
      const ports = Array.isArray(s.body.ports) ? (s.body.ports as Rec[]) : [];
      const p = ports.find((x) => (x.name ?? '') === spName) ?? (ports.length === 1 ? ports[0] : undefined);
      const num = typeof p?.port === 'number' ? p.port : target;
      for (const e of Array.isArray(s.body.endpoints) ? (s.body.endpoints as Rec[]) : []) {
        if (isRec(e.conditions) && e.conditions.ready === false) continue;
        for (const a of Array.isArray(e.addresses) ? e.addresses : []) if (typeof a === 'string') out.push({ address: a, port: num, weight: 1, labels: {} });
      }
    }
    if (slices.length > 0) return out;
    const eps = this.#kube.find((k) => k.kind === 'Endpoints' && k.metadata.namespace === ns && k.metadata.name === name);
    for (const sub of eps && Array.isArray(eps.body.subsets) ? (eps.body.subsets as Rec[]) : []) {
      const ports = Array.isArray(sub.ports) ? (sub.ports as Rec[]) : [];
      const p = ports.find((x) => (x.name ?? '') === spName) ?? (ports.length === 1 ? ports[0] : undefined);
      const num = typeof p?.port === 'number' ? p.port : target;
      for (const a of Array.isArray(sub.addresses) ? (sub.addresses as Rec[]) : []) if (typeof a.ip === 'string') out.push({ address: a.ip, port: num, weight: 1, labels: {} });
    }
    return out;
  }

  // ------------------------------------------------------------------ BackendTLSPolicy

  #indexPolicies(policies: GatewayApiResource[]): void {
    for (const p of policies) {
      this.ctx.touch(p);
      const s = specOf<BackendTlsPolicySpec>(p);
      (s.targetRefs ?? []).forEach((t, i) => {
        if (groupOf(t, '') !== '' || t.kind !== 'Service') {
          this.ctx.warn('TG6010', p, `spec.targetRefs[${i}]`, `target kind ${t.kind} is not supported: only Services (InvalidKind)`);
          this.book.set(p, '', { type: 'Accepted', status: 'False', reason: 'InvalidKind', message: `targetRefs[${i}] is a ${t.kind}` });
          return;
        }
        const key = `${p.metadata.namespace}/${t.name}`;
        const list = this.#policies.get(key) ?? [];
        const clash = list.find((x) => (x.sectionName ?? '') === (t.sectionName ?? ''));
        if (clash) {
          this.ctx.warn('TG6010', p, `spec.targetRefs[${i}]`, `Service ${key}${t.sectionName ? ' port ' + t.sectionName : ''} is already targeted by the older BackendTLSPolicy ${clash.policy.metadata.namespace}/${clash.policy.metadata.name}: this target is ignored (Conflicted)`);
          this.book.set(p, '', { type: 'Accepted', status: 'False', reason: 'Conflicted', message: `older policy ${clash.policy.metadata.name} targets the same Service` });
          return;
        }
        const e: { policy: GatewayApiResource; index: number; sectionName?: string } = { policy: p, index: i };
        if (t.sectionName) e.sectionName = t.sectionName;
        list.push(e);
        this.#policies.set(key, list);
      });
      const tls = this.#policyContext(p);
      this.#policyTls.set(p, tls);
      if (tls) this.book.set(p, '', { type: 'Accepted', status: 'True', reason: 'Accepted', message: '' });
      if (tls) this.book.set(p, '', { type: 'ResolvedRefs', status: 'True', reason: 'ResolvedRefs', message: '' });
    }
  }

  /** The upstream TLS of a policy; null = invalid (connections through it fail closed). */
  #policyContext(p: GatewayApiResource): UpstreamTlsContext | null {
    const v = specOf<BackendTlsPolicySpec>(p).validation ?? {};
    const bad = (path: string, reason: string, message: string, type: 'Accepted' | 'ResolvedRefs' = 'Accepted') => {
      this.ctx.warn('TG6010', p, path, `${message}: requests to the targeted backends fail with 503 (${reason})`);
      this.book.set(p, '', { type, status: 'False', reason, message });
      if (type !== 'Accepted') this.book.set(p, '', { type: 'Accepted', status: 'False', reason: 'NoValidCACertificate', message: 'no valid CA certificate' });
      return null;
    };
    const hostname = (v.hostname ?? '').toLowerCase();
    const he = hostname ? checkHostPattern(hostname, { allowStar: false, allowIp: false }) : 'validation.hostname is required';
    if (he || hostname.startsWith('*.')) return bad('spec.validation.hostname', 'Invalid', he ?? 'validation.hostname must not be a wildcard');
    const refs = v.caCertificateRefs ?? [];
    if (refs.length > 0 && v.wellKnownCACertificates) return bad('spec.validation', 'Invalid', 'caCertificateRefs and wellKnownCACertificates cannot be used together');
    let ca: string | undefined;
    if (v.wellKnownCACertificates !== undefined) {
      if (v.wellKnownCACertificates !== 'System') return bad('spec.validation.wellKnownCACertificates', 'Invalid', `wellKnownCACertificates "${v.wellKnownCACertificates}" is not supported: use System`);
      ca = this.ctx.addSecret({ name: 'system', source: { kind: 'system-roots' } });
    } else if (refs.length === 0) {
      return bad('spec.validation', 'Invalid', 'one of caCertificateRefs or wellKnownCACertificates is required');
    } else {
      const r = this.caBundle(p, refs[0]!, false);
      if ('reason' in r) return bad('spec.validation.caCertificateRefs[0]', r.reason, r.message, 'ResolvedRefs');
      ca = r.secret;
      if (refs.length > 1) this.ctx.warn('TG4001', p, 'spec.validation.caCertificateRefs[1]', 'not supported yet: more than one caCertificateRef; only the first is used');
    }
    const sans = (v.subjectAltNames ?? []).map((s) => (s.type === 'URI' ? s.uri ?? '' : (s.hostname ?? '').toLowerCase())).filter(Boolean);
    return {
      mode: 'SIMPLE', sni: hostname, autoSni: false, validationCa: ca,
      subjectAltNames: sans, autoSanValidation: sans.length === 0, insecureSkipVerify: false,
      alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3',
    };
  }

  /** BackendTLSPolicy for a Service port: one with a matching sectionName wins over one without. */
  #policyFor(ns: string, svc: string, portName: string | undefined, carries: 'http' | 'tcp', cluster: Cluster): UpstreamTlsContext | undefined {
    const list = this.#policies.get(`${ns}/${svc}`) ?? [];
    const hit = list.find((x) => x.sectionName !== undefined && x.sectionName === portName) ?? list.find((x) => x.sectionName === undefined);
    if (!hit) return undefined;
    const tls = this.#policyTls.get(hit.policy);
    if (!tls) {
      // Fail closed: no endpoints (503), and TLS still asked for should anything else pick it up.
      cluster.endpoints = [];
      cluster.discovery = 'STATIC';
      return { mode: 'SIMPLE', autoSni: false, validationCa: this.ctx.addSecret({ name: 'system', source: { kind: 'system-roots' } }), subjectAltNames: [], autoSanValidation: true, insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' };
    }
    return { ...tls, alpn: carries === 'http' ? (cluster.httpProtocol === 'h2' ? ['h2'] : ['http/1.1']) : [] };
  }
}


/**
 * Route destinations -> Clusters: ServiceEntry lookup, port and targetPort, subsets, and the
 * DestinationRule traffic policy merged as Istio merges it (per setting, highest first):
 * subset port-level > subset > DR port-level > DR top level.
 */
import type { DestinationRuleResource, ServiceEntryResource } from '../../config/resource.js';
import type {
  ClientTlsSettings, ConnectionPoolSettings, Destination, LoadBalancerSettings, ServicePort, TrafficPolicy,
} from '../../config/types/istio.js';
import type { Cluster, Endpoint, UpstreamTlsContext } from '../snapshot.js';
import { parseDuration, type Locatable, type TranslateContext } from './context.js';
import { fqdn, hostSubsetOf, isIp } from './hosts.js';
import { fileSecret, resolveCredential } from './secrets.js';

export interface DestinationRef {
  owner: Locatable; // the VirtualService (for diagnostics)
  path: string; // e.g. spec.http[0].route[1].destination
  destination: Destination;
  /** Port the traffic arrived on, used when the destination names no port and there is no ServiceEntry. */
  fallbackPort?: number;
  /** What the route carries: decides ALPN and whether SNI may come from Host. */
  carries: 'http' | 'tcp';
}

interface ServiceLookup {
  se?: ServiceEntryResource;
  host: string; // cluster host (SE host or FQDN)
}

export class ClusterBuilder {
  readonly clusters: Record<string, Cluster> = {};
  readonly #warnedDr = new Set<string>();

  constructor(private readonly ctx: TranslateContext) {}

  /** Returns the cluster name for a destination, building the cluster on first use; undefined on error. */
  clusterFor(ref: DestinationRef): string | undefined {
    const { ctx } = this;
    const d = ref.destination;
    const vsNs = ref.owner.metadata.namespace;
    const svc = this.#lookupService(d.host, vsNs);
    let port = d.port?.number;
    let sePort: ServicePort | undefined;
    if (svc.se) {
      const ports = svc.se.spec.ports ?? [];
      if (port === undefined) {
        if (ports.length === 1) port = ports[0]!.number;
        else {
          ctx.error('TG3018', ref.owner, `${ref.path}.port`, `destination "${d.host}" has ${ports.length} ports (${ports.map((p) => p.number).join(', ') || 'none'}): name one with port.number`);
          return undefined;
        }
      }
      sePort = ports.find((p) => p.number === port);
      if (!sePort) {
        ctx.error('TG3018', ref.owner, `${ref.path}.port`, `port ${port} is not a port of ServiceEntry ${svc.se.metadata.namespace}/${svc.se.metadata.name} (ports: ${ports.map((p) => p.number).join(', ')})`);
        return undefined;
      }
    } else {
      port ??= ref.fallbackPort;
      if (port === undefined) {
        ctx.error('TG3018', ref.owner, `${ref.path}.port`, `destination "${d.host}" has no ServiceEntry and names no port`, 'set destination.port.number or add a ServiceEntry');
        return undefined;
      }
    }
    const subset = d.subset ?? '';
    const name = `outbound|${port}|${subset}|${svc.host}`;
    if (this.clusters[name]) return name;

    const dr = this.#lookupDestinationRule(svc.host, d.host, vsNs);
    let subsetPolicy: TrafficPolicy | undefined;
    let subsetLabels: Record<string, string> | undefined;
    let subsetIndex = -1;
    if (d.subset) {
      subsetIndex = dr?.spec.subsets?.findIndex((x) => x.name === d.subset) ?? -1;
      const s = subsetIndex >= 0 ? dr!.spec.subsets![subsetIndex] : undefined;
      if (!s) {
        ctx.warn('TG3010', ref.owner, `${ref.path}.subset`, `subset "${d.subset}" of "${svc.host}" is not defined by any DestinationRule: requests to it get 503`,
          dr ? `DestinationRule ${dr.metadata.namespace}/${dr.metadata.name} defines: ${(dr.spec.subsets ?? []).map((x) => x.name).join(', ') || 'no subsets'}` : 'add a DestinationRule with this subset');
      } else {
        subsetPolicy = s.trafficPolicy;
        subsetLabels = s.labels;
      }
    }

    const layers = policyLayers(dr?.spec.trafficPolicy, subsetPolicy, subsetIndex, port);
    const drPath = (field: string) => layers.pathOf(field);
    const cluster: Cluster = {
      name,
      serviceHost: svc.host,
      servicePort: port,
      discovery: 'STATIC',
      endpoints: [],
      lbPolicy: 'LEAST_REQUEST',
      connectTimeoutMs: ctx.options.connectTimeoutMs,
      httpProtocol: 'http1',
      limits: {},
      origin: ctx.origin(ref.owner, ref.path),
    };
    if (subset) cluster.subset = subset;
    const proto = (sePort?.protocol ?? '').toUpperCase();
    if (proto === 'HTTP2' || proto === 'GRPC') cluster.httpProtocol = 'h2';

    // Endpoints.
    if (svc.se) this.#seEndpoints(cluster, svc.se, sePort!, subsetLabels, ref);
    else {
      cluster.discovery = 'DNS';
      const host = d.host.toLowerCase();
      cluster.endpoints.push({ address: host, port, weight: 1, labels: {} });
      if (subsetLabels && Object.keys(subsetLabels).length > 0) {
        ctx.warn('TG3010', ref.owner, `${ref.path}.subset`, `subset "${d.subset}" selects endpoints by labels, but "${d.host}" has no ServiceEntry with labelled endpoints: requests to it get 503`);
        cluster.endpoints = [];
      }
    }

    if (dr) {
      const pp = dr.metadata.annotations['tlsgate.io/proxy-protocol'];
      if (pp !== undefined) {
        if (pp !== 'v1' && pp !== 'v2') ctx.error('TG2003', dr, 'metadata.annotations["tlsgate.io/proxy-protocol"]', `invalid value "${pp}"`, 'valid values: v1, v2');
        else if (ref.carries === 'http') {
          this.#once(dr, 'pp-http', () => ctx.error('TG4001', dr, 'metadata.annotations["tlsgate.io/proxy-protocol"]',
            `not supported yet: sending PROXY protocol to "${svc.host}" from HTTP routes (pooled connections are shared by many clients)`, 'use it with tcp or tls routes'));
        } else cluster.proxyProtocol = pp;
      }
      this.#applyLoadBalancer(cluster, layers.get('loadBalancer') as LoadBalancerSettings | undefined, dr, drPath('loadBalancer'));
      this.#applyConnectionPool(cluster, layers.get('connectionPool') as ConnectionPoolSettings | undefined, dr, drPath('connectionPool'));
      if (layers.get('outlierDetection') !== undefined) {
        this.#once(dr, drPath('outlierDetection'), () => ctx.error('TG4001', dr, drPath('outlierDetection'), 'not supported yet: outlierDetection', 'remove it; tlsgate does not eject endpoints yet'));
      }
      const tls = layers.get('tls') as ClientTlsSettings | undefined;
      if (tls) {
        this.#sniDefault = `outbound_.${port}_.${subset}_.${svc.host}`;
        const up = this.#upstreamTls(tls, dr, drPath('tls'), svc.host, ref.carries, cluster.httpProtocol);
        if (up === null) return undefined;
        if (up) {
          cluster.tls = up;
          const sp = (sePort?.protocol ?? '').toUpperCase();
          // ISTIO_MUTUAL around a TLS port is Istio's own egress pattern (the app's TLS inside mTLS).
          if ((sp === 'HTTPS' || sp === 'TLS') && up.mode !== 'ISTIO_MUTUAL') {
            this.#once(dr, drPath('tls') + '#double', () => ctx.warn('TG5003', dr, drPath('tls.mode'),
              `double TLS: ServiceEntry port ${port} of "${svc.host}" is ${sp} (the app already sends TLS) and this DestinationRule originates TLS again`,
              'declare the port as HTTP (or use a port with targetPort: 443) so the app sends plaintext and the proxy originates TLS'));
          }
        }
      }
    }
    // Auto mTLS: with no TLS setting from a DestinationRule, endpoints that carry the
    // `security.istio.io/tlsMode: istio` label get Istio mTLS, as Istio's proxies do.
    const drTls = dr ? layers.get('tls') as ClientTlsSettings | undefined : undefined;
    if (!drTls && cluster.endpoints.length > 0 && cluster.endpoints.every((e) => e.labels['security.istio.io/tlsMode'] === 'istio')) {
      this.#sniDefault = `outbound_.${port}_.${subset}_.${svc.host}`;
      cluster.tls = { ...this.istioMutual(svc.host, ref.carries, cluster.httpProtocol, undefined, undefined), autoMtls: true };
    }
    this.clusters[name] = cluster;
    return name;
  }

  #sniDefault = '';

  /**
   * A DestinationRule for a Kubernetes Service that a Gateway API route sends to (host
   * `<name>.<ns>.svc.cluster.local`, or a short name or wildcard resolved in the rule's namespace,
   * as Istio reads them), applied to that backend's `cluster` like the Istio path applies it:
   * load balancer, connection pool, outlier detection (reported), PROXY protocol. Backend refs
   * have no subsets, so the top-level and port-level policies are the layers. Its TLS is returned,
   * not applied, so the caller can weigh it against a BackendTLSPolicy: `tls` undefined = none,
   * null = invalid (reported; the caller fails closed). undefined when no rule applies.
   */
  serviceDestinationRule(cluster: Cluster, host: string, ns: string, carries: 'http' | 'tcp'): { dr: DestinationRuleResource; tlsPath: string; tls: UpstreamTlsContext | undefined | null } | undefined {
    const dr = this.#lookupDestinationRule(host, host, ns);
    if (!dr) return undefined;
    const { ctx } = this;
    const port = cluster.servicePort;
    const layers = policyLayers(dr.spec.trafficPolicy, undefined, -1, port);
    const pp = dr.metadata.annotations['tlsgate.io/proxy-protocol'];
    if (pp === 'v1' || pp === 'v2') {
      if (carries === 'tcp') cluster.proxyProtocol = pp;
      else this.#once(dr, 'pp-http', () => ctx.error('TG4001', dr, 'metadata.annotations["tlsgate.io/proxy-protocol"]',
        `not supported yet: sending PROXY protocol to "${host}" from HTTP routes (pooled connections are shared by many clients)`, 'use it with TCPRoutes or TLSRoutes'));
    } else if (pp !== undefined) ctx.error('TG2003', dr, 'metadata.annotations["tlsgate.io/proxy-protocol"]', `invalid value "${pp}"`, 'valid values: v1, v2');
    this.#applyLoadBalancer(cluster, layers.get('loadBalancer') as LoadBalancerSettings | undefined, dr, layers.pathOf('loadBalancer'));
    this.#applyConnectionPool(cluster, layers.get('connectionPool') as ConnectionPoolSettings | undefined, dr, layers.pathOf('connectionPool'));
    if (layers.get('outlierDetection') !== undefined) {
      this.#once(dr, layers.pathOf('outlierDetection'), () => ctx.error('TG4001', dr, layers.pathOf('outlierDetection'), 'not supported yet: outlierDetection', 'remove it; tlsgate does not eject endpoints yet'));
    }
    const settings = layers.get('tls') as ClientTlsSettings | undefined;
    const tlsPath = layers.pathOf('tls');
    if (!settings) return { dr, tlsPath, tls: undefined };
    this.#sniDefault = `outbound_.${port}_._.${host}`;
    return { dr, tlsPath, tls: this.#upstreamTls(settings, dr, tlsPath, host, carries, cluster.httpProtocol) };
  }

  /**
   * ISTIO_MUTUAL origination: the proxy's workload certificate, the mesh roots, SNI `sni` or
   * `outbound_.<port>_.<subset>_.<host>`, Istio's mTLS ALPN. With no subjectAltNames any identity
   * issued by the mesh CA is accepted (the chain is verified; names are not).
   */
  istioMutual(host: string, carries: 'http' | 'tcp', httpProtocol: Cluster['httpProtocol'], sni: string | undefined, sans: string[] | undefined): UpstreamTlsContext {
    void host;
    return {
      mode: 'ISTIO_MUTUAL',
      sni: sni ?? this.#sniDefault,
      autoSni: false,
      validationCa: this.ctx.addSecret({ name: 'mesh-roots', source: { kind: 'mesh-roots' } }),
      clientCertificate: this.ctx.addSecret({ name: 'workload', source: { kind: 'workload' } }),
      subjectAltNames: sans ?? [],
      autoSanValidation: false,
      insecureSkipVerify: false,
      alpn: carries === 'http' ? (httpProtocol === 'h2' ? ['istio-h2', 'istio', 'h2'] : ['istio-http/1.1', 'istio']) : ['istio-peer-exchange', 'istio'],
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.3',
    };
  }

  #once(dr: DestinationRuleResource, key: string, fn: () => void): void {
    const k = `${dr.metadata.namespace}/${dr.metadata.name}/${key}`;
    if (this.#warnedDr.has(k)) return;
    this.#warnedDr.add(k);
    fn();
  }

  #lookupService(host: string, vsNs: string): ServiceLookup {
    const raw = host.toLowerCase();
    const full = fqdn(raw, vsNs);
    let best: { se: ServiceEntryResource; host: string; exact: boolean } | undefined;
    for (const se of this.ctx.resources.serviceEntries) {
      for (const h0 of se.spec.hosts) {
        const h = h0.toLowerCase();
        const hf = fqdn(h, se.metadata.namespace);
        if (h === raw || h === full || hf === full) return { se, host: h };
        if (h.startsWith('*.') && (hostSubsetOf(raw, h) || hostSubsetOf(full, h))) {
          if (!best || (!best.exact && h.length > best.host.length)) best = { se, host: raw, exact: false };
        }
      }
    }
    if (best) return { se: best.se, host: best.host };
    return { host: raw.includes('.') ? raw : full };
  }

  #lookupDestinationRule(clusterHost: string, destHost: string, vsNs: string): DestinationRuleResource | undefined {
    const full = fqdn(destHost, vsNs);
    let best: DestinationRuleResource | undefined;
    let bestLen = -1;
    for (const dr of this.ctx.resources.destinationRules) {
      // A workloadSelector picks sidecars by label: gateways never use such a rule.
      if (dr.spec.workloadSelector) {
        const want = dr.spec.workloadSelector.matchLabels ?? {};
        const mine = this.ctx.options.labels ?? {};
        if (!this.ctx.options.sidecar || dr.metadata.namespace !== this.ctx.options.proxyNamespace ||
          !Object.entries(want).every(([k, v]) => mine[k] === v)) continue;
      }
      const h = fqdn(dr.spec.host, dr.metadata.namespace);
      const raw = dr.spec.host.toLowerCase();
      if (h === full || raw === clusterHost || h === clusterHost || raw === destHost.toLowerCase()) return dr;
      if (h.startsWith('*.') && (hostSubsetOf(full, h) || hostSubsetOf(clusterHost, h)) && h.length > bestLen) {
        best = dr;
        bestLen = h.length;
      }
    }
    return best;
  }

  #seEndpoints(cluster: Cluster, se: ServiceEntryResource, sePort: ServicePort, labels: Record<string, string> | undefined, ref: DestinationRef): void {
    const res = se.spec.resolution ?? 'NONE';
    const targetPort = sePort.targetPort ?? sePort.number;
    const eps: Endpoint[] = [];
    for (const e of se.spec.endpoints ?? []) {
      if (!e.address) continue;
      eps.push({ address: e.address, port: e.ports?.[sePort.name] ?? targetPort, weight: e.weight ?? 1, labels: e.labels ?? {} });
    }
    switch (res) {
      case 'STATIC':
        cluster.discovery = 'STATIC';
        break;
      case 'DNS':
      case 'DNS_ROUND_ROBIN':
        cluster.discovery = 'DNS';
        // No endpoints: each host of the entry is its own service, resolved by its own name.
        if (eps.length === 0 && !cluster.serviceHost.startsWith('*')) {
          eps.push({ address: cluster.serviceHost, port: targetPort, weight: 1, labels: {} });
        }
        break;
      case 'NONE':
        cluster.discovery = 'ORIGINAL_DST';
        this.ctx.warn('TG3023', se, 'spec.resolution', 'resolution NONE forwards to the original destination address, which at a gateway is the gateway itself: requests to it get 503',
          'use resolution STATIC with endpoints, or DNS');
        break;
      default:
        this.ctx.error('TG4001', se, 'spec.resolution', `not supported yet: resolution ${res}`, 'valid here: STATIC, DNS, DNS_ROUND_ROBIN');
    }
    cluster.endpoints = labels ? eps.filter((e) => Object.entries(labels).every(([k, v]) => e.labels[k] === v)) : eps;
    if (labels && cluster.endpoints.length === 0) {
      this.ctx.warn('TG3010', ref.owner, `${ref.path}.subset`, `subset "${ref.destination.subset}" selects no endpoint of ServiceEntry ${se.metadata.namespace}/${se.metadata.name}: requests to it get 503`);
    }
  }

  #applyLoadBalancer(cluster: Cluster, lb: LoadBalancerSettings | undefined, dr: DestinationRuleResource, path: string): void {
    if (!lb) return;
    switch (lb.simple) {
      case undefined: case 'UNSPECIFIED': case 'LEAST_CONN': case 'LEAST_REQUEST': cluster.lbPolicy = 'LEAST_REQUEST'; break;
      case 'ROUND_ROBIN': cluster.lbPolicy = 'ROUND_ROBIN'; break;
      case 'RANDOM': cluster.lbPolicy = 'RANDOM'; break;
      case 'PASSTHROUGH':
        this.#once(dr, path + '.simple', () => this.ctx.error('TG4001', dr, `${path}.simple`, 'not supported yet: loadBalancer PASSTHROUGH', 'valid values: ROUND_ROBIN, LEAST_REQUEST, RANDOM'));
    }
    for (const f of ['consistentHash', 'localityLbSetting', 'warmup', 'warmupDurationSecs'] as const) {
      if (lb[f] !== undefined) this.#once(dr, `${path}.${f}`, () => this.ctx.error('TG4001', dr, `${path}.${f}`, `not supported yet: loadBalancer.${f}`));
    }
  }

  #applyConnectionPool(cluster: Cluster, cp: ConnectionPoolSettings | undefined, dr: DestinationRuleResource, path: string): void {
    if (!cp) return;
    const v = this.#poolValues(cp, dr, path);
    const tcp = cp.tcp, http = cp.http;
    if (tcp) {
      if (tcp.maxConnections !== undefined) cluster.limits.maxConnections = tcp.maxConnections;
      if (v.connectTimeoutMs !== undefined) cluster.connectTimeoutMs = v.connectTimeoutMs;
      if (v.tcpIdleTimeoutMs !== undefined) cluster.limits.tcpIdleTimeoutMs = v.tcpIdleTimeoutMs;
      if (v.tcpKeepalive !== undefined) cluster.tcpKeepalive = v.tcpKeepalive;
      if (tcp.maxConnectionDuration !== undefined) {
        this.#once(dr, `${path}.tcp.maxConnectionDuration`, () => this.ctx.error('TG4001', dr, `${path}.tcp.maxConnectionDuration`, 'not supported yet: connectionPool.tcp.maxConnectionDuration'));
      }
    }
    if (http) {
      if (http.http1MaxPendingRequests !== undefined) cluster.limits.maxPendingRequests = http.http1MaxPendingRequests;
      if (http.http2MaxRequests !== undefined) cluster.limits.maxRequests = http.http2MaxRequests;
      if (http.maxRequestsPerConnection !== undefined && http.maxRequestsPerConnection > 0) cluster.limits.maxRequestsPerConnection = http.maxRequestsPerConnection;
      if (v.httpIdleTimeoutMs !== undefined) cluster.limits.idleTimeoutMs = v.httpIdleTimeoutMs;
      for (const f of ['maxRetries', 'h2UpgradePolicy', 'useClientProtocol', 'maxConcurrentStreams'] as const) {
        if (http[f] !== undefined) this.#once(dr, `${path}.http.${f}`, () => this.ctx.error('TG4001', dr, `${path}.http.${f}`, `not supported yet: connectionPool.http.${f}`));
      }
    }
  }

  /**
   * The connection pool's durations and keep-alive, checked: a bad value is reported (TG2005, once
   * per field of a rule however many clusters use it) and left out.
   */
  #poolValues(cp: ConnectionPoolSettings, dr: DestinationRuleResource, path: string): PoolValues {
    const out: PoolValues = {};
    const bad = (field: string, message: string, hint?: string) =>
      this.#once(dr, `${path}.${field}#value`, () => this.ctx.error('TG2005', dr, `${path}.${field}`, message, hint));
    const { tcp, http } = cp;
    if (tcp) {
      const ct = parseDuration(tcp.connectTimeout);
      if (ct !== undefined) {
        if (Number.isNaN(ct) || ct <= 0) bad('tcp.connectTimeout', `invalid duration "${tcp.connectTimeout}"`, 'use e.g. 500ms, 10s');
        else out.connectTimeoutMs = ct;
      }
      const idle = parseDuration(tcp.idleTimeout);
      if (idle !== undefined) {
        if (Number.isNaN(idle) || idle < 0) bad('tcp.idleTimeout', `invalid duration "${tcp.idleTimeout}"`, 'use e.g. 30s, 1h; 0s disables it');
        else out.tcpIdleTimeoutMs = idle;
      }
      if (tcp.tcpKeepalive !== undefined) out.tcpKeepalive = keepaliveValues(tcp.tcpKeepalive, (field, message, hint) => bad(`tcp.tcpKeepalive.${field}`, message, hint));
    }
    const it = parseDuration(http?.idleTimeout);
    if (it !== undefined) {
      if (Number.isNaN(it)) bad('http.idleTimeout', `invalid duration "${http!.idleTimeout}"`);
      else out.httpIdleTimeoutMs = it;
    }
    return out;
  }

  /**
   * Checks every DestinationRule at every level (top, port, subset, subset port) against the
   * connection pool's value rules and the TLS settings' own rules, whether or not a route uses
   * it: Istio rejects such a rule when it is applied, not when traffic first needs it. What
   * routes use was checked as their clusters were built; each bad value is reported once.
   */
  checkDestinationRules(): void {
    type Level = { connectionPool?: ConnectionPoolSettings; tls?: ClientTlsSettings; portLevelSettings?: Level[] };
    for (const dr of this.ctx.resources.destinationRules) {
      const levels: [string, Level | undefined][] = [['spec.trafficPolicy', dr.spec.trafficPolicy]];
      (dr.spec.subsets ?? []).forEach((s, i) => levels.push([`spec.subsets[${i}].trafficPolicy`, s.trafficPolicy]));
      for (const [path, policy] of [...levels]) {
        policy?.portLevelSettings?.forEach((p, i) => levels.push([`${path}.portLevelSettings[${i}]`, p]));
      }
      for (const [path, policy] of levels) {
        if (policy?.connectionPool) this.#poolValues(policy.connectionPool, dr, `${path}.connectionPool`);
        if (policy?.tls) this.#tlsSettingsOk(policy.tls, dr, `${path}.tls`);
      }
    }
  }

  /**
   * The rules Istio's validation sets on ClientTlsSettings (SIMPLE and MUTUAL): each one broken is
   * reported once per field of a rule (TG3021). False when any is.
   */
  #tlsSettingsOk(tls: ClientTlsSettings, dr: DestinationRuleResource, path: string): boolean {
    const mode = tls.mode ?? 'DISABLE';
    if (mode !== 'SIMPLE' && mode !== 'MUTUAL') return true;
    let ok = true;
    const bad = (field: string, msg: string, hint?: string) => { ok = false; this.#once(dr, `${path}.${field}`, () => this.ctx.error('TG3021', dr, `${path}.${field}`, msg, hint)); };
    if (tls.credentialName && (tls.clientCertificate || tls.privateKey || tls.caCertificates || tls.caCrl)) {
      bad('credentialName', 'cannot set clientCertificate, privateKey, caCertificates or caCrl together with credentialName', 'put the CA and CRL in the Secret (ca.crt / ca.crl)');
    }
    if (tls.insecureSkipVerify) {
      if (mode === 'SIMPLE' && (tls.caCertificates || tls.credentialName || tls.subjectAltNames?.length)) bad('insecureSkipVerify', 'insecureSkipVerify cannot be combined with caCertificates, credentialName or subjectAltNames in SIMPLE mode');
      if (mode === 'MUTUAL' && (tls.caCertificates || tls.subjectAltNames?.length)) bad('insecureSkipVerify', 'insecureSkipVerify cannot be combined with caCertificates or subjectAltNames in MUTUAL mode');
    }
    if (mode === 'MUTUAL' && !tls.credentialName) {
      if (!tls.clientCertificate) bad('clientCertificate', 'MUTUAL needs a client certificate: set clientCertificate and privateKey, or credentialName');
      else if (!tls.privateKey) bad('privateKey', 'MUTUAL needs privateKey with clientCertificate');
    }
    return ok;
  }

  /** Upstream TLS from ClientTlsSettings. undefined = plaintext; null = invalid (reported). */
  #upstreamTls(tls: ClientTlsSettings, dr: DestinationRuleResource, path: string, host: string, carries: 'http' | 'tcp', httpProtocol: Cluster['httpProtocol']): UpstreamTlsContext | undefined | null {
    const { ctx } = this;
    const mode = tls.mode ?? 'DISABLE';
    if (mode === 'DISABLE') return undefined;
    if (mode === 'ISTIO_MUTUAL') return this.istioMutual(host, carries, httpProtocol, tls.sni, tls.subjectAltNames);
    if (!this.#tlsSettingsOk(tls, dr, path)) return null;
    let validationCa: string | undefined;
    let clientCertificate: string | undefined;
    let crl: string | undefined;
    if (tls.credentialName) {
      const refs = resolveCredential(ctx, dr, `${path}.credentialName`, tls.credentialName, { certificate: mode === 'MUTUAL', ca: false });
      if (!refs) return null;
      clientCertificate = refs.certificate;
      validationCa = refs.ca;
      crl = refs.crl;
    }
    if (mode === 'MUTUAL' && !tls.credentialName) clientCertificate = fileSecret(ctx, dr, { cert: tls.clientCertificate!, key: tls.privateKey! });
    if (tls.caCertificates) validationCa = fileSecret(ctx, dr, { ca: tls.caCertificates });
    if (tls.caCrl) crl = fileSecret(ctx, dr, { crl: tls.caCrl });
    if (!validationCa) {
      validationCa = ctx.addSecret({ name: 'system', source: { kind: 'system-roots' } });
      if (!tls.insecureSkipVerify) {
        this.#once(dr, path + '#system', () => ctx.warn('TG5002', dr, `${path}.caCertificates`, `no caCertificates for "${host}": the upstream certificate is verified against the system roots`,
          'set caCertificates (or a credentialName with ca.crt) to pin the CA you expect'));
      }
    }
    if (tls.insecureSkipVerify) {
      this.#once(dr, path + '#insecure', () => ctx.warn('TG5001', dr, `${path}.insecureSkipVerify`, `insecureSkipVerify: the certificate of "${host}" is not verified (any server, any name)`));
    }
    const sni = tls.sni ?? (isIp(host) || host.startsWith('*') ? undefined : host);
    const up: UpstreamTlsContext = {
      mode,
      autoSni: false,
      validationCa,
      subjectAltNames: tls.subjectAltNames ?? [],
      autoSanValidation: !(tls.subjectAltNames?.length),
      insecureSkipVerify: tls.insecureSkipVerify === true,
      alpn: carries === 'http' ? (httpProtocol === 'h2' ? ['h2'] : ['http/1.1']) : [],
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.3',
    };
    if (sni !== undefined) up.sni = sni;
    if (crl) up.crl = crl;
    if (clientCertificate) up.clientCertificate = clientCertificate;
    // ServiceEntry subjectAltNames apply when the DR gives none.
    if (up.subjectAltNames.length === 0) {
      const se = this.ctx.resources.serviceEntries.find((s) => s.spec.hosts.some((h) => h.toLowerCase() === host));
      if (se?.spec.subjectAltNames?.length) {
        up.subjectAltNames = se.spec.subjectAltNames;
        up.autoSanValidation = false;
      }
    }
    return up;
  }
}

/** A connection pool's checked durations (ms) and keep-alive. */
interface PoolValues {
  connectTimeoutMs?: number;
  tcpIdleTimeoutMs?: number;
  tcpKeepalive?: NonNullable<Cluster['tcpKeepalive']>;
  httpIdleTimeoutMs?: number;
}

/**
 * tcpKeepalive replaces what a broader level set (a subset's or port's own, as a whole). Istio
 * hands Envoy whole seconds (the fraction is dropped); Linux takes 1-32767 s and 1-127 probes, so
 * values outside are errors here rather than a socket option failing on every connection.
 * undefined when a value is bad (nothing half applied).
 */
function keepaliveValues(ka: NonNullable<NonNullable<ConnectionPoolSettings['tcp']>['tcpKeepalive']>,
  bad: (field: string, message: string, hint: string) => void): PoolValues['tcpKeepalive'] {
  const out: NonNullable<PoolValues['tcpKeepalive']> = {};
  let ok = true;
  for (const [field, key] of [['time', 'timeS'], ['interval', 'intervalS']] as const) {
    const raw = ka[field];
    const ms = parseDuration(raw);
    if (ms === undefined) continue;
    const s = Math.floor(ms / 1000);
    if (Number.isNaN(ms) || s < 1 || s > 32767) {
      ok = false;
      bad(field, `invalid keep-alive ${field} "${raw}": the kernel takes whole seconds from 1s to 32767s`, 'use e.g. 30s, 5m');
    } else {
      out[key] = s;
    }
  }
  if (ka.probes !== undefined && ka.probes > 0) {
    if (ka.probes > 127) {
      ok = false;
      bad('probes', `invalid keep-alive probes ${ka.probes}: the kernel takes 1 to 127`, 'use e.g. 3, 9');
    } else {
      out.probes = ka.probes;
    }
  }
  return ok ? out : undefined;
}

/** Per-setting precedence over the four policy layers for one port. */
function policyLayers(top: TrafficPolicy | undefined, subset: TrafficPolicy | undefined, subsetIndex: number, port: number) {
  const topPort = top?.portLevelSettings?.findIndex((p) => p.port?.number === port) ?? -1;
  const subPort = subset?.portLevelSettings?.findIndex((p) => p.port?.number === port) ?? -1;
  type Field = 'loadBalancer' | 'connectionPool' | 'outlierDetection' | 'tls';
  const layers: { policy: Record<string, unknown> | undefined; path: string }[] = [
    { policy: subPort >= 0 ? subset!.portLevelSettings![subPort] as Record<string, unknown> : undefined, path: `spec.subsets[${subsetIndex}].trafficPolicy.portLevelSettings[${subPort}]` },
    { policy: subset as Record<string, unknown> | undefined, path: `spec.subsets[${subsetIndex}].trafficPolicy` },
    { policy: topPort >= 0 ? top!.portLevelSettings![topPort] as Record<string, unknown> : undefined, path: `spec.trafficPolicy.portLevelSettings[${topPort}]` },
    { policy: top as Record<string, unknown> | undefined, path: 'spec.trafficPolicy' },
  ];
  return {
    get(field: Field): unknown {
      for (const l of layers) if (l.policy && l.policy[field] !== undefined) return l.policy[field];
      return undefined;
    },
    pathOf(field: string): string {
      const f = field.split('.')[0]!;
      for (const l of layers) if (l.policy && l.policy[f] !== undefined) return `${l.path}.${field}`;
      return `spec.trafficPolicy.${field}`;
    },
  };
}

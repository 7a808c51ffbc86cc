import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseText } from '../../../src/config/load.js';
import { translate } from '../../../src/model/translate/index.js';
import { intersectHostnames, selectorMatchesNamespace, parseGatewayDuration } from '../../../src/model/translate/gateway-api/index.js';
import type { FilterChain, HttpConnectionManager, Listener, Snapshot, TcpProxy } from '../../../src/model/snapshot.js';

function tr(yaml: string) {
  const parsed = parseText(yaml, '/cfg/gw.yaml');
  assert.deepEqual(parsed.diagnostics.filter((d) => d.severity === 'error'), [], 'fixture must load cleanly');
  return translate(parsed.resources);
}

const PEM = '-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n';
const KEY = '-----BEGIN PRIVATE KEY-----\\nMIIB\\n-----END PRIVATE KEY-----\\n';
const secret = (name: string, ns = 'default', ca = false) => `
---
apiVersion: v1
kind: Secret
metadata: {name: ${name}, namespace: ${ns}}
type: kubernetes.io/tls
stringData: {tls.crt: "${PEM}", tls.key: "${KEY}"${ca ? `, ca.crt: "${PEM}"` : ''}}
`;
const configMap = (name: string, ns = 'default') => `
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ${name}, namespace: ${ns}}
data: {ca.crt: "${PEM}"}
`;
const service = (name: string, port: number, addrs: string[], ns = 'default') => `
---
apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: ${ns}}
spec: {ports: [{name: web, port: ${port}, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ${name}-x1, namespace: ${ns}, labels: {kubernetes.io/service-name: ${name}}}
addressType: IPv4
ports: [{name: web, port: 8080}]
endpoints:
${addrs.map((a) => `- addresses: ["${a}"]`).join('\n')}
- addresses: ["10.9.9.9"]
  conditions: {ready: false}
`;

function listener(s: Snapshot, port: number): Listener {
  const l = s.listeners.find((x) => x.port === port);
  assert.ok(l, `listener on ${port}`);
  return l;
}
function hcm(fc: FilterChain): HttpConnectionManager {
  assert.equal(fc.filter.kind, 'http');
  return fc.filter as HttpConnectionManager;
}
function status(s: Snapshot, kind: string, name: string): string[] {
  return s.statuses.find((x) => x.resource.kind === kind && x.resource.name === name)?.messages ?? [];
}

test('hostname intersection follows the Gateway API rules', () => {
  const cases: [string | undefined, string[], string[]][] = [
    [undefined, [], ['*']],
    ['a.example.com', [], ['a.example.com']],
    [undefined, ['x.io', '*.y.io'], ['x.io', '*.y.io']],
    ['*.example.com', ['foo.example.com', 'example.com', 'a.b.example.com'], ['foo.example.com', 'a.b.example.com']],
    ['foo.example.com', ['*.example.com'], ['foo.example.com']],
    ['foo.example.com', ['bar.example.com'], []],
    ['*.example.com', ['*.foo.example.com', '*.com'], ['*.foo.example.com', '*.example.com']],
  ];
  for (const [l, r, want] of cases) assert.deepEqual(intersectHostnames(l, r), want, `${l} x ${JSON.stringify(r)}`);
});

test('namespace selector sees kubernetes.io/metadata.name only; durations parse', () => {
  assert.equal(selectorMatchesNamespace({ matchLabels: { 'kubernetes.io/metadata.name': 'a' } }, 'a'), true);
  assert.equal(selectorMatchesNamespace({ matchLabels: { 'kubernetes.io/metadata.name': 'a' } }, 'b'), false);
  assert.equal(selectorMatchesNamespace({ matchLabels: { team: 'x' } }, 'a'), false);
  assert.equal(selectorMatchesNamespace({ matchExpressions: [{ key: 'kubernetes.io/metadata.name', operator: 'In', values: ['a', 'c'] }] }, 'c'), true);
  assert.equal(parseGatewayDuration('1m30s'), 90_000);
  assert.equal(parseGatewayDuration('250ms'), 250);
  assert.ok(Number.isNaN(parseGatewayDuration('1.5s')));
});

const GW_HTTP = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
  - {name: foo, port: 8080, protocol: HTTP, hostname: foo.example.com, allowedRoutes: {namespaces: {from: All}}}
`;

test('HTTPRoute precedence: exact > longest prefix > method > headers > older route', () => {
  const s = tr(`${GW_HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-newer, namespace: default, creationTimestamp: "2024-02-01T00:00:00Z"}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: svc, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v1/}}, {path: {type: Exact, value: /api}}]
    backendRefs: [{name: svc, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-older, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, method: GET}, {path: {type: PathPrefix, value: /api}, headers: [{name: X-A, value: "1"}, {name: x-b, value: "2"}]}, {path: {type: PathPrefix, value: /api}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
${service('svc', 80, ['10.0.0.1', '10.0.0.2'])}`);
  const vh = hcm(listener(s.snapshot, 8080).filterChains[0]!).routeConfig.virtualHosts.find((v) => v.domains[0] === '*')!;
  assert.deepEqual(vh.routes.map((r) => r.name), [
    'default/b-newer#rules[1].matches[1]', // Exact /api
    'default/b-newer#rules[1].matches[0]', // prefix /api/v1
    'default/a-older#rules[0].matches[0]', // prefix /api + method
    'default/a-older#rules[0].matches[1]', // + 2 headers
    'default/a-older#rules[0].matches[2]', // older route wins the tie
    'default/b-newer#rules[0].matches[0]',
  ]);
  // Element-wise prefix and the redirect's defaults.
  assert.deepEqual(vh.routes[1]!.matches[0]!.path, { kind: 'regex', value: '/api/v1(/.*)?' });
  assert.deepEqual(vh.routes[2]!.action, { kind: 'redirect', code: 302, scheme: 'https', derivePort: 'FROM_PROTOCOL_DEFAULT' });
  assert.deepEqual(vh.routes[3]!.matches[0]!.headers.map((h) => h.name), ['x-a', 'x-b']);
  // Service endpoints from the EndpointSlice, ready ones only, cluster named as Istio names it.
  const c = s.snapshot.clusters['outbound|80||svc.default.svc.cluster.local'];
  assert.ok(c);
  assert.deepEqual(c.endpoints.map((e) => `${e.address}:${e.port}`), ['10.0.0.1:8080', '10.0.0.2:8080']);
  assert.ok(status(s.snapshot, 'HTTPRoute', 'a-older').some((m) => /Accepted=True/.test(m)));
});

test('attachment: namespaces, kinds, hostnames and sectionName give the spec reasons', () => {
  const s = tr(`${GW_HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other-ns, namespace: team}
spec:
  parentRefs: [{name: gw, namespace: default, sectionName: http}]
  rules: [{backendRefs: [{name: svc, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wrong-host, namespace: team}
spec:
  parentRefs: [{name: gw, namespace: default, sectionName: foo}]
  hostnames: [bar.example.com]
  rules: [{backendRefs: [{name: svc, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-section, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: nope}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: tls-on-http, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  hostnames: [a.example.com]
  rules: [{backendRefs: [{name: svc, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foo-ok, namespace: team}
spec:
  parentRefs: [{name: gw, namespace: default}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: svc, port: 80, namespace: default}]}]
`);
  const has = (name: string, kind: string, re: RegExp) => assert.ok(status(s.snapshot, kind, name).some((m) => re.test(m)), `${kind} ${name}: ${status(s.snapshot, kind, name).join(' | ')}`);
  has('other-ns', 'HTTPRoute', /Accepted=False \(NotAllowedByListeners\)/);
  has('wrong-host', 'HTTPRoute', /Accepted=False \(NoMatchingListenerHostname\)/);
  has('no-section', 'HTTPRoute', /Accepted=False \(NoMatchingParent\)/);
  has('tls-on-http', 'TLSRoute', /Accepted=False \(NotAllowedByListeners\)/);
  // foo-ok attaches to the All listener only (not the Same one) with the intersected hostname,
  // and its cross-namespace backend is refused without a ReferenceGrant.
  has('foo-ok', 'HTTPRoute', /Accepted=True/);
  has('foo-ok', 'HTTPRoute', /ResolvedRefs=False \(RefNotPermitted\)/);
  const vhs = hcm(listener(s.snapshot, 8080).filterChains[0]!).routeConfig.virtualHosts;
  assert.deepEqual(vhs.map((v) => v.domains[0]), ['foo.example.com']);
  assert.deepEqual(vhs[0]!.routes[0]!.action, { kind: 'direct', status: 500, body: 'no valid backend\n' });
  const codes = s.diagnostics.map((d) => d.code);
  for (const c of ['TG6007', 'TG6008', 'TG6006', 'TG6005']) assert.ok(codes.includes(c), c);
});

const GW_TLS = (extra = '') => `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  gatewayClassName: tlsgate
  listeners:
  - name: a
    port: 8443
    protocol: HTTPS
    hostname: a.example.com
    tls: {certificateRefs: [{name: a-cert}]}
  - name: b
    port: 8443
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: b-cert, namespace: certs}]}
  - name: pass
    port: 9443
    protocol: TLS
    hostname: "*.pass.io"
    tls: {mode: Passthrough}
${extra}
${secret('a-cert', 'edge')}${secret('b-cert', 'certs')}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: pass, namespace: edge}
spec:
  parentRefs: [{name: gw, sectionName: pass}]
  hostnames: [x.pass.io, other.io]
  rules: [{backendRefs: [{kind: Hostname, group: networking.istio.io, name: up.example.net, port: 443, weight: 3}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: up, namespace: edge}
spec:
  hosts: [up.example.net]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`;

test('ReferenceGrant: a cross-namespace certificateRef needs one (RefNotPermitted otherwise)', () => {
  const denied = tr(GW_TLS());
  const l = listener(denied.snapshot, 8443);
  assert.deepEqual(l.filterChains.map((c) => c.match.serverNames), [['a.example.com']]);
  assert.ok(status(denied.snapshot, 'Gateway', 'gw').some((m) => /^listener b: ResolvedRefs=False \(RefNotPermitted\)/.test(m)));
  assert.ok(status(denied.snapshot, 'Gateway', 'gw').some((m) => /^listener b: Programmed=False/.test(m)));
  const grant = `---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-edge, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]
  to: [{group: "", kind: Secret}]
`;
  const allowed = tr(GW_TLS(grant));
  const l2 = listener(allowed.snapshot, 8443);
  assert.deepEqual(l2.filterChains.map((c) => c.match.serverNames), [['a.example.com'], ['b.example.com']]);
  assert.deepEqual(l2.filterChains.map((c) => c.tls?.certificates), [['kubernetes://edge/a-cert'], ['kubernetes://certs/b-cert']]);
  // Each HTTPS chain answers 421 for the other's host.
  assert.deepEqual(hcm(l2.filterChains[0]!).misdirectedDomains, ['b.example.com']);
  // Passthrough: one SNI chain for the intersected hostname, weights kept.
  const p = listener(allowed.snapshot, 9443);
  assert.equal(p.inspector, 'tls-inspector');
  assert.deepEqual(p.filterChains.map((c) => c.match.serverNames), [['x.pass.io']]);
  assert.equal(p.filterChains[0]!.tls, undefined);
  assert.deepEqual((p.filterChains[0]!.filter as TcpProxy).clusters, [{ cluster: 'outbound|443||up.example.net', weight: 3 }]);
});

test('frontend client-certificate validation: default, perPort and listener frontendValidation', () => {
  const s = tr(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  tls:
    frontend:
      default: {validation: {caCertificateRefs: [{kind: ConfigMap, name: ca-a}]}}
      perPort: [{port: 9443, tls: {validation: {caCertificateRefs: [{kind: ConfigMap, name: ca-b}], mode: AllowInsecureFallback}}}]
  listeners:
  - {name: a, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}]}}
  - {name: b, port: 9443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}]}}
  - {name: c, port: 10443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}], frontendValidation: {caCertificateRefs: [{kind: ConfigMap, name: missing}]}}}
${secret('cert')}${configMap('ca-a')}${configMap('ca-b')}`);
  const a = listener(s.snapshot, 8443).filterChains[0]!.tls!;
  assert.equal(a.mode, 'MUTUAL');
  assert.equal(a.requireClientCertificate, true);
  assert.equal(a.validationCa, 'configmap://default/ca-a');
  const b = listener(s.snapshot, 9443).filterChains[0]!.tls!;
  assert.deepEqual([b.mode, b.requireClientCertificate, b.allowInvalidClientCertificate, b.validationCa], ['OPTIONAL_MUTUAL', false, true, 'configmap://default/ca-b']);
  assert.equal(s.snapshot.listeners.find((l) => l.port === 10443), undefined);
  assert.ok(status(s.snapshot, 'Gateway', 'gw').some((m) => /^listener c: ResolvedRefs=False \(InvalidCACertificateRef\)/.test(m)));
  assert.ok(s.diagnostics.some((d) => d.code === 'TG6015'));
});

test('tls-terminate-mode MUTUAL takes the CA from the certificate Secret', () => {
  const s = tr(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners:
  - {name: m, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}], options: {gateway.istio.io/tls-terminate-mode: MUTUAL}}}
${secret('cert', 'default', true)}`);
  const t = listener(s.snapshot, 8443).filterChains[0]!.tls!;
  assert.deepEqual([t.mode, t.requireClientCertificate, t.validationCa], ['MUTUAL', true, 'kubernetes://default/cert-cacert']);
});

test('BackendTLSPolicy: SNI and CA on the Service cluster; an invalid CA fails closed', () => {
  const s = tr(`${GW_HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /good}}]
    backendRefs: [{name: svc, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /bad}}]
    backendRefs: [{name: bad, port: 80}]
${service('svc', 80, ['10.0.0.1'])}${service('bad', 80, ['10.0.0.2'])}${configMap('ca')}
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: p, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: svc}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}], hostname: abc.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: q, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: bad}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: nope}], hostname: abc.example.com}
`);
  const good = s.snapshot.clusters['outbound|80||svc.default.svc.cluster.local']!;
  assert.deepEqual([good.tls?.mode, good.tls?.sni, good.tls?.validationCa, good.tls?.autoSanValidation], ['SIMPLE', 'abc.example.com', 'configmap://default/ca', true]);
  const bad = s.snapshot.clusters['outbound|80||bad.default.svc.cluster.local']!;
  assert.deepEqual(bad.endpoints, []);
  assert.ok(bad.tls, 'never plaintext');
  assert.ok(status(s.snapshot, 'BackendTLSPolicy', 'q').some((m) => /ResolvedRefs=False \(InvalidCACertificateRef\)/.test(m)));
});

test('Gateway API and Istio listeners on one port merge chains; the same SNI is a conflict', () => {
  const istio = (host: string) => `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ig, namespace: default}
spec:
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [${host}]
    tls: {mode: SIMPLE, credentialName: cert}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners:
  - {name: a, port: 8443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: cert}]}}
${secret('cert')}`;
  const merged = tr(istio('i.example.com'));
  assert.deepEqual(listener(merged.snapshot, 8443).filterChains.map((c) => c.match.serverNames), [['i.example.com'], ['a.example.com']]);
  assert.deepEqual(hcm(listener(merged.snapshot, 8443).filterChains[0]!).misdirectedDomains, ['a.example.com']);
  const clash = tr(istio('a.example.com'));
  assert.equal(listener(clash.snapshot, 8443).filterChains.length, 1);
  assert.ok(clash.diagnostics.some((d) => d.code === 'TG6013'));
});

test('listener conflicts and classes: HostnameConflict, ProtocolConflict, foreign class', () => {
  const s = tr(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners:
  - {name: a, port: 8080, protocol: HTTP, hostname: a.io}
  - {name: b, port: 8080, protocol: HTTP, hostname: a.io}
  - {name: ok, port: 8080, protocol: HTTP, hostname: b.io}
  - {name: c, port: 8081, protocol: TCP}
  - {name: e, port: 8081, protocol: HTTP}
  - {name: d, port: 9000, protocol: UDP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: default}
spec:
  gatewayClassName: nginx
  listeners: [{name: x, port: 80, protocol: HTTP}]
`);
  const msgs = status(s.snapshot, 'Gateway', 'gw');
  // No winner among conflicting listeners (the spec): both sides are Conflicted and not accepted.
  for (const [l, reason] of [['a', 'HostnameConflict'], ['b', 'HostnameConflict'], ['c', 'ProtocolConflict'], ['e', 'ProtocolConflict']]) {
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Conflicted=True (${reason})`)), `${l}:\n${msgs.join('\n')}`);
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Accepted=False (${reason})`)), `${l}:\n${msgs.join('\n')}`);
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Programmed=False (Invalid)`)), `${l}:\n${msgs.join('\n')}`);
  }
  assert.ok(msgs.some((m) => m.startsWith('listener ok: Programmed=True')), msgs.join('\n'));
  assert.ok(msgs.some((m) => /^Accepted=True \(ListenersNotValid\): listener\(s\) not accepted: a, b, c, e, d$/.test(m)), msgs.join('\n'));
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 8081).length, 0);
  assert.deepEqual(hcm(listener(s.snapshot, 8080).filterChains[0]!).routeConfig.virtualHosts.map((v) => v.name), []);
  assert.ok(msgs.some((m) => /^listener d: Accepted=False \(UnsupportedProtocol\)/.test(m)));
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 80).length, 0);
  assert.ok(s.diagnostics.some((d) => d.code === 'TG6001' && d.severity === 'info'));
});

test('URLRewrite ReplacePrefixMatch is element-wise; timeouts.request; TCPRoute weights', () => {
  const s = tr(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
  - {name: tcp, port: 9000, protocol: TCP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old/}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: new.io, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: svc, port: 80}]
    timeouts: {request: 1m30s}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules: [{backendRefs: [{name: svc, port: 80, weight: 80}, {name: svc2, port: 81, weight: 20}]}]
${service('svc', 80, ['10.0.0.1'])}${service('svc2', 81, ['10.0.0.3'])}`);
  const route = hcm(listener(s.snapshot, 8080).filterChains[0]!).routeConfig.virtualHosts[0]!.routes[0]!;
  assert.equal(route.action.kind, 'route');
  if (route.action.kind === 'route') {
    assert.deepEqual(route.action.rewriteRegex, { pattern: '^/old/?', substitution: '/' });
    assert.equal(route.action.rewriteAuthority, 'new.io');
    assert.equal(route.action.timeoutMs, 90_000);
  }
  const t = listener(s.snapshot, 9000);
  assert.equal(t.inspector, 'none');
  assert.deepEqual((t.filterChains[0]!.filter as TcpProxy).clusters.map((c) => c.weight), [80, 20]);
});

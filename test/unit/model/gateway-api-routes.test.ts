// Gateway API translation: TCPRoute/TLSRoute with several rules, DestinationRules on Service
// backends (and their precedence against BackendTLSPolicy), GRPCRoute, HTTP beside HTTPS.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseText } from '../../../src/config/load.js';
import { translate } from '../../../src/model/translate/index.js';
import type { HttpConnectionManager, Listener, Snapshot, TcpProxy } from '../../../src/model/snapshot.js';

function tr(yaml: string) {
  const parsed = parseText(yaml, '/cfg/gw.yaml');
  assert.deepEqual(parsed.diagnostics.filter((d) => d.severity === 'error'), [], 'fixture must load cleanly');
  return translate(parsed.resources);
}

const PEM = '-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n';
const KEY = '-----BEGIN PRIVATE KEY-----\\nMIIB\\n-----END PRIVATE KEY-----\\n';
const secret = (name: string) => `
---
apiVersion: v1
kind: Secret
metadata: {name: ${name}, namespace: default}
type: kubernetes.io/tls
stringData: {tls.crt: "${PEM}", tls.key: "${KEY}"}
`;
const service = (name: string, port: number, addr: string, extra = '') => `
---
apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: default}
spec: {ports: [{name: web, port: ${port}, targetPort: 8080${extra}}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ${name}-x1, namespace: default, labels: {kubernetes.io/service-name: ${name}}}
addressType: IPv4
ports: [{name: web, port: 8080}]
endpoints: [{addresses: ["${addr}"]}]
`;
const configMap = (name: string) => `
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ${name}, namespace: default}
data: {ca.crt: "${PEM}"}
`;

function listener(s: Snapshot, port: number): Listener {
  const l = s.listeners.find((x) => x.port === port);
  assert.ok(l, `listener on ${port}`);
  return l;
}
function statusOf(s: Snapshot, kind: string, name: string): string[] {
  return s.statuses.find((x) => x.resource.kind === kind && x.resource.name === name)?.messages ?? [];
}

const tcpGateway = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: tlsgate
  listeners:
  - {name: tcp, port: 9000, protocol: TCP}
  - {name: pass, port: 9443, protocol: TLS, hostname: "*.example.com", tls: {mode: Passthrough}}
`;

test('TCPRoute/TLSRoute v1alpha2 with several rules: every rule applies, backends split by weight', () => {
  const s = tr(`${tcpGateway}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules:
  - backendRefs: [{name: a, port: 80, weight: 3}]
  - backendRefs: [{name: b, port: 81, weight: 1}, {name: a, port: 80, weight: 2}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: p, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: pass}]
  hostnames: [x.example.com]
  rules:
  - backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: b, port: 81}]
${service('a', 80, '10.0.0.1')}${service('b', 81, '10.0.0.2')}`);
  const tcp = listener(s.snapshot, 9000).filterChains[0]!.filter as TcpProxy;
  assert.equal(tcp.kind, 'tcp');
  assert.deepEqual(tcp.clusters.map((c) => [c.cluster, c.weight]), [
    ['outbound|80||a.default.svc.cluster.local', 5],
    ['outbound|81||b.default.svc.cluster.local', 1],
  ]);
  const pass = listener(s.snapshot, 9443).filterChains.find((c) => c.match.serverNames.includes('x.example.com'))!;
  assert.deepEqual((pass.filter as TcpProxy).clusters.map((c) => c.cluster), ['outbound|80||a.default.svc.cluster.local', 'outbound|81||b.default.svc.cluster.local']);
  assert.ok(!s.diagnostics.some((d) => d.code === 'TG4001' || d.code === 'TG6018'), JSON.stringify(s.diagnostics));
});

test('TCPRoute/TLSRoute v1 with several rules: not accepted (TG6018), nothing silently dropped', () => {
  const s = tr(`${tcpGateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: t, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules:
  - backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: b, port: 81}]
---
apiVersion: gateway.networking.k8s.io/v1alpha3
kind: TLSRoute
metadata: {name: p, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: pass}]
  hostnames: [x.example.com]
  rules:
  - backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: b, port: 81}]
${service('a', 80, '10.0.0.1')}${service('b', 81, '10.0.0.2')}`);
  const d = s.diagnostics.filter((x) => x.code === 'TG6018');
  assert.equal(d.length, 2);
  assert.ok(d.some((x) => x.message === 'gateway.networking.k8s.io/v1 TCPRoute allows one rule, this one has 2: the route is not accepted (UnsupportedValue)'), JSON.stringify(d));
  assert.ok(d.some((x) => x.message.startsWith('gateway.networking.k8s.io/v1alpha3 TLSRoute allows one rule')));
  assert.match(statusOf(s.snapshot, 'TCPRoute', 't').join('\n'), /parent default\/gw\/tcp: Accepted=False \(UnsupportedValue\)/);
  assert.match(statusOf(s.snapshot, 'TLSRoute', 'p').join('\n'), /parent default\/gw\/pass: Accepted=False \(UnsupportedValue\)/);
  // The TCP listener has no route left: nothing is bound, rather than one of the two rules picked.
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 9000).length, 0);
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 9443).length, 0);
});

const httpsGateway = (extraListeners = '') => `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: tlsgate
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
  - {name: https, port: 8443, protocol: HTTPS, hostname: "*.example.com", tls: {certificateRefs: [{name: cert}]}}${extraListeners}
${secret('cert')}`;

test('a DestinationRule for the Service applies to Gateway API backends (TLS, load balancer, pool)', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {value: /short}}]
    backendRefs: [{name: short, port: 443}]
  - backendRefs: [{name: full, port: 443}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: full, namespace: other}
spec:
  host: full.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 7}}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, caCertificates: /certs/ca.pem, sni: full.internal}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: short, namespace: default}
spec:
  host: short
  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /certs/ca.pem}}
${service('full', 443, '10.0.0.1')}${service('short', 443, '10.0.0.2')}`);
  const full = s.snapshot.clusters['outbound|443||full.default.svc.cluster.local']!;
  assert.equal(full.lbPolicy, 'ROUND_ROBIN');
  assert.equal(full.limits.maxConnections, 7);
  assert.equal(full.tls?.mode, 'SIMPLE');
  assert.equal(full.tls?.sni, 'full.internal');
  assert.deepEqual(full.tls?.alpn, ['http/1.1']);
  assert.deepEqual(full.endpoints.map((e) => `${e.address}:${e.port}`), ['10.0.0.1:8080']);
  // A short host is read in the rule's own namespace, as Istio reads it.
  const short = s.snapshot.clusters['outbound|443||short.default.svc.cluster.local']!;
  assert.equal(short.tls?.mode, 'SIMPLE');
  assert.equal(short.tls?.sni, 'short.default.svc.cluster.local');
});

test('BackendTLSPolicy and DestinationRule TLS on one Service: the policy wins and TG6017 says so', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: svc, port: 443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: p, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: svc}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}], hostname: policy.internal}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: default}
spec:
  host: svc.default.svc.cluster.local
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 3}}
    tls: {mode: SIMPLE, sni: dr.internal, caCertificates: /certs/ca.pem}
${service('svc', 443, '10.0.0.1')}${configMap('ca')}`);
  const c = s.snapshot.clusters['outbound|443||svc.default.svc.cluster.local']!;
  assert.equal(c.tls?.sni, 'policy.internal');
  assert.equal(c.limits.maxConnections, 3, 'the rest of the DestinationRule still applies');
  const w = s.diagnostics.find((d) => d.code === 'TG6017');
  assert.ok(w, JSON.stringify(s.diagnostics.map((d) => d.code)));
  assert.equal(w.severity, 'warning');
  assert.equal(w.path, 'spec.trafficPolicy.tls');
  assert.match(w.message, /BackendTLSPolicy default\/p also sets TLS for Service default\/svc port 443/);
});

test('an invalid DestinationRule TLS on a Service backend fails closed (no endpoints, never plaintext)', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: svc, port: 443}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: default}
spec:
  host: svc
  trafficPolicy: {tls: {mode: MUTUAL, caCertificates: /certs/ca.pem}}
${service('svc', 443, '10.0.0.1')}`);
  const c = s.snapshot.clusters['outbound|443||svc.default.svc.cluster.local']!;
  assert.ok(c.tls, 'TLS still asked for');
  assert.deepEqual(c.endpoints, []);
  assert.ok(s.diagnostics.some((d) => d.code === 'TG3021'));
});

test('GRPCRoute: service/method matches become /<service>/<method> paths, ranked by the gRPC precedence', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: https}]
  hostnames: [grpc.example.com]
  rules:
  - backendRefs: [{name: svc, port: 443}]
  - matches: [{method: {service: echo.Echo}}]
    backendRefs: [{name: svc, port: 443, weight: 2}, {name: svc2, port: 443}]
  - matches: [{method: {service: echo.Echo, method: Say}, headers: [{name: X-Env, value: canary}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: say}]}}]
    backendRefs: [{name: svc2, port: 443}]
  - matches: [{method: {type: RegularExpression, service: "echo\\\\..*", method: "S.*"}}]
    backendRefs: [{name: svc2, port: 443}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: p, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: svc}]
  validation: {wellKnownCACertificates: System, hostname: svc.internal}
${service('svc', 443, '10.0.0.1')}${service('svc2', 443, '10.0.0.2')}`);
  const chain = listener(s.snapshot, 8443).filterChains[0]!;
  const vh = (chain.filter as HttpConnectionManager).routeConfig.virtualHosts.find((v) => v.name === 'grpc.example.com')!;
  assert.deepEqual(vh.routes.map((r) => [r.name, r.matches[0]!.path]), [
    ['default/g#rules[2].matches[0]', { kind: 'exact', value: '/echo.Echo/Say' }], // service 9 chars, method 3
    ['default/g#rules[1].matches[0]', { kind: 'regex', value: '/echo\\.Echo/[^/]+' }], // service 9 chars
    ['default/g#rules[3].matches[0]', { kind: 'regex', value: '/(?:echo\\..*)/(?:S.*)' }], // service 8 chars
    ['default/g#rules[0]', { kind: 'prefix', value: '/' }],
  ]);
  const say = vh.routes[0]!;
  assert.deepEqual(say.matches[0]!.headers, [{ name: 'x-env', matcher: { kind: 'exact', value: 'canary' }, invert: false }]);
  assert.deepEqual(say.requestHeaders?.set, [['x-route', 'say']]);
  // gRPC is HTTP/2 to the backend: negotiated by ALPN on the TLS the policy originates.
  const c = s.snapshot.clusters['outbound|443||svc.default.svc.cluster.local']!;
  assert.equal(c.httpProtocol, 'h2');
  assert.deepEqual(c.tls?.alpn, ['h2']);
  // svc2 has no TLS: HTTP/2 cleartext (h2c) with prior knowledge, nothing to warn about.
  const c2 = Object.values(s.snapshot.clusters).find((x) => x.serviceHost === 'svc2.default.svc.cluster.local');
  assert.equal(c2?.httpProtocol, 'h2');
  assert.equal(c2?.tls, undefined);
  assert.ok(!s.diagnostics.some((d) => d.code === 'TG4001' && /gRPC|h2c/.test(d.message)), JSON.stringify(s.diagnostics));
  assert.match(statusOf(s.snapshot, 'GRPCRoute', 'g').join('\n'), /parent default\/gw\/https: Accepted=True/);
  assert.ok(!s.diagnostics.some((d) => d.code === 'TG4001' && /GRPCRoute/.test(d.message)));
});

test('GRPCRoute: also on plaintext HTTP listeners (h2c), and an HTTPRoute sharing its hostname loses to the older route', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-web, namespace: default, creationTimestamp: "2024-03-01T00:00:00Z"}
spec:
  parentRefs: [{name: gw, sectionName: https}]
  hostnames: [shared.example.com]
  rules: [{backendRefs: [{name: svc, port: 443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: b-grpc, namespace: default, creationTimestamp: "2024-02-01T00:00:00Z"}
spec:
  parentRefs: [{name: gw, sectionName: https}]
  hostnames: [shared.example.com, own.example.com]
  rules: [{backendRefs: [{name: svc, port: 443}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: plain, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  rules: [{backendRefs: [{name: svc, port: 443}]}]
${service('svc', 443, '10.0.0.1', ', appProtocol: kubernetes.io/h2c')}`);
  const vhs = (listener(s.snapshot, 8443).filterChains[0]!.filter as HttpConnectionManager).routeConfig.virtualHosts;
  // The GRPCRoute is older (creationTimestamp), though its name sorts after the HTTPRoute's.
  assert.deepEqual(vhs.find((v) => v.name === 'shared.example.com')!.routes.map((r) => r.name), ['default/b-grpc#rules[0]']);
  assert.deepEqual(vhs.find((v) => v.name === 'own.example.com')!.routes.map((r) => r.name), ['default/b-grpc#rules[0]']);
  assert.match(statusOf(s.snapshot, 'HTTPRoute', 'a-web').join('\n'), /parent default\/gw\/https: Accepted=False \(UnsupportedValue\): listener https already routes shared\.example\.com with the older GRPCRoute default\/b-grpc/);
  // Plaintext listeners serve HTTP/2 with prior knowledge, so a GRPCRoute attaches there too.
  assert.match(statusOf(s.snapshot, 'GRPCRoute', 'plain').join('\n'), /parent default\/gw\/http: Accepted=True/);
  assert.ok(!s.diagnostics.some((d) => d.code === 'TG6002'), JSON.stringify(s.diagnostics));
  const httpChain = listener(s.snapshot, 8080).filterChains[0]!.filter as HttpConnectionManager;
  assert.equal(httpChain.http2, true);
  assert.deepEqual(httpChain.routeConfig.virtualHosts.map((v) => [v.name, v.routes.map((r) => r.name)]), [['*', ['default/plain#rules[0]']]]);
});

test('HTTP and HTTPS listeners on one port: both Conflicted (ProtocolConflict), neither accepted nor programmed', () => {
  const s = tr(httpsGateway(`
  - {name: web, port: 8443, protocol: HTTP}`));
  const msgs = statusOf(s.snapshot, 'Gateway', 'gw');
  for (const l of ['https', 'web']) {
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Conflicted=True (ProtocolConflict): port 8443 is also claimed by`)), msgs.join('\n'));
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Accepted=False (ProtocolConflict)`)), msgs.join('\n'));
    assert.ok(msgs.some((m) => m.startsWith(`listener ${l}: Programmed=False (Invalid)`)), msgs.join('\n'));
  }
  assert.ok(msgs.includes('Accepted=True (ListenersNotValid): listener(s) not accepted: https, web'), msgs.join('\n'));
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 8443).length, 0);
  assert.equal(s.snapshot.listeners.filter((l) => l.port === 8080).length, 1);
});

test('Gateway spec.tls.backend.clientCertificateRef: presented to BackendTLSPolicy backends; Gateways that disagree get none', () => {
  const gw = (name: string, cert: string) => `
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ${name}, namespace: default}
spec:
  gatewayClassName: tlsgate
  tls: {backend: {clientCertificateRef: {name: ${cert}}}}
  listeners: [{name: http, port: ${name === 'one' ? 8080 : 8081}, protocol: HTTP}]`;
  const route = (name: string, parents: string[], svc: string) => `
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ${name}, namespace: default}
spec:
  parentRefs: [${parents.map((p) => `{name: ${p}}`).join(', ')}]
  rules: [{backendRefs: [{name: ${svc}, port: 443}]}]`;
  const policy = (svc: string) => `
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: ${svc}, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: ${svc}}]
  validation: {wellKnownCACertificates: System, hostname: ${svc}.internal}`;
  const s = tr(`${gw('one', 'client-a').slice(5)}${gw('two', 'client-b')}
${route('r1', ['one'], 'mine')}${route('r2', ['one', 'two'], 'shared')}${route('r3', ['one'], 'plain')}
${policy('mine')}${policy('shared')}
${secret('client-a')}${secret('client-b')}${service('mine', 443, '10.0.0.1')}${service('shared', 443, '10.0.0.2')}${service('plain', 443, '10.0.0.3')}`);
  const mine = s.snapshot.clusters['outbound|443||mine.default.svc.cluster.local']!;
  assert.equal(mine.tls?.mode, 'MUTUAL');
  assert.equal(mine.tls?.clientCertificate, 'kubernetes://default/client-a');
  assert.equal(mine.tls?.sni, 'mine.internal');
  const shared = s.snapshot.clusters['outbound|443||shared.default.svc.cluster.local']!;
  assert.equal(shared.tls?.mode, 'SIMPLE');
  assert.equal(shared.tls?.clientCertificate, undefined);
  assert.ok(s.diagnostics.some((d) => d.code === 'TG4001' && /shared\.default\.svc\.cluster\.local port 443 is reached from Gateways with different backend client certificates/.test(d.message)));
  // No policy, no TLS: a client certificate never turns plaintext into TLS by itself.
  assert.equal(s.snapshot.clusters['outbound|443||plain.default.svc.cluster.local']!.tls, undefined);
});

test('GRPCRoute: a regex that would escape its group, and a method match with neither field, are skipped and reported', () => {
  const s = tr(`${httpsGateway()}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: https}]
  rules:
  - matches: [{method: {type: RegularExpression, service: "a)|(.*"}}]
    backendRefs: [{name: svc, port: 443}]
  - matches: [{method: {type: Exact}}]
    backendRefs: [{name: svc, port: 443}]
${service('svc', 443, '10.0.0.1')}`);
  const vhs = (listener(s.snapshot, 8443).filterChains[0]!.filter as HttpConnectionManager).routeConfig.virtualHosts;
  assert.deepEqual(vhs.flatMap((v) => v.routes), []);
  assert.ok(s.diagnostics.some((d) => d.code === 'TG3020' && d.path === 'spec.rules[0].matches[0].method.service'));
  assert.ok(s.diagnostics.some((d) => d.code === 'TG6016' && d.path === 'spec.rules[1].matches[0].method'));
});

test('an unresolved backendRef keeps its weight as a stand-in cluster that fails its share (TCPRoute)', () => {
  const s = tr(`${tcpGateway}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules:
  - backendRefs: [{name: a, port: 80, weight: 3}, {name: a, namespace: elsewhere, port: 80, weight: 1}]
${service('a', 80, '10.0.0.1')}`);
  const tcp = listener(s.snapshot, 9000).filterChains[0]!.filter as TcpProxy;
  assert.equal(tcp.clusters.length, 2);
  assert.deepEqual(tcp.clusters.map((c) => c.weight), [3, 1]);
  const standIn = s.snapshot.clusters[tcp.clusters[1]!.cluster]!;
  assert.match(standIn.invalidBackend ?? '', /TCPRoute default\/t spec\.rules\[0\]\.backendRefs\[1\] did not resolve/);
  assert.deepEqual(standIn.endpoints, []);
  assert.equal(s.snapshot.clusters[tcp.clusters[0]!.cluster]!.invalidBackend, undefined);
  assert.ok(s.diagnostics.some((d) => d.code === 'TG6005'), 'the RefNotPermitted is reported');
});

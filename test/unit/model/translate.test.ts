import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseText } from '../../../src/config/load.js';
import { translate } from '../../../src/model/translate/index.js';
import type { HttpConnectionManager, TcpProxy } from '../../../src/model/snapshot.js';
import { hostsOverlap, hostSubsetOf, checkHostPattern, fqdn } from '../../../src/model/translate/hosts.js';

function tr(yaml: string, opts: Parameters<typeof translate>[1] = {}) {
  const parsed = parseText(yaml, '/cfg/test.yaml');
  const errs = parsed.diagnostics.filter((d) => d.severity === 'error');
  assert.deepEqual(errs, [], 'fixture must load cleanly');
  return translate(parsed.resources, opts);
}

const secret = (name: string, ns: string, data: Record<string, string>) => `
---
apiVersion: v1
kind: Secret
metadata: {name: ${name}, namespace: ${ns}}
type: kubernetes.io/tls
stringData:
${Object.entries(data).map(([k, v]) => `  ${k}: "${v}"`).join('\n')}
`;

const GW_TWO_HOSTS = `
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: mygateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https-httpbin, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: httpbin-credential}
    hosts: [httpbin.example.com]
  - port: {number: 443, name: https-helloworld, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: helloworld-credential}
    hosts: [helloworld.example.com]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin.example.com]
  gateways: [mygateway]
  http:
  - match: [{uri: {prefix: /status}}, {uri: {prefix: /delay}}]
    route:
    - destination: {port: {number: 8000}, host: httpbin}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: helloworld}
spec:
  hosts: [helloworld.example.com]
  gateways: [mygateway]
  http:
  - match: [{uri: {exact: /hello}}]
    route:
    - destination: {host: helloworld, port: {number: 5000}}
` + secret('httpbin-credential', 'istio-system', { 'tls.crt': 'CERT1', 'tls.key': 'KEY1' })
  + secret('helloworld-credential', 'istio-system', { 'tls.crt': 'CERT2', 'tls.key': 'KEY2' });

test('two HTTPS servers on one port become two SNI filter chains on one listener', () => {
  const { snapshot, diagnostics } = tr(GW_TWO_HOSTS);
  assert.deepEqual(diagnostics.filter((d) => d.severity === 'error'), []);
  assert.equal(snapshot.listeners.length, 1);
  const l = snapshot.listeners[0]!;
  assert.equal(l.port, 443);
  assert.equal(l.inspector, 'tls-inspector');
  assert.deepEqual(l.filterChains.map((c) => c.match.serverNames), [['httpbin.example.com'], ['helloworld.example.com']]);
  const [a, b] = l.filterChains;
  assert.equal(a!.tls?.mode, 'SIMPLE');
  assert.equal(a!.tls?.requestClientCertificate, false);
  assert.deepEqual(a!.tls?.alpn, ['h2', 'http/1.1']);
  assert.equal(a!.tls?.certificates[0], 'kubernetes://istio-system/httpbin-credential');
  assert.equal(b!.tls?.certificates[0], 'kubernetes://istio-system/helloworld-credential');
  const hcmA = a!.filter as HttpConnectionManager;
  assert.equal(hcmA.routeConfig.name, 'https.443.https-httpbin.mygateway.default');
  assert.deepEqual(hcmA.routeConfig.virtualHosts.map((v) => v.domains), [['httpbin.example.com']]);
  assert.deepEqual(hcmA.misdirectedDomains, ['helloworld.example.com']);
  const route = hcmA.routeConfig.virtualHosts[0]!.routes[0]!;
  assert.equal(route.matches.length, 2);
  assert.deepEqual(route.matches[0]!.path, { kind: 'prefix', value: '/status' });
  assert.equal(route.action.kind, 'route');
  // No ServiceEntry: the host is resolved by DNS on the destination port.
  const cl = snapshot.clusters['outbound|8000||httpbin.default.svc.cluster.local']!;
  assert.equal(cl.discovery, 'DNS');
  assert.deepEqual(cl.endpoints.map((e) => `${e.address}:${e.port}`), ['httpbin:8000']);
  assert.equal(cl.lbPolicy, 'LEAST_REQUEST');
});

test('secrets: the -cacert companion wins over ca.crt in the main Secret; cert+key win over tls.*', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: MUTUAL, credentialName: cred}
` + secret('cred', 'istio-system', { cert: 'GENERIC-CERT', key: 'GENERIC-KEY', 'tls.crt': 'TLS-CERT', 'tls.key': 'TLS-KEY', 'ca.crt': 'MAIN-CA' })
    + secret('cred-cacert', 'istio-system', { cacert: 'COMPANION-CA' });
  const { snapshot } = tr(yaml);
  const fc = snapshot.listeners[0]!.filterChains[0]!;
  assert.equal(fc.tls!.requireClientCertificate, true);
  const cert = snapshot.secrets[fc.tls!.certificates[0]!]!;
  assert.deepEqual(cert.source, { kind: 'inline', certChain: 'GENERIC-CERT', privateKey: 'GENERIC-KEY' });
  const ca = snapshot.secrets[fc.tls!.validationCa!]!;
  assert.deepEqual(ca.source, { kind: 'inline', ca: 'COMPANION-CA' });
});

test('credentialName is looked up in the proxy namespace first, then the Gateway namespace', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: apps}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: cred}
` + secret('cred', 'apps', { 'tls.crt': 'APPS', 'tls.key': 'K' }) + secret('cred', 'edge', { 'tls.crt': 'EDGE', 'tls.key': 'K' });
  const fromEdge = tr(yaml, { proxyNamespace: 'edge' }).snapshot;
  assert.equal(fromEdge.listeners[0]!.filterChains[0]!.tls!.certificates[0], 'kubernetes://edge/cred');
  const fromApps = tr(yaml, { proxyNamespace: 'istio-system' }).snapshot;
  assert.equal(fromApps.listeners[0]!.filterChains[0]!.tls!.certificates[0], 'kubernetes://apps/cred');
});

test('a missing Secret and MUTUAL without a CA are errors at the field', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: nope}
  - port: {number: 443, name: https2, protocol: HTTPS}
    hosts: [b.example.com]
    tls: {mode: MUTUAL, credentialName: noca}
` + secret('noca', 'istio-system', { 'tls.crt': 'C', 'tls.key': 'K' });
  const { diagnostics, snapshot } = tr(yaml);
  const errs = diagnostics.filter((d) => d.severity === 'error');
  assert.deepEqual(errs.map((d) => [d.code, d.path]), [
    ['TG3003', 'spec.servers[0].tls.credentialName'],
    ['TG3004', 'spec.servers[1].tls.credentialName'],
  ]);
  assert.equal(errs[0]!.location?.file, '/cfg/test.yaml');
  assert.ok(errs[0]!.location!.line > 1);
  assert.equal(snapshot.listeners.length, 0);
});

test('httpsRedirect synthesises a redirecting virtual host for every server host', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [uk.bookinfo.com, eu.bookinfo.com]
    tls: {httpsRedirect: true}
`;
  const { snapshot, diagnostics } = tr(yaml);
  assert.deepEqual(diagnostics.filter((d) => d.severity !== 'info'), []);
  const hcm = snapshot.listeners[0]!.filterChains[0]!.filter as HttpConnectionManager;
  assert.equal(snapshot.listeners[0]!.inspector, 'none');
  assert.deepEqual(hcm.routeConfig.virtualHosts.map((v) => [v.domains[0], v.requireTls]), [['uk.bookinfo.com', true], ['eu.bookinfo.com', true]]);
});

test('a server with a conflicting protocol on the same port is skipped with TG3005', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 8080, name: tcp, protocol: TCP}
    hosts: ["*"]
`;
  const { diagnostics, snapshot } = tr(yaml);
  assert.ok(diagnostics.some((d) => d.code === 'TG3005' && d.path === 'spec.servers[1].port'));
  assert.equal(snapshot.listeners.length, 1);
});

test('the seed passthrough example: one chain per sniHosts match, routed to the named service', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mygateway}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["*.bookinfo.com"]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bookinfo-sni
spec:
  hosts:
  - "*.bookinfo.com"
  gateways:
  - mygateway
  tls:
  - match:
    - port: 443
      sniHosts:
      - login.bookinfo.com
    route:
    - destination:
        host: login.prod.svc.cluster.local
  - match:
    - port: 443
      sniHosts:
      - reviews.bookinfo.com
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
`;
  const { snapshot, diagnostics } = tr(yaml);
  assert.deepEqual(diagnostics.filter((d) => d.severity === 'error'), []);
  const l = snapshot.listeners[0]!;
  assert.deepEqual(l.filterChains.map((c) => [c.match.serverNames, c.tls, (c.filter as TcpProxy).clusters[0]!.cluster]), [
    [['login.bookinfo.com'], undefined, 'outbound|443||login.prod.svc.cluster.local'],
    [['reviews.bookinfo.com'], undefined, 'outbound|443||reviews.prod.svc.cluster.local'],
  ]);
});

test('sniHosts outside the VirtualService hosts is an error (TG3013)', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["*"]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*.example.com"]
  gateways: [gw]
  tls:
  - match: [{sniHosts: [other.org]}]
    route: [{destination: {host: x.example.com, port: {number: 443}}}]
`;
  const { diagnostics } = tr(yaml);
  const d = diagnostics.find((x) => x.code === 'TG3013');
  assert.ok(d);
  assert.equal(d.path, 'spec.tls[0].match[0].sniHosts[0]');
});

test('ServiceEntry targetPort, endpoint port maps, subsets by labels and DR precedence', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route:
    - destination: {host: svc.example.com, subset: v2, port: {number: 80}}
      weight: 25
    - destination: {host: svc.example.com, port: {number: 80}}
      weight: 75
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc.example.com]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, labels: {version: v1}}
  - {address: 127.0.0.2, labels: {version: v2}, ports: {http: 9090}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.example.com
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
`;
  const { snapshot, diagnostics } = tr(yaml);
  assert.deepEqual(diagnostics.filter((d) => d.severity === 'error'), []);
  const all = snapshot.clusters['outbound|80||svc.example.com']!;
  assert.deepEqual(all.endpoints.map((e) => `${e.address}:${e.port}`), ['127.0.0.1:8080', '127.0.0.2:9090']);
  assert.equal(all.lbPolicy, 'RANDOM'); // port-level beats top level
  const v2 = snapshot.clusters['outbound|80|v2|svc.example.com']!;
  assert.deepEqual(v2.endpoints.map((e) => e.address), ['127.0.0.2']);
  assert.equal(v2.lbPolicy, 'LEAST_REQUEST'); // subset beats port-level of the DR
  const hcm = snapshot.listeners[0]!.filterChains[0]!.filter as HttpConnectionManager;
  const action = hcm.routeConfig.virtualHosts[0]!.routes[0]!.action;
  assert.equal(action.kind, 'route');
  if (action.kind === 'route') assert.deepEqual(action.clusters.map((c) => c.weight), [25, 75]);
});

test('unsupported fields are rejected with TG4001, never silently ignored', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: a.example.com, port: {number: 80}}}]
`;
  const { diagnostics } = tr(yaml);
  const d = diagnostics.find((x) => x.code === 'TG4001');
  assert.ok(d);
  assert.equal(d.path, 'spec.http[0].fault');
  assert.equal(d.severity, 'error');
});

test('--labels selects Gateways by selector', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 81, name: http, protocol: HTTP}, hosts: ["*"]}]
`;
  assert.deepEqual(tr(yaml).snapshot.listeners.map((l) => l.port), [80, 81]);
  assert.deepEqual(tr(yaml, { labels: { istio: 'egressgateway', app: 'x' } }).snapshot.listeners.map((l) => l.port), [81]);
});

test('host rules', () => {
  assert.equal(hostsOverlap('*.example.com', 'a.b.example.com'), true);
  assert.equal(hostsOverlap('*.example.com', 'example.com'), false);
  assert.equal(hostsOverlap('*', 'x'), true);
  assert.equal(hostSubsetOf('a.example.com', '*.example.com'), true);
  assert.equal(hostSubsetOf('*.example.com', 'a.example.com'), false);
  assert.equal(hostSubsetOf('*.a.example.com', '*.example.com'), true);
  assert.match(checkHostPattern('foo*.example.com') ?? '', /partial wildcard/);
  assert.equal(checkHostPattern('*.example.com'), undefined);
  assert.equal(fqdn('reviews', 'prod'), 'reviews.prod.svc.cluster.local');
  assert.equal(fqdn('edition.cnn.com', 'prod'), 'edition.cnn.com');
});

test('snapshots are deeply frozen', () => {
  const { snapshot } = tr(GW_TWO_HOSTS);
  assert.ok(Object.isFrozen(snapshot));
  assert.ok(Object.isFrozen(snapshot.listeners[0]!.filterChains[0]!.match.serverNames));
});

test('a DestinationRule no route uses gets its TLS settings checked too, each broken rule once, and loads no file', () => {
  const r = tr(`
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unused}
spec:
  host: nothing.local
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, insecureSkipVerify: true, caCertificates: /etc/ca.pem}
  subsets:
  - name: v1
    trafficPolicy:
      tls: {mode: MUTUAL, privateKey: /etc/key.pem}
  - name: v2
    trafficPolicy:
      tls: {mode: SIMPLE, caCertificates: /etc/ca.pem}
`);
  const errs = r.diagnostics.filter((d) => d.severity === 'error');
  assert.deepEqual(errs.map((d) => [d.code, d.path]).sort(), [
    ['TG3021', 'spec.subsets[0].trafficPolicy.tls.clientCertificate'],
    ['TG3021', 'spec.trafficPolicy.portLevelSettings[0].tls.insecureSkipVerify'],
  ]);
  for (const e of errs) assert.ok((e.location?.line ?? 0) > 0, `${e.path}: a line`);
  assert.deepEqual(r.snapshot.secrets, {}, 'a rule no route uses loads no certificate');
});

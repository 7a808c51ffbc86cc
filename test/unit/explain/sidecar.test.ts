/**
 * explain --sidecar over snapshots from the real translate: the outbound hop (absolute-form HTTP
 * and CONNECT tunnels, chosen by the runtime's own selection functions) and the inbound chain
 * under PeerAuthentication, with the words that say where mTLS wraps the stream.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { parseText } from '../../../src/config/load.js';
import { translate } from '../../../src/model/translate/index.js';
import { explain, renderExplanation, type ExplainQuery } from '../../../src/explain/explain.js';
import { parseTarget, ExplainUsageError } from '../../../src/cli/explain.js';
import { connectCandidates, selectTunnelRoute } from '../../../src/runtime/chain/connect.js';
import type { ConnectTunnelRoute } from '../../../src/model/snapshot.js';
import { repoRoot } from '../config/root.js';

const dir = join(repoRoot(), 'test', 'golden', 'explain');

function run(yaml: string, q: ExplainQuery, ns: string, appPort?: number) {
  const parsed = parseText(yaml, join(dir, 'virtual.yaml'));
  assert.deepEqual(parsed.diagnostics.filter((d) => d.severity === 'error'), [], 'fixture must load cleanly');
  const sidecar = { outboundAddress: '127.0.0.1', outboundPort: 15001, ...(appPort !== undefined ? { inbound: { address: '127.0.0.1', port: 15006, appPort } } : {}) };
  const { snapshot, diagnostics } = translate(parsed.resources, { proxyNamespace: ns, bindAddress: '127.0.0.1', sidecar });
  const e = explain(snapshot, q, { resources: parsed.resources, diagnostics });
  const text = renderExplanation(e);
  assert.match(text, /result {5}(OK|NO MATCH): /);
  return { e, text };
}

const q = (target: string, extra: Partial<Parameters<typeof parseTarget>[1]> = {}) => parseTarget(target, { header: [], sidecar: true, ...extra });

const HTTPBIN = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: [httpbin.foo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP}]
  endpoints:
  - address: 127.0.0.1
    ports: {http: 15006}
    labels: {app: httpbin, security.istio.io/tlsMode: istio}
`;

const PA = (mode: string, ns = 'istio-system') => `---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: ${ns}}
spec:
  mtls: {mode: ${mode}}
`;

const EGRESS = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: default}
spec:
  hosts: [edition.cnn.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 18443}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 15443, name: tls, protocol: TLS}]
  endpoints:
  - address: 127.0.0.1
    labels: {istio: egressgateway, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: egressgateway-for-cnn, namespace: default}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: cnn
    trafficPolicy:
      portLevelSettings:
      - port: {number: 15443}
        tls: {mode: ISTIO_MUTUAL, sni: edition.cnn.com}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cnn-via-egress, namespace: default}
spec:
  hosts: [edition.cnn.com]
  gateways: [mesh]
  tls:
  - match:
    - port: 443
      sniHosts: [edition.cnn.com]
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port: {number: 15443}
`;

// ------------------------------------------------------------------ outbound HTTP

test('outbound HTTP: auto mTLS wraps the plaintext request in ISTIO_MUTUAL', () => {
  const { e, text } = run(HTTPBIN, q('http://httpbin.foo.svc.cluster.local:8000/headers'), 'foo');
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.listener?.port, 15001);
  assert.equal(e.mesh?.role, 'sidecar-outbound');
  assert.equal(e.mesh?.routePort, 8000);
  assert.equal(e.http?.route?.name, 'foo/httpbin#httpbin.foo.svc.cluster.local:8000');
  assert.equal(e.clusters[0]?.name, 'outbound|8000||httpbin.foo.svc.cluster.local');
  const w = e.mesh!.wrapping[0]!;
  assert.match(w, /^plaintext from the app; Istio mTLS \(ISTIO_MUTUAL\) from this sidecar to 127\.0\.0\.1:15006, SNI outbound_\.8000_\._\.httpbin\.foo\.svc\.cluster\.local/);
  assert.match(w, /auto mTLS/);
  assert.match(text, /verify: any identity the mesh CA issued/);
});

test('outbound HTTP: routes match on the port the app addressed (80 when the URL has none)', () => {
  const { e } = run(HTTPBIN, q('http://httpbin.foo.svc.cluster.local/headers'), 'foo');
  assert.equal(e.mesh?.routePort, 80);
  assert.equal(e.outcome, 'not_found');
  assert.match(e.nearest.join('\n'), /needs: port 8000/);
});

test('outbound HTTP: a mesh VirtualService and a DestinationRule that originates TLS (SIMPLE)', () => {
  const yaml = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy: {tls: {mode: SIMPLE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  http:
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: api.example.com, port: {number: 80}}}]
`;
  const { e } = run(yaml, q('http://api.example.com/v2/x'), 'default');
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.http?.route?.origin, 'VirtualService default/api spec.http[0]');
  assert.match(e.mesh!.wrapping[0]!, /^plaintext from the app; TLS originated here \(SIMPLE\) to api\.example\.com:443/);
  assert.doesNotMatch(e.mesh!.wrapping[0]!, /auto mTLS/);
});

// ------------------------------------------------------------------ outbound CONNECT

test('CONNECT: the SNI picks the tls route; the app\'s TLS travels inside Istio mTLS (double encryption)', () => {
  const { e, text } = run(EGRESS, q('https://edition.cnn.com/politics'), 'default');
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.client.http?.method, 'CONNECT');
  assert.deepEqual(e.mesh?.tunnel, { target: 'edition.cnn.com:443', routedBySni: true, route: 'default/cnn-via-egress#tls[0].match[0]', selectedBy: 'sni', pattern: 'edition.cnn.com' });
  assert.equal(e.clusters[0]?.name, 'outbound|15443|cnn|istio-egressgateway.istio-system.svc.cluster.local');
  assert.match(e.mesh!.wrapping[0]!, /the app's TLS \(SNI edition\.cnn\.com\) travels inside Istio mTLS \(ISTIO_MUTUAL\) from this sidecar to 127\.0\.0\.1:15443, SNI edition\.cnn\.com: double encryption/);
  // A DestinationRule set the TLS: not auto mTLS.
  assert.doesNotMatch(e.mesh!.wrapping[0]!, /auto mTLS/);
  assert.match(text, /tunnel {5}CONNECT edition\.cnn\.com:443: a tls route claims port 443/);
});

test('CONNECT: a ServiceEntry TLS port is chosen by host and its TLS passes through opaque', () => {
  const yaml = EGRESS.split('---')[0]!;
  const { e } = run(yaml, q('https://edition.cnn.com/'), 'default');
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.mesh?.tunnel?.selectedBy, 'host');
  assert.equal(e.mesh?.tunnel?.routedBySni, false);
  assert.match(e.mesh!.wrapping[0]!, /passed through opaque to 127\.0\.0\.1:18443/);
});

test('CONNECT: a tls route claims the port and the SNI matches nothing: the tunnel is closed', () => {
  const { e } = run(EGRESS.split('---').slice(1).join('---'), q('https://edition.cnn.com/', { header: [], sni: 'other.example.com' }), 'default');
  assert.equal(e.outcome, 'rejected');
  assert.equal(e.matched, false);
  assert.match(e.summary, /none matches SNI other\.example\.com/);
  assert.match(e.nearest.join('\n'), /tunnel route default\/cnn-via-egress#tls\[0\]\.match\[0\]: port 443, SNI edition\.cnn\.com/);
});

test('CONNECT: nothing for the port or host: 404', () => {
  const { e } = run(EGRESS, q('https://unknown.example.com:8443/'), 'default');
  assert.equal(e.outcome, 'not_found');
  assert.match(e.summary, /404/);
});

// ------------------------------------------------------------------ inbound

const inbound = (extra: Partial<Parameters<typeof parseTarget>[1]> = {}) => parseTarget(undefined, { header: [], sidecar: true, appPort: 8000, ...extra });

test('inbound STRICT: plaintext is refused', () => {
  const { e, text } = run(HTTPBIN + PA('STRICT'), inbound({ plaintext: true }), 'foo', 8000);
  assert.equal(e.outcome, 'no_filter_chain');
  assert.deepEqual(e.mesh?.peerAuthentication, { mode: 'STRICT', from: 'istio-system/default' });
  assert.match(e.summary, /PeerAuthentication STRICT \(istio-system\/default\) accepts only Istio mTLS: plaintext is refused/);
  assert.match(text, /mtls {7}nothing reaches the app/);
});

test('inbound STRICT: TLS without Istio ALPN is refused; mTLS (ALPN istio) is terminated', () => {
  const tlsApp = run(HTTPBIN + PA('STRICT'), inbound({ alpn: 'h2' }), 'foo', 8000).e;
  assert.equal(tlsApp.outcome, 'no_filter_chain');
  assert.match(tlsApp.summary, /TLS with ALPN h2 is refused/);
  const { e } = run(HTTPBIN + PA('STRICT'), inbound(), 'foo', 8000);
  assert.equal(e.outcome, 'forwarded');
  assert.match(e.chain!.name, /^inbound mtls tcp; peerauthentication=STRICT/);
  assert.equal(e.tls?.mode, 'ISTIO_MUTUAL');
  assert.equal(e.tls?.clientCertificate, 'required');
  assert.match(e.mesh!.wrapping[0]!, /Istio mTLS \(ISTIO_MUTUAL\) from the peer ends here.*plaintext TCP to 127\.0\.0\.1:8000/);
});

test('inbound PERMISSIVE (no policy): plaintext accepted, an app\'s own TLS passed through', () => {
  const plain = run(HTTPBIN, inbound({ plaintext: true }), 'foo', 8000).e;
  assert.equal(plain.outcome, 'forwarded');
  assert.deepEqual(plain.mesh?.peerAuthentication, { mode: 'PERMISSIVE', from: 'default' });
  assert.match(plain.mesh!.wrapping[0]!, /^plaintext accepted \(PeerAuthentication PERMISSIVE\)/);
  const tls = run(HTTPBIN, inbound({ alpn: 'h2' }), 'foo', 8000).e;
  assert.equal(tls.outcome, 'forwarded');
  assert.match(tls.mesh!.wrapping[0]!, /not Istio mTLS is passed through to 127\.0\.0\.1:8000 untouched/);
  const http = run(HTTPBIN, inbound({ alpn: 'istio-http/1.1' }), 'foo', 8000).e;
  assert.match(http.mesh!.wrapping[0]!, /plaintext HTTP \(with XFCC naming the peer\)/);
});

test('inbound DISABLE: mesh mTLS is not terminated and reaches the app as it is', () => {
  const { e } = run(HTTPBIN + PA('DISABLE', 'foo'), inbound(), 'foo', 8000);
  assert.deepEqual(e.mesh?.peerAuthentication, { mode: 'DISABLE', from: 'foo/default' });
  assert.match(e.chain!.name, /^inbound tls passthrough/);
  assert.match(e.mesh!.wrapping[0]!, /does not terminate mesh mTLS/);
});

// ------------------------------------------------------------------ arguments and the shared selection

test('sidecar targets: http = absolute form, https/tls = CONNECT with the SNI inside, tcp = CONNECT without TLS', () => {
  const h = q('http://a.example.com:8080/x?y=1');
  assert.equal(h.port, 15001);
  assert.equal(h.transport, 'raw_buffer');
  assert.deepEqual(h.http, { authority: 'a.example.com:8080', path: '/x?y=1', method: 'GET', headers: {} });
  const s = q('https://a.example.com/', { header: [], outboundPort: 16001 });
  assert.equal(s.port, 16001);
  assert.equal(s.sni, 'a.example.com');
  assert.deepEqual(s.sidecar, { role: 'outbound', connect: { host: 'a.example.com', port: 443 } });
  assert.equal(s.http?.authority, 'a.example.com:443');
  const t = q('tcp://db.example.com:3306');
  assert.equal(t.sni, undefined);
  assert.throws(() => q('tcp://db.example.com'), ExplainUsageError);
  assert.throws(() => parseTarget(undefined, { header: [], sidecar: true }), /--app-port/);
  const i = inbound({ port: 16006 });
  assert.equal(i.port, 16006);
  assert.deepEqual(i.alpn, ['istio-peer-exchange', 'istio']);
});

test('connectCandidates / selectTunnelRoute: SNI first, then host; malformed targets are undefined', () => {
  const proxy = { kind: 'tcp' as const, name: 'p', clusters: [], idleTimeoutMs: 1 };
  const routes: ConnectTunnelRoute[] = [
    { name: 'sni', port: 443, serverNames: ['*.example.com'], hosts: [], proxy },
    { name: 'host', serverNames: [], hosts: ['a.example.com'], proxy },
  ];
  assert.equal(connectCandidates(routes, 'a.example.com'), undefined);
  const c = connectCandidates(routes, 'A.example.com:443')!;
  assert.equal(c.host, 'a.example.com');
  assert.equal(c.bySni.length, 1);
  assert.equal(selectTunnelRoute(c, 'b.example.com')?.route.name, 'sni');
  assert.deepEqual(selectTunnelRoute(c, 'other.org')?.by, 'host');
  assert.equal(selectTunnelRoute(c, undefined)?.route.name, 'host');
  const other = connectCandidates(routes, 'z.org:8443')!;
  assert.equal(other.bySni.length, 0);
  assert.equal(selectTunnelRoute(other, 'z.org'), undefined);
});

/**
 * explain() over snapshots from the real translate: one test per TLS mode and per way a
 * connection or request can fail, asserting the decision and the words that explain it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { parseText } from '../../../src/config/load.js';
import { translate } from '../../../src/model/translate/index.js';
import { explain, renderExplanation, describeRouteMatch, type ExplainQuery, type SecretFacts } from '../../../src/explain/explain.js';
import { parseTarget, ExplainUsageError } from '../../../src/cli/explain.js';
import { repoRoot } from '../config/root.js';

const certs = join(repoRoot(), 'test', 'golden', 'explain', 'certs');

function build(yaml: string, labels?: Record<string, string>) {
  const parsed = parseText(yaml, join(certs, 'virtual.yaml'));
  assert.deepEqual(parsed.diagnostics.filter((d) => d.severity === 'error'), [], 'fixture must load cleanly');
  const { snapshot, diagnostics } = translate(parsed.resources, labels ? { labels } : {});
  return { snapshot, diagnostics, resources: parsed.resources };
}

const LEAF: SecretFacts = { leaf: { subject: 'CN=login.bookinfo.com', issuer: 'CN=ca', sans: ['DNS:login.bookinfo.com'], notAfter: '2126-01-01', fingerprintSha256: 'ab'.repeat(32) } };

function run(yaml: string, q: ExplainQuery, labels?: Record<string, string>) {
  const b = build(yaml, labels);
  const e = explain(b.snapshot, q, { resources: b.resources, diagnostics: b.diagnostics, secrets: (n) => (n.includes('login.crt') ? LEAF : undefined), baseDir: certs, ...(labels ? { labels } : {}) });
  // The text rendering must never throw and always ends with the result line and its hints.
  const text = renderExplanation(e);
  assert.match(text, /result {5}(OK|NO MATCH): /);
  return { e, text };
}

const https = (host: string, path = '/', port = 443, extra: Partial<ExplainQuery> = {}): ExplainQuery => ({
  target: `https://${host}${path}`, port, transport: 'tls', sni: host, alpn: ['h2', 'http/1.1'],
  http: { authority: host, path, method: 'GET', headers: {} }, ...extra,
});

const GW = (servers: string) => `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
${servers}
`;

const SIMPLE = GW(`  - port: {number: 443, name: https-login, protocol: HTTPS}
    hosts: [login.bookinfo.com]
    tls: {mode: SIMPLE, serverCertificate: login.crt, privateKey: login.key}
  - port: {number: 443, name: https-api, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: MUTUAL, serverCertificate: wildcard.crt, privateKey: wildcard.key, caCertificates: ca.crt}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [login.bookinfo.com]
    tls: {httpsRedirect: true}`) + `---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: login, namespace: default}
spec:
  hosts: [login.bookinfo.com, "*.example.com"]
  gateways: [istio-system/gw]
  http:
  - name: health
    match: [{uri: {exact: /healthz}}]
    directResponse: {status: 204}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: new.bookinfo.com}
  - match: [{uri: {prefix: /api}, method: {exact: GET}}]
    route:
    - destination: {host: api.internal, port: {number: 8443}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.internal]
  ports: [{number: 8443, name: https, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.9}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.internal
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ca.crt, sni: api.internal}
`;

test('SIMPLE: terminated on the exact-SNI chain, routed by prefix to a cluster with upstream TLS', () => {
  const { e, text } = run(SIMPLE, https('login.bookinfo.com', '/api/v1?x=1'));
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.matched, true);
  assert.equal(e.listener?.port, 443);
  assert.equal(e.chain?.selectedBy, 'sni_exact');
  assert.equal(e.tls?.action, 'terminate');
  assert.equal(e.tls?.mode, 'SIMPLE');
  assert.equal(e.tls?.clientCertificate, 'not requested');
  assert.equal(e.tls?.certificates?.[0]?.leaf?.subject, 'CN=login.bookinfo.com');
  assert.equal(e.tls?.certificates?.[0]?.secret, 'file://login.crt|login.key||', 'paths are shown relative to baseDir');
  assert.equal(e.http?.route?.name, 'default/login#http[2]');
  assert.equal(e.http?.route?.match, 'uri prefix "/api", method exact "GET"');
  assert.equal(e.clusters.length, 1);
  const c = e.clusters[0]!;
  assert.equal(c.name, 'outbound|8443||api.internal');
  assert.deepEqual(c.endpoints, [{ address: '10.0.0.9', port: 8443, weight: 1 }]);
  assert.ok(c.upstreamTls && c.upstreamTls.mode === 'SIMPLE');
  assert.equal(c.upstreamTls.sni, 'api.internal');
  assert.equal(c.upstreamTls.ca.secret, 'file://||ca.crt|');
  assert.equal(c.upstreamTls.ca.error, 'not loaded');
  assert.match(text, /SNI exact match "login.bookinfo.com"/);
});

test('SIMPLE: a direct response and a redirect are reported with their status and Location', () => {
  const d = run(SIMPLE, https('login.bookinfo.com', '/healthz')).e;
  assert.equal(d.outcome, 'direct_response');
  assert.equal(d.http?.status, 204);
  assert.equal(d.http?.route?.name, 'default/login#health');
  const r = run(SIMPLE, https('login.bookinfo.com', '/old/x?q=1')).e;
  assert.equal(r.outcome, 'redirect');
  assert.equal(r.http?.status, 301);
  assert.equal(r.http?.location, 'https://new.bookinfo.com/new?q=1');
});

test('MUTUAL: the wildcard chain is chosen and the client certificate is required', () => {
  const { e, text } = run(SIMPLE, https('shop.example.com', '/api'));
  assert.equal(e.chain?.selectedBy, 'sni_wildcard');
  assert.equal(e.chain?.pattern, '*.example.com');
  assert.equal(e.tls?.mode, 'MUTUAL');
  assert.equal(e.tls?.clientCertificate, 'required');
  assert.equal(e.tls?.clientCa?.secret, 'file://||ca.crt|');
  assert.equal(e.http?.virtualHost?.matchedBy, 'wildcard');
  assert.equal(e.outcome, 'forwarded');
  assert.match(text, /client certificate required/);
});

test('httpsRedirect: plaintext port 80 answers 301 to https with path and query', () => {
  const { e } = run(SIMPLE, { target: 'http://login.bookinfo.com/a?b=1', port: 80, transport: 'raw_buffer', alpn: [], http: { authority: 'login.bookinfo.com', path: '/a?b=1', method: 'GET', headers: {} } });
  assert.equal(e.outcome, 'redirect');
  assert.equal(e.matched, true);
  assert.equal(e.chain?.selectedBy, 'plaintext');
  assert.equal(e.tls?.action, 'none');
  assert.equal(e.http?.action, 'httpsRedirect');
  assert.equal(e.http?.location, 'https://login.bookinfo.com/a?b=1');
});

test('404: no route matches, and every route tried is listed with what it needs', () => {
  const { e } = run(SIMPLE, https('login.bookinfo.com', '/api', 443, { http: { authority: 'login.bookinfo.com', path: '/api', method: 'POST', headers: {} } }));
  assert.equal(e.outcome, 'not_found');
  assert.equal(e.matched, false);
  assert.equal(e.http?.status, 404);
  assert.ok(e.nearest.some((n) => n.includes('default/login#http[2]') && n.includes('method exact "GET"')), e.nearest.join('\n'));
});

test('404: a Host no virtual host serves names the virtual hosts and the nearest one', () => {
  const { e } = run(SIMPLE, { ...https('login.bookinfo.com'), http: { authority: 'login.bookinfo.com', path: '/', method: 'GET', headers: { host: 'logon.bookinfo.com' } } });
  // logon.bookinfo.com is nobody's SNI: no 421, a 404 with the typo spotted.
  assert.equal(e.outcome, 'not_found');
  assert.ok(e.nearest.some((n) => n.startsWith('virtual hosts: login.bookinfo.com')), e.nearest.join('\n'));
  assert.ok(e.nearest.some((n) => n.includes('a typo?')), e.nearest.join('\n'));
});

test('421: a Host owned by another chain of the listener is misdirected', () => {
  const { e, text } = run(SIMPLE, { ...https('login.bookinfo.com'), http: { authority: 'api.example.com', path: '/api', method: 'GET', headers: {} } });
  assert.equal(e.outcome, 'misdirected');
  assert.equal(e.http?.status, 421);
  assert.match(e.summary, /istio-system\/gw\/spec\.servers\[1\]/);
  assert.match(text, /421 Misdirected Request/);
});

test('no SNI match: the closest server name and the VirtualService host are named', () => {
  const { e } = run(SIMPLE, https('logn.bookinfo.com'));
  assert.equal(e.outcome, 'no_filter_chain');
  assert.equal(e.matched, false);
  assert.equal(e.chain, undefined);
  assert.ok(e.nearest.some((n) => n.startsWith('server names on port 443: *.example.com, login.bookinfo.com')), e.nearest.join('\n'));
  assert.ok(e.nearest.some((n) => n.startsWith('nearest: "login.bookinfo.com" differs from "logn.bookinfo.com" by 1')), e.nearest.join('\n'));
});

test('no SNI match: a wildcard does not cover its bare domain, and says so', () => {
  const { e } = run(SIMPLE, https('example.com'));
  assert.equal(e.outcome, 'no_filter_chain');
  assert.ok(e.nearest.some((n) => n.includes('does not cover the bare domain "example.com"')), e.nearest.join('\n'));
});

test('no SNI match: a server for that host skipped by translate is shown with its diagnostic', () => {
  const yaml = GW(`  - port: {number: 443, name: a, protocol: HTTPS}
    hosts: [login.bookinfo.com]
    tls: {mode: SIMPLE, serverCertificate: login.crt, privateKey: login.key}
  - port: {number: 443, name: b, protocol: HTTPS}
    hosts: [shop.bookinfo.com]
    tls: {mode: SIMPLE, credentialName: missing-credential}`);
  const { e } = run(yaml, https('shop.bookinfo.com'));
  assert.equal(e.outcome, 'no_filter_chain');
  assert.ok(e.nearest.some((n) => n.includes('spec.servers[1]') && n.includes('TG3003')), e.nearest.join('\n'));
});

test('no SNI: a client without SNI on a port without a catch-all chain', () => {
  const { e } = run(SIMPLE, { target: 'tls port=443', port: 443, transport: 'tls', alpn: [] });
  assert.equal(e.outcome, 'no_filter_chain');
  assert.match(e.summary, /sent no SNI/);
});

test('a Gateway not served because of --labels is named as the reason', () => {
  const { e } = run(SIMPLE, https('login.bookinfo.com'), { istio: 'egressgateway' });
  assert.equal(e.outcome, 'no_listener');
  assert.ok(e.nearest.some((n) => n.includes('is not served by this proxy') && n.includes('istio=egressgateway')), e.nearest.join('\n'));
});

test('no listener: the listening ports and where the host is served instead', () => {
  const { e } = run(SIMPLE, https('login.bookinfo.com', '/', 8443));
  assert.equal(e.outcome, 'no_listener');
  assert.ok(e.nearest.includes('listening ports: 80 (plaintext), 443 (TLS)'), e.nearest.join('\n'));
  assert.ok(e.nearest.some((n) => n.startsWith('login.bookinfo.com is served on port 443')), e.nearest.join('\n'));
});

test('TLS mismatch: plaintext to a terminating port, and TLS to a plaintext HTTP port', () => {
  const a = run(SIMPLE, { target: 'tcp://x:443', port: 443, transport: 'raw_buffer', alpn: [] }).e;
  assert.equal(a.matched, false);
  assert.equal(a.outcome, 'no_filter_chain'); // no chain accepts plaintext: the runtime closes it (not_tls)
  const b = run(SIMPLE, https('login.bookinfo.com', '/', 80)).e;
  assert.equal(b.outcome, 'tls_mismatch');
  assert.match(b.summary, /plaintext HTTP/);
});

const PASS = GW(`  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["*.pass.example.org"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 3306, name: mysql, protocol: TCP}
    hosts: ["*"]
  - port: {number: 5432, name: pg, protocol: TCP}
    hosts: ["*"]`) + `---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass, namespace: default}
spec:
  hosts: ["*.pass.example.org"]
  gateways: [istio-system/gw]
  tls:
  - match: [{port: 443, sniHosts: [a.pass.example.org]}]
    route:
    - destination: {host: a.internal, port: {number: 8443}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: ["*"]
  gateways: [istio-system/gw]
  tcp:
  - match: [{port: 3306}]
    route:
    - destination: {host: db1.internal, port: {number: 3306}}
      weight: 3
    - destination: {host: db2.internal, port: {number: 3306}}
      weight: 1
`;

test('PASSTHROUGH: the SNI chain from the VirtualService tls route, not terminated, to its cluster', () => {
  const { e, text } = run(PASS, { target: 'tls://a.pass.example.org:443', port: 443, transport: 'tls', sni: 'a.pass.example.org', alpn: [] });
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.tls?.action, 'passthrough');
  assert.equal(e.chain?.name, 'default/pass#tls[0].match[0]');
  assert.equal(e.tcp?.name, 'default/pass#tls[0]');
  assert.deepEqual(e.clusters.map((c) => c.name), ['outbound|8443||a.internal']);
  assert.deepEqual(e.clusters[0]!.upstreamTls, { mode: 'plaintext' });
  assert.match(text, /passthrough: not terminated here/);
  const miss = run(PASS, { target: 'tls://b.pass.example.org:443', port: 443, transport: 'tls', sni: 'b.pass.example.org', alpn: [] }).e;
  assert.equal(miss.outcome, 'no_filter_chain');
  assert.ok(miss.nearest.some((n) => n.startsWith('VirtualService default/pass has host "*.pass.example.org"')), miss.nearest.join('\n'));
});

test('TCP: plaintext port, weighted clusters with their share in percent', () => {
  const { e } = run(PASS, { target: 'tcp://db:3306', port: 3306, transport: 'raw_buffer', alpn: [] });
  assert.equal(e.outcome, 'forwarded');
  assert.equal(e.tls?.action, 'none');
  assert.deepEqual(e.clusters.map((c) => [c.name, c.weight, c.percent]), [
    ['outbound|3306||db1.internal', 3, 75], ['outbound|3306||db2.internal', 1, 25],
  ]);
});

test('TCP: a server without a tcp route closes connections, and the diagnostic says why', () => {
  const { e } = run(PASS, { target: 'tcp://db:5432', port: 5432, transport: 'raw_buffer', alpn: [] });
  assert.equal(e.outcome, 'rejected');
  assert.equal(e.matched, false);
  assert.ok(e.nearest.some((n) => n.includes('TG3022')), e.nearest.join('\n'));
});

test('the JSON form is plain data with a fixed key order', () => {
  const { e } = run(SIMPLE, https('login.bookinfo.com', '/api'));
  const round = JSON.parse(JSON.stringify(e)) as Record<string, unknown>;
  assert.deepEqual(round, e);
  assert.deepEqual(Object.keys(round), ['target', 'client', 'outcome', 'matched', 'summary', 'listener', 'chain', 'tls', 'http', 'clusters', 'nearest', 'notes']);
});

test('describeRouteMatch speaks Istio', () => {
  assert.equal(describeRouteMatch(undefined), 'no match conditions (takes every request)');
  assert.equal(describeRouteMatch({ path: { kind: 'regex', value: '/a.*' }, headers: [{ name: 'x', matcher: { kind: 'present' }, invert: true }], queryParams: [], port: 8080 }),
    'uri regex "/a.*", without header x present, port 8080');
});

test('parseTarget: URLs, tcp://, tls:// and --sni/--port', () => {
  const a = parseTarget('https://Login.Bookinfo.com:8443/p?q=1', { header: [] });
  assert.equal(a.port, 8443);
  assert.equal(a.sni, 'login.bookinfo.com');
  assert.deepEqual(a.alpn, ['h2', 'http/1.1']);
  assert.deepEqual(a.http, { authority: 'login.bookinfo.com:8443', path: '/p?q=1', method: 'GET', headers: {} });
  const b = parseTarget('http://h/x', { header: ['X-A=1'], method: 'post' });
  assert.equal(b.port, 80);
  assert.equal(b.transport, 'raw_buffer');
  assert.equal(b.sni, undefined);
  assert.deepEqual(b.http?.headers, { 'x-a': '1' });
  assert.equal(b.http?.method, 'POST');
  const c = parseTarget('https://10.0.0.1/', { header: [] });
  assert.equal(c.sni, undefined, 'no SNI for an IP address');
  const d = parseTarget('tcp://db:3306', { header: [] });
  assert.deepEqual([d.port, d.transport, d.http], [3306, 'raw_buffer', undefined]);
  const f = parseTarget(undefined, { sni: 'x.example.com', port: 443, alpn: 'h2', header: [] });
  assert.deepEqual([f.port, f.transport, f.sni, f.alpn, f.http], [443, 'tls', 'x.example.com', ['h2'], undefined]);
  assert.throws(() => parseTarget('login.bookinfo.com', { header: [] }), ExplainUsageError);
  assert.throws(() => parseTarget('tcp://db', { header: [] }), /needs a port/);
  assert.throws(() => parseTarget(undefined, { header: [] }), ExplainUsageError);
  assert.throws(() => parseTarget('ftp://x:21', { header: [] }), /unsupported scheme/);
});

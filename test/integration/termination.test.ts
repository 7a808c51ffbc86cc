/**
 * TLS termination at the gateway, end to end against the real `tlsgate run`: every credential
 * layout Istio accepts (kubernetes.io/tls, generic cert/key/cacert, the `<name>-cacert` companion,
 * file paths), client-certificate modes and checks, redirects and local replies (301, 404, 421,
 * 503), ALPN, TLS versions, SNI refusals with their alerts and access-log reasons, the admin
 * endpoints, and a refused configuration.
 *
 * One gateway process serves most checks: many servers on one port (one SNI host each), plus a
 * catch-all `*` HTTPS port and a plaintext redirect port.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  certDir, certSha256Colons, certSha256Hex, makeCa, makeLeaf, spkiSha256Base64, writeSecretYaml, type Ca, type KeyPair,
} from '../helpers/certs.js';
import { curl, opensslSClient, resolveArgs, type CurlResult } from '../helpers/exec.js';
import { canConnect, freePort, freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';

let certs: string;
let configDir: string;
let ca1: Ca;
let ca2: Ca;
let clientA: KeyPair; // CA1, SAN DNS:client-a.example.com
let clientB: KeyPair; // CA1, SAN DNS:client-b.example.com
let clientX: KeyPair; // CA2, SAN DNS:client-a.example.com (right name, wrong issuer)
const leaf: Record<string, KeyPair> = {};
let httpbin: EchoServer;
let gw: Gateway;
let mainPort: number;
let starPort: number;
let redirectPort: number;
let closedPort: number;

/** Hosts served on mainPort, one server (and one filter chain) each. */
const HOSTS = [
  'k8s', 'k8s-mtls', 'generic', 'generic-mtls', 'companion', 'override', 'files', 'optional', 'optional-skip',
  'san', 'spki', 'hash', 'tls13', 'tls12', 'down',
].map((h) => `${h}.example.com`);

function server(name: string, host: string, port: number, tls: string): string {
  return `  - port: {number: ${port}, name: ${name}, protocol: HTTPS}
    hosts: ["${host}"]
    tls:
${tls.trim().split('\n').map((l) => `      ${l.trim()}`).join('\n')}
`;
}

function pair(k: KeyPair): Record<string, string> {
  return { cert: k.certPem, key: k.keyPem };
}

function tlsPair(k: KeyPair): Record<string, string> {
  return { 'tls.crt': k.certPem, 'tls.key': k.keyPem };
}

function configYaml(): { secrets: string; gateways: string; routes: string } {
  const secrets = [
    writeSecretYaml('k8s-cred', 'istio-system', 'kubernetes.io/tls', tlsPair(leaf['k8s']!)),
    writeSecretYaml('k8s-ca-cred', 'istio-system', 'kubernetes.io/tls', { ...tlsPair(leaf['k8s-mtls']!), 'ca.crt': ca1.certPem }),
    writeSecretYaml('generic-cred', 'istio-system', 'Opaque', pair(leaf['generic']!)),
    writeSecretYaml('generic-ca-cred', 'istio-system', 'Opaque', { ...pair(leaf['generic-mtls']!), cacert: ca1.certPem }),
    writeSecretYaml('companion-cred', 'istio-system', 'Opaque', pair(leaf['companion']!)),
    writeSecretYaml('companion-cred-cacert', 'istio-system', 'Opaque', { cacert: ca1.certPem }),
    // The main Secret trusts CA2; its -cacert companion (CA1) must win.
    writeSecretYaml('override-cred', 'istio-system', 'kubernetes.io/tls', { ...tlsPair(leaf['override']!), 'ca.crt': ca2.certPem }),
    writeSecretYaml('override-cred-cacert', 'istio-system', 'Opaque', { cacert: ca1.certPem }),
    writeSecretYaml('misc-cred', 'istio-system', 'Opaque', { ...pair(leaf['misc']!), 'ca.crt': ca1.certPem }),
  ].join('---\n');

  const edge = [
    server('https-k8s', 'k8s.example.com', mainPort, 'mode: SIMPLE\ncredentialName: k8s-cred'),
    server('https-k8s-mtls', 'k8s-mtls.example.com', mainPort, 'mode: MUTUAL\ncredentialName: k8s-ca-cred'),
    server('https-generic', 'generic.example.com', mainPort, 'mode: SIMPLE\ncredentialName: generic-cred'),
    server('https-generic-mtls', 'generic-mtls.example.com', mainPort, 'mode: MUTUAL\ncredentialName: generic-ca-cred'),
    server('https-companion', 'companion.example.com', mainPort, 'mode: MUTUAL\ncredentialName: kubernetes://companion-cred'),
    server('https-override', 'override.example.com', mainPort, 'mode: MUTUAL\ncredentialName: override-cred'),
    server('https-files', 'files.example.com', mainPort,
      'mode: MUTUAL\nserverCertificate: certs/files.crt\nprivateKey: certs/files.key\ncaCertificates: certs/ca1.crt'),
    server('https-optional', 'optional.example.com', mainPort,
      'mode: OPTIONAL_MUTUAL\nserverCertificate: certs/misc.crt\nprivateKey: certs/misc.key\ncaCertificates: ./certs/ca1.crt'),
    server('https-optional-skip', 'optional-skip.example.com', mainPort,
      'mode: OPTIONAL_MUTUAL\ncredentialName: misc-cred\ninsecureSkipVerify: true'),
    server('https-san', 'san.example.com', mainPort, 'mode: MUTUAL\ncredentialName: misc-cred\nsubjectAltNames: ["client-a.example.com"]'),
    server('https-spki', 'spki.example.com', mainPort,
      `mode: MUTUAL\ncredentialName: misc-cred\nverifyCertificateSpki: ["${spkiSha256Base64(clientA.certPem)}"]`),
    server('https-hash', 'hash.example.com', mainPort,
      `mode: MUTUAL\ncredentialName: misc-cred\nverifyCertificateHash: ["${certSha256Colons(clientA.certPem)}"]`),
    server('https-tls13', 'tls13.example.com', mainPort, 'mode: SIMPLE\ncredentialName: misc-cred\nminProtocolVersion: TLSV1_3'),
    server('https-tls12', 'tls12.example.com', mainPort, 'mode: SIMPLE\ncredentialName: misc-cred\nmaxProtocolVersion: TLSV1_2'),
    server('https-down', 'down.example.com', mainPort, 'mode: SIMPLE\ncredentialName: misc-cred'),
  ].join('');

  const gateways = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: edge
  namespace: default
spec:
  selector:
    istio: ingressgateway
  servers:
${edge}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: wild
  namespace: default
spec:
  servers:
  - port: {number: ${starPort}, name: https-any, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: misc-cred}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: redirect
  namespace: default
spec:
  servers:
  - port: {number: ${redirectPort}, name: http, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true}
`;

  const routes = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: apps
  namespace: default
spec:
  hosts: [${HOSTS.filter((h) => h !== 'down.example.com').map((h) => `"${h}"`).join(', ')}]
  gateways: [edge]
  http:
  - match:
    - uri: {prefix: /status}
    - uri: {prefix: /anything}
    route:
    - destination: {host: httpbin, port: {number: 8000}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: down
  namespace: default
spec:
  hosts: ["down.example.com"]
  gateways: [edge]
  http:
  - route:
    - destination: {host: down, port: {number: 8000}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: any
  namespace: default
spec:
  hosts: ["*"]
  gateways: [wild]
  http:
  - route:
    - destination: {host: httpbin, port: {number: 8000}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
  namespace: default
spec:
  hosts: [httpbin.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP, targetPort: ${httpbin.port}}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: down
  namespace: default
spec:
  hosts: [down.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP, targetPort: ${closedPort}}]
  endpoints: [{address: 127.0.0.1}]
`;
  return { secrets, gateways, routes };
}

before(async () => {
  certs = await certDir();
  configDir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-termination-'));
  [ca1, ca2] = await Promise.all([
    makeCa(certs, 'ca1', '/O=example Inc./CN=example.com'),
    makeCa(certs, 'ca2', '/O=other Inc./CN=other.example'),
  ]);
  const names = ['k8s', 'k8s-mtls', 'generic', 'generic-mtls', 'companion', 'override', 'files'];
  let serial = 10;
  for (const n of names) {
    leaf[n] = await makeLeaf(certs, ca1, n, { cn: `${n}.example.com`, sans: [`DNS:${n}.example.com`], serial: serial++, ec: true });
  }
  leaf['misc'] = await makeLeaf(certs, ca1, 'misc', {
    cn: 'misc.example.com', sans: [...HOSTS.map((h) => `DNS:${h}`), 'IP:127.0.0.1'], serial: serial++, ec: true,
  });
  clientA = await makeLeaf(certs, ca1, 'client-a', { cn: 'client-a.example.com', sans: ['DNS:client-a.example.com'], serial: 100, ec: true });
  clientB = await makeLeaf(certs, ca1, 'client-b', { cn: 'client-b.example.com', sans: ['DNS:client-b.example.com'], serial: 101, ec: true });
  clientX = await makeLeaf(certs, ca2, 'client-x', { cn: 'client-a.example.com', sans: ['DNS:client-a.example.com'], serial: 102, ec: true });

  httpbin = await startEchoServer({ name: 'httpbin' });
  [mainPort, starPort, redirectPort, closedPort] = (await freePorts(4)) as [number, number, number, number];

  // File-path certificates, named relative to the YAML file that uses them.
  await mkdir(path.join(configDir, 'certs'));
  await copyFile(leaf['files']!.cert, path.join(configDir, 'certs', 'files.crt'));
  await copyFile(leaf['files']!.key, path.join(configDir, 'certs', 'files.key'));
  await copyFile(leaf['misc']!.cert, path.join(configDir, 'certs', 'misc.crt'));
  await copyFile(leaf['misc']!.key, path.join(configDir, 'certs', 'misc.key'));
  await copyFile(ca1.cert, path.join(configDir, 'certs', 'ca1.crt'));
  const y = configYaml();
  await writeFile(path.join(configDir, 'secrets.yaml'), y.secrets);
  await writeFile(path.join(configDir, 'gateways.yaml'), y.gateways);
  await writeFile(path.join(configDir, 'routes.yaml'), y.routes);
  gw = await startTlsgate({ configPaths: [configDir] });
});

after(async () => {
  const code = await gw?.stop();
  await httpbin?.close();
  await Promise.all([certs, configDir].filter(Boolean).map((d) => rm(d, { recursive: true, force: true })));
  assert.equal(code, 0, `tlsgate did not stop cleanly (exit ${code})`);
});

let seq = 0;

/** GET https://<host>:<port><path> with the CA1 bundle, through --resolve; `client` adds a certificate. */
function get(host: string, opts: { path?: string; client?: KeyPair; port?: number; extra?: string[] } = {}): Promise<CurlResult> {
  const port = opts.port ?? mainPort;
  const p = opts.path ?? `/anything/${++seq}`;
  const args = [...resolveArgs(host, port), '--cacert', ca1.cert, ...(opts.extra ?? [])];
  if (opts.client) args.push('--cert', opts.client.cert, '--key', opts.client.key);
  return curl([...args, `https://${host}:${port}${p}`]);
}

/** The upstream's record of the request whose path is `url`. */
function upstreamSaw(url: string): { headers: Record<string, string | string[] | undefined> } | undefined {
  return httpbin.replies.find((r) => r.url === url);
}

async function assertOk(host: string, client?: KeyPair): Promise<{ xfcc: string | undefined }> {
  const p = `/anything/${++seq}`;
  const res = await get(host, { path: p, ...(client ? { client } : {}) });
  assert.equal(res.code, 0, `${host}: ${res.stderr}`);
  assert.equal(res.status, 200, `${host}: ${res.body}`);
  assert.equal(res.headers['x-echo-server'], 'httpbin');
  const seen = upstreamSaw(p);
  assert.ok(seen, `upstream did not see ${p}`);
  const x = seen.headers['x-forwarded-client-cert'];
  return { xfcc: typeof x === 'string' ? x : undefined };
}

async function assertRefused(host: string, client?: KeyPair): Promise<void> {
  const before = httpbin.requests;
  const res = await get(host, client ? { client } : {});
  assert.notEqual(res.code, 0, `${host}: expected the handshake to be refused, got HTTP ${res.status}`);
  assert.equal(res.status, 0);
  assert.equal(httpbin.requests, before, 'nothing reached the upstream');
}

async function servedSubject(host: string, port = mainPort): Promise<string | undefined> {
  const s = await opensslSClient({ port, servername: host, cafile: ca1.cert });
  assert.ok(s.handshake, `${host}: ${s.stderr}`);
  assert.equal(s.verifyCode, 0, `${host}: ${s.verifyText}`);
  return s.peerCert?.subject;
}

describe('credential layouts', () => {
  test('kubernetes.io/tls Secret with tls.crt and tls.key (SIMPLE)', async () => {
    await assertOk('k8s.example.com');
    assert.equal(await servedSubject('k8s.example.com'), 'CN = k8s.example.com');
  });

  test('kubernetes.io/tls Secret with ca.crt (MUTUAL): its CA verifies client certificates', async () => {
    assert.equal(await servedSubject('k8s-mtls.example.com'), 'CN = k8s-mtls.example.com');
    await assertRefused('k8s-mtls.example.com');
    const { xfcc } = await assertOk('k8s-mtls.example.com', clientA);
    assert.match(xfcc ?? '', new RegExp(`^Hash=${certSha256Hex(clientA.certPem)};`));
    await assertRefused('k8s-mtls.example.com', clientX);
  });

  test('generic Secret with cert and key (SIMPLE)', async () => {
    await assertOk('generic.example.com');
    assert.equal(await servedSubject('generic.example.com'), 'CN = generic.example.com');
  });

  test('generic Secret with cert, key and cacert (MUTUAL)', async () => {
    assert.equal(await servedSubject('generic-mtls.example.com'), 'CN = generic-mtls.example.com');
    await assertRefused('generic-mtls.example.com');
    await assertOk('generic-mtls.example.com', clientA);
    await assertRefused('generic-mtls.example.com', clientX);
  });

  test('generic cert/key Secret plus a separate <name>-cacert Secret (MUTUAL)', async () => {
    assert.equal(await servedSubject('companion.example.com'), 'CN = companion.example.com');
    await assertRefused('companion.example.com');
    await assertOk('companion.example.com', clientA);
  });

  test('the <name>-cacert Secret wins over ca.crt in the main Secret', async () => {
    // Main Secret trusts CA2, the companion CA1: only CA1's clients pass.
    await assertOk('override.example.com', clientA);
    await assertRefused('override.example.com', clientX);
    const refusal = await gw.waitForAccessLog((e) => e.sni === 'override.example.com' && e.reason === 'client_cert_rejected');
    assert.match(String(refusal.detail), /not verified/);
  });

  test('file paths (serverCertificate, privateKey, caCertificates) relative to the YAML file', async () => {
    assert.equal(await servedSubject('files.example.com'), 'CN = files.example.com');
    await assertRefused('files.example.com');
    await assertOk('files.example.com', clientA);
    await assertRefused('files.example.com', clientX);
  });
});

describe('client certificate modes and checks', () => {
  test('OPTIONAL_MUTUAL: no certificate passes, a valid one is forwarded, an unknown CA is refused', async () => {
    const none = await assertOk('optional.example.com');
    assert.equal(none.xfcc, undefined);
    const s = await opensslSClient({ port: mainPort, servername: 'optional.example.com', cafile: ca1.cert });
    assert.ok(s.clientCertRequested, 'a certificate is requested, not required');
    const withCert = await assertOk('optional.example.com', clientA);
    assert.match(withCert.xfcc ?? '', new RegExp(`^Hash=${certSha256Hex(clientA.certPem)};`));
    await assertRefused('optional.example.com', clientX);
  });

  test('OPTIONAL_MUTUAL with insecureSkipVerify: a certificate from an unknown CA passes and is forwarded', async () => {
    const { xfcc } = await assertOk('optional-skip.example.com', clientX);
    assert.ok(xfcc !== undefined, 'XFCC is set for the unverified certificate');
    assert.match(xfcc, new RegExp(`^Hash=${certSha256Hex(clientX.certPem)};`));
    assert.match(xfcc, /;DNS=client-a\.example\.com$/);
    assert.equal((await assertOk('optional-skip.example.com')).xfcc, undefined);
  });

  test('subjectAltNames: a client whose SAN matches passes, another is refused', async () => {
    const { xfcc } = await assertOk('san.example.com', clientA);
    assert.match(xfcc ?? '', /Subject="CN=client-a\.example\.com";URI=;DNS=client-a\.example\.com$/);
    await assertRefused('san.example.com', clientB);
    await assertRefused('san.example.com');
    const entry = await gw.waitForAccessLog((e) => e.sni === 'san.example.com' && e.reason === 'client_cert_rejected');
    assert.match(String(entry.detail), /SAN/);
  });

  test('verifyCertificateSpki: the pinned key passes, another is refused', async () => {
    await assertOk('spki.example.com', clientA);
    await assertRefused('spki.example.com', clientB);
  });

  test('verifyCertificateHash: the pinned certificate passes, another is refused', async () => {
    await assertOk('hash.example.com', clientA);
    await assertRefused('hash.example.com', clientB);
    await assertRefused('hash.example.com', clientX);
  });
});

describe('HTTP at the gateway', () => {
  test('httpsRedirect answers plaintext HTTP with 301 to https', async () => {
    const res = await curl(['-I', '-H', 'Host: h', `http://127.0.0.1:${redirectPort}/status/200`]);
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.status, 301);
    assert.equal(res.headers['location'], 'https://h/status/200');
    const entry = await gw.waitForAccessLog((e) => e.authority === 'h' && e.reason === 'https_redirect');
    assert.equal(entry.status, 301);
  });

  test('404 when no route matches', async () => {
    const before = httpbin.requests;
    const res = await get('k8s.example.com', { path: '/nothing/here' });
    assert.equal(res.status, 404);
    assert.equal(httpbin.requests, before);
    const entry = await gw.waitForAccessLog((e) => e.path === '/nothing/here');
    assert.equal(entry.reason, 'no_route');
  });

  test('421 when the Host belongs to another server than the SNI', async () => {
    const res = await get('k8s.example.com', { path: '/status/200', extra: ['-H', 'Host: generic.example.com'] });
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.status, 421);
    const entry = await gw.waitForAccessLog((e) => e.sni === 'k8s.example.com' && e.authority === 'generic.example.com');
    assert.equal(entry.reason, 'misdirected_request');
  });

  test('503 when the upstream port is closed', async () => {
    const res = await get('down.example.com', { path: '/status/200' });
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.status, 503);
    const entry = await gw.waitForAccessLog((e) => e.sni === 'down.example.com' && e.status === 503);
    assert.equal(entry.reason, 'upstream_connect_failed');
    assert.equal(entry.upstreamCluster, 'outbound|8000||down.default.svc.cluster.local');
    assert.equal(entry.upstreamEndpoint, `127.0.0.1:${closedPort}`);
  });

  test('HTTP/2 and HTTP/1.1 by ALPN', async () => {
    const h2 = await get('k8s.example.com', { path: '/status/200', extra: ['--http2'] });
    assert.equal(h2.status, 200, h2.stderr);
    assert.equal(h2.httpVersion, '2');
    assert.match(h2.rawHeaders, /^HTTP\/2 200/);
    const h1 = await get('k8s.example.com', { path: '/status/201', extra: ['--http1.1'] });
    assert.equal(h1.status, 201, h1.stderr);
    assert.equal(h1.httpVersion, '1.1');
    assert.match(h1.rawHeaders, /^HTTP\/1\.1 201/);
    const seen = httpbin.replies.find((r) => r.url === '/status/201');
    assert.equal(seen?.headers.host, `k8s.example.com:${mainPort}`);
    const s = await opensslSClient({ port: mainPort, servername: 'k8s.example.com', cafile: ca1.cert, alpn: ['h2', 'http/1.1'] });
    assert.equal(s.alpn, 'h2');
  });
});

describe('TLS handshake', () => {
  test('minProtocolVersion TLSV1_3 refuses TLS 1.2', async () => {
    const old = await opensslSClient({ port: mainPort, servername: 'tls13.example.com', cafile: ca1.cert, extraArgs: ['-tls1_2'] });
    assert.equal(old.handshake, false, old.stdout);
    assert.ok(old.alertReceived, old.stderr);
    const ok = await opensslSClient({ port: mainPort, servername: 'tls13.example.com', cafile: ca1.cert, extraArgs: ['-tls1_3'] });
    assert.ok(ok.handshake, ok.stderr);
    assert.equal(ok.protocol, 'TLSv1.3');
  });

  test('maxProtocolVersion TLSV1_2 negotiates TLS 1.2', async () => {
    const s = await opensslSClient({ port: mainPort, servername: 'tls12.example.com', cafile: ca1.cert });
    assert.ok(s.handshake, s.stderr);
    assert.equal(s.protocol, 'TLSv1.2');
    const only13 = await opensslSClient({ port: mainPort, servername: 'tls12.example.com', cafile: ca1.cert, extraArgs: ['-tls1_3'] });
    assert.equal(only13.handshake, false);
    // Other chains of the same listener keep TLS 1.3.
    const other = await opensslSClient({ port: mainPort, servername: 'k8s.example.com', cafile: ca1.cert });
    assert.equal(other.protocol, 'TLSv1.3');
    const res = await get('tls12.example.com', { path: '/status/200' });
    assert.equal(res.status, 200, res.stderr);
    const entry = await gw.waitForAccessLog((e) => e.sni === 'tls12.example.com' && e.path === '/status/200');
    assert.equal(entry.tlsVersion, 'TLSv1.2');
  });

  test('an unknown SNI gets the unrecognized_name alert', async () => {
    const s = await opensslSClient({ port: mainPort, servername: 'unknown.example.com', cafile: ca1.cert });
    assert.equal(s.handshake, false);
    assert.equal(s.alertNumber, 112, s.stderr);
    assert.equal(s.alertDescription, 'unrecognized name');
    const entry = await gw.waitForAccessLog((e) => e.sni === 'unknown.example.com');
    assert.equal(entry.reason, 'no_sni_match');
    assert.equal(entry.kind, 'connection');
  });

  test('no SNI is refused where every server names hosts', async () => {
    const before = gw.accessLogs().filter((e) => e.reason === 'no_sni').length;
    const s = await opensslSClient({ port: mainPort, noServername: true, cafile: ca1.cert });
    assert.equal(s.handshake, false);
    assert.equal(s.alertNumber, 112, s.stderr);
    await gw.waitForAccessLog(() => gw.accessLogs().filter((e) => e.reason === 'no_sni').length > before);
  });

  test('a hosts: ["*"] server accepts a ClientHello without SNI', async () => {
    const s = await opensslSClient({ port: starPort, noServername: true, cafile: ca1.cert });
    assert.ok(s.handshake, s.stderr);
    assert.equal(s.peerCert?.subject, 'CN = misc.example.com');
    // curl sends no SNI for an IP address.
    const res = await curl(['--cacert', ca1.cert, `https://127.0.0.1:${starPort}/status/200`]);
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.status, 200);
    const entry = await gw.waitForAccessLog((e) => e.authority === `127.0.0.1:${starPort}`);
    assert.equal(entry.sni, undefined);
    assert.equal(entry.reason, 'ok');
  });
});

describe('admin endpoints', () => {
  test('/ready, /config_dump without key material, /stats/prometheus', async () => {
    const ready = await gw.admin('/ready');
    assert.equal(ready.status, 200);

    const dump = await gw.admin('/config_dump');
    assert.equal(dump.status, 200);
    assert.doesNotMatch(dump.body, /PRIVATE KEY/);
    for (const k of [...Object.values(leaf), clientA]) {
      const b64 = k.keyPem.split('\n').filter((l) => l !== '' && !l.startsWith('-----')).join('');
      assert.ok(!dump.body.includes(b64.slice(0, 40)), 'no key bytes in the dump');
    }
    const parsed = JSON.parse(dump.body) as {
      listeners: { port: number }[];
      boundPorts: Record<string, number>;
      secrets: { name: string; privateKey?: string; certificate?: { fingerprintSha256: string } }[];
    };
    const ports = parsed.listeners.map((l) => l.port).sort();
    assert.deepEqual(ports, [mainPort, starPort, redirectPort].sort());
    assert.deepEqual(Object.values(parsed.boundPorts).sort(), ports);
    const k8s = parsed.secrets.find((s) => s.name === 'kubernetes://istio-system/k8s-cred');
    assert.ok(k8s, JSON.stringify(parsed.secrets.map((s) => s.name)));
    assert.equal(k8s.privateKey, '[redacted]');
    assert.equal(k8s.certificate?.fingerprintSha256.replaceAll(':', '').toLowerCase(), certSha256Hex(leaf['k8s']!.certPem));

    const stats = await gw.admin('/stats/prometheus');
    assert.equal(stats.status, 200);
    assert.match(stats.body, /^tlsgate_tls_handshakes_total\{[^}]*result="success"[^}]*\} [1-9]/m);
    assert.match(stats.body, /^tlsgate_tls_handshakes_total\{[^}]*result="failure"[^}]*\} [1-9]/m);
  });
});

describe('refused configuration', () => {
  test('run with an invalid config exits non-zero, prints file:line diagnostics and binds nothing', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-bad-'));
    try {
      const [port, adminPort] = (await freePorts(2)) as [number, number];
      const file = path.join(dir, 'gateway.yaml');
      await writeFile(file, `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: broken
  namespace: default
spec:
  servers:
  - port: {number: ${port}, name: https, protocol: HTTPS}
    hosts: ["a.example.com"]
    tls:
      mode: SIMPLE
      credentialName: no-such-secret
`);
      const res = await runCli(['run', '--config', file, '--admin-port', String(adminPort), '--bind-address', '127.0.0.1',
        '--drain-grace', '0'], { timeoutMs: 20_000 });
      assert.equal(res.timedOut, false);
      assert.equal(res.code, 1, res.stderr);
      assert.match(res.stderr, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}:12:\\d+: error TG3003 Gateway default/broken spec\\.servers\\[0\\]\\.tls\\.credentialName: Secret "no-such-secret" not found`, 'm'));
      assert.match(res.stderr, /nothing was started/);
      assert.equal(await canConnect(port), false, 'the gateway port was not bound');
      assert.equal(await canConnect(adminPort), false, 'the admin port was not bound');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('a port that is already taken is reported and nothing is served', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-busy-'));
    try {
      const adminPort = await freePort();
      const file = path.join(dir, 'gateway.yaml');
      // mainPort is held by the shared gateway.
      await writeFile(file, `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: busy
spec:
  servers:
  - port: {number: ${mainPort}, name: http, protocol: HTTP}
    hosts: ["*"]
`);
      const res = await runCli(['run', '--config', file, '--admin-port', String(adminPort), '--bind-address', '127.0.0.1',
        '--drain-grace', '0'], { timeoutMs: 20_000 });
      assert.equal(res.code, 1, res.stderr);
      assert.match(res.stderr, new RegExp(`cannot bind 127\\.0\\.0\\.1:${mainPort}`));
      assert.equal(await canConnect(adminPort), false, 'the admin port was released');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

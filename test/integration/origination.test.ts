/**
 * TLS origination (DestinationRule trafficPolicy.tls) against real nginx HTTPS upstreams with
 * their own CA: SIMPLE with caCertificates and an sni override, wrong CA and SAN mismatch (503,
 * never plaintext), insecureSkipVerify, MUTUAL from files and from credentialName, TCP
 * origination, no silent upgrade without a DestinationRule, and Istio's "Egress TLS
 * Origination" task through the sidecar's outbound proxy.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePort, freePorts } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl } from '../helpers/exec.js';
import { startNginx, nginxTlsServer, nginxStreamTlsProxy, type Nginx } from '../helpers/nginx.js';
import { startTcpEcho, type TcpServer } from '../helpers/upstreams.js';

let dir: string;
let ca: Ca;
let otherCa: Ca;
let server: KeyPair;
let client: KeyPair;
let nginx: Nginx;
let echo: TcpServer;
let gw: Gateway;
let httpPort: number;
let tcpPort: number;
let pSimple: number, pMtls: number, pStream: number;

function se(name: string, host: string, port: number, target: number, protocol = 'HTTPS'): string {
  return `---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}, namespace: istio-system}
spec:
  hosts: [${host}]
  ports: [{number: ${port}, name: p${port}, protocol: ${protocol}, targetPort: ${target}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`;
}

function dr(name: string, host: string, tls: string): string {
  return `---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ${name}, namespace: istio-system}
spec:
  host: ${host}
  trafficPolicy:
    tls: ${tls}
`;
}

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-orig-'));
  ca = await makeCa(dir, 'ca', '/O=example Inc./CN=example.com');
  otherCa = await makeCa(dir, 'other-ca', '/O=other Inc./CN=other.example');
  server = await makeLeaf(dir, ca, 'server', {
    cn: 'secure.example.com', o: 'upstream', serial: 10,
    sans: ['DNS:secure.example.com', 'DNS:wrongca.example.com', 'DNS:san.example.com', 'DNS:edition.cnn.com', 'DNS:my-nginx.mesh-external.svc.cluster.local', 'DNS:tlsecho.example.com'],
  });
  client = await makeLeaf(dir, ca, 'client', { cn: 'client.example.com', o: 'client organization', serial: 11 });
  [pSimple, pMtls, pStream] = await freePorts(3) as [number, number, number];
  echo = await startTcpEcho();
  nginx = await startNginx({
    http: nginxTlsServer({ port: pSimple, cert: server.cert, key: server.key, serverName: '_' }) + '\n' +
      nginxTlsServer({ port: pMtls, cert: server.cert, key: server.key, serverName: '_', clientCa: ca.cert, verifyClient: 'on' }),
    stream: nginxStreamTlsProxy({ port: pStream, cert: server.cert, key: server.key, upstreamPort: echo.port }),
  });
  [httpPort, tcpPort] = await freePorts(2) as [number, number];
  const routes = [
    ['simple.local', 'secure.example.com'], ['sni.local', 'sni-override.example.com'], ['wrongca.local', 'wrongca.example.com'],
    ['wrongsan.local', 'san.example.com'], ['insecure.local', 'insecure.example.com'], ['mtls-files.local', 'mtls-files.example.com'],
    ['mtls-cred.local', 'mtls-cred.example.com'], ['plain.local', 'plain.example.com'], ['resume.local', 'resume.example.com'],
  ];
  let yaml = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  servers:
  - port: {number: ${httpPort}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${tcpPort}, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes, namespace: istio-system}
spec:
  hosts: ["*"]
  gateways: [egress]
  http:
${routes.map(([h, d]) => `  - match: [{authority: {exact: "${h}"}}]\n    route: [{destination: {host: ${d}, port: {number: 443}}}]`).join('\n')}
  tcp:
  - route: [{destination: {host: tlsecho.example.com, port: {number: 443}}}]
`;
  yaml += se('secure', 'secure.example.com', 443, pSimple) + dr('secure', 'secure.example.com', `{mode: SIMPLE, caCertificates: ${ca.cert}}`);
  yaml += se('sni', 'sni-override.example.com', 443, pSimple) + dr('sni', 'sni-override.example.com', `{mode: SIMPLE, caCertificates: ${ca.cert}, sni: secure.example.com}`);
  yaml += se('wrongca', 'wrongca.example.com', 443, pSimple) + dr('wrongca', 'wrongca.example.com', `{mode: SIMPLE, caCertificates: ${otherCa.cert}}`);
  yaml += se('san', 'san.example.com', 443, pSimple) + dr('san', 'san.example.com', `{mode: SIMPLE, caCertificates: ${ca.cert}, subjectAltNames: [nope.example.com]}`);
  yaml += se('insecure', 'insecure.example.com', 443, pSimple) + dr('insecure', 'insecure.example.com', '{mode: SIMPLE, insecureSkipVerify: true}');
  yaml += se('mtls-files', 'mtls-files.example.com', 443, pMtls) + dr('mtls-files', 'mtls-files.example.com',
    `{mode: MUTUAL, clientCertificate: ${client.cert}, privateKey: ${client.key}, caCertificates: ${ca.cert}, sni: my-nginx.mesh-external.svc.cluster.local}`);
  yaml += se('mtls-cred', 'mtls-cred.example.com', 443, pMtls) + dr('mtls-cred', 'mtls-cred.example.com',
    '{mode: MUTUAL, credentialName: client-credential, sni: my-nginx.mesh-external.svc.cluster.local}');
  yaml += '---\n' + writeSecretYaml('client-credential', 'istio-system', 'Opaque', { 'tls.crt': client.certPem, 'tls.key': client.keyPem, 'ca.crt': ca.certPem });
  yaml += se('plain', 'plain.example.com', 443, pSimple);
  // One request per connection, so the second request needs a new handshake: it should resume.
  yaml += se('resume', 'resume.example.com', 443, pSimple) + `---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: resume, namespace: istio-system}
spec:
  host: resume.example.com
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 1}}
    tls: {mode: SIMPLE, caCertificates: ${ca.cert}, sni: secure.example.com}
`;
  yaml += se('tlsecho', 'tlsecho.example.com', 443, pStream, 'TCP') + dr('tlsecho', 'tlsecho.example.com', `{mode: SIMPLE, caCertificates: ${ca.cert}}`);
  await writeFile(path.join(dir, 'gw.yaml'), yaml);
  gw = await startTlsgate({ configPaths: [path.join(dir, 'gw.yaml')] });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await echo?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const via = (host: string, p = '/') => curl(['-H', `Host: ${host}`, `http://127.0.0.1:${httpPort}${p}`]);

test('SIMPLE with caCertificates: plain HTTP in, TLS out; the upstream saw the destination host as SNI', async () => {
  const r = await via('simple.local', '/x');
  assert.equal(r.status, 200, r.body);
  const j = JSON.parse(r.body);
  assert.equal(j.ssl_server_name, 'secure.example.com');
  assert.match(j.ssl_protocol, /TLSv1\.[23]/);
  assert.equal(j.host, 'simple.local'); // the Host header is kept
});

test('the sni override is what the upstream sees', async () => {
  const r = await via('sni.local');
  assert.equal(r.status, 200, r.body);
  assert.equal(JSON.parse(r.body).ssl_server_name, 'secure.example.com');
});

test('wrong CA and SAN mismatch give 503 with reason upstream_tls_failed; nothing falls back to plaintext', async () => {
  for (const h of ['wrongca.local', 'wrongsan.local']) {
    const r = await via(h);
    assert.equal(r.status, 503, `${h}: ${r.body}`);
    const entry = await gw.waitForAccessLog((e) => e.authority === h && e.status === 503);
    assert.equal(entry.reason, 'upstream_tls_failed');
  }
});

test('upstream TLS sessions are resumed on new connections', async () => {
  // nginx reports "r" for a resumed handshake and "." for a full one.
  let reused = false;
  for (let i = 0; i < 5 && !reused; i++) reused = JSON.parse((await via('resume.local')).body).session_reused === 'r';
  assert.ok(reused, 'a later connection resumed the TLS session');
});

test('insecureSkipVerify passes', async () => {
  const r = await via('insecure.local');
  assert.equal(r.status, 200, r.body);
});

test('MUTUAL from files and from credentialName: nginx (ssl_verify_client on) saw the client subject', async () => {
  for (const h of ['mtls-files.local', 'mtls-cred.local']) {
    const r = await via(h);
    assert.equal(r.status, 200, `${h}: ${r.body}`);
    const j = JSON.parse(r.body);
    assert.equal(j.ssl_client_verify, 'SUCCESS');
    assert.match(j.ssl_client_s_dn, /CN=client\.example\.com/);
    assert.equal(j.ssl_server_name, 'my-nginx.mesh-external.svc.cluster.local');
  }
});

test('no DestinationRule for a TLS port: plaintext goes as plaintext (nginx answers 400)', async () => {
  const r = await via('plain.local');
  assert.equal(r.status, 400);
  assert.match(r.body, /plain HTTP request was sent to HTTPS port/);
});

test('TCP origination: plaintext bytes in, the TLS upstream (nginx stream -> echo) answers', async () => {
  const got = await new Promise<string>((resolve, reject) => {
    const s = net.connect(tcpPort, '127.0.0.1', () => s.write('hello over tls\n'));
    let data = '';
    s.on('data', (d: Buffer) => {
      data += d.toString();
      if (data.includes('\n')) { s.end(); resolve(data); }
    });
    s.on('error', reject);
    s.setTimeout(5000, () => reject(new Error('timeout')));
  });
  assert.equal(got, 'hello over tls\n');
});

test('Istio "Egress TLS Origination" task through the sidecar outbound proxy, with its own YAML', async () => {
  const cfg = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-egress-'));
  try {
    // The task's ServiceEntry and DestinationRule; only resolution/endpoints/targetPort point at the local nginx.
    await writeFile(path.join(cfg, 'task.yaml'), `apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: edition-cnn-com
spec:
  hosts:
  - edition.cnn.com
  ports:
  - number: 80
    name: http-port
    protocol: HTTP
    targetPort: ${pSimple}
  - number: 443
    name: https-port
    protocol: HTTPS
    targetPort: ${pSimple}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: edition-cnn-com
spec:
  host: edition.cnn.com
  trafficPolicy:
    portLevelSettings:
    - port:
        number: 80
      tls:
        mode: SIMPLE # initiates HTTPS when accessing edition.cnn.com
`);
    const outbound = await freePort();
    // The task trusts the public roots; here the local CA joins Node's default store.
    const sidecar = await startTlsgate({
      configPaths: [cfg], args: ['--sidecar', '--outbound-port', String(outbound), '--namespace', 'default'],
      env: { NODE_EXTRA_CA_CERTS: ca.cert },
    });
    try {
      const r = await curl(['-x', `http://127.0.0.1:${outbound}`, 'http://edition.cnn.com/politics']);
      assert.equal(r.status, 200, r.body);
      const j = JSON.parse(r.body);
      assert.equal(j.ssl_server_name, 'edition.cnn.com');
      assert.equal(j.request_uri, '/politics');
      const entry = await sidecar.waitForAccessLog((e) => e.path === '/politics');
      assert.equal(entry.upstreamCluster, 'outbound|80||edition.cnn.com');
    } finally {
      await sidecar.stop();
    }
  } finally {
    await rm(cfg, { recursive: true, force: true });
  }
});

test('/config_dump shows the effective upstream TLS per cluster: mode, SNI, CA fingerprint, SANs; never key material', async () => {
  const { X509Certificate } = await import('node:crypto');
  const dump = await gw.admin('/config_dump');
  assert.equal(dump.status, 200);
  assert.doesNotMatch(dump.body, /PRIVATE KEY/);
  const clusters = JSON.parse(dump.body).clusters as { name: string; upstreamTls: Record<string, unknown> | string }[];
  const c = clusters.find((x) => x.name === 'outbound|443||secure.example.com')!;
  const up = c.upstreamTls as { mode: string; sni: string; verify: string; ca: { fingerprintSha256: string }[] };
  assert.equal(up.mode, 'SIMPLE');
  assert.equal(up.sni, 'secure.example.com');
  assert.equal(up.verify, 'certificate must match the SNI');
  assert.equal(up.ca[0]!.fingerprintSha256, new X509Certificate(ca.certPem).fingerprint256.replace(/:/g, '').toLowerCase());
  const san = clusters.find((x) => x.name === 'outbound|443||san.example.com')!.upstreamTls as { verify: { subjectAltNames: string[] } };
  assert.deepEqual(san.verify.subjectAltNames, ['nope.example.com']);
  const mtls = clusters.find((x) => x.name === 'outbound|443||mtls-cred.example.com')!.upstreamTls as { mode: string; clientCertificate: { subject: string } };
  assert.equal(mtls.mode, 'MUTUAL');
  assert.match(mtls.clientCertificate.subject, /client\.example\.com/);
  const plain = clusters.find((x) => x.name === 'outbound|443||plain.example.com')!;
  assert.equal(plain.upstreamTls, 'plaintext');
});

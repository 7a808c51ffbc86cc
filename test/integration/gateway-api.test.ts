// Kubernetes Gateway API resources served by the real CLI against real peers, written from the
// spec's behaviours: Terminate with two certificates chosen by hostname, Passthrough TLSRoute to
// nginx, RequestRedirect to https, BackendTLSPolicy origination (SNI, CA), ReferenceGrant for a
// certificateRef, and frontend client-certificate validation.
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, opensslSClient, resolveArgs } from '../helpers/exec.js';
import { nginxBinary, nginxTlsServer, startNginx, type Nginx } from '../helpers/nginx.js';
import { freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoReply, type EchoServer } from '../helpers/upstreams.js';

let dir: string;
let gwCa: Ca, clientCa: Ca, otherCa: Ca, upCa: Ca, wrongCa: Ca;
let aCert: KeyPair, bCert: KeyPair, client: KeyPair, stranger: KeyPair, nginxCert: KeyPair, upCert: KeyPair;
let nginx: Nginx | undefined;
let plainEcho: EchoServer, tlsEcho: EchoServer;
let gw: Gateway;
let HTTP: number, HTTPS: number, PASS: number, MTLS: number, nginxPort: number;
const cfgFile = () => path.join(dir, 'config', 'gateway-api.yaml');

const cm = (name: string, ns: string, pem: string) => `apiVersion: v1
kind: ConfigMap
metadata: {name: ${name}, namespace: ${ns}}
data:
  ca.crt: |
${pem.trim().split('\n').map((l) => '    ' + l).join('\n')}
`;
const svc = (name: string, port: number, target: number) => `apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: apps}
spec: {ports: [{name: web, port: ${port}, targetPort: ${target}}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ${name}-1, namespace: apps, labels: {kubernetes.io/service-name: ${name}}}
addressType: IPv4
ports: [{name: web, port: ${target}}]
endpoints: [{addresses: [127.0.0.1]}]
`;

function config(grant: boolean): string {
  return [
    `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: apps}
spec:
  gatewayClassName: tlsgate
  tls:
    frontend:
      perPort:
      - port: ${MTLS}
        tls: {validation: {caCertificateRefs: [{kind: ConfigMap, name: client-ca}]}}
  listeners:
  - {name: http, port: ${HTTP}, protocol: HTTP}
  - name: a
    port: ${HTTPS}
    protocol: HTTPS
    hostname: a.example.com
    tls: {mode: Terminate, certificateRefs: [{name: a-cert}]}
  - name: b
    port: ${HTTPS}
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: b-cert, namespace: certs}]}
  - name: pass
    port: ${PASS}
    protocol: TLS
    hostname: "*.example.net"
    tls: {mode: Passthrough}
  - name: mtls
    port: ${MTLS}
    protocol: HTTPS
    hostname: m.example.com
    tls: {certificateRefs: [{name: a-cert}]}`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: a}, {name: edge, sectionName: b}, {name: edge, sectionName: mtls}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    backendRefs: [{name: secure, port: 443}]
  - matches: [{path: {type: PathPrefix, value: /wrong-ca}}]
    backendRefs: [{name: wrong, port: 443}]
  - backendRefs: [{name: plain, port: 80}]`,
    `apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: pass, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  hostnames: [nginx.example.net]
  rules: [{backendRefs: [{name: nginx, port: 443}]}]`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: secure, namespace: apps}
spec:
  targetRefs: [{group: "", kind: Service, name: secure}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: up-ca}], hostname: backend.internal}`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: wrong, namespace: apps}
spec:
  targetRefs: [{group: "", kind: Service, name: wrong}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: wrong-ca}], hostname: backend.internal}`,
    svc('plain', 80, plainEcho.port), svc('secure', 443, tlsEcho.port), svc('wrong', 443, tlsEcho.port), svc('nginx', 443, nginxPort),
    cm('client-ca', 'apps', clientCa.certPem), cm('up-ca', 'apps', upCa.certPem), cm('wrong-ca', 'apps', wrongCa.certPem),
    writeSecretYaml('a-cert', 'apps', 'kubernetes.io/tls', { 'tls.crt': aCert.certPem, 'tls.key': aCert.keyPem }),
    writeSecretYaml('b-cert', 'certs', 'kubernetes.io/tls', { 'tls.crt': bCert.certPem, 'tls.key': bCert.keyPem }),
    ...(grant ? [`apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: edge-certs, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: apps}]
  to: [{group: "", kind: Secret, name: b-cert}]`] : []),
  ].join('\n---\n') + '\n';
}

before(async () => {
  dir = await certDir();
  gwCa = await makeCa(dir, 'gw-ca', '/O=gateway/CN=gw-ca');
  clientCa = await makeCa(dir, 'client-ca', '/O=clients/CN=client-ca');
  otherCa = await makeCa(dir, 'other-ca', '/O=others/CN=other-ca');
  upCa = await makeCa(dir, 'up-ca', '/O=upstreams/CN=up-ca');
  wrongCa = await makeCa(dir, 'wrong-ca', '/O=nobody/CN=wrong-ca');
  aCert = await makeLeaf(dir, gwCa, 'a', { cn: 'a.example.com', sans: ['DNS:a.example.com', 'DNS:m.example.com'], serial: 1 });
  bCert = await makeLeaf(dir, gwCa, 'b', { cn: 'b.example.com', sans: ['DNS:b.example.com'], serial: 2 });
  client = await makeLeaf(dir, clientCa, 'client', { cn: 'client.example.com', serial: 3, extendedKeyUsage: ['clientAuth'] });
  stranger = await makeLeaf(dir, otherCa, 'stranger', { cn: 'stranger.example.com', serial: 4, extendedKeyUsage: ['clientAuth'] });
  nginxCert = await makeLeaf(dir, upCa, 'nginx', { cn: 'nginx.example.net', sans: ['DNS:nginx.example.net'], serial: 5 });
  upCert = await makeLeaf(dir, upCa, 'backend', { cn: 'backend.internal', sans: ['DNS:backend.internal'], serial: 6 });
  [HTTP, HTTPS, PASS, MTLS, nginxPort] = await freePorts(5) as [number, number, number, number, number];
  plainEcho = await startEchoServer({ name: 'plain' });
  tlsEcho = await startEchoServer({ name: 'tls', tls: { cert: upCert.cert, key: upCert.key } });
  if (nginxBinary()) {
    nginx = await startNginx({ http: nginxTlsServer({ port: nginxPort, cert: nginxCert.cert, key: nginxCert.key, serverName: 'nginx.example.net' }) });
  }
  await mkdir(path.join(dir, 'config'));
  await writeFile(cfgFile(), config(true));
  gw = await startTlsgate({ configPaths: [cfgFile()] });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await plainEcho?.close();
  await tlsEcho?.close();
});

describe('Gateway API end to end', () => {
  it('Terminate: each hostname gets its own certificate (b via a ReferenceGrant)', async () => {
    for (const host of ['a.example.com', 'b.example.com']) {
      const r = await opensslSClient({ port: HTTPS, servername: host, cafile: gwCa.cert });
      assert.ok(r.handshake, `handshake for ${host}`);
      assert.match(r.peerCert?.subject ?? '', new RegExp(`CN = ${host.replace(/\./g, '\\.')}`));
    }
    const res = await curl([...resolveArgs('b.example.com', HTTPS), '--cacert', gwCa.cert, `https://b.example.com:${HTTPS}/hello`]);
    assert.equal(res.status, 200);
    assert.equal((JSON.parse(res.body) as EchoReply).server, 'plain');
  });

  it('HTTPRoute RequestRedirect scheme https answers 302 with an https Location', async () => {
    const res = await curl(['-H', 'Host: shop.example.com', `http://127.0.0.1:${HTTP}/cart?x=1`]);
    assert.equal(res.status, 302);
    assert.equal(res.headers['location'], 'https://shop.example.com/cart?x=1');
  });

  it('Passthrough TLSRoute: the client sees the nginx upstream certificate', { skip: nginxBinary() ? false : 'nginx not installed' }, async () => {
    const r = await opensslSClient({ port: PASS, servername: 'nginx.example.net', cafile: upCa.cert });
    assert.ok(r.handshake);
    assert.match(r.peerCert?.subject ?? '', /CN = nginx\.example\.net/);
    const res = await curl([...resolveArgs('nginx.example.net', PASS), '--cacert', upCa.cert, `https://nginx.example.net:${PASS}/x`]);
    assert.equal(res.status, 200);
    assert.equal((JSON.parse(res.body) as { ssl_server_name: string }).ssl_server_name, 'nginx.example.net');
  });

  it('BackendTLSPolicy: TLS to the backend with the policy hostname as SNI; a wrong CA gives 503', async () => {
    const ok = await curl([...resolveArgs('a.example.com', HTTPS), '--cacert', gwCa.cert, `https://a.example.com:${HTTPS}/secure`]);
    assert.equal(ok.status, 200);
    const reply = JSON.parse(ok.body) as EchoReply;
    assert.equal(reply.server, 'tls');
    assert.equal(reply.sni, 'backend.internal');
    const bad = await curl([...resolveArgs('a.example.com', HTTPS), '--cacert', gwCa.cert, `https://a.example.com:${HTTPS}/wrong-ca`]);
    assert.equal(bad.status, 503);
    assert.ok(tlsEcho.replies.every((x) => x.url !== '/wrong-ca'), 'the request never reached the backend');
  });

  it('frontend validation: a client certificate from the CA gets 200, one from another CA is refused', async () => {
    const base = [...resolveArgs('m.example.com', MTLS), '--cacert', gwCa.cert];
    const good = await curl([...base, '--cert', client.cert, '--key', client.key, `https://m.example.com:${MTLS}/`]);
    assert.equal(good.status, 200);
    const other = await curl([...base, '--cert', stranger.cert, '--key', stranger.key, `https://m.example.com:${MTLS}/`]);
    assert.notEqual(other.status, 200);
    assert.notEqual(other.code, 0);
    const none = await curl([...base, `https://m.example.com:${MTLS}/`]);
    assert.notEqual(none.status, 200);
  });

  it('validate: without the ReferenceGrant listener b is not programmed (RefNotPermitted)', async () => {
    const f = path.join(dir, 'denied.yaml');
    await writeFile(f, config(false));
    const res = await runCli(['validate', '--config', f]);
    assert.equal(res.code, 0, res.stdout);
    assert.match(res.stdout, /warning TG6005 Gateway apps\/edge spec\.listeners\[2\]\.tls\.certificateRefs\[0\]: Secret certs\/b-cert is in another namespace .*\(RefNotPermitted\)/);
    const ok = await runCli(['validate', '--config', cfgFile()]);
    assert.equal(ok.code, 0, ok.stdout);
    assert.doesNotMatch(ok.stdout, /RefNotPermitted/);
    assert.match(ok.stdout, /info TG6011 Gateway apps\/edge spec\.listeners: Accepted, Programmed: 5 of 5 listener\(s\) served/);
  });

  it('/config_dump shows the Gateway API status conditions', async () => {
    const res = await gw.admin('/config_dump');
    assert.equal(res.status, 200);
    assert.match(res.body, /listener b: Programmed=True \(Programmed\)/);
    assert.match(res.body, /parent apps\/edge\/a: Accepted=True \(Accepted\)/);
  });
});

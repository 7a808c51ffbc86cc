/**
 * Gateway API backends end to end: a DestinationRule for a Service originates TLS to a real nginx
 * (and fails closed with the wrong CA), a GRPCRoute carries a gRPC call (node:http2 client,
 * `content-type: application/grpc`, trailers) over HTTP/2 to an HTTP/2 TLS upstream, and
 * `validate` reports HTTP and HTTPS listeners on one port as the spec's ProtocolConflict.
 */
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, run } from '../helpers/exec.js';
import { nginxBinary, nginxTlsServer, startNginx, type Nginx } from '../helpers/nginx.js';
import { freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { grpcFrame, h2Request, type H2Response } from '../helpers/http2-client.js';

let dir: string;
let gwCa: Ca, upCa: Ca, wrongCa: Ca;
let gwCert: KeyPair, nginxCert: KeyPair, grpcCert: KeyPair;
let nginx: Nginx | undefined;
let grpcUp: { port: number; seen: { path: string; headers: http2.IncomingHttpHeaders }[]; close(): Promise<void> };
let gw: Gateway;
let HTTP: number, HTTPS: number, nginxPort: number;

const svc = (name: string, port: number, target: number, appProtocol = '') => `apiVersion: v1
kind: Service
metadata: {name: ${name}, namespace: apps}
spec: {ports: [{name: web, port: ${port}, targetPort: ${target}${appProtocol ? `, appProtocol: ${appProtocol}` : ''}}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ${name}-1, namespace: apps, labels: {kubernetes.io/service-name: ${name}}}
addressType: IPv4
ports: [{name: web, port: ${target}}]
endpoints: [{addresses: [127.0.0.1]}]
`;

/** A gRPC-shaped HTTP/2 TLS server: answers every call with one length-prefixed message and grpc-status 0 in trailers. */
async function startGrpcUpstream(cert: KeyPair): Promise<typeof grpcUp> {
  const seen: { path: string; headers: http2.IncomingHttpHeaders }[] = [];
  const server = http2.createSecureServer({ cert: cert.certPem, key: cert.keyPem, allowHTTP1: false });
  server.on('sessionError', () => {});
  server.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    let size = 0;
    stream.on('data', (c: Buffer) => { size += c.length; });
    stream.on('end', () => {
      if (seen.length < 100) seen.push({ path: String(headers[':path']), headers });
      const payload = Buffer.from(`reply to ${String(headers[':path'])} (${size} bytes in)`);
      const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), payload]);
      frame.writeUInt32BE(payload.length, 1);
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0', 'grpc-message': 'ok' }));
      stream.end(frame);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as { port: number }).port,
    seen,
    close: () => new Promise<void>((r) => { server.close(() => r()); }),
  };
}

/** One gRPC-style call through the gateway: POST with application/grpc, a framed body, trailers read. */
function grpcCall(rpcPath: string, extra: Record<string, string> = {}): Promise<H2Response> {
  return h2Request(`https://127.0.0.1:${HTTPS}`, { ca: gwCa.certPem, servername: 'grpc.example.com' },
    { ':method': 'POST', ':authority': `grpc.example.com:${HTTPS}`, ':path': rpcPath, 'content-type': 'application/grpc', te: 'trailers', ...extra },
    grpcFrame('hello'), { timeoutMs: 10_000, maxChunks: 100 });
}

function config(): string {
  const caMap = (name: string, pem: string) => `apiVersion: v1
kind: ConfigMap
metadata: {name: ${name}, namespace: apps}
data:
  ca.crt: |
${pem.trim().split('\n').map((l) => '    ' + l).join('\n')}
`;
  return [
    `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: apps}
spec:
  gatewayClassName: tlsgate
  listeners:
  - {name: http, port: ${HTTP}, protocol: HTTP}
  - name: https
    port: ${HTTPS}
    protocol: HTTPS
    hostname: grpc.example.com
    tls: {certificateRefs: [{name: gw-cert}]}`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  rules:
  - matches: [{path: {value: /wrong-ca}}]
    backendRefs: [{name: nginx-wrong, port: 443}]
  # The second backend is in another namespace with no ReferenceGrant: its half fails with 500.
  - matches: [{path: {value: /split}}]
    backendRefs: [{name: nginx, port: 443, weight: 1}, {name: nginx, namespace: other, port: 443, weight: 1}]
  - backendRefs: [{name: nginx, port: 443}]`,
    // Istio's way: a DestinationRule for the Service, short host read in the rule's namespace.
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: nginx, namespace: apps}
spec:
  host: nginx
  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: ${JSON.stringify(upCa.cert)}}}`,
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: nginx-wrong, namespace: apps}
spec:
  host: nginx-wrong.apps.svc.cluster.local
  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: ${JSON.stringify(wrongCa.cert)}, sni: nginx.apps.svc.cluster.local}}`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: apps}
spec:
  parentRefs: [{name: edge, sectionName: https}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: say}]}}]
    backendRefs: [{name: grpc, port: 443}]
  - matches: [{method: {type: RegularExpression, service: "echo\\\\..*"}, headers: [{name: x-canary, value: "yes"}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: canary}]}}]
    backendRefs: [{name: grpc, port: 443}]`,
    `apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: grpc, namespace: apps}
spec:
  targetRefs: [{group: "", kind: Service, name: grpc}]
  validation: {caCertificateRefs: [{group: "", kind: ConfigMap, name: up-ca}], hostname: grpc.internal}`,
    svc('nginx', 443, nginxPort), svc('nginx-wrong', 443, nginxPort), svc('grpc', 443, grpcUp.port, 'kubernetes.io/h2c'),
    caMap('up-ca', upCa.certPem),
    writeSecretYaml('gw-cert', 'apps', 'kubernetes.io/tls', { 'tls.crt': gwCert.certPem, 'tls.key': gwCert.keyPem }),
  ].join('\n---\n') + '\n';
}

before(async () => {
  dir = await certDir('tlsgate-gwapi-backends-');
  gwCa = await makeCa(dir, 'gw-ca', '/O=gateway/CN=gw-ca');
  upCa = await makeCa(dir, 'up-ca', '/O=upstreams/CN=up-ca');
  wrongCa = await makeCa(dir, 'wrong-ca', '/O=nobody/CN=wrong-ca');
  gwCert = await makeLeaf(dir, gwCa, 'gw', { cn: 'grpc.example.com', sans: ['DNS:grpc.example.com'], serial: 1 });
  nginxCert = await makeLeaf(dir, upCa, 'nginx', { cn: 'nginx.apps.svc.cluster.local', sans: ['DNS:nginx.apps.svc.cluster.local'], serial: 2 });
  grpcCert = await makeLeaf(dir, upCa, 'grpc', { cn: 'grpc.internal', sans: ['DNS:grpc.internal'], serial: 3 });
  [HTTP, HTTPS, nginxPort] = await freePorts(3) as [number, number, number];
  grpcUp = await startGrpcUpstream(grpcCert);
  if (nginxBinary()) {
    nginx = await startNginx({ http: nginxTlsServer({ port: nginxPort, cert: nginxCert.cert, key: nginxCert.key, serverName: 'nginx.apps.svc.cluster.local' }) });
  }
  await mkdir(path.join(dir, 'config'));
  await writeFile(path.join(dir, 'config', 'gw.yaml'), config());
  gw = await startTlsgate({ configPaths: [path.join(dir, 'config', 'gw.yaml')] });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await grpcUp?.close();
});

describe('Gateway API backends', () => {
  it('a DestinationRule tls SIMPLE for the Service: the HTTPRoute backend gets TLS to nginx (SNI = the Service name)', { skip: nginxBinary() ? false : 'nginx not installed' }, async () => {
    const r = await curl(['-H', 'Host: shop.example.com', `http://127.0.0.1:${HTTP}/cart`]);
    assert.equal(r.status, 200, r.stderr + r.body);
    const seen = JSON.parse(r.body) as { ssl_server_name: string; ssl_protocol: string; request_uri: string };
    assert.equal(seen.ssl_server_name, 'nginx.apps.svc.cluster.local');
    assert.match(seen.ssl_protocol, /^TLSv1\.[23]$/);
    assert.equal(seen.request_uri, '/cart');
  });

  it('the same with a CA that did not sign nginx: 503, never plaintext', { skip: nginxBinary() ? false : 'nginx not installed' }, async () => {
    const r = await curl(['-H', 'Host: shop.example.com', `http://127.0.0.1:${HTTP}/wrong-ca`]);
    assert.equal(r.status, 503, r.body);
  });

  it('an unresolved backendRef keeps its weight: its share of requests gets 500, the rest reach the valid backend', { skip: nginxBinary() ? false : 'nginx not installed' }, async () => {
    // One curl, 60 requests on one connection; the split is random, 1:1.
    // curl's -o applies to one URL: one per URL, so only the status codes are printed.
    const urls = Array.from({ length: 60 }, () => ['-o', '/dev/null', `http://127.0.0.1:${HTTP}/split`]).flat();
    const r = await run('curl', ['-s', '-w', '%{http_code}\\n', '-H', 'Host: shop.example.com', ...urls]);
    const codes = r.stdout.trim().split('\n');
    assert.equal(codes.length, 60, r.stdout + r.stderr);
    const ok = codes.filter((c) => c === '200').length, failed = codes.filter((c) => c === '500').length;
    assert.equal(ok + failed, 60, `only 200 and 500 expected: ${codes.join(',')}`);
    assert.ok(ok > 0 && failed > 0, `both shares served: ${ok} x 200, ${failed} x 500`);
    // Access-log lines reach us asynchronously: wait (bounded) until every 500 is in.
    const invalidLogged = () => gw.accessLogs().filter((e) => e.path === '/split' && e.reason === 'invalid_backend').length;
    for (const deadline = Date.now() + 5_000; invalidLogged() < failed && Date.now() < deadline;) await new Promise((res) => setTimeout(res, 20));
    const split = gw.accessLogs().filter((e) => e.path === '/split');
    assert.equal(split.filter((e) => e.reason === 'invalid_backend').length, failed, JSON.stringify(split.slice(0, 3)));
  });

  it('GRPCRoute: a gRPC call over HTTP/2 reaches the HTTP/2 TLS upstream by service/method', async () => {
    const r = await grpcCall('/echo.Echo/Say');
    assert.equal(r.status, 200);
    assert.equal(r.headers['content-type'], 'application/grpc');
    assert.equal(r.body.subarray(5).toString(), 'reply to /echo.Echo/Say (10 bytes in)');
    const last = grpcUp.seen.at(-1)!;
    assert.equal(last.path, '/echo.Echo/Say');
    assert.equal(last.headers['x-route'], 'say');
    assert.equal(last.headers['content-type'], 'application/grpc');
  });

  it('GRPCRoute: a regex service match with a header match; a method no rule matches is not routed', async () => {
    const canary = await grpcCall('/echo.Echo/Shout', { 'x-canary': 'yes' });
    assert.equal(canary.status, 200);
    assert.equal(grpcUp.seen.at(-1)!.headers['x-route'], 'canary');
    const before = grpcUp.seen.length;
    const none = await grpcCall('/echo.Echo/Shout');
    assert.equal(none.status, 404);
    assert.equal(grpcUp.seen.length, before, 'the upstream saw nothing');
  });

  // gRPC's status travels in HTTP/2 trailers: they must cross the proxy.
  it('GRPCRoute: the upstream grpc-status trailer reaches the client', async () => {
    const r = await grpcCall('/echo.Echo/Say');
    assert.equal(r.status, 200);
    assert.equal(r.trailers['grpc-status'], '0');
    assert.equal(r.trailers['grpc-message'], 'ok');
  });

  it('validate: HTTP and HTTPS listeners on one port are both Conflicted (ProtocolConflict), the rest is served', async () => {
    const f = path.join(dir, 'conflict.yaml');
    await writeFile(f, `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: apps}
spec:
  gatewayClassName: tlsgate
  listeners:
  - {name: web, port: 8443, protocol: HTTP}
  - {name: secure, port: 8443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: gw-cert}]}}
  - {name: other, port: 8080, protocol: HTTP}
---
${writeSecretYaml('gw-cert', 'apps', 'kubernetes.io/tls', { 'tls.crt': gwCert.certPem, 'tls.key': gwCert.keyPem })}`);
    const r = await runCli(['validate', '--config', f]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /warning TG6003 Gateway apps\/edge spec\.listeners\[0\]: port 8443 is also claimed by apps\/edge listener secure \(HTTPS a\.example\.com\): the listener is Conflicted, neither accepted nor programmed \(ProtocolConflict\)/);
    assert.match(r.stdout, /warning TG6003 Gateway apps\/edge spec\.listeners\[1\]: port 8443 is also claimed by apps\/edge listener web \(HTTP\): the listener is Conflicted, neither accepted nor programmed \(ProtocolConflict\)/);
    assert.match(r.stdout, /info TG6011 Gateway apps\/edge spec\.listeners: Accepted, Programmed: 1 of 3 listener\(s\) served/);
  });
});

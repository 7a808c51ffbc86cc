/**
 * Istio's "Secure Gateways" task (istio.io, tasks/traffic-management/ingress/secure-ingress) run
 * end to end against the real `tlsgate run`: the task's certificates (made with its openssl
 * commands), its Gateway and VirtualService YAML unchanged except for the port, the Secret
 * written as a v1 Secret manifest, and `httpbin` / `helloworld` played by Node echo servers that
 * a ServiceEntry makes resolvable as `httpbin:8000` and `helloworld:5000` in namespace default.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { certDir, certSha256Hex, makeCa, makeLeaf, writeSecretYaml, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, opensslSClient, resolveArgs } from '../helpers/exec.js';
import { freePort } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';

let certs: string;
let ca: Ca;
let httpbinCert: KeyPair;
let helloworldCert: KeyPair;
let clientCert: KeyPair;
let httpbin: EchoServer;
let helloworld: EchoServer;
const tempDirs: string[] = [];
const gateways: Gateway[] = [];

before(async () => {
  certs = await certDir();
  // example_certs1: the task's CA, httpbin (-set_serial 0), helloworld and client (-set_serial 1).
  ca = await makeCa(certs, 'example.com', '/O=example Inc./CN=example.com');
  [httpbinCert, helloworldCert, clientCert] = await Promise.all([
    makeLeaf(certs, ca, 'httpbin.example.com', { cn: 'httpbin.example.com', o: 'httpbin organization', serial: 0 }),
    makeLeaf(certs, ca, 'helloworld.example.com', { cn: 'helloworld.example.com', o: 'helloworld organization', serial: 1 }),
    makeLeaf(certs, ca, 'client.example.com', { cn: 'client.example.com', o: 'client organization', serial: 1 }),
  ]);
  httpbin = await startEchoServer({ name: 'httpbin' });
  helloworld = await startEchoServer({ name: 'helloworld' });
});

after(async () => {
  await Promise.all(gateways.map((g) => g.stop()));
  await httpbin?.close();
  await helloworld?.close();
  await Promise.all([certs, ...tempDirs].filter(Boolean).map((d) => rm(d, { recursive: true, force: true })));
});

/** ServiceEntries standing in for the Kubernetes Services `httpbin:8000` and `helloworld:5000`. */
function services(): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
  namespace: default
spec:
  hosts:
  - httpbin.default.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 8000
    name: http
    protocol: HTTP
    targetPort: ${httpbin.port}
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: helloworld
  namespace: default
spec:
  hosts:
  - helloworld.default.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 5000
    name: http
    protocol: HTTP
    targetPort: ${helloworld.port}
  endpoints:
  - address: 127.0.0.1
`;
}

const HTTPBIN_VS = `apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
`;

/** Writes the documents as separate files of a fresh config directory and starts tlsgate on it. */
async function serve(files: Record<string, string>): Promise<Gateway> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-secure-gw-'));
  tempDirs.push(dir);
  for (const [name, text] of Object.entries(files)) await writeFile(path.join(dir, name), text);
  const gw = await startTlsgate({ configPaths: [dir] });
  gateways.push(gw);
  return gw;
}

async function stop(gw: Gateway): Promise<void> {
  const code = await gw.stop();
  assert.equal(code, 0, `tlsgate did not stop cleanly after SIGTERM (exit ${code}):\n${gw.logs().slice(-20).join('\n')}`);
}

function teapotCurl(port: number, extra: string[] = []): Promise<Awaited<ReturnType<typeof curl>>> {
  return curl(['-HHost:httpbin.example.com', ...resolveArgs('httpbin.example.com', port), '--cacert', ca.cert, ...extra,
    `https://httpbin.example.com:${port}/status/418`]);
}

describe('Secure Gateways task', () => {
  test('SIMPLE TLS for a single host: HTTP/2 418 with the teapot, verified against the example.com CA', async () => {
    const port = await freePort();
    const gw = await serve({
      'secret.yaml': writeSecretYaml('httpbin-credential', 'istio-system', 'kubernetes.io/tls', {
        'tls.key': httpbinCert.keyPem, 'tls.crt': httpbinCert.certPem,
      }),
      'gateway.yaml': `apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: ${port}
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential # must be the same as secret
    hosts:
    - httpbin.example.com
`,
      'virtualservice.yaml': HTTPBIN_VS,
      'services.yaml': services(),
    });
    try {
      const before = httpbin.requests;
      // A client-sent XFCC never reaches the upstream over a connection without a client certificate.
      const res = await teapotCurl(port, ['-H', 'x-forwarded-client-cert: By=spiffe://evil;Hash=00']);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(res.status, 418);
      assert.equal(res.httpVersion, '2');
      assert.match(res.body, /-=\[ I'm a teapot \]=-/);
      assert.equal(res.info.ssl_verify_result, 0);
      assert.equal(httpbin.requests, before + 1);
      const seen = httpbin.replies.at(-1)!;
      assert.equal(seen.url, '/status/418');
      assert.equal(seen.headers.host, 'httpbin.example.com');
      assert.equal(seen.headers['x-forwarded-client-cert'], undefined);
      assert.equal(seen.headers['x-forwarded-proto'], 'https');

      // The server does not ask for a client certificate in SIMPLE mode and presents the httpbin cert.
      const s = await opensslSClient({ port, servername: 'httpbin.example.com', cafile: ca.cert });
      assert.ok(s.handshake, s.stderr);
      assert.equal(s.clientCertRequested, false);
      assert.equal(s.peerCert?.subject, 'CN = httpbin.example.com, O = httpbin organization');
      assert.equal(s.verifyCode, 0);

      // Paths the VirtualService does not route get 404 from the gateway, not from httpbin.
      const miss = await curl([...resolveArgs('httpbin.example.com', port), '--cacert', ca.cert, `https://httpbin.example.com:${port}/headers`]);
      assert.equal(miss.status, 404);
      assert.equal(httpbin.requests, before + 1);

      const entry = await gw.waitForAccessLog((e) => e.path === '/status/418');
      assert.equal(entry.status, 418);
      assert.equal(entry.reason, 'ok');
      assert.equal(entry.sni, 'httpbin.example.com');
      assert.equal(entry.protocol, 'HTTP/2');
      assert.equal(entry.upstreamCluster, 'outbound|8000||httpbin.default.svc.cluster.local');
    } finally {
      await stop(gw);
    }
  });

  test('multiple hosts on one port: SNI selects each host\'s certificate', async () => {
    const port = await freePort();
    const gw = await serve({
      'secrets.yaml': [
        writeSecretYaml('httpbin-credential', 'istio-system', 'kubernetes.io/tls', { 'tls.key': httpbinCert.keyPem, 'tls.crt': httpbinCert.certPem }),
        writeSecretYaml('helloworld-credential', 'istio-system', 'kubernetes.io/tls', { 'tls.key': helloworldCert.keyPem, 'tls.crt': helloworldCert.certPem }),
      ].join('---\n'),
      'gateway.yaml': `apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: ${port}
      name: https-httpbin
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
  - port:
      number: ${port}
      name: https-helloworld
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: helloworld-credential
    hosts:
    - helloworld.example.com
`,
      'virtualservices.yaml': `${HTTPBIN_VS}---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - helloworld.example.com
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        exact: /hello
    route:
    - destination:
        host: helloworld
        port:
          number: 5000
`,
      'services.yaml': services(),
    });
    try {
      const hello = await curl(['-HHost:helloworld.example.com', ...resolveArgs('helloworld.example.com', port), '--cacert', ca.cert,
        `https://helloworld.example.com:${port}/hello`]);
      assert.equal(hello.code, 0, hello.stderr);
      assert.equal(hello.status, 200);
      assert.equal(hello.httpVersion, '2');
      assert.equal(hello.headers['x-echo-server'], 'helloworld');
      assert.equal((JSON.parse(hello.body) as { url: string }).url, '/hello');

      const teapot = await teapotCurl(port);
      assert.equal(teapot.status, 418, teapot.stderr);
      assert.match(teapot.body, /teapot/);
      assert.equal(teapot.headers['x-echo-server'], 'httpbin');

      const [a, b] = await Promise.all([
        opensslSClient({ port, servername: 'httpbin.example.com', cafile: ca.cert }),
        opensslSClient({ port, servername: 'helloworld.example.com', cafile: ca.cert }),
      ]);
      assert.equal(a.peerCert?.subject, 'CN = httpbin.example.com, O = httpbin organization', a.stderr);
      assert.equal(b.peerCert?.subject, 'CN = helloworld.example.com, O = helloworld organization', b.stderr);
      assert.equal(parseInt(a.peerCert?.x509.serialNumber ?? '', 16), 0); // -set_serial 0
      assert.equal(parseInt(b.peerCert?.x509.serialNumber ?? '', 16), 1);
      assert.equal(a.verifyCode, 0);
      assert.equal(b.verifyCode, 0);

      // /hello is only routed for helloworld; httpbin's VirtualService has no such path.
      const wrongHost = await curl([...resolveArgs('httpbin.example.com', port), '--cacert', ca.cert, `https://httpbin.example.com:${port}/hello`]);
      assert.equal(wrongHost.status, 404);
    } finally {
      await stop(gw);
    }
  });

  test('MUTUAL TLS with a generic Secret (tls.key, tls.crt, ca.crt): no client cert is refused, the client cert gets 418 and XFCC', async () => {
    const port = await freePort();
    const gw = await serve({
      // kubectl create secret generic httpbin-credential --from-file=tls.key=… --from-file=tls.crt=… --from-file=ca.crt=…
      'secret.yaml': writeSecretYaml('httpbin-credential', 'istio-system', 'Opaque', {
        'tls.key': httpbinCert.keyPem, 'tls.crt': httpbinCert.certPem, 'ca.crt': ca.certPem,
      }),
      'gateway.yaml': `apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: ${port}
      name: https
      protocol: HTTPS
    tls:
      mode: MUTUAL
      credentialName: httpbin-credential # must be the same as secret
    hosts:
    - httpbin.example.com
`,
      'virtualservice.yaml': HTTPBIN_VS,
      'services.yaml': services(),
    });
    try {
      const before = httpbin.requests;
      const refused = await teapotCurl(port);
      assert.notEqual(refused.code, 0);
      assert.equal(refused.status, 0);

      // TLS 1.3: the server's alert comes after the client's Finished; keep reading to see it.
      const s = await opensslSClient({ port, servername: 'httpbin.example.com', cafile: ca.cert, waitForClose: true });
      assert.ok(s.clientCertRequested, s.stdout);
      assert.equal(s.protocol, 'TLSv1.3');
      assert.equal(s.alertNumber, 116, s.stderr);
      assert.equal(s.alertDescription, 'certificate required');
      // The server advertises the example.com CA as acceptable issuer.
      assert.match(s.stdout, /Acceptable client certificate CA names\n.*CN ?= ?example\.com/);
      const refusal = await gw.waitForAccessLog((e) => e.reason === 'client_cert_required');
      assert.equal(refusal.sni, 'httpbin.example.com');

      const ok = await teapotCurl(port, ['--cert', clientCert.cert, '--key', clientCert.key,
        '-H', 'x-forwarded-client-cert: By=spiffe://evil;Hash=00;Subject="CN=admin"']);
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.status, 418);
      assert.equal(ok.httpVersion, '2');
      assert.match(ok.body, /teapot/);
      assert.equal(httpbin.requests, before + 1);

      // SANITIZE_SET: the forged value is gone, ours describes the client certificate.
      const xfcc = httpbin.replies.at(-1)!.headers['x-forwarded-client-cert'];
      assert.equal(typeof xfcc, 'string');
      assert.doesNotMatch(xfcc as string, /evil|CN=admin/);
      assert.equal(xfcc, [
        `Hash=${certSha256Hex(clientCert.certPem)}`,
        `Cert="${encodeURIComponent(clientCert.certPem)}"`,
        // RFC 2253 order (last RDN first), as Envoy prints it: the task's -subj is /CN=…/O=….
        'Subject="O=client organization,CN=client.example.com"',
        'URI=',
      ].join(';'));

      const entry = await gw.waitForAccessLog((e) => e.path === '/status/418' && e.status === 418);
      assert.equal(entry.peerSubject, 'O=client organization,CN=client.example.com');
      assert.equal(entry.tlsVersion, 'TLSv1.3');

      // A client certificate from another CA is refused as well.
      const otherDir = path.join(certs, 'example_certs2');
      const otherCa = await makeCa(otherDir, 'example.com', '/O=example Inc./CN=example.com');
      const stranger = await makeLeaf(otherDir, otherCa, 'client.example.com', { cn: 'client.example.com', o: 'client organization', serial: 1 });
      const foreign = await teapotCurl(port, ['--cert', stranger.cert, '--key', stranger.key]);
      assert.notEqual(foreign.code, 0);
      assert.equal(foreign.status, 0);
      assert.equal(httpbin.requests, before + 1);
    } finally {
      await stop(gw);
    }
  });
});

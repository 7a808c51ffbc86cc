/**
 * Double encryption, Istio's egress-gateway pattern: the app's own TLS to edition.cnn.com leaves
 * through its sidecar as a CONNECT tunnel, is routed by SNI to the egress gateway over
 * ISTIO_MUTUAL (TLS inside mTLS), and the egress gateway terminates only the mTLS and passes the
 * app's TLS on to "edition.cnn.com": a local nginx with its own CA. Real processes: the mesh CA
 * directory, two tlsgate processes, nginx, curl and openssl s_client.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, opensslSClient, run } from '../helpers/exec.js';
import { nginxTlsServer, startNginx, type Nginx } from '../helpers/nginx.js';
import { freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';

const CLIENT_ID = 'spiffe://cluster.local/ns/default/sa/sleep';
const EGRESS_ID = 'spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account';

/** The Istio task's resources, with the egress gateway's port G instead of 443 (one machine, many ports). */
function config(g: number, nginxPort: number): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: default}
spec:
  hosts: [edition.cnn.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: ${nginxPort}}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  hosts: [istio-egressgateway.istio-system.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: ${g}, name: tls, protocol: TLS}]
  endpoints:
  - address: 127.0.0.1
    labels: {istio: egressgateway, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egressgateway, namespace: default}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: ${g}, name: tls, protocol: TLS}
    hosts: [edition.cnn.com]
    tls: {mode: ISTIO_MUTUAL}
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
      - port: {number: ${g}}
        tls: {mode: ISTIO_MUTUAL, sni: edition.cnn.com}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: direct-cnn-through-egress-gateway, namespace: default}
spec:
  hosts: [edition.cnn.com]
  gateways: [mesh, istio-egressgateway]
  tls:
  - match:
    - gateways: [mesh]
      port: 443
      sniHosts: [edition.cnn.com]
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port: {number: ${g}}
  tcp:
  - match:
    - gateways: [istio-egressgateway]
      port: ${g}
    route:
    - destination:
        host: edition.cnn.com
        port: {number: 443}
      weight: 100
`;
}

describe('double encryption: app TLS inside mesh mTLS through an egress gateway', () => {
  let dir: string;
  let caDir: string;
  let cnnCa: Ca;
  let cnnLeaf: KeyPair;
  let nginx: Nginx;
  let egress: Gateway;
  let sidecar: Gateway;
  let g: number, outbound: number, nginxPort: number;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-double-'));
    caDir = path.join(dir, 'ca');
    const init = await runCli(['ca', 'init', '--dir', caDir]);
    assert.equal(init.code, 0, init.stderr);
    [g, outbound, nginxPort] = await freePorts(3);
    cnnCa = await makeCa(path.join(dir, 'cnn'), 'cnn-ca', '/O=cnn test root/CN=cnn test root', { ec: true });
    cnnLeaf = await makeLeaf(path.join(dir, 'cnn'), cnnCa, 'edition.cnn.com', { cn: 'edition.cnn.com', ec: true, serial: 443, sans: ['DNS:edition.cnn.com'] });
    nginx = await startNginx({ http: nginxTlsServer({ port: nginxPort!, cert: cnnLeaf.cert, key: cnnLeaf.key, serverName: 'edition.cnn.com' }) });
    const file = path.join(dir, 'mesh.yaml');
    await writeFile(file, config(g!, nginxPort!));
    [egress, sidecar] = await Promise.all([
      startTlsgate({ configPaths: [file], args: ['--labels', 'istio=egressgateway', '--namespace', 'istio-system',
        '--service-account', 'istio-egressgateway-service-account', '--ca-dir', caDir] }),
      startTlsgate({ configPaths: [file], args: ['--sidecar', '--namespace', 'default', '--service-account', 'sleep',
        '--ca-dir', caDir, '--outbound-port', String(outbound)] }),
    ]);
  });

  after(async () => {
    await sidecar?.stop();
    await egress?.stop();
    await nginx?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('curl with HTTPS_PROXY reaches nginx over its own TLS session, carried inside mTLS by the egress gateway', async () => {
    const r = await curl(['-x', `http://127.0.0.1:${outbound}`, '--cacert', cnnCa.cert, 'https://edition.cnn.com/politics']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.status, 200);
    // nginx saw the app's ClientHello (SNI) and the app's request.
    const seen = JSON.parse(r.body) as Record<string, string>;
    assert.equal(seen['ssl_server_name'], 'edition.cnn.com');
    assert.equal(seen['request_uri'], '/politics');
    assert.equal(seen['host'], 'edition.cnn.com');
    // curl verified nginx's certificate against nginx's own CA: the TLS session it used ends at
    // nginx, so neither proxy ever held that key (their certificates come from the mesh CA).
    assert.equal(r.info['ssl_verify_result'], 0);

    // The sidecar routed the tunnel by SNI to the egress gateway subset.
    const out = await sidecar.waitForAccessLog((e) => e['kind'] === 'tcp' || e['method'] === 'CONNECT');
    assert.match(JSON.stringify(out), /istio-egressgateway/);

    // The egress gateway terminated mTLS from the sidecar (its SPIFFE ID logged) with the
    // DestinationRule's SNI, and passed the inner bytes to edition.cnn.com.
    const entry = await egress.waitForAccessLog((e) => e['kind'] === 'tcp');
    assert.equal(entry['peerUriSan'], CLIENT_ID);
    assert.equal(entry['sni'], 'edition.cnn.com');
    assert.equal(entry['upstream'], `127.0.0.1:${nginxPort}`);
    assert.ok(Number(entry['upstreamBytesReceived']) > 0);
    assert.match(await nginx.accessLog(), /GET \/politics HTTP\/1\.1" 200/);
  });

  it('the certificate chain curl saw is nginx\'s, not a mesh certificate', async () => {
    const r = await run('curl', ['-sS', '-o', '/dev/null', '-x', `http://127.0.0.1:${outbound}`, '--cacert', cnnCa.cert,
      '-w', '%{certs}', 'https://edition.cnn.com/'], { timeoutMs: 20_000 });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Subject:\s*CN\s*=\s*edition\.cnn\.com/);
    assert.match(r.stdout, /Issuer:\s*O\s*=\s*cnn test root/);
    assert.doesNotMatch(r.stdout, /spiffe:/);
  });

  it('the egress gateway presents its own SPIFFE identity on port G and demands a mesh client certificate', async () => {
    const s = await opensslSClient({ port: g, servername: 'edition.cnn.com', cafile: path.join(caDir, 'root-cert.pem'), waitForClose: true });
    assert.equal(s.peerCert?.x509.subjectAltName, `URI:${EGRESS_ID}`);
    assert.equal(s.verifyCode, 0);
    assert.ok(s.clientCertRequested);
  });

  it('a client without a mesh certificate gets nothing through the egress gateway', async () => {
    const before = (await nginx.accessLog()).split('\n').filter((l) => l !== '').length;
    // No certificate at all.
    const none = await opensslSClient({ port: g, servername: 'edition.cnn.com', waitForClose: true,
      input: 'GET /politics HTTP/1.1\r\nHost: edition.cnn.com\r\n\r\n' });
    assert.ok(none.alertReceived || /unexpected eof|errno=104/.test(none.stderr), none.stderr);
    // A self-signed certificate claiming the client's SPIFFE ID.
    const rogueCa = await makeCa(path.join(dir, 'rogue'), 'rogue', '/O=rogue/CN=rogue', { ec: true });
    const rogue = await makeLeaf(path.join(dir, 'rogue'), rogueCa, 'sleep', { cn: 'sleep', ec: true, serial: 9, sans: [`URI:${CLIENT_ID}`] });
    const forged = await opensslSClient({ port: g, servername: 'edition.cnn.com', cert: rogue.cert, key: rogue.key, waitForClose: true,
      input: 'GET /politics HTTP/1.1\r\nHost: edition.cnn.com\r\n\r\n' });
    assert.ok(forged.alertReceived || /unexpected eof|errno=104/.test(forged.stderr), forged.stderr);
    // curl straight at the gateway port, as if it were edition.cnn.com.
    const direct = await curl(['--resolve', `edition.cnn.com:${g}:127.0.0.1`, '-k', `https://edition.cnn.com:${g}/politics`], { timeoutMs: 5_000 });
    assert.notEqual(direct.code, 0);
    assert.equal(direct.status, 0);
    const afterCount = (await nginx.accessLog()).split('\n').filter((l) => l !== '').length;
    assert.equal(afterCount, before, 'nginx saw no request from them');
    const metrics = (await egress.admin('/stats/prometheus')).body;
    assert.match(metrics, /tls_handshakes_total\{[^}]*reason="client_cert_(required|rejected)",result="failure"\} [1-9]/);
  });
});

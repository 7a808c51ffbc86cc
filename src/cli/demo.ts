/**
 * `npm start` (`tlsgate demo`): every TLS mode tlsgate implements, running at once on 127.0.0.1,
 * from the plain Istio YAML in examples/demo/, with a live dashboard.
 *
 * First run generates certificates into examples/demo/certs/ (src/pki/mint.ts) and a mesh CA
 * into .demo/mesh-ca (src/mesh/ca.ts). Then it starts three built-in upstreams and four proxies in this process:
 *
 *   upstreams   :18080 plain HTTP echo app (behind the httpbin sidecar)
 *               :18443 TLS app with its own CA (tls-app.demo.local)
 *               :18444 TLS app that requires a client certificate (secure-app.demo.local)
 *   proxies     ingress gateway   :8080 HTTP, :8443 SIMPLE + MUTUAL + PASSTHROUGH by SNI, admin :<admin-port>
 *               sidecar default/sleep   outbound proxy :15001
 *               sidecar foo/httpbin     inbound mTLS :15006 -> :18080 (outbound :15101)
 *               egress gateway    :15443 ISTIO_MUTUAL
 *
 * The dashboard on the ingress gateway's admin port shows all four. Ctrl-C stops everything.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import type * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';
import type { TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { createCa, issueCert } from '../pki/mint.js';
import { initCaDir } from '../mesh/ca.js';
import { setProxyLabel } from '../admin/server.js';
import { startGateway, type RunOptions, type RunningGateway } from './run.js';
import { startEchoUpstream } from './echo-upstream.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** The demo's fixed ports (docs/dashboard.md lists them). */
export const DEMO_PORTS = {
  ingressHttp: 8080, ingressHttps: 8443, sleepOutbound: 15001, httpbinInbound: 15006, httpbinOutbound: 15101,
  egressGateway: 15443, echoApp: 18080, tlsApp: 18443, secureApp: 18444,
} as const;

async function writeLeaf(dir: string, ca: Awaited<ReturnType<typeof createCa>>, host: string): Promise<void> {
  const c = await issueCert(ca, { commonName: host, dnsNames: [host], server: true, keyType: 'EC' });
  writeFileSync(path.join(dir, `${host}.crt`), c.chainPem ?? c.certPem);
  writeFileSync(path.join(dir, `${host}.key`), c.keyPem, { mode: 0o600 });
}

/** Generates what the YAML refers to, once; delete the directory to start over. */
async function ensureCerts(dir: string, meshCa: string): Promise<void> {
  if (!existsSync(path.join(meshCa, 'ca.json'))) await initCaDir(meshCa, { force: true });
  if (existsSync(path.join(dir, 'tls-app.demo.local.key'))) return;
  mkdirSync(dir, { recursive: true });
  // The demo CA: the ingress gateway's server certificates, the client certificate, the secure app.
  const ca = await createCa({ commonName: 'tlsgate demo CA', organization: 'tlsgate demo', keyType: 'EC' });
  writeFileSync(path.join(dir, 'ca.crt'), ca.certPem);
  for (const host of ['app.example.local', 'mtls.example.local', 'secure-app.demo.local']) await writeLeaf(dir, ca, host);
  const client = await issueCert(ca, { commonName: 'client.example.local', organization: 'demo client', client: true, keyType: 'EC' });
  writeFileSync(path.join(dir, 'client.crt'), client.certPem);
  writeFileSync(path.join(dir, 'client.key'), client.keyPem, { mode: 0o600 });
  // The TLS app's own CA: the gateway never holds it; only the client trusts it.
  const ext = await createCa({ commonName: 'tls-app external CA', organization: 'somewhere else', keyType: 'EC' });
  writeFileSync(path.join(dir, 'tls-app-ca.crt'), ext.certPem);
  await writeLeaf(dir, ext, 'tls-app.demo.local');
}

/** An HTTPS echo app: says which name it was asked for and which client certificate it saw. */
function startTlsApp(name: string, port: number, certs: string, requireClientCert: boolean): Promise<https.Server> {
  const read = (f: string) => import('node:fs').then((fs) => fs.readFileSync(path.join(certs, f)));
  return Promise.all([read(`${name}.crt`), read(`${name}.key`), read('ca.crt')]).then(([cert, key, ca]) => new Promise((resolve, reject) => {
    const server = https.createServer({ cert, key, ...(requireClientCert ? { ca, requestCert: true, rejectUnauthorized: true } : {}) }, (req, res) => {
      const sock = req.socket as TLSSocket;
      const peer = sock.getPeerCertificate();
      const body = JSON.stringify({
        app: name, method: req.method, url: req.url, sni: (sock as TLSSocket & { servername?: string }).servername ?? null,
        tlsVersion: sock.getProtocol(), clientCertificate: peer && peer.subject ? peer.subject : null, headers: req.headers,
      }, null, 2) + '\n';
      req.resume();
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
    });
    server.on('clientError', (_e, s) => s.destroy());
    server.on('tlsClientError', () => { /* a client without a certificate: that is the point of this app */ });
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  }));
}

interface ProxySpec {
  label: string;
  opts: Partial<RunOptions>;
}

export async function demoCommand(opts: { adminPort: number }): Promise<number> {
  const dir = path.join(ROOT, 'examples', 'demo');
  const certs = path.join(dir, 'certs');
  // Outside the config directory (its ca.json is not a resource) and gitignored: it holds the root key.
  const meshCa = path.join(ROOT, '.demo', 'mesh-ca');
  const logs = path.join(ROOT, '.demo');
  // The mesh CA signs the four proxies' SPIFFE workload certificates.
  mkdirSync(logs, { recursive: true });
  await ensureCerts(certs, meshCa);

  const servers: http.Server[] = [];
  const gateways: RunningGateway[] = [];
  let stopping: Promise<void> | undefined;
  const stopAll = () => (stopping ??= (async () => {
    await Promise.all(gateways.map((g) => g.stop()));
    for (const s of servers) {
      s.closeAllConnections();
      await new Promise<void>((r) => s.close(() => r()));
    }
  })());

  try {
    servers.push(await startEchoUpstream(DEMO_PORTS.echoApp));
    servers.push(await startTlsApp('tls-app.demo.local', DEMO_PORTS.tlsApp, certs, false));
    servers.push(await startTlsApp('secure-app.demo.local', DEMO_PORTS.secureApp, certs, true));
  } catch (e) {
    process.stderr.write(`tlsgate demo: cannot start the demo upstreams: ${(e as Error).message}\n(the demo uses fixed ports on 127.0.0.1: ${Object.values(DEMO_PORTS).join(', ')})\n`);
    await stopAll();
    return 1;
  }

  const base: RunOptions = {
    config: [dir], adminPort: 0, adminAddress: '127.0.0.1', bindAddress: '127.0.0.1', namespace: 'istio-system',
    accessLog: 'off', logLevel: 'warn', drainGraceMs: 0, drainTimeoutMs: 1000, clientHelloTimeoutMs: 15000, watch: true, caDir: meshCa,
  };
  const specs: ProxySpec[] = [
    { label: 'ingress gateway', opts: { adminPort: opts.adminPort, labels: 'istio=ingressgateway', serviceAccount: 'istio-ingressgateway-service-account' } },
    { label: 'egress gateway', opts: { labels: 'istio=egressgateway', serviceAccount: 'istio-egressgateway-service-account' } },
    { label: 'sidecar foo/httpbin', opts: { sidecar: true, namespace: 'foo', serviceAccount: 'httpbin', labels: 'app=httpbin', inboundPort: DEMO_PORTS.httpbinInbound, appPort: DEMO_PORTS.echoApp, outboundPort: DEMO_PORTS.httpbinOutbound } },
    { label: 'sidecar default/sleep', opts: { sidecar: true, namespace: 'default', serviceAccount: 'sleep', labels: 'app=sleep', outboundPort: DEMO_PORTS.sleepOutbound } },
  ];
  for (const s of specs) {
    const file = path.join(logs, `${s.label.replace(/[^a-z0-9]+/gi, '-')}.access.log`);
    const gw = await startGateway({ ...base, accessLog: file, ...s.opts });
    if (!gw) {
      process.stderr.write(`tlsgate demo: the ${s.label} did not start (see above); stopping\n`);
      await stopAll();
      return 1;
    }
    setProxyLabel(gw.admin, s.label);
    gateways.push(gw);
  }

  const rel = (p: string) => path.relative(process.cwd(), p) || '.';
  const c = rel(certs);
  const admin = `http://127.0.0.1:${(gateways[0]!.admin.address() as { port: number }).port}`;
  process.stdout.write(`
tlsgate demo is running: 4 proxies from ${rel(dir)}/*.yaml, 3 demo apps, all on 127.0.0.1.

  Dashboard: ${admin}/

1. TLS termination (SIMPLE): the gateway presents app.example.local's certificate and reads the request
  curl -s --cacert ${c}/ca.crt --resolve app.example.local:8443:127.0.0.1 https://app.example.local:8443/headers
  -> the app's headers include x-forwarded-client-cert with URI=spiffe://.../sa/istio-ingressgateway-service-account:
     your TLS ended at the gateway, which sent the request on in Istio mTLS to httpbin's sidecar.

2. Mutual TLS termination (MUTUAL): without a client certificate the handshake is refused ...
  curl -s --cacert ${c}/ca.crt --resolve mtls.example.local:8443:127.0.0.1 https://mtls.example.local:8443/
  ... with one, the request goes through
  curl -s --cacert ${c}/ca.crt --cert ${c}/client.crt --key ${c}/client.key --resolve mtls.example.local:8443:127.0.0.1 https://mtls.example.local:8443/
  -> the first fails with a TLS alert (certificate required); the second answers 200.

3. SNI passthrough on the same port: the gateway routes by SNI and never decrypts
  curl -s --cacert ${c}/tls-app-ca.crt --resolve tls-app.demo.local:8443:127.0.0.1 https://tls-app.demo.local:8443/
  -> "app": "tls-app.demo.local": the certificate came from the app's own CA, which the gateway does not hold.

4. Istio mTLS between two sidecars (ISTIO_MUTUAL)
  curl -s -x http://127.0.0.1:${DEMO_PORTS.sleepOutbound} http://httpbin.foo.svc.cluster.local:8000/headers
  -> x-forwarded-client-cert names spiffe://cluster.local/ns/default/sa/sleep (the caller) and ns/foo/sa/httpbin.
  curl -s http://127.0.0.1:${DEMO_PORTS.httpbinInbound}/headers
  -> refused: PeerAuthentication STRICT admits only mesh mTLS.

5. TLS origination (egress, DestinationRule MUTUAL): the app speaks plain HTTP, the sidecar speaks TLS with a client certificate
  curl -s -x http://127.0.0.1:${DEMO_PORTS.sleepOutbound} http://secure-app.demo.local/
  -> "clientCertificate" shows CN=client.example.local: the sidecar presented it; curl never did.

6. Double encryption through the egress gateway: the app's own TLS inside the mesh's mTLS
  curl -s -x http://127.0.0.1:${DEMO_PORTS.sleepOutbound} --cacert ${c}/tls-app-ca.crt https://tls-app.demo.local/
  -> "app": "tls-app.demo.local" with curl's TLS intact end to end; the sidecar -> egress gateway hop was also mTLS.

  Explain any of these: tlsgate explain -c ${rel(dir)} --labels istio=ingressgateway https://app.example.local:8443/
  Access logs: ${rel(logs)}/*.access.log (and live on the dashboard).

Ctrl-C stops everything.
`);
  return new Promise((resolve) => {
    let signals = 0;
    const onSignal = () => {
      signals++;
      if (signals > 1) process.exit(130);
      process.stdout.write('\nstopping the demo...\n');
      void stopAll().then(() => resolve(0));
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}

/**
 * examples/gateway-api/ as a user runs it: every file validates without errors; with the
 * certificates written by make-secrets.sh they validate without a warning; and the demo's
 * ingress and egress gateways in Gateway API style serve what ../demo serves, checked with curl and
 * openssl the way the demo's own test checks the Istio style: Terminate with two certificates by
 * SNI, client certificates for one hostname, Passthrough to a TLS app with its own CA, the HTTP
 * redirect, the gateway -> sidecar hop in Istio mTLS (DestinationRule on a Service backend), and
 * TLS origination with a client certificate (BackendTLSPolicy + clientCertificateRef).
 * Ports are free ones: the example files are copied and their fixed ports rewritten.
 */
import assert from 'node:assert/strict';
import { copyFile, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, opensslSClient, resolveArgs, run } from '../helpers/exec.js';
import { freePorts } from '../helpers/ports.js';
import { REPO_ROOT, runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoReply, type EchoServer } from '../helpers/upstreams.js';

const EXAMPLES = path.join(REPO_ROOT, 'examples', 'gateway-api');
const INGRESS_ID = 'spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account';

let dir: string;
let demoCa: Ca, tlsAppCa: Ca;
let client: KeyPair;
let httpbin: EchoServer, tlsApp: EchoServer, secureApp: EchoServer;
let ingress: Gateway | undefined, sidecar: Gateway | undefined;
let HTTP: number, HTTPS: number, INBOUND: number, OUTBOUND: number, EGRESS_HTTP: number, EGRESS_MTLS: number;

/** The example's fixed ports -> this run's free ones (whole numbers only: 18080 is not 8080). */
function rewritePorts(text: string, map: Record<string, number>): string {
  return text.replace(/\b\d{4,5}\b/g, (m) => String(map[m] ?? m));
}

before(async () => {
  dir = await certDir('tlsgate-gwapi-examples-');
  // The layout make-secrets.sh expects: ../demo/certs and ../quickstart/certs next to it.
  const demoCerts = path.join(dir, 'examples', 'demo', 'certs');
  const quickCerts = path.join(dir, 'examples', 'quickstart', 'certs');
  const gwDir = path.join(dir, 'examples', 'gateway-api');
  for (const d of [demoCerts, quickCerts, gwDir]) await mkdir(d, { recursive: true });
  demoCa = await makeCa(dir, 'demo-ca', '/O=tlsgate demo/CN=tlsgate demo CA');
  tlsAppCa = await makeCa(dir, 'tls-app-ca', '/O=somewhere else/CN=tls-app external CA');
  const leaf = async (ca: Ca, host: string, serial: number) => makeLeaf(dir, ca, host, { cn: host, sans: [`DNS:${host}`], serial, extendedKeyUsage: ['serverAuth'] });
  const app = await leaf(demoCa, 'app.example.local', 1);
  const mtls = await leaf(demoCa, 'mtls.example.local', 2);
  const secure = await leaf(demoCa, 'secure-app.demo.local', 3);
  const tlsAppLeaf = await leaf(tlsAppCa, 'tls-app.demo.local', 4);
  client = await makeLeaf(dir, demoCa, 'client', { cn: 'client.example.local', o: 'demo client', serial: 5, extendedKeyUsage: ['clientAuth'] });
  for (const certs of [demoCerts, quickCerts]) {
    await writeFile(path.join(certs, 'ca.crt'), demoCa.certPem);
    for (const [n, kp] of [['app.example.local', app], ['mtls.example.local', mtls], ['client', client]] as const) {
      await writeFile(path.join(certs, `${n}.crt`), kp.certPem);
      await writeFile(path.join(certs, `${n}.key`), kp.keyPem);
    }
  }
  await copyFile(path.join(EXAMPLES, 'make-secrets.sh'), path.join(gwDir, 'make-secrets.sh'));
  const made = await run('sh', [path.join(gwDir, 'make-secrets.sh')], { timeoutMs: 10_000 });
  assert.equal(made.code, 0, made.stderr);

  [HTTP, HTTPS, INBOUND, OUTBOUND, EGRESS_HTTP, EGRESS_MTLS] = await freePorts(6) as [number, number, number, number, number, number];
  httpbin = await startEchoServer({ name: 'httpbin' });
  tlsApp = await startEchoServer({ name: 'tls-app', tls: { cert: tlsAppLeaf.cert, key: tlsAppLeaf.key } });
  secureApp = await startEchoServer({ name: 'secure-app', tls: { cert: secure.cert, key: secure.key, ca: demoCa.cert, requestCert: true } });
  const ports: Record<string, number> = {
    8080: HTTP, 8443: HTTPS, 15006: INBOUND, 18443: tlsApp.port, 15080: EGRESS_HTTP, 15443: EGRESS_MTLS, 18444: secureApp.port,
  };
  for (const f of ['quickstart.yaml', 'demo-ingress.yaml', 'demo-egress.yaml']) {
    await writeFile(path.join(gwDir, f), rewritePorts(await readFile(path.join(EXAMPLES, f), 'utf8'), ports));
  }
  // httpbin's sidecar, from the Istio demo's mesh.yaml as it is (Gateway API has no sidecar resources).
  const meshDir = path.join(dir, 'mesh');
  await mkdir(meshDir);
  await writeFile(path.join(meshDir, 'mesh.yaml'), rewritePorts(await readFile(path.join(REPO_ROOT, 'examples', 'demo', 'mesh.yaml'), 'utf8'), ports));
  const caDir = path.join(dir, 'mesh-ca');
  const init = await runCli(['ca', 'init', '--dir', caDir]);
  assert.equal(init.code, 0, init.stderr);
  sidecar = await startTlsgate({ configPaths: [meshDir], args: ['--sidecar', '--namespace', 'foo', '--service-account', 'httpbin', '--labels', 'app=httpbin',
    '--ca-dir', caDir, '--inbound-port', String(INBOUND), '--app-port', String(httpbin.port), '--outbound-port', String(OUTBOUND)] });
  ingress = await startTlsgate({
    configPaths: ['demo-ingress.yaml', 'demo-egress.yaml', 'demo-secrets.yaml'].map((f) => path.join(gwDir, f)),
    args: ['--namespace', 'istio-system', '--service-account', 'istio-ingressgateway-service-account', '--ca-dir', caDir],
  });
});

after(async () => {
  await ingress?.stop();
  await sidecar?.stop();
  await httpbin?.close();
  await tlsApp?.close();
  await secureApp?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('examples/gateway-api', () => {
  it('every file validates with no errors (alone, certificates missing: warnings only)', async () => {
    const files = (await readdir(EXAMPLES)).filter((f) => f.endsWith('.yaml')).sort();
    for (const f of ['quickstart.yaml', 'demo-ingress.yaml', 'demo-egress.yaml']) assert.ok(files.includes(f), `${f} exists`);
    for (const f of files) {
      const r = await runCli(['validate', '--config', path.join(EXAMPLES, f)]);
      assert.equal(r.code, 0, `${f}:\n${r.stdout}${r.stderr}`);
      assert.match(r.stdout, /\b0 error\(s\)/, `${f}:\n${r.stdout}`);
      assert.doesNotMatch(r.stdout, /: error TG/, `${f}:\n${r.stdout}`);
    }
  });

  it('with the Secrets and ConfigMaps make-secrets.sh writes, quickstart and demo validate with no warning', async () => {
    const gwDir = path.join(dir, 'examples', 'gateway-api');
    const quick = await runCli(['validate', '--config', path.join(gwDir, 'quickstart.yaml'), '--config', path.join(gwDir, 'quickstart-secrets.yaml')]);
    assert.equal(quick.code, 0, quick.stdout);
    assert.match(quick.stdout, /0 error\(s\), 0 warning\(s\)/, quick.stdout);
    assert.match(quick.stdout, /Accepted, Programmed: 3 of 3 listener\(s\) served/);
    const demo = await runCli(['validate', ...['demo-ingress.yaml', 'demo-egress.yaml', 'demo-secrets.yaml'].flatMap((f) => ['--config', path.join(gwDir, f)])]);
    assert.equal(demo.code, 0, demo.stdout);
    assert.match(demo.stdout, /0 error\(s\), 0 warning\(s\)/, demo.stdout);
    assert.match(demo.stdout, /Gateway istio-system\/ingressgateway spec\.listeners: Accepted, Programmed: 4 of 4 listener\(s\) served/);
    assert.match(demo.stdout, /Gateway istio-system\/egressgateway spec\.listeners: Accepted, Programmed: 2 of 2 listener\(s\) served/);
  });

  it('demo-ingress Terminate (SIMPLE): app.example.local\'s certificate, then Istio mTLS to httpbin\'s sidecar', async () => {
    const s = await opensslSClient({ port: HTTPS, servername: 'app.example.local', cafile: demoCa.cert });
    assert.ok(s.handshake, s.stderr);
    assert.match(s.peerCert?.subject ?? '', /CN = app\.example\.local/);
    const r = await curl([...resolveArgs('app.example.local', HTTPS), '--cacert', demoCa.cert, `https://app.example.local:${HTTPS}/headers`]);
    assert.equal(r.status, 200, r.stderr + r.body);
    assert.equal(r.headers['x-served-by'], 'tlsgate-ingress');
    const reply = JSON.parse(r.body) as EchoReply;
    assert.equal(reply.server, 'httpbin');
    assert.equal(reply.headers['host'], `app.example.local:${HTTPS}`);
    // httpbin's sidecar saw the gateway's SPIFFE identity: the hop was mesh mTLS, not plaintext.
    assert.match(String(reply.headers['x-forwarded-client-cert'] ?? ''), new RegExp(`^By=spiffe://cluster\\.local/ns/foo/sa/httpbin;.*URI=${INGRESS_ID.replace(/[./]/g, '\\$&')}$`));
  });

  it('demo-ingress client certificates for mtls.example.local only: refused without one, 200 with one', async () => {
    const base = [...resolveArgs('mtls.example.local', HTTPS), '--cacert', demoCa.cert];
    const none = await curl([...base, `https://mtls.example.local:${HTTPS}/`]);
    assert.notEqual(none.status, 200);
    assert.notEqual(none.code, 0);
    const ok = await curl([...base, '--cert', client.cert, '--key', client.key, `https://mtls.example.local:${HTTPS}/`]);
    assert.equal(ok.status, 200, ok.stderr);
    assert.equal((JSON.parse(ok.body) as EchoReply).server, 'httpbin');
    // The same port, another hostname: no client certificate asked.
    const app = await curl([...resolveArgs('app.example.local', HTTPS), '--cacert', demoCa.cert, `https://app.example.local:${HTTPS}/`]);
    assert.equal(app.status, 200);
  });

  it('demo-ingress Passthrough (TLSRoute): the TLS app answers with the certificate of its own CA', async () => {
    const s = await opensslSClient({ port: HTTPS, servername: 'tls-app.demo.local', cafile: tlsAppCa.cert });
    assert.ok(s.handshake, s.stderr);
    assert.match(s.peerCert?.subject ?? '', /CN = tls-app\.demo\.local/);
    assert.match(s.peerCert?.issuer ?? '', /CN = tls-app external CA/);
    const r = await curl([...resolveArgs('tls-app.demo.local', HTTPS), '--cacert', tlsAppCa.cert, `https://tls-app.demo.local:${HTTPS}/x`]);
    assert.equal(r.status, 200, r.stderr);
    const reply = JSON.parse(r.body) as EchoReply;
    assert.equal(reply.server, 'tls-app');
    assert.equal(reply.sni, 'tls-app.demo.local');
  });

  it('demo-ingress plain HTTP: /old redirects (301), the rest reaches httpbin through the mesh', async () => {
    const red = await curl(['-H', 'Host: anything.example', `http://127.0.0.1:${HTTP}/old`]);
    assert.equal(red.status, 301);
    assert.equal(red.headers['location'], `http://anything.example:${HTTP}/new`); // the listener port: not a well-known one here
    const r = await curl([`http://127.0.0.1:${HTTP}/headers`]);
    assert.equal(r.status, 200, r.stderr);
    assert.equal(r.headers['x-served-by'], 'tlsgate-ingress');
    assert.match(String((JSON.parse(r.body) as EchoReply).headers['x-forwarded-client-cert'] ?? ''), /URI=spiffe:\/\/cluster\.local\/ns\/istio-system\/sa\/istio-ingressgateway-service-account$/);
  });

  it('demo-egress: plain HTTP in, TLS out with the client certificate the secure app requires', async () => {
    const r = await curl(['-H', 'Host: secure-app.demo.local', `http://127.0.0.1:${EGRESS_HTTP}/get`]);
    assert.equal(r.status, 200, r.stderr + r.body);
    const reply = JSON.parse(r.body) as EchoReply;
    assert.equal(reply.server, 'secure-app');
    assert.equal(reply.sni, 'secure-app.demo.local');
    assert.match(reply.clientCertSubject ?? '', /CN=client\.example\.local/);
  });
});

/**
 * The mesh end to end with real processes on 127.0.0.1: a CA directory, a server sidecar in
 * front of an app (foo/httpbin), a client sidecar (default/sleep) whose outbound proxy curl
 * uses, and one config directory both read. Covers auto mTLS with XFCC, the SPIFFE SAN the
 * inbound port presents, PeerAuthentication (mesh-wide, namespace, workload selector,
 * portLevelMtls) applied live, refusal of a client without a mesh certificate, handshake
 * counters, workload certificate rotation under a long transfer, and `tlsgate ca serve`.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeCa, makeLeaf } from '../helpers/certs.js';
import { curl, opensslSClient, stopChild, trackChild } from '../helpers/exec.js';
import { freePorts, sleep, waitForPort } from '../helpers/ports.js';
import { CLI_MAIN, REPO_ROOT, runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';

const SERVER_ID = 'spiffe://cluster.local/ns/foo/sa/httpbin';
const CLIENT_ID = 'spiffe://cluster.local/ns/default/sa/sleep';
const XFCC_RE = new RegExp(`^By=${SERVER_ID};Hash=[0-9a-f]{64};Subject="";URI=${CLIENT_ID}$`);

/** A mesh service: ServiceEntry host port 8000 (HTTP) whose one endpoint is a sidecar's inbound port. */
function meshService(name: string, inboundPort: number): string {
  return `---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}, namespace: foo}
spec:
  hosts: [${name}.foo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP}]
  endpoints:
  - address: 127.0.0.1
    ports: {http: ${inboundPort}}
    labels: {app: ${name}, security.istio.io/tlsMode: istio}
`;
}

function peerAuth(name: string, namespace: string, spec: string): string {
  return `---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ${name}, namespace: ${namespace}}
spec:
${spec}
`;
}

/** An app that streams `count` lines, one every `everyMs`, on /stream; anything else gets 200 'ok'. */
async function startStreamingApp(count: number, everyMs: number): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<import('node:net').Socket>();
  const timers = new Set<NodeJS.Timeout>();
  const server = http.createServer((req, res) => {
    req.on('error', () => {});
    if (req.url !== '/stream') {
      res.end('ok\n');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain' });
    let i = 0;
    const tick = (): void => {
      if (res.destroyed) return;
      res.write(`line ${i} ${'x'.repeat(64)}\n`);
      i++;
      if (i >= count) {
        res.end();
        return;
      }
      const t = setTimeout(() => { timers.delete(t); tick(); }, everyMs);
      timers.add(t);
    };
    tick();
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('error', () => {});
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    close: () => new Promise<void>((resolve) => {
      for (const t of timers) clearTimeout(t);
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

async function waitUntil(what: string, cond: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await sleep(100);
  }
  assert.fail(`${what}: not within ${timeoutMs} ms`);
}

describe('mesh: two sidecars, PeerAuthentication, rotation, the CA server', () => {
  let dir: string;
  let caDir: string;
  let paFile: string;
  let echo: EchoServer;
  let stream: { port: number; close(): Promise<void> };
  let server: Gateway;
  let client: Gateway;
  let rotating: Gateway | undefined;
  let remote: Gateway | undefined;
  let caServe: ChildProcess | undefined;
  let inbound: number, outbound: number, serverOutbound: number, rotInbound: number, rotOutbound: number;
  let remoteInbound: number, remoteOutbound: number, caPort: number;

  const viaClient = (host: string, pathname = '/headers', extra: string[] = []) =>
    curl(['-x', `http://127.0.0.1:${outbound}`, ...extra, `http://${host}.foo.svc.cluster.local:8000${pathname}`]);
  const plaintext = () => curl([`http://127.0.0.1:${inbound}/plain`], { timeoutMs: 5_000 });
  /** Rewrites the PeerAuthentication file and waits until the server sidecar applied it. */
  const setPeerAuth = async (yaml: string): Promise<void> => {
    const before = (JSON.parse((await server.admin('/config_dump')).body) as { generation: number }).generation;
    await writeFile(paFile, yaml === '' ? '# no PeerAuthentication\n' : yaml);
    await waitUntil('server sidecar applied the PeerAuthentication edit', async () =>
      (JSON.parse((await server.admin('/config_dump')).body) as { generation: number }).generation > before);
  };

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-mesh-'));
    caDir = path.join(dir, 'ca');
    const init = await runCli(['ca', 'init', '--dir', caDir]);
    assert.equal(init.code, 0, init.stderr);
    [inbound, outbound, serverOutbound, rotInbound, rotOutbound, remoteInbound, remoteOutbound, caPort] = await freePorts(8);
    echo = await startEchoServer({ name: 'httpbin' });
    stream = await startStreamingApp(20, 400);
    const conf = path.join(dir, 'conf');
    await mkdir(conf);
    await writeFile(path.join(conf, 'services.yaml'),
      meshService('httpbin', inbound!) + meshService('slow', rotInbound!) + meshService('remote', remoteInbound!));
    paFile = path.join(conf, 'peer-authentication.yaml');
    await writeFile(paFile, '# no PeerAuthentication: PERMISSIVE\n');
    const identity = (ns: string, sa: string) => ['--sidecar', '--namespace', ns, '--service-account', sa, '--ca-dir', caDir];
    [server, client] = await Promise.all([
      startTlsgate({ configPaths: [conf], args: [...identity('foo', 'httpbin'), '--labels', 'app=httpbin',
        '--inbound-port', String(inbound), '--app-port', String(echo.port), '--outbound-port', String(serverOutbound)] }),
      startTlsgate({ configPaths: [conf], args: [...identity('default', 'sleep'), '--outbound-port', String(outbound)] }),
    ]);
  });

  after(async () => {
    for (const g of [client, server, rotating, remote]) await g?.stop();
    if (caServe) await stopChild(caServe);
    await echo?.close();
    await stream?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('curl through the client sidecar reaches the app over mTLS; the app sees XFCC with both SPIFFE IDs', async () => {
    const r = await viaClient('httpbin');
    assert.equal(r.status, 200, r.stderr + r.body);
    const reply = JSON.parse(r.body) as { headers: Record<string, string>; url: string };
    assert.equal(reply.url, '/headers');
    assert.match(reply.headers['x-forwarded-client-cert'] ?? '', XFCC_RE);
    // The server sidecar logged the request with the peer's identity.
    const entry = await server.waitForAccessLog((e) => e['path'] === '/headers');
    assert.equal(entry['peerUriSan'], CLIENT_ID);
    assert.equal(entry['status'], 200);
  });

  it('the inbound port presents the SPIFFE URI SAN of the server, signed by the mesh root', async () => {
    const s = await opensslSClient({ port: inbound, alpn: 'istio', cafile: path.join(caDir, 'root-cert.pem') });
    assert.ok(s.peerCert, s.stdout + s.stderr);
    assert.equal(s.peerCert.x509.subjectAltName, `URI:${SERVER_ID}`);
    assert.equal(s.verifyCode, 0, s.verifyText);
    assert.ok(s.clientCertRequested, 'the server asks for a client certificate');
  });

  it('a client whose certificate is not from the mesh CA gets nothing through', async () => {
    const own = await makeCa(path.join(dir, 'rogue'), 'rogue-ca', '/O=rogue/CN=rogue', { ec: true });
    const leaf = await makeLeaf(path.join(dir, 'rogue'), own, 'rogue', { cn: 'rogue', ec: true, serial: 7, sans: [`URI:${CLIENT_ID}`] });
    const s = await opensslSClient({ port: inbound, alpn: 'istio-http/1.1', cert: leaf.cert, key: leaf.key, waitForClose: true,
      input: 'GET /rogue HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n' });
    assert.doesNotMatch(s.stdout, /HTTP\/1\.1 200/);
    // TLS 1.3: the client finishes first; the server then checks the chain and closes.
    assert.ok(s.alertReceived || /unexpected eof|errno=104/.test(s.stderr), s.stdout + s.stderr);
    assert.ok(!echo.replies.some((r) => r.url === '/rogue'), 'the app never saw the request');
    const metrics = (await server.admin('/stats/prometheus')).body;
    assert.match(metrics, new RegExp(`tls_handshakes_total\\{listener="127\\.0\\.0\\.1_${inbound}",reason="client_cert_rejected",result="failure"\\} [1-9]`));
  });

  it('PERMISSIVE (no policy): plaintext and mTLS are both accepted', async () => {
    const p = await plaintext();
    assert.equal(p.status, 200, p.stderr);
    assert.equal((JSON.parse(p.body) as { headers: Record<string, string> }).headers['x-forwarded-client-cert'], undefined);
    const m = await viaClient('httpbin');
    assert.equal(m.status, 200, m.stderr);
  });

  it('mesh-wide STRICT refuses plaintext; mTLS from the client sidecar still works', async () => {
    await setPeerAuth(peerAuth('default', 'istio-system', '  mtls: {mode: STRICT}'));
    const p = await plaintext();
    assert.equal(p.status, 0, `plaintext got ${p.status}`);
    assert.notEqual(p.code, 0);
    const m = await viaClient('httpbin');
    assert.equal(m.status, 200, m.stderr);
    assert.match((JSON.parse(m.body) as { headers: Record<string, string> }).headers['x-forwarded-client-cert'] ?? '', XFCC_RE);
  });

  it('a workload-selector DISABLE overrides a namespace STRICT', async () => {
    await setPeerAuth(peerAuth('foo-strict', 'foo', '  mtls: {mode: STRICT}') +
      peerAuth('httpbin-disable', 'foo', '  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: DISABLE}'));
    const p = await plaintext();
    assert.equal(p.status, 200, p.stderr);
    // The client sidecar still sends mTLS (auto mTLS does not read the server's policy); the
    // DISABLE inbound passes it to the app as opaque TLS and the request fails closed.
    const m = await viaClient('httpbin', '/after-disable');
    assert.equal(m.status, 503, m.body);
    assert.ok(!echo.replies.some((r) => r.url === '/after-disable'));
    // A selector that does not match this workload leaves the namespace STRICT in force.
    await setPeerAuth(peerAuth('foo-strict', 'foo', '  mtls: {mode: STRICT}') +
      peerAuth('other-disable', 'foo', '  selector: {matchLabels: {app: other}}\n  mtls: {mode: DISABLE}'));
    assert.equal((await plaintext()).status, 0);
  });

  it('portLevelMtls for the app port overrides the workload policy both ways', async () => {
    await setPeerAuth(peerAuth('httpbin', 'foo',
      `  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    ${echo.port}: {mode: PERMISSIVE}`));
    assert.equal((await plaintext()).status, 200);
    await setPeerAuth(peerAuth('httpbin', 'foo',
      `  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    ${echo.port}: {mode: STRICT}`));
    assert.equal((await plaintext()).status, 0);
    assert.equal((await viaClient('httpbin')).status, 200);
    await setPeerAuth('');
  });

  it('the server sidecar counts handshakes and what the inspector detected', async () => {
    const metrics = (await server.admin('/stats/prometheus')).body;
    const sum = (re: RegExp): number => [...metrics.matchAll(re)].reduce((a, m) => a + Number(m[1]), 0);
    const listener = `127.0.0.1_${inbound}`;
    assert.ok(sum(new RegExp(`tls_handshakes_total\\{[^}]*listener="${listener}"[^}]*result="success"[^}]*\\} (\\d+)`, 'g')) >= 1, metrics);
    assert.ok(sum(new RegExp(`tls_handshakes_total\\{[^}]*listener="${listener}"[^}]*result="failure"[^}]*\\} (\\d+)`, 'g')) >= 2, metrics);
    assert.ok(sum(new RegExp(`tls_inspector_tls_not_found_total\\{[^}]*listener="${listener}"[^}]*\\} (\\d+)`, 'g')) >= 3, metrics);
  });

  it('rotation: a long transfer survives two workload certificate rotations; new handshakes see a new serial', async () => {
    rotating = await startTlsgate({ configPaths: [path.join(dir, 'conf')], args: ['--sidecar', '--namespace', 'foo',
      '--service-account', 'httpbin', '--ca-dir', caDir, '--workload-cert-ttl', '6s', '--labels', 'app=slow',
      '--inbound-port', String(rotInbound), '--app-port', String(stream.port), '--outbound-port', String(rotOutbound)] });
    const serial = async (): Promise<string> => {
      const s = await opensslSClient({ port: rotInbound, alpn: 'istio' });
      assert.ok(s.peerCert, s.stderr);
      assert.equal(s.peerCert.x509.subjectAltName, `URI:${SERVER_ID}`);
      return s.peerCert.x509.serialNumber;
    };
    const first = await serial();
    const rotatedBefore = rotating.logs().filter((l) => l.includes('workload certificate rotated')).length;
    const transfer = viaClient('slow', '/stream', ['-N']);
    // 20 lines, 400 ms apart: about 8 s on one mTLS connection.
    const r = await transfer;
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.status, 200);
    const lines = r.body.trim().split('\n');
    assert.equal(lines.length, 20);
    assert.equal(lines[19], `line 19 ${'x'.repeat(64)}`);
    const rotations = rotating.logs().filter((l) => l.includes('workload certificate rotated')).length - rotatedBefore;
    assert.ok(rotations >= 2, `rotations during the transfer: ${rotations}`);
    const second = await serial();
    assert.notEqual(second, first);
    // The whole transfer was one request on one upstream connection.
    const entry = await rotating.waitForAccessLog((e) => e['path'] === '/stream');
    assert.equal(entry['status'], 200);
    assert.equal(entry['peerUriSan'], CLIENT_ID);
  });

  it('the CA server path: a sidecar with --ca-url/--ca-token/--ca-root joins the mesh', async () => {
    caServe = spawn(process.execPath, [CLI_MAIN, 'ca', 'serve', '--dir', caDir, '--port', String(caPort), '--address', '127.0.0.1'],
      { cwd: REPO_ROOT, stdio: ['ignore', 'ignore', 'ignore'] });
    trackChild(caServe);
    const tok = await runCli(['ca', 'token', '--dir', caDir, '--namespace', 'foo', '--service-account', 'httpbin', '--ttl', '10m']);
    assert.equal(tok.code, 0, tok.stderr);
    await waitForPort(caPort, 20_000);
    remote = await startTlsgate({ configPaths: [path.join(dir, 'conf')], args: ['--sidecar', '--namespace', 'foo',
      '--service-account', 'httpbin', '--ca-url', `https://127.0.0.1:${caPort}`, '--ca-token', tok.stdout.trim(),
      '--ca-root', path.join(caDir, 'root-cert.pem'), '--labels', 'app=remote',
      '--inbound-port', String(remoteInbound), '--app-port', String(echo.port), '--outbound-port', String(remoteOutbound)] });
    const r = await viaClient('remote', '/via-ca-server');
    assert.equal(r.status, 200, r.stderr + r.body);
    assert.match((JSON.parse(r.body) as { headers: Record<string, string> }).headers['x-forwarded-client-cert'] ?? '', XFCC_RE);
    const s = await opensslSClient({ port: remoteInbound, alpn: 'istio', cafile: path.join(caDir, 'root-cert.pem') });
    assert.equal(s.peerCert?.x509.subjectAltName, `URI:${SERVER_ID}`);
    assert.equal(s.verifyCode, 0);
    // The bootstrap token never appears in the proxy's logs.
    assert.ok(!remote.logs().some((l) => l.includes(tok.stdout.trim())), 'the token is not logged');
  });
});

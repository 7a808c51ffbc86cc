// TLS origination for an HTTP2/GRPC port: the upstream's ALPN answer decides the protocol, against
// real TLS servers (HTTP/2 with HTTP/1.1 allowed, and HTTP/1.1 only).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { rm } from 'node:fs/promises';
import http2 from 'node:http2';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import type net from 'node:net';
import { after, before, describe, it } from 'node:test';
import type { Cluster } from '../../../src/model/snapshot.js';
import { ClusterManager, UpstreamError, type SecretMaterial } from '../../../src/runtime/upstream/cluster-manager.js';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../../helpers/certs.js';
import { freePort } from '../../helpers/ports.js';

function h2Cluster(port: number): Cluster {
  return {
    name: 'c', serviceHost: 'api.up.test', servicePort: port, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2000, httpProtocol: 'h2', limits: {},
    tls: {
      mode: 'SIMPLE', sni: 'api.up.test', autoSni: false, validationCa: 'ca', subjectAltNames: [], autoSanValidation: true,
      insecureSkipVerify: false, alpn: ['h2'], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3',
    },
  };
}

async function readAll(body: NodeJS.ReadableStream): Promise<string> {
  let s = '';
  for await (const c of body) s += String(c);
  return s;
}

describe('TLS origination with h2 offered: ALPN picks the pool', () => {
  let dir: string;
  let ca: Ca;
  let leaf: KeyPair;
  let secrets: Record<string, SecretMaterial>;
  // Managers first (they close their sessions), then the servers (an HTTP/2 server's close waits for its sessions).
  const managers: ClusterManager[] = [];
  const closers: (() => Promise<unknown>)[] = [];

  before(async () => {
    dir = await certDir('tlsgate-alpn-');
    ca = await makeCa(dir, 'ca', '/O=up/CN=up-ca');
    leaf = await makeLeaf(dir, ca, 'server', { cn: 'api.up.test', sans: ['DNS:api.up.test'], serial: 21 });
    secrets = { ca: { caPem: ca.certPem } };
  });
  after(async () => {
    for (const cm of managers) await cm.close(100);
    for (const c of closers.reverse()) await c();
    await rm(dir, { recursive: true, force: true });
  });

  const post = (cm: ClusterManager, body: string) =>
    cm.request('c', { method: 'POST', path: '/echo', headers: ['host', 'api.up.test', 'content-length', String(body.length)], body: Buffer.from(body), host: 'api.up.test' });

  it('an HTTP/2 server: requests go out as HTTP/2, and concurrent POSTs share one session', async () => {
    let sessions = 0;
    const versions: string[] = [];
    const server = http2.createSecureServer({ cert: leaf.certPem, key: leaf.keyPem, allowHTTP1: true }, (req, res) => {
      versions.push(req.httpVersion);
      let b = '';
      req.on('data', (c: Buffer) => { b += String(c); });
      req.on('end', () => setTimeout(() => res.end(`got ${b}`), 20));
    });
    server.on('session', (s: http2.ServerHttp2Session) => { sessions++; s.on('error', () => undefined); });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    closers.push(() => new Promise<void>((r) => server.close(() => r())));
    const cm = new ClusterManager({ c: h2Cluster((server.address() as AddressInfo).port) }, { secrets: (n) => secrets[n] });
    managers.push(cm);
    const batch = () => Promise.all(Array.from({ length: 8 }, async (_, i) => readAll((await post(cm, `n${i}`)).body)));
    assert.deepEqual(await batch(), Array.from({ length: 8 }, (_, i) => `got n${i}`));
    // Until the server's SETTINGS arrive a new session takes one stream, so a burst at start may
    // open a second one; after that, bursts of POSTs share the sessions there are.
    const warm = sessions;
    assert.ok(warm >= 1 && warm <= 2, `sessions after the first burst: ${warm}`);
    assert.deepEqual(await batch(), Array.from({ length: 8 }, (_, i) => `got n${i}`));
    assert.equal(sessions, warm, 'the second burst of 8 POSTs opened no session');
    assert.deepEqual([...new Set(versions)], ['2.0']);
  });

  it('an HTTP/1.1-only server: the same cluster speaks HTTP/1.1 over kept-alive connections', async () => {
    let connections = 0;
    const versions: string[] = [];
    const server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem, ALPNProtocols: ['http/1.1'] }, (req, res) => {
      versions.push(req.httpVersion);
      req.resume();
      req.on('end', () => res.end('one-one'));
    });
    server.on('secureConnection', () => { connections++; });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    closers.push(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
    const cm = new ClusterManager({ c: h2Cluster((server.address() as AddressInfo).port) }, { secrets: (n) => secrets[n] });
    managers.push(cm);
    for (let i = 0; i < 5; i++) assert.equal(await readAll((await post(cm, 'x')).body), 'one-one');
    assert.deepEqual([...new Set(versions)], ['1.1']);
    assert.equal(connections, 1);
  });

  it('nothing listening: every request waiting for the first connection fails as a connect failure', async () => {
    const port = await freePort();
    const cm = new ClusterManager({ c: h2Cluster(port) }, { secrets: (n) => secrets[n] });
    managers.push(cm);
    const results = await Promise.all(Array.from({ length: 3 }, () => post(cm, 'x').then(() => undefined, (e: unknown) => e)));
    for (const e of results) {
      assert.ok(e instanceof UpstreamError, String(e));
      assert.equal(e.reason, 'upstream_connect_failed');
    }
    // A server that appears later is reached: the next request probes again.
    const server = http2.createSecureServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('up now'));
    server.on('session', (s: http2.ServerHttp2Session) => s.on('error', () => undefined));
    server.listen(port, '127.0.0.1');
    await once(server, 'listening');
    closers.push(() => new Promise<void>((r) => server.close(() => r())));
    assert.equal(await readAll((await post(cm, 'x')).body), 'up now');
  });

  it('close() lets a request waiting for the first connection finish', async () => {
    const sockets = new Set<net.Socket>();
    const server = http2.createSecureServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('served'));
    server.on('connection', (s: net.Socket) => sockets.add(s));
    server.on('session', (s: http2.ServerHttp2Session) => s.on('error', () => undefined));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    closers.push(() => new Promise<void>((r) => { for (const s of sockets) s.destroy(); server.close(() => r()); }));
    const cm = new ClusterManager({ c: h2Cluster((server.address() as AddressInfo).port) }, { secrets: (n) => secrets[n] });
    const pending = post(cm, 'x');
    const closed = cm.close(5_000);
    assert.equal(await readAll((await pending).body), 'served');
    await closed;
  });
});

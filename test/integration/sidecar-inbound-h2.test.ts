/**
 * The sidecar's inbound cluster follows the downstream protocol (Istio's inbound clusters do),
 * with the real CLI and real peers on 127.0.0.1:
 * - a gRPC-shaped app (plaintext HTTP/2 only) behind a server sidecar: calls through a client
 *   sidecar's GRPC port arrive as HTTP/2 inside the mesh mTLS and reach the app as HTTP/2 (h2c),
 *   grpc-status trailers (0 and non-zero) come back to the caller, and the calls share one h2c
 *   session to the app;
 * - an HTTP/1.1-only app behind another server sidecar, reached through an HTTP port, still gets
 *   HTTP/1.1;
 * - `tlsgate explain --sidecar` says the inbound cluster's upstream protocol follows the downstream;
 * - the ClusterManager's two pools per host of such a cluster, against an app that speaks both:
 *   each request takes its protocol, both pools survive an update() that keeps the cluster and
 *   are closed when it goes.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { curl } from '../helpers/exec.js';
import { freePorts } from '../helpers/ports.js';
import { runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { grpcFrame, h2Request, type H2Response } from '../helpers/http2-client.js';
import type { Cluster } from '../../src/model/snapshot.js';
import { ClusterManager } from '../../src/runtime/upstream/cluster-manager.js';

const CLIENT_ID = 'spiffe://cluster.local/ns/default/sa/sleep';

function serviceEntry(name: string, protocol: 'GRPC' | 'HTTP', port: number, inboundPort: number): string {
  return `---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}, namespace: foo}
spec:
  hosts: [${name}.foo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: ${port}, name: ${protocol.toLowerCase()}, protocol: ${protocol}}]
  endpoints:
  - address: 127.0.0.1
    ports: {${protocol.toLowerCase()}: ${inboundPort}}
    labels: {app: ${name}, security.istio.io/tlsMode: istio}
`;
}

interface GrpcApp {
  port: number;
  sessions: number;
  calls: { httpVersion: string; path: string; xfcc: string | undefined }[];
  close(): Promise<void>;
}

/** A gRPC-shaped app: plaintext HTTP/2 only (an HTTP/1.1 request gets no answer it can read). */
async function startGrpcApp(): Promise<GrpcApp> {
  const server = http2.createServer();
  const app: GrpcApp = { port: 0, sessions: 0, calls: [], close: async () => undefined };
  server.on('session', () => { app.sessions++; });
  server.on('request', (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    const xfcc = req.headers['x-forwarded-client-cert'];
    app.calls.push({ httpVersion: req.httpVersion, path: req.url, xfcc: typeof xfcc === 'string' ? xfcc : undefined });
    let size = 0;
    req.on('data', (c: Buffer) => { size += c.length; });
    req.on('end', () => {
      const deny = req.url.endsWith('/Deny');
      res.writeHead(200, { 'content-type': 'application/grpc' });
      res.addTrailers({ 'grpc-status': deny ? '7' : '0', 'grpc-message': deny ? 'denied' : 'ok' });
      res.end(grpcFrame(`reply to ${req.url} (${size} bytes in)`));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  app.port = (server.address() as AddressInfo).port;
  app.close = () => new Promise<void>((resolve) => {
    server.close(() => resolve());
    // Sessions the sidecar keeps open would hold close() forever.
    setTimeout(resolve, 2_000).unref();
  });
  return app;
}

/**
 * One gRPC-shaped call as an app would make it through the client sidecar: HTTP/2 with prior
 * knowledge to the sidecar's outbound port, the destination (host and service port) in :authority.
 */
function grpcCall(proxyPort: number, authority: string, pathname: string, body: Buffer): Promise<H2Response> {
  return h2Request(`http://127.0.0.1:${proxyPort}`, {}, { ':method': 'POST', ':scheme': 'http', ':authority': authority, ':path': pathname,
    'content-type': 'application/grpc', te: 'trailers' }, body);
}

describe('sidecar inbound: the app gets the protocol the request arrived in', () => {
  let dir: string;
  let conf: string;
  let grpcApp: GrpcApp;
  let h1App: http.Server;
  let h1AppPort: number;
  const h1Seen: { httpVersion: string; url: string | undefined }[] = [];
  let greeter: Gateway, httpbin: Gateway, client: Gateway;
  let greeterInbound: number, httpbinInbound: number, outbound: number;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-inbound-h2-'));
    const caDir = path.join(dir, 'ca');
    const init = await runCli(['ca', 'init', '--dir', caDir]);
    assert.equal(init.code, 0, init.stderr);
    const ports = await freePorts(5);
    [greeterInbound, httpbinInbound, outbound] = ports as [number, number, number];
    grpcApp = await startGrpcApp();
    h1App = http.createServer((req, res) => {
      h1Seen.push({ httpVersion: req.httpVersion, url: req.url });
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ httpVersion: req.httpVersion, url: req.url }));
    });
    await new Promise<void>((resolve) => h1App.listen(0, '127.0.0.1', resolve));
    h1AppPort = (h1App.address() as AddressInfo).port;
    conf = path.join(dir, 'conf');
    await mkdir(conf);
    await writeFile(path.join(conf, 'services.yaml'), serviceEntry('greeter', 'GRPC', 9000, greeterInbound) + serviceEntry('httpbin', 'HTTP', 8000, httpbinInbound));
    const identity = (ns: string, sa: string) => ['--sidecar', '--namespace', ns, '--service-account', sa, '--ca-dir', caDir];
    [greeter, httpbin, client] = await Promise.all([
      startTlsgate({ configPaths: [conf], args: [...identity('foo', 'greeter'), '--labels', 'app=greeter',
        '--inbound-port', String(greeterInbound), '--app-port', String(grpcApp.port), '--outbound-port', String(ports[3])] }),
      startTlsgate({ configPaths: [conf], args: [...identity('foo', 'httpbin'), '--labels', 'app=httpbin',
        '--inbound-port', String(httpbinInbound), '--app-port', String(h1AppPort), '--outbound-port', String(ports[4])] }),
      startTlsgate({ configPaths: [conf], args: [...identity('default', 'sleep'), '--outbound-port', String(outbound)] }),
    ]);
  });

  after(async () => {
    for (const g of [client, greeter, httpbin]) await g?.stop();
    await grpcApp?.close();
    await new Promise<void>((resolve) => { if (h1App) h1App.close(() => resolve()); else resolve(); });
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('gRPC calls reach an h2c-only app as HTTP/2, with their trailers back, on one h2c session', async () => {
    // The service port, not the proxy's: HTTP/2 names its destination in :authority.
    const authority = 'greeter.foo.svc.cluster.local:9000';
    const ok = await grpcCall(outbound, authority, '/grpc.Echo/Say', grpcFrame('hello'));
    assert.equal(ok.status, 200, JSON.stringify(ok.headers));
    assert.equal(ok.headers['content-type'], 'application/grpc');
    assert.equal(ok.body.subarray(5).toString(), 'reply to /grpc.Echo/Say (10 bytes in)');
    assert.equal(ok.trailers['grpc-status'], '0');
    assert.equal(ok.trailers['grpc-message'], 'ok');
    const denied = await grpcCall(outbound, authority, '/grpc.Echo/Deny', grpcFrame('x'));
    assert.equal(denied.status, 200);
    assert.equal(denied.trailers['grpc-status'], '7');
    assert.equal(denied.trailers['grpc-message'], 'denied');
    // Concurrent calls too; they all travel on the inbound side's one session to the app.
    const more = await Promise.all(Array.from({ length: 4 }, (_, i) => grpcCall(outbound, authority, `/grpc.Echo/Say${i}`, grpcFrame(`m${i}`))));
    for (const r of more) assert.equal(r.trailers['grpc-status'], '0');
    assert.equal(grpcApp.calls.length, 6);
    for (const c of grpcApp.calls) {
      assert.equal(c.httpVersion, '2.0');
      assert.match(c.xfcc ?? '', new RegExp(`URI=${CLIENT_ID}$`));
    }
    assert.equal(grpcApp.sessions, 1, 'one h2c session to the app for every call');
    // The server sidecar saw HTTP/2 from its peer (ALPN istio-h2) and logged it.
    const e = await greeter.waitForAccessLog((x) => x['path'] === '/grpc.Echo/Deny');
    assert.equal(e['protocol'], 'HTTP/2');
    assert.equal(e['status'], 200);
  });

  it('an HTTP/1.1 request through the client sidecar (GRPC port) still reaches the h2c app as HTTP/2', async () => {
    const n = grpcApp.calls.length;
    const r = await curl(['-x', `http://127.0.0.1:${outbound}`, '-H', 'content-type: application/grpc', '--data-binary', 'abc',
      'http://greeter.foo.svc.cluster.local:9000/grpc.Echo/Plain']);
    assert.equal(r.status, 200, r.stderr + r.body);
    assert.deepEqual(grpcApp.calls.slice(n).map((c) => c.httpVersion), ['2.0']);
  });

  it('an HTTP/1.1-only app behind an HTTP port gets HTTP/1.1', async () => {
    for (let i = 0; i < 2; i++) {
      const r = await curl(['-x', `http://127.0.0.1:${outbound}`, `http://httpbin.foo.svc.cluster.local:8000/h1/${i}`]);
      assert.equal(r.status, 200, r.stderr + r.body);
      assert.deepEqual(JSON.parse(r.body), { httpVersion: '1.1', url: `/h1/${i}` });
      const e = await httpbin.waitForAccessLog((x) => x['path'] === `/h1/${i}`);
      assert.equal(e['protocol'], 'HTTP/1.1');
    }
    assert.deepEqual(h1Seen.map((s) => s.httpVersion), ['1.1', '1.1']);
  });

  it('explain --sidecar: the inbound cluster\'s upstream protocol follows the downstream', async () => {
    const r = await runCli(['explain', '--sidecar', '-c', conf, '--namespace', 'foo', '--service-account', 'greeter',
      '--inbound-port', String(greeterInbound), '--app-port', String(grpcApp.port), '--alpn', 'istio-h2', '--path', '/grpc.Echo/Say']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, new RegExp(`cluster +inbound\\|${grpcApp.port}\\|\\|`));
    assert.match(r.stdout, /lb ROUND_ROBIN; connect timeout \d+ms; upstream protocol follows the downstream\n/);
    assert.doesNotMatch(r.stdout, /HTTP\/2 upstream/);
  });
});

describe('ClusterManager: httpProtocol downstream keeps an HTTP/1.1 and an HTTP/2 pool per host', () => {
  // An app that speaks both on one plaintext port, told apart by the HTTP/2 preface.
  let front: net.Server;
  let port: number;
  const h1Sockets = new Set<net.Socket>();
  const h2Sessions = new Set<http2.ServerHttp2Session>();
  let h2SessionsOpened = 0;
  let h1SocketsOpened = 0;

  before(async () => {
    const answer = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(req.httpVersion);
    };
    const h1 = http.createServer(answer);
    const h2 = http2.createServer(answer);
    h2.on('session', (session: http2.ServerHttp2Session) => {
      h2SessionsOpened++;
      h2Sessions.add(session);
      session.on('close', () => h2Sessions.delete(session));
    });
    front = net.createServer((sock) => {
      sock.on('error', () => undefined);
      sock.once('data', (head: Buffer) => {
        sock.pause();
        sock.unshift(head);
        if (head.subarray(0, 5).toString('latin1') === 'PRI *') h2.emit('connection', sock);
        else {
          h1SocketsOpened++;
          h1Sockets.add(sock);
          sock.on('close', () => h1Sockets.delete(sock));
          h1.emit('connection', sock);
          sock.resume();
        }
      });
    });
    await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
    port = (front.address() as AddressInfo).port;
  });

  after(async () => {
    for (const s of h1Sockets) s.destroy();
    for (const s of h2Sessions) s.destroy();
    await new Promise<void>((resolve) => front.close(() => resolve()));
  });

  const cluster = (): Cluster => ({
    name: `inbound|${port}||`, serviceHost: '127.0.0.1', servicePort: port, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2_000, httpProtocol: 'downstream', limits: {},
  });

  async function version(cm: ClusterManager, downstreamProtocol: 'http1' | 'h2' | undefined): Promise<string> {
    const r = await cm.request(`inbound|${port}||`, { method: 'GET', path: '/', headers: { host: `127.0.0.1:${port}` }, body: null, host: `127.0.0.1:${port}`,
      ...(downstreamProtocol !== undefined ? { downstreamProtocol } : {}) });
    assert.equal(r.statusCode, 200);
    const chunks: Buffer[] = [];
    for await (const c of r.body) chunks.push(c as Buffer);
    return Buffer.concat(chunks).toString();
  }

  /** Waits (bounded, 5 s) until the app has no connection from the manager left. */
  async function allClosed(when: string): Promise<void> {
    const open = () => h2Sessions.size + h1Sockets.size;
    for (let i = 0; i < 200 && open() > 0; i++) await new Promise((r) => setTimeout(r, 25));
    assert.equal(open(), 0, `connections left open ${when}: h2 ${h2Sessions.size}, h1 ${h1Sockets.size}`);
  }

  it('picks the pool by the request\'s protocol; update() keeps both, dropping the cluster closes both', async () => {
    const cm = new ClusterManager({ [`inbound|${port}||`]: cluster() });
    try {
      assert.equal(await version(cm, 'h2'), '2.0');
      assert.equal(await version(cm, 'http1'), '1.1');
      assert.equal(await version(cm, undefined), '1.1', 'no downstream protocol given: HTTP/1.1');
      assert.equal(await version(cm, 'h2'), '2.0');
      assert.equal(h2SessionsOpened, 1);
      assert.equal(h1SocketsOpened, 1);
      // The same cluster in a new snapshot: the warm connections of both pools are reused.
      cm.update({ [`inbound|${port}||`]: cluster() });
      assert.equal(await version(cm, 'h2'), '2.0');
      assert.equal(await version(cm, 'http1'), '1.1');
      assert.equal(h2SessionsOpened, 1);
      assert.equal(h1SocketsOpened, 1);
      // The cluster is gone: both pools close their connections.
      cm.update({});
      await allClosed('after the cluster went');
      // close() closes both pools of a live cluster as well.
      cm.update({ [`inbound|${port}||`]: cluster() });
      assert.equal(await version(cm, 'h2'), '2.0');
      assert.equal(await version(cm, 'http1'), '1.1');
      assert.equal(h2Sessions.size + h1Sockets.size, 2);
    } finally {
      await cm.close(2_000);
    }
    await allClosed('after close()');
  });
});

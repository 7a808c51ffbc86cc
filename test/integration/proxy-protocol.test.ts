/**
 * PROXY protocol on a real gateway: accepted only from trusted peers and parsed before the
 * ClientHello (the client address then reaches logs and x-forwarded-for), and sent to an
 * upstream that asks for it (a real nginx `listen ... proxy_protocol` reports the client's
 * address, not the gateway's).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePorts } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';
import { startNginx, type Nginx } from '../helpers/nginx.js';
import { encodeProxyV1, encodeProxyV2 } from '../../src/runtime/listener/proxy-protocol.js';

let dir: string;
let ca: Ca;
let leaf: KeyPair;
let echo: EchoServer;
let nginx: Nginx;
let gw: Gateway;
let pHttp: number, pTls: number, pTcp: number, pNginx: number;

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-pp-'));
  ca = await makeCa(dir, 'ca', '/O=example Inc./CN=example.com');
  leaf = await makeLeaf(dir, ca, 'pp', { cn: 'pp.example.com', serial: 3, sans: ['DNS:pp.example.com'] });
  echo = await startEchoServer();
  [pHttp, pTls, pTcp, pNginx] = await freePorts(4) as [number, number, number, number];
  nginx = await startNginx({
    http: `server {\n  listen 127.0.0.1:${pNginx} proxy_protocol;\n  location / { return 200 "$proxy_protocol_addr:$proxy_protocol_port\\n"; }\n}`,
  });
  await writeFile(path.join(dir, 'gw.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: edge
  annotations:
    tlsgate.io/proxy-protocol: "true"
    tlsgate.io/proxy-protocol-trusted-cidrs: "127.0.0.1/32"
spec:
  servers:
  - port: {number: ${pHttp}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${pTls}, name: https, protocol: HTTPS}
    hosts: [pp.example.com]
    tls: {mode: SIMPLE, serverCertificate: ${leaf.cert}, privateKey: ${leaf.key}}
  - port: {number: ${pTcp}, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{route: [{destination: {host: echo.local, port: {number: 80}}}]}]
  tcp: [{route: [{destination: {host: nginx.local, port: {number: 80}}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.local]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: ${echo.port}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nginx}
spec:
  hosts: [nginx.local]
  ports: [{number: 80, name: tcp, protocol: TCP, targetPort: ${pNginx}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: nginx
  annotations: {tlsgate.io/proxy-protocol: v2}
spec:
  host: nginx.local
`);
  gw = await startTlsgate({ configPaths: [dir] });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await echo?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Sends raw bytes (optionally from another local address) and collects the reply until close. */
function exchange(port: number, data: Buffer, localAddress?: string): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1', ...(localAddress ? { localAddress } : {}) }, () => s.write(data));
    let out = '';
    s.on('data', (d: Buffer) => { out += d.toString('latin1'); });
    s.on('close', () => resolve(out));
    s.on('error', () => resolve(out));
    s.setTimeout(5000, () => s.destroy());
  });
}

const httpGet = (host = 'any.example.com') => Buffer.from(`GET /pp HTTP/1.1\r\nhost: ${host}\r\nconnection: close\r\n\r\n`);

test('a PROXY v1 header from a trusted peer sets the client address seen upstream and in the log', async () => {
  const hdr = encodeProxyV1({ address: '203.0.113.7', port: 5555 }, { address: '127.0.0.1', port: pHttp });
  const reply = await exchange(pHttp, Buffer.concat([hdr, httpGet()]));
  assert.match(reply, /^HTTP\/1\.1 200/);
  assert.match(reply, /"x-forwarded-for":"203\.0\.113\.7"/);
  const entry = await gw.waitForAccessLog((e) => e.path === '/pp' && e.downstreamAddress === '203.0.113.7');
  assert.equal(entry.status, 200);
});

test('PROXY v2 is parsed before the ClientHello on a TLS listener', async () => {
  const raw = net.connect(pTls, '127.0.0.1');
  await new Promise<void>((r) => raw.once('connect', () => r()));
  raw.write(encodeProxyV2({ command: 'PROXY', source: { address: '2001:db8::5', port: 443 }, destination: { address: '2001:db8::1', port: pTls } }));
  const s = tls.connect({ socket: raw, servername: 'pp.example.com', ca: ca.certPem, ALPNProtocols: ['http/1.1'] });
  await new Promise<void>((resolve, reject) => { s.once('secureConnect', () => resolve()); s.once('error', reject); });
  assert.equal(s.authorized, true);
  const reply = await new Promise<string>((resolve) => {
    let out = '';
    s.on('data', (d: Buffer) => { out += d.toString(); });
    s.on('end', () => resolve(out));
    s.write(httpGet('pp.example.com').toString());
  });
  assert.match(reply, /^HTTP\/1\.1 200/);
  assert.match(reply, /"x-forwarded-for":"2001:db8::5"/);
  s.destroy();
});

test('without a header, or from an untrusted peer, the connection is closed', async () => {
  assert.equal(await exchange(pHttp, httpGet()), '');
  await gw.waitForAccessLog((e) => e.reason === 'proxy_protocol_missing');
  const hdr = encodeProxyV1({ address: '198.51.100.1', port: 1 }, { address: '127.0.0.1', port: pHttp });
  assert.equal(await exchange(pHttp, Buffer.concat([hdr, httpGet()]), '127.0.0.2'), '');
  await gw.waitForAccessLog((e) => e.reason === 'proxy_protocol_untrusted');
  const metrics = (await gw.admin('/stats/prometheus')).body;
  assert.match(metrics, /tlsgate_downstream_connections_refused_total\{listener="[^"]+",reason="proxy_protocol_untrusted"\} [1-9]/);
});

test('PROXY v2 is sent to an upstream that asks for it: nginx reports the original client', async () => {
  const hdr = encodeProxyV1({ address: '192.0.2.44', port: 4444 }, { address: '127.0.0.1', port: pTcp });
  const reply = await exchange(pTcp, Buffer.concat([hdr, httpGet()]));
  assert.match(reply, /^HTTP\/1\.1 200/);
  assert.match(reply, /192\.0\.2\.44:4444\n$/);
});

// TCP proxying and TLS-terminated TCP (issue 3) against real peers: a Node echo, a
// server-speaks-first upstream, a real MariaDB with TLS, openssl s_client.
import assert from 'node:assert/strict';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { opensslSClient } from '../helpers/exec.js';
import { startMariadb, type Mariadb } from '../helpers/mariadb.js';
import { freePorts } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startServerFirst, startTcpEcho, type TcpServer } from '../helpers/upstreams.js';

let dir: string;
let ca: Ca;
let dbCert: KeyPair;
let gwCert: KeyPair;
let client: KeyPair;
let echo: TcpServer;
let banner: TcpServer;
let db: Mariadb;
let gw: Gateway;
let T_ECHO: number;
let T_BANNER: number;
let T_DB: number;
let T_SIMPLE: number;
let T_MUTUAL: number;

const BANNER = '220 banner.local ESMTP ready\r\n';

function se(name: string, host: string, port: number): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ${name}
spec:
  hosts:
  - ${host}
  location: MESH_EXTERNAL
  ports:
  - number: ${port}
    name: tcp
    protocol: TCP
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
`;
}

function tcpServer(name: string, port: number, tlsBlock = ''): string {
  return `  - port:
      number: ${port}
      name: ${name}
      protocol: ${tlsBlock ? 'TLS' : 'TCP'}
${tlsBlock}    hosts:
    - "*"
`;
}

function route(port: number, host: string, upstreamPort: number): string {
  return `  - match:
    - port: ${port}
    route:
    - destination:
        host: ${host}
        port:
          number: ${upstreamPort}
`;
}

before(async () => {
  dir = await certDir();
  ca = await makeCa(dir, 'ca', '/O=tcp tests/CN=tcp-ca');
  dbCert = await makeLeaf(dir, ca, 'db', { cn: 'db.example.com', sans: ['DNS:db.example.com', 'IP:127.0.0.1'], serial: 2, ec: true, extendedKeyUsage: ['serverAuth'] });
  gwCert = await makeLeaf(dir, ca, 'gw', { cn: 'tcp.example.com', o: 'tlsgate', sans: ['DNS:tcp.example.com'], serial: 3 });
  client = await makeLeaf(dir, ca, 'client', { cn: 'client.example.com', o: 'client organization', serial: 4, extendedKeyUsage: ['clientAuth'] });
  echo = await startTcpEcho();
  banner = await startServerFirst({ banner: BANNER });
  db = await startMariadb({ tls: { cert: dbCert.cert, key: dbCert.key, ca: ca.cert }, requireSecureTransport: true });
  [T_ECHO, T_BANNER, T_DB, T_SIMPLE, T_MUTUAL] = await freePorts(5) as [number, number, number, number, number];

  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'gateway.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: tcp-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
${tcpServer('tcp-echo', T_ECHO)}${tcpServer('tcp-banner', T_BANNER)}${tcpServer('mysql', T_DB)}${tcpServer('tls-simple', T_SIMPLE, `    tls:
      mode: SIMPLE
      serverCertificate: ${gwCert.cert}
      privateKey: ${gwCert.key}
`)}${tcpServer('tls-mutual', T_MUTUAL, `    tls:
      mode: MUTUAL
      serverCertificate: ${gwCert.cert}
      privateKey: ${gwCert.key}
      caCertificates: ${ca.cert}
`)}`);
  await writeFile(path.join(cfg, 'routes.yaml'), `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: tcp-routes
spec:
  hosts:
  - "*"
  gateways:
  - tcp-gateway
  tcp:
${route(T_ECHO, 'echo.local', echo.port)}${route(T_BANNER, 'banner.local', banner.port)}${route(T_DB, 'db.local', db.port)}${route(T_SIMPLE, 'echo.local', echo.port)}${route(T_MUTUAL, 'echo.local', echo.port)}`);
  await writeFile(path.join(cfg, 'services.yaml'), [se('echo', 'echo.local', echo.port), se('banner', 'banner.local', banner.port), se('db', 'db.local', db.port)].join('---\n'));
  gw = await startTlsgate({ configPaths: [cfg], args: ['--bind-address', '127.0.0.1', '--drain-grace', '0'] });
});

after(async () => {
  await gw?.stop();
  await echo?.close();
  await banner?.close();
  await db?.stop();
  await rm(dir, { recursive: true, force: true });
});

interface Session {
  socket: net.Socket;
  received(): string;
  waitFor(n: number): Promise<string>;
  ended: Promise<void>;
}

function open(port: number): Promise<Session> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
    let got = '';
    const waiters: (() => void)[] = [];
    socket.setTimeout(10_000, () => socket.destroy(new Error('timed out')));
    socket.on('data', (c: Buffer) => { got += c.toString('utf8'); for (const w of waiters.splice(0)) w(); });
    const ended = new Promise<void>((r) => socket.once('end', r));
    socket.once('error', reject);
    socket.once('connect', () => resolve({
      socket,
      received: () => got,
      ended,
      waitFor: (n) => new Promise((res, rej) => {
        const t = setTimeout(() => rej(new Error(`wanted ${n} bytes, have ${JSON.stringify(got)}`)), 5_000);
        const check = (): void => {
          if (got.length >= n) { clearTimeout(t); res(got); } else waiters.push(check);
        };
        check();
      }),
    }));
  });
}

describe('protocol TCP', () => {
  it('relays bytes both ways', async () => {
    const s = await open(T_ECHO);
    const payload = 'x'.repeat(100_000);
    s.socket.write(payload);
    assert.equal((await s.waitFor(payload.length)).length, payload.length);
    s.socket.end();
    await s.ended;
    const entry = await gw.waitForAccessLog((e) => e.kind === 'tcp' && e.bytesReceived === payload.length);
    assert.equal(entry.bytesSent, payload.length);
    assert.equal(entry.reason, 'ok');
    assert.equal(entry.cluster, `outbound|${echo.port}||echo.local`);
    assert.equal(entry.upstream, `127.0.0.1:${echo.port}`);
  });

  it('a server-speaks-first upstream: the banner arrives before the client sends anything', async () => {
    const s = await open(T_BANNER);
    assert.equal(await s.waitFor(BANNER.length), BANNER);
    s.socket.write('EHLO client\r\n');
    assert.equal(await s.waitFor(BANNER.length + 13), `${BANNER}EHLO client\r\n`);
    s.socket.destroy();
  });

  it('half-close: the client ends its side and the reply still arrives', async () => {
    const s = await open(T_ECHO);
    s.socket.end('last words before FIN');
    await s.ended;
    assert.equal(s.received(), 'last words before FIN');
  });

  it('MariaDB over TLS with server certificate verification, through the gateway', async () => {
    const args = ['--ssl', `--ssl-ca=${ca.cert}`, '--ssl-verify-server-cert', '-N'];
    const one = await db.client([...args, '-e', "select 1; show status like 'Ssl_version'"], { port: T_DB });
    assert.equal(one.code, 0, one.stderr);
    assert.match(one.stdout, /^1$/m);
    assert.match(one.stdout, /Ssl_version\tTLSv1\.[23]/);
    const sql = 'create database if not exists gw; create table gw.t (id int primary key, name varchar(40)); ' +
      "insert into gw.t values (1, 'through tlsgate'), (2, 'still encrypted'); select name from gw.t order by id;";
    const crud = await db.client([...args, '-e', sql], { port: T_DB });
    assert.equal(crud.code, 0, crud.stderr);
    assert.equal(crud.stdout.trim(), 'through tlsgate\nstill encrypted');
    const plain = await db.client(['--skip-ssl', '-e', 'select 1'], { port: T_DB });
    assert.notEqual(plain.code, 0);
  });
});

describe('protocol TLS, terminated, to a plain TCP upstream', () => {
  it('SIMPLE: openssl s_client sends a line and gets it back', async () => {
    const r = await opensslSClient({
      port: T_SIMPLE, servername: 'tcp.example.com', cafile: ca.cert, input: 'ping over tls\n', waitForClose: true, timeoutMs: 2_500,
    });
    assert.ok(r.handshake, r.stderr);
    assert.equal(r.peerCert?.subject, 'CN = tcp.example.com, O = tlsgate');
    assert.equal(r.verifyCode, 0);
    assert.match(r.stdout, /^ping over tls$/m);
    const entry = await gw.waitForAccessLog((e) => e.kind === 'tcp' && e.listener === `127.0.0.1_${T_SIMPLE}`, 5_000);
    assert.match(String(entry.tlsVersion), /TLSv1\.[23]/);
  });

  it('MUTUAL refuses a client without a certificate and serves one with it', async () => {
    const denied = await new Promise<string>((resolve) => {
      const s = tls.connect({ host: '127.0.0.1', port: T_MUTUAL, servername: 'tcp.example.com', ca: ca.certPem }, () => s.write('no cert\n'));
      let got = '';
      s.setTimeout(5_000, () => s.destroy());
      s.on('data', (c: Buffer) => { got += c.toString(); });
      s.on('error', (e) => resolve(`error: ${e.message}`));
      s.on('close', () => resolve(`closed: ${got}`));
    });
    assert.doesNotMatch(denied, /no cert/);
    await gw.waitForAccessLog((e) => e.listener === `127.0.0.1_${T_MUTUAL}` && (e.reason === 'client_cert_required' || e.reason === 'client_cert_rejected'));

    const ok = await new Promise<string>((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: T_MUTUAL, servername: 'tcp.example.com', ca: ca.certPem, cert: client.certPem, key: client.keyPem }, () => s.write('with cert\n'));
      let got = '';
      s.setTimeout(5_000, () => s.destroy(new Error('timed out')));
      s.on('error', reject);
      s.on('data', (c: Buffer) => { got += c.toString(); if (got.endsWith('\n')) { s.end(); resolve(got); } });
    });
    assert.equal(ok, 'with cert\n');
  });
});

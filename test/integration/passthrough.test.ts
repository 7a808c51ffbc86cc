// TLS passthrough by SNI (issue 3) against real peers: nginx TLS upstreams whose CA the gateway
// never sees, curl and openssl s_client as clients, the seed example YAML verbatim.
import assert from 'node:assert/strict';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { Duplex } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { curl, opensslSClient, resolveArgs } from '../helpers/exec.js';
import { nginxTlsServer, startNginx, type Nginx } from '../helpers/nginx.js';
import { freePorts } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startTcpEcho, type TcpServer } from '../helpers/upstreams.js';

let dir: string;
let upstreamCa: Ca; // the gateway never sees this CA
let gatewayCa: Ca;
let login: KeyPair;
let reviews: KeyPair;
let nginxCert: KeyPair;
let termCert: KeyPair;
let nginx: Nginx;
let echo: TcpServer;
let gw: Gateway;
let P: number; // seed example port
let P2: number; // Istio task shape (HTTPS + PASSTHROUGH)
let P3: number; // PASSTHROUGH and SIMPLE sharing a port
let P4: number; // AUTO_PASSTHROUGH
let meshCert: KeyPair;
let tlsEcho: TcpServer;
let loginPort: number;
let reviewsPort: number;
let nginxPort: number;

const seedVirtualService = (port: number): string => `apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: bookinfo-sni
spec:
  hosts:
  - "*.bookinfo.com"
  gateways:
  - mygateway
  tls:
  - match:
    - port: ${port}
      sniHosts:
      - login.bookinfo.com
    route:
    - destination:
        host: login.prod.svc.cluster.local
  - match:
    - port: ${port}
      sniHosts:
      - reviews.bookinfo.com
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
`;

function serviceEntry(name: string, ns: string, host: string, port: number, target: number): string {
  return `apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: ${name}
  namespace: ${ns}
spec:
  hosts:
  - ${host}
  location: MESH_EXTERNAL
  ports:
  - number: ${port}
    name: tls
    protocol: TLS
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      tls: ${target}
`;
}

before(async () => {
  dir = await certDir();
  upstreamCa = await makeCa(dir, 'upstream-ca', '/O=bookinfo upstreams/CN=upstream-ca');
  gatewayCa = await makeCa(dir, 'gateway-ca', '/O=gateway/CN=gateway-ca');
  login = await makeLeaf(dir, upstreamCa, 'login', { cn: 'login.bookinfo.com', o: 'login upstream', sans: ['DNS:login.bookinfo.com', 'DNS:weighted.bookinfo.com'], serial: 10 });
  reviews = await makeLeaf(dir, upstreamCa, 'reviews', { cn: 'reviews.bookinfo.com', o: 'reviews upstream', sans: ['DNS:reviews.bookinfo.com', 'DNS:weighted.bookinfo.com'], serial: 11 });
  nginxCert = await makeLeaf(dir, upstreamCa, 'nginx', { cn: 'nginx.example.com', o: 'some organization', sans: ['DNS:nginx.example.com'], serial: 12 });
  termCert = await makeLeaf(dir, gatewayCa, 'term', { cn: 'term.example.com', o: 'gateway terminated', sans: ['DNS:term.example.com'], serial: 13 });

  meshCert = await makeLeaf(dir, upstreamCa, 'mesh', { cn: 'tls-echo.mesh.svc.local', o: 'mesh workload', sans: ['DNS:tls-echo.mesh.svc.local'], serial: 14 });
  [P, P2, P3, P4, loginPort, reviewsPort, nginxPort] = await freePorts(7) as [number, number, number, number, number, number, number];
  tlsEcho = await startTcpEcho({ tls: { cert: meshCert.cert, key: meshCert.key, alpn: ['istio'] } });
  nginx = await startNginx({
    http: [
      nginxTlsServer({ port: loginPort, cert: login.cert, key: login.key, serverName: 'login.bookinfo.com' }),
      nginxTlsServer({ port: reviewsPort, cert: reviews.cert, key: reviews.key, serverName: 'reviews.bookinfo.com' }),
      nginxTlsServer({ port: nginxPort, cert: nginxCert.cert, key: nginxCert.key, serverName: 'nginx.example.com' }),
    ].join('\n'),
  });
  echo = await startTcpEcho();

  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'gateway.yaml'), `apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: ${P}
      name: tls
      protocol: TLS
    tls:
      mode: PASSTHROUGH
    hosts:
    - "*.bookinfo.com"
`);
  await writeFile(path.join(cfg, 'seed.yaml'), seedVirtualService(P));
  await writeFile(path.join(cfg, 'services.yaml'), [
    serviceEntry('login', 'default', 'login.prod.svc.cluster.local', 443, loginPort),
    serviceEntry('reviews', 'default', 'reviews.prod.svc.cluster.local', 443, reviewsPort),
    serviceEntry('my-nginx', 'mesh-external', 'my-nginx.mesh-external.svc.cluster.local', 443, nginxPort),
  ].join('---\n'));
  // Two destinations, equal weights: connections split between them.
  await writeFile(path.join(cfg, 'weighted.yaml'), `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: weighted
spec:
  hosts:
  - weighted.bookinfo.com
  gateways:
  - mygateway
  tls:
  - match:
    - sniHosts:
      - weighted.bookinfo.com
    route:
    - destination:
        host: login.prod.svc.cluster.local
      weight: 50
    - destination:
        host: reviews.prod.svc.cluster.local
      weight: 50
`);
  // Istio's "Ingress Gateway without TLS Termination" task.
  await writeFile(path.join(cfg, 'istio-task.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway2
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: ${P2}
      name: https
      protocol: HTTPS
    tls:
      mode: PASSTHROUGH
    hosts:
    - nginx.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: nginx
spec:
  hosts:
  - nginx.example.com
  gateways:
  - mygateway2
  tls:
  - match:
    - port: ${P2}
      sniHosts:
      - nginx.example.com
    route:
    - destination:
        host: my-nginx.mesh-external.svc.cluster.local
        port:
          number: 443
`);
  // One port, two servers: pass.example.com passes through, term.example.com is terminated here.
  await writeFile(path.join(cfg, 'shared.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: shared
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: ${P3}
      name: tls-pass
      protocol: TLS
    tls:
      mode: PASSTHROUGH
    hosts:
    - pass.example.com
  - port:
      number: ${P3}
      name: tls-term
      protocol: TLS
    tls:
      mode: SIMPLE
      serverCertificate: ${termCert.cert}
      privateKey: ${termCert.key}
    hosts:
    - term.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: pass
spec:
  hosts:
  - pass.example.com
  gateways:
  - shared
  tls:
  - match:
    - sniHosts:
      - pass.example.com
    route:
    - destination:
        host: login.prod.svc.cluster.local
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: term
spec:
  hosts:
  - term.example.com
  gateways:
  - shared
  tcp:
  - route:
    - destination:
        host: echo.local
        port:
          number: ${echo.port}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: echo
spec:
  hosts:
  - echo.local
  location: MESH_EXTERNAL
  ports:
  - number: ${echo.port}
    name: tcp
    protocol: TCP
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
`);
  // An east-west gateway: SNI outbound_.<port>_.<subset>_.<host>, no VirtualService.
  await writeFile(path.join(cfg, 'eastwest.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: cross-network-gateway
  namespace: istio-system
spec:
  selector:
    istio: eastwestgateway
  servers:
  - port:
      number: ${P4}
      name: tls
      protocol: TLS
    tls:
      mode: AUTO_PASSTHROUGH
    hosts:
    - "*.local"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: tls-echo
  namespace: mesh
spec:
  hosts:
  - tls-echo.mesh.svc.local
  location: MESH_INTERNAL
  ports:
  - number: 7443
    name: tls
    protocol: TLS
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      tls: ${tlsEcho.port}
`);
  gw = await startTlsgate({ configPaths: [cfg], args: ['--bind-address', '127.0.0.1', '--drain-grace', '0'] });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await echo?.close();
  await tlsEcho?.close();
  await rm(dir, { recursive: true, force: true });
});

/** A TLS handshake through the gateway; resolves with the peer's CN (no verification: tests read the cert). */
function peerCn(port: number, servername: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false });
    s.setTimeout(5_000, () => s.destroy(new Error('handshake timed out')));
    s.on('error', reject);
    s.once('secureConnect', () => {
      const cn = s.getPeerCertificate().subject?.CN;
      s.end();
      resolve(String(cn));
    });
  });
}

/** Waits until the socket is closed by the peer; resolves with what arrived. */
function readUntilClose(s: net.Socket, timeoutMs = 5_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const t = setTimeout(() => { s.destroy(); reject(new Error('not closed in time')); }, timeoutMs);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.on('close', () => { clearTimeout(t); resolve(Buffer.concat(chunks)); });
  });
}

describe('PASSTHROUGH by SNI (seed example)', () => {
  it('curl with the upstream CA reaches each nginx by SNI', async () => {
    for (const host of ['login.bookinfo.com', 'reviews.bookinfo.com']) {
      const res = await curl([...resolveArgs(host, P), '--cacert', upstreamCa.cert, `https://${host}:${P}/`]);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(res.status, 200);
      const body = JSON.parse(res.body) as { ssl_server_name: string; server_port: string };
      assert.equal(body.ssl_server_name, host);
      assert.equal(body.server_port, String(host.startsWith('login') ? loginPort : reviewsPort));
    }
    const entry = await gw.waitForAccessLog((e) => e.sni === 'reviews.bookinfo.com' && e.reason === 'ok');
    assert.equal(entry.route, 'default/bookinfo-sni#tls[1]');
    assert.equal(entry.cluster, 'outbound|443||reviews.prod.svc.cluster.local');
    assert.ok(Number(entry.bytesReceived) > 0 && Number(entry.bytesSent) > 0);
  });

  it('openssl s_client sees the upstream certificate, not one of the gateway', async () => {
    const r = await opensslSClient({ port: P, servername: 'reviews.bookinfo.com', cafile: upstreamCa.cert });
    assert.ok(r.handshake, r.stderr);
    assert.equal(r.peerCert?.subject, 'CN = reviews.bookinfo.com, O = reviews upstream');
    assert.equal(r.peerCert?.issuer, 'O = bookinfo upstreams, CN = upstream-ca');
    assert.equal(r.verifyCode, 0);
  });

  it('unknown SNI: TLS alert and reason no_sni_match', async () => {
    const r = await opensslSClient({ port: P, servername: 'unknown.bookinfo.com' });
    assert.equal(r.handshake, false);
    assert.ok(r.alertReceived, r.stderr);
    assert.equal(r.alertDescription, 'unrecognized name');
    await gw.waitForAccessLog((e) => e.sni === 'unknown.bookinfo.com' && e.reason === 'no_sni_match');
  });

  it('no SNI: closed with reason no_sni', async () => {
    const before = gw.accessLogs().filter((e) => e.reason === 'no_sni').length;
    const r = await opensslSClient({ port: P, noServername: true });
    assert.equal(r.handshake, false);
    await gw.waitForAccessLog(() => gw.accessLogs().filter((e) => e.reason === 'no_sni').length > before);
  });

  it('plaintext bytes: closed with reason not_tls', async () => {
    const s = net.connect({ host: '127.0.0.1', port: P });
    s.write('GET / HTTP/1.1\r\nHost: login.bookinfo.com\r\n\r\n');
    const got = await readUntilClose(s);
    assert.equal(got.includes(Buffer.from('HTTP/1.1')), false);
    await gw.waitForAccessLog((e) => e.reason === 'not_tls' && e.listener === `127.0.0.1_${P}`);
  });

  it('weighted routes split connections between both destinations', async () => {
    const seen = new Map<string, number>();
    for (let i = 0; i < 40; i++) {
      const cn = await peerCn(P, 'weighted.bookinfo.com');
      seen.set(cn, (seen.get(cn) ?? 0) + 1);
    }
    assert.deepEqual([...seen.keys()].sort(), ['login.bookinfo.com', 'reviews.bookinfo.com']);
    for (const n of seen.values()) assert.ok(n >= 4, `split ${JSON.stringify([...seen])}`);
  });

  it('a 2-3 kB ClientHello written one byte at a time still routes', { timeout: 30_000 }, async () => {
    const raw = net.connect({ host: '127.0.0.1', port: P });
    raw.setNoDelay(true);
    await new Promise<void>((res, rej) => { raw.once('connect', res); raw.once('error', rej); });
    let written = 0;
    // A duplex that hands the TLS layer's bytes to the TCP socket one byte per write.
    const splitter = new Duplex({
      write(chunk: Buffer, _enc, cb) {
        let i = 0;
        const next = (): void => {
          if (i >= chunk.length) { cb(); return; }
          raw.write(chunk.subarray(i, i + 1));
          i++;
          written++;
          setImmediate(next);
        };
        next();
      },
      read() { raw.resume(); },
      final(cb) { raw.end(); cb(); },
    });
    raw.on('data', (c: Buffer) => { if (!splitter.push(c)) raw.pause(); });
    raw.on('end', () => splitter.push(null));
    raw.on('error', (e) => splitter.destroy(e));
    const alpn = Array.from({ length: 12 }, (_, i) => `x-long-protocol-${i}-`.padEnd(200, 'p'));
    const s = tls.connect({ socket: splitter, servername: 'login.bookinfo.com', ca: upstreamCa.certPem, ALPNProtocols: [...alpn, 'http/1.1'] });
    s.on('error', () => {});
    await new Promise<void>((res, rej) => {
      s.once('secureConnect', res);
      s.once('error', rej);
      setTimeout(() => rej(new Error('no handshake')), 15_000).unref();
    });
    assert.ok(written > 2_000, `hello was ${written} bytes`);
    assert.equal(s.authorized, true);
    assert.equal(s.getPeerCertificate().subject.CN, 'login.bookinfo.com');
    s.write('GET / HTTP/1.1\r\nHost: login.bookinfo.com\r\nConnection: close\r\n\r\n');
    const body = await new Promise<string>((res) => {
      let got = '';
      const t = setTimeout(() => res(got), 5_000);
      s.on('data', (c: Buffer) => {
        got += c.toString();
        if (got.includes('}\n')) { clearTimeout(t); res(got); }
      });
      s.on('close', () => { clearTimeout(t); res(got); });
    });
    s.destroy();
    raw.destroy();
    assert.match(body, /"ssl_server_name":"login.bookinfo.com"/);
  });
});

describe('Istio task: Ingress Gateway without TLS Termination', () => {
  it('HTTPS server with PASSTHROUGH routes by a VirtualService tls route', async () => {
    const res = await curl([...resolveArgs('nginx.example.com', P2), '--cacert', upstreamCa.cert, `https://nginx.example.com:${P2}/`]);
    assert.equal(res.code, 0, res.stderr);
    assert.equal((JSON.parse(res.body) as { ssl_server_name: string }).ssl_server_name, 'nginx.example.com');
    const r = await opensslSClient({ port: P2, servername: 'nginx.example.com' });
    assert.equal(r.peerCert?.subject, 'CN = nginx.example.com, O = some organization');
  });
});

describe('PASSTHROUGH and SIMPLE on one port', () => {
  it('selects by SNI only: one host passes through, the other is terminated here', async () => {
    const pass = await opensslSClient({ port: P3, servername: 'pass.example.com', cafile: upstreamCa.cert });
    assert.ok(pass.handshake, pass.stderr);
    assert.equal(pass.peerCert?.subject, 'CN = login.bookinfo.com, O = login upstream');

    const term = await opensslSClient({ port: P3, servername: 'term.example.com', cafile: gatewayCa.cert });
    assert.ok(term.handshake, term.stderr);
    assert.equal(term.peerCert?.subject, 'CN = term.example.com, O = gateway terminated');
    assert.equal(term.verifyCode, 0);
    // The terminated stream goes on to the plain TCP echo.
    const echoed = await new Promise<string>((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: P3, servername: 'term.example.com', ca: gatewayCa.certPem }, () => s.write('hello through tls\n'));
      let got = '';
      s.setTimeout(5_000, () => s.destroy(new Error(`timed out with ${JSON.stringify(got)}`)));
      s.on('error', reject);
      s.on('data', (c: Buffer) => { got += c.toString(); if (got.endsWith('\n')) { s.end(); resolve(got); } });
    });
    assert.equal(echoed, 'hello through tls\n');

    const none = await opensslSClient({ port: P3, servername: 'other.example.com' });
    assert.equal(none.handshake, false);
  });
});

describe('AUTO_PASSTHROUGH', () => {
  const sni = 'outbound_.7443_._.tls-echo.mesh.svc.local';

  it('an Istio-style SNI with ALPN istio reaches the upstream, which completes the handshake', async () => {
    const r = await opensslSClient({ port: P4, servername: sni, alpn: 'istio', input: 'mesh bytes\n', waitForClose: true, timeoutMs: 2_500 });
    assert.ok(r.handshake, r.stderr);
    assert.equal(r.peerCert?.subject, 'CN = tls-echo.mesh.svc.local, O = mesh workload');
    assert.equal(r.alpn, 'istio');
    assert.match(r.stdout, /^mesh bytes$/m);
    const entry = await gw.waitForAccessLog((e) => e.sni === sni && e.kind === 'tcp');
    assert.match(String(entry.cluster), /7443/);
  });

  it('without an Istio ALPN the connection is closed', async () => {
    const r = await opensslSClient({ port: P4, servername: sni });
    assert.equal(r.handshake, false);
    const h2 = await opensslSClient({ port: P4, servername: sni, alpn: 'h2' });
    assert.equal(h2.handshake, false);
    assert.equal(tlsEcho.connections, 1);
  });

  it('an unknown service name is closed', async () => {
    const r = await opensslSClient({ port: P4, servername: 'outbound_.7443_._.nope.mesh.svc.local', alpn: 'istio' });
    assert.equal(r.handshake, false);
    await gw.waitForAccessLog((e) => e.sni === 'outbound_.7443_._.nope.mesh.svc.local' && e.reason === 'no_sni_match');
  });
});

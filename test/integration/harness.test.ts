// Proves the integration harness against real peers: certificates minted by openssl, nginx
// (http + stream), MariaDB with TLS, curl, openssl s_client and the Node upstreams.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { parse as parseYaml } from 'yaml';
import {
  certDir, certSha256Colons, certSha256Hex, makeCa, makeLeaf, spkiSha256Base64, writeSecretYaml,
  type Ca, type KeyPair,
} from '../helpers/certs.js';
import { curl, opensslSClient, opensslSubjectIssuer, resolveArgs, run } from '../helpers/exec.js';
import { startMariadb } from '../helpers/mariadb.js';
import { nginxStreamTlsProxy, nginxTlsServer, startNginx } from '../helpers/nginx.js';
import { freePort, freePorts, waitForPort } from '../helpers/ports.js';
import { startTlsgate } from '../helpers/tlsgate.js';
import { startEchoServer, startServerFirst, startTcpEcho } from '../helpers/upstreams.js';

let dir: string;
let ca: Ca;
let httpbin: KeyPair;
let client: KeyPair;
let dbCert: KeyPair;

before(async () => {
  dir = await certDir();
  ca = await makeCa(dir, 'example.com', '/O=example Inc./CN=example.com');
  httpbin = await makeLeaf(dir, ca, 'httpbin.example.com', { cn: 'httpbin.example.com', o: 'httpbin organization', serial: 0 });
  client = await makeLeaf(dir, ca, 'client.example.com', { cn: 'client.example.com', o: 'client organization', serial: 1 });
  dbCert = await makeLeaf(dir, ca, 'db', {
    cn: 'db.example.com', sans: ['DNS:db.example.com', 'IP:127.0.0.1'], serial: 2, ec: true, extendedKeyUsage: ['serverAuth'],
  });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Sends `send` (if any) and reads until `expected` characters arrived or the socket closes. */
function exchange(port: number, send: string | undefined, expected: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    let got = '';
    socket.setTimeout(5_000, () => socket.destroy(new Error(`timed out with ${JSON.stringify(got)}`)));
    socket.on('error', reject);
    socket.on('data', (c: Buffer) => {
      got += c.toString('utf8');
      if (got.length >= expected) socket.end();
    });
    socket.on('close', () => resolve(got));
    if (send !== undefined) socket.write(send);
  });
}

describe('certs', () => {
  it('mints the Istio task certificates (CN-only, RSA) and variants', async () => {
    const leaf = new X509Certificate(httpbin.certPem);
    assert.equal(leaf.subject, 'CN=httpbin.example.com\nO=httpbin organization');
    assert.equal(leaf.issuer, 'O=example Inc.\nCN=example.com');
    assert.equal(leaf.subjectAltName, undefined);
    assert.equal(leaf.publicKey.asymmetricKeyType, 'rsa');
    assert.ok(leaf.verify(new X509Certificate(ca.certPem).publicKey));

    const ec = new X509Certificate(dbCert.certPem);
    assert.equal(ec.publicKey.asymmetricKeyType, 'ec');
    assert.equal(ec.subjectAltName, 'DNS:db.example.com, IP Address:127.0.0.1');

    const spiffe = await makeLeaf(dir, ca, 'sleep', { cn: 'sleep', sans: ['URI:spiffe://cluster.local/ns/default/sa/sleep'], serial: 7 });
    assert.equal(new X509Certificate(spiffe.certPem).subjectAltName, 'URI:spiffe://cluster.local/ns/default/sa/sleep');

    const expired = await makeLeaf(dir, ca, 'expired', { cn: 'expired.example.com', serial: 9, expired: true });
    const exp = new X509Certificate(expired.certPem);
    assert.ok(Date.parse(exp.validTo) < Date.now());
    assert.equal(exp.serialNumber, '09');
    const verify = await run('openssl', ['verify', '-CAfile', ca.cert, expired.cert]);
    assert.notEqual(verify.code, 0);
    assert.match(verify.stderr + verify.stdout, /certificate has expired/);

    const inter = await makeCa(dir, 'intermediate', '/O=example Inc./CN=intermediate', { parent: ca });
    const viaInter = await makeLeaf(dir, inter, 'chained', { cn: 'chained.example.com', serial: 3 });
    const chain = await run('openssl', ['verify', '-CAfile', ca.cert, '-untrusted', inter.cert, viaInter.cert]);
    assert.equal(chain.code, 0, chain.stderr);
  });

  it('computes SPKI and certificate digests the way the openssl pipelines do', async () => {
    const pub = await run('openssl', ['x509', '-in', client.cert, '-noout', '-pubkey']);
    const der = await run('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub.stdout });
    const dgst = await run('openssl', ['dgst', '-sha256', '-binary'], { input: der.stdoutBytes });
    assert.equal(spkiSha256Base64(client.certPem), dgst.stdoutBytes.toString('base64'));

    const certDer = await run('openssl', ['x509', '-in', client.cert, '-outform', 'der']);
    const certDgst = await run('openssl', ['dgst', '-sha256', '-r'], { input: certDer.stdoutBytes });
    assert.equal(certSha256Hex(client.certPem), certDgst.stdout.split(' ')[0]);
    assert.equal(certSha256Colons(client.certPem).replaceAll(':', '').toLowerCase(), certSha256Hex(client.certPem));
  });

  it('writes a v1 Secret with base64 data', () => {
    const text = writeSecretYaml('httpbin-credential', 'istio-system', 'kubernetes.io/tls', {
      'tls.crt': httpbin.certPem, 'tls.key': httpbin.keyPem,
    });
    const doc = parseYaml(text) as { kind: string; type: string; metadata: { name: string; namespace: string }; data: Record<string, string> };
    assert.equal(doc.kind, 'Secret');
    assert.equal(doc.type, 'kubernetes.io/tls');
    assert.deepEqual(doc.metadata, { name: 'httpbin-credential', namespace: 'istio-system' });
    assert.equal(Buffer.from(doc.data['tls.crt'] ?? '', 'base64').toString('utf8'), httpbin.certPem);
  });
});

describe('node upstreams', () => {
  it('echo server over TLS + h2 reports SNI, ALPN and client cert to curl', async () => {
    const echo = await startEchoServer({ tls: { cert: httpbin.cert, key: httpbin.key, ca: ca.cert, requestCert: true }, h2: true, name: 'a' });
    try {
      const res = await curl([...resolveArgs('httpbin.example.com', echo.port), '--cacert', ca.cert,
        '--cert', client.cert, '--key', client.key, '--http2', '-H', 'x-test: 1', '--data', 'hello',
        `https://httpbin.example.com:${echo.port}/anything?q=1`]);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(res.status, 200);
      assert.equal(res.httpVersion, '2');
      assert.equal(res.headers['x-echo-server'], 'a');
      const body = JSON.parse(res.body) as Record<string, unknown>;
      assert.equal(body.sni, 'httpbin.example.com');
      assert.equal(body.alpn, 'h2');
      assert.equal(body.method, 'POST');
      assert.equal(body.url, '/anything?q=1');
      assert.equal(body.body, 'hello');
      assert.equal(body.clientCertSubject, 'CN=client.example.com, O=client organization');
      assert.equal((body.headers as Record<string, string>)['x-test'], '1');

      const teapot = await curl([...resolveArgs('httpbin.example.com', echo.port), '--cacert', ca.cert,
        '--cert', client.cert, '--key', client.key, '--http1.1', `https://httpbin.example.com:${echo.port}/status/418`]);
      assert.equal(teapot.status, 418);
      assert.equal(teapot.httpVersion, '1.1');
      assert.match(teapot.body, /teapot/);

      // Without a client certificate the handshake is refused: curl fails, no HTTP status.
      const refused = await curl([...resolveArgs('httpbin.example.com', echo.port), '--cacert', ca.cert,
        `https://httpbin.example.com:${echo.port}/`]);
      assert.notEqual(refused.code, 0);
      assert.equal(refused.status, 0);
      assert.equal(echo.requests, 2);
    } finally {
      await echo.close();
    }
  });

  it('plain HTTP echo handles /delay and counts requests', async () => {
    const echo = await startEchoServer();
    try {
      const res = await curl([`http://127.0.0.1:${echo.port}/delay/50`]);
      assert.equal(res.status, 200);
      const body = JSON.parse(res.body) as Record<string, unknown>;
      assert.equal(body.sni, null);
      assert.equal(body.httpVersion, '1.1');
      assert.equal(echo.requests, 1);
    } finally {
      await echo.close();
    }
  });

  it('TCP echo and server-first banner', async () => {
    const tcp = await startTcpEcho();
    const banner = await startServerFirst({ banner: 'HELLO\n' });
    try {
      assert.equal(await exchange(tcp.port, 'ping', 4), 'ping');
      assert.equal(tcp.connections, 1);
      assert.equal(await exchange(banner.port, undefined, 6), 'HELLO\n');
      assert.equal(await exchange(banner.port, 'x', 7), 'HELLO\nx');
    } finally {
      await tcp.close();
      await banner.close();
    }
  });
});

describe('nginx', () => {
  it('TLS echo server answers curl with the SNI and client DN it saw', async () => {
    const [port, mtlsPort] = (await freePorts(2)) as [number, number];
    const nginx = await startNginx({
      http: [
        nginxTlsServer({ port, cert: httpbin.cert, key: httpbin.key, serverName: 'httpbin.example.com' }),
        nginxTlsServer({ port: mtlsPort, cert: httpbin.cert, key: httpbin.key, serverName: 'httpbin.example.com',
          clientCa: ca.cert, verifyClient: 'on' }),
      ].join('\n'),
    });
    try {
      assert.deepEqual(nginx.ports, [port, mtlsPort]);
      const res = await curl([...resolveArgs('httpbin.example.com', port), '--cacert', ca.cert,
        '-H', 'x-forwarded-client-cert: By="spiffe://a";Subject="CN=x"', `https://httpbin.example.com:${port}/status/418`]);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(res.status, 200);
      const body = JSON.parse(res.body) as Record<string, string>;
      assert.equal(body.ssl_server_name, 'httpbin.example.com');
      assert.equal(body.host, 'httpbin.example.com');
      assert.equal(body.ssl_client_verify, 'NONE');
      assert.match(body.ssl_protocol ?? '', /^TLSv1\.[23]$/);
      assert.equal(res.headers['x-echo-xfcc'], 'By="spiffe://a";Subject="CN=x"');

      const mtls = await curl([...resolveArgs('httpbin.example.com', mtlsPort), '--cacert', ca.cert,
        '--cert', client.cert, '--key', client.key, `https://httpbin.example.com:${mtlsPort}/`]);
      assert.equal(mtls.status, 200, mtls.stderr);
      const mbody = JSON.parse(mtls.body) as Record<string, string>;
      assert.equal(mbody.ssl_client_verify, 'SUCCESS');
      assert.equal(mbody.ssl_client_s_dn, 'O=client organization,CN=client.example.com');

      const s = await opensslSClient({ port, servername: 'httpbin.example.com', cafile: ca.cert, alpn: ['http/1.1'] });
      assert.ok(s.handshake, s.stderr);
      assert.equal(s.peerCert?.subject, 'CN = httpbin.example.com, O = httpbin organization');
      assert.equal(s.peerCert?.issuer, 'O = example Inc., CN = example.com');
      assert.deepEqual(await opensslSubjectIssuer(s.peerCert?.pem ?? ''), {
        subject: 'CN = httpbin.example.com, O = httpbin organization',
        issuer: 'O = example Inc., CN = example.com',
      });
      assert.equal(s.alpn, 'http/1.1');
      assert.equal(s.verifyCode, 0);
      assert.equal(s.alertReceived, false);

      const tls12 = await opensslSClient({ port, servername: 'httpbin.example.com', extraArgs: ['-tls1_2'] });
      assert.equal(tls12.protocol, 'TLSv1.2');
      assert.equal(tls12.alpn, undefined);
      assert.notEqual(tls12.verifyCode, 0); // no CAfile given: the issuer is unknown

      const mtlsProbe = await opensslSClient({ port: mtlsPort, servername: 'httpbin.example.com', cafile: ca.cert });
      assert.ok(mtlsProbe.clientCertRequested);
    } finally {
      assert.equal(await nginx.stop(), 0);
    }
  });

  it('stream module terminates TLS in front of a TCP echo; a refused cipher gets an alert', async () => {
    const tcp = await startTcpEcho();
    const port = await freePort();
    const nginx = await startNginx({ stream: nginxStreamTlsProxy({ port, cert: httpbin.cert, key: httpbin.key, upstreamPort: tcp.port }) });
    try {
      const echoed = await new Promise<string>((resolve, reject) => {
        const socket = tls.connect({ port, host: '127.0.0.1', servername: 'httpbin.example.com', ca: ca.certPem });
        socket.setTimeout(5_000, () => socket.destroy(new Error('timed out')));
        socket.on('error', reject);
        socket.on('secureConnect', () => socket.write('over-tls\n'));
        socket.on('data', (c: Buffer) => {
          socket.end();
          resolve(c.toString('utf8'));
        });
      });
      assert.equal(echoed, 'over-tls\n');
      assert.equal(tcp.connections, 1);

      const refused = await opensslSClient({ port, extraArgs: ['-tls1_3', '-ciphersuites', 'TLS_AES_128_CCM_8_SHA256'] });
      assert.equal(refused.handshake, false);
      assert.ok(refused.alertReceived, refused.stderr);
      assert.equal(refused.alertDescription, 'handshake failure');
    } finally {
      await nginx.stop();
      await tcp.close();
    }
  });
});

describe('mariadb', () => {
  it('starts with TLS; the client connects over verified TLS and plaintext is refused when required', async () => {
    const db = await startMariadb({ tls: { cert: dbCert.cert, key: dbCert.key, ca: ca.cert }, requireSecureTransport: true });
    try {
      await waitForPort(db.port, 1_000);
      const res = await db.client(['--ssl', `--ssl-ca=${ca.cert}`, '--ssl-verify-server-cert', '-N', '-e',
        "select 1; show status like 'Ssl_version'"]);
      assert.equal(res.code, 0, res.stderr);
      assert.match(res.stdout, /^1$/m);
      assert.match(res.stdout, /Ssl_version\tTLSv1\.[23]/);
      const plain = await db.client(['--skip-ssl', '-e', 'select 1']);
      assert.notEqual(plain.code, 0);
      // MariaDB reports a require_secure_transport refusal as an access denial.
      assert.match(plain.stderr, /Access denied|insecure transport/i);
    } finally {
      assert.equal(await db.stop(), 0);
    }
  });
});

describe('tlsgate launcher', () => {
  it('fails fast with the child stderr when the entry point cannot start', async () => {
    await assert.rejects(
      startTlsgate({ configPaths: ['/nonexistent'], main: '/nonexistent/main.js' }),
      /exited \(code 1[\s\S]*Cannot find module/,
    );
  });

  it('waits for /ready, collects logs and access logs, stops by signal', async () => {
    // A stand-in entry point (not tlsgate): proves the launcher's contract before the CLI exists.
    const stubDir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-stub-'));
    const stub = path.join(stubDir, 'main.mjs');
    await writeFile(stub, `
      import http from 'node:http';
      const argv = process.argv.slice(2);
      const port = Number(argv[argv.indexOf('--admin-port') + 1]);
      console.error('starting with ' + JSON.stringify(argv));
      let ready = false;
      setTimeout(() => { ready = true; }, 200);
      http.createServer((req, res) => {
        res.statusCode = req.url === '/ready' && ready ? 200 : 503;
        res.end();
        if (req.url === '/ready' && ready) console.log(JSON.stringify({ authority: 'a.example.com', status: 200, reason: 'ok' }));
      }).listen(port, argv[argv.indexOf('--admin-address') + 1]);
      process.on('SIGTERM', () => { console.log('draining'); process.exit(0); });
    `);
    try {
      const gw = await startTlsgate({ configPaths: ['a.yaml', 'b'], args: ['--log-level', 'debug'], main: stub });
      assert.ok(gw.running);
      const started = await gw.waitForLog(/^starting with/);
      assert.match(started, /"run","--config","a.yaml","--config","b","--admin-port","\d+","--admin-address","127.0.0.1","--log-level","debug"/);
      const entry = await gw.waitForAccessLog((e) => e.authority === 'a.example.com');
      assert.equal(entry.status, 200);
      assert.equal((await gw.admin('/ready')).status, 200);
      assert.equal(await gw.stop(), 0);
      assert.ok(gw.logs().includes('draining'));
      assert.equal(gw.running, false);
    } finally {
      await rm(stubDir, { recursive: true, force: true });
    }
  });
});

/**
 * The CA server in-process, with real HTTPS on 127.0.0.1: status codes for every kind of bad
 * request, body limits, TTL capping, and that it keeps serving afterwards.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { MeshCa, initCaDir } from '../../../src/mesh/ca.js';
import { CaServer, MAX_SIGN_BODY_BYTES, startCaServer, type CaLogger } from '../../../src/mesh/ca-server.js';
import { WorkloadIdentity } from '../../../src/mesh/identity.js';
import { createCsr } from '../../../src/pki/mint.js';

interface Reply { status: number; json: Record<string, unknown> | undefined }

function request(port: number, ca: string, method: string, path: string, body?: string | Buffer): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, method, path, ca, agent: false, timeout: 10_000, servername: 'localhost' }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        let json: Record<string, unknown> | undefined;
        try {
          json = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (e) => {
      // The server may close after answering 413 while we are still writing.
      if ((e as { code?: string }).code === 'EPIPE' || (e as { code?: string }).code === 'ECONNRESET') resolve({ status: -1, json: undefined });
      else reject(e);
    });
    req.end(body);
  });
}

describe('CA server (in-process)', () => {
  let base: string;
  let ca: MeshCa;
  let server: CaServer;
  const logs: { level: string; obj: Record<string, unknown>; msg: string }[] = [];
  const logger: CaLogger = {
    info: (obj, msg) => logs.push({ level: 'info', obj: obj as Record<string, unknown>, msg }),
    warn: (obj, msg) => logs.push({ level: 'warn', obj: obj as Record<string, unknown>, msg }),
    error: (obj, msg) => logs.push({ level: 'error', obj: obj as Record<string, unknown>, msg }),
  };

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'tlsgate-caserver-'));
    await initCaDir(join(base, 'ca'));
    ca = await MeshCa.load(join(base, 'ca'));
    server = await startCaServer({ ca, port: 0, workloadCertTtlMs: 60_000, logger });
  });
  after(async () => {
    await server.close();
    await rm(base, { recursive: true, force: true });
  });

  const sign = (body: unknown): Promise<Reply> => request(server.port, ca.root.certPem, 'POST', '/v1/sign', JSON.stringify(body));

  it('serves a certificate named for localhost, 127.0.0.1 and istiod.istio-system.svc, issued by the root', async () => {
    const r = await request(server.port, ca.root.certPem, 'GET', '/ready');
    assert.equal(r.status, 200);
    const cert = await new Promise<X509Certificate>((resolve, reject) => {
      const req = https.request({ host: '127.0.0.1', port: server.port, path: '/ready', ca: ca.root.certPem, agent: false }, (res) => {
        const peer = (res.socket as import('node:tls').TLSSocket).getPeerX509Certificate();
        res.resume();
        if (peer) resolve(peer);
        else reject(new Error('no peer certificate'));
      });
      req.on('error', reject);
      req.end();
    });
    assert.ok(cert.checkHost('istiod.istio-system.svc'));
    assert.ok(cert.checkHost('localhost'));
    assert.ok(cert.checkIP('127.0.0.1'));
    assert.ok(cert.verify(new X509Certificate(ca.root.certPem).publicKey));
  });

  it('caps the TTL at the configured maximum and honours a shorter request', async () => {
    const token = ca.mintToken('default', 'curl', 60_000);
    const long = await sign({ csr: (await createCsr()).csrPem, token, ttlSeconds: 3600 });
    assert.equal(long.status, 200, JSON.stringify(long.json));
    const longLeaf = new X509Certificate(String(long.json!['certChain']));
    assert.ok(Date.parse(longLeaf.validTo) <= Date.now() + 60_000);
    const short = await sign({ csr: (await createCsr()).csrPem, token, ttlSeconds: 5 });
    assert.equal(short.status, 200);
    assert.ok(Date.parse(new X509Certificate(String(short.json!['certChain'])).validTo) <= Date.now() + 5_000);
    assert.deepEqual(short.json!['rootCerts'], [ca.root.certPem]);
    const issued = logs.filter((l) => l.msg === 'issued workload certificate');
    assert.ok(issued.length >= 2);
    assert.equal(issued[0]!.obj['identity'], 'spiffe://cluster.local/ns/default/sa/curl');
    assert.equal(typeof issued[0]!.obj['serial'], 'string');
    assert.equal(typeof issued[0]!.obj['notAfter'], 'string');
  });

  it('answers 400/401/403/404/405/413 and never logs the token', async () => {
    const token = ca.mintToken('default', 'curl', 60_000);
    const csr = (await createCsr()).csrPem;
    assert.equal((await request(server.port, ca.root.certPem, 'POST', '/v1/sign', '{"csr": ')).status, 400);
    assert.equal((await sign([1, 2])).status, 400);
    assert.equal((await sign({ csr })).status, 400);
    assert.equal((await sign({ csr, token, ttlSeconds: -1 })).status, 400);
    assert.equal((await sign({ csr: 'garbage', token })).status, 400);
    const bad = await sign({ csr, token: token.slice(0, -2) + (token.endsWith('AA') ? 'BB' : 'AA') });
    assert.equal(bad.status, 401);
    assert.match(String(bad.json!['error']), /signature/);
    const expired = await sign({ csr, token: ca.mintToken('default', 'curl', 1_000, Date.now() - 10_000) });
    assert.equal(expired.status, 401);
    assert.match(String(expired.json!['error']), /expired/);
    assert.equal((await request(server.port, ca.root.certPem, 'GET', '/v1/sign')).status, 405);
    assert.equal((await request(server.port, ca.root.certPem, 'GET', '/nope')).status, 404);
    const big = await request(server.port, ca.root.certPem, 'POST', '/v1/sign', Buffer.alloc(MAX_SIGN_BODY_BYTES + 1, 0x20));
    assert.ok(big.status === 413 || big.status === -1, String(big.status));
    // Still serving.
    assert.equal((await sign({ csr, token })).status, 200);
    const text = JSON.stringify(logs);
    assert.ok(!text.includes(token), 'token never logged');
    assert.ok(!text.includes('PRIVATE KEY'));
  });

  it('gives a WorkloadIdentity over HTTPS its certificate', async () => {
    const rootFile = join(base, 'root.pem');
    await writeFile(rootFile, ca.root.certPem);
    const id = await WorkloadIdentity.fromCaUrl(server.url, {
      token: ca.mintToken('prod', 'api', 60_000),
      caRoot: rootFile,
      namespace: 'prod',
      serviceAccount: 'api',
      ttlMs: 30_000,
    });
    try {
      assert.equal(id.spiffeId, 'spiffe://cluster.local/ns/prod/sa/api');
      assert.equal(new X509Certificate(id.material().certChainPem).subjectAltName, 'URI:spiffe://cluster.local/ns/prod/sa/api');
      assert.ok(id.certificate().notAfter.getTime() <= Date.now() + 30_000);
    } finally {
      id.close();
    }
    // A token for another identity than the proxy claims is refused before any request.
    await assert.rejects(
      WorkloadIdentity.fromCaUrl(server.url, { token: ca.mintToken('prod', 'api', 60_000), caRoot: rootFile, namespace: 'prod', serviceAccount: 'db' }),
      /grants prod\/api/,
    );
    // A CA server we do not trust is refused (TLS verification).
    const otherRoot = join(base, 'other-root.pem');
    await initCaDir(join(base, 'other'));
    await writeFile(otherRoot, (await MeshCa.load(join(base, 'other'))).root.certPem);
    await assert.rejects(
      WorkloadIdentity.fromCaUrl(server.url, { token: ca.mintToken('prod', 'api', 60_000), caRoot: otherRoot, namespace: 'prod', serviceAccount: 'api' }),
      /certificate/,
    );
  });
});

/**
 * The mesh CA through the real CLI: `ca init`, `ca token`, `ca serve`, then a workload client and
 * real peers (curl, openssl) against the signing endpoint.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { webcrypto } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { WorkloadIdentity } from '../../src/mesh/identity.js';
import { createCsr } from '../../src/pki/mint.js';
import { x509 } from '../../src/runtime/pki/x509-lib.js';
import { curl, run, stopChild, trackChild } from '../helpers/exec.js';
import { freePort, waitForPort } from '../helpers/ports.js';
import { CLI_MAIN, REPO_ROOT, runCli } from '../helpers/tlsgate.js';

const mode = async (p: string): Promise<number> => (await stat(p)).mode & 0o777;

function post(port: number, ca: string, body: string): Promise<{ status: number; json: Record<string, unknown> | undefined }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/sign', ca, agent: false, timeout: 10_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        let json: Record<string, unknown> | undefined;
        try {
          json = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end(body);
  });
}

/** A CSR that asks for a URI SAN of its own choosing. */
async function csrForUri(uri: string): Promise<string> {
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: '',
    keys,
    signingAlgorithm: alg,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: uri }])],
  });
  return csr.toString('pem');
}

describe('tlsgate ca (CLI)', () => {
  let base: string;
  let dir: string;
  let rootPath: string;
  let rootPem: string;
  let token: string;
  let port: number;
  let serve: ReturnType<typeof spawn> | undefined;
  let serveLog = '';

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'tlsgate-ca-cli-'));
    dir = join(base, 'ca');
    rootPath = join(dir, 'root-cert.pem');
  });
  after(async () => {
    if (serve) await stopChild(serve);
    await rm(base, { recursive: true, force: true });
  });

  it('ca init creates a CA with restrictive modes and refuses to overwrite it', async () => {
    const r = await runCli(['ca', 'init', '--dir', dir, '--trust-domain', 'cluster.local']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /trust domain cluster.local/);
    assert.equal(await mode(dir), 0o700);
    assert.equal(await mode(join(dir, 'root-key.pem')), 0o600);
    assert.equal(await mode(join(dir, 'token-secret')), 0o600);
    assert.equal(await mode(rootPath), 0o644);
    const again = await runCli(['ca', 'init', '--dir', dir]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already exists.*--force/);
    const text = await run('openssl', ['x509', '-in', rootPath, '-noout', '-text']);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /CA:TRUE/);
    assert.match(text.stdout, /prime256v1|P-256/);
    rootPem = await readFile(rootPath, 'utf8');
  });

  it('ca token prints one token for the identity, and refuses an invalid one', async () => {
    const r = await runCli(['ca', 'token', '--dir', dir, '--namespace', 'default', '--service-account', 'curl', '--ttl', '1h']);
    assert.equal(r.code, 0, r.stderr);
    token = r.stdout.trim();
    assert.match(token, /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
    const claims = JSON.parse(Buffer.from(token.split('.')[0]!, 'base64url').toString('utf8')) as Record<string, unknown>;
    assert.equal(claims['ns'], 'default');
    assert.equal(claims['sa'], 'curl');
    assert.equal(claims['td'], 'cluster.local');
    const bad = await runCli(['ca', 'token', '--dir', dir, '--namespace', 'Default', '--service-account', 'curl']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /DNS-1123/);
  });

  it('ca serve issues a SPIFFE certificate to a workload client', async () => {
    port = await freePort();
    serve = spawn(process.execPath, [CLI_MAIN, 'ca', 'serve', '--dir', dir, '--port', String(port), '--address', '127.0.0.1', '--workload-cert-ttl', '1h'], {
      cwd: REPO_ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    trackChild(serve);
    serve.stdout!.on('data', (c: Buffer) => { serveLog += c.toString('utf8'); });
    serve.stderr!.on('data', (c: Buffer) => { serveLog = (serveLog + c.toString('utf8')).slice(-200_000); });
    await waitForPort(port, 20_000);

    const id = await WorkloadIdentity.fromCaUrl(`https://127.0.0.1:${port}`, {
      token, caRoot: rootPath, namespace: 'default', serviceAccount: 'curl',
    });
    try {
      assert.equal(id.spiffeId, 'spiffe://cluster.local/ns/default/sa/curl');
      const certFile = join(base, 'workload.pem');
      await writeFile(certFile, id.material().certChainPem);
      const text = await run('openssl', ['x509', '-in', certFile, '-noout', '-text']);
      assert.equal(text.code, 0, text.stderr);
      assert.match(text.stdout, /URI:spiffe:\/\/cluster\.local\/ns\/default\/sa\/curl/);
      assert.match(text.stdout, /Digital Signature, Key Encipherment/);
      assert.match(text.stdout, /TLS Web Server Authentication, TLS Web Client Authentication/);
      // openssl verifies the chain against the root file.
      const verify = await run('openssl', ['verify', '-CAfile', rootPath, certFile]);
      assert.equal(verify.code, 0, verify.stdout + verify.stderr);
      // TTL: at most the 1h the server allows.
      assert.ok(id.certificate().notAfter.getTime() <= Date.now() + 3_600_000);
      assert.ok(id.certificate().notAfter.getTime() > Date.now() + 3_000_000);
    } finally {
      id.close();
    }
    assert.match(serveLog, /issued workload certificate/);
    assert.match(serveLog, /spiffe:\/\/cluster.local\/ns\/default\/sa\/curl/);
  });

  it('refuses a bad token (401), another identity (403) and garbage (400), and keeps serving', async () => {
    const { csrPem } = await createCsr();
    const forged = token.slice(0, -3) + (token.endsWith('AAA') ? 'BBB' : 'AAA');
    const r401 = await post(port, rootPem, JSON.stringify({ csr: csrPem, token: forged }));
    assert.equal(r401.status, 401);
    assert.match(String(r401.json?.['error']), /token/);

    const otherCsr = await csrForUri('spiffe://cluster.local/ns/kube-system/sa/admin');
    const r403 = await post(port, rootPem, JSON.stringify({ csr: otherCsr, token }));
    assert.equal(r403.status, 403);
    assert.match(String(r403.json?.['error']), /asks for URI:spiffe:\/\/cluster.local\/ns\/kube-system\/sa\/admin.*grants only spiffe:\/\/cluster.local\/ns\/default\/sa\/curl/);

    // curl as a real peer, verifying the server with the root and the Istio CA name.
    const garbage = await curl(['--cacert', rootPath, '--resolve', `istiod.istio-system.svc:${port}:127.0.0.1`,
      '-H', 'content-type: application/json', '--data-binary', '{"csr": [garbage', `https://istiod.istio-system.svc:${port}/v1/sign`]);
    assert.equal(garbage.code, 0, garbage.stderr);
    assert.equal(garbage.status, 400);
    assert.match(garbage.body, /not JSON/);

    // Still up and still signing.
    const ok = await post(port, rootPem, JSON.stringify({ csr: csrPem, token }));
    assert.equal(ok.status, 200);
    assert.ok(Array.isArray(ok.json?.['rootCerts']));
    assert.equal(serve!.exitCode, null);
    assert.ok(!serveLog.includes(token), 'the token is never logged');
    assert.ok(!serveLog.includes('PRIVATE KEY'), 'no key is ever logged');
    assert.match(serveLog, /"status":401/);
    assert.match(serveLog, /"status":403/);
  });

  it('stops cleanly on SIGTERM', async () => {
    const code = await stopChild(serve!);
    serve = undefined;
    assert.equal(code, 0);
  });
});

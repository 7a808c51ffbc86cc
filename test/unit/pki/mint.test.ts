import assert from 'node:assert/strict';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createCa, createCrl, createCsr, issueCert, signCsr, writePemFiles } from '../../../src/pki/mint.js';
import { makeFixture, run, type Fixture } from './fixtures.js';

describe('mint', () => {
  let f: Fixture;
  before(async () => {
    f = await makeFixture();
  });
  after(() => f.cleanup());

  it('makes a CA that node sees as a CA and that signed its leaves', () => {
    const ca = new X509Certificate(f.ca.certPem);
    assert.equal(ca.ca, true);
    assert.equal(ca.subject, 'O=tlsgate\nCN=tlsgate test root');
    const leaf = new X509Certificate(f.server.certPem);
    assert.equal(leaf.ca, false);
    assert.ok(leaf.checkIssued(ca));
    assert.ok(leaf.verify(ca.publicKey));
    assert.equal(leaf.subjectAltName, 'DNS:localhost, IP Address:127.0.0.1');
    assert.ok(leaf.checkPrivateKey(createPrivateKey(f.server.keyPem)));
    assert.match(f.server.keyPem, /^-----BEGIN PRIVATE KEY-----/); // PKCS#8
    assert.equal(f.server.chainPem, f.server.certPem + f.ca.certPem);
  });

  it('issues certificates openssl verifies for the right purposes', async () => {
    const srv = await run('openssl', ['verify', '-CAfile', f.caPath, '-purpose', 'sslserver', join(f.dir, 'server.crt')]);
    assert.equal(srv.code, 0, srv.stderr);
    const cli = await run('openssl', ['verify', '-CAfile', f.caPath, '-purpose', 'sslclient', join(f.dir, 'client.crt')]);
    assert.equal(cli.code, 0, cli.stderr);
    // A client-only certificate is refused as a server certificate.
    const wrong = await run('openssl', ['verify', '-CAfile', f.caPath, '-purpose', 'sslserver', join(f.dir, 'client.crt')]);
    assert.notEqual(wrong.code, 0);
    const text = (await run('openssl', ['x509', '-in', join(f.dir, 'server.crt'), '-noout', '-text'])).stdout.toString();
    assert.match(text, /Basic Constraints: critical\s+CA:FALSE/);
    assert.match(text, /Key Usage: critical\s+Digital Signature/);
    assert.match(text, /Extended Key Usage:\s+TLS Web Server Authentication\n/);
    assert.match(text, /Subject Key Identifier/);
    assert.match(text, /Authority Key Identifier/);
  });

  it('gives each certificate a random positive serial', async () => {
    const a = new X509Certificate((await issueCert(f.ca, { commonName: 'a' })).certPem).serialNumber;
    const b = new X509Certificate((await issueCert(f.ca, { commonName: 'a' })).certPem).serialNumber;
    assert.notEqual(a, b);
    assert.equal(a.length, 32);
    assert.ok(parseInt(a[0]!, 16) < 8, 'high bit clear');
  });

  it('builds intermediates whose chains verify through openssl', async () => {
    const inter = await createCa({ commonName: 'intermediate', parent: f.ca, keyType: 'RSA' });
    const leaf = await issueCert(inter, { dnsNames: ['x.example.com'] });
    assert.equal(leaf.chainPem, leaf.certPem + inter.certPem + f.ca.certPem);
    const p = await writePemFiles(f.dir, 'via-inter', leaf);
    await writeFile(join(f.dir, 'inter.crt'), inter.certPem);
    const r = await run('openssl', ['verify', '-CAfile', f.caPath, '-untrusted', join(f.dir, 'inter.crt'), p.certPath]);
    assert.equal(r.code, 0, r.stderr);
    // RSA keys also get keyEncipherment.
    const rsa = await issueCert(f.ca, { commonName: 'r', keyType: 'RSA' });
    const text = (await run('openssl', ['x509', '-noout', '-text'], rsa.certPem)).stdout.toString();
    assert.match(text, /Digital Signature, Key Encipherment/);
  });

  it('signs a CSR with the CA-chosen SPIFFE identity and a short TTL', async () => {
    const { csrPem, keyPem } = await createCsr({ commonName: 'ignored' });
    const { certPem, chainPem } = await signCsr(f.ca, csrPem, { uris: ['spiffe://cluster.local/ns/a/sa/b'], ttlMs: 3_600_000 });
    const x = new X509Certificate(certPem);
    assert.equal(x.subjectAltName, 'URI:spiffe://cluster.local/ns/a/sa/b');
    assert.equal(x.subject, undefined); // empty subject; the identity is the SAN
    assert.ok(x.checkPrivateKey(createPrivateKey(keyPem)));
    const life = Date.parse(x.validTo) - Date.now();
    assert.ok(life > 3_500_000 && life <= 3_600_000, `lifetime ${life}`);
    assert.ok(chainPem.endsWith(f.ca.certPem));
    const text = (await run('openssl', ['x509', '-noout', '-text'], certPem)).stdout.toString();
    assert.match(text, /Subject Alternative Name: critical/);
    const v = await run('openssl', ['verify', '-CAfile', f.caPath, '-purpose', 'sslclient'], certPem);
    assert.equal(v.code, 0, v.stderr);
    // A CSR whose signature was tampered with is refused.
    const der = Buffer.from(csrPem.replace(/-----[A-Z ]+-----/g, '').replace(/\s/g, ''), 'base64');
    der[der.length - 1] ^= 0x01;
    const forged = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`;
    await assert.rejects(signCsr(f.ca, forged, { uris: ['spiffe://x'], ttlMs: 1000 }), /CSR/);
    // issueCert with a CSR returns no key.
    const viaIssue = await issueCert(f.ca, { csrPem, dnsNames: ['w.example.com'] });
    assert.equal('keyPem' in viaIssue, false);
    assert.equal(new X509Certificate(viaIssue.certPem).subjectAltName, 'DNS:w.example.com');
  });

  it('makes CRLs openssl uses to refuse a revoked certificate', async () => {
    const serial = new X509Certificate(f.client.certPem).serialNumber;
    const crlPath = join(f.dir, 'ca.crl');
    await writeFile(crlPath, await createCrl(f.ca, [serial]));
    const revoked = await run('openssl', ['verify', '-CAfile', f.caPath, '-crl_check', '-CRLfile', crlPath, join(f.dir, 'client.crt')]);
    assert.notEqual(revoked.code, 0);
    assert.match(revoked.stdout.toString() + revoked.stderr, /certificate revoked/);
    const fine = await run('openssl', ['verify', '-CAfile', f.caPath, '-crl_check', '-CRLfile', crlPath, join(f.dir, 'server.crt')]);
    assert.equal(fine.code, 0, fine.stderr);
  });

  it('writes keys with mode 0600 even over an existing file', async () => {
    await writeFile(join(f.dir, 'again.key'), 'old', { mode: 0o644 });
    const p = await writePemFiles(f.dir, 'again', f.server);
    assert.equal((await stat(p.keyPath!)).mode & 0o777, 0o600);
    assert.equal((await stat(p.certPath)).mode & 0o077, 0o044 & (await stat(p.certPath)).mode);
  });

  it('refuses an empty validity window and a bad IP', async () => {
    await assert.rejects(issueCert(f.ca, { notBeforeMs: 2000, notAfterMs: 1000 }), /later than notBefore/);
    await assert.rejects(issueCert(f.ca, { ips: ['not-an-ip'] }), /not an IP address/);
  });
});

import assert from 'node:assert/strict';
import { X509Certificate, webcrypto } from 'node:crypto';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CA_FILES, MeshCa, SignError, initCaDir, readTrustBundle, rotateRoot } from '../../../src/mesh/ca.js';
import { createCsr } from '../../../src/pki/mint.js';
import { splitPem } from '../../../src/runtime/pki/cert-info.js';
import { x509 } from '../../../src/runtime/pki/x509-lib.js';

/** A CSR that asks for these subjectAltNames (createCsr makes none). */
async function csrWithSans(names: { type: 'url' | 'dns'; value: string }[]): Promise<string> {
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: 'CN=workload',
    keys,
    signingAlgorithm: alg,
    extensions: [new x509.SubjectAlternativeNameExtension(names)],
  });
  return csr.toString('pem');
}

const mode = async (p: string): Promise<number> => (await stat(p)).mode & 0o777;

describe('mesh CA directory and workload signing', () => {
  let base: string;
  let dir: string;
  let ca: MeshCa;

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'tlsgate-meshca-'));
    dir = join(base, 'ca');
    await initCaDir(dir, { trustDomain: 'cluster.local' });
    ca = await MeshCa.load(dir);
  });
  after(() => rm(base, { recursive: true, force: true }));

  it('creates the files with restrictive modes and an EC P-256 self-signed root', async () => {
    assert.equal(await mode(dir), 0o700);
    assert.equal(await mode(join(dir, CA_FILES.rootKey)), 0o600);
    assert.equal(await mode(join(dir, CA_FILES.tokenSecret)), 0o600);
    assert.equal(await mode(join(dir, CA_FILES.rootCert)), 0o644);
    const root = new X509Certificate(await readFile(join(dir, CA_FILES.rootCert)));
    assert.ok(root.ca);
    assert.ok(root.checkIssued(root) && root.verify(root.publicKey));
    assert.equal(root.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    const meta = JSON.parse(await readFile(join(dir, CA_FILES.meta), 'utf8')) as { trustDomain: string; rootFingerprintSha256: string };
    assert.equal(meta.trustDomain, 'cluster.local');
    assert.equal(meta.rootFingerprintSha256, root.fingerprint256);
  });

  it('refuses to overwrite a CA unless forced', async () => {
    await assert.rejects(initCaDir(dir), /already exists.*--force/);
    const other = join(base, 'forced');
    await initCaDir(other);
    const before = await readFile(join(other, CA_FILES.rootKey), 'utf8');
    await initCaDir(other, { force: true, trustDomain: 'example.org' });
    assert.notEqual(await readFile(join(other, CA_FILES.rootKey), 'utf8'), before);
    assert.equal((await MeshCa.load(other)).trustDomain, 'example.org');
  });

  it('signs a CSR: the only identity is the SPIFFE URI SAN, empty subject, chain verifies to the root', async () => {
    const { csrPem } = await createCsr({ commonName: 'ignored' });
    const cert = await ca.signWorkload(csrPem, { namespace: 'default', serviceAccount: 'curl' }, 3_600_000);
    assert.equal(cert.spiffeId, 'spiffe://cluster.local/ns/default/sa/curl');
    const leaf = new X509Certificate(cert.certPem);
    assert.equal(leaf.subjectAltName, 'URI:spiffe://cluster.local/ns/default/sa/curl');
    assert.ok(!leaf.subject, 'empty subject (node reports none)');
    assert.equal(leaf.ca, false);
    assert.equal(leaf.serialNumber, cert.serial);
    const root = new X509Certificate(ca.root.certPem);
    assert.ok(leaf.checkIssued(root), 'issuer matches the root');
    assert.ok(leaf.verify(root.publicKey), 'signature verifies with the root key');
    assert.deepEqual(splitPem(cert.certChainPem).map((p) => new X509Certificate(p).fingerprint256), [leaf.fingerprint256, root.fingerprint256]);
    // Key usage and extended key usage, read with @peculiar/x509.
    const px = new x509.X509Certificate(cert.certPem);
    assert.equal(px.subject, '');
    const ku = px.getExtension(x509.KeyUsagesExtension)!;
    assert.equal(ku.usages, x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment);
    assert.ok(ku.critical);
    assert.deepEqual([...px.getExtension(x509.ExtendedKeyUsageExtension)!.usages].sort(), ['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']);
    assert.ok(px.getExtension(x509.SubjectAlternativeNameExtension)!.critical, 'SAN is critical with an empty subject');
  });

  it('honours the TTL, down to seconds', async () => {
    const { csrPem } = await createCsr();
    const t0 = Date.now();
    const cert = await ca.signWorkload(csrPem, { namespace: 'default', serviceAccount: 'curl' }, 20_000);
    const t1 = Date.now();
    // notAfter has one-second precision.
    assert.ok(cert.notAfter.getTime() >= Math.floor((t0 + 20_000) / 1000) * 1000 - 1000, cert.notAfter.toISOString());
    assert.ok(cert.notAfter.getTime() <= t1 + 20_000, cert.notAfter.toISOString());
    await assert.rejects(ca.signWorkload(csrPem, { namespace: 'default', serviceAccount: 'curl' }, 500), /at least 1 s/);
  });

  it('refuses a CSR that asks for another identity, and accepts one that asks for the granted one', async () => {
    const other = await csrWithSans([{ type: 'url', value: 'spiffe://cluster.local/ns/default/sa/admin' }]);
    await assert.rejects(ca.signWorkload(other, { namespace: 'default', serviceAccount: 'curl' }, 60_000), (e: unknown) => {
      assert.ok(e instanceof SignError);
      assert.equal(e.code, 'identity-mismatch');
      assert.match(e.message, /URI:spiffe:\/\/cluster.local\/ns\/default\/sa\/admin.*grants only spiffe:\/\/cluster.local\/ns\/default\/sa\/curl/);
      return true;
    });
    const dns = await csrWithSans([{ type: 'url', value: 'spiffe://cluster.local/ns/default/sa/curl' }, { type: 'dns', value: 'evil.example' }]);
    await assert.rejects(ca.signWorkload(dns, { namespace: 'default', serviceAccount: 'curl' }, 60_000), /DNS:evil.example/);
    const same = await csrWithSans([{ type: 'url', value: 'spiffe://cluster.local/ns/default/sa/curl' }]);
    const cert = await ca.signWorkload(same, { namespace: 'default', serviceAccount: 'curl' }, 60_000);
    assert.equal(new X509Certificate(cert.certPem).subjectAltName, 'URI:spiffe://cluster.local/ns/default/sa/curl');
  });

  it('refuses CSRs that do not parse or whose self-signature does not verify', async () => {
    await assert.rejects(ca.signWorkload('not a csr', { namespace: 'a', serviceAccount: 'b' }, 60_000), (e: unknown) => e instanceof SignError && e.code === 'bad-csr');
    // Swap the public key of one CSR into another: the signature no longer matches.
    const a = new x509.Pkcs10CertificateRequest((await createCsr()).csrPem);
    const der = new Uint8Array(a.rawData);
    der[der.length - 10] ^= 0xff; // flip a bit in the signature
    const tampered = x509.PemConverter.encode(der.buffer, 'CERTIFICATE REQUEST');
    await assert.rejects(ca.signWorkload(tampered, { namespace: 'a', serviceAccount: 'b' }, 60_000), (e: unknown) => e instanceof SignError && e.code === 'bad-csr');
  });

  it('mints tokens that only its own secret verifies', async () => {
    const t = ca.mintToken('default', 'curl', 60_000);
    const r = ca.checkToken(t);
    assert.ok(r.ok && r.claims.ns === 'default' && r.claims.sa === 'curl' && r.claims.td === 'cluster.local');
    const other = await MeshCa.load(join(base, 'forced'));
    assert.ok(!other.checkToken(t).ok);
  });

  it('rotates the root and keeps trusting the old one', async () => {
    const rdir = join(base, 'rotate');
    await initCaDir(rdir);
    const oldCa = await MeshCa.load(rdir);
    const { csrPem } = await createCsr();
    const oldLeaf = await oldCa.signWorkload(csrPem, { namespace: 'ns', serviceAccount: 'sa' }, 60_000);
    const r = await rotateRoot(rdir);
    assert.notEqual(r.previous, r.current);
    const bundle = (await readTrustBundle(rdir)).map((p) => new X509Certificate(p));
    assert.deepEqual(bundle.map((c) => c.fingerprint256), [r.current, r.previous]);
    const newCa = await MeshCa.load(rdir);
    const newLeaf = new X509Certificate((await newCa.signWorkload(csrPem, { namespace: 'ns', serviceAccount: 'sa' }, 60_000)).certPem);
    assert.ok(newLeaf.verify(bundle[0]!.publicKey) && !newLeaf.verify(bundle[1]!.publicKey));
    assert.ok(new X509Certificate(oldLeaf.certPem).verify(bundle[1]!.publicKey));
    // The token secret survived: tokens minted before still work.
    assert.ok(newCa.checkToken(oldCa.mintToken('ns', 'sa', 60_000)).ok);
    // A second rotation keeps both earlier roots (the operator prunes roots-extra.pem).
    await rotateRoot(rdir);
    assert.equal((await readTrustBundle(rdir)).length, 3);
  });
});

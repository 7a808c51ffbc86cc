import assert from 'node:assert/strict';
import { X509Certificate, createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { PeerCertificate } from 'node:tls';
import { normalizeIp, parseSubjectAltNames } from '../../../src/runtime/pki/cert-info.js';
import { checkPeerCertificate, normalizeCertHash, upstreamCheckServerIdentity } from '../../../src/runtime/pki/verify.js';
import { downstream, makeFixture, mutual, run, type Fixture } from './fixtures.js';

describe('checkPeerCertificate', () => {
  let f: Fixture;
  let client: X509Certificate;
  let spki: string;
  let hash: string;
  before(async () => {
    f = await makeFixture();
    client = new X509Certificate(f.client.certPem);
    spki = createHash('sha256').update(client.publicKey.export({ type: 'spki', format: 'der' })).digest('base64');
    hash = createHash('sha256').update(client.raw).digest('hex');
  });
  after(() => f.cleanup());

  it('computes the SPKI pin the way the documented openssl pipeline does', async () => {
    const pub = await run('openssl', ['x509', '-in', f.client.certPath, '-noout', '-pubkey']);
    const der = await run('openssl', ['pkey', '-pubin', '-outform', 'der'], pub.stdout);
    const dgst = await run('openssl', ['dgst', '-sha256', '-binary'], der.stdout);
    assert.equal(dgst.stdout.toString('base64'), spki);
    const certDer = await run('openssl', ['x509', '-in', f.client.certPath, '-outform', 'der']);
    assert.equal(createHash('sha256').update(certDer.stdout).digest('hex'), hash);
  });

  it('SIMPLE asks nothing of the client', () => {
    assert.deepEqual(checkPeerCertificate(undefined, downstream(), false), { ok: true });
  });

  it('MUTUAL needs a verified certificate', () => {
    assert.deepEqual(checkPeerCertificate(undefined, mutual(), false), { ok: false, reason: 'client certificate required' });
    const r = checkPeerCertificate(client, mutual(), false, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE');
    assert.deepEqual(r, { ok: false, reason: 'client certificate not verified: UNABLE_TO_VERIFY_LEAF_SIGNATURE' });
    assert.deepEqual(checkPeerCertificate(client, mutual(), true), { ok: true });
  });

  it('OPTIONAL_MUTUAL accepts none, refuses invalid unless told to let it through', () => {
    const opt = mutual({ mode: 'OPTIONAL_MUTUAL', requireClientCertificate: false });
    assert.deepEqual(checkPeerCertificate(undefined, opt, false), { ok: true });
    assert.equal(checkPeerCertificate(client, opt, false, 'CERT_HAS_EXPIRED').ok, false);
    assert.deepEqual(checkPeerCertificate(client, { ...opt, allowInvalidClientCertificate: true }, false, 'x'), {
      ok: true,
      flags: ['invalid-client-cert-allowed'],
    });
    // allowInvalid never weakens MUTUAL.
    assert.equal(checkPeerCertificate(client, mutual({ allowInvalidClientCertificate: true }), false, 'x').ok, false);
  });

  it('matches SANs exactly, any type', () => {
    const yes = ['spiffe://cluster.local/ns/app/sa/client', 'client.example.com'];
    for (const san of yes) assert.deepEqual(checkPeerCertificate(client, mutual({ matchSubjectAltNames: ['nope', san] }), true), { ok: true }, san);
    for (const san of ['spiffe://cluster.local/ns/app/sa', 'CLIENT.example.com', '*.example.com', 'client']) {
      assert.deepEqual(checkPeerCertificate(client, mutual({ matchSubjectAltNames: [san] }), true), { ok: false, reason: 'client certificate SAN not allowed' }, san);
    }
  });

  it('accepts when either the SPKI or the hash list matches, refuses when neither does', () => {
    const check = (spkis: string[], hashes: string[]) =>
      checkPeerCertificate(client, mutual({ verifyCertificateSpki: spkis, verifyCertificateHash: hashes }), true).ok;
    const colonUpper = hash.toUpperCase().match(/../g)!.join(':');
    assert.equal(check([spki], []), true);
    assert.equal(check([], [hash]), true);
    assert.equal(check([], [colonUpper]), true);
    assert.equal(check(['AAAA'], [colonUpper]), true);
    assert.equal(check([spki], ['00']), true);
    assert.equal(check(['AAAA'], []), false);
    assert.equal(check([], ['00'.repeat(32)]), false);
    assert.equal(check(['AAAA'], ['00'.repeat(32)]), false);
    assert.equal(normalizeCertHash('AB:cd'), 'abcd');
  });

  it('checks upstream identity by SAN list or by host name', () => {
    const server = new X509Certificate(f.server.certPem);
    const peer = { subjectaltname: server.subjectAltName, subject: { CN: 'localhost' } } as unknown as PeerCertificate;
    assert.equal(upstreamCheckServerIdentity({ subjectAltNames: ['localhost'] })('x', peer), undefined);
    assert.equal(upstreamCheckServerIdentity({ subjectAltNames: ['127.0.0.1'] })('x', peer), undefined);
    assert.match(String(upstreamCheckServerIdentity({ subjectAltNames: ['other.example.com'] })('x', peer)), /match none of: other.example.com/);
    assert.equal(upstreamCheckServerIdentity({ subjectAltNames: [], verifyName: 'localhost' })('x', peer), undefined);
    assert.ok(upstreamCheckServerIdentity({ subjectAltNames: [], verifyName: 'evil.example.com' })('x', peer) instanceof Error);
    assert.equal(upstreamCheckServerIdentity({ subjectAltNames: [] })('x', peer), undefined);
  });

  it('parses node SAN text, quoted values and IPv6 forms', () => {
    assert.deepEqual(parseSubjectAltNames('DNS:a.example, URI:spiffe://td/ns/x, IP Address:0:0:0:0:0:0:0:1, email:a@b.c, DNS:"x, y"'), {
      dns: ['a.example', 'x, y'],
      uri: ['spiffe://td/ns/x'],
      ip: ['0:0:0:0:0:0:0:1'],
      email: ['a@b.c'],
    });
    assert.equal(normalizeIp('::1'), '0:0:0:0:0:0:0:1');
    assert.equal(normalizeIp('2001:DB8::0:1'), '2001:db8:0:0:0:0:0:1');
    assert.equal(normalizeIp('::ffff:10.0.0.1'), '0:0:0:0:0:ffff:a00:1');
    assert.equal(normalizeIp('10.0.0.1'), '10.0.0.1');
  });
});

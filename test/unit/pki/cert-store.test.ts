import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { chmod, copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { rootCertificates } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import type { SecretSpec } from '../../../src/model/snapshot.js';
import { createCrl, issueCert, writePemFiles } from '../../../src/pki/mint.js';
import { CertStore, isPkiError, type LoadedSecret, type LoadResult } from '../../../src/runtime/pki/cert-store.js';
import { makeFixture, type Fixture } from './fixtures.js';

function ok(r: LoadResult | { error: string }): LoadedSecret {
  if (isPkiError(r)) assert.fail(`unexpected error: ${r.error}`);
  return r as LoadedSecret;
}
function err(r: LoadResult | { error: string } | { changed: boolean; secret: LoadedSecret }): string {
  assert.ok(isPkiError(r), 'expected an error');
  return r.error;
}
const fileSpec = (name: string, src: Omit<Extract<SecretSpec['source'], { kind: 'file' }>, 'kind'>): SecretSpec => ({ name, source: { kind: 'file', ...src } });

describe('CertStore', () => {
  let f: Fixture;
  before(async () => {
    f = await makeFixture();
  });
  after(() => f.cleanup());

  it('loads a certificate, key and CA from files and describes them', async () => {
    const store = new CertStore();
    const s = ok(await store.load(fileSpec('gw', { certChainPath: f.server.certPath, privateKeyPath: f.server.keyPath, caPath: f.caPath })));
    assert.equal(s.name, 'gw');
    assert.equal(s.chain.length, 2); // leaf + CA (writeChain)
    const leaf = s.leaf!;
    const x = new X509Certificate(f.server.certPem);
    assert.equal(leaf.subject, 'CN=localhost');
    assert.equal(leaf.issuer, 'O=tlsgate, CN=tlsgate test root');
    assert.deepEqual(leaf.sans, { dns: ['localhost'], uri: [], ip: ['127.0.0.1'], email: [] });
    assert.equal(leaf.fingerprintSha256, x.fingerprint256.replace(/:/g, '').toLowerCase());
    assert.equal(leaf.keyType, 'EC');
    assert.equal(leaf.isCa, false);
    assert.equal(leaf.serialNumber, x.serialNumber);
    assert.equal(leaf.notAfter.getTime(), Date.parse(x.validTo));
    assert.equal(s.caCerts.length, 1);
    assert.equal(s.caCerts[0]!.isCa, true);
    assert.deepEqual(s.warnings, []);
    assert.equal(store.get('gw'), s);
    assert.match(s.contentHash, /^[0-9a-f]{64}$/);
  });

  it('loads the same material inline with the same content hash', async () => {
    const store = new CertStore();
    const a = ok(await store.load(fileSpec('a', { certChainPath: f.server.certPath, privateKeyPath: f.server.keyPath })));
    const b = ok(await store.load({ name: 'b', source: { kind: 'inline', certChain: f.server.chainPem, privateKey: f.server.keyPem } }));
    assert.equal(a.contentHash, b.contentHash);
    assert.equal(b.leaf!.fingerprintSha256, a.leaf!.fingerprintSha256);
  });

  it('names the missing file and never prints key material', async () => {
    const store = new CertStore();
    const missing = join(f.dir, 'nope.key');
    const e = err(await store.load(fileSpec('gw', { certChainPath: f.server.certPath, privateKeyPath: missing })));
    assert.match(e, /secret "gw"/);
    assert.ok(e.includes(missing), e);
    assert.match(e, /not found/);
    const garbage = join(f.dir, 'garbage.key');
    await writeFile(garbage, '-----BEGIN PRIVATE KEY-----\nTUlJQ0RFRkdISUpLTE1OT1A=\n-----END PRIVATE KEY-----\n', { mode: 0o600 });
    const e2 = err(await store.load(fileSpec('gw', { certChainPath: f.server.certPath, privateKeyPath: garbage })));
    assert.match(e2, /private key does not parse/);
    assert.ok(!e2.includes('TUlJQ0RF'), 'key bytes leaked into the error');
  });

  it('warns when the key file is world-readable', async () => {
    const loose = join(f.dir, 'loose.key');
    await copyFile(f.server.keyPath, loose);
    await chmod(loose, 0o644);
    const s = ok(await new CertStore().load(fileSpec('gw', { certChainPath: f.server.certPath, privateKeyPath: loose })));
    assert.equal(s.warnings.length, 1);
    assert.match(s.warnings[0]!, /world-readable.*644/);
  });

  it('refuses a key that does not match the certificate', async () => {
    const e = err(await new CertStore().load({ name: 'mix', source: { kind: 'inline', certChain: f.server.certPem, privateKey: f.client.keyPem } }));
    assert.match(e, /secret "mix": private key does not match the certificate/);
  });

  it('refuses expired and not-yet-valid certificates, naming the dates', async () => {
    const now = Date.now();
    const old = await issueCert(f.ca, { commonName: 'old', notBeforeMs: now - 10 * 86_400_000, notAfterMs: now - 86_400_000 });
    const e = err(await new CertStore().load({ name: 'old', source: { kind: 'inline', certChain: old.certPem, privateKey: old.keyPem } }));
    assert.match(e, /secret "old": certificate expired: notAfter \d{4}-\d\d-\d\dT.*, now /);
    assert.ok(e.includes(new Date(now - 86_400_000).toISOString().slice(0, 16)), e);
    const future = await issueCert(f.ca, { commonName: 'future', notBeforeMs: now + 86_400_000, notAfterMs: now + 2 * 86_400_000 });
    const e2 = err(await new CertStore().load({ name: 'future', source: { kind: 'inline', certChain: future.certPem, privateKey: future.keyPem } }));
    assert.match(e2, /certificate is not valid yet: notBefore/);
    // The clock is injectable: the same "future" certificate is fine two days ahead.
    const later = new CertStore({ now: () => now + 1.5 * 86_400_000 });
    ok(await later.load({ name: 'future', source: { kind: 'inline', certChain: future.certPem, privateKey: future.keyPem } }));
  });

  it('splits concatenated CA bundles and rejects broken ones', async () => {
    const bundle = f.ca.certPem + f.otherCa.certPem;
    const s = ok(await new CertStore().load({ name: 'cas', source: { kind: 'inline', ca: bundle } }));
    assert.deepEqual(s.caCerts.map((c) => c.subject), ['O=tlsgate, CN=tlsgate test root', 'CN=someone else']);
    const broken = f.ca.certPem + '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n';
    assert.match(err(await new CertStore().load({ name: 'cas', source: { kind: 'inline', ca: broken } })), /CA bundle certificate #2 does not parse/);
    assert.match(err(await new CertStore().load({ name: 'cas', source: { kind: 'inline', ca: 'hello' } })), /contains no PEM certificate/);
    assert.match(err(await new CertStore().load({ name: 'e', source: { kind: 'inline' } })), /no certificate, key, CA bundle or CRL/);
    assert.match(err(await new CertStore().load({ name: 'k', source: { kind: 'inline', certChain: f.server.certPem } })), /no private key/);
  });

  it('loads CRLs and refuses garbage ones', async () => {
    const crl = await createCrl(f.ca, ['01']);
    const s = ok(await new CertStore().load({ name: 'crl', source: { kind: 'inline', crl } }));
    assert.equal(s.crlPem, crl);
    assert.match(err(await new CertStore().load({ name: 'crl', source: { kind: 'inline', crl: 'x' } })), /no PEM "X509 CRL"/);
  });

  it('serves the system roots', async () => {
    const s = ok(await new CertStore().load({ name: 'sys', source: { kind: 'system-roots' } }));
    assert.equal(s.systemRoots, true);
    assert.ok(s.caCerts.length > 50 && s.caCerts.length <= rootCertificates.length);
  });

  it('reports workload material as unavailable until a provider is registered', async () => {
    const store = new CertStore();
    assert.match(err(await store.load({ name: 'default', source: { kind: 'workload' } })), /not available yet/);
    store.registerProvider('workload', async () => ({ certChainPem: f.client.chainPem, privateKeyPem: f.client.keyPem }));
    store.registerProvider('mesh-roots', async () => ({ error: 'CA unreachable' }));
    const s = ok(await store.load({ name: 'default', source: { kind: 'workload' } }));
    assert.deepEqual(s.leaf!.sans.uri, ['spiffe://cluster.local/ns/app/sa/client']);
    assert.equal(err(await store.load({ name: 'ROOTCA', source: { kind: 'mesh-roots' } })), 'secret "ROOTCA": CA unreachable');
  });

  it('reload keeps the last good material and swaps only valid, changed content', async () => {
    const dir = join(f.dir, 'rot');
    const first = await writePemFiles(dir, 'tls', f.server);
    const store = new CertStore();
    const spec = fileSpec('rot', { certChainPath: first.certPath, privateKeyPath: first.keyPath });
    const s1 = ok(await store.load(spec));

    const same = await store.reload('rot');
    assert.ok(!isPkiError(same) && same.changed === false && same.secret === s1);

    // A half-written rotation (new cert, old key) is refused; the old material stays.
    const next = await issueCert(f.ca, { commonName: 'next', dnsNames: ['localhost'] });
    await writeFile(first.certPath, next.certPem);
    const bad = await store.reload('rot');
    assert.ok(isPkiError(bad));
    assert.match(bad.error, /does not match/);
    assert.equal(store.get('rot'), s1);

    await writeFile(first.keyPath!, next.keyPem);
    const good = await store.reload('rot');
    assert.ok(!isPkiError(good) && good.changed);
    assert.equal(store.get('rot')!.leaf!.subject, 'CN=next');
    assert.notEqual(store.get('rot')!.contentHash, s1.contentHash);
    assert.match(err(await store.reload('unknown')), /unknown secret/);
  });

  it('sync loads a snapshot\'s secrets and forgets removed ones', async () => {
    const store = new CertStore();
    const errors = await store.sync({
      a: { name: 'a', source: { kind: 'inline', certChain: f.server.certPem, privateKey: f.server.keyPem } },
      b: { name: 'b', source: { kind: 'inline', certChain: f.server.certPem, privateKey: f.client.keyPem } },
    });
    assert.deepEqual(Object.keys(errors), ['b']);
    assert.ok(store.get('a'));
    await store.sync({ c: { name: 'c', source: { kind: 'inline', ca: f.ca.certPem } } });
    assert.equal(store.get('a'), undefined);
    assert.ok(store.get('c'));
  });

  it('polling notices a rotated file', async () => {
    const dir = join(f.dir, 'poll');
    const p = await writePemFiles(dir, 'tls', f.server);
    const store = new CertStore();
    ok(await store.load(fileSpec('poll', { certChainPath: p.certPath, privateKeyPath: p.keyPath })));
    const next = await issueCert(f.ca, { commonName: 'polled' });
    const seen = new Promise<string>((resolve) => store.startPolling(20, (name) => resolve(name)));
    await writeFile(p.keyPath!, next.keyPem);
    await writeFile(p.certPath, next.certPem);
    // The poll timer is unref'd (it must not keep a process alive); this bound keeps the test alive.
    let bound: NodeJS.Timeout | undefined;
    const bounded = new Promise<string>((_, reject) => (bound = setTimeout(() => reject(new Error('no change seen')), 5000)));
    try {
      assert.equal(await Promise.race([seen, bounded]), 'poll');
    } finally {
      clearTimeout(bound);
    }
    store.stopPolling();
    // The first report may be the half-written state; the store converges on the new pair.
    for (let i = 0; i < 50 && store.get('poll')!.leaf!.subject !== 'CN=polled'; i++) await store.reload('poll');
    assert.equal(store.get('poll')!.leaf!.subject, 'CN=polled');
  });
});

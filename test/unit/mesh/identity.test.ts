import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CA_FILES, initCaDir, rotateRoot } from '../../../src/mesh/ca.js';
import { WorkloadIdentity, type RenewFailure, type RotationEvent } from '../../../src/mesh/identity.js';
import { CertStore, isPkiError, type LoadedSecret } from '../../../src/runtime/pki/cert-store.js';
import { splitPem } from '../../../src/runtime/pki/cert-info.js';

/** Resolves with the next `event` from `emitter`, or rejects after `ms`. */
function next<T>(emitter: WorkloadIdentity, event: string, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, on);
      reject(new Error(`no '${event}' within ${ms} ms`));
    }, ms);
    const on = (v: T): void => {
      clearTimeout(timer);
      resolve(v);
    };
    emitter.once(event, on);
  });
}

describe('WorkloadIdentity from a local CA directory', () => {
  let base: string;
  let dir: string;
  const identities: WorkloadIdentity[] = [];

  before(async () => {
    base = await mkdtemp(join(tmpdir(), 'tlsgate-identity-'));
    dir = join(base, 'ca');
    await initCaDir(dir);
  });
  after(async () => {
    for (const i of identities) i.close();
    await rm(base, { recursive: true, force: true });
  });

  it('holds a certificate for its SPIFFE ID that chains to the trust bundle', async () => {
    const id = await WorkloadIdentity.fromCaDir(dir, { namespace: 'default', serviceAccount: 'httpbin', ttlMs: 3_600_000 });
    identities.push(id);
    assert.equal(id.spiffeId, 'spiffe://cluster.local/ns/default/sa/httpbin');
    const { certChainPem, privateKeyPem } = id.material();
    const leaf = new X509Certificate(splitPem(certChainPem)[0]!);
    assert.equal(leaf.subjectAltName, 'URI:spiffe://cluster.local/ns/default/sa/httpbin');
    assert.match(privateKeyPem, /BEGIN PRIVATE KEY/);
    const roots = splitPem(id.roots()).map((p) => new X509Certificate(p));
    assert.equal(roots.length, 1);
    assert.ok(leaf.checkIssued(roots[0]!) && leaf.verify(roots[0]!.publicKey));
    assert.equal(id.certificate().serial, leaf.serialNumber);
  });

  it('resolves workload and mesh-roots SecretSpecs in a real CertStore', async () => {
    const id = await WorkloadIdentity.fromCaDir(dir, { namespace: 'default', serviceAccount: 'curl', ttlMs: 3_600_000 });
    identities.push(id);
    const store = new CertStore();
    const before = await store.load({ name: 'mesh-identity', source: { kind: 'workload' } });
    assert.ok(isPkiError(before) && /not available yet/.test(before.error));
    id.registerWith(store);
    const w = (await store.load({ name: 'mesh-identity', source: { kind: 'workload' } })) as LoadedSecret;
    assert.ok(!isPkiError(w), JSON.stringify(w));
    assert.deepEqual(w.leaf?.sans.uri, ['spiffe://cluster.local/ns/default/sa/curl']);
    const r = (await store.load({ name: 'mesh-roots', source: { kind: 'mesh-roots' } })) as LoadedSecret;
    assert.ok(!isPkiError(r), JSON.stringify(r));
    assert.equal(r.caCerts.length, 1);
    assert.ok(r.caCerts[0]!.isCa);
  });

  it('renews at half-life (4 s TTL), emits rotated with a new serial, and keeps the old cert while renewal fails', async () => {
    const id = await WorkloadIdentity.fromCaDir(dir, { namespace: 'default', serviceAccount: 'short', ttlMs: 4_000 });
    identities.push(id);
    const store = new CertStore();
    id.registerWith(store);
    const first = id.certificate().serial;
    const seen: RotationEvent[] = [];
    const unsubscribe = id.onRotate((e) => seen.push(e));
    const e1 = await next<RotationEvent>(id, 'rotated', 15_000);
    assert.equal(e1.previousSerial, first);
    assert.notEqual(e1.serial, first);
    assert.equal(id.certificate().serial, e1.serial);
    assert.equal(e1.spiffeId, 'spiffe://cluster.local/ns/default/sa/short');
    assert.equal(seen.length, 1);
    unsubscribe();
    // The store picks the new material up on reload (contexts are keyed by content hash).
    await store.load({ name: 'w', source: { kind: 'workload' } });

    // Break the CA: the next renewal fails, the old certificate stays, retries follow.
    await rename(join(dir, CA_FILES.rootKey), join(dir, 'moved-key'));
    let restored = false;
    try {
      const f = await next<RenewFailure>(id, 'renewFailed', 15_000);
      assert.match(f.error, /root-key.pem/);
      assert.ok(f.retryInMs > 0 && f.retryInMs <= 30_000);
      assert.equal(id.certificate().serial, e1.serial, 'old certificate kept');
      await rename(join(dir, 'moved-key'), join(dir, CA_FILES.rootKey));
      restored = true;
      const e2 = await next<RotationEvent>(id, 'rotated', 15_000);
      assert.equal(e2.previousSerial, e1.serial);
      assert.equal(seen.length, 1, 'unsubscribed callback not called');
    } finally {
      if (!restored) await rename(join(dir, 'moved-key'), join(dir, CA_FILES.rootKey));
    }
    id.close();
  });

  it('trusts old and new roots after a root rotation', async () => {
    const rdir = join(base, 'rot');
    await initCaDir(rdir);
    const id = await WorkloadIdentity.fromCaDir(rdir, { namespace: 'ns', serviceAccount: 'sa', ttlMs: 3_600_000 });
    identities.push(id);
    const { previous, current } = await rotateRoot(rdir);
    await id.renewNow();
    const roots = splitPem(id.roots()).map((p) => new X509Certificate(p).fingerprint256);
    assert.deepEqual(roots, [current, previous]);
    const leaf = new X509Certificate(splitPem(id.material().certChainPem)[0]!);
    assert.ok(leaf.verify(new X509Certificate(splitPem(id.roots())[0]!).publicKey), 'issued by the new root');
  });

  it('fromFlags picks the source from the run flags and says what is missing', async () => {
    const id = await WorkloadIdentity.fromFlags({ caDir: dir, namespace: 'default', serviceAccount: 'flags', ttlMs: 60_000 });
    identities.push(id);
    assert.equal(id.spiffeId, 'spiffe://cluster.local/ns/default/sa/flags');
    await assert.rejects(WorkloadIdentity.fromFlags({ namespace: 'a', serviceAccount: 'b' }), /--ca-dir <dir> or --ca-url/);
    await assert.rejects(WorkloadIdentity.fromFlags({ caDir: dir, caUrl: 'https://x', namespace: 'a', serviceAccount: 'b' }), /not both/);
    await assert.rejects(WorkloadIdentity.fromFlags({ caUrl: 'https://127.0.0.1:1', namespace: 'a', serviceAccount: 'b' }), /--ca-token/);
    await assert.rejects(WorkloadIdentity.fromFlags({ caUrl: 'https://127.0.0.1:1', caToken: 't', namespace: 'a', serviceAccount: 'b' }), /--ca-root/);
  });

  it('refuses an identity that is not valid', async () => {
    await assert.rejects(WorkloadIdentity.fromCaDir(dir, { namespace: 'Bad', serviceAccount: 'x' }), /namespace "Bad"/);
    await assert.rejects(WorkloadIdentity.fromCaDir(join(base, 'missing'), { namespace: 'a', serviceAccount: 'b' }), /ca init/);
  });
});

/**
 * Real handshakes on 127.0.0.1 with contexts from SecureContextCache: node's TLS client and
 * `openssl s_client` as peers, checkPeerCertificate on the server side.
 */
import assert from 'node:assert/strict';
import { X509Certificate, createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { SecureContext } from 'node:tls';
import type { DownstreamTlsContext, UpstreamTlsContext } from '../../../src/model/snapshot.js';
import { createCrl, issueCert, writePemFiles } from '../../../src/pki/mint.js';
import { CertStore, isPkiError } from '../../../src/runtime/pki/cert-store.js';
import { SecureContextCache, clientConnectOptions, filterCipherSuites, filterEcdhCurves } from '../../../src/runtime/pki/context-cache.js';
import { downstream, makeFixture, mutual, nodeClient, sClient, startServer, type Fixture, type TestServer } from './fixtures.js';

describe('TLS handshakes with cached contexts', () => {
  let f: Fixture;
  let store: CertStore;
  let cache: SecureContextCache;
  const servers: TestServer[] = [];

  before(async () => {
    f = await makeFixture();
    store = new CertStore();
    const errors = await store.sync({
      server: { name: 'server', source: { kind: 'file', certChainPath: f.server.certPath, privateKeyPath: f.server.keyPath } },
      'server-rsa': { name: 'server-rsa', source: { kind: 'file', certChainPath: f.serverRsa.certPath, privateKeyPath: f.serverRsa.keyPath } },
      ca: { name: 'ca', source: { kind: 'file', caPath: f.caPath } },
      client: { name: 'client', source: { kind: 'file', certChainPath: f.client.certPath, privateKeyPath: f.client.keyPath } },
      crl: { name: 'crl', source: { kind: 'inline', crl: await createCrl(f.ca, [new X509Certificate(f.client.certPem).serialNumber]) } },
    });
    assert.deepEqual(errors, {});
    cache = new SecureContextCache();
  });
  after(async () => {
    await Promise.all(servers.map((s) => s.close()));
    await f.cleanup();
  });

  function ctxFor(t: DownstreamTlsContext): SecureContext {
    const c = cache.getServerContext(t, store.lookup);
    if (isPkiError(c)) assert.fail(c.error);
    return c;
  }
  async function serve(t: DownstreamTlsContext, style: 'sni' | 'manual' = 'sni'): Promise<TestServer> {
    const s = await startServer(ctxFor(t), t, style);
    servers.push(s);
    return s;
  }
  const withClient = { cert: '', key: '' };
  before(() => {
    withClient.cert = f.client.chainPem;
    withClient.key = f.client.keyPem;
  });

  it('reuses a context for identical inputs and builds a new one after rotation', async () => {
    const local = new SecureContextCache();
    const a = local.getServerContext(downstream(), store.lookup);
    const b = local.getServerContext(downstream(), store.lookup);
    assert.ok(!isPkiError(a));
    assert.equal(a, b);
    assert.equal(local.buildCount, 1);
    const c = local.getServerContext(downstream({ minVersion: 'TLSv1.3' }), store.lookup);
    assert.notEqual(c, a);
    assert.equal(local.buildCount, 2);

    const rot = new CertStore();
    const dir = join(f.dir, 'rotate');
    const p = await writePemFiles(dir, 'tls', f.server, { writeChain: true });
    assert.ok(!isPkiError(await rot.load({ name: 'server', source: { kind: 'file', certChainPath: p.certPath, privateKeyPath: p.keyPath } })));
    const before1 = local.getServerContext(downstream(), rot.lookup);
    assert.equal(before1, a, 'same content from another store still reuses the context');
    const next = await issueCert(f.ca, { commonName: 'rotated', dnsNames: ['localhost'] });
    await writeFile(p.keyPath!, next.keyPem);
    await writeFile(p.certPath, next.chainPem);
    const r = await rot.reload('server');
    assert.ok(!isPkiError(r) && r.changed);
    const after1 = local.getServerContext(downstream(), rot.lookup);
    assert.ok(!isPkiError(after1));
    assert.notEqual(after1, a);
    assert.equal(local.buildCount, 3);
    // And the new context really serves the new certificate.
    const s = await startServer(after1, downstream());
    servers.push(s);
    let subject = '';
    const res = await new Promise<string>((resolve) => {
      void nodeClient(s.port, { ca: f.ca.certPem }).then((x) => resolve(x.data));
    });
    assert.match(res, /^ok TLSv1.3/);
    const tls = await import('node:tls');
    await new Promise<void>((resolve) => {
      const sock = tls.connect({ host: '127.0.0.1', port: s.port, servername: 'localhost', ca: f.ca.certPem }, () => {
        subject = sock.getPeerX509Certificate()!.subject;
        sock.destroy();
        resolve();
      });
      sock.on('error', () => resolve());
    });
    assert.equal(subject, 'CN=rotated');
  });

  it('reports missing pieces instead of building a context', () => {
    const e = (x: unknown) => (isPkiError(x) ? x.error : 'no error');
    assert.match(e(cache.getServerContext(downstream({ certificates: ['nope'] }), store.lookup)), /secret "nope" is not loaded/);
    assert.match(e(cache.getServerContext(mutual({ validationCa: 'server' }), store.lookup)), /holds no CA bundle/);
    assert.match(e(cache.getServerContext(downstream({ certificates: ['server', 'client'] }), store.lookup)), /both hold EC keys/);
    assert.deepEqual(filterCipherSuites(['ECDHE-RSA-AES128-GCM-SHA256', 'BOGUS-CIPHER', 'ECDHE-RSA-AES128-GCM-SHA256', 'TLS_AES_128_GCM_SHA256']), {
      ciphers: ['ECDHE-RSA-AES128-GCM-SHA256'],
      unknown: ['BOGUS-CIPHER', 'TLS_AES_128_GCM_SHA256'],
    });
    assert.deepEqual(filterEcdhCurves(['P-256', 'X25519', 'P-999']), { curves: ['P-256', 'X25519'], unknown: ['P-999'] });
  });

  it('SIMPLE: node and openssl clients complete the handshake and verify the server', async () => {
    const s = await serve(downstream());
    const r = await nodeClient(s.port, { ca: f.ca.certPem });
    assert.equal(r.error, undefined);
    assert.match(r.data, /^ok TLSv1.3 /);
    const o = await sClient(s.port, ['-CAfile', f.caPath, '-verify_return_error']);
    assert.match(o.out, /Verify return code: 0 \(ok\)/);
    assert.match(o.out, /ok TLSv1.3/);
    assert.deepEqual(s.checks, [{ ok: true }, { ok: true }]);
  });

  for (const style of ['sni', 'manual'] as const) {
    it(`MUTUAL (${style}): no client certificate gets the certificate-required alert`, async () => {
      const s = await serve(mutual(), style);
      const r = await nodeClient(s.port, { ca: f.ca.certPem });
      assert.equal(r.error, 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED');
      assert.equal(r.data, '');
      const o = await sClient(s.port, ['-CAfile', f.caPath]);
      assert.match(o.out, /certificate required/);
      assert.doesNotMatch(o.out, /^ok /m);
      assert.deepEqual(s.checks, []);
    });

    it(`MUTUAL (${style}): a certificate from the CA passes; one from another CA does not`, async () => {
      const s = await serve(mutual(), style);
      const r = await nodeClient(s.port, { ca: f.ca.certPem, ...withClient });
      assert.match(r.data, /^ok /);
      const o = await sClient(s.port, ['-CAfile', f.caPath, '-cert', f.client.certPath, '-key', f.client.keyPath]);
      assert.match(o.out, /^ok TLSv1.3/m);
      assert.deepEqual(s.checks, [{ ok: true }, { ok: true }]);
      const bad = await nodeClient(s.port, { ca: f.ca.certPem, cert: f.rogue.chainPem, key: f.rogue.keyPem });
      assert.equal(bad.data, '');
      const badO = await sClient(s.port, ['-CAfile', f.caPath, '-cert', f.rogue.certPath, '-key', f.rogue.keyPath]);
      assert.doesNotMatch(badO.out, /^ok /m);
      if (style === 'manual') {
        // Our listener path sees the verify failure and checkPeerCertificate refuses it.
        assert.equal(s.checks.length, 4);
        assert.deepEqual(s.checks.map((c) => c.ok), [true, true, false, false]);
        // The rogue chain carries its own root, so OpenSSL calls it a self-signed cert in the chain.
        assert.match((s.checks[2] as { reason: string }).reason, /^client certificate not verified: [A-Z_]+$/);
      } else {
        // tls.Server destroys an unauthorized socket before 'secureConnection'.
        assert.equal(s.checks.length, 2);
      }
    });
  }

  it('an SNICallback context lends only its certificate and CA: versions must come from the socket', async () => {
    // node copies the SNI context's certificate, key, chain and CA into the connection, but not
    // its protocol versions, ciphers or second certificate. This is why the listener creates
    // each TLSSocket with the chosen secureContext instead of switching contexts in SNICallback.
    const t = downstream({ minVersion: 'TLSv1.3' });
    const viaSni = await serve(t, 'sni');
    assert.match((await nodeClient(viaSni.port, { ca: f.ca.certPem, maxVersion: 'TLSv1.2' })).data, /^ok TLSv1.2/);
    const direct = await serve(t, 'manual');
    assert.equal((await nodeClient(direct.port, { ca: f.ca.certPem, maxVersion: 'TLSv1.2' })).error, 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION');
  });

  it('session resumption works on a MUTUAL context (session id context is set)', async () => {
    const s = await serve(mutual({ maxVersion: 'TLSv1.2' }), 'manual');
    const first = await nodeClient(s.port, { ca: f.ca.certPem, ...withClient });
    assert.match(first.data, /^ok TLSv1.2/);
    assert.ok(first.session, 'no session received');
    const second = await nodeClient(s.port, { ca: f.ca.certPem, ...withClient, session: first.session });
    assert.match(second.data, /^ok TLSv1.2/);
    assert.equal(second.reused, true);
    // The peer certificate (and so the pin/SAN checks) survives resumption.
    assert.deepEqual(s.checks, [{ ok: true }, { ok: true }]);
  });

  it('OPTIONAL_MUTUAL: none accepted, invalid refused, invalid let through with insecureSkipVerify', async () => {
    const opt = mutual({ mode: 'OPTIONAL_MUTUAL', requireClientCertificate: false });
    const s = await serve(opt, 'manual');
    assert.match((await nodeClient(s.port, { ca: f.ca.certPem })).data, /^ok /);
    assert.match((await nodeClient(s.port, { ca: f.ca.certPem, ...withClient })).data, /^ok /);
    assert.equal((await nodeClient(s.port, { ca: f.ca.certPem, cert: f.rogue.chainPem, key: f.rogue.keyPem })).data, '');
    assert.deepEqual(s.checks.map((c) => c.ok), [true, true, false]);
    const lax = await serve({ ...opt, allowInvalidClientCertificate: true }, 'manual');
    assert.match((await nodeClient(lax.port, { ca: f.ca.certPem, cert: f.rogue.chainPem, key: f.rogue.keyPem })).data, /^ok /);
    assert.deepEqual(lax.checks, [{ ok: true, flags: ['invalid-client-cert-allowed'] }]);
  });

  it('SAN, SPKI and hash pins accept and refuse real client certificates', async () => {
    const x = new X509Certificate(f.client.certPem);
    const spki = createHash('sha256').update(x.publicKey.export({ type: 'spki', format: 'der' })).digest('base64');
    const hash = createHash('sha256').update(x.raw).digest('hex').toUpperCase().match(/../g)!.join(':');
    const cases: [Partial<DownstreamTlsContext>, boolean][] = [
      [{ matchSubjectAltNames: ['spiffe://cluster.local/ns/app/sa/client'] }, true],
      [{ matchSubjectAltNames: ['spiffe://cluster.local/ns/app/sa/other'] }, false],
      [{ verifyCertificateSpki: [spki] }, true],
      [{ verifyCertificateSpki: [createHash('sha256').update('x').digest('base64')] }, false],
      [{ verifyCertificateHash: [hash] }, true],
      [{ verifyCertificateHash: ['ab'.repeat(32)] }, false],
      [{ verifyCertificateSpki: ['bm9wZQ=='], verifyCertificateHash: [hash] }, true],
    ];
    for (const [over, accept] of cases) {
      const s = await serve(mutual(over), 'manual');
      const r = await sClient(s.port, ['-CAfile', f.caPath, '-cert', f.client.certPath, '-key', f.client.keyPath]);
      assert.equal(/^ok TLSv1.3/m.test(r.out), accept, `${JSON.stringify(over)}\n${r.out}`);
      assert.equal(s.checks.length, 1);
      assert.equal(s.checks[0]!.ok, accept);
    }
  });

  it('a CRL revoking the client certificate refuses it', async () => {
    const s = await serve(mutual({ crl: 'crl' }), 'manual');
    const r = await nodeClient(s.port, { ca: f.ca.certPem, ...withClient });
    assert.equal(r.data, '');
    assert.match((s.checks[0] as { reason: string }).reason, /CERT_REVOKED/);
  });

  it('minVersion TLSv1.2 refuses a TLS 1.1 client; TLSv1.3 refuses a TLS 1.2 client', async () => {
    const s12 = await serve(downstream({ minVersion: 'TLSv1.2' }), 'manual');
    // SECLEVEL=0 lets openssl actually offer TLS 1.1, so the refusal is the server's.
    const old = await sClient(s12.port, ['-tls1_1', '-cipher', 'DEFAULT@SECLEVEL=0']);
    assert.match(old.out, /alert protocol version/);
    assert.match(s12.errors.join(), /UNSUPPORTED_PROTOCOL/);
    const ok12 = await sClient(s12.port, ['-tls1_2', '-CAfile', f.caPath]);
    assert.match(ok12.out, /^ok TLSv1.2 /m);

    const s13 = await serve(downstream({ minVersion: 'TLSv1.3' }), 'manual');
    const r12 = await sClient(s13.port, ['-tls1_2']);
    assert.match(r12.out, /alert protocol version/);
    assert.match((await sClient(s13.port, ['-tls1_3'])).out, /^ok TLSv1.3 /m);
    assert.equal((await nodeClient(s13.port, { ca: f.ca.certPem, maxVersion: 'TLSv1.2' })).error, 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION');

    const max12 = await serve(downstream({ maxVersion: 'TLSv1.2' }), 'manual');
    assert.match((await nodeClient(max12.port, { ca: f.ca.certPem })).data, /^ok TLSv1.2 /);
  });

  it('cipherSuites restrict TLS 1.2 ciphers and leave TLS 1.3 alone', async () => {
    const s = await serve(downstream({ cipherSuites: ['ECDHE-ECDSA-AES128-GCM-SHA256', 'NOT-A-CIPHER'] }), 'manual');
    const refused = await sClient(s.port, ['-tls1_2', '-cipher', 'ECDHE-ECDSA-AES256-GCM-SHA384']);
    assert.doesNotMatch(refused.out, /^ok /m);
    assert.match(refused.out, /handshake failure/);
    const allowed = await sClient(s.port, ['-tls1_2', '-cipher', 'ECDHE-ECDSA-AES128-GCM-SHA256']);
    assert.match(allowed.out, /^ok TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256$/m);
    const any12 = await sClient(s.port, ['-tls1_2']);
    assert.match(any12.out, /^ok TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256$/m);
    assert.match((await sClient(s.port, ['-tls1_3'])).out, /^ok TLSv1.3 TLS_/m);
  });

  it('serves RSA and ECDSA certificates from one context, picked by the client', async () => {
    const s = await serve(downstream({ certificates: ['server', 'server-rsa'], maxVersion: 'TLSv1.2' }), 'manual');
    const tls = await import('node:tls');
    const keyTypeFor = (ciphers: string) =>
      new Promise<string>((resolve) => {
        const sock = tls.connect({ host: '127.0.0.1', port: s.port, servername: 'localhost', ca: f.ca.certPem, ciphers }, () => {
          resolve(sock.getPeerX509Certificate()!.publicKey.asymmetricKeyType ?? '');
          sock.destroy();
        });
        sock.on('error', (e) => resolve(`error ${e.message}`));
      });
    assert.equal(await keyTypeFor('ECDHE-RSA-AES128-GCM-SHA256'), 'rsa');
    assert.equal(await keyTypeFor('ECDHE-ECDSA-AES128-GCM-SHA256'), 'ec');
  });

  it('client contexts originate TLS: CA + SAN checks, and a client certificate for MUTUAL', async () => {
    const s = await serve(mutual(), 'manual');
    const up = (over: Partial<UpstreamTlsContext>): UpstreamTlsContext => ({
      mode: 'MUTUAL', autoSni: false, validationCa: 'ca', clientCertificate: 'client', subjectAltNames: [],
      autoSanValidation: false, insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3', ...over,
    });
    const connect = (u: UpstreamTlsContext, host?: string) => {
      const ctx = cache.getClientContext(u, store.lookup);
      if (isPkiError(ctx)) assert.fail(ctx.error);
      const { secureContext, ...rest } = clientConnectOptions(u, ctx, host);
      return nodeClient(s.port, { ...rest, secureContext, servername: rest.servername ?? '' });
    };
    assert.match((await connect(up({ sni: 'localhost', subjectAltNames: ['localhost'] }))).data, /^ok /);
    assert.equal((await connect(up({ sni: 'localhost', subjectAltNames: ['api.example.com'] }))).error, 'ERR_TLS_CERT_ALTNAME_INVALID');
    assert.match((await connect(up({ autoSni: true, autoSanValidation: true }), 'localhost')).data, /^ok /);
    assert.equal((await connect(up({ autoSni: true, autoSanValidation: true }), 'evil.example.com')).error, 'ERR_TLS_CERT_ALTNAME_INVALID');
    // Verifying against the system roots fails for our private CA (and is not skipped).
    await store.load({ name: 'sys', source: { kind: 'system-roots' } });
    assert.match((await connect(up({ validationCa: 'sys', sni: 'localhost' }))).error ?? '', /^(SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)$/);
    const noCert = cache.getClientContext(up({ clientCertificate: undefined }), store.lookup);
    assert.match(isPkiError(noCert) ? noCert.error : '', /needs a client certificate/);
    assert.deepEqual(s.checks.map((c) => c.ok), [true, true]);
  });
});

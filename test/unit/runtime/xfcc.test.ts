import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { buildXfcc, parseXfcc, subjectAltNames, subjectRfc2253 } from '../../../src/runtime/chain/xfcc.js';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../../helpers/certs.js';
import { run } from '../../helpers/exec.js';

/** The subject as `openssl x509 -nameopt RFC2253` prints it (what Envoy's XFCC Subject is). */
async function opensslRfc2253(certPath: string): Promise<string> {
  const r = await run('openssl', ['x509', '-in', certPath, '-noout', '-subject', '-nameopt', 'RFC2253']);
  return r.stdout.trim().replace(/^subject=/, '');
}

describe('xfcc', () => {
  let dir: string;
  let ca: Ca;
  let client: KeyPair;
  let bare: KeyPair;

  before(async () => {
    dir = await certDir('tlsgate-xfcc-');
    ca = await makeCa(dir, 'ca', '/O=example Inc./CN=example.com');
    client = await makeLeaf(dir, ca, 'client', {
      cn: 'client.example.com', o: 'client organization', serial: 1,
      sans: ['URI:spiffe://cluster.local/ns/foo/sa/sleep', 'URI:spiffe://other/ns/x;y', 'DNS:client.example.com', 'DNS:alt.example.com'],
    });
    bare = await makeLeaf(dir, ca, 'bare', { cn: 'bare.example.com', o: 'Comma, Inc', serial: 2 });
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('builds the Envoy element: By, Hash, Cert, Subject, every URI and DNS SAN', async () => {
    const cert = new X509Certificate(client.certPem);
    // -subj /CN=…/O=… stores CN first; RFC 2253 prints the last RDN first.
    assert.equal(await opensslRfc2253(client.cert), 'O=client organization,CN=client.example.com');
    const v = buildXfcc(cert, { by: 'spiffe://cluster.local/ns/istio-system/sa/ingress' });
    const hash = createHash('sha256').update(cert.raw).digest('hex');
    assert.ok(v.startsWith(`By=spiffe://cluster.local/ns/istio-system/sa/ingress;Hash=${hash};Cert="-----BEGIN%20CERTIFICATE-----%0A`), v);
    assert.ok(v.includes(';Subject="O=client organization,CN=client.example.com";'), v);
    assert.ok(v.endsWith(';URI=spiffe://cluster.local/ns/foo/sa/sleep;URI="spiffe://other/ns/x;y";DNS=client.example.com;DNS=alt.example.com'), v);
  });

  it('round-trips through parseXfcc', () => {
    const cert = new X509Certificate(client.certPem);
    const [el, ...rest] = parseXfcc(buildXfcc(cert, { by: 'spiffe://gw' }));
    assert.equal(rest.length, 0);
    assert.deepEqual(el!.By, ['spiffe://gw']);
    assert.deepEqual(el!.Hash, [createHash('sha256').update(cert.raw).digest('hex')]);
    assert.equal(decodeURIComponent(el!.Cert![0]!), cert.toString());
    assert.deepEqual(el!.Subject, ['O=client organization,CN=client.example.com']);
    assert.deepEqual(el!.URI, ['spiffe://cluster.local/ns/foo/sa/sleep', 'spiffe://other/ns/x;y']);
    assert.deepEqual(el!.DNS, ['client.example.com', 'alt.example.com']);
  });

  it('no URI SAN gives an empty URI=, an escaped comma in the subject stays inside the quotes', async () => {
    const cert = new X509Certificate(bare.certPem);
    assert.equal(subjectRfc2253(cert), await opensslRfc2253(bare.cert));
    const v = buildXfcc(cert, { includeCert: false });
    assert.equal(v.includes('By='), false);
    assert.equal(v.includes('Cert='), false);
    assert.equal(subjectRfc2253(cert), 'O=Comma\\, Inc,CN=bare.example.com');
    assert.ok(v.endsWith(';Subject="O=Comma\\, Inc,CN=bare.example.com";URI='), v);
    const [el] = parseXfcc(v);
    assert.deepEqual(el!.Subject, ['O=Comma\\, Inc,CN=bare.example.com']);
    assert.deepEqual(el!.URI, ['']);
    assert.equal(el!.DNS, undefined);
  });

  it('includes the chain when asked', () => {
    const cert = new X509Certificate(client.certPem);
    const caCert = new X509Certificate(ca.certPem);
    const [el] = parseXfcc(buildXfcc(cert, { includeChain: true, chain: [cert, caCert] }));
    assert.equal(decodeURIComponent(el!.Chain![0]!), cert.toString() + caCert.toString());
  });

  it('reads SANs from the certificate', () => {
    const s = subjectAltNames(new X509Certificate(client.certPem));
    assert.deepEqual(s.uri, ['spiffe://cluster.local/ns/foo/sa/sleep', 'spiffe://other/ns/x;y']);
    assert.deepEqual(s.dns, ['client.example.com', 'alt.example.com']);
  });
});

describe('parseXfcc', () => {
  const cases: [string, string, Array<Record<string, string[]>>][] = [
    ['Envoy doc example', 'By=http://frontend.lyft.com;Hash=468e;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com',
      [{ By: ['http://frontend.lyft.com'], Hash: ['468e'], Subject: ['/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client'], URI: ['http://testclient.lyft.com'] }]],
    ['two hops', 'By=a;URI=b,By=c;URI=d', [{ By: ['a'], URI: ['b'] }, { By: ['c'], URI: ['d'] }]],
    ['quoted separators', 'By="x,y;z=w";Subject="say \\"hi\\""', [{ By: ['x,y;z=w'], Subject: ['say "hi"'] }]],
    ['keys are case-insensitive', 'by=a;HASH=b;dns=c;DNS=d', [{ By: ['a'], Hash: ['b'], DNS: ['c', 'd'] }]],
    ['empty value', 'URI=', [{ URI: [''] }]],
    ['garbage pairs skipped', ';;=x;By=a;novalue,', [{ By: ['a'] }]],
    ['empty header', '', []],
    ['unterminated quote does not throw', 'By="abc', [{ By: ['abc'] }]],
  ];
  for (const [name, input, want] of cases) {
    it(name, () => assert.deepEqual(parseXfcc(input), want));
  }

  it('caps hostile input', () => {
    const many = Array.from({ length: 500 }, (_, i) => `By=${i}`).join(',');
    assert.equal(parseXfcc(many).length, 64);
  });
});

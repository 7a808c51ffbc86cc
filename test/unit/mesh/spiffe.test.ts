import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { identityError, isDns1123Label, parseSpiffeId, spiffeId } from '../../../src/mesh/spiffe.js';

describe('SPIFFE IDs', () => {
  it('builds and parses the Istio shape', () => {
    const id = spiffeId('cluster.local', 'default', 'curl');
    assert.equal(id, 'spiffe://cluster.local/ns/default/sa/curl');
    assert.deepEqual(parseSpiffeId(id), { trustDomain: 'cluster.local', namespace: 'default', serviceAccount: 'curl' });
  });

  it('rejects anything that is not exactly spiffe://td/ns/x/sa/y', () => {
    for (const bad of [
      '',
      'https://cluster.local/ns/default/sa/curl',
      'spiffe://cluster.local/ns/default/sa/curl/',
      'spiffe://cluster.local/ns/default/sa/curl/extra',
      'spiffe://cluster.local/ns/default',
      'spiffe://cluster.local/sa/curl/ns/default',
      'spiffe://cluster.local/ns//sa/curl',
      'spiffe://Cluster.Local/ns/default/sa/curl',
      'spiffe://cluster.local:8080/ns/default/sa/curl',
      'spiffe://cluster.local/ns/Default/sa/curl',
      'spiffe://cluster.local/ns/default/sa/curl?x=1',
      'spiffe:///ns/default/sa/curl',
      'spiffe://cluster.local/ns/-default/sa/curl',
      `spiffe://cluster.local/ns/${'a'.repeat(64)}/sa/curl`,
    ]) {
      assert.equal(parseSpiffeId(bad), undefined, bad);
    }
  });

  it('validates namespaces and service accounts as DNS-1123 labels', () => {
    for (const good of ['a', 'default', 'istio-system', 'a1', '0', 'x'.repeat(63)]) assert.ok(isDns1123Label(good), good);
    for (const bad of ['', 'A', '-a', 'a-', 'a.b', 'a_b', 'x'.repeat(64), 'ns/x']) assert.ok(!isDns1123Label(bad), bad);
    assert.match(identityError('cluster.local', 'Default', 'sa') ?? '', /namespace "Default" is not a DNS-1123 label/);
    assert.match(identityError('cluster.local', 'ns', 'sa.x') ?? '', /service account "sa.x"/);
    assert.match(identityError('bad/td', 'ns', 'sa') ?? '', /trust domain/);
    assert.throws(() => spiffeId('cluster.local', 'ns', 'Bad'), /service account "Bad"/);
  });
});

/**
 * The pure parts of the etcd store: target syntax, key layout, stored values back into
 * resources (diagnostics pointing at keys), local files into entries, diffs, and the union of
 * sources. The store itself is exercised against a real etcd in test/integration/etcd.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  generationKey, isBookkeepingKey, keyFileName, parseEtcdUrl, parseStored, resourceKey, watchBackoff,
} from '../../../src/sources/etcd.js';
import { canonicalStored, canonicalValue, diffEntries, entriesFromFiles } from '../../../src/sources/etcd-store.js';
import { loadConfig, parseText } from '../../../src/config/load.js';
import { mergeResourceSets } from '../../../src/cli/pipeline.js';

test('etcd:// targets: endpoints with default port, prefix normalised', () => {
  assert.deepEqual(parseEtcdUrl('etcd://10.0.0.1:2379,etcd-2,[::1]:3379/tlsgate/prod/'), {
    url: 'etcd://10.0.0.1:2379,etcd-2,[::1]:3379/tlsgate/prod/',
    endpoints: ['10.0.0.1:2379', 'etcd-2:2379', '[::1]:3379'],
    prefix: '/tlsgate/prod',
  });
  assert.equal(parseEtcdUrl('etcd://h//a//b').prefix, '/a/b');
});

test('etcd:// targets that are refused say why', () => {
  for (const [bad, why] of [
    ['http://h:2379/p', /starts with etcd:\/\//],
    ['etcd://h:2379', /prefix is required/],
    ['etcd://h:2379/', /prefix is required/],
    ['etcd:///p', /no etcd endpoint/],
    ['etcd://h:99999/p', /not host\[:port\]/],
    ['etcd://user:pw@h/p', /not in the URL/],
  ] as const) {
    assert.throws(() => parseEtcdUrl(bad), why, bad);
  }
});

test('key layout: group (core for v1), Kind, namespace, name; generation and bookkeeping keys', () => {
  assert.equal(resourceKey('/p', { apiVersion: 'networking.istio.io/v1', kind: 'Gateway', namespace: 'edge', name: 'gw' }), '/p/networking.istio.io/Gateway/edge/gw');
  assert.equal(resourceKey('/p', { apiVersion: 'v1', kind: 'Secret', namespace: 'edge', name: 's' }), '/p/core/Secret/edge/s');
  assert.equal(generationKey('/p'), '/p/.generation');
  assert.equal(isBookkeepingKey('/p', '/p/.generation'), true);
  assert.equal(isBookkeepingKey('/p', '/p/core/Secret/edge/s'), false);
  assert.equal(keyFileName('/p/core/Secret/edge/s'), 'etcd://p/core/Secret/edge/s');
});

test('reconnect backoff is bounded', () => {
  let b = watchBackoff();
  for (let i = 0; i < 20; i++) b = b.next();
  assert.ok(b.duration <= 4000 * 1.2 && b.duration >= 4000 * 0.8, String(b.duration));
});

const GW = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
`;

test('stored values become resources whose locations name the key', () => {
  const entries = new Map([
    ['/p/networking.istio.io/Gateway/edge/gw', GW],
    ['/p/.generation', '3'],
    ['/p/networking.istio.io/VirtualService/edge/broken', 'kind: VirtualService\napiVersion: networking.istio.io/v1\nmetadata: {name: broken, namespace: edge}\nspec: {hosts: 7}\n'],
  ]);
  const r = parseStored('/p', entries);
  assert.equal(r.resources.gateways.length, 1);
  assert.equal(r.resources.gateways[0]!.source.file, 'etcd://p/networking.istio.io/Gateway/edge/gw');
  assert.equal(r.resources.virtualServices.length, 0);
  const err = r.diagnostics.find((d) => d.severity === 'error');
  assert.ok(err, 'the broken value is reported');
  assert.equal(err.location?.file, 'etcd://p/networking.istio.io/VirtualService/edge/broken');
  assert.equal(err.location?.line, 4);
});

test('a value that does not match its key, or holds two resources, is skipped with TG1007', () => {
  const r = parseStored('/p', new Map([
    ['/p/networking.istio.io/Gateway/edge/other', GW],
    ['/p/networking.istio.io/Gateway/edge/gw', GW + '---\n' + GW.replace('name: gw', 'name: gw2')],
  ]));
  assert.equal(r.resources.gateways.length, 0);
  const codes = r.diagnostics.filter((d) => d.code === 'TG1007');
  assert.equal(codes.length, 2);
  assert.match(codes[0]!.message + codes[1]!.message, /expected \/p\/networking\.istio\.io\/Gateway\/edge\/gw/);
  assert.match(codes[0]!.message + codes[1]!.message, /holds 2 resources/);
});

test('local files become one canonical entry per kept resource, namespace made explicit', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-etcd-unit-'));
  try {
    await writeFile(path.join(dir, 'a.yaml'), `${GW}---
apiVersion: v1
kind: Secret
metadata: {name: token}
stringData: {token: abc}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-read-by-tlsgate}
---
${GW}`);
    await writeFile(path.join(dir, 'b.json'), JSON.stringify({ apiVersion: 'networking.istio.io/v1', kind: 'ServiceEntry', metadata: { name: 'se', namespace: 'edge' }, spec: { hosts: ['x.example'], ports: [{ number: 80, name: 'http', protocol: 'HTTP' }], resolution: 'DNS' } }));
    const loaded = await loadConfig([dir]);
    const entries = await entriesFromFiles('/p', loaded.files, loaded.resources);
    assert.deepEqual([...entries.keys()].sort(), [
      '/p/core/Secret/default/token',
      '/p/networking.istio.io/Gateway/edge/gw',
      '/p/networking.istio.io/ServiceEntry/edge/se',
    ]);
    assert.match(entries.get('/p/core/Secret/default/token')!, /namespace: default/);
    // What is stored reads back as the same resources.
    const back = parseStored('/p', entries);
    assert.equal(back.diagnostics.filter((d) => d.severity === 'error').length, 0);
    assert.equal(back.resources.secrets[0]!.data['token']!.toString(), 'abc');
    assert.equal(back.resources.serviceEntries[0]!.spec.hosts[0], 'x.example');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('diff compares content, not formatting', () => {
  const local = new Map([
    ['/p/a', canonicalValue({ kind: 'A', spec: { x: 1 } })],
    ['/p/b', canonicalValue({ kind: 'B' })],
    ['/p/c', canonicalValue({ kind: 'C', v: 2 })],
  ]);
  const stored = new Map([
    ['/p/a', '{"kind": "A", "spec": {"x": 1}}'],
    ['/p/c', 'kind: C\nv: 3\n'],
    ['/p/d', 'kind: D\n'],
  ]);
  assert.deepEqual(diffEntries(local, stored), { added: ['/p/b'], changed: ['/p/c'], removed: ['/p/d'], unchanged: 1 });
  assert.equal(canonicalStored('not: [valid'), 'not: [valid');
});

test('the union of sources keeps the first definition and reports the second (TG1005)', () => {
  const files = parseText(GW, 'gw.yaml');
  const etcd = parseStored('/p', new Map([['/p/networking.istio.io/Gateway/edge/gw', GW]]));
  const other = parseText(GW.replace('name: gw', 'name: gw2'), 'gw2.yaml');
  const merged = mergeResourceSets([files, etcd, other]);
  assert.deepEqual(merged.resources.gateways.map((g) => `${g.metadata.name}@${g.source.file}`), ['gw@gw.yaml', 'gw2@gw2.yaml']);
  const dup = merged.diagnostics.find((d) => d.code === 'TG1005');
  assert.ok(dup);
  assert.equal(dup.location?.file, 'etcd://p/networking.istio.io/Gateway/edge/gw');
  assert.match(dup.hint ?? '', /gw\.yaml:1:1/);
});

/**
 * The Kubernetes manifests in deploy/kubernetes stay usable: every file parses, the Deployment's
 * drain settings fit in its grace period, probes point at the admin port, and the config the
 * ConfigMap carries is valid tlsgate input (certificate files exist only inside the pod).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments, parse } from 'yaml';
import { parseText } from '../../../src/config/load.js';
import { buildSnapshotFrom } from '../../../src/cli/pipeline.js';

const DEPLOY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..', 'deploy', 'kubernetes');

function seconds(v: string): number {
  const m = /^(\d+)(ms|s)$/.exec(v);
  assert.ok(m, v);
  return m[2] === 'ms' ? Number(m[1]) / 1000 : Number(m[1]);
}

test('every manifest parses and the kustomization lists files that exist', () => {
  const files = readdirSync(DEPLOY).filter((f) => f.endsWith('.yaml'));
  assert.ok(files.length >= 6);
  for (const f of files) for (const d of parseAllDocuments(readFileSync(path.join(DEPLOY, f), 'utf8'))) assert.deepEqual(d.errors, [], f);
  const k = parse(readFileSync(path.join(DEPLOY, 'kustomization.yaml'), 'utf8')) as { resources: string[] };
  for (const r of k.resources) assert.ok(files.includes(r), r);
});

test('the Deployment drains within terminationGracePeriodSeconds and probes /ready', () => {
  const d = parse(readFileSync(path.join(DEPLOY, 'deployment.yaml'), 'utf8'));
  const spec = d.spec.template.spec;
  const c = spec.containers[0];
  const arg = (name: string) => (c.args as string[]).find((a) => a.startsWith(`--${name}=`))!.split('=')[1]!;
  assert.ok(seconds(arg('drain-grace')) + seconds(arg('drain-timeout')) < spec.terminationGracePeriodSeconds);
  assert.equal(c.readinessProbe.httpGet.path, '/ready');
  assert.equal(c.readinessProbe.httpGet.port, 'admin');
  assert.equal(c.livenessProbe.httpGet, undefined, 'liveness must not use /ready (503 while draining)');
  assert.ok((c.ports as { name: string; containerPort: number }[]).some((p) => p.name === 'admin' && p.containerPort === Number(arg('admin-port'))));
});

test('the ConfigMap holds a valid tlsgate config', async () => {
  const cm = parse(readFileSync(path.join(DEPLOY, 'configmap.yaml'), 'utf8')) as { data: Record<string, string> };
  for (const [name, text] of Object.entries(cm.data)) {
    const r = await buildSnapshotFrom(parseText(text, name), { proxyNamespace: 'tlsgate' }, false);
    assert.deepEqual(r.diagnostics.filter((x) => x.severity === 'error'), [], name);
    assert.equal(r.snapshot.listeners.length, 2);
  }
});

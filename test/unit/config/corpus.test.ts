/**
 * Istio's own sample configurations must load: no error except TG4001 ("not supported yet").
 * Each file is loaded on its own, as `tlsgate validate <file>` would.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig } from '../../../src/config/load.js';
import { formatDiagnostic } from '../../../src/config/diagnostics.js';
import { repoRoot } from './root.js';

const corpus = join(repoRoot(), '..', 'shared', 'corpus', 'istio-samples');

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/.test(name)) out.push(p);
  }
  return out;
}

const present = existsSync(corpus);

test('Istio sample corpus loads without errors', { skip: present ? false : `corpus not found at ${corpus}` }, async () => {
  const files = yamlFiles(corpus);
  assert.ok(files.length >= 40, `expected the 44 sample YAML files, found ${files.length}`);
  let kept = 0;
  for (const f of files) {
    const r = await loadConfig([f]);
    assert.deepEqual(r.files, [f]);
    const bad = r.diagnostics.filter((d) => d.severity === 'error' && d.code !== 'TG4001');
    assert.deepEqual(bad.map(formatDiagnostic), [], f);
    const warnings = r.diagnostics.filter((d) => d.severity === 'warning');
    assert.deepEqual(warnings.map(formatDiagnostic), [], f);
    kept += Object.values(r.resources).reduce((n, list) => n + list.length, 0);
  }
  // 13 Gateways, 31 VirtualServices, 13 DestinationRules, 9 ServiceEntries, 14 Gateway API routes,
  // less nothing: every Istio and Gateway API document in the corpus is kept.
  assert.ok(kept >= 70, `kept ${kept} resources`);
});

test('the whole corpus directory loads in one call', { skip: present ? false : `corpus not found at ${corpus}` }, async () => {
  const r = await loadConfig([corpus]);
  assert.equal(r.files.length, 44);
  assert.deepEqual(r.diagnostics.filter((d) => d.severity === 'error').map(formatDiagnostic), []);
  // The samples reuse names across files (alternative versions of one route): later ones are duplicates.
  assert.ok(r.diagnostics.some((d) => d.code === 'TG1005'));
  assert.ok(r.diagnostics.filter((d) => d.code === 'TG1004').every((d) => d.severity === 'info'));
});

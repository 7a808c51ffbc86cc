/**
 * The layering rules of docs/architecture.md, checked on the source: model/ does no I/O and
 * reads only config types; runtime/ never reads config, sources, admin or cli; nothing outside
 * cli/ imports cli/.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import * as path from 'node:path';
import { repoRoot } from './config/root.js';

const SRC = path.join(repoRoot(), 'src');

function files(dir: string, out: string[] = []): string[] {
  for (const n of readdirSync(dir)) {
    const p = path.join(dir, n);
    if (statSync(p).isDirectory()) files(p, out);
    else if (p.endsWith('.ts')) out.push(p);
  }
  return out;
}

interface Imp { from: string; spec: string; typeOnly: boolean; target?: string }

function imports(file: string): Imp[] {
  const text = readFileSync(file, 'utf8');
  const out: Imp[] = [];
  for (const m of text.matchAll(/^\s*(import|export)\s+(type\s+)?[^'"]*?from\s+'([^']+)'/gm)) {
    const spec = m[3]!;
    const imp: Imp = { from: path.relative(SRC, file), spec, typeOnly: Boolean(m[2]) };
    if (spec.startsWith('.')) imp.target = path.relative(SRC, path.resolve(path.dirname(file), spec));
    out.push(imp);
  }
  for (const m of text.matchAll(/import\('([^']+)'\)/g)) {
    const spec = m[1]!;
    const imp: Imp = { from: path.relative(SRC, file), spec, typeOnly: false };
    if (spec.startsWith('.')) imp.target = path.relative(SRC, path.resolve(path.dirname(file), spec));
    out.push(imp);
  }
  return out;
}

const all = files(SRC).flatMap(imports);
const show = (xs: Imp[]) => xs.map((i) => `${i.from} -> ${i.spec}`).join('\n');

test('model/ does no I/O and reads only config types and pure helpers', () => {
  assert.ok(all.length > 200, `the scan found the imports (${all.length})`);
  const bad = all.filter((i) => i.from.startsWith('model/') && (
    (i.spec.startsWith('node:') && i.spec !== 'node:path') ||
    (i.target !== undefined && !i.target.startsWith('model/') && !/^config\/(diagnostics|resource|types\/)/.test(i.target)) ||
    (!i.spec.startsWith('.') && !i.spec.startsWith('node:'))));
  assert.equal(show(bad), '');
});

test('runtime/ never imports config, sources, admin, cli or explain (config diagnostics types excepted)', () => {
  const bad = all.filter((i) => i.from.startsWith('runtime/') && i.target !== undefined &&
    /^(config|sources|admin|cli|explain)\//.test(i.target) && !(i.typeOnly && i.target.startsWith('config/diagnostics')));
  assert.equal(show(bad), '');
});

test('nothing outside cli/ imports cli/', () => {
  const bad = all.filter((i) => !i.from.startsWith('cli/') && i.target?.startsWith('cli/'));
  assert.equal(show(bad), '');
});

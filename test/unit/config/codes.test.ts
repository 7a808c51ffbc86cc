import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import * as path from 'node:path';
import { DIAGNOSTIC_CODES } from '../../../src/config/diagnostics.js';
import { repoRoot } from './root.js';
const REPO_ROOT = repoRoot();

function walk(dir: string, out: string[] = []): string[] {
  for (const n of readdirSync(dir)) {
    const p = path.join(dir, n);
    if (statSync(p).isDirectory()) walk(p, out);
    else if (p.endsWith('.ts')) out.push(p);
  }
  return out;
}

test('every diagnostic code used in src/ is registered and documented', () => {
  const used = new Set<string>();
  for (const f of walk(path.join(REPO_ROOT, 'src'))) {
    for (const m of readFileSync(f, 'utf8').matchAll(/'(TG\d{4})'/g)) used.add(m[1]!);
  }
  assert.ok(used.size > 20, 'found the codes');
  const docs = readFileSync(path.join(REPO_ROOT, 'docs', 'diagnostics.md'), 'utf8');
  for (const c of used) {
    assert.ok(DIAGNOSTIC_CODES[c], `${c} is used but not in DIAGNOSTIC_CODES`);
    assert.ok(docs.includes(`| ${c} |`), `${c} is not documented in docs/diagnostics.md`);
  }
});

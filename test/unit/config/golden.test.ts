/**
 * Golden validation cases: test/golden/validate/<case>/input.yaml and expected.txt, the exact
 * `validate` output for that input. Set UPDATE_GOLDEN=1 to rewrite the expected files.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseText } from '../../../src/config/load.js';
import { formatDiagnostic, sortDiagnostics } from '../../../src/config/diagnostics.js';
import { repoRoot } from './root.js';

const dir = join(repoRoot(), 'test', 'golden', 'validate');
const update = process.env.UPDATE_GOLDEN === '1';

export function render(input: string): string {
  const { diagnostics } = parseText(input, 'input.yaml');
  const lines = sortDiagnostics(diagnostics).map(formatDiagnostic);
  return lines.length > 0 ? lines.join('\n') + '\n' : '';
}

const cases = readdirSync(dir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();

test('there are golden cases', () => {
  assert.ok(cases.length >= 8, `expected at least 8 cases in ${dir}, found ${cases.length}`);
});

for (const name of cases) {
  test(`golden: ${name}`, () => {
    const input = readFileSync(join(dir, name, 'input.yaml'), 'utf8');
    const expectedFile = join(dir, name, 'expected.txt');
    const actual = render(input);
    if (update || !existsSync(expectedFile)) {
      writeFileSync(expectedFile, actual);
      if (!update) assert.fail(`${expectedFile} did not exist; written, check it and rerun`);
      return;
    }
    assert.equal(actual, readFileSync(expectedFile, 'utf8'));
  });
}

test('golden: good-config has no diagnostics', () => {
  assert.equal(readFileSync(join(dir, 'good-config', 'expected.txt'), 'utf8'), '');
});

/**
 * Golden explain cases: test/golden/explain/<case>/{config.yaml, args.txt, expected.txt}. Each case
 * runs the real CLI (`bin/tlsgate.js explain <args>`) with the case directory as its working
 * directory; expected.txt is its stdout, then its stderr (if any) and exit code. Set
 * UPDATE_GOLDEN=1 to rewrite the expected files.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../config/root.js';

const root = repoRoot();
const dir = join(root, 'test', 'golden', 'explain');
const update = process.env.UPDATE_GOLDEN === '1';

/** Splits one line of arguments on whitespace; single or double quotes keep spaces. */
export function splitArgs(line: string): string[] {
  const out: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  for (let m = re.exec(line); m !== null; m = re.exec(line)) out.push(m[1] ?? m[2] ?? m[3]!);
  return out;
}

function runCli(cwd: string, args: string[]): Promise<{ stdout: string; stderr: string; code: number }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [join(root, 'bin', 'tlsgate.js'), 'explain', ...args], { cwd, timeout: 60_000, maxBuffer: 4 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ stdout, stderr, code });
    });
  });
}

const cases = readdirSync(dir, { withFileTypes: true })
  .filter((d) => d.isDirectory() && existsSync(join(dir, d.name, 'args.txt')))
  .map((d) => d.name)
  .sort();

test('there are explain golden cases', () => {
  assert.ok(cases.length >= 5, `expected at least 5 cases in ${dir}, found ${cases.length}`);
});

test('splitArgs keeps quoted words', () => {
  assert.deepEqual(splitArgs(`--header 'x-a=b c' "d e" f`), ['--header', 'x-a=b c', 'd e', 'f']);
});

for (const name of cases) {
  test(`explain golden: ${name}`, async () => {
    const cwd = join(dir, name);
    const args = splitArgs(readFileSync(join(cwd, 'args.txt'), 'utf8').trim());
    const r = await runCli(cwd, args);
    const actual = r.stdout + (r.stderr ? `--- stderr\n${r.stderr}` : '') + `--- exit ${r.code}\n`;
    const expectedFile = join(cwd, 'expected.txt');
    if (update || !existsSync(expectedFile)) {
      writeFileSync(expectedFile, actual);
      if (!update) assert.fail(`${expectedFile} did not exist; written, check it and rerun`);
      return;
    }
    assert.equal(actual, readFileSync(expectedFile, 'utf8'));
  });
}

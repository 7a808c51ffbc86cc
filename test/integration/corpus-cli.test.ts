/**
 * `tlsgate validate --config <file>` (the real CLI, one process per file) on every file of
 * Istio's sample configurations (/work/shared/corpus/istio-samples, found as
 * ../shared/corpus/istio-samples from the repo root). Each file must validate (exit 0) or fail
 * only with "not supported yet" (TG4001) diagnostics; never a crash.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import type { RunResult } from '../helpers/exec.js';
import { REPO_ROOT, runCli } from '../helpers/tlsgate.js';

const corpus = path.join(REPO_ROOT, '..', 'shared', 'corpus', 'istio-samples');
const present = existsSync(corpus);

/**
 * Errors other than TG4001 that a sample earns on its own, with the reason. Keep this short: each
 * entry is a sample that cannot be valid as a single file, not a tlsgate limitation.
 */
const EXPECTED_ERRORS: Record<string, { codes: string[]; why: string }> = {
  'multicluster/expose-istiod-https.yaml': {
    codes: ['TG3003'],
    why: 'a template: credentialName is the placeholder "$CREDENTIAL_NAME" and no Secret is part of the sample',
  },
};

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/.test(name)) out.push(p);
  }
  return out;
}

/** Runs `fn` over `items`, at most `limit` at a time, keeping the order of the results. */
async function pool<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

test('tlsgate validate accepts every Istio sample file', { skip: present ? false : `corpus not found at ${corpus}` }, async () => {
  const files = yamlFiles(corpus);
  assert.ok(files.length >= 40, `expected the 44 sample YAML files, found ${files.length}`);
  const results: [string, RunResult][] = await pool(files, 4, async (f) =>
    [path.relative(corpus, f), await runCli(['validate', '--config', f], { timeoutMs: 30_000 })]);

  const problems: string[] = [];
  let clean = 0;
  let unsupported = 0;
  for (const [rel, res] of results) {
    const all = `${res.stdout}\n${res.stderr}`;
    if (res.timedOut || (res.code !== 0 && res.code !== 1)) {
      problems.push(`${rel}: exit ${res.code}${res.timedOut ? ' (timed out)' : ''}\n${all}`);
      continue;
    }
    if (/\n\s+at .+\(.+:\d+:\d+\)|TypeError|ReferenceError|RangeError/.test(all)) {
      problems.push(`${rel}: crashed\n${all}`);
      continue;
    }
    if (!/^1 file\(s\), \d+ error\(s\), \d+ warning\(s\);/m.test(res.stdout)) {
      problems.push(`${rel}: no summary line\n${all}`);
      continue;
    }
    const errorCodes = [...res.stdout.matchAll(/^(?:\S+: )?error (TG\d{4})\b/gm)].map((m) => m[1]!);
    const reported = Number(/(\d+) error\(s\)/.exec(res.stdout)?.[1]);
    if (errorCodes.length !== reported) problems.push(`${rel}: ${reported} error(s) reported, ${errorCodes.length} error line(s) printed`);
    if (res.code === 0) {
      if (errorCodes.length > 0) problems.push(`${rel}: exit 0 with errors\n${res.stdout}`);
      else clean++;
      continue;
    }
    if (errorCodes.length === 0) {
      problems.push(`${rel}: exit 1 without an error line\n${all}`);
      continue;
    }
    const allowed = new Set(['TG4001', ...(EXPECTED_ERRORS[rel]?.codes ?? [])]);
    const other = errorCodes.filter((c) => !allowed.has(c));
    if (other.length > 0) problems.push(`${rel}: errors other than TG4001 (not supported yet)\n${res.stdout}`);
    else unsupported++;
    // A TG4001 line says what is not supported.
    for (const line of res.stdout.split('\n').filter((l) => / error TG4001 /.test(l))) {
      if (!/not supported yet: \S/.test(line)) problems.push(`${rel}: TG4001 without naming the feature: ${line}`);
    }
  }
  assert.deepEqual(problems, []);
  assert.equal(clean + unsupported, files.length);
  // Most samples are plain supported configuration.
  assert.ok(clean >= files.length - 5, `only ${clean} of ${files.length} samples validate cleanly`);
  // An allowance that no longer applies should be removed.
  for (const rel of Object.keys(EXPECTED_ERRORS)) {
    const r = results.find(([f]) => f === rel);
    assert.ok(r, `${rel} is not in the corpus any more`);
    assert.equal(r[1].code, 1, `${rel} now validates: remove it from EXPECTED_ERRORS`);
  }
});

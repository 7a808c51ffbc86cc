/**
 * Golden tests of the real `tlsgate validate` command: test/golden/cli/<case>/input.yaml is
 * validated with the case directory as working directory (so paths print as `input.yaml`), and
 * stdout must equal expected.txt exactly. UPDATE_GOLDEN=1 rewrites the expected files.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { REPO_ROOT, runCli } from '../helpers/tlsgate.js';

const root = path.join(REPO_ROOT, 'test', 'golden', 'cli');
const update = process.env.UPDATE_GOLDEN === '1';

/** Exit status of each case: 0 when the config has no error (warnings allowed), 1 otherwise. */
const EXIT: Record<string, number> = {
  'bad-enum': 1,
  'broken-yaml': 1,
  'conflicting-protocols': 0, // the later server is skipped with a warning, as istiod does
  'duplicate-port-name': 1,
  'missing-secret': 1,
  'partial-wildcard-host': 1,
  'simple-subject-alt-names': 1,
  'sni-hosts-not-subset': 1,
  'valid-config': 0,
};

/** What each case must report, checked on top of the exact text (so a rewrite cannot lose it). */
const MUST: Record<string, RegExp> = {
  'bad-enum': /^input\.yaml:\d+:\d+: error TG2003 .*spec\.servers\[0\]\.tls\.mode: "SIMPEL".*\n {4}hint: valid values: .*SIMPLE, MUTUAL/m,
  'broken-yaml': /^input\.yaml:\d+:\d+: error TG1002 /m,
  'conflicting-protocols': /^input\.yaml:\d+:\d+: warning TG3005 .*spec\.servers\[1\]\.port: port 8000 /m,
  'duplicate-port-name': /^input\.yaml:\d+:\d+: error TG3012 .*spec\.servers\[1\]\.port\.name: /m,
  'missing-secret': /^input\.yaml:\d+:\d+: error TG3003 .*credentialName: Secret "shop-credential" not found/m,
  'partial-wildcard-host': /^input\.yaml:\d+:\d+: error TG3011 .*hosts\[0\]: partial wildcard "shop\*\.example\.com"/m,
  'simple-subject-alt-names': /^input\.yaml:\d+:\d+: error TG3002 .*tls\.subjectAltNames: /m,
  'sni-hosts-not-subset': /^input\.yaml:\d+:\d+: error TG3013 .*sniHosts\[1\]: SNI host "admin\.example\.com"/m,
  'valid-config': /^1 file\(s\), 0 error\(s\), 0 warning\(s\); 1 listener\(s\), 1 cluster\(s\)\n$/,
};

const cases = existsSync(root)
  ? readdirSync(root, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort()
  : [];

// Each case is its own process: a few at a time keeps the file fast on a small machine.
describe('tlsgate validate (golden output)', { concurrency: 3 }, () => {
  test('every case has an expected exit status', () => {
    assert.deepEqual(cases, Object.keys(EXIT).sort());
  });

  for (const name of cases) {
    test(name, async () => {
      const dir = path.join(root, name);
      const res = await runCli(['validate', '--config', 'input.yaml'], { cwd: dir, timeoutMs: 20_000 });
      assert.equal(res.timedOut, false);
      assert.equal(res.stderr, '', 'validate writes its report to stdout only');
      const expectedFile = path.join(dir, 'expected.txt');
      if (update || !existsSync(expectedFile)) {
        writeFileSync(expectedFile, res.stdout);
        if (!update) assert.fail(`${expectedFile} did not exist; written, check it and rerun`);
      } else {
        assert.equal(res.stdout, readFileSync(expectedFile, 'utf8'));
      }
      assert.equal(res.code, EXIT[name], res.stdout);
      const must = MUST[name];
      if (must) assert.match(res.stdout, must);
      // Every diagnostic line points at the file, relative to the working directory.
      for (const line of res.stdout.split('\n')) {
        if (/^(error|warning) /.test(line)) assert.fail(`diagnostic without a location: ${line}`);
      }
      const errors = Number(/(\d+) error\(s\)/.exec(res.stdout)?.[1]);
      assert.equal(errors > 0 ? 1 : 0, EXIT[name]);
    });
  }

  test('several --config paths in one run: diagnostics of each file, one summary', async () => {
    const res = await runCli(['validate', '--config', 'bad-enum/input.yaml', '--config', 'sni-hosts-not-subset/input.yaml'], { cwd: root });
    assert.equal(res.code, 1, res.stdout);
    assert.match(res.stdout, /^bad-enum\/input\.yaml:16:13: error TG2003 /m);
    assert.match(res.stdout, /^sni-hosts-not-subset\/input\.yaml:33:9: error TG3013 /m);
    assert.match(res.stdout, /^2 file\(s\), 2 error\(s\), 0 warning\(s\);/m);
  });

  test('a path that does not exist exits 1 with TG1001', async () => {
    const res = await runCli(['validate', '--config', 'no-such-dir'], { cwd: root });
    assert.equal(res.code, 1);
    assert.match(res.stdout, /error TG1001 .*no-such-dir/);
  });
});

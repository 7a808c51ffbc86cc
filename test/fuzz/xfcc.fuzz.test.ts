/**
 * Property fuzzing of the XFCC codec (src/runtime/chain/xfcc.ts) with fast-check:
 * - parseXfcc never throws and stays within its caps on arbitrary strings and on mutations of the
 *   seeds in test/fuzz/corpus/xfcc/;
 * - buildXfcc of a real certificate (subjects and SANs full of `,;="\`) always parses back to
 *   the same facts, alone and as one hop of several.
 *
 * Default runs take a few seconds. Longer:
 *   FUZZ_RUNS=1000000 node --test dist/test/fuzz/xfcc.fuzz.test.js        (run count)
 *   FUZZ_SECONDS=90 node --test dist/test/fuzz/xfcc.fuzz.test.js          (time budget per property)
 * A failure prints a seed and path; replay with FUZZ_SEED=<seed> FUZZ_PATH=<path>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import fc from 'fast-check';
import { buildXfcc, certSha256Hex, parseXfcc, subjectAltNames, subjectRfc2253 } from '../../src/runtime/chain/xfcc.js';
import { createCa, issueCert, type CertificateAuthority } from '../../src/pki/mint.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? '') > 0 ? Number(process.env.FUZZ_RUNS) : 5000;
const SECONDS = Number(process.env.FUZZ_SECONDS ?? '') > 0 ? Number(process.env.FUZZ_SECONDS) : undefined;
const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : undefined;
const PATH = process.env.FUZZ_PATH;

function params(runs: number): fc.Parameters<unknown> {
  return {
    numRuns: SECONDS !== undefined ? Number.MAX_SAFE_INTEGER : runs,
    ...(SECONDS !== undefined ? { interruptAfterTimeLimit: SECONDS * 1000, markInterruptAsFailure: false } : {}),
    ...(SEED !== undefined ? { seed: SEED } : {}),
    ...(PATH !== undefined ? { path: PATH } : {}),
  };
}

/** Runs a property, fails with fast-check's report, and prints how many inputs were tried. */
async function check(name: string, prop: fc.IProperty<never> | fc.IAsyncProperty<never>, runs: number): Promise<void> {
  const started = Date.now();
  const details = await fc.check(prop as fc.IAsyncProperty<unknown>, params(runs));
  if (details.failed) assert.fail(fc.defaultReportMessage(details) ?? `${name} failed`);
  console.log(`fuzz xfcc ${name}: ${details.numRuns} inputs in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

const CORPUS = new URL('../../../test/fuzz/corpus/xfcc/', import.meta.url);
const seeds: string[] = readdirSync(CORPUS).filter((f) => f.endsWith('.txt')).sort().map((f) => readFileSync(new URL(f, CORPUS), 'utf8'));

const SPECIAL = [',', ';', '=', '"', '\\', ' ', '\t', 'By', 'URI', 'Hash', 'Subject', 'Cert', 'DNS', '%', '\u0000', '\u00e9', '\ud83d\ude00'];

/** Edits of a seed: insert, delete or replace at positions, with separator-heavy fragments. */
const mutated = fc.tuple(
  fc.constantFrom(...seeds),
  fc.array(fc.record({
    at: fc.nat(),
    del: fc.nat({ max: 8 }),
    ins: fc.oneof(fc.constantFrom(...SPECIAL), fc.string({ maxLength: 6 }), fc.string({ unit: 'binary', maxLength: 4 })),
  }), { maxLength: 12 }),
).map(([seed, edits]) => {
  let s = seed;
  for (const e of edits) {
    const at = s.length === 0 ? 0 : e.at % (s.length + 1);
    s = s.slice(0, at) + e.ins + s.slice(at + e.del);
  }
  return s;
});

/** The shape parseXfcc promises. */
function checkParsed(v: string): void {
  const out = parseXfcc(v);
  assert.ok(Array.isArray(out));
  assert.ok(out.length <= 64, `${out.length} elements`);
  let pairs = 0;
  for (const el of out) {
    assert.ok(Object.keys(el).length > 0, 'no empty element');
    for (const [k, vals] of Object.entries(el)) {
      assert.ok(k.trim() !== '');
      assert.ok(Array.isArray(vals) && vals.every((x) => typeof x === 'string'));
      pairs += vals.length;
    }
  }
  assert.ok(pairs <= 256, `${pairs} pairs`);
}

test('parseXfcc: arbitrary strings never throw and respect the caps', async () => {
  await check('arbitrary', fc.property(fc.oneof(
    fc.string({ maxLength: 400 }),
    fc.string({ unit: 'binary', maxLength: 200 }),
    fc.array(fc.constantFrom(...SPECIAL, 'a', 'x'), { maxLength: 300 }).map((a) => a.join('')),
  ), (s) => { checkParsed(s); }) as never, RUNS);
});

test('parseXfcc: mutated corpus seeds never throw', async () => {
  assert.ok(seeds.length >= 5, 'corpus present');
  await check('mutated', fc.property(mutated, (s) => { checkParsed(s); }) as never, RUNS);
});

test('parseXfcc: a hostile 1 MB value is bounded', () => {
  const big = 'By=a;URI=b,'.repeat(100_000);
  const t0 = Date.now();
  const out = parseXfcc(big);
  assert.equal(out.length, 64);
  assert.ok(Date.now() - t0 < 10_000);
});

test('regression (found by this fuzzer): a quoted value ending in a backslash', () => {
  // Subject `CN=a,O=\\` used to be emitted as "CN=a,O=\\" whose closing quote read as escaped.
  const el = parseXfcc('Hash=aa;Subject="CN=a,O=\\\\";URI=')[0]!;
  assert.deepEqual(el.Subject, ['CN=a,O=\\']);
  assert.deepEqual(el.URI, ['']);
  assert.deepEqual(parseXfcc('Subject="O=Comma\\, Inc"')[0]!.Subject, ['O=Comma\\, Inc']);
});

// ------------------------------------------------------------------ build -> parse

let ca: CertificateAuthority | undefined;

const tricky = fc.array(fc.constantFrom('a', 'B', '0', ' ', ',', ';', '=', '"', '\\', '+', '<', '#', '-', '.', 'é'), { minLength: 1, maxLength: 20 })
  .map((a) => a.join('')).filter((s) => s.trim() === s && s.trim() !== '');
const label = fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?$/);
const uriSeg = fc.array(fc.constantFrom('a', 'z', '0', '-', '.', '_', '~', '%2C', ';', '=', ','), { minLength: 1, maxLength: 12 }).map((a) => a.join(''));

test('buildXfcc output always parses back to the certificate facts', async () => {
  ca ??= await createCa({ commonName: 'xfcc fuzz CA', keyType: 'EC' });
  const authority = ca;
  const certRuns = process.env.FUZZ_RUNS !== undefined ? Math.max(20, Math.floor(RUNS / 10)) : 100;
  await check('build-parse', fc.asyncProperty(
    fc.record({
      cn: tricky,
      o: fc.option(tricky, { nil: undefined }),
      dns: fc.array(fc.tuple(label, label).map(([a, b]) => `${a}.${b}.example`), { maxLength: 3 }),
      uris: fc.array(fc.tuple(uriSeg, uriSeg).map(([a, b]) => `spiffe://cluster.local/ns/${a}/sa/${b}`), { maxLength: 3 }),
      by: fc.option(fc.oneof(fc.constant('spiffe://cluster.local/ns/istio-system/sa/gw'), uriSeg.map((s) => `spiffe://x/${s}`)), { nil: undefined }),
      includeCert: fc.boolean(),
      hops: fc.nat({ max: 2 }),
    }),
    async (p) => {
      let issued;
      try {
        issued = await issueCert(authority, { commonName: p.cn, ...(p.o !== undefined ? { organization: p.o } : {}), dnsNames: p.dns, uris: p.uris, keyType: 'EC' });
      } catch {
        return; // a name the certificate library refuses is not an XFCC input
      }
      const cert = new X509Certificate(issued.certPem);
      const v = buildXfcc(cert, { ...(p.by !== undefined ? { by: p.by } : {}), includeCert: p.includeCert });
      // Our element appended after `hops` earlier ones (APPEND_FORWARD).
      const header = [...Array.from({ length: p.hops }, (_, i) => `By=spiffe://hop/${i};URI=spiffe://hop/${i}`), v].join(',');
      const all = parseXfcc(header);
      assert.equal(all.length, p.hops + 1, header);
      const el = all[p.hops]!;
      assert.deepEqual(el.Hash, [certSha256Hex(cert)]);
      assert.deepEqual(el.Subject, [subjectRfc2253(cert)]);
      const sans = subjectAltNames(cert);
      assert.deepEqual(el.URI, sans.uri.length ? sans.uri : ['']);
      assert.deepEqual(el.DNS ?? [], sans.dns);
      if (p.by !== undefined) assert.deepEqual(el.By, [p.by]);
      else assert.equal(el.By, undefined);
      if (p.includeCert) assert.equal(decodeURIComponent(el.Cert?.[0] ?? ''), cert.toString());
      else assert.equal(el.Cert, undefined);
    }) as never, certRuns);
});

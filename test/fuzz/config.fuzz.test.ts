/**
 * Property fuzzing of the config front end: parseText (YAML/JSON -> resources + diagnostics) and
 * translate (resources -> snapshot) must never throw, whatever the text. Inputs are mutations of
 * real configurations: every YAML under examples/ and test/golden/, plus the hostile seeds in
 * test/fuzz/corpus/config/ (alias bomb, odd types, duplicate keys, tags).
 * - text mutations: byte edits, line deletion/duplication/swap, indentation shifts, token swaps;
 * - structure mutations: a parsed document with nodes replaced by arbitrary JSON, keys dropped,
 *   arrays emptied, then serialised as JSON or YAML.
 * A few loadConfig runs go through real files too.
 *
 * Default runs take a few seconds. Longer: FUZZ_RUNS=<n> or FUZZ_SECONDS=<s> (per property).
 * Replay a failure with FUZZ_SEED=<seed> FUZZ_PATH=<path>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import YAML from 'yaml';
import { loadConfig, parseText } from '../../src/config/load.js';
import { translate } from '../../src/model/translate/index.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? '') > 0 ? Number(process.env.FUZZ_RUNS) : 300;
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

async function check(name: string, prop: fc.IProperty<never> | fc.IAsyncProperty<never>, runs: number): Promise<void> {
  const started = Date.now();
  const details = await fc.check(prop as fc.IAsyncProperty<unknown>, params(runs));
  if (details.failed) assert.fail(fc.defaultReportMessage(details) ?? `${name} failed`);
  console.log(`fuzz config ${name}: ${details.numRuns} inputs in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

function walk(dir: string, out: string[]): string[] {
  for (const name of readdirSync(dir).sort()) {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) walk(p, out);
    else if (/\.(ya?ml|json)$/.test(name)) out.push(p);
  }
  return out;
}

const seedFiles = [
  ...walk(path.join(ROOT, 'examples'), []),
  ...walk(path.join(ROOT, 'test', 'golden'), []),
  ...walk(path.join(ROOT, 'test', 'fuzz', 'corpus', 'config'), []),
];
const seeds: string[] = seedFiles.map((f) => readFileSync(f, 'utf8')).filter((t) => t.length < 200_000);
const SEVERITIES = new Set(['error', 'warning', 'info']);

/** The whole front end on one text; asserts the result shapes, never a particular verdict. */
function frontEnd(text: string, file: string): void {
  const parsed = parseText(text, file);
  assert.ok(Array.isArray(parsed.diagnostics));
  for (const d of parsed.diagnostics) {
    assert.ok(SEVERITIES.has(d.severity), d.severity);
    assert.match(d.code, /^TG\d{4}$/);
    assert.equal(typeof d.message, 'string');
  }
  const t = translate(parsed.resources, { bindAddress: '127.0.0.1' });
  assert.ok(Array.isArray(t.snapshot.listeners));
  for (const l of t.snapshot.listeners) {
    assert.ok(Number.isInteger(l.port) && l.port >= 0 && l.port <= 65535, `port ${l.port}`);
    assert.ok(Array.isArray(l.filterChains));
  }
  for (const d of t.diagnostics) assert.ok(SEVERITIES.has(d.severity));
  // The snapshot must serialise (config_dump) without throwing.
  JSON.stringify(t.snapshot);
}

const TOKENS = ['', ' ', '  ', '\n', '- ', ': ', '"', "'", '{', '}', '[', ']', '&a ', '*a', '!!binary ', '---\n', '...\n', '#', '|', '>',
  '~', 'null', 'true', '-1', '0', '65536', '1e309', 'NaN', '0x1F', '10s', '-5s', '*', '*.', '..', 'SIMPLE', 'MUTUAL', 'PASSTHROUGH',
  'ISTIO_MUTUAL', 'AUTO_PASSTHROUGH', 'TLS', 'HTTPS', 'TCP', 'HTTP2', 'GRPC', 'kind: Gateway', 'kind: VirtualService',
  'kind: DestinationRule', 'kind: ServiceEntry', 'kind: Secret', '\u0000', '\ufeff', '\u00e9', '\t'];

type Edit = { kind: number; at: number; n: number; tok: string };
const edit: fc.Arbitrary<Edit> = fc.record({
  kind: fc.nat({ max: 5 }), at: fc.nat(), n: fc.nat({ max: 40 }),
  tok: fc.oneof(fc.constantFrom(...TOKENS), fc.string({ maxLength: 8 })),
});

function mutateText(text: string, edits: Edit[]): string {
  let s = text;
  for (const e of edits) {
    const lines = s.split('\n');
    const li = lines.length === 0 ? 0 : e.at % lines.length;
    switch (e.kind) {
      case 0: { // byte-level replace
        const at = s.length === 0 ? 0 : e.at % (s.length + 1);
        s = s.slice(0, at) + e.tok + s.slice(at + Math.min(e.n, 4));
        break;
      }
      case 1: lines.splice(li, 1 + (e.n % 3)); s = lines.join('\n'); break; // delete lines
      case 2: lines.splice(li, 0, ...lines.slice(li, li + 1 + (e.n % 5))); s = lines.join('\n'); break; // duplicate
      case 3: { // re-indent a line
        const l = lines[li] ?? '';
        lines[li] = e.n % 2 === 0 ? ' '.repeat(e.n % 7) + l : l.replace(/^ {1,4}/, '');
        s = lines.join('\n');
        break;
      }
      case 4: { // replace a scalar value after `key:`
        const l = lines[li] ?? '';
        const c = l.indexOf(': ');
        if (c !== -1) lines[li] = l.slice(0, c + 2) + e.tok;
        s = lines.join('\n');
        break;
      }
      default: { // swap two lines
        const lj = lines.length === 0 ? 0 : (e.at + e.n) % lines.length;
        const a = lines[li];
        const b = lines[lj];
        if (a !== undefined && b !== undefined) { lines[li] = b; lines[lj] = a; }
        s = lines.join('\n');
      }
    }
  }
  return s;
}

test('config text mutations never make parseText or translate throw', async () => {
  assert.ok(seeds.length >= 20, `${seeds.length} seed files`);
  await check('text', fc.property(fc.nat(), fc.array(edit, { maxLength: 10 }), (i, edits) => {
    frontEnd(mutateText(seeds[i % seeds.length]!, edits), 'fuzz.yaml');
  }) as never, RUNS);
});

// ------------------------------------------------------------------ structure mutations

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Op = { path: number[]; kind: number; value: Json };

/** Applies an operation at the node reached by following `path` indices (modulo each size). */
function applyOp(root: Json, op: Op): Json {
  if (op.path.length === 0 || root === null || typeof root !== 'object') {
    return op.kind === 0 ? op.value : root;
  }
  const [head, ...rest] = op.path as [number, ...number[]];
  if (Array.isArray(root)) {
    if (root.length === 0) return op.kind === 2 ? [op.value] : root;
    const i = head % root.length;
    if (rest.length === 0 && op.kind === 1) return root.filter((_, j) => j !== i);
    if (rest.length === 0 && op.kind === 2) return [...root, root[i]!];
    const copy = [...root];
    copy[i] = applyOp(root[i]!, { ...op, path: rest });
    return copy;
  }
  const keys = Object.keys(root);
  if (keys.length === 0) return op.kind === 2 ? { fuzz: op.value } : root;
  const k = keys[head % keys.length]!;
  const copy: { [k: string]: Json } = { ...root };
  if (rest.length === 0 && op.kind === 1) delete copy[k];
  else if (rest.length === 0 && op.kind === 3) copy[k] = typeof root[k] === 'string' ? [root[k] as string] : String(root[k]);
  else copy[k] = applyOp(root[k]!, { ...op, path: rest });
  return copy;
}

const docsOfSeeds: Json[][] = seeds.map((t) => {
  try {
    return YAML.parseAllDocuments(t).map((d) => d.toJS({ maxAliasCount: 50 }) as Json).filter((d) => d !== null && typeof d === 'object');
  } catch {
    return [];
  }
}).filter((d) => d.length > 0);

const op: fc.Arbitrary<Op> = fc.record({
  path: fc.array(fc.nat(), { minLength: 1, maxLength: 7 }),
  kind: fc.nat({ max: 3 }),
  value: fc.jsonValue({ maxDepth: 3 }) as fc.Arbitrary<Json>,
});

test('config structure mutations never make parseText or translate throw', async () => {
  assert.ok(docsOfSeeds.length >= 20, `${docsOfSeeds.length} seeds with documents`);
  await check('structure', fc.property(fc.nat(), fc.array(op, { minLength: 1, maxLength: 8 }), fc.boolean(), (i, ops, asJson) => {
    const docs = docsOfSeeds[i % docsOfSeeds.length]!.map((d) => ops.reduce(applyOp, d));
    const text = asJson ? docs.map((d) => JSON.stringify(d)).join('\n') : docs.map((d) => YAML.stringify(d)).join('---\n');
    frontEnd(asJson && docs.length === 1 ? text : text, asJson && docs.length === 1 ? 'fuzz.json' : 'fuzz.yaml');
  }) as never, RUNS);
});

test('loadConfig on mutated files in a directory never throws', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tlsgate-config-fuzz-'));
  try {
    await check('loadConfig', fc.asyncProperty(fc.array(fc.tuple(fc.nat(), fc.array(edit, { maxLength: 6 })), { minLength: 1, maxLength: 3 }), async (files) => {
      for (const f of readdirSync(dir)) rmSync(path.join(dir, f));
      files.forEach(([i, edits], n) => writeFileSync(path.join(dir, `f${n}.yaml`), mutateText(seeds[i % seeds.length]!, edits)));
      const r = await loadConfig([dir]);
      translate(r.resources, {});
      assert.ok(Array.isArray(r.diagnostics));
    }) as never, Math.max(10, Math.min(RUNS, 50)));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

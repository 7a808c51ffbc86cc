/**
 * Property tests for the ClientHello parser with fast-check.
 *
 * Default runs keep this to a few seconds. For a longer session:
 *   npx tsc -p . && FUZZ_RUNS=200000 node --test dist/test/fuzz/client-hello.fuzz.test.js
 * A failure prints a seed and path; replay it with FUZZ_SEED=<seed> FUZZ_PATH=<path>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import fc from 'fast-check';
import { ClientHelloScanner, parseClientHello, type ParseState } from '../../src/runtime/listener/client-hello.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? '') > 0 ? Number(process.env.FUZZ_RUNS) : 3000;
const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : undefined;
const PATH = process.env.FUZZ_PATH;
const params = { numRuns: RUNS, ...(SEED !== undefined ? { seed: SEED } : {}), ...(PATH !== undefined ? { path: PATH } : {}) };

const FIXTURES = new URL('../../../test/fixtures/client-hello/', import.meta.url);
const hellos: Buffer[] = readdirSync(FIXTURES)
  .filter((f) => f.endsWith('.hex'))
  .sort()
  .map((f) => Buffer.from(readFileSync(new URL(f, FIXTURES), 'utf8').trim(), 'hex'));

const KINDS = new Set(['need-more', 'tls', 'not-tls', 'too-large', 'malformed']);
const HOST_BYTE = /^[a-z0-9._-]+$/;

/** The state is one of the documented shapes and is consistent with the input. */
function checkState(st: ParseState, buf: Buffer, maxBytes: number): void {
  assert.ok(KINDS.has(st.kind), st.kind);
  if (st.kind === 'malformed') assert.ok(typeof st.detail === 'string' && st.detail.length > 0);
  if (st.kind === 'not-tls') assert.ok(buf[0] !== 0x16 || buf[1] !== 3);
  if (st.kind !== 'tls') return;
  assert.ok(st.helloLength >= 4 && st.helloLength <= maxBytes && st.helloLength <= buf.length, 'hello within input and budget');
  assert.ok(Number.isInteger(st.legacyVersion) && st.legacyVersion >= 0 && st.legacyVersion <= 0xffff);
  assert.ok(Array.isArray(st.alpn) && st.alpn.every((p) => typeof p === 'string' && p.length > 0));
  assert.ok(st.supportedVersions.every((v) => Number.isInteger(v) && v >= 0 && v <= 0xffff));
  assert.equal(typeof st.ech, 'boolean');
  if (st.sni !== undefined) assert.match(st.sni, HOST_BYTE);
}

/** Feed `buf` to a scanner in the given chunk sizes; return the first decision (or need-more). */
function scanInChunks(buf: Buffer, sizes: number[], maxBytes: number): { st: ParseState; at: number } {
  const sc = new ClientHelloScanner(maxBytes);
  let at = 0;
  let i = 0;
  while (at < buf.length) {
    at = Math.min(buf.length, at + Math.max(1, sizes[i++ % sizes.length] ?? 1));
    const st = sc.scan(buf.subarray(0, at));
    if (st.kind !== 'need-more') return { st, at };
  }
  return { st: { kind: 'need-more' }, at };
}

/** Re-frame a single-record capture's handshake message into records of the given sizes. */
function reframe(wire: Buffer, sizes: number[]): Buffer {
  const msg = wire.subarray(5, 5 + wire.readUInt16BE(3));
  const parts: Buffer[] = [];
  let i = 0;
  for (let off = 0; off < msg.length; ) {
    const n = Math.min(msg.length - off, Math.max(1, sizes[i++ % sizes.length] ?? msg.length));
    parts.push(Buffer.from([22, 3, 1, n >> 8, n & 0xff]), msg.subarray(off, off + n));
    off += n;
  }
  return Buffer.concat(parts);
}

const maxBytesArb = fc.oneof(fc.constant(16384), fc.integer({ min: 0, max: 70000 }));

test('fuzz: arbitrary bytes never throw and yield a valid state', () => {
  const tlsish = fc
    .tuple(fc.integer({ min: 0, max: 4 }), fc.integer({ min: 0, max: 0x4100 }), fc.integer({ min: 0, max: 0x1ffff }), fc.uint8Array({ maxLength: 400 }))
    .map(([minor, rlen, hlen, rest]) =>
      Buffer.concat([Buffer.from([22, 3, minor, rlen >> 8, rlen & 0xff, 1, hlen >> 16, (hlen >> 8) & 0xff, hlen & 0xff]), rest]),
    );
  const bytes = fc.oneof(fc.uint8Array({ maxLength: 600 }).map((a) => Buffer.from(a)), tlsish);
  fc.assert(
    fc.property(bytes, maxBytesArb, (buf, maxBytes) => {
      checkState(parseClientHello(buf, maxBytes), buf, maxBytes);
    }),
    params,
  );
});

test('fuzz: structurally framed hellos with random bodies never throw', () => {
  // Correct record and handshake framing around a random body, so the body parser is exercised.
  const framed = fc.uint8Array({ minLength: 0, maxLength: 900 }).map((body) => {
    const msg = Buffer.concat([Buffer.from([1, 0, body.length >> 8, body.length & 0xff]), body]);
    return Buffer.concat([Buffer.from([22, 3, 1, msg.length >> 8, msg.length & 0xff]), msg]);
  });
  fc.assert(
    fc.property(framed, (buf) => {
      const st = parseClientHello(buf, 16384);
      checkState(st, buf, 16384);
      assert.notEqual(st.kind, 'need-more', 'a complete message always gets a verdict');
    }),
    params,
  );
});

type Mutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'set'; at: number; value: number }
  | { op: 'truncate'; at: number }
  | { op: 'len16'; at: number; delta: number };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ op: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ op: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ op: fc.constant('len16' as const), at: fc.nat(), delta: fc.integer({ min: -300, max: 300 }) }),
);

function mutate(src: Buffer, ms: Mutation[]): Buffer {
  let b = Buffer.from(src);
  for (const m of ms) {
    if (b.length === 0) break;
    const at = m.at % b.length;
    if (m.op === 'flip') b[at] = b[at]! ^ (1 << m.bit);
    else if (m.op === 'set') b[at] = m.value;
    else if (m.op === 'truncate') b = b.subarray(0, at);
    else if (at + 1 < b.length) b.writeUInt16BE((b.readUInt16BE(at) + m.delta + 0x10000) & 0xffff, at);
  }
  return b;
}

test('fuzz: mutated real hellos never throw; incremental scanning agrees with whole parsing', () => {
  fc.assert(
    fc.property(
      fc.nat({ max: hellos.length - 1 }),
      fc.array(mutationArb, { minLength: 1, maxLength: 4 }),
      fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 8 }),
      maxBytesArb,
      (which, ms, chunks, maxBytes) => {
        const buf = mutate(hellos[which]!, ms);
        const whole = parseClientHello(buf, maxBytes);
        checkState(whole, buf, maxBytes);
        const { st, at } = scanInChunks(buf, chunks, maxBytes);
        // The first decision seen while growing must be what a fresh parse of that prefix says,
        // and a decision once made must not change when more bytes arrive.
        assert.deepEqual(st, parseClientHello(buf.subarray(0, at), maxBytes));
        if (st.kind !== 'need-more') assert.deepEqual(whole, st);
        else assert.equal(whole.kind, 'need-more');
      },
    ),
    params,
  );
});

test('fuzz: any record re-framing and TCP chunking of a real hello parses the same as whole', () => {
  const wholes = hellos.map((h) => parseClientHello(h, 65536));
  fc.assert(
    fc.property(
      fc.nat({ max: hellos.length - 1 }),
      fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 6 }),
      fc.array(fc.integer({ min: 1, max: 500 }), { minLength: 1, maxLength: 6 }),
      (which, recordSizes, tcpSizes) => {
        const framed = reframe(hellos[which]!, recordSizes);
        const want = wholes[which]!;
        assert.equal(want.kind, 'tls');
        assert.deepEqual(parseClientHello(framed, 65536), want);
        const { st, at } = scanInChunks(framed, tcpSizes, 65536);
        assert.deepEqual(st, want);
        assert.equal(at, framed.length, 'decided exactly when the last hello byte arrived');
      },
    ),
    params,
  );
});

/**
 * Property tests for the PROXY protocol codec with fast-check.
 *
 * Default runs keep this to a few seconds. For a longer session:
 *   npx tsc -p . && FUZZ_RUNS=200000 node --test dist/test/fuzz/proxy-protocol.fuzz.test.js
 * A failure prints a seed and path; replay it with FUZZ_SEED=<seed> FUZZ_PATH=<path>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  decodeSslTlvs,
  encodeProxyV1,
  encodeProxyV2,
  parseProxyHeader,
  PROXY_V2_SIGNATURE,
  sslTlvs,
  type ProxyEndpoint,
  type ProxyParse,
  type ProxyTlv,
} from '../../src/runtime/listener/proxy-protocol.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? '') > 0 ? Number(process.env.FUZZ_RUNS) : 3000;
const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : undefined;
const PATH = process.env.FUZZ_PATH;
const params = { numRuns: RUNS, ...(SEED !== undefined ? { seed: SEED } : {}), ...(PATH !== undefined ? { path: PATH } : {}) };

const KINDS = new Set(['need-more', 'proxy', 'not-proxy', 'malformed']);
const V1_PREFIX = Buffer.from('PROXY ', 'latin1');

/** The state is one of the documented shapes and consistent with the input. */
function checkState(st: ProxyParse, buf: Buffer, maxBytes: number): void {
  assert.ok(KINDS.has(st.kind), st.kind);
  if (st.kind === 'malformed') assert.ok(typeof st.detail === 'string' && st.detail.length > 0);
  if (st.kind === 'not-proxy') {
    const n = Math.min(buf.length, 12);
    const v1 = buf.subarray(0, Math.min(n, 6)).equals(V1_PREFIX.subarray(0, Math.min(n, 6)));
    const v2 = buf.subarray(0, n).equals(PROXY_V2_SIGNATURE.subarray(0, n));
    assert.ok(!v1 && !v2, 'not-proxy only when neither prefix matches');
  }
  if (st.kind !== 'proxy') return;
  assert.ok(st.headerLength > 0 && st.headerLength <= buf.length);
  if (st.version === 1) {
    assert.ok(st.headerLength <= 107);
    assert.equal(buf[st.headerLength - 2], 0x0d);
    assert.equal(buf[st.headerLength - 1], 0x0a);
    assert.equal(st.tlvs.length, 0);
  } else {
    assert.ok(st.headerLength <= maxBytes, 'v2 within the cap');
    assert.equal(st.headerLength, 16 + buf.readUInt16BE(14));
    for (const t of st.tlvs) assert.ok(t.type >= 0 && t.type <= 255 && t.value.length <= st.headerLength);
  }
  for (const e of [st.source, st.destination]) {
    if (e === undefined) continue;
    assert.equal(typeof e.address, 'string');
    assert.ok(Number.isInteger(e.port) && e.port >= 0 && e.port <= 65535);
  }
}

/** Comparable form: TLV values as hex so views and copies compare equal. */
function norm(st: ProxyParse): unknown {
  if (st.kind !== 'proxy') return st;
  return { ...st, tlvs: st.tlvs.map((t) => ({ type: t.type, value: t.value.toString('hex') })) };
}

/** Feed growing prefixes in the given chunk sizes; return the first decision (or need-more). */
function parseInChunks(buf: Buffer, sizes: number[], maxBytes: number): { st: ProxyParse; at: number } {
  let at = 0;
  let i = 0;
  while (at < buf.length) {
    at = Math.min(buf.length, at + Math.max(1, sizes[i++ % sizes.length] ?? 1));
    const st = parseProxyHeader(buf.subarray(0, at), maxBytes);
    if (st.kind !== 'need-more') return { st, at };
  }
  return { st: { kind: 'need-more' }, at };
}

// ---------- generators ----------

const ipv4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((o) => o.join('.'));
const ipv6 = fc.oneof(
  fc.ipV6(),
  fc.array(fc.oneof(fc.constant(0), fc.nat(0xffff)), { minLength: 8, maxLength: 8 }).map((g) => g.map((x) => x.toString(16)).join(':')),
);
const port = fc.nat(65535);
const endpoints = fc.oneof(
  fc.tuple(ipv4, port, ipv4, port),
  fc.tuple(ipv6, port, ipv6, port),
).map(([a, p, b, q]): [ProxyEndpoint, ProxyEndpoint] => [{ address: a, port: p }, { address: b, port: q }]);
const tlvArb: fc.Arbitrary<ProxyTlv> = fc
  .record({ type: fc.nat(255), value: fc.uint8Array({ maxLength: 40 }) })
  .map((t) => ({ type: t.type, value: Buffer.from(t.value) }));
const sslInput = fc.record(
  {
    alpn: fc.constantFrom('h2', 'http/1.1'),
    authority: fc.domain(),
    tlsVersion: fc.constantFrom('TLSv1.2', 'TLSv1.3'),
    cipher: fc.constantFrom('TLS_AES_128_GCM_SHA256', 'ECDHE-RSA-AES128-GCM-SHA256'),
    clientCn: fc.string({ maxLength: 30 }),
    clientUriSan: fc.webUrl(),
    verified: fc.boolean(),
  },
  { requiredKeys: [] },
);

/** Valid headers of every kind the encoders produce, plus hand-built UNIX ones. */
const validHeader: fc.Arbitrary<Buffer> = fc.oneof(
  endpoints.map(([s, d]) => encodeProxyV1(s, d)),
  fc.constant(encodeProxyV1(undefined, undefined)),
  fc
    .tuple(endpoints, fc.array(tlvArb, { maxLength: 5 }), sslInput)
    .map(([[s, d], tlvs, ssl]) => encodeProxyV2({ source: s, destination: d, tlvs: [...sslTlvs(ssl), ...tlvs.filter((t) => t.type !== 0x20)] })),
  fc.array(tlvArb, { maxLength: 3 }).map((tlvs) => encodeProxyV2({ command: 'LOCAL', tlvs })),
  fc.tuple(fc.string({ maxLength: 107 }), fc.string({ maxLength: 107 })).map(([a, b]) => {
    const block = Buffer.alloc(216);
    Buffer.from(a, 'utf8').copy(block, 0, 0, 107);
    Buffer.from(b, 'utf8').copy(block, 108, 0, 107);
    const head = Buffer.alloc(16);
    PROXY_V2_SIGNATURE.copy(head);
    head[12] = 0x21;
    head[13] = 0x31;
    head.writeUInt16BE(216, 14);
    return Buffer.concat([head, block]);
  }),
);

const maxBytesArb = fc.oneof(fc.constant(4096), fc.integer({ min: 0, max: 70000 }));

type Mutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'set'; at: number; value: number }
  | { op: 'truncate'; at: number }
  | { op: 'insert'; at: number; value: number }
  | { op: 'delete'; at: number }
  | { op: 'len16'; at: number; delta: number };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ op: fc.constant('set' as const), at: fc.nat(), value: fc.nat(255) }),
  fc.record({ op: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ op: fc.constant('insert' as const), at: fc.nat(), value: fc.constantFrom(0x20, 0x0d, 0x0a, 0x3a, 0x2e, 0x30, 0x00, 0xff) }),
  fc.record({ op: fc.constant('delete' as const), at: fc.nat() }),
  fc.record({ op: fc.constant('len16' as const), at: fc.nat(), delta: fc.integer({ min: -40, max: 40 }) }),
);

function mutate(src: Buffer, ms: Mutation[]): Buffer {
  let b = Buffer.from(src);
  for (const m of ms) {
    if (b.length === 0) break;
    const at = m.at % b.length;
    if (m.op === 'flip') b[at] = b[at]! ^ (1 << m.bit);
    else if (m.op === 'set') b[at] = m.value;
    else if (m.op === 'truncate') b = b.subarray(0, at);
    else if (m.op === 'insert') b = Buffer.concat([b.subarray(0, at), Buffer.from([m.value]), b.subarray(at)]);
    else if (m.op === 'delete') b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1)]);
    else if (at + 1 < b.length) b.writeUInt16BE((b.readUInt16BE(at) + m.delta + 0x10000) & 0xffff, at);
  }
  return b;
}

// ---------- properties ----------

test('fuzz: arbitrary bytes never throw and yield a valid state', () => {
  const prefixed = fc
    .tuple(fc.constantFrom(V1_PREFIX, PROXY_V2_SIGNATURE, Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x21])])), fc.uint8Array({ maxLength: 300 }))
    .map(([p, r]) => Buffer.concat([p, r]));
  const bytes = fc.oneof(fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)), prefixed);
  fc.assert(
    fc.property(bytes, maxBytesArb, (buf, maxBytes) => {
      checkState(parseProxyHeader(buf, maxBytes), buf, maxBytes);
    }),
    params,
  );
});

test('fuzz: valid headers round-trip; trailing bytes are never consumed', () => {
  fc.assert(
    fc.property(validHeader, fc.uint8Array({ maxLength: 64 }), (h, tail) => {
      const st = parseProxyHeader(Buffer.concat([h, tail]));
      assert.equal(st.kind, 'proxy', JSON.stringify(st));
      checkState(st, Buffer.concat([h, tail]), 4096);
      assert.equal(st.kind === 'proxy' && st.headerLength, h.length);
    }),
    params,
  );
});

test('fuzz: encoders agree with the parser on addresses and TLVs', () => {
  fc.assert(
    fc.property(endpoints, sslInput, (eps, ssl) => {
      const [s, d] = eps;
      for (const h of [encodeProxyV1(s, d), encodeProxyV2({ source: s, destination: d, tlvs: sslTlvs(ssl) })]) {
        const st = parseProxyHeader(h);
        assert.equal(st.kind, 'proxy');
        if (st.kind !== 'proxy') return;
        // re-encoding what was parsed gives the same bytes (addresses are canonical both ways)
        const again = st.version === 1 ? encodeProxyV1(st.source, st.destination) : encodeProxyV2({ source: st.source, destination: st.destination, tlvs: st.tlvs });
        assert.ok(again.equals(h));
        if (st.version === 2) {
          const back = decodeSslTlvs(st.tlvs);
          for (const k of ['alpn', 'authority', 'tlsVersion', 'cipher', 'clientCn', 'clientUriSan'] as const) assert.equal(back[k], ssl[k]);
        }
      }
    }),
    params,
  );
});

test('fuzz: mutated valid headers never throw; growing input agrees with parsing whole', () => {
  fc.assert(
    fc.property(
      validHeader,
      fc.array(mutationArb, { minLength: 1, maxLength: 4 }),
      fc.uint8Array({ maxLength: 32 }),
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 8 }),
      maxBytesArb,
      (h, ms, tail, chunks, maxBytes) => {
        const buf = Buffer.concat([mutate(h, ms), tail]);
        const whole = parseProxyHeader(buf, maxBytes);
        checkState(whole, buf, maxBytes);
        const { st, at } = parseInChunks(buf, chunks, maxBytes);
        // The first decision while growing is what a fresh parse of that prefix says, and it does
        // not change when more bytes arrive (this is what lets the reader stop at once).
        assert.deepEqual(norm(st), norm(parseProxyHeader(buf.subarray(0, at), maxBytes)));
        if (st.kind !== 'need-more') assert.deepEqual(norm(whole), norm(st));
        else assert.equal(whole.kind, 'need-more');
      },
    ),
    params,
  );
});

test('fuzz: re-chunking arbitrary bytes equals parsing whole', () => {
  const bytes = fc.oneof(
    fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)),
    fc.tuple(fc.constantFrom(V1_PREFIX, PROXY_V2_SIGNATURE), fc.uint8Array({ maxLength: 200 })).map(([p, r]) => Buffer.concat([p, r])),
  );
  fc.assert(
    fc.property(bytes, fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 6 }), (buf, chunks) => {
      const whole = parseProxyHeader(buf);
      const { st } = parseInChunks(buf, chunks, 4096);
      if (st.kind !== 'need-more') assert.deepEqual(norm(whole), norm(st));
      else assert.equal(whole.kind, 'need-more');
    }),
    params,
  );
});

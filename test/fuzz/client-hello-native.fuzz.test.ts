/**
 * Differential fuzzing: the native addon's ClientHello reader (native/client_hello.c, reached
 * through `scanHelloNative`) must decide exactly what client-hello.ts's `parseClientHello` decides.
 *
 * The mapping compared for every input:
 * - JS 'need-more' ↔ native 'need-more';
 * - JS 'tls' ↔ native 'tls' with the same SNI (both absent or equal), the same ALPN names (the
 *   native side hands back the extension's length-prefixed list as latin1) and the same ECH flag;
 * - JS 'not-tls' / 'too-large' / 'malformed' ↔ native 'other'.
 * One deliberate difference is allowed: a valid ALPN list longer than 512 bytes is 'other' natively
 * (the relay keeps at most 512 bytes of it and lets JS judge the hello), 'tls' in JS.
 *
 * Inputs: every prefix of real and synthetic hellos (single record, split across records, a 40 kB
 * three-record hello), seeded mutations of those (bit flips, bytes set to 0x00 / 0xff, truncation,
 * insertion and deletion, length fields nudged by ±1) at several maxBytes, hellos with random
 * extension blocks, pure random buffers, and the hostile shapes a listener meets.
 *
 * Everything random comes from mulberry32 seeded from FUZZ_SEED (default below) and the iteration
 * number, so a failure names the seed and iteration that reproduce it (the hellos captured live
 * from Node differ from run to run in their random fields, so a failure also prints the input's
 * hex, whole up to 1 KiB):
 *   npx tsc -p . && FUZZ_SEED=<seed> FUZZ_ITERS=<n> node --test dist/test/fuzz/client-hello-native.fuzz.test.js
 * Skipped when the addon is not built (npm run build:native).
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import type tls from 'node:tls';
import { isDeepStrictEqual } from 'node:util';
import { parseClientHello, type ParseState } from '../../src/runtime/listener/client-hello.js';
import { nativeRelayAvailable, nativeRelayUnavailableReason, scanHelloNative } from '../../src/runtime/chain/native-relay.js';
import { seededRandom } from '../../src/runtime/upstream/load-balancer.js';
import { alpnExt, captureHello, ext, sniExt, u16, u24, u8 } from '../helpers/tls-wire.js';

const SEED = Number.isInteger(Number(process.env.FUZZ_SEED)) && process.env.FUZZ_SEED !== undefined && process.env.FUZZ_SEED !== ''
  ? Number(process.env.FUZZ_SEED) >>> 0
  : 0x5eed_c11e;
const ITERS = Number(process.env.FUZZ_ITERS ?? '') > 0 ? Math.floor(Number(process.env.FUZZ_ITERS)) : 8000;
/** The maxBytes every mutated input is judged at: the default, a raised cap, and one most hellos exceed. */
const MAX_BYTES = [16384, 65536, 300] as const;
/** The native reader keeps at most this many ALPN list bytes; a longer valid list is 'other' there. */
const NATIVE_ALPN_MAX = 512;

const FIXTURES = new URL('../../../test/fixtures/client-hello/', import.meta.url);

const SKIP: string | false = !nativeRelayAvailable()
  ? `native relay not built: ${nativeRelayUnavailableReason() ?? 'unknown reason'}`
  : scanHelloNative(Buffer.alloc(0), 16384) === undefined
    ? 'the native addon has no scanHello (rebuild it: npm run build:native)'
    : false;

// ---------------------------------------------------------------- seeded randomness

class Rng {
  readonly #next: () => number;
  constructor(seed: number) {
    this.#next = seededRandom(seed);
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.#next() * n);
  }
  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.#next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

/** The generator for iteration `i` of a test: independent of every other iteration. */
function rngFor(stream: number, i: number): Rng {
  return new Rng((SEED ^ Math.imul(stream + 1, 0x85ebca6b) ^ Math.imul(i + 1, 0x9e3779b9)) >>> 0);
}

// ---------------------------------------------------------------- comparing the two readers

type NativeState = NonNullable<ReturnType<typeof scanHelloNative>>;
type Outcome = 'tls' | 'need-more' | 'not-tls' | 'too-large' | 'malformed' | 'alpn-over-native-cap';
const OUTCOMES: readonly Outcome[] = ['tls', 'need-more', 'not-tls', 'too-large', 'malformed', 'alpn-over-native-cap'];
type Tally = Record<Outcome, number>;

const newTally = (): Tally => ({ tls: 0, 'need-more': 0, 'not-tls': 0, 'too-large': 0, malformed: 0, 'alpn-over-native-cap': 0 });
const total: Tally = newTally();

/** The native ALPN list (latin1, length-prefixed names) as names; a broken list is reported as such. */
function decodeNativeAlpn(list: string | undefined): string[] | string {
  if (typeof list !== 'string') return `<alpn is ${typeof list}>`;
  const b = Buffer.from(list, 'latin1');
  const out: string[] = [];
  for (let p = 0; p < b.length; ) {
    const n = b[p]!;
    if (n === 0 || p + 1 + n > b.length) return `<broken list ${b.toString('hex')}>`;
    out.push(b.toString('latin1', p + 1, p + 1 + n));
    p += 1 + n;
  }
  return out;
}

/** Bytes of the ALPN protocol list the client sent (the extension's list length). */
const alpnListBytes = (names: readonly string[]): number => names.reduce((n, p) => n + 1 + p.length, 0);

function hexOf(buf: Buffer, max = 1024): string {
  return buf.length <= max ? buf.toString('hex') : `${buf.subarray(0, max).toString('hex')}… (${buf.length} bytes in all)`;
}

function jsSummary(st: ParseState): string {
  if (st.kind === 'tls') return JSON.stringify({ kind: 'tls', sni: st.sni, alpn: st.alpn, ech: st.ech, helloLength: st.helloLength });
  return JSON.stringify(st);
}

/** Why the native answer differs from JS's, or undefined when they agree (or differ as allowed). */
function disagreement(js: ParseState, nat: NativeState): string | undefined {
  switch (js.kind) {
    case 'need-more':
      return nat.kind === 'need-more' ? undefined : 'JS needs more bytes, native decided';
    case 'not-tls':
    case 'too-large':
    case 'malformed':
      return nat.kind === 'other' ? undefined : `JS says ${js.kind}, native does not say other`;
    case 'tls': {
      if (nat.kind === 'other' && alpnListBytes(js.alpn) > NATIVE_ALPN_MAX) return undefined; // the allowed difference
      if (nat.kind !== 'tls') return 'JS parsed a hello, native did not';
      if (nat.sni !== js.sni) return 'SNI differs';
      const alpn = decodeNativeAlpn(nat.alpn);
      if (!isDeepStrictEqual(alpn, js.alpn)) return `ALPN differs (native decodes to ${JSON.stringify(alpn)})`;
      if (nat.ech !== js.ech) return 'ECH flag differs';
      return undefined;
    }
  }
}

/**
 * One test's comparisons: tallies outcomes and keeps the first disagreements (every one is
 * counted) so a failure lists several reproducible cases, not only the first.
 */
class Differ {
  readonly tally = newTally();
  readonly mismatches: string[] = [];
  count = 0;
  compared = 0;

  /** Compare both readers on `buf`; `where` must say how to reproduce it (seed, iteration, recipe). */
  check(buf: Buffer, maxBytes: number, where: string): { js: ParseState; nat: NativeState } {
    const js = parseClientHello(buf, maxBytes);
    const nat = scanHelloNative(buf, maxBytes);
    assert.ok(nat, 'scanHelloNative went away');
    this.compared++;
    const why = disagreement(js, nat);
    if (why !== undefined) {
      this.count++;
      if (this.mismatches.length < 8) {
        this.mismatches.push(`${why}\n    at: ${where}, maxBytes ${maxBytes}\n    input: ${hexOf(buf)}\n    JS: ${jsSummary(js)}\n    native: ${JSON.stringify(nat)}`);
      }
    }
    const outcome: Outcome = js.kind === 'tls' && nat.kind === 'other' && why === undefined ? 'alpn-over-native-cap' : js.kind;
    this.tally[outcome]++;
    total[outcome]++;
    return { js, nat };
  }

  /** No disagreement, and at least `min[k]` inputs of each named outcome were compared. */
  done(min: Partial<Tally>): void {
    if (process.env.FUZZ_VERBOSE) console.log(`  ${this.compared} compared: ${JSON.stringify(this.tally)}`);
    assert.equal(this.count, 0,
      `${this.count} of ${this.compared} inputs got different answers (FUZZ_SEED=${SEED}):\n  ${this.mismatches.join('\n  ')}`);
    for (const k of OUTCOMES) {
      const want = min[k] ?? 0;
      assert.ok(this.tally[k] >= want, `only ${this.tally[k]} '${k}' inputs compared (want >= ${want}); all: ${JSON.stringify(this.tally)}`);
    }
  }
}

// ---------------------------------------------------------------- building hellos

function versionsExt(vs: readonly number[]): Buffer {
  return ext(43, Buffer.concat([u8(vs.length * 2), ...vs.map(u16)]));
}

/** A ClientHello handshake message (4-byte header included); `exts` undefined: no extensions block. */
function helloMsg(exts: Buffer[] | undefined, sessionId = 32): Buffer {
  const body = Buffer.concat([
    u16(0x0303),
    Buffer.alloc(32, 0x5a),
    u8(sessionId),
    Buffer.alloc(sessionId, 0x33),
    u16(6), Buffer.from([0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]),
    u8(1), u8(0),
    ...(exts === undefined ? [] : [u16(Buffer.concat(exts).length), ...exts]),
  ]);
  return Buffer.concat([u8(1), u24(body.length), body]);
}

/** A hello as it travels: its handshake message framed into records. */
interface Wire {
  name: string;
  msg: Buffer;
  buf: Buffer;
  /** Offset in `buf` of each record header. */
  records: number[];
}

/** `msg` cut into records of the given sizes (cycled; the last record takes what is left). */
function frame(name: string, msg: Buffer, sizes: readonly number[], version = 0x0301): Wire {
  const parts: Buffer[] = [];
  const records: number[] = [];
  let at = 0;
  for (let off = 0, i = 0; off < msg.length; i++) {
    const n = Math.min(msg.length - off, Math.max(1, Math.min(16384, sizes[i % sizes.length]!)));
    records.push(at);
    parts.push(Buffer.from([0x16, version >> 8, version & 0xff, n >> 8, n & 0xff]), msg.subarray(off, off + n));
    at += 5 + n;
    off += n;
  }
  return { name, msg, buf: Buffer.concat(parts), records };
}

/** A captured single-record hello as a Wire (its record version kept). */
function fromCapture(name: string, buf: Buffer): Wire {
  const len = buf.readUInt16BE(3);
  assert.equal(buf.length, 5 + len, `${name}: one whole record`);
  return { name, msg: buf.subarray(5), buf, records: [0] };
}

/** Offset in `w.buf` of byte `m` of the handshake message. */
function wireOffset(w: Wire, m: number): number {
  let base = 0;
  for (const r of w.records) {
    const n = w.buf.readUInt16BE(r + 3);
    if (m < base + n) return r + 5 + (m - base);
    base += n;
  }
  throw new Error(`message offset ${m} past the hello`);
}

/** `hello` grown by a padding extension (RFC 7685) of `pad` bytes, cut into 16 KiB records. */
function padded(name: string, msg: Buffer, pad: number): Wire {
  const body = Buffer.from(msg.subarray(4));
  let off = 2 + 32;
  off += 1 + body[off]!;
  off += 2 + body.readUInt16BE(off);
  off += 1 + body[off]!;
  const padding = Buffer.concat([u16(21), u16(pad), Buffer.alloc(pad)]);
  const grown = Buffer.concat([body, padding]);
  grown.writeUInt16BE(body.readUInt16BE(off) + padding.length, off);
  return frame(name, Buffer.concat([u8(1), u24(grown.length), grown]), [16384]);
}

/** A length (or type) field of a hello: message offset and width in bytes. */
interface Field {
  off: number;
  width: 1 | 2 | 3;
  what: string;
}

/** The length fields of a well-formed hello message, down into server_name, ALPN and supported_versions. */
function fieldsOf(msg: Buffer): Field[] {
  const f: Field[] = [{ off: 1, width: 3, what: 'handshake length' }];
  let p = 4 + 34;
  f.push({ off: p, width: 1, what: 'session id length' });
  p += 1 + msg[p]!;
  f.push({ off: p, width: 2, what: 'cipher suites length' });
  p += 2 + msg.readUInt16BE(p);
  f.push({ off: p, width: 1, what: 'compression methods length' });
  p += 1 + msg[p]!;
  if (p >= msg.length) return f;
  f.push({ off: p, width: 2, what: 'extensions length' });
  p += 2;
  while (p + 4 <= msg.length) {
    const type = msg.readUInt16BE(p);
    const len = msg.readUInt16BE(p + 2);
    f.push({ off: p, width: 2, what: `extension ${type} type` }, { off: p + 2, width: 2, what: `extension ${type} length` });
    const s = p + 4;
    const e = s + len;
    if (type === 0 && len >= 2) {
      f.push({ off: s, width: 2, what: 'server_name list length' });
      for (let q = s + 2; q + 3 <= e; q += 3 + msg.readUInt16BE(q + 1)) {
        f.push({ off: q, width: 1, what: 'server_name type' }, { off: q + 1, width: 2, what: 'host_name length' });
      }
    } else if (type === 16 && len >= 2) {
      f.push({ off: s, width: 2, what: 'ALPN list length' });
      for (let q = s + 2; q < e; q += 1 + msg[q]!) f.push({ off: q, width: 1, what: 'ALPN name length' });
    } else if (type === 43 && len >= 1) {
      f.push({ off: s, width: 1, what: 'supported_versions length' });
    }
    p = e;
  }
  return f;
}

/** Add `delta` to the big-endian field at message offset `off` (its bytes may straddle records). */
function nudge(buf: Buffer, w: Wire, off: number, width: number, delta: number): void {
  const at = Array.from({ length: width }, (_, k) => wireOffset(w, off + k));
  let v = 0;
  for (const o of at) v = v * 256 + buf[o]!;
  const mod = 2 ** (8 * width);
  v = (((v + delta) % mod) + mod) % mod;
  for (let k = width - 1; k >= 0; k--) {
    buf[at[k]!] = v & 0xff;
    v = Math.floor(v / 256);
  }
}

// ---------------------------------------------------------------- capturing real hellos


// ---------------------------------------------------------------- the inputs

/** Seeds: valid hellos, each framed as sent. Filled in `before`. */
const seeds: Wire[] = [];

/** One of the byte-level or field-level mutations, applied in place or returning a new buffer. */
function mutate(r: Rng, w: Wire, fields: readonly Field[]): { buf: Buffer; recipe: string[] } {
  let buf = Buffer.from(w.buf);
  const recipe: string[] = [];
  // Field mutations first, while the structure is where `fields` says it is.
  const nFields = r.chance(0.6) ? r.range(1, 2) : 0;
  for (let k = 0; k < nFields; k++) {
    if (r.chance(0.2)) {
      // A record header: its length, content type or version.
      const rec = r.pick(w.records);
      const which = r.int(4);
      if (which === 0) {
        const d = r.pick([-1, 1, -1, 1, r.range(-300, 300)]);
        const v = (buf.readUInt16BE(rec + 3) + d + 0x10000) & 0xffff;
        buf.writeUInt16BE(v, rec + 3);
        recipe.push(`record@${rec} length ${d >= 0 ? '+' : ''}${d}`);
      } else {
        const at = rec + (which === 1 ? 0 : which === 2 ? 1 : 2);
        const v = r.pick([0x00, 0xff, 0x14, 0x15, 0x17, 0x02, 0x04, r.int(256)]);
        buf[at] = v;
        recipe.push(`record@${rec} header byte ${at - rec} = 0x${v.toString(16)}`);
      }
    } else {
      const f = r.pick(fields);
      const d = r.pick([-1, 1, -1, 1, -2, 2, r.range(-300, 300)]);
      nudge(buf, w, f.off, f.width, d);
      recipe.push(`${f.what} (msg+${f.off}) ${d >= 0 ? '+' : ''}${d}`);
    }
  }
  const nBytes = nFields === 0 ? r.range(1, 4) : r.range(0, 2);
  for (let k = 0; k < nBytes && buf.length > 0; k++) {
    // Half the positions in the first 600 bytes, where the fields that matter are.
    const at = r.chance(0.5) ? r.int(Math.min(buf.length, 600)) : r.int(buf.length);
    switch (r.int(7)) {
      case 0: {
        const bit = r.int(8);
        buf[at] = buf[at]! ^ (1 << bit);
        recipe.push(`flip @${at} bit ${bit}`);
        break;
      }
      case 1:
      case 2: {
        const v = r.pick([0x00, 0xff, r.int(256)]);
        buf[at] = v;
        recipe.push(`set @${at} = 0x${v.toString(16)}`);
        break;
      }
      case 3:
        buf = buf.subarray(0, at);
        recipe.push(`truncate to ${at}`);
        break;
      case 4: {
        const ins = r.bytes(r.range(1, 8));
        buf = Buffer.concat([buf.subarray(0, at), ins, buf.subarray(at)]);
        recipe.push(`insert @${at} ${ins.toString('hex')}`);
        break;
      }
      case 5: {
        const n = r.range(1, 8);
        buf = Buffer.concat([buf.subarray(0, at), buf.subarray(at + n)]);
        recipe.push(`delete @${at} ${n} bytes`);
        break;
      }
      default: {
        if (at + 1 >= buf.length) break;
        const d = r.pick([-1, 1]);
        buf.writeUInt16BE((buf.readUInt16BE(at) + d + 0x10000) & 0xffff, at);
        recipe.push(`u16 @${at} ${d >= 0 ? '+' : ''}${d}`);
        break;
      }
    }
  }
  return { buf, recipe };
}

const HOST_CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.';

/** A host_name candidate: mostly valid names, some with bad bytes, empty labels or odd lengths. */
function randomHost(r: Rng): Buffer {
  const len = r.pick([0, 1, 2, r.range(1, 40), r.range(1, 40), 252, 253, 254, 255]);
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = HOST_CHARS.charCodeAt(r.int(r.chance(0.9) ? 62 : HOST_CHARS.length));
  if (len > 0 && r.chance(0.05)) b[r.int(len)] = r.int(256);
  if (len > 0 && r.chance(0.1)) b[len - 1] = 0x2e; // a trailing dot
  if (len > 0 && r.chance(0.05)) b[0] = 0x2e; // a leading dot
  return b;
}

/** An extension block of random extensions, each either well-formed-ish or random bytes. */
function randomExtensions(r: Rng): Buffer[] {
  const out: Buffer[] = [];
  const n = r.range(0, 6);
  for (let i = 0; i < n; i++) {
    const type = r.pick([0, 0, 16, 16, 43, 0xfe0d, 21, 0x0a0a, r.int(0x10000)]);
    if (r.chance(0.25)) {
      out.push(ext(type, r.bytes(r.pick([0, 1, 2, 3, r.range(0, 40)]))));
      continue;
    }
    switch (type) {
      case 0: {
        const entries: Buffer[] = [];
        for (let k = r.pick([0, 1, 1, 1, 2]); k > 0; k--) {
          const name = randomHost(r);
          entries.push(Buffer.concat([u8(r.chance(0.85) ? 0 : r.int(3)), u16(name.length), name]));
        }
        const list = Buffer.concat(entries);
        out.push(ext(0, Buffer.concat([u16(list.length), list])));
        break;
      }
      case 16: {
        const names: Buffer[] = [];
        for (let k = r.pick([0, 1, 2, 3, r.range(1, 6)]); k > 0; k--) {
          names.push(Buffer.from(r.pick(['h2', 'http/1.1', 'acme-tls/1', 'x'.repeat(r.range(1, 255))]), 'latin1'));
        }
        if (r.chance(0.05)) names.push(Buffer.alloc(0)); // an empty name
        out.push(alpnExt(names));
        break;
      }
      case 43: {
        if (r.chance(0.3)) {
          // A list length that agrees with the extension but may be odd, short or empty.
          const vl = r.range(0, 7);
          out.push(ext(43, Buffer.concat([u8(vl), r.bytes(vl)])));
          break;
        }
        const vs = Array.from({ length: r.pick([0, 1, 2, 3]) }, () => r.pick([0x0304, 0x0303, 0x0a0a, r.int(0x10000)]));
        out.push(versionsExt(vs));
        break;
      }
      default:
        out.push(ext(type, r.bytes(r.range(0, 60))));
    }
  }
  return out;
}

function randomFraming(r: Rng): number[] {
  return Array.from({ length: r.range(1, 5) }, () => r.pick([1, 2, 3, 4, 5, r.range(1, 64), r.range(1, 600), 16384]));
}

// ---------------------------------------------------------------- the tests

describe('ClientHello reader: native addon against client-hello.ts (differential fuzz)', { skip: SKIP }, () => {
  before(async () => {
    for (const f of readdirSync(FIXTURES).filter((n) => n.endsWith('.hex')).sort()) {
      seeds.push(fromCapture(`fixture ${f}`, Buffer.from(readFileSync(new URL(f, FIXTURES), 'utf8').trim(), 'hex')));
    }
    const live: [string, tls.ConnectionOptions][] = [
      ['node sni+alpn', { servername: 'a.example.com', ALPNProtocols: ['h2', 'http/1.1'] }],
      ['node no sni', {}],
      ['node upper-case sni', { servername: 'Mixed.EXAMPLE.Com' }],
      ['node trailing-dot sni', { servername: 'dot.example.com.', ALPNProtocols: ['http/1.1'] }],
      ['node alpn list of 512 bytes', { servername: 'alpn512.example.com', ALPNProtocols: ['x'.repeat(255), 'y'.repeat(255)] }],
      ['node alpn list of 513 bytes', { servername: 'alpn513.example.com', ALPNProtocols: ['x'.repeat(255), 'y'.repeat(254), 'z'] }],
    ];
    for (const [name, opts] of live) seeds.push(fromCapture(name, await captureHello(opts)));
    const base = seeds.find((s) => s.name === 'node sni+alpn')!;
    seeds.push(padded('node sni+alpn padded to 40 kB (3 records)', base.msg, 40_000));
    seeds.push(frame('node sni+alpn in records of 1, 2, 3, 50, 200 bytes', base.msg, [1, 2, 3, 50, 200]));
    seeds.push(frame('node upper-case sni in 97-byte records', seeds.find((s) => s.name === 'node upper-case sni')!.msg, [97]));
    seeds.push(frame('synthetic ech', helloMsg([sniExt('public.example.com'), alpnExt(['h2']), versionsExt([0x0a0a, 0x0304, 0x0303]),
      ext(0xfe0d, Buffer.alloc(120, 0xec))]), [16384]));
    seeds.push(frame('synthetic istio name, no alpn', helloMsg([sniExt('outbound_.443_._.svc.cluster.local'), versionsExt([0x0304])]), [16384]));
    seeds.push(frame('synthetic 253-byte name plus a trailing dot', helloMsg([sniExt(`${'a'.repeat(61)}.`.repeat(4) + 'b'.repeat(5) + '.'), alpnExt(['h2'])]), [16384]));
    seeds.push(frame('synthetic server_name without host_name', helloMsg([ext(0, Buffer.concat([u16(6), u8(1), u16(3), Buffer.from('abc')]))]), [16384]));
    seeds.push(frame('synthetic no extensions block', helloMsg(undefined, 0), [16384]));
  });

  it('the seeds: JS parses each; native agrees (the 513-byte ALPN list being the allowed difference)', () => {
    const d = new Differ();
    for (const s of seeds) {
      const { js, nat } = d.check(s.buf, 65536, s.name);
      assert.equal(js.kind, 'tls', `${s.name}: ${jsSummary(js)}`);
      if (s.name.includes('513')) assert.equal(nat.kind, 'other', 'a 513-byte ALPN list is beyond the native cap');
      if (s.name.includes('512')) assert.equal(nat.kind, 'tls', 'a 512-byte ALPN list is within the native cap');
    }
    const sni = (name: string) => (parseClientHello(seeds.find((s) => s.name === name)!.buf, 65536) as { sni?: string }).sni;
    assert.equal(sni('node upper-case sni'), 'mixed.example.com');
    assert.equal(sni('node trailing-dot sni'), 'dot.example.com');
    assert.equal(sni('node no sni'), undefined);
    assert.ok(seeds.find((s) => s.name.includes('40 kB'))!.records.length === 3);
    d.done({ tls: seeds.length - 2, 'alpn-over-native-cap': 2 }); // node-large.hex and the 513-byte list
  });

  it('every prefix of every seed: need-more until the last byte, then the same hello', () => {
    const d = new Differ();
    for (const s of seeds) {
      for (let n = 0; n <= s.buf.length; n++) {
        const { js } = d.check(s.buf.subarray(0, n), 65536, `${s.name}, prefix of ${n} bytes`);
        if (n < s.buf.length) assert.equal(js.kind, 'need-more', `${s.name} prefix ${n}`);
      }
      // The same prefixes at the default cap, where the hello fits in it.
      if (s.buf.length <= 16384) for (let n = 0; n <= s.buf.length; n += 7) d.check(s.buf.subarray(0, n), 16384, `${s.name}, prefix of ${n} bytes`);
    }
    d.done({ tls: seeds.length, 'need-more': 50_000 });
  });

  it(`${ITERS} seeded mutations of the seeds (re-framed at random half the time), each at maxBytes ${MAX_BYTES.join(', ')} and one random cap`, () => {
    const d = new Differ();
    const fields = new Map(seeds.map((s) => [s.msg, fieldsOf(s.msg)]));
    for (let i = 0; i < ITERS; i++) {
      const r = rngFor(1, i);
      let w = r.pick(seeds);
      let framing = 'as sent';
      if (r.chance(0.5) && w.msg.length <= 8000) {
        const sizes = randomFraming(r);
        w = frame(w.name, w.msg, sizes);
        framing = `records of ${sizes.join(', ')}`;
      }
      const { buf, recipe } = mutate(r, w, fields.get(w.msg)!);
      const where = `FUZZ_SEED=${SEED} mutation iteration ${i}: ${w.name}, ${framing}; ${recipe.join('; ')}`;
      for (const max of MAX_BYTES) d.check(buf, max, where);
      d.check(buf, r.int(70_000), where);
    }
    d.done({ tls: ITERS / 5, 'need-more': ITERS / 20, malformed: ITERS / 5, 'too-large': ITERS / 2, 'not-tls': ITERS / 100, 'alpn-over-native-cap': 10 });
  });

  it('hellos with random extension blocks (names, ALPN lists, versions, ECH, duplicates), framed at random', () => {
    const d = new Differ();
    const n = Math.max(1, Math.floor(ITERS / 2));
    for (let i = 0; i < n; i++) {
      const r = rngFor(2, i);
      const msg = helloMsg(r.chance(0.05) ? undefined : randomExtensions(r), r.pick([0, 32, 32, 33]));
      const sizes = r.chance(0.5) ? [16384] : randomFraming(r);
      const w = frame('random extensions', msg, sizes);
      const where = `FUZZ_SEED=${SEED} extensions iteration ${i}: records of ${sizes.join(', ')}`;
      d.check(w.buf, 16384, where);
      if (r.chance(0.3)) d.check(w.buf.subarray(0, r.int(w.buf.length)), 16384, `${where}, truncated`);
    }
    d.done({ tls: n / 10, malformed: n / 10, 'need-more': n / 20 });
  });

  it('pure random buffers, and random bytes behind a handshake record header', () => {
    const d = new Differ();
    const n = ITERS;
    for (let i = 0; i < n; i++) {
      const r = rngFor(3, i);
      let buf: Buffer;
      let shape: string;
      switch (r.int(3)) {
        case 0:
          buf = r.bytes(r.range(0, 600));
          shape = 'random bytes';
          break;
        case 1: {
          // A record header and a ClientHello header with random lengths, then random bytes.
          const rlen = r.pick([0, 1, 4, r.range(0, 700), 16384, 16385, r.int(0x10000)]);
          const hlen = r.pick([0, 1, 34, r.range(0, 700), 0xffffff, r.int(0x20000)]);
          buf = Buffer.concat([Buffer.from([0x16, 3, r.int(5)]), u16(rlen), u8(r.chance(0.9) ? 1 : r.int(256)), u24(hlen), r.bytes(r.range(0, 700))]);
          shape = 'record header, random lengths';
          break;
        }
        default: {
          // Correct framing around a random body, so the body parser sees it all.
          const body = r.bytes(r.range(0, 900));
          const msg = Buffer.concat([u8(1), u24(body.length), body]);
          if (body.length >= 2 && r.chance(0.3)) msg.writeUInt16BE(0x0303, 4);
          buf = frame('', msg, r.chance(0.7) ? [16384] : randomFraming(r)).buf;
          shape = 'framed random body';
        }
      }
      const where = `FUZZ_SEED=${SEED} random iteration ${i}: ${shape}`;
      d.check(buf, 16384, where);
      d.check(buf, r.int(70_000), where);
    }
    d.done({ 'not-tls': n / 5, malformed: n / 5, 'need-more': n / 200, 'too-large': n / 50 });
  });

  it('hostile shapes: 16 MB claims, empty and oversized records, foreign records mid-hello, cap boundaries', () => {
    const d = new Differ();
    const base = seeds.find((s) => s.name === 'node sni+alpn')!;
    const msg = base.msg;
    const head = (type: number, len: number, major = 3) => Buffer.from([type, major, 1, len >> 8, len & 0xff]);
    const first100 = Buffer.concat([head(0x16, 100), msg.subarray(0, 100)]);
    const cases: [string, Buffer, ParseState['kind'] | undefined, number[]][] = [
      ['empty', Buffer.alloc(0), 'need-more', [16384]],
      ['one handshake byte', Buffer.from([0x16]), 'need-more', [16384]],
      ['record version major 2', Buffer.from([0x16, 0x02]), 'not-tls', [16384]],
      ['SSLv2-style hello', Buffer.from('8046010301002d0000001000', 'hex'), 'not-tls', [16384]],
      ['HTTP', Buffer.from('GET / HTTP/1.1\r\nHost: a\r\n\r\n'), 'not-tls', [16384]],
      ['16 MB hello claim', Buffer.concat([Buffer.from([0x16, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]), Buffer.alloc(200, 0xab)]), 'too-large', [300, 16384, 65536, 16777218]],
      ['16 MB hello claim, cap just large enough', Buffer.concat([Buffer.from([0x16, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]), Buffer.alloc(200, 0xab)]), 'need-more', [16777219]],
      ['16 MB hello claim, header only', Buffer.from([0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]), 'too-large', [16384]],
      ['zero-length record', head(0x16, 0), 'malformed', [16384]],
      ['zero-length record, then bytes', Buffer.concat([head(0x16, 0), msg.subarray(0, 50)]), 'malformed', [16384]],
      ['zero-length second record', Buffer.concat([first100, head(0x16, 0), msg.subarray(100)]), 'malformed', [16384]],
      ['record length 16385', Buffer.concat([head(0x16, 16385), msg]), 'malformed', [16384, 65536]],
      ['record length 65535', Buffer.concat([head(0x16, 65535), msg]), 'malformed', [65536]],
      ['record length 16384 carrying a shorter hello', Buffer.concat([head(0x16, 16384), msg]), 'tls', [16384]],
      ['not a ClientHello (ServerHello)', Buffer.concat([head(0x16, 4), Buffer.from([2, 0, 0, 0])]), 'malformed', [16384]],
      ['second record is application data', Buffer.concat([first100, head(0x17, msg.length - 100), msg.subarray(100)]), 'malformed', [16384]],
      ['second record is an alert, one byte of it', Buffer.concat([first100, Buffer.from([0x15])]), 'malformed', [16384]],
      ['second record is change_cipher_spec', Buffer.concat([first100, head(0x14, 1), Buffer.from([1])]), 'malformed', [16384]],
      ['second record has version major 2', Buffer.concat([first100, head(0x16, msg.length - 100, 2), msg.subarray(100)]), 'malformed', [16384]],
      ['second record header, two bytes with major 2', Buffer.concat([first100, Buffer.from([0x16, 2])]), 'malformed', [16384]],
      ['second record header, two bytes', Buffer.concat([first100, Buffer.from([0x16, 3])]), 'need-more', [16384]],
      ['handshake header split 1+3 with an application-data record between',
        Buffer.concat([head(0x16, 1), msg.subarray(0, 1), head(0x17, 3), msg.subarray(1, 4)]), 'malformed', [16384]],
      ['hello then trailing records', Buffer.concat([base.buf, head(0x17, 5), Buffer.alloc(5), head(0x15, 2), Buffer.from([2, 40])]), 'tls', [16384]],
      ['hello with its last byte in a record of its own, then junk', Buffer.concat([frame('', msg, [msg.length - 1, 1]).buf, Buffer.from([0xff, 0xff])]), 'tls', [16384]],
      ['hello record claims more than it carries, trailing junk inside', Buffer.concat([head(0x16, msg.length + 10), msg, Buffer.alloc(10, 0xee)]), 'tls', [16384]],
      ['negative cap', base.buf, 'too-large', [-1, 0]],
    ];
    for (const [name, buf, want, caps] of cases) {
      for (const max of caps) {
        const { js } = d.check(buf, max, `hostile: ${name}`);
        if (want !== undefined) assert.equal(js.kind, want, `hostile: ${name} at maxBytes ${max}: JS says ${jsSummary(js)}`);
      }
    }
    // Each field check at its edge, in a hello that is otherwise well formed.
    const ok = [sniExt('a.example.com'), alpnExt(['h2']), versionsExt([0x0304])];
    const edges: [string, Buffer, ParseState['kind'] | undefined][] = [
      ['supported_versions list of 3 bytes', helloMsg([...ok.slice(0, 2), ext(43, Buffer.from([3, 3, 4, 3]))]), 'malformed'],
      ['supported_versions list of 1 byte', helloMsg([ext(43, Buffer.from([1, 3]))]), 'malformed'],
      ['supported_versions list of 0 bytes', helloMsg([ext(43, Buffer.from([0]))]), 'malformed'],
      ['empty supported_versions extension', helloMsg([ext(43, Buffer.alloc(0))]), 'malformed'],
      ['duplicate supported_versions', helloMsg([...ok, versionsExt([0x0304])]), 'malformed'],
      ['duplicate ECH', helloMsg([...ok, ext(0xfe0d, Buffer.alloc(8)), ext(0xfe0d, Buffer.alloc(0))]), 'malformed'],
      ['empty ECH', helloMsg([...ok, ext(0xfe0d, Buffer.alloc(0))]), 'tls'],
      ['duplicate ALPN', helloMsg([...ok, alpnExt(['http/1.1'])]), 'malformed'],
      ['duplicate server_name', helloMsg([...ok, sniExt('b.example.com')]), 'malformed'],
      ['two host_names in one server_name', helloMsg([ext(0, Buffer.concat([u16(10), u8(0), u16(2), Buffer.from('ab'), u8(0), u16(2), Buffer.from('cd')]))]), 'malformed'],
      ['a host_name and an unknown name type', helloMsg([ext(0, Buffer.concat([u16(10), u8(0), u16(2), Buffer.from('ab'), u8(7), u16(2), Buffer.from('cd')]))]), 'tls'],
      ['empty server_name list', helloMsg([ext(0, u16(0))]), 'tls'],
      ['host_name of 253 bytes', helloMsg([sniExt(`${'a'.repeat(63)}.`.repeat(3) + 'b'.repeat(61))]), 'tls'],
      ['host_name of 254 bytes', helloMsg([sniExt(`${'a'.repeat(63)}.`.repeat(3) + 'b'.repeat(62))]), 'malformed'],
      ['host_name of one dot', helloMsg([sniExt('.')]), 'malformed'],
      // One dot is dropped; what is left ends in an empty label.
      ['host_name with two trailing dots', helloMsg([sniExt('a.example.com..')]), 'malformed'],
      ['host_name with a NUL', helloMsg([sniExt('a.exam\0ple.com')]), 'malformed'],
      ['host_name with a high byte', helloMsg([sniExt('a.\xe9xample.com')]), 'malformed'],
      ['empty ALPN name', helloMsg([alpnExt(['h2', ''])]), 'malformed'],
      ['ALPN list length 0', helloMsg([ext(16, u16(0))]), 'malformed'],
      ['ALPN name with every byte value', helloMsg([alpnExt([Buffer.from(Array.from({ length: 255 }, (_, k) => k + 1))])]), 'tls'],
      ['session id of 33 bytes', helloMsg(ok, 33), 'malformed'],
      ['no extensions, 32-byte session id', helloMsg(undefined, 32), 'tls'],
      ['empty extensions block', helloMsg([]), 'tls'],
    ];
    for (const [name, m, want] of edges) {
      for (const sizes of [[16384], [5], [1, 40, 3]]) {
        const { js } = d.check(frame(name, m, sizes).buf, 16384, `field edge: ${name}, records of ${sizes.join(', ')}`);
        if (want !== undefined) assert.equal(js.kind, want, `field edge: ${name}: JS says ${jsSummary(js)}`);
      }
    }
    // The cap's edge for every seed: the hello plus the headers of records after the first.
    for (const s of seeds) {
      const need = s.msg.length + 5 * (s.records.length - 1);
      const at = d.check(s.buf, need, `${s.name}, maxBytes exactly its size`);
      const below = d.check(s.buf, need - 1, `${s.name}, maxBytes one below its size`);
      assert.equal(at.js.kind, 'tls', s.name);
      assert.equal(below.js.kind, 'too-large', s.name);
    }
    // Every prefix of a hello whose records end inside the handshake header, at a tight cap.
    const tiny = frame('records of 1, 2, 1 then the rest', msg, [1, 2, 1, msg.length]);
    for (let n = 0; n <= tiny.buf.length; n++) {
      d.check(tiny.buf.subarray(0, n), msg.length + 15, `tiny records, prefix ${n}`);
      d.check(tiny.buf.subarray(0, n), msg.length + 14, `tiny records, prefix ${n}, cap one short`);
    }
    d.done({ tls: seeds.length + 20, 'need-more': 100, malformed: 50, 'too-large': seeds.length + 4, 'not-tls': 3 });
  });

  it('compared a meaningful number of inputs in every class', () => {
    const sum = OUTCOMES.reduce((n, k) => n + total[k], 0);
    assert.ok(sum >= 5 * ITERS, `${sum} comparisons`);
    assert.ok(total.tls >= ITERS / 4, JSON.stringify(total));
    assert.ok(total['need-more'] >= ITERS, JSON.stringify(total));
    assert.ok(total['not-tls'] + total['too-large'] + total.malformed >= ITERS, JSON.stringify(total));
    for (const k of OUTCOMES) assert.ok(total[k] > 0, `no '${k}' comparisons: ${JSON.stringify(total)}`);
  });

  after(() => {
    if (process.env.FUZZ_VERBOSE) console.log(`client-hello native differential: FUZZ_SEED=${SEED}`, JSON.stringify(total));
  });
});

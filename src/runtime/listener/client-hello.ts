/**
 * ClientHello reader: the first thing every TLS-inspecting listener runs.
 *
 * Two layers:
 * - `parseClientHello(buf, maxBytes)`: pure, never throws, O(n). Given the bytes received so far
 *   it says whether this is a TLS ClientHello (and its SNI / ALPN / versions / ECH), not TLS at
 *   all, too large, malformed, or that more bytes are needed.
 * - `readClientHello(socket, opts)`: reads a socket until the parser decides, with a byte cap and
 *   a timeout, and hands back every byte it consumed so the caller can replay them.
 *
 * The hello may be spread over several handshake records (clients and middleboxes fragment it on
 * purpose, and post-quantum key shares push it past one TCP segment), so records are reassembled.
 * Only the fields routing needs are extracted; anything else is left for the real TLS stack to
 * judge once the bytes are replayed.
 */
import type * as net from 'node:net';
import { readPrefix } from './read-prefix.js';

/** The hello was parsed; fields are as the client sent them. */
export interface ClientHelloInfo {
  kind: 'tls';
  /** host_name from server_name, lower-cased, trailing dot removed; absent when none was sent. */
  sni?: string;
  /** ALPN protocol names in client preference order (bytes decoded as latin1); empty if none. */
  alpn: string[];
  /** An encrypted_client_hello extension was present: `sni` is then the outer (public) name. */
  ech: boolean;
  /** ClientHello.legacy_version, e.g. 0x0303. */
  legacyVersion: number;
  /** supported_versions as sent (GREASE values included); empty if the extension is absent. */
  supportedVersions: number[];
  /** Size of the handshake message including its 4-byte header (record headers excluded). */
  helloLength: number;
}

export type ParseState =
  | { kind: 'need-more' }
  | ClientHelloInfo
  | { kind: 'not-tls' }
  | { kind: 'too-large' }
  | { kind: 'malformed'; detail: string };

export type ClientHelloResult = (
  | ClientHelloInfo
  | { kind: 'not-tls' }
  | { kind: 'too-large' }
  | { kind: 'malformed'; detail: string }
  | { kind: 'timeout' }
  | { kind: 'closed' }
) & { bytes: Buffer };

export interface ReadClientHelloOptions {
  /** Give up after this long without a decision (timer is unref'd). */
  timeoutMs: number;
  /** Largest handshake message accepted; see `parseClientHello` for how framing counts. */
  maxBytes: number;
}

/** TLS record header: type(1) version(2) length(2). */
export const RECORD_HEADER_LENGTH = 5;
const CONTENT_TYPE_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
/** RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes. */
const MAX_FRAGMENT = 16384;

const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const EXT_SUPPORTED_VERSIONS = 43;
const EXT_ECH = 0xfe0d;

const NEED_MORE: ParseState = Object.freeze({ kind: 'need-more' }) as ParseState;
const NOT_TLS: ParseState = Object.freeze({ kind: 'not-tls' }) as ParseState;
const TOO_LARGE: ParseState = Object.freeze({ kind: 'too-large' }) as ParseState;

function malformed(detail: string): ParseState {
  return { kind: 'malformed', detail };
}

/**
 * Where the record walk stopped. Only whole records are ever committed to it, so re-scanning a
 * growing buffer costs O(new bytes' records), not O(buffer), across calls (see `readClientHello`).
 */
interface Cursor {
  /** Offset of the first record not yet fully consumed. */
  off: number;
  /** Records fully consumed. */
  records: number;
  /** Hello bytes (handshake header + body) carried by the consumed records. */
  got: number;
  /** The 4-byte handshake header, packed big-endian, as far as it has been seen. */
  header: number;
}

function newCursor(): Cursor {
  return { off: 0, records: 0, got: 0, header: 0 };
}

/**
 * Decide what the bytes received so far are.
 *
 * - First byte other than 0x16 (handshake record), or a record version whose major is not 3:
 *   `not-tls` at once. SSLv2-compatible hellos (high bit set) are therefore `not-tls`.
 * - `too-large` as soon as the handshake header claims more than `maxBytes`, or the record framing
 *   after the first record would push the bytes to read past `maxBytes + RECORD_HEADER_LENGTH`;
 *   this is what lets a reader cap its buffer at `maxBytes + RECORD_HEADER_LENGTH`.
 * - `malformed` for a TLS handshake that breaks framing or the fields read here (never thrown).
 * - Otherwise `need-more` until the whole handshake message is present, then the parsed hello.
 *   Bytes after the hello (other records, early data) are ignored.
 *
 * @example
 * const st = parseClientHello(bytes, 16384);
 * if (st.kind === 'tls') route(st.sni, st.alpn);
 */
export function parseClientHello(buf: Buffer, maxBytes: number): ParseState {
  return scan(buf, budget(maxBytes), newCursor());
}

/** NaN or negative budgets accept nothing rather than everything. */
function budget(maxBytes: number): number {
  return maxBytes > 0 ? maxBytes : 0;
}

/**
 * The same decision as `parseClientHello`, for a buffer that keeps growing: whole records already
 * walked are not walked again, so feeding a hello one byte at a time stays O(n) overall. Each
 * call must pass the accumulated bytes (the previous buffer's contents as a prefix); once a call
 * returns anything but 'need-more' the answer is final.
 *
 * @example
 * const scanner = new ClientHelloScanner(16384);
 * let st = scanner.scan(acc); // ... acc = Buffer.concat([acc, chunk]); st = scanner.scan(acc);
 */
export class ClientHelloScanner {
  readonly #maxBytes: number;
  readonly #cursor: Cursor = newCursor();

  constructor(maxBytes: number) {
    this.#maxBytes = budget(maxBytes);
  }

  scan(buf: Buffer): ParseState {
    return scan(buf, this.#maxBytes, this.#cursor);
  }
}

function scan(buf: Buffer, maxBytes: number, c: Cursor): ParseState {
  const len = buf.length;
  if (len === 0) return NEED_MORE;
  // Decide "not TLS" from the first two bytes, before anything else: plaintext detection
  // (PERMISSIVE) depends on answering without waiting for more input.
  if (c.records === 0) {
    if (buf[0] !== CONTENT_TYPE_HANDSHAKE) return NOT_TLS;
    if (len >= 2 && buf[1] !== 3) return NOT_TLS;
  }
  for (;;) {
    const off = c.off;
    if (off + RECORD_HEADER_LENGTH > len) {
      if (c.records > 0) {
        if (off < len && buf[off] !== CONTENT_TYPE_HANDSHAKE) {
          return malformed(`record ${c.records + 1} has content type ${buf[off]} before the ClientHello ended`);
        }
        if (off + 1 < len && buf[off + 1] !== 3) return malformed(`record ${c.records + 1} has version major ${buf[off + 1]}`);
      }
      return NEED_MORE;
    }
    if (c.records > 0) {
      if (buf[off] !== CONTENT_TYPE_HANDSHAKE) {
        return malformed(`record ${c.records + 1} has content type ${buf[off]} before the ClientHello ended`);
      }
      if (buf[off + 1] !== 3) return malformed(`record ${c.records + 1} has version major ${buf[off + 1]}`);
    }
    const rlen = (buf[off + 3]! << 8) | buf[off + 4]!;
    if (rlen === 0) return malformed('empty handshake record');
    if (rlen > MAX_FRAGMENT) return malformed(`record length ${rlen} exceeds 16384`);
    const recordNo = c.records + 1;
    const fragStart = off + RECORD_HEADER_LENGTH;
    const avail = Math.min(rlen, len - fragStart);
    // Pick up handshake header bytes that live in this record (they may straddle records).
    let got = c.got;
    let header = c.header;
    let i = 0;
    while (got < 4 && i < avail) {
      header = header * 256 + buf[fragStart + i]!;
      got++;
      i++;
      if (got === 1 && header !== HANDSHAKE_CLIENT_HELLO) {
        return malformed(`handshake type ${header}, expected ClientHello (1)`);
      }
    }
    if (got < 4) {
      if (avail < rlen) return NEED_MORE; // header still arriving in this record
      c.off = fragStart + rlen;
      c.records = recordNo;
      c.got = got;
      c.header = header;
      continue;
    }
    const helloLength = 4 + (header & 0xffffff);
    // Record headers after the first one count against the budget too.
    if (helloLength + RECORD_HEADER_LENGTH * (recordNo - 1) > maxBytes) return TOO_LARGE;
    const remaining = helloLength - got;
    const inThis = rlen - i; // hello bytes this record can still carry
    if (remaining <= inThis) {
      // The hello ends inside this record.
      if (avail - i < remaining) return NEED_MORE;
      if (recordNo === 1) {
        return parseBody(buf, fragStart + 4, fragStart + helloLength, helloLength);
      }
      const whole = reassemble(buf, helloLength);
      return parseBody(whole, 4, helloLength, helloLength);
    }
    if (avail < rlen) return NEED_MORE;
    c.off = fragStart + rlen;
    c.records = recordNo;
    c.got = got + inThis;
    c.header = header;
  }
}

/** Copy the hello's bytes out of consecutive records (framing already validated by `scan`). */
function reassemble(buf: Buffer, helloLength: number): Buffer {
  const out = Buffer.allocUnsafe(helloLength);
  let off = 0;
  let n = 0;
  while (n < helloLength) {
    const rlen = (buf[off + 3]! << 8) | buf[off + 4]!;
    const take = Math.min(rlen, helloLength - n);
    buf.copy(out, n, off + RECORD_HEADER_LENGTH, off + RECORD_HEADER_LENGTH + take);
    n += take;
    off += RECORD_HEADER_LENGTH + rlen;
  }
  return out;
}

/** Parse ClientHello body bytes [p, end) of buffer `b`. */
function parseBody(b: Buffer, p: number, end: number, helloLength: number): ParseState {
  if (end - p < 2 + 32 + 1) return malformed('ClientHello shorter than version, random and session id');
  const legacyVersion = (b[p]! << 8) | b[p + 1]!;
  p += 34;
  const sidLen = b[p]!;
  if (sidLen > 32) return malformed(`session id length ${sidLen} exceeds 32`);
  p += 1 + sidLen;
  if (p + 2 > end) return malformed('truncated before cipher suites');
  const csLen = (b[p]! << 8) | b[p + 1]!;
  if (csLen < 2 || (csLen & 1) !== 0) return malformed(`cipher suites length ${csLen} is invalid`);
  p += 2 + csLen;
  if (p + 1 > end) return malformed('truncated before compression methods');
  const cmLen = b[p]!;
  if (cmLen < 1) return malformed('no compression methods');
  p += 1 + cmLen;
  if (p > end) return malformed('compression methods overrun the ClientHello');

  let sni: string | undefined;
  const alpn: string[] = [];
  let supportedVersions: number[] = [];
  let ech = false;
  if (p < end) {
    if (p + 2 > end) return malformed('truncated extensions length');
    const extLen = (b[p]! << 8) | b[p + 1]!;
    p += 2;
    if (p + extLen !== end) return malformed(`extensions length ${extLen} does not match the ClientHello`);
    let seenSni = false;
    let seenAlpn = false;
    let seenVersions = false;
    while (p < end) {
      if (p + 4 > end) return malformed('truncated extension header');
      const type = (b[p]! << 8) | b[p + 1]!;
      const elen = (b[p + 2]! << 8) | b[p + 3]!;
      const s = p + 4;
      const e = s + elen;
      if (e > end) return malformed(`extension ${type} overruns the extensions block`);
      switch (type) {
        case EXT_SERVER_NAME: {
          if (seenSni) return malformed('duplicate server_name extension');
          seenSni = true;
          const r = parseServerName(b, s, e);
          if (typeof r !== 'string' && r !== undefined) return r;
          sni = r;
          break;
        }
        case EXT_ALPN: {
          if (seenAlpn) return malformed('duplicate ALPN extension');
          seenAlpn = true;
          const err = parseAlpn(b, s, e, alpn);
          if (err) return err;
          break;
        }
        case EXT_SUPPORTED_VERSIONS: {
          if (seenVersions) return malformed('duplicate supported_versions extension');
          seenVersions = true;
          if (elen < 1) return malformed('empty supported_versions extension');
          const vl = b[s]!;
          if (vl + 1 !== elen || vl < 2 || (vl & 1) !== 0) return malformed('supported_versions length is invalid');
          supportedVersions = new Array<number>(vl >> 1);
          for (let k = 0, q = s + 1; q < e; k++, q += 2) supportedVersions[k] = (b[q]! << 8) | b[q + 1]!;
          break;
        }
        case EXT_ECH:
          if (ech) return malformed('duplicate encrypted_client_hello extension');
          ech = true;
          break;
        default:
          break;
      }
      p = e;
    }
  }
  const info: ClientHelloInfo = { kind: 'tls', alpn, ech, legacyVersion, supportedVersions, helloLength };
  if (sni !== undefined) info.sni = sni;
  return info;
}

/**
 * server_name (RFC 6066 3): a list of (type, name). Returns the host_name, undefined when the list
 * has no host_name, or a malformed state. Names are checked against LDH plus '_' (Istio's
 * AUTO_PASSTHROUGH names such as `outbound_.443_._.svc.cluster.local` need it), no empty labels.
 */
function parseServerName(b: Buffer, s: number, e: number): string | undefined | ParseState {
  if (e - s < 2) return malformed('server_name extension too short');
  const listLen = (b[s]! << 8) | b[s + 1]!;
  if (s + 2 + listLen !== e) return malformed('server_name list length does not match the extension');
  let p = s + 2;
  let name: string | undefined;
  while (p < e) {
    if (p + 3 > e) return malformed('truncated server_name entry');
    const nameType = b[p]!;
    const nlen = (b[p + 1]! << 8) | b[p + 2]!;
    const ns = p + 3;
    const ne = ns + nlen;
    if (ne > e) return malformed('server_name entry overruns the list');
    if (nameType === 0) {
      if (name !== undefined) return malformed('more than one host_name in server_name');
      const r = hostName(b, ns, ne);
      if (typeof r !== 'string') return r;
      name = r;
    }
    p = ne;
  }
  return name;
}

function hostName(b: Buffer, s: number, e: number): string | ParseState {
  // One trailing dot is tolerated and dropped so "a.example.com." routes like "a.example.com".
  if (e > s && b[e - 1] === 0x2e) e--;
  const n = e - s;
  if (n < 1 || n > 253) return malformed(`host_name length ${n} is out of range`);
  let upper = false;
  let prevDot = true; // a leading dot is an empty label
  for (let i = s; i < e; i++) {
    const ch = b[i]!;
    if (ch === 0x2e) {
      if (prevDot) return malformed('host_name has an empty label');
      prevDot = true;
      continue;
    }
    prevDot = false;
    if ((ch >= 0x61 && ch <= 0x7a) || (ch >= 0x30 && ch <= 0x39) || ch === 0x2d || ch === 0x5f) continue;
    if (ch >= 0x41 && ch <= 0x5a) {
      upper = true;
      continue;
    }
    return malformed(`host_name contains byte 0x${ch.toString(16).padStart(2, '0')}`);
  }
  // "a.example.com.." has an empty last label once the one trailing dot is dropped.
  if (prevDot) return malformed('host_name has an empty label');
  const str = b.toString('latin1', s, e);
  return upper ? str.toLowerCase() : str;
}

function parseAlpn(b: Buffer, s: number, e: number, out: string[]): ParseState | undefined {
  if (e - s < 2) return malformed('ALPN extension too short');
  const listLen = (b[s]! << 8) | b[s + 1]!;
  if (listLen < 2 || s + 2 + listLen !== e) return malformed('ALPN list length does not match the extension');
  let p = s + 2;
  while (p < e) {
    const plen = b[p]!;
    if (plen === 0) return malformed('empty ALPN protocol name');
    if (p + 1 + plen > e) return malformed('ALPN protocol name overruns the list');
    out.push(b.toString('latin1', p + 1, p + 1 + plen));
    p += 1 + plen;
  }
  return undefined;
}

/**
 * Read a ClientHello from `socket` and return the verdict with every byte consumed.
 *
 * The socket is left paused with no listeners added by this function. To hand the connection on,
 * replay `bytes` first:
 * - terminate: `socket.unshift(result.bytes); new tls.TLSSocket(socket, { isServer: true, ... })`
 * - passthrough / plaintext: write `result.bytes` to the upstream, then pipe the socket.
 *
 * Buffered bytes are capped at `maxBytes + RECORD_HEADER_LENGTH`, plus at most the one socket read
 * that crossed the cap (already pulled from the kernel, so it is returned rather than dropped).
 * 'closed' when the peer ends or errors before a decision; 'timeout' after `timeoutMs`.
 * Never rejects.
 *
 * @example
 * const r = await readClientHello(sock, { timeoutMs: 5000, maxBytes: 16384 });
 * if (r.kind === 'tls') { sock.unshift(r.bytes); terminate(sock, r.sni); }
 */
export function readClientHello(socket: net.Socket, opts: ReadClientHelloOptions): Promise<ClientHelloResult> {
  const maxBytes = budget(opts.maxBytes);
  const cap = maxBytes + RECORD_HEADER_LENGTH;
  const scanner = new ClientHelloScanner(maxBytes);
  return readPrefix<ClientHelloResult>(socket, { timeoutMs: opts.timeoutMs, cap, minStore: 1024 },
    (view) => resultOf(scanner.scan(view), view, cap), (why, view) => ({ kind: why, bytes: view }));
}

/**
 * The reader's verdict on `view` from the scanner's state: undefined while more bytes are needed
 * below `cap` (maxBytes + RECORD_HEADER_LENGTH, where the parser has always decided).
 */
export function resultOf(st: ParseState, view: Buffer, cap: number): ClientHelloResult | undefined {
  if (st.kind !== 'need-more') return withBytes(st, view);
  return view.length >= cap ? { kind: 'too-large', bytes: view } : undefined; // defensive
}

function withBytes(st: Exclude<ParseState, { kind: 'need-more' }>, bytes: Buffer): ClientHelloResult {
  switch (st.kind) {
    case 'tls':
      return Object.assign(st, { bytes }); // a fresh object from parseBody, safe to extend
    case 'malformed':
      return { kind: 'malformed', detail: st.detail, bytes };
    case 'not-tls':
      return { kind: 'not-tls', bytes };
    case 'too-large':
      return { kind: 'too-large', bytes };
  }
}


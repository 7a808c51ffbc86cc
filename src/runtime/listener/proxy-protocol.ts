/**
 * PROXY protocol (HAProxy's spec, versions 1 and 2): how an L4 balancer in front of tlsgate tells
 * it the real client address, and how tlsgate tells an upstream the same thing.
 *
 * Receiving, in two layers like the ClientHello reader:
 * - `parseProxyHeader(buf)`: pure, never throws, O(n). Says whether the bytes so far start a PROXY
 *   header (v1 text or v2 binary), are not one at all, are a broken one, or need more bytes.
 * - `readProxyHeader(socket, opts)`: reads until the parser decides, with a cap and a timeout, and
 *   returns the bytes after the header as `rest` so the ClientHello reader can be fed them.
 * A header is only ever honoured from a trusted peer: see `isTrusted`.
 *
 * Sending: `encodeProxyV1`, `encodeProxyV2` and `sslTlvs` (v2 TLVs for ALPN, SNI, TLS version,
 * cipher and the verified client certificate's CN and URI SAN).
 *
 * tlsgate's own TLV: `PP2_TYPE_TLSGATE_URI_SAN` (0xE0, first of the range the spec leaves to
 * applications) carries the client certificate's URI SAN (a SPIFFE ID in a mesh) as UTF-8, so a
 * non-HTTP backend can learn the peer identity that XFCC gives HTTP backends.
 *
 * Not done here: the CRC32C TLV (0x03) is passed through as an ordinary TLV, not verified.
 */
import type * as net from 'node:net';
import { readPrefix } from './read-prefix.js';
import { parseCidr } from './chain-select.js';

// ---------- constants ----------

/** The 12 bytes every v2 header starts with. */
export const PROXY_V2_SIGNATURE: Buffer = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
/** Longest v1 line, CRLF included (spec 2.1). */
export const PROXY_V1_MAX_LENGTH = 107;
/** v2 fixed part: signature, version/command, family/protocol, length. */
export const PROXY_V2_HEADER_LENGTH = 16;
/** Default cap on a whole v2 header; longer claims are refused without waiting for them. */
export const PROXY_DEFAULT_MAX_BYTES = 4096;

export const PP2_TYPE_ALPN = 0x01;
export const PP2_TYPE_AUTHORITY = 0x02;
export const PP2_TYPE_CRC32C = 0x03;
export const PP2_TYPE_NOOP = 0x04;
export const PP2_TYPE_UNIQUE_ID = 0x05;
export const PP2_TYPE_SSL = 0x20;
export const PP2_SUBTYPE_SSL_VERSION = 0x21;
export const PP2_SUBTYPE_SSL_CN = 0x22;
export const PP2_SUBTYPE_SSL_CIPHER = 0x23;
export const PP2_SUBTYPE_SSL_SIG_ALG = 0x24;
export const PP2_SUBTYPE_SSL_KEY_ALG = 0x25;
export const PP2_TYPE_NETNS = 0x30;
/** tlsgate's TLV: the client certificate's URI SAN, UTF-8 (custom range 0xE0-0xEF). */
export const PP2_TYPE_TLSGATE_URI_SAN = 0xe0;

/** PP2_TYPE_SSL `client` bits. */
export const PP2_CLIENT_SSL = 0x01;
export const PP2_CLIENT_CERT_CONN = 0x02;
export const PP2_CLIENT_CERT_SESS = 0x04;

const PREFIX_V1 = Buffer.from('PROXY ', 'latin1');
const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
/** Address block sizes per v2 family (high nibble of byte 13). */
const V2_ADDR_LEN = [0, 12, 36, 216] as const;
const UNIX_PATH_LEN = 108;

// ---------- types ----------

export interface ProxyEndpoint {
  /** IPv4 dotted quad, IPv6 in RFC 5952 form, or a UNIX socket path. */
  address: string;
  /** 0 for UNIX sockets. */
  port: number;
}

export interface ProxyTlv {
  type: number;
  value: Buffer;
}

export type ProxyFamily = 'TCP4' | 'TCP6' | 'UNKNOWN' | 'UNIX';

export interface ProxyHeader {
  kind: 'proxy';
  version: 1 | 2;
  /** v1 is always PROXY. LOCAL (v2 health checks): use the real connection's addresses. */
  command: 'PROXY' | 'LOCAL';
  /**
   * Address family as announced. v2 AF_INET is reported as 'TCP4' and AF_INET6 as 'TCP6' even over
   * DGRAM (see `transport`). LOCAL headers report 'UNKNOWN': their address block is ignored.
   */
  family: ProxyFamily;
  /** v2's protocol nibble; v1 is always STREAM (or UNSPEC for UNKNOWN). */
  transport: 'STREAM' | 'DGRAM' | 'UNSPEC';
  /** Absent for UNKNOWN / LOCAL. */
  source?: ProxyEndpoint;
  destination?: ProxyEndpoint;
  /** v2 TLVs in wire order (values are views into the input buffer); always empty for v1 and LOCAL. */
  tlvs: ProxyTlv[];
  /** Bytes the header occupies; what follows belongs to the proxied connection. */
  headerLength: number;
}

export type ProxyParse =
  | { kind: 'need-more' }
  | ProxyHeader
  | { kind: 'not-proxy' }
  | { kind: 'malformed'; detail: string };

export type ProxyResult = (
  | ProxyHeader
  | { kind: 'not-proxy' }
  | { kind: 'malformed'; detail: string }
  | { kind: 'timeout' }
  | { kind: 'closed' }
) & {
  /**
   * For 'proxy': the bytes read after the header (replay them: `socket.unshift(rest)`).
   * Otherwise: every byte read (for 'not-proxy', the connection's first bytes to replay).
   */
  rest: Buffer;
};

export interface ReadProxyHeaderOptions {
  /** Give up after this long without a decision (timer is unref'd). */
  timeoutMs: number;
  /** Largest v2 header accepted, default 4096. v1 lines are capped at 107 bytes regardless. */
  maxBytes?: number;
}

const NEED_MORE: ProxyParse = Object.freeze({ kind: 'need-more' }) as ProxyParse;
const NOT_PROXY: ProxyParse = Object.freeze({ kind: 'not-proxy' }) as ProxyParse;

function malformed(detail: string): ProxyParse {
  return { kind: 'malformed', detail };
}

// ---------- parsing ----------

/**
 * Decide what the bytes received so far are.
 *
 * - `not-proxy` as soon as the input stops matching both "PROXY " and the v2 signature (so a
 *   ClientHello or an HTTP request is recognised from its first byte or two).
 * - `malformed` once a header is recognised and breaks the spec: bad syntax, bad address or port,
 *   version/command/family nibbles outside the spec, a length shorter than the address block, a
 *   TLV (or PP2_TYPE_SSL sub-TLV) overrunning its container, a v1 line over 107 bytes, or a v2
 *   header claiming more than `maxBytes` (decided from the 16-byte fixed part, without waiting).
 * - `need-more` until the whole header is present, then the parsed header.
 *
 * @example
 * const st = parseProxyHeader(bytes);
 * if (st.kind === 'proxy') clientAddr = st.source?.address ?? socket.remoteAddress;
 */
export function parseProxyHeader(buf: Buffer, maxBytes: number = PROXY_DEFAULT_MAX_BYTES): ProxyParse {
  const len = buf.length;
  if (len === 0) return NEED_MORE;
  const b0 = buf[0];
  if (b0 === 0x50 /* P */) {
    const n = Math.min(len, PREFIX_V1.length);
    for (let i = 1; i < n; i++) if (buf[i] !== PREFIX_V1[i]) return NOT_PROXY;
    return len < PREFIX_V1.length ? NEED_MORE : parseV1(buf);
  }
  if (b0 === CR) {
    const n = Math.min(len, PROXY_V2_SIGNATURE.length);
    for (let i = 1; i < n; i++) if (buf[i] !== PROXY_V2_SIGNATURE[i]) return NOT_PROXY;
    return len < PROXY_V2_SIGNATURE.length ? NEED_MORE : parseV2(buf, budget(maxBytes));
  }
  return NOT_PROXY;
}

const V1_PROTOCOLS = ['TCP4 ', 'TCP6 ', 'UNKNOWN'].map((p) => Buffer.from(p, 'latin1'));

/** NaN or negative budgets accept nothing rather than everything. */
function budget(maxBytes: number): number {
  return maxBytes > 0 ? maxBytes : 0;
}

function parseV1(buf: Buffer): ProxyParse {
  const len = buf.length;
  // The protocol token is checked as it arrives, so "PROXY garbage" is refused before its CRLF.
  const seen = Math.min(len - PREFIX_V1.length, 7);
  if (!V1_PROTOCOLS.some((p) => buf.compare(p, 0, Math.min(seen, p.length), PREFIX_V1.length, PREFIX_V1.length + Math.min(seen, p.length)) === 0)) {
    return malformed('v1: protocol is not TCP4, TCP6 or UNKNOWN');
  }
  // Find CRLF; the CR can be no later than offset 105 so that the line fits in 107 bytes.
  // Stray CR/LF and bytes outside printable ASCII are refused as soon as they arrive.
  const limit = Math.min(len, PROXY_V1_MAX_LENGTH);
  let eol = -1;
  for (let i = PREFIX_V1.length; i < limit; i++) {
    const c = buf[i]!;
    if (c === CR) {
      if (i + 2 > PROXY_V1_MAX_LENGTH) break;
      if (i + 1 >= len) return NEED_MORE; // the LF may be on its way
      if (buf[i + 1] !== LF) return malformed('v1: CR not followed by LF');
      eol = i;
      break;
    }
    if (c === LF) return malformed('v1: LF without CR');
    if (c < 0x20 || c > 0x7e) return malformed(`v1: byte 0x${c.toString(16).padStart(2, '0')} in the header line`);
  }
  if (eol < 0) return len >= PROXY_V1_MAX_LENGTH ? malformed('v1: no CRLF within 107 bytes') : NEED_MORE;
  const headerLength = eol + 2;
  const line = buf.toString('latin1', PREFIX_V1.length, eol);
  if (line === 'UNKNOWN' || line.startsWith('UNKNOWN ')) {
    // The spec lets a sender put anything (or nothing) after UNKNOWN; the receiver ignores it.
    return { kind: 'proxy', version: 1, command: 'PROXY', family: 'UNKNOWN', transport: 'UNSPEC', tlvs: [], headerLength };
  }
  const parts = line.split(' ');
  if (parts.length !== 5) return malformed(`v1: expected 5 fields after PROXY, got ${parts.length}`);
  const [proto, src, dst, sport, dport] = parts as [string, string, string, string, string];
  if (proto !== 'TCP4' && proto !== 'TCP6') return malformed(`v1: unknown protocol ${JSON.stringify(proto)}`);
  const parseAddr = proto === 'TCP4' ? canonicalIPv4 : canonicalIPv6;
  const sa = parseAddr(src);
  if (sa === undefined) return malformed(`v1: source address ${JSON.stringify(src)} is not ${proto === 'TCP4' ? 'IPv4' : 'IPv6'}`);
  const da = parseAddr(dst);
  if (da === undefined) return malformed(`v1: destination address ${JSON.stringify(dst)} is not ${proto === 'TCP4' ? 'IPv4' : 'IPv6'}`);
  const sp = parsePort(sport);
  if (sp === undefined) return malformed(`v1: source port ${JSON.stringify(sport)} is invalid`);
  const dp = parsePort(dport);
  if (dp === undefined) return malformed(`v1: destination port ${JSON.stringify(dport)} is invalid`);
  return {
    kind: 'proxy',
    version: 1,
    command: 'PROXY',
    family: proto,
    transport: 'STREAM',
    source: { address: sa, port: sp },
    destination: { address: da, port: dp },
    tlvs: [],
    headerLength,
  };
}

/** Decimal 0..65535 without sign or leading zeros. */
function parsePort(s: string): number | undefined {
  if (!/^(?:0|[1-9][0-9]{0,4})$/.test(s)) return undefined;
  const n = Number(s);
  return n <= 65535 ? n : undefined;
}

function parseV2(buf: Buffer, maxBytes: number): ProxyParse {
  const len = buf.length;
  // Check each fixed byte as soon as it arrives, so garbage is refused without waiting.
  if (len > 12) {
    const verCmd = buf[12]!;
    if (verCmd >> 4 !== 2) return malformed(`v2: version ${verCmd >> 4}, expected 2`);
    if ((verCmd & 0xf) > 1) return malformed(`v2: command ${verCmd & 0xf} is neither LOCAL (0) nor PROXY (1)`);
  }
  if (len > 13) {
    const fam = buf[13]!;
    if (fam !== 0x00 && !((fam >> 4) >= 1 && (fam >> 4) <= 3 && ((fam & 0xf) === 1 || (fam & 0xf) === 2))) {
      return malformed(`v2: family/protocol byte 0x${fam.toString(16).padStart(2, '0')} is not defined`);
    }
  }
  if (len < PROXY_V2_HEADER_LENGTH) return NEED_MORE;
  const local = (buf[12]! & 0xf) === 0;
  const fam = buf[13]!;
  const bodyLen = buf.readUInt16BE(14);
  const headerLength = PROXY_V2_HEADER_LENGTH + bodyLen;
  if (headerLength > maxBytes) return malformed(`v2: header length ${headerLength} exceeds ${maxBytes}`);
  const af = fam >> 4;
  const addrLen = V2_ADDR_LEN[af as 0 | 1 | 2 | 3];
  // LOCAL discards the block whatever it holds; PROXY must at least carry its addresses.
  if (!local && bodyLen < addrLen) return malformed(`v2: length ${bodyLen} is shorter than the ${addrLen}-byte address block`);
  if (len < headerLength) return NEED_MORE;
  if (local) {
    return { kind: 'proxy', version: 2, command: 'LOCAL', family: 'UNKNOWN', transport: 'UNSPEC', tlvs: [], headerLength };
  }
  const transport = (fam & 0xf) === 1 ? 'STREAM' : (fam & 0xf) === 2 ? 'DGRAM' : 'UNSPEC';
  const p = PROXY_V2_HEADER_LENGTH;
  let source: ProxyEndpoint | undefined;
  let destination: ProxyEndpoint | undefined;
  let family: ProxyFamily = 'UNKNOWN';
  if (af === 1) {
    family = 'TCP4';
    source = { address: formatIPv4(buf, p), port: buf.readUInt16BE(p + 8) };
    destination = { address: formatIPv4(buf, p + 4), port: buf.readUInt16BE(p + 10) };
  } else if (af === 2) {
    family = 'TCP6';
    source = { address: formatIPv6(buf, p), port: buf.readUInt16BE(p + 32) };
    destination = { address: formatIPv6(buf, p + 16), port: buf.readUInt16BE(p + 34) };
  } else if (af === 3) {
    family = 'UNIX';
    source = { address: unixPath(buf, p), port: 0 };
    destination = { address: unixPath(buf, p + UNIX_PATH_LEN), port: 0 };
  }
  const tlvs = walkTlvs(buf, p + addrLen, headerLength, 'TLV');
  if (!Array.isArray(tlvs)) return tlvs;
  for (const t of tlvs) {
    if (t.type === PP2_TYPE_SSL) {
      if (t.value.length < 5) return malformed(`v2: PP2_TYPE_SSL value of ${t.value.length} bytes is shorter than client + verify`);
      const sub = walkTlvs(t.value, 5, t.value.length, 'SSL sub-TLV');
      if (!Array.isArray(sub)) return sub;
    }
  }
  const out: ProxyHeader = { kind: 'proxy', version: 2, command: 'PROXY', family, transport, tlvs, headerLength };
  if (source) out.source = source;
  if (destination) out.destination = destination;
  return out;
}

/** TLVs in [p, end) of `b`; any TLV that does not fit exactly is malformed. */
function walkTlvs(b: Buffer, p: number, end: number, what: string): ProxyTlv[] | ProxyParse {
  const out: ProxyTlv[] = [];
  while (p < end) {
    if (p + 3 > end) return malformed(`v2: truncated ${what} header at offset ${p}`);
    const type = b[p]!;
    const vlen = (b[p + 1]! << 8) | b[p + 2]!;
    const s = p + 3;
    if (s + vlen > end) return malformed(`v2: ${what} 0x${type.toString(16).padStart(2, '0')} of ${vlen} bytes overruns the header`);
    out.push({ type, value: b.subarray(s, s + vlen) });
    p = s + vlen;
  }
  return out;
}

function unixPath(b: Buffer, p: number): string {
  let e = p;
  while (e < p + UNIX_PATH_LEN && b[e] !== 0) e++;
  return b.toString('utf8', p, e);
}

// ---------- socket reader ----------

/**
 * Read a PROXY header from `socket` and return the verdict with the bytes that follow it.
 *
 * Never rejects. The socket is left paused with no listeners added by this function; replay `rest`
 * before reading on: `socket.unshift(r.rest); await readClientHello(socket, ...)`.
 * Buffered bytes stay within max(107, maxBytes) plus the one socket read that crossed it.
 * 'closed' when the peer ends or errors before a decision; 'timeout' after `timeoutMs`.
 * Call it only for peers `isTrusted` accepts: anyone else could forge their address.
 *
 * @example
 * const r = await readProxyHeader(sock, { timeoutMs: 3000 });
 * if (r.kind !== 'proxy') return sock.destroy();
 * sock.unshift(r.rest);
 */
export function readProxyHeader(socket: net.Socket, opts: ReadProxyHeaderOptions): Promise<ProxyResult> {
  const maxBytes = budget(opts.maxBytes ?? PROXY_DEFAULT_MAX_BYTES);
  const cap = Math.max(PROXY_V1_MAX_LENGTH, maxBytes);
  return readPrefix<ProxyResult>(socket, { timeoutMs: opts.timeoutMs, cap, minStore: 256 }, (view) => {
    const st = parseProxyHeader(view, maxBytes);
    if (st.kind === 'need-more') {
      // Defensive: the parser always decides within `cap` bytes.
      return view.length >= cap ? { kind: 'malformed', detail: 'header exceeds the byte cap', rest: view } : undefined;
    }
    if (st.kind === 'proxy') return Object.assign(st, { rest: view.subarray(st.headerLength) });
    if (st.kind === 'malformed') return { kind: 'malformed', detail: st.detail, rest: view };
    return { kind: 'not-proxy', rest: view };
  }, (why, view) => ({ kind: why, rest: view }));
}

const EMPTY = Buffer.alloc(0);

// ---------- trust ----------

/**
 * Compile a CIDR list into a membership test for peer addresses. Entries that are not valid CIDRs
 * match nothing (configuration validation reports them); an empty list trusts nobody.
 *
 * @example
 * const trusted = trustedMatcher(['10.0.0.0/8', '::1']);
 * if (trusted(sock.remoteAddress)) await readProxyHeader(sock, { timeoutMs: 3000 });
 */
export function trustedMatcher(cidrs: readonly string[]): (remoteAddress: string | undefined) => boolean {
  const tests = cidrs.map((c) => parseCidr(c)?.test).filter((t): t is (ip: string) => boolean => t !== undefined);
  return (remoteAddress) => remoteAddress !== undefined && tests.some((t) => t(remoteAddress));
}

/**
 * Whether a peer may send a PROXY header: its address lies in one of `cidrs`. IPv4-mapped IPv6
 * peers (`::ffff:10.1.2.3`) match IPv4 CIDRs. Prefer `trustedMatcher` on a hot path.
 *
 * @example
 * isTrusted('10.1.2.3', ['10.0.0.0/8']); // true
 */
export function isTrusted(remoteAddress: string | undefined, cidrs: readonly string[]): boolean {
  return trustedMatcher(cidrs)(remoteAddress);
}

// ---------- encoding ----------

/**
 * The v1 text header. Family 'UNKNOWN', or a missing endpoint, yields `PROXY UNKNOWN\r\n`.
 * Without `family`, it is taken from the addresses; IPv4-mapped IPv6 addresses (a dual-stack
 * socket's view of an IPv4 peer) are sent as TCP4 when both ends are IPv4.
 * Throws RangeError on an address or port that does not fit the family (a caller bug, not input).
 *
 * @example
 * encodeProxyV1({ address: '203.0.113.7', port: 51000 }, { address: '10.0.0.2', port: 443 });
 * // 'PROXY TCP4 203.0.113.7 10.0.0.2 51000 443\r\n'
 */
export function encodeProxyV1(src: ProxyEndpoint | undefined, dst: ProxyEndpoint | undefined, family?: 'TCP4' | 'TCP6' | 'UNKNOWN'): Buffer {
  if (family === 'UNKNOWN' || src === undefined || dst === undefined) return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
  const fam = family ?? inferFamily(src.address, dst.address);
  let s: string | undefined;
  let d: string | undefined;
  if (fam === 'TCP4') {
    s = canonicalIPv4(unmap(src.address));
    d = canonicalIPv4(unmap(dst.address));
  } else {
    s = canonicalIPv6(src.address) ?? canonicalIPv6(`::ffff:${src.address}`);
    d = canonicalIPv6(dst.address) ?? canonicalIPv6(`::ffff:${dst.address}`);
  }
  if (s === undefined || d === undefined) throw new RangeError(`PROXY v1: ${src.address} / ${dst.address} are not ${fam} addresses`);
  checkPort(src.port);
  checkPort(dst.port);
  return Buffer.from(`PROXY ${fam} ${s} ${d} ${src.port} ${dst.port}\r\n`, 'latin1');
}

export interface ProxyV2Input {
  /** Default 'PROXY'. LOCAL carries no addresses (health checks from the proxy itself). */
  command?: 'PROXY' | 'LOCAL';
  /** Both or neither; neither (or LOCAL) sends AF_UNSPEC. */
  source?: ProxyEndpoint;
  destination?: ProxyEndpoint;
  /** Written in order after the address block. */
  tlvs?: readonly ProxyTlv[];
}

/**
 * The v2 binary header (STREAM over AF_INET, AF_INET6, or AF_UNSPEC). The family follows the
 * addresses as in `encodeProxyV1`. Throws RangeError on bad addresses or ports, a TLV type outside
 * 0..255, or a header longer than 65551 bytes (caller bugs, not input).
 *
 * @example
 * encodeProxyV2({ source: { address: '2001:db8::7', port: 51000 }, destination: { address: '2001:db8::1', port: 443 },
 *                 tlvs: sslTlvs({ alpn: 'h2', authority: 'api.example.com', tlsVersion: 'TLSv1.3' }) });
 */
export function encodeProxyV2(input: ProxyV2Input): Buffer {
  const tlvs = input.tlvs ?? [];
  const local = input.command === 'LOCAL';
  let famByte = 0x00;
  let addr: Buffer = EMPTY;
  if (!local && input.source !== undefined && input.destination !== undefined) {
    const src = input.source;
    const dst = input.destination;
    checkPort(src.port);
    checkPort(dst.port);
    const fam = inferFamily(src.address, dst.address);
    if (fam === 'TCP4') {
      const s = ipv4Bytes(unmap(src.address));
      const d = ipv4Bytes(unmap(dst.address));
      if (s === undefined || d === undefined) throw new RangeError(`PROXY v2: ${src.address} / ${dst.address} are not IPv4 addresses`);
      famByte = 0x11;
      addr = Buffer.alloc(12);
      s.copy(addr, 0);
      d.copy(addr, 4);
      addr.writeUInt16BE(src.port, 8);
      addr.writeUInt16BE(dst.port, 10);
    } else {
      const s = ipv6Bytes(src.address) ?? ipv6Bytes(`::ffff:${src.address}`);
      const d = ipv6Bytes(dst.address) ?? ipv6Bytes(`::ffff:${dst.address}`);
      if (s === undefined || d === undefined) throw new RangeError(`PROXY v2: ${src.address} / ${dst.address} are not IP addresses`);
      famByte = 0x21;
      addr = Buffer.alloc(36);
      s.copy(addr, 0);
      d.copy(addr, 16);
      addr.writeUInt16BE(src.port, 32);
      addr.writeUInt16BE(dst.port, 34);
    }
  } else if (!local && (input.source !== undefined) !== (input.destination !== undefined)) {
    throw new RangeError('PROXY v2: source and destination go together');
  }
  const tlvBytes = encodeTlvs(tlvs);
  const bodyLen = addr.length + tlvBytes.length;
  if (bodyLen > 0xffff) throw new RangeError(`PROXY v2: header body of ${bodyLen} bytes exceeds 65535`);
  const head = Buffer.alloc(PROXY_V2_HEADER_LENGTH);
  PROXY_V2_SIGNATURE.copy(head, 0);
  head[12] = local ? 0x20 : 0x21;
  head[13] = famByte;
  head.writeUInt16BE(bodyLen, 14);
  return Buffer.concat([head, addr, tlvBytes]);
}

/** type(1) length(2) value, for each TLV in order. */
export function encodeTlvs(tlvs: readonly ProxyTlv[]): Buffer {
  const parts: Buffer[] = [];
  for (const t of tlvs) {
    if (!Number.isInteger(t.type) || t.type < 0 || t.type > 0xff) throw new RangeError(`PROXY v2: TLV type ${t.type} is not a byte`);
    if (t.value.length > 0xffff) throw new RangeError(`PROXY v2: TLV 0x${t.type.toString(16)} value of ${t.value.length} bytes exceeds 65535`);
    parts.push(Buffer.from([t.type, t.value.length >> 8, t.value.length & 0xff]), t.value);
  }
  return Buffer.concat(parts);
}

/** What tlsgate knows about a downstream TLS connection, for the v2 TLVs sent upstream. */
export interface SslTlvInput {
  /** Negotiated ALPN protocol. */
  alpn?: string;
  /** SNI the client sent. */
  authority?: string;
  /** e.g. 'TLSv1.3' (what `tlsSocket.getProtocol()` returns). */
  tlsVersion?: string;
  /** e.g. 'TLS_AES_128_GCM_SHA256'. */
  cipher?: string;
  /** Client certificate's subject CN (mTLS). */
  clientCn?: string;
  /** Client certificate's URI SAN, e.g. a SPIFFE ID (sent as PP2_TYPE_TLSGATE_URI_SAN). */
  clientUriSan?: string;
  /** The client presented a certificate and it verified. */
  verified?: boolean;
}

/**
 * Build the v2 TLVs describing a downstream TLS connection: ALPN, AUTHORITY, then PP2_TYPE_SSL
 * (when any TLS detail is given) with VERSION / CN / CIPHER sub-TLVs, then tlsgate's URI SAN TLV.
 * PP2_TYPE_SSL's client flags: SSL always; CERT_CONN | CERT_SESS when a client certificate was
 * presented (a CN, URI SAN or `verified` is given). Its verify field is 0 only when `verified`.
 *
 * @example
 * sslTlvs({ alpn: 'h2', authority: 'db.example.com', tlsVersion: 'TLSv1.3', clientCn: 'svc-a', verified: true });
 */
export function sslTlvs(i: SslTlvInput): ProxyTlv[] {
  const out: ProxyTlv[] = [];
  if (i.alpn !== undefined) out.push({ type: PP2_TYPE_ALPN, value: Buffer.from(i.alpn, 'latin1') });
  if (i.authority !== undefined) out.push({ type: PP2_TYPE_AUTHORITY, value: Buffer.from(i.authority, 'utf8') });
  const cert = i.clientCn !== undefined || i.clientUriSan !== undefined || i.verified !== undefined;
  if (i.tlsVersion !== undefined || i.cipher !== undefined || cert) {
    const sub: ProxyTlv[] = [];
    if (i.tlsVersion !== undefined) sub.push({ type: PP2_SUBTYPE_SSL_VERSION, value: Buffer.from(i.tlsVersion, 'latin1') });
    if (i.clientCn !== undefined) sub.push({ type: PP2_SUBTYPE_SSL_CN, value: Buffer.from(i.clientCn, 'utf8') });
    if (i.cipher !== undefined) sub.push({ type: PP2_SUBTYPE_SSL_CIPHER, value: Buffer.from(i.cipher, 'latin1') });
    const head = Buffer.alloc(5);
    head[0] = PP2_CLIENT_SSL | (cert ? PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS : 0);
    head.writeUInt32BE(i.verified === true ? 0 : 1, 1);
    out.push({ type: PP2_TYPE_SSL, value: Buffer.concat([head, encodeTlvs(sub)]) });
  }
  if (i.clientUriSan !== undefined) out.push({ type: PP2_TYPE_TLSGATE_URI_SAN, value: Buffer.from(i.clientUriSan, 'utf8') });
  return out;
}

/** What `decodeSslTlvs` read back: `sslTlvs`' input plus the raw PP2_TYPE_SSL fields. */
export interface SslTlvInfo extends SslTlvInput {
  /** PP2_TYPE_SSL `client` bits, when that TLV is present. */
  client?: number;
  /** PP2_TYPE_SSL `verify` field, when that TLV is present. */
  verify?: number;
}

/**
 * Read ALPN, AUTHORITY, PP2_TYPE_SSL and tlsgate's URI SAN back out of a TLV list (the inverse of
 * `sslTlvs`, for any sender). The first of each type wins; a PP2_TYPE_SSL too short to hold its
 * fixed part, or with overrunning sub-TLVs, is ignored (`parseProxyHeader` already refuses those).
 *
 * @example
 * if (st.kind === 'proxy') { const { clientUriSan } = decodeSslTlvs(st.tlvs); }
 */
export function decodeSslTlvs(tlvs: readonly ProxyTlv[]): SslTlvInfo {
  const out: SslTlvInfo = {};
  for (const t of tlvs) {
    if (t.type === PP2_TYPE_ALPN && out.alpn === undefined) out.alpn = t.value.toString('latin1');
    else if (t.type === PP2_TYPE_AUTHORITY && out.authority === undefined) out.authority = t.value.toString('utf8');
    else if (t.type === PP2_TYPE_TLSGATE_URI_SAN && out.clientUriSan === undefined) out.clientUriSan = t.value.toString('utf8');
    else if (t.type === PP2_TYPE_SSL && out.client === undefined && t.value.length >= 5) {
      const sub = walkTlvs(t.value, 5, t.value.length, 'SSL sub-TLV');
      if (!Array.isArray(sub)) continue;
      out.client = t.value[0]!;
      out.verify = t.value.readUInt32BE(1);
      if ((out.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)) !== 0) out.verified = out.verify === 0;
      for (const s of sub) {
        if (s.type === PP2_SUBTYPE_SSL_VERSION && out.tlsVersion === undefined) out.tlsVersion = s.value.toString('latin1');
        else if (s.type === PP2_SUBTYPE_SSL_CN && out.clientCn === undefined) out.clientCn = s.value.toString('utf8');
        else if (s.type === PP2_SUBTYPE_SSL_CIPHER && out.cipher === undefined) out.cipher = s.value.toString('latin1');
      }
    }
  }
  return out;
}

function checkPort(port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`PROXY: port ${port} is out of range`);
}

/** TCP4 when both addresses are IPv4 (plain or IPv4-mapped), else TCP6. */
function inferFamily(a: string, b: string): 'TCP4' | 'TCP6' {
  return ipv4Bytes(unmap(a)) !== undefined && ipv4Bytes(unmap(b)) !== undefined ? 'TCP4' : 'TCP6';
}

function unmap(a: string): string {
  return a.length > 7 && a.slice(0, 7).toLowerCase() === '::ffff:' && a.includes('.') ? a.slice(7) : a;
}

// ---------- addresses ----------

/** Strict dotted quad (no leading zeros: "010" is octal to some parsers) -> 4 bytes. */
function ipv4Bytes(s: string): Buffer | undefined {
  if (s.length < 7 || s.length > 15) return undefined;
  const parts = s.split('.');
  if (parts.length !== 4) return undefined;
  const out = Buffer.alloc(4);
  for (let i = 0; i < 4; i++) {
    const p = parts[i]!;
    if (!/^(?:0|[1-9][0-9]{0,2})$/.test(p)) return undefined;
    const n = Number(p);
    if (n > 255) return undefined;
    out[i] = n;
  }
  return out;
}

function canonicalIPv4(s: string): string | undefined {
  return ipv4Bytes(s) !== undefined ? s : undefined;
}

/** RFC 4291 text (with '::' and a trailing dotted quad; no zone id) -> 16 bytes. */
function ipv6Bytes(s: string): Buffer | undefined {
  if (s.length < 2 || s.length > 45 || !/^[0-9A-Fa-f:.]+$/.test(s)) return undefined;
  const dbl = s.indexOf('::');
  if (dbl >= 0 && s.indexOf('::', dbl + 1) >= 0) return undefined;
  const groups: number[] = [];
  const parse = (part: string, allowV4: boolean): number[] | undefined => {
    if (part === '') return [];
    const fields = part.split(':');
    const out: number[] = [];
    for (let i = 0; i < fields.length; i++) {
      const f = fields[i]!;
      if (allowV4 && i === fields.length - 1 && f.includes('.')) {
        const v4 = ipv4Bytes(f);
        if (v4 === undefined) return undefined;
        out.push((v4[0]! << 8) | v4[1]!, (v4[2]! << 8) | v4[3]!);
      } else {
        if (!/^[0-9A-Fa-f]{1,4}$/.test(f)) return undefined;
        out.push(parseInt(f, 16));
      }
    }
    return out;
  };
  if (dbl >= 0) {
    const head = parse(s.slice(0, dbl), false);
    const tail = parse(s.slice(dbl + 2), true);
    if (head === undefined || tail === undefined || head.length + tail.length > 7) return undefined;
    groups.push(...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail);
  } else {
    const all = parse(s, true);
    if (all === undefined || all.length !== 8) return undefined;
    groups.push(...all);
  }
  const out = Buffer.alloc(16);
  for (let i = 0; i < 8; i++) out.writeUInt16BE(groups[i]!, i * 2);
  return out;
}

function canonicalIPv6(s: string): string | undefined {
  const b = ipv6Bytes(s);
  return b === undefined ? undefined : formatIPv6(b, 0);
}

function formatIPv4(b: Buffer, p: number): string {
  return `${b[p]}.${b[p + 1]}.${b[p + 2]}.${b[p + 3]}`;
}

/** RFC 5952: lower case, longest run (>= 2) of zero groups as '::', IPv4-mapped as ::ffff:a.b.c.d. */
function formatIPv6(b: Buffer, p: number): string {
  const g: number[] = [];
  for (let i = 0; i < 8; i++) g.push(b.readUInt16BE(p + i * 2));
  if (g[0] === 0 && g[1] === 0 && g[2] === 0 && g[3] === 0 && g[4] === 0 && g[5] === 0xffff) {
    return `::ffff:${formatIPv4(b, p + 12)}`;
  }
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (g[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (xs: number[]): string => xs.map((x) => x.toString(16)).join(':');
  if (best < 0) return hex(g);
  return `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

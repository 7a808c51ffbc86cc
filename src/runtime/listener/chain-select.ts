/**
 * Filter-chain selection, in Envoy's order of criteria:
 *   destination IP (longest matching subnet; chains without subnets are the fallback)
 *   -> server name: exact SNI, then the longest `*.suffix`, then chains with no server names
 *   -> transport protocol ('tls' / 'raw_buffer'; unset accepts both)
 *   -> application protocols (ALPN offered by the client; unset accepts any).
 * At most one chain survives. No SNI and an unknown SNI are told apart so logs and metrics can
 * say which one happened. Pure; the per-listener index is built once and cached.
 */
import type { FilterChain, Listener } from '../../model/snapshot.js';

export interface ChainQuery {
  sni?: string;
  alpn?: readonly string[];
  transport: 'tls' | 'raw_buffer';
  localAddress?: string;
}

export type ChainSelection =
  | { chain: FilterChain }
  | { chain?: undefined; reason: 'no_sni' | 'no_sni_match' | 'not_tls' | 'no_filter_chain' };

interface Bucket {
  exact: Map<string, FilterChain[]>;
  wildcards: { suffix: string; chains: FilterChain[] }[]; // longest suffix first
  any: FilterChain[];
}

interface Index {
  bySubnet: { prefixLen: number; test: (ip: string) => boolean; bucket: Bucket }[];
  noSubnet: Bucket;
  anySni: boolean;
}

const cache = new WeakMap<Listener, Index>();

function newBucket(): Bucket {
  return { exact: new Map(), wildcards: [], any: [] };
}

function addToBucket(b: Bucket, fc: FilterChain): void {
  if (fc.match.serverNames.length === 0) {
    b.any.push(fc);
    return;
  }
  for (const n of fc.match.serverNames) {
    if (n.startsWith('*.')) {
      const suffix = n.slice(1);
      let w = b.wildcards.find((x) => x.suffix === suffix);
      if (!w) b.wildcards.push((w = { suffix, chains: [] }));
      w.chains.push(fc);
    } else {
      const list = b.exact.get(n) ?? [];
      list.push(fc);
      b.exact.set(n, list);
    }
  }
}

function buildIndex(l: Listener): Index {
  const idx: Index = { bySubnet: [], noSubnet: newBucket(), anySni: false };
  for (const fc of l.filterChains) {
    if (fc.match.destinationSubnets?.length) {
      for (const cidr of fc.match.destinationSubnets) {
        const m = parseCidr(cidr);
        if (!m) continue;
        let e = idx.bySubnet.find((x) => x.prefixLen === m.prefixLen && x.test === m.test);
        if (!e) idx.bySubnet.push((e = { ...m, bucket: newBucket() }));
        addToBucket(e.bucket, fc);
      }
    } else addToBucket(idx.noSubnet, fc);
    if (fc.match.serverNames.length === 0) idx.anySni = true;
  }
  idx.bySubnet.sort((a, b) => b.prefixLen - a.prefixLen);
  for (const b of [idx.noSubnet, ...idx.bySubnet.map((x) => x.bucket)]) b.wildcards.sort((a, c) => c.suffix.length - a.suffix.length);
  return idx;
}

function filterRest(chains: FilterChain[], q: ChainQuery): FilterChain | undefined {
  for (const fc of chains) {
    const tp = fc.match.transportProtocol;
    if (tp && tp !== q.transport) continue;
    const ap = fc.match.applicationProtocols;
    if (ap.length > 0 && !(q.alpn ?? []).some((p) => ap.includes(p))) continue;
    return fc;
  }
  return undefined;
}

function selectInBucket(b: Bucket, q: ChainQuery): FilterChain | undefined {
  if (q.sni !== undefined) {
    const ex = b.exact.get(q.sni);
    if (ex) {
      const fc = filterRest(ex, q);
      if (fc) return fc;
    }
    for (const w of b.wildcards) {
      if (q.sni.length > w.suffix.length && q.sni.endsWith(w.suffix)) {
        const fc = filterRest(w.chains, q);
        if (fc) return fc;
      }
    }
  }
  return filterRest(b.any, q);
}

export function selectFilterChain(l: Listener, q: ChainQuery): ChainSelection {
  let idx = cache.get(l);
  if (!idx) cache.set(l, (idx = buildIndex(l)));
  if (q.localAddress && idx.bySubnet.length) {
    for (const s of idx.bySubnet) {
      if (!s.test(q.localAddress)) continue;
      const fc = selectInBucket(s.bucket, q);
      if (fc) return { chain: fc };
    }
  }
  const fc = selectInBucket(idx.noSubnet, q);
  if (fc) return { chain: fc };
  if (q.transport === 'raw_buffer') return { reason: l.inspector === 'tls-inspector' ? 'not_tls' : 'no_filter_chain' };
  if (q.sni === undefined) return { reason: 'no_sni' };
  return { reason: 'no_sni_match' };
}

/** IPv4/IPv6 CIDR (or a bare address) -> a membership test. */
export function parseCidr(cidr: string): { prefixLen: number; test: (ip: string) => boolean } | undefined {
  const [addr, lenStr] = cidr.split('/');
  if (!addr) return undefined;
  const v4 = toV4(addr);
  if (v4 !== undefined) {
    const len = lenStr === undefined ? 32 : Number(lenStr);
    if (!(len >= 0 && len <= 32)) return undefined;
    const mask = len === 0 ? 0 : (~0 << (32 - len)) >>> 0;
    const net = (v4 & mask) >>> 0;
    return { prefixLen: len, test: (ip) => { const x = toV4(ip.startsWith('::ffff:') ? ip.slice(7) : ip); return x !== undefined && ((x & mask) >>> 0) === net; } };
  }
  const v6 = toV6(addr);
  if (v6 === undefined) return undefined;
  const len = lenStr === undefined ? 128 : Number(lenStr);
  if (!(len >= 0 && len <= 128)) return undefined;
  return {
    prefixLen: len,
    test: (ip) => {
      const x = toV6(ip);
      if (x === undefined) return false;
      const shift = BigInt(128 - len);
      return (x >> shift) === (v6 >> shift);
    },
  };
}

function toV4(s: string): number | undefined {
  const p = s.split('.');
  if (p.length !== 4) return undefined;
  let n = 0;
  for (const x of p) {
    if (!/^\d{1,3}$/.test(x)) return undefined;
    const v = Number(x);
    if (v > 255) return undefined;
    n = n * 256 + v;
  }
  return n >>> 0;
}

function toV6(s: string): bigint | undefined {
  if (!s.includes(':')) return undefined;
  const [head, tail] = s.split('::');
  const hp = head ? head.split(':') : [];
  const tp = tail !== undefined ? (tail ? tail.split(':') : []) : [];
  if (tail === undefined && hp.length !== 8) return undefined;
  const fill = 8 - hp.length - tp.length;
  if (fill < 0) return undefined;
  const parts = [...hp, ...Array(tail !== undefined ? fill : 0).fill('0'), ...tp];
  let n = 0n;
  for (const x of parts) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(x)) return undefined;
    n = (n << 16n) | BigInt(parseInt(x, 16));
  }
  return n;
}

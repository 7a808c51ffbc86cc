/**
 * Host name rules, as Istio applies them (pkg/config/host semantics):
 * - `*.example.com` covers any name ending in `.example.com` (any depth), never `example.com`;
 * - `*` covers everything;
 * - wildcards only as the whole left-most label.
 */

/** Two host patterns overlap (symmetric). */
export function hostsOverlap(a: string, b: string): boolean {
  if (a === '*' || b === '*') return true;
  const aw = a.startsWith('*.'), bw = b.startsWith('*.');
  if (!aw && !bw) return a === b;
  if (aw && !bw) return b.endsWith(a.slice(1));
  if (!aw && bw) return a.endsWith(b.slice(1));
  return a.length >= b.length ? a.endsWith(b.slice(1)) : b.endsWith(a.slice(1));
}

/** `a` is covered by `b` (one-directional). */
export function hostSubsetOf(a: string, b: string): boolean {
  if (b === '*') return true;
  if (a === '*') return false;
  const aw = a.startsWith('*.'), bw = b.startsWith('*.');
  if (!aw && !bw) return a === b;
  if (!aw && bw) return a.endsWith(b.slice(1));
  if (aw && !bw) return false;
  return a.length >= b.length && a.slice(1).endsWith(b.slice(1));
}

/** The more specific of two overlapping patterns (what a gateway serves for a VS host). */
export function moreSpecific(a: string, b: string): string {
  if (a === '*') return b;
  if (b === '*') return a;
  if (!a.startsWith('*.')) return a;
  if (!b.startsWith('*.')) return b;
  return a.length >= b.length ? a : b;
}

const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Checks a DNS name that may carry a left-most wildcard; returns an error text or undefined. */
export function checkHostPattern(h: string, opts: { allowStar?: boolean; allowIp?: boolean } = {}): string | undefined {
  if (h === '*') return opts.allowStar === false ? '"*" is not allowed here' : undefined;
  if (h.length === 0) return 'empty host';
  if (h.length > 253) return 'host longer than 253 characters';
  if (opts.allowIp !== false && isIp(h)) return undefined;
  const labels = h.split('.');
  for (let i = 0; i < labels.length; i++) {
    const l = labels[i]!;
    if (l === '*' && i === 0) continue;
    if (l.includes('*')) return `partial wildcard "${h}": a wildcard must be the whole left-most label, as in "*.example.com"`;
    if (!LABEL.test(l.toLowerCase())) return `invalid host "${h}": label "${l}" is not a DNS label`;
  }
  return undefined;
}

export function isIp(h: string): boolean {
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(h)) return h.split('.').every((x) => Number(x) <= 255);
  return h.includes(':') && /^[0-9a-fA-F:.]+$/.test(h);
}

/** Splits a Gateway server host `[ns/]name` into its namespace part ("*" when absent) and name. */
export function splitServerHost(h: string): { ns: string; host: string } {
  const i = h.indexOf('/');
  if (i < 0) return { ns: '*', host: h.toLowerCase() };
  return { ns: h.slice(0, i), host: h.slice(i + 1).toLowerCase() };
}

/**
 * Expands a short service name the way Istio does for the given namespace:
 * `reviews` -> `reviews.<ns>.svc.cluster.local`. Names with a dot and wildcards are kept.
 */
export function fqdn(host: string, namespace: string): string {
  const h = host.toLowerCase();
  if (h.includes('.') || h.includes('*') || isIp(h)) return h;
  return `${h}.${namespace}.svc.cluster.local`;
}

/** SNI lookup over patterns: exact first, then the longest `*.` suffix, then `*`. */
export function bestSniMatch(sni: string | undefined, patterns: readonly string[]): string | undefined {
  if (sni === undefined) return patterns.includes('*') ? '*' : undefined;
  let best: string | undefined;
  for (const p of patterns) {
    if (p === sni) return p;
    if (p.startsWith('*.') && sni.endsWith(p.slice(1)) && (best === undefined || best === '*' || p.length > best.length)) best = p;
    else if (p === '*' && best === undefined) best = p;
  }
  return best;
}

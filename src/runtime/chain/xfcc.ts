/**
 * x-forwarded-client-cert (XFCC) in Envoy's format: comma-separated elements (one per proxy hop),
 * each a `;`-separated list of `Key=value` pairs in the order By, Hash, Cert, Chain, Subject, URI,
 * DNS. A value containing `,` `;` or `=` is double-quoted and a `"` inside it escaped as `\"`;
 * Subject, Cert and Chain are always quoted. Every URI SAN and every DNS SAN gets its own pair;
 * a certificate without URI SAN yields an empty `URI=` (what Istio gateways emit).
 *
 * Handling (who calls what) lives in http.ts: gateways SANITIZE_SET (drop what the client sent,
 * set ours only when a client certificate was presented), sidecars APPEND_FORWARD.
 */
import { X509Certificate } from 'node:crypto';

export interface XfccOptions {
  /** URI SAN of this proxy's own certificate (By=). */
  by?: string;
  /** Add Cert= (URL-encoded PEM of the client certificate). Default true (Istio gateways). */
  includeCert?: boolean;
  /** Add Chain= (URL-encoded PEM of the client chain, leaf first). Default false. */
  includeChain?: boolean;
  /** The chain to use for Chain=; defaults to walking `issuerCertificate` from the peer. */
  chain?: readonly X509Certificate[];
}

/** Subject Alternative Names of a certificate, by type. */
export interface SubjectAltNames {
  dns: string[];
  uri: string[];
  ip: string[];
  email: string[];
}

const MAX_CHAIN = 10;

/**
 * One XFCC element for a client certificate.
 * @example buildXfcc(peer, { by: 'spiffe://cluster.local/ns/istio-system/sa/ingress' })
 * // 'By=spiffe://…;Hash=3f…;Cert="-----BEGIN%20CERTIFICATE-----%0A…";Subject="CN=client.example.com,O=client organization";URI='
 */
export function buildXfcc(peer: X509Certificate, opts: XfccOptions = {}): string {
  const parts: string[] = [];
  if (opts.by !== undefined && opts.by !== '') parts.push(`By=${quoteIfNeeded(opts.by)}`);
  parts.push(`Hash=${certSha256Hex(peer)}`);
  if (opts.includeCert !== false) parts.push(`Cert="${encodeURIComponent(peer.toString())}"`);
  if (opts.includeChain === true) {
    const chain = opts.chain ?? walkChain(peer);
    parts.push(`Chain="${encodeURIComponent(chain.map((c) => c.toString()).join(''))}"`);
  }
  parts.push(`Subject=${quote(subjectRfc2253(peer))}`);
  const sans = subjectAltNames(peer);
  if (sans.uri.length === 0) parts.push('URI=');
  for (const u of sans.uri) parts.push(`URI=${quoteIfNeeded(u)}`);
  for (const d of sans.dns) parts.push(`DNS=${quoteIfNeeded(d)}`);
  return parts.join(';');
}

/** Lower-case hex SHA-256 of the certificate DER. */
export function certSha256Hex(cert: X509Certificate): string {
  // fingerprint256 is computed natively: "AB:CD:…".
  return cert.fingerprint256.replace(/:/g, '').toLowerCase();
}

function walkChain(leaf: X509Certificate): X509Certificate[] {
  const out = [leaf];
  let cur: X509Certificate | undefined = leaf;
  while (out.length < MAX_CHAIN) {
    const next: X509Certificate | undefined = cur.issuerCertificate;
    if (next === undefined || next === cur || next.fingerprint256 === cur.fingerprint256) break;
    out.push(next);
    cur = next;
  }
  return out;
}

/**
 * Subject DN in RFC 2253 order (most specific RDN first, comma-separated), e.g.
 * `CN=client.example.com,O=client organization`. Node prints the subject one RDN per line in
 * certificate order with RFC 2253 escaping already applied, so reversing the lines is enough.
 */
export function subjectRfc2253(cert: X509Certificate): string {
  const subject = cert.subject;
  if (subject === undefined || subject === '') return '';
  return subject.split('\n').filter((l) => l !== '').reverse().join(',');
}

/**
 * Parses X509Certificate.subjectAltName ("DNS:a, URI:spiffe://…, IP Address:1.2.3.4"). Node
 * JSON-quotes a value that contains a separator or quote, which this reader honours.
 */
export function subjectAltNames(cert: X509Certificate): SubjectAltNames {
  const out: SubjectAltNames = { dns: [], uri: [], ip: [], email: [] };
  const s = cert.subjectAltName;
  if (s === undefined || s === '') return out;
  let i = 0;
  while (i < s.length) {
    while (s[i] === ' ' || s[i] === ',') i++;
    const colon = s.indexOf(':', i);
    if (colon === -1) break;
    const type = s.slice(i, colon);
    i = colon + 1;
    let value: string;
    if (s[i] === '"') {
      // JSON string: find the closing quote, skipping escapes.
      let j = i + 1;
      while (j < s.length && s[j] !== '"') j += s[j] === '\\' ? 2 : 1;
      try {
        value = JSON.parse(s.slice(i, j + 1)) as string;
      } catch {
        value = s.slice(i + 1, j);
      }
      i = j + 1;
    } else {
      const end = s.indexOf(', ', i);
      value = end === -1 ? s.slice(i) : s.slice(i, end);
      i = end === -1 ? s.length : end;
    }
    switch (type) {
      case 'DNS': out.dns.push(value); break;
      case 'URI': out.uri.push(value); break;
      case 'IP Address': out.ip.push(value); break;
      case 'email': out.email.push(value); break;
      default: break;
    }
  }
  return out;
}

function quote(v: string): string {
  if (v.indexOf('"') === -1 && v.indexOf('\\') === -1) return `"${v}"`;
  // `"` becomes `\"`; a backslash is doubled only where the parser would otherwise read it as
  // an escape (before `"` or `\`, or at the end), so RFC 2253 escapes such as `\,` stay as they are.
  return `"${v.replace(/\\(?=["\\]|$)/g, '\\\\').replace(/"/g, '\\"')}"`;
}

function quoteIfNeeded(v: string): string {
  for (let i = 0; i < v.length; i++) {
    const c = v.charCodeAt(i);
    if (c === 44 /* , */ || c === 59 /* ; */ || c === 61 /* = */ || c === 34 /* " */) return quote(v);
  }
  return v;
}

const CANONICAL: Record<string, string> = {
  by: 'By', hash: 'Hash', cert: 'Cert', chain: 'Chain', subject: 'Subject', uri: 'URI', dns: 'DNS',
};

/** Caps for a hostile header: elements and pairs beyond these are ignored. */
const MAX_ELEMENTS = 64;
const MAX_PAIRS = 256;

/**
 * Parses an XFCC header into one record per element; keys are case-insensitive and returned in
 * their canonical spelling (By, Hash, Cert, Chain, Subject, URI, DNS), values as written (quotes
 * removed, `\"` unescaped; Cert/Chain stay URL-encoded). Never throws: a malformed pair is skipped.
 * @example parseXfcc('By=a;URI=b,By=c') // [{ By: ['a'], URI: ['b'] }, { By: ['c'] }]
 */
export function parseXfcc(value: string): Array<Record<string, string[]>> {
  const out: Array<Record<string, string[]>> = [];
  let cur: Record<string, string[]> = {};
  let pairs = 0;
  let key = '';
  let buf = '';
  let inKey = true;
  let inQuotes = false;
  let sawAny = false;

  const endPair = (): void => {
    const k = key.trim();
    if (!inKey && k !== '' && pairs < MAX_PAIRS) {
      const name = CANONICAL[k.toLowerCase()] ?? k;
      (cur[name] ??= []).push(buf);
      pairs++;
      sawAny = true;
    }
    key = '';
    buf = '';
    inKey = true;
  };
  const endElement = (): void => {
    endPair();
    if (sawAny && out.length < MAX_ELEMENTS) out.push(cur);
    cur = {};
    sawAny = false;
  };

  for (let i = 0; i < value.length; i++) {
    const c = value[i]!;
    if (inQuotes) {
      if (c === '\\' && (value[i + 1] === '"' || value[i + 1] === '\\')) {
        buf += value[i + 1];
        i++;
      } else if (c === '"') inQuotes = false;
      else buf += c;
      continue;
    }
    if (c === '"' && !inKey) inQuotes = true;
    else if (c === ';') endPair();
    else if (c === ',') endElement();
    else if (c === '=' && inKey) inKey = false;
    else if (inKey) key += c;
    else buf += c;
  }
  endElement();
  return out;
}

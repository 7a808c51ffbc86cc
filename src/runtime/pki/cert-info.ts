/**
 * Facts about one certificate, extracted once with node:crypto and kept next to the PEM so
 * logs, /certs and pin checks never re-parse. Fingerprints are what we show instead of keys.
 */
import { X509Certificate, createHash } from 'node:crypto';
import { isIP } from 'node:net';

export interface SubjectAltNames {
  dns: string[];
  uri: string[];
  ip: string[];
  email: string[];
}

export interface CertInfo {
  /** Distinguished name, RDNs joined by ", " (empty string when the subject is empty). */
  subject: string;
  issuer: string;
  sans: SubjectAltNames;
  notBefore: Date;
  notAfter: Date;
  /** Upper-case hex, as node:crypto prints it. */
  serialNumber: string;
  /** Lower-case hex SHA-256 of the certificate DER, no colons (Istio's verifyCertificateHash form). */
  fingerprintSha256: string;
  /** Base64 SHA-256 of the SubjectPublicKeyInfo DER (Istio's verifyCertificateSpki form). */
  spkiSha256Base64: string;
  isCa: boolean;
  keyType: 'EC' | 'RSA' | 'RSA-PSS' | 'ED25519' | 'ED448' | 'DSA' | 'UNKNOWN';
}

/** Splits a PEM bundle into its blocks of the given label (other blocks are ignored). */
export function splitPem(text: string, label = 'CERTIFICATE'): string[] {
  const re = new RegExp(`-----BEGIN ${label}-----[\\s\\S]*?-----END ${label}-----`, 'g');
  return text.match(re)?.map((b) => b + '\n') ?? [];
}

/**
 * Parses node's `subjectAltName` text ("DNS:a, URI:b, IP Address:1.2.3.4, email:c"). Values with
 * separators in them are JSON-quoted by node, so quoted values are decoded rather than split.
 */
export function parseSubjectAltNames(text: string | undefined): SubjectAltNames {
  const out: SubjectAltNames = { dns: [], uri: [], ip: [], email: [] };
  if (!text) return out;
  let i = 0;
  while (i < text.length) {
    const colon = text.indexOf(':', i);
    if (colon < 0) break;
    const type = text.slice(i, colon).trim();
    let value: string;
    let next: number;
    if (text[colon + 1] === '"') {
      // JSON string: find the closing quote that is not escaped.
      let j = colon + 2;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      try {
        value = JSON.parse(text.slice(colon + 1, j + 1)) as string;
      } catch {
        value = text.slice(colon + 2, j);
      }
      next = text.indexOf(', ', j + 1);
    } else {
      next = text.indexOf(', ', colon + 1);
      value = text.slice(colon + 1, next < 0 ? text.length : next);
    }
    if (type === 'DNS') out.dns.push(value);
    else if (type === 'URI') out.uri.push(value);
    else if (type === 'IP Address') out.ip.push(normalizeIp(value));
    else if (type === 'email') out.email.push(value);
    if (next < 0) break;
    i = next + 2;
  }
  return out;
}

/** Canonical text for an IP so "::1" and "0:0:0:0:0:0:0:1" compare equal; other text is returned as is. */
export function normalizeIp(value: string): string {
  const v = value.trim();
  if (isIP(v) !== 6) return v;
  let s = v.toLowerCase();
  // An embedded IPv4 tail becomes two hex groups.
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(s);
  if (v4) {
    const [a, b, c, d] = v4.slice(1).map(Number) as [number, number, number, number];
    s = s.slice(0, v4.index) + ((a << 8) | b).toString(16) + ':' + ((c << 8) | d).toString(16);
  }
  const [head, tail] = s.includes('::') ? s.split('::') as [string, string] : [s, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  return groups.map((g) => parseInt(g, 16).toString(16)).join(':');
}

function keyTypeOf(x: X509Certificate): CertInfo['keyType'] {
  switch (x.publicKey.asymmetricKeyType) {
    case 'ec': return 'EC';
    case 'rsa': return 'RSA';
    case 'rsa-pss': return 'RSA-PSS';
    case 'ed25519': return 'ED25519';
    case 'ed448': return 'ED448';
    case 'dsa': return 'DSA';
    default: return 'UNKNOWN';
  }
}

/** Lower-case hex SHA-256 of the certificate DER. */
export function certSha256Hex(x: X509Certificate): string {
  return createHash('sha256').update(x.raw).digest('hex');
}

/** Base64 SHA-256 of the certificate's SubjectPublicKeyInfo DER. */
export function spkiSha256Base64(x: X509Certificate): string {
  return createHash('sha256').update(x.publicKey.export({ type: 'spki', format: 'der' })).digest('base64');
}

const dn = (s: string | undefined): string => (s ?? '').split('\n').filter(Boolean).join(', ');

export function certInfo(x: X509Certificate): CertInfo {
  return {
    subject: dn(x.subject),
    issuer: dn(x.issuer),
    sans: parseSubjectAltNames(x.subjectAltName),
    notBefore: new Date(x.validFrom),
    notAfter: new Date(x.validTo),
    serialNumber: x.serialNumber.toUpperCase(),
    fingerprintSha256: certSha256Hex(x),
    spkiSha256Base64: spkiSha256Base64(x),
    isCa: x.ca,
    keyType: keyTypeOf(x),
  };
}

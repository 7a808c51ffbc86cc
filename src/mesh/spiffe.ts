/**
 * SPIFFE identities of mesh workloads, in the one shape Istio issues:
 * `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
 *
 * Parsing is strict on purpose: an identity is compared as a whole string by peers
 * (subjectAltNames, XFCC, authorization), so anything that is not exactly this shape is rejected
 * rather than normalised.
 */

/** Kubernetes namespace and service-account names as used here: DNS-1123 labels. */
const DNS1123_LABEL = /^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
/** SPIFFE trust domains: lowercase letters, digits, dots, dashes and underscores. */
const TRUST_DOMAIN = /^[a-z0-9._-]{1,255}$/;

export interface SpiffeIdentity {
  trustDomain: string;
  namespace: string;
  serviceAccount: string;
}

export function isDns1123Label(s: string): boolean {
  return DNS1123_LABEL.test(s);
}

export function isTrustDomain(s: string): boolean {
  return TRUST_DOMAIN.test(s) && !s.startsWith('.') && !s.endsWith('.') && !s.includes('..');
}

/** Why the parts cannot form an identity, or undefined when they can. */
export function identityError(trustDomain: string, namespace: string, serviceAccount: string): string | undefined {
  if (!isTrustDomain(trustDomain)) {
    return `trust domain ${JSON.stringify(trustDomain)} is not valid (lowercase letters, digits, '.', '-', '_')`;
  }
  if (!isDns1123Label(namespace)) {
    return `namespace ${JSON.stringify(namespace)} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)`;
  }
  if (!isDns1123Label(serviceAccount)) {
    return `service account ${JSON.stringify(serviceAccount)} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)`;
  }
  return undefined;
}

/** Builds the SPIFFE ID; throws when a part is not valid. */
export function spiffeId(trustDomain: string, namespace: string, serviceAccount: string): string {
  const err = identityError(trustDomain, namespace, serviceAccount);
  if (err) throw new Error(err);
  return `spiffe://${trustDomain}/ns/${namespace}/sa/${serviceAccount}`;
}

/** Parses exactly `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else (query, port, extra path) is undefined. */
export function parseSpiffeId(uri: string): SpiffeIdentity | undefined {
  if (typeof uri !== 'string' || uri.length > 2048 || !uri.startsWith('spiffe://')) return undefined;
  const parts = uri.slice('spiffe://'.length).split('/');
  if (parts.length !== 5 || parts[1] !== 'ns' || parts[3] !== 'sa') return undefined;
  const [trustDomain, , namespace, , serviceAccount] = parts as [string, string, string, string, string];
  if (identityError(trustDomain, namespace, serviceAccount)) return undefined;
  return { trustDomain, namespace, serviceAccount };
}

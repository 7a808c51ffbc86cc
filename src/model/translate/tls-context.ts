/**
 * Gateway server `tls` -> DownstreamTlsContext, with istiod's validation rules for each mode.
 */
import type { GatewayResource } from '../../config/resource.js';
import type { ServerTlsSettings, TlsProtocolVersion } from '../../config/types/istio.js';
import type { DownstreamTlsContext, TlsVersion } from '../snapshot.js';
import type { TranslateContext } from './context.js';
import { fileSecret, resolveCredential } from './secrets.js';

/** Cipher suite names Istio accepts (OpenSSL spelling). */
export const ISTIO_CIPHER_SUITES = [
  'ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDHE-RSA-AES128-GCM-SHA256', 'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384', 'ECDHE-ECDSA-CHACHA20-POLY1305', 'ECDHE-RSA-CHACHA20-POLY1305',
  'ECDHE-ECDSA-AES128-SHA', 'ECDHE-RSA-AES128-SHA', 'ECDHE-ECDSA-AES256-SHA', 'ECDHE-RSA-AES256-SHA',
  'AES128-GCM-SHA256', 'AES256-GCM-SHA384', 'AES128-SHA', 'AES256-SHA', 'DES-CBC3-SHA',
];

const VERSION: Record<TlsProtocolVersion, TlsVersion | undefined> = {
  TLS_AUTO: undefined, TLSV1_0: 'TLSv1', TLSV1_1: 'TLSv1.1', TLSV1_2: 'TLSv1.2', TLSV1_3: 'TLSv1.3',
};
const ORDER: TlsVersion[] = ['TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'];

/**
 * Builds the context of a terminating server (SIMPLE, MUTUAL, OPTIONAL_MUTUAL).
 * Returns null when the configuration is invalid (already reported).
 */
export function downstreamTls(
  ctx: TranslateContext, gw: GatewayResource, path: string, tls: ServerTlsSettings, protocol: string,
): DownstreamTlsContext | null {
  const p = `${path}.tls`;
  if (tls.mode === 'ISTIO_MUTUAL') return istioMutualServer(ctx, gw, p, tls, protocol);
  const mode = tls.mode as 'SIMPLE' | 'MUTUAL' | 'OPTIONAL_MUTUAL';
  let ok = true;
  const err = (field: string, msg: string, hint?: string) => { ok = false; ctx.error('TG3002', gw, `${p}.${field}`, msg, hint); };
  const sources = [
    tls.credentialName ? 'credentialName' : '',
    tls.credentialNames?.length ? 'credentialNames' : '',
    tls.serverCertificate || tls.privateKey ? 'serverCertificate/privateKey' : '',
    tls.tlsCertificates?.length ? 'tlsCertificates' : '',
  ].filter(Boolean);
  if (sources.length > 1) {
    err(sources[1] === 'serverCertificate/privateKey' ? 'serverCertificate' : sources[1]!, `only one of credentialName, credentialNames, serverCertificate/privateKey, tlsCertificates may be set (found ${sources.join(' and ')})`);
    return null;
  }
  if (sources.length === 0) {
    err('mode', `${mode} TLS requires a server certificate: set credentialName, or serverCertificate and privateKey`);
    return null;
  }
  const mutual = mode !== 'SIMPLE';
  const certificates: string[] = [];
  let validationCa: string | undefined;
  let crl: string | undefined;
  const caFromElsewhere = Boolean(tls.caCertificates || tls.caCertCredentialName);

  if (tls.credentialName) {
    const refs = resolveCredential(ctx, gw, `${p}.credentialName`, tls.credentialName, { certificate: true, ca: mutual && !caFromElsewhere });
    if (!refs) return null;
    certificates.push(refs.certificate!);
    if (mutual) { validationCa = refs.ca; crl = refs.crl; }
  }
  if (tls.credentialNames?.length) {
    if (tls.credentialNames.length > 2) err('credentialNames', `at most 2 credentialNames (one RSA and one ECDSA); found ${tls.credentialNames.length}`);
    for (let i = 0; i < tls.credentialNames.length; i++) {
      const refs = resolveCredential(ctx, gw, `${p}.credentialNames[${i}]`, tls.credentialNames[i]!, { certificate: true, ca: false });
      if (!refs) return null;
      certificates.push(refs.certificate!);
      if (mutual && !validationCa) { validationCa = refs.ca; crl = refs.crl; }
    }
  }
  if (tls.serverCertificate || tls.privateKey) {
    if (!tls.serverCertificate) err('serverCertificate', `${mode} TLS requires serverCertificate with privateKey`);
    else if (!tls.privateKey) err('privateKey', `${mode} TLS requires privateKey with serverCertificate`);
    else certificates.push(fileSecret(ctx, gw, { cert: tls.serverCertificate, key: tls.privateKey }));
  }
  if (tls.tlsCertificates?.length) {
    if (tls.tlsCertificates.length > 2) err('tlsCertificates', `at most 2 tlsCertificates (one RSA and one ECDSA); found ${tls.tlsCertificates.length}`);
    tls.tlsCertificates.forEach((c, i) => {
      if (!c.serverCertificate || !c.privateKey) { err(`tlsCertificates[${i}]`, 'each tlsCertificates entry needs serverCertificate and privateKey'); return; }
      certificates.push(fileSecret(ctx, gw, { cert: c.serverCertificate, key: c.privateKey }));
      if (c.caCertificates && mutual && !validationCa && !tls.caCertificates) validationCa = fileSecret(ctx, gw, { ca: c.caCertificates });
    });
  }
  if (tls.caCertCredentialName) {
    const refs = resolveCredential(ctx, gw, `${p}.caCertCredentialName`, tls.caCertCredentialName, { certificate: false, ca: true });
    if (!refs) return null;
    if (mutual) { validationCa = refs.ca; if (refs.crl) crl = refs.crl; }
  }
  if (tls.caCertificates && mutual) validationCa = fileSecret(ctx, gw, { ca: tls.caCertificates });
  if (tls.caCrl) {
    if (tls.credentialName || tls.credentialNames?.length) err('caCrl', 'caCrl cannot be used with credentialName: put the CRL in the Secret (key ca.crl or crl)');
    else if (!mutual) err('caCrl', 'caCrl has no effect in SIMPLE mode: client certificates are not requested', 'use MUTUAL or OPTIONAL_MUTUAL, or remove caCrl');
    else crl = fileSecret(ctx, gw, { crl: tls.caCrl });
  }
  if (!mutual) {
    for (const f of ['caCertificates', 'subjectAltNames', 'verifyCertificateSpki', 'verifyCertificateHash', 'caCertCredentialName'] as const) {
      const v = tls[f];
      if (v !== undefined && (!Array.isArray(v) || v.length > 0)) err(f, `${f} checks client certificates, which SIMPLE mode does not request`, 'use mode MUTUAL or OPTIONAL_MUTUAL, or remove the field');
    }
    if (tls.insecureSkipVerify) err('insecureSkipVerify', 'insecureSkipVerify on a server lets invalid client certificates through; SIMPLE mode requests none', 'remove it, or use OPTIONAL_MUTUAL');
  } else if (!validationCa && ok) {
    err('caCertificates', `${mode} TLS requires a client CA bundle: set caCertificates, or put ca.crt/cacert in the credential Secret (or a <name>-cacert Secret)`);
  }

  const minV = tls.minProtocolVersion ? VERSION[tls.minProtocolVersion] : undefined;
  const maxV = tls.maxProtocolVersion ? VERSION[tls.maxProtocolVersion] : undefined;
  const minVersion = minV ?? 'TLSv1.2';
  const maxVersion = maxV ?? 'TLSv1.3';
  if (ORDER.indexOf(minVersion) > ORDER.indexOf(maxVersion)) {
    err('minProtocolVersion', `minProtocolVersion ${tls.minProtocolVersion ?? 'TLS_AUTO (TLSV1_2)'} is above maxProtocolVersion ${tls.maxProtocolVersion ?? 'TLS_AUTO (TLSV1_3)'}`);
  }
  if (ORDER.indexOf(minVersion) < 2) {
    ctx.warn('TG5005', gw, `${p}.minProtocolVersion`, `${tls.minProtocolVersion} enables TLS versions below 1.2, which are deprecated (RFC 8996)`, 'they also need cipherSuites that support them');
  }

  const cipherSuites: string[] = [];
  (tls.cipherSuites ?? []).forEach((c, i) => {
    if (!ISTIO_CIPHER_SUITES.includes(c)) ctx.warn('TG2003', gw, `${p}.cipherSuites[${i}]`, `unknown cipher suite "${c}": ignored`, `valid values: ${ISTIO_CIPHER_SUITES.join(', ')}`);
    else if (cipherSuites.includes(c)) ctx.warn('TG2005', gw, `${p}.cipherSuites[${i}]`, `duplicate cipher suite "${c}": ignored`);
    else cipherSuites.push(c);
  });

  const spki = tls.verifyCertificateSpki ?? [];
  spki.forEach((s, i) => {
    if (!/^[A-Za-z0-9+/]{43}=$/.test(s)) err(`verifyCertificateSpki[${i}]`, `"${s}" is not a base64 SHA-256 digest (44 characters ending in "=")`);
  });
  const hashes = (tls.verifyCertificateHash ?? []).map((h, i) => {
    const n = h.replace(/:/g, '').toLowerCase();
    if (!/^[0-9a-f]{64}$/.test(n)) err(`verifyCertificateHash[${i}]`, `"${h}" is not a hex SHA-256 digest (64 hex digits, colons allowed)`);
    return n;
  });

  if (!ok) return null;
  const out: DownstreamTlsContext = {
    mode,
    certificates,
    requestClientCertificate: mutual,
    requireClientCertificate: mode === 'MUTUAL',
    allowInvalidClientCertificate: mutual && tls.insecureSkipVerify === true,
    matchSubjectAltNames: tls.subjectAltNames ?? [],
    verifyCertificateSpki: spki,
    verifyCertificateHash: hashes,
    minVersion,
    maxVersion,
    cipherSuites,
    ecdhCurves: tls.ecdhCurves ?? [],
    alpn: protocol === 'HTTPS' ? ['h2', 'http/1.1'] : [],
  };
  if (validationCa && mutual) out.validationCa = validationCa;
  if (crl && mutual) out.crl = crl;
  return out;
}

/** Istio's mTLS ALPN values (client side offers them; inbound chains match on them). */
export const ISTIO_MTLS_ALPNS = ['istio', 'istio-peer-exchange', 'istio-http/1.0', 'istio-http/1.1', 'istio-h2'];

/**
 * ISTIO_MUTUAL on a Gateway server: the proxy's own workload certificate, clients verified
 * against the mesh roots and required. Every certificate field must be empty (istiod's rule).
 */
function istioMutualServer(ctx: TranslateContext, gw: GatewayResource, p: string, tls: ServerTlsSettings, protocol: string): DownstreamTlsContext | null {
  let ok = true;
  for (const f of ['serverCertificate', 'privateKey', 'caCertificates', 'caCrl', 'credentialName', 'credentialNames', 'caCertCredentialName', 'tlsCertificates'] as const) {
    const v = tls[f];
    if (v !== undefined && (!Array.isArray(v) || v.length > 0)) {
      ctx.error('TG3002', gw, `${p}.${f}`, `ISTIO_MUTUAL TLS cannot have ${f}: it uses the proxy's workload certificate and the mesh roots`, 'remove the field, or use MUTUAL with your own certificates');
      ok = false;
    }
  }
  if (!ok) return null;
  return {
    mode: 'ISTIO_MUTUAL',
    certificates: [ctx.addSecret({ name: 'workload', source: { kind: 'workload' } })],
    validationCa: ctx.addSecret({ name: 'mesh-roots', source: { kind: 'mesh-roots' } }),
    requestClientCertificate: true,
    requireClientCertificate: true,
    allowInvalidClientCertificate: false,
    matchSubjectAltNames: tls.subjectAltNames ?? [],
    verifyCertificateSpki: [],
    verifyCertificateHash: [],
    minVersion: 'TLSv1.2',
    maxVersion: 'TLSv1.3',
    cipherSuites: [],
    ecdhCurves: [],
    // Istio: HTTP servers offer h2/http1.1; TLS (TCP) servers add istio-peer-exchange.
    // Sidecars originating ISTIO_MUTUAL offer Istio's own ALPN values; accept those too.
    alpn: protocol === 'HTTPS' ? ['h2', 'http/1.1', 'istio-h2', 'istio-http/1.1', 'istio'] : ['istio-peer-exchange', 'h2', 'http/1.1', 'istio'],
  };
}

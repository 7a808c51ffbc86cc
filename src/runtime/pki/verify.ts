/**
 * Certificate checks made after the TLS handshake.
 *
 * Node (OpenSSL) verifies the chain against the CA and reports `authorized`; Istio adds checks
 * Node does not make: the client certificate's SANs, SPKI pins and certificate hashes. A failed
 * check closes that one connection and yields the reason for the access log.
 *
 * For the peer certificate in Node 20 use `tlsSocket.getPeerX509Certificate()`.
 */
import type { X509Certificate } from 'node:crypto';
import { checkServerIdentity, type PeerCertificate, type TLSSocket } from 'node:tls';
import type { DownstreamTlsContext } from '../../model/snapshot.js';
import { certSha256Hex, normalizeIp, parseSubjectAltNames, spkiSha256Base64, type SubjectAltNames } from './cert-info.js';

export type PeerCheck = { ok: true; flags?: string[] } | { ok: false; reason: string };

/** Flag set when OPTIONAL_MUTUAL + insecureSkipVerify let an unverified certificate through. */
export const FLAG_INVALID_CLIENT_CERT_ALLOWED = 'invalid-client-cert-allowed';

/** True when any SAN (DNS, URI, IP or email) equals one of `wanted` exactly. */
export function sansMatch(sans: SubjectAltNames, wanted: readonly string[]): boolean {
  for (const w of wanted) {
    if (sans.dns.includes(w) || sans.uri.includes(w) || sans.email.includes(w)) return true;
    if (sans.ip.includes(normalizeIp(w))) return true;
  }
  return false;
}

/** verifyCertificateHash entries are hex, maybe with colons, any case. */
export function normalizeCertHash(h: string): string {
  return h.replace(/:/g, '').trim().toLowerCase();
}

/**
 * Istio's client-certificate checks for a terminating chain, given what the handshake reported
 * (`socket.authorized`, `socket.authorizationError`).
 */
export function checkPeerCertificate(
  peer: X509Certificate | undefined,
  tls: DownstreamTlsContext,
  authorized: boolean,
  authorizationError?: string | Error,
): PeerCheck {
  if (!tls.requestClientCertificate) return { ok: true };
  if (!peer) {
    return tls.requireClientCertificate ? { ok: false, reason: 'client certificate required' } : { ok: true };
  }
  if (!authorized) {
    const why = authorizationError ? String(authorizationError instanceof Error ? authorizationError.message : authorizationError) : 'unverified';
    if (tls.requireClientCertificate || !tls.allowInvalidClientCertificate) {
      return { ok: false, reason: `client certificate not verified: ${why}` };
    }
    // insecureSkipVerify: CA verification is off, so the identity checks below are skipped too.
    return { ok: true, flags: [FLAG_INVALID_CLIENT_CERT_ALLOWED] };
  }
  if (tls.matchSubjectAltNames.length) {
    const sans = parseSubjectAltNames(peer.subjectAltName);
    if (!sansMatch(sans, tls.matchSubjectAltNames)) {
      return { ok: false, reason: 'client certificate SAN not allowed' };
    }
  }
  const spkiPins = tls.verifyCertificateSpki;
  const hashPins = tls.verifyCertificateHash;
  if (spkiPins.length || hashPins.length) {
    const spkiOk = spkiPins.length > 0 && spkiPins.some((p) => p.trim() === spkiSha256Base64(peer));
    const hashOk = !spkiOk && hashPins.length > 0 && (() => {
      const h = certSha256Hex(peer);
      return hashPins.some((p) => normalizeCertHash(p) === h);
    })();
    if (!spkiOk && !hashOk) return { ok: false, reason: 'client certificate SPKI/hash pin mismatch' };
  }
  return { ok: true };
}

/**
 * The chain-verification result of a finished server-side handshake.
 *
 * tls.Server fills `socket.authorized` itself, but a `new tls.TLSSocket(raw, {isServer: true})`
 * made by our listener does not: node only computes it in tls.Server's own connection handler.
 * This asks the handle for OpenSSL's verify result the same way that handler does. If the handle
 * cannot answer, the certificate counts as unverified (fail closed).
 */
export function handshakeVerification(socket: TLSSocket): { authorized: boolean; authorizationError?: string } {
  if (socket.authorized) return { authorized: true };
  if (socket.authorizationError) return { authorized: false, authorizationError: String(socket.authorizationError) };
  const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return { authorized: false, authorizationError: 'verification result unavailable' };
  const err = handle.verifyError();
  return err ? { authorized: false, authorizationError: err.code ?? err.message } : { authorized: true };
}

/**
 * A `checkServerIdentity` for TLS origination. With `subjectAltNames`, the server certificate must
 * carry one of them (exact, any SAN type); otherwise, with `verifyName`, the usual host-name check
 * (wildcards per RFC 6125) applies; with neither, only the chain is verified.
 */
export function upstreamCheckServerIdentity(opts: {
  subjectAltNames: readonly string[];
  verifyName?: string;
}): (servername: string, cert: PeerCertificate) => Error | undefined {
  const wanted = [...opts.subjectAltNames];
  return (_servername, cert) => {
    if (wanted.length) {
      const sans = parseSubjectAltNames(cert.subjectaltname);
      if (sansMatch(sans, wanted)) return undefined;
      const err = new Error(`upstream certificate SANs match none of: ${wanted.join(', ')}`) as Error & { code?: string };
      err.code = 'ERR_TLS_CERT_ALTNAME_INVALID';
      return err;
    }
    if (opts.verifyName) return checkServerIdentity(opts.verifyName, cert);
    return undefined;
  };
}

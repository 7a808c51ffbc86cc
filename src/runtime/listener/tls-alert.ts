/**
 * Plaintext TLS alerts, for refusing a connection before any handshake state exists (unknown SNI,
 * no matching filter chain, too-large hello). Sending one instead of a bare close lets the client
 * print a reason ("unrecognized name") rather than "unexpected eof".
 */

/** Alert descriptions we send (RFC 8446 6 / RFC 5246 7.2). */
export const AlertDescription = Object.freeze({
  closeNotify: 0,
  unexpectedMessage: 10,
  recordOverflow: 22,
  handshakeFailure: 40,
  illegalParameter: 47,
  decodeError: 50,
  protocolVersion: 70,
  internalError: 80,
  unrecognizedName: 112,
  noApplicationProtocol: 120,
} as const);

export const ALERT_HANDSHAKE_FAILURE = AlertDescription.handshakeFailure;
export const ALERT_PROTOCOL_VERSION = AlertDescription.protocolVersion;
export const ALERT_INTERNAL_ERROR = AlertDescription.internalError;
export const ALERT_UNRECOGNIZED_NAME = AlertDescription.unrecognizedName;
export const ALERT_NO_APPLICATION_PROTOCOL = AlertDescription.noApplicationProtocol;

const CONTENT_TYPE_ALERT = 21;
const LEVEL_FATAL = 2;
/** TLS 1.2 record version; TLS 1.3 also uses it as legacy_record_version. */
const DEFAULT_RECORD_VERSION = 0x0303;

/**
 * A fatal alert record (7 bytes). `version` is the record version, default 0x0303; pass the
 * hello's legacy version (at most 0x0303) for pre-1.2 clients. Out-of-range inputs are masked,
 * never thrown on.
 *
 * @example
 * socket.end(tlsAlert(ALERT_UNRECOGNIZED_NAME));
 */
export function tlsAlert(description: number, version: number = DEFAULT_RECORD_VERSION): Buffer {
  const v = (version & 0xff00) === 0x0300 ? version & 0xffff : DEFAULT_RECORD_VERSION;
  const out = Buffer.allocUnsafe(7);
  out[0] = CONTENT_TYPE_ALERT;
  out[1] = v >> 8;
  out[2] = v & 0xff;
  out[3] = 0;
  out[4] = 2;
  out[5] = LEVEL_FATAL;
  out[6] = description & 0xff;
  return out;
}

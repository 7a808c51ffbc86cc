/**
 * Config diagnostics: the first of tlsgate's three error channels (config diagnostics, resource
 * status, data-plane reasons). Every problem found while loading, validating or translating
 * configuration becomes one Diagnostic that points at the line a person must fix.
 *
 * Codes are stable and documented in docs/diagnostics.md; a code is never reused for a different
 * meaning. Ranges: TG1xxx loading and syntax, TG2xxx schema (per field), TG3xxx cross-resource
 * and semantic checks made by translate/analyze, TG4xxx "not supported yet", TG5xxx security
 * warnings, TG6xxx Kubernetes Gateway API translation and status.
 */

export type Severity = 'error' | 'warning' | 'info';

export interface SourceLocation {
  file: string;
  line: number; // 1-based
  column: number; // 1-based
}

export interface ResourceRef {
  kind: string;
  namespace: string;
  name: string;
}

export interface Diagnostic {
  code: string;
  severity: Severity;
  /** Where the offending value is (or the resource/document when no finer position is known). */
  location?: SourceLocation;
  resource?: ResourceRef;
  /** Field path, e.g. `spec.servers[1].tls.mode`. */
  path?: string;
  message: string;
  /** What would be valid, or how to fix it. */
  hint?: string;
}

/** Renders a diagnostic as one line (plus an indented hint), the format `validate` prints. */
export function formatDiagnostic(d: Diagnostic): string {
  const where = d.location ? `${d.location.file}:${d.location.line}:${d.location.column}: ` : '';
  const res = d.resource ? ` ${d.resource.kind} ${d.resource.namespace ? d.resource.namespace + '/' : ''}${d.resource.name}` : '';
  const path = d.path ? ` ${d.path}:` : (res ? ':' : '');
  let s = `${where}${d.severity} ${d.code}${res}${path} ${d.message}`;
  if (d.hint) s += `\n    hint: ${d.hint}`;
  return s;
}

export function hasErrors(ds: readonly Diagnostic[]): boolean {
  return ds.some((d) => d.severity === 'error');
}

/** Sorts diagnostics by file, line, column, then code, so output is deterministic. */
export function sortDiagnostics(ds: Diagnostic[]): Diagnostic[] {
  return ds.sort((a, b) => {
    const fa = a.location?.file ?? '', fb = b.location?.file ?? '';
    if (fa !== fb) return fa < fb ? -1 : 1;
    const la = a.location?.line ?? 0, lb = b.location?.line ?? 0;
    if (la !== lb) return la - lb;
    const ca = a.location?.column ?? 0, cb = b.location?.column ?? 0;
    if (ca !== cb) return ca - cb;
    return a.code < b.code ? -1 : a.code > b.code ? 1 : 0;
  });
}

/**
 * The registry of diagnostic codes. Each entry: code -> one-line meaning. A unit test checks that
 * every code used in src/ is listed here and in docs/diagnostics.md.
 */
export const DIAGNOSTIC_CODES: Record<string, string> = {
  // TG1xxx: loading and syntax
  TG1001: 'config path does not exist or cannot be read',
  TG1002: 'YAML or JSON syntax error',
  TG1003: 'document is not an object with apiVersion and kind',
  TG1004: 'unknown kind or apiVersion: the document is skipped',
  TG1005: 'duplicate resource (same kind, namespace and name): the later one is ignored',
  TG1006: 'no configuration files found under the given paths',
  TG1007: 'an etcd key does not hold exactly one resource matching its group/Kind/namespace/name: the key is skipped',
  // TG2xxx: schema
  TG2001: 'required field missing',
  TG2002: 'wrong type',
  TG2003: 'value not one of the allowed values',
  TG2004: 'unknown field: ignored',
  TG2005: 'invalid value (format, range or pattern)',
  TG2006: 'fields that cannot be used together',
  // TG3xxx: semantics and cross-resource checks
  TG3001: 'Gateway server TLS settings are invalid for its protocol or mode',
  TG3002: 'Gateway server certificate configuration missing or incomplete',
  TG3003: 'credentialName refers to a Secret that does not exist',
  TG3004: 'Secret does not hold the expected keys',
  TG3005: 'port conflict between Gateway servers: the later server is skipped',
  TG3006: 'duplicate host on one TLS port: the later server is skipped',
  TG3007: 'VirtualService hosts match no server of its Gateways',
  TG3008: 'VirtualService refers to a Gateway that does not exist or is not served',
  TG3009: 'route destination host cannot be resolved',
  TG3010: 'route destination subset is not defined by any DestinationRule',
  TG3011: 'invalid host name or wildcard',
  TG3012: 'duplicate port name within one Gateway',
  TG3013: 'TLS route sniHosts not covered by the VirtualService hosts',
  TG3014: 'PASSTHROUGH server has no tls route',
  TG3015: 'tls route bound to a server that does not pass TLS through',
  TG3016: 'duplicate SNI claim on one passthrough port: the later claim is skipped',
  TG3017: 'HTTP routes on a server that does not carry HTTP: they have no effect',
  TG3018: 'destination port cannot be determined for a service with several ports',
  TG3019: 'certificate or key file cannot be read or parsed',
  TG3020: 'regular expression does not compile',
  TG3021: 'DestinationRule mode MUTUAL needs a client certificate',
  TG3022: 'tcp route bound to a server that does not carry TCP',
  TG3023: 'ServiceEntry configuration is invalid',
  TG3024: 'a Gateway selected no servers to serve (selector does not match --labels)',
  TG3025: 'AUTO_PASSTHROUGH server covers no mesh-internal ServiceEntry: every connection to it is closed',
  // TG4xxx: not supported yet
  TG4001: 'not supported yet: the field or mode is accepted by Istio but tlsgate does not implement it yet',
  // TG5xxx: security warnings
  TG5001: 'insecureSkipVerify turns off upstream certificate verification',
  TG5002: 'upstream TLS without caCertificates: the system roots are used',
  TG5003: 'double TLS: the port already carries TLS and the DestinationRule originates TLS again',
  TG5004: 'key file is readable by other users',
  TG5005: 'TLS version below 1.2 enabled',
  TG5006: 'PASSTHROUGH mode does not use certificates: they are ignored',
  TG5007: 'certificate material works but deserves a look (a CA used as a leaf, an expired CA in a bundle, ...)',
  // TG6xxx: Kubernetes Gateway API (reasons are the Gateway API status reasons)
  TG6001: 'Gateway API Gateway not served by tlsgate (gatewayClassName handled by another controller)',
  TG6002: 'Gateway API listener is invalid (protocol, hostname, tls settings): it is not accepted',
  TG6003: 'Gateway API listeners conflict on one port (protocol or hostname): none of the conflicting listeners is accepted',
  TG6004: 'Gateway API certificateRef is invalid (missing Secret, wrong kind, no tls.crt/tls.key): InvalidCertificateRef',
  TG6005: 'Gateway API cross-namespace reference without a ReferenceGrant that permits it: RefNotPermitted',
  TG6006: 'Gateway API route parentRef matches no served Gateway or listener: NoMatchingParent',
  TG6007: 'Gateway API route not allowed by the listener (namespace or kind): NotAllowedByListeners',
  TG6008: 'Gateway API route hostnames do not intersect the listener hostname: NoMatchingListenerHostname',
  TG6009: 'Gateway API backendRef cannot be resolved (not found, kind, port): BackendNotFound or InvalidKind',
  TG6010: 'BackendTLSPolicy is invalid or conflicts with an older one (CA reference, hostname, target)',
  TG6011: 'Gateway API status: the resource is accepted (what a controller would write)',
  TG6012: 'Gateway API client-certificate validation (frontend caCertificateRefs) is invalid: the listener is not programmed',
  TG6013: 'Gateway API listener and Istio Gateway server conflict on one port: the Gateway API one is skipped',
  TG6014: 'Gateway API mesh route (parentRef Service) is for sidecars: not served at a gateway',
  TG6015: 'Gateway API setting that weakens TLS (AllowInsecureFallback client-certificate validation)',
  TG6016: 'Gateway API value is not supported for this listener or route (UnsupportedValue): the rule answers 500 or is skipped',
  TG6017: 'a BackendTLSPolicy and a DestinationRule both set TLS for one Service port: the BackendTLSPolicy is used',
  TG6018: 'Gateway API TCPRoute/TLSRoute has more rules than its apiVersion allows: the route is not accepted',
};

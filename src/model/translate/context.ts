/**
 * Shared state of one translate run: options, the diagnostics being collected, and helpers to
 * report a problem at the exact field of a resource. Pure: no I/O.
 */
import type { Diagnostic, Severity } from '../../config/diagnostics.js';
import { refOf, type ResourceSet } from '../../config/resource.js';
import type { Origin, ResourceStatus, SecretSpec } from '../snapshot.js';

export interface TranslateOptions {
  /** The proxy's own namespace: credentialName Secrets are looked up here first. */
  proxyNamespace: string;
  /** Workload labels of this proxy; undefined = serve every Gateway. */
  labels?: Record<string, string>;
  /** Address listeners bind unless a server sets `bind`. */
  bindAddress: string;
  clientHelloTimeoutMs: number;
  maxClientHelloBytes: number;
  /** Idle timeout for TCP proxying (Envoy default 1 h). */
  tcpIdleTimeoutMs: number;
  /** Upstream connect timeout when no DestinationRule sets one (Envoy default 10 s). */
  connectTimeoutMs: number;
  /** Sidecar role: serve the mesh (outbound proxy, inbound mTLS) instead of Gateways. */
  sidecar?: { outboundAddress: string; outboundPort: number; inbound?: { address: string; port: number; appPort: number } };
  /** The proxy's own SPIFFE identity, when it has one (XFCC By=). */
  identity?: string;
}

export const DEFAULT_TRANSLATE_OPTIONS: TranslateOptions = {
  proxyNamespace: 'istio-system',
  bindAddress: '0.0.0.0',
  clientHelloTimeoutMs: 15_000,
  maxClientHelloBytes: 64 * 1024,
  tcpIdleTimeoutMs: 3_600_000,
  connectTimeoutMs: 10_000,
};

/** Anything with kind/metadata/locate: a Resource. */
export interface Locatable {
  kind: string;
  metadata: { name: string; namespace: string };
  locate(path: string): { file: string; line: number; column: number };
}

export class TranslateContext {
  readonly diagnostics: Diagnostic[] = [];
  readonly secrets: Record<string, SecretSpec> = {};
  readonly #statuses = new Map<string, ResourceStatus>();

  constructor(readonly resources: ResourceSet, readonly options: TranslateOptions) {}

  report(severity: Severity, code: string, r: Locatable, path: string, message: string, hint?: string): void {
    const d: Diagnostic = { code, severity, location: r.locate(path), resource: refOf(r), path, message };
    if (hint !== undefined) d.hint = hint;
    this.diagnostics.push(d);
    if (severity !== 'info') this.#mark(r, severity === 'error' ? 'disabled' : 'warning', `${path}: ${message}`);
  }

  error(code: string, r: Locatable, path: string, message: string, hint?: string): void {
    this.report('error', code, r, path, message, hint);
  }

  warn(code: string, r: Locatable, path: string, message: string, hint?: string): void {
    this.report('warning', code, r, path, message, hint);
  }

  info(code: string, r: Locatable, path: string, message: string, hint?: string): void {
    this.report('info', code, r, path, message, hint);
  }

  /** Marks a resource as seen (status ok unless a problem was reported). */
  touch(r: Locatable): void {
    const key = statusKey(r);
    if (!this.#statuses.has(key)) this.#statuses.set(key, { resource: refOf(r), state: 'ok', messages: [] });
  }

  #mark(r: Locatable, state: 'warning' | 'disabled', message: string): void {
    this.touch(r);
    const s = this.#statuses.get(statusKey(r))!;
    if (state === 'disabled' || s.state === 'ok') s.state = state;
    s.messages.push(message);
  }

  statuses(): ResourceStatus[] {
    return [...this.#statuses.values()].sort((a, b) => statusKeyOf(a) < statusKeyOf(b) ? -1 : 1);
  }

  origin(r: Locatable, path: string): Origin {
    return { resource: refOf(r), path };
  }

  addSecret(spec: SecretSpec): string {
    if (!this.secrets[spec.name]) this.secrets[spec.name] = spec;
    return spec.name;
  }
}

function statusKey(r: Locatable): string {
  return `${r.kind}/${r.metadata.namespace}/${r.metadata.name}`;
}

function statusKeyOf(s: ResourceStatus): string {
  return `${s.resource.kind}/${s.resource.namespace}/${s.resource.name}`;
}

const DURATION_PART = /(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)/gy;
const UNIT_MS: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1, us: 1e-3, 'µs': 1e-3, ns: 1e-6 };

/**
 * Parses a duration as Istio's CRDs take it (Go's form, which the schema's pattern checks): one
 * or more number-unit parts, "1.5s", "100ms", "1h", "1m30s", "10us", into milliseconds. NaN for
 * anything else.
 */
export function parseDuration(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const s = v.trim();
  if (s === '') return NaN;
  let ms = 0;
  DURATION_PART.lastIndex = 0;
  let at = 0;
  for (let m = DURATION_PART.exec(s); m !== null; m = DURATION_PART.exec(s)) {
    ms += Number(m[1]) * UNIT_MS[m[2]!]!;
    at = DURATION_PART.lastIndex;
  }
  return at === s.length ? ms : NaN;
}

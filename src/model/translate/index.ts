/**
 * translate: (resources, options) -> { snapshot, diagnostics }. Pure: all of Istio's semantics
 * live here and below, so they can be tested with plain objects and explained without sockets.
 */
import type { ResourceSet } from '../../config/resource.js';
import type { Diagnostic } from '../../config/diagnostics.js';
import type { Snapshot } from '../snapshot.js';
import { ClusterBuilder } from './clusters.js';
import { DEFAULT_TRANSLATE_OPTIONS, TranslateContext, type TranslateOptions } from './context.js';
import { buildListeners } from './gateways.js';
import { buildSidecarInbound, buildSidecarOutbound } from './sidecar.js';
import { mergeListeners, mergeStatuses, translateGatewayApi } from './gateway-api/index.js';

export { DEFAULT_TRANSLATE_OPTIONS, type TranslateOptions } from './context.js';

export interface TranslateResult {
  snapshot: Snapshot;
  diagnostics: Diagnostic[];
}

export function translate(resources: ResourceSet, options: Partial<TranslateOptions> = {}): TranslateResult {
  const opts: TranslateOptions = { ...DEFAULT_TRANSLATE_OPTIONS, ...options };
  const ctx = new TranslateContext(resources, opts);
  const clusters = new ClusterBuilder(ctx);
  let listeners = opts.sidecar ? [buildSidecarOutbound(ctx, clusters, opts.sidecar)] : buildListeners(ctx, clusters);
  // Kubernetes Gateway API resources serve gateways only (mesh routes are reported and skipped).
  const gatewayApi = opts.sidecar ? undefined : translateGatewayApi(ctx, clusters);
  if (gatewayApi) listeners = mergeListeners(ctx, listeners, gatewayApi);
  if (opts.sidecar?.inbound) {
    const inbound = buildSidecarInbound(ctx, opts.sidecar.inbound);
    listeners.push(inbound.listener);
    clusters.clusters[inbound.cluster.name] = inbound.cluster;
  }
  for (const pa of resources.peerAuthentications) {
    if (!opts.sidecar) ctx.info('TG4001', pa, 'spec', 'PeerAuthentication applies to sidecars; a gateway does not use it (as in Istio)');
  }
  clusters.checkDestinationRules();
  for (const de of resources.destinationRules) ctx.touch(de);
  for (const se of resources.serviceEntries) ctx.touch(se);
  const snapshot: Snapshot = {
    generation: 0,
    listeners,
    clusters: clusters.clusters,
    secrets: ctx.secrets,
    statuses: gatewayApi ? mergeStatuses(ctx.statuses(), gatewayApi.statuses) : ctx.statuses(),
    diagnostics: ctx.diagnostics,
  };
  return { snapshot: deepFreeze(snapshot), diagnostics: ctx.diagnostics };
}

/** Freezes a value recursively: a snapshot is immutable once built. */
export function deepFreeze<T>(v: T): T {
  if (v && typeof v === 'object' && !Object.isFrozen(v)) {
    Object.freeze(v);
    for (const k of Object.keys(v as object)) deepFreeze((v as Record<string, unknown>)[k]);
  }
  return v;
}

/**
 * Typed resources as parsed from YAML/JSON, each remembering where it came from.
 *
 * A Resource is an envelope (apiVersion, kind, metadata) with a kind-specific `spec` (or `data`
 * for Secrets and ConfigMaps). `locate(path)` maps a field path such as
 * `spec.servers[1].tls.mode` to the line and column of that value in its file, so translate can
 * report a semantic error at the exact place without knowing about YAML.
 */
import type { SourceLocation, ResourceRef } from './diagnostics.js';
import type {
  GatewaySpec, VirtualServiceSpec, DestinationRuleSpec, ServiceEntrySpec, PeerAuthenticationSpec,
  WorkloadEntrySpec,
} from './types/istio.js';

export interface ObjectMeta {
  name: string;
  namespace: string; // defaulted to "default" by the loader when absent
  labels: Record<string, string>;
  annotations: Record<string, string>;
  creationTimestamp?: string;
}

interface ResourceBase<K extends string, S> {
  apiVersion: string;
  kind: K;
  metadata: ObjectMeta;
  spec: S;
  /** Location of the document start. */
  source: SourceLocation;
  /** Location of a field path inside this resource; falls back to the nearest ancestor, then `source`. */
  locate(path: string): SourceLocation;
}

export type GatewayResource = ResourceBase<'Gateway', GatewaySpec>;
export type VirtualServiceResource = ResourceBase<'VirtualService', VirtualServiceSpec>;
export type DestinationRuleResource = ResourceBase<'DestinationRule', DestinationRuleSpec>;
export type ServiceEntryResource = ResourceBase<'ServiceEntry', ServiceEntrySpec>;
export type WorkloadEntryResource = ResourceBase<'WorkloadEntry', WorkloadEntrySpec>;
export type PeerAuthenticationResource = ResourceBase<'PeerAuthentication', PeerAuthenticationSpec>;

/** v1 Secret. `data` values are base64 in YAML; the loader decodes them and merges `stringData`. */
export interface SecretResource extends ResourceBase<'Secret', Record<string, never>> {
  type: string;
  /** Decoded key -> bytes. Never logged or dumped; show fingerprints only. */
  data: Record<string, Buffer>;
}

/** v1 ConfigMap (Gateway API CA references). */
export interface ConfigMapResource extends ResourceBase<'ConfigMap', Record<string, never>> {
  data: Record<string, string>;
}

/** Any gateway.networking.k8s.io resource; typed by the Gateway API translator. */
export interface GatewayApiResource extends ResourceBase<string, Record<string, unknown>> {
  group: 'gateway.networking.k8s.io';
}

/**
 * A core or discovery Kubernetes object read as a Gateway API backend: Service (v1), Endpoints
 * (v1) or EndpointSlice (discovery.k8s.io/v1). `body` is the whole document, because Endpoints and
 * EndpointSlice keep their content outside `spec` (subsets, endpoints, ports).
 */
export interface KubeObjectResource extends ResourceBase<string, Record<string, unknown>> {
  body: Record<string, unknown>;
}

export type IstioResource =
  | GatewayResource | VirtualServiceResource | DestinationRuleResource | ServiceEntryResource
  | WorkloadEntryResource | PeerAuthenticationResource;

export type Resource = IstioResource | SecretResource | ConfigMapResource | GatewayApiResource;

export function refOf(r: { kind: string; metadata: { name: string; namespace: string } }): ResourceRef {
  return { kind: r.kind, namespace: r.metadata.namespace, name: r.metadata.name };
}

/** A whole, consistent set of resources from one or more sources, as a source emits it. */
export interface ResourceSet {
  gateways: GatewayResource[];
  virtualServices: VirtualServiceResource[];
  destinationRules: DestinationRuleResource[];
  serviceEntries: ServiceEntryResource[];
  workloadEntries: WorkloadEntryResource[];
  peerAuthentications: PeerAuthenticationResource[];
  secrets: SecretResource[];
  configMaps: ConfigMapResource[];
  gatewayApi: GatewayApiResource[];
  /** Services, Endpoints and EndpointSlices (Gateway API backends); absent = none. */
  kube?: KubeObjectResource[];
}

export function emptyResourceSet(): ResourceSet {
  return {
    gateways: [], virtualServices: [], destinationRules: [], serviceEntries: [], workloadEntries: [],
    peerAuthentications: [], secrets: [], configMaps: [], gatewayApi: [], kube: [],
  };
}

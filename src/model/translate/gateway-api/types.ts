/**
 * The parts of the Gateway API specs (gateway.networking.k8s.io) that tlsgate reads. The loader
 * keeps these documents with their spec as written (schema-checked by config/schema/gateway-api.ts);
 * these types name the fields, all optional, because a translator must survive any document.
 */
import type { GatewayApiResource } from '../../../config/resource.js';

export interface ObjectRef { group?: string; kind?: string; name: string; namespace?: string }
export interface ParentRef extends ObjectRef { sectionName?: string; port?: number }
export interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: { key: string; operator: 'In' | 'NotIn' | 'Exists' | 'DoesNotExist'; values?: string[] }[];
}
export interface FrontendValidation { caCertificateRefs?: ObjectRef[]; mode?: 'AllowValidOnly' | 'AllowInsecureFallback' }

export interface ListenerSpec {
  name: string;
  hostname?: string;
  port: number;
  protocol: string;
  tls?: { mode?: 'Terminate' | 'Passthrough'; certificateRefs?: ObjectRef[]; options?: Record<string, string>; frontendValidation?: FrontendValidation };
  allowedRoutes?: {
    namespaces?: { from?: 'All' | 'Same' | 'Selector' | 'None'; selector?: LabelSelector };
    kinds?: { group?: string; kind: string }[];
  };
}

export interface GatewaySpec {
  gatewayClassName: string;
  listeners?: ListenerSpec[];
  tls?: {
    frontend?: {
      default?: { validation?: FrontendValidation };
      perPort?: { port: number; tls?: { validation?: FrontendValidation } }[];
    };
    backend?: { clientCertificateRef?: ObjectRef };
  };
}

export interface HeaderOps { set?: { name: string; value: string }[]; add?: { name: string; value: string }[]; remove?: string[] }
export interface PathModifier { type: 'ReplaceFullPath' | 'ReplacePrefixMatch'; replaceFullPath?: string; replacePrefixMatch?: string }
export interface HttpFilter {
  type: string;
  requestHeaderModifier?: HeaderOps;
  responseHeaderModifier?: HeaderOps;
  requestRedirect?: { scheme?: 'http' | 'https'; hostname?: string; path?: PathModifier; port?: number; statusCode?: number };
  urlRewrite?: { hostname?: string; path?: PathModifier };
}
export interface BackendRef extends ObjectRef { port?: number; weight?: number; filters?: HttpFilter[] }
export interface ValueMatch { type?: 'Exact' | 'RegularExpression'; name: string; value: string }
export interface HttpMatch {
  path?: { type?: 'Exact' | 'PathPrefix' | 'RegularExpression'; value?: string };
  headers?: ValueMatch[];
  queryParams?: ValueMatch[];
  method?: string;
}
export interface HttpRule {
  name?: string;
  matches?: HttpMatch[];
  filters?: HttpFilter[];
  backendRefs?: BackendRef[];
  timeouts?: { request?: string; backendRequest?: string };
}
export interface GrpcMethodMatch { type?: 'Exact' | 'RegularExpression'; service?: string; method?: string }
export interface GrpcMatch { method?: GrpcMethodMatch; headers?: ValueMatch[] }
export interface GrpcRule {
  name?: string;
  matches?: GrpcMatch[];
  filters?: HttpFilter[];
  backendRefs?: BackendRef[];
}
export interface GrpcRouteSpec {
  parentRefs?: ParentRef[];
  hostnames?: string[];
  rules?: GrpcRule[];
}

export interface RouteSpec {
  parentRefs?: ParentRef[];
  hostnames?: string[];
  rules?: (HttpRule & { backendRefs?: BackendRef[] })[];
}

export interface BackendTlsPolicySpec {
  targetRefs?: { group?: string; kind: string; name: string; sectionName?: string }[];
  validation?: {
    caCertificateRefs?: ObjectRef[];
    wellKnownCACertificates?: string;
    hostname?: string;
    subjectAltNames?: { type: 'Hostname' | 'URI'; hostname?: string; uri?: string }[];
  };
}

export interface ReferenceGrantSpec {
  from?: { group?: string; kind: string; namespace: string }[];
  to?: { group?: string; kind: string; name?: string }[];
}

export const GROUP = 'gateway.networking.k8s.io';

export function specOf<T>(r: GatewayApiResource): T {
  return r.spec as unknown as T;
}

/** The API group of a reference; Kubernetes' core group is "" (and "core" is read the same). */
export function groupOf(ref: { group?: string }, dflt: string): string {
  const g = ref.group ?? dflt;
  return g === 'core' ? '' : g;
}

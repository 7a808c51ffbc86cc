/**
 * Schemas for the Kubernetes Gateway API kinds tlsgate translates (gateway.networking.k8s.io),
 * and the permissive envelope of the core objects read as their backends (Service, Endpoints,
 * EndpointSlice). Objects are closed where tlsgate reads them, so a misspelt field is reported
 * (TG2004) instead of silently ignored; enums name what the Gateway API CRDs accept. Rules that
 * need more than one field (tls forbidden for HTTP, hostnames intersecting...) are checked by the
 * translator, which reports them with the Gateway API status reason.
 */
import { anyObject, arrayOf, envelope, enumOf, obj, portNumber, str, strArray, strMap, type Schema } from './common.js';

const name: Schema = { type: 'string', minLength: 1 };
const weight: Schema = { type: 'integer', minimum: 0, maximum: 1_000_000 };
const labelSelector: Schema = obj({
  matchLabels: strMap,
  matchExpressions: arrayOf(obj({ key: str, operator: enumOf(['In', 'NotIn', 'Exists', 'DoesNotExist']), values: strArray }, ['key', 'operator'])),
});

/** group/kind/name/namespace references (certificateRefs, caCertificateRefs, backendRefs). */
const objectRef: Schema = obj({ group: str, kind: str, name, namespace: str }, ['name']);
const parentRef: Schema = obj({ group: str, kind: str, namespace: str, name, sectionName: str, port: portNumber }, ['name']);
const headerOps: Schema = obj({
  set: arrayOf(obj({ name, value: str }, ['name', 'value'])),
  add: arrayOf(obj({ name, value: str }, ['name', 'value'])),
  remove: strArray,
});
const pathModifier: Schema = obj({ type: enumOf(['ReplaceFullPath', 'ReplacePrefixMatch']), replaceFullPath: str, replacePrefixMatch: str }, ['type']);
const httpFilter: Schema = obj({
  type: str,
  requestHeaderModifier: headerOps,
  responseHeaderModifier: headerOps,
  requestRedirect: obj({ scheme: enumOf(['http', 'https']), hostname: str, path: pathModifier, port: portNumber, statusCode: { type: 'integer', enum: [301, 302, 303, 307, 308] } }),
  urlRewrite: obj({ hostname: str, path: pathModifier }),
  requestMirror: anyObject,
  cors: anyObject,
  extensionRef: anyObject,
  externalAuth: anyObject,
}, ['type']);
const backendRef: Schema = obj({ group: str, kind: str, name, namespace: str, port: portNumber, weight, filters: arrayOf(httpFilter) }, ['name']);
const tcpBackendRef: Schema = obj({ group: str, kind: str, name, namespace: str, port: portNumber, weight }, ['name']);
const valueMatch: Schema = obj({ type: enumOf(['Exact', 'RegularExpression']), name, value: str }, ['name', 'value']);
const httpMatch: Schema = obj({
  path: obj({ type: enumOf(['Exact', 'PathPrefix', 'RegularExpression']), value: str }),
  headers: arrayOf(valueMatch),
  queryParams: arrayOf(valueMatch),
  method: enumOf(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE', 'PATCH']),
});
const duration: Schema = { type: 'string', pattern: '^([0-9]{1,5}(h|m|s|ms)){1,4}$' };

const frontendValidation: Schema = obj({ caCertificateRefs: arrayOf(objectRef), mode: enumOf(['AllowValidOnly', 'AllowInsecureFallback']) });

const listener: Schema = obj({
  name,
  hostname: str,
  port: portNumber,
  protocol: { type: 'string', minLength: 1 },
  tls: obj({
    mode: enumOf(['Terminate', 'Passthrough']),
    certificateRefs: arrayOf(objectRef),
    options: strMap,
    frontendValidation,
  }),
  allowedRoutes: obj({
    namespaces: obj({ from: enumOf(['All', 'Same', 'Selector', 'None']), selector: labelSelector }),
    kinds: arrayOf(obj({ group: str, kind: name }, ['kind'])),
  }),
}, ['name', 'port', 'protocol']);

const commonRoute = { parentRefs: arrayOf(parentRef), useDefaultGateways: str };

const SCHEMAS: Record<string, Schema> = {
  GatewayClass: envelope({ spec: obj({ controllerName: name, parametersRef: anyObject, description: str }, ['controllerName']) }, ['spec']),
  Gateway: envelope({
    spec: obj({
      gatewayClassName: name,
      listeners: arrayOf(listener, { minItems: 1, maxItems: 64 }),
      addresses: arrayOf(anyObject),
      infrastructure: anyObject,
      allowedListeners: anyObject,
      defaultScope: str,
      tls: obj({
        backend: obj({ clientCertificateRef: objectRef }),
        frontend: obj({
          default: obj({ validation: frontendValidation }),
          perPort: arrayOf(obj({ port: portNumber, tls: obj({ validation: frontendValidation }) }, ['port', 'tls'])),
        }),
      }),
    }, ['gatewayClassName', 'listeners']),
  }, ['spec']),
  HTTPRoute: envelope({
    spec: obj({
      ...commonRoute,
      hostnames: strArray,
      rules: arrayOf(obj({
        name: str,
        matches: arrayOf(httpMatch),
        filters: arrayOf(httpFilter),
        backendRefs: arrayOf(backendRef),
        timeouts: obj({ request: duration, backendRequest: duration }),
        retry: anyObject,
        sessionPersistence: anyObject,
      })),
    }),
  }),
  GRPCRoute: envelope({
    spec: obj({
      ...commonRoute,
      hostnames: strArray,
      rules: arrayOf(obj({
        name: str,
        matches: arrayOf(obj({
          method: obj({ type: enumOf(['Exact', 'RegularExpression']), service: str, method: str }),
          headers: arrayOf(valueMatch),
        })),
        filters: arrayOf(httpFilter),
        backendRefs: arrayOf(backendRef),
        sessionPersistence: anyObject,
      })),
    }),
  }),
  TLSRoute: envelope({
    spec: obj({ ...commonRoute, hostnames: strArray, rules: arrayOf(obj({ name: str, backendRefs: arrayOf(tcpBackendRef) }), { minItems: 1 }) }, ['rules']),
  }),
  TCPRoute: envelope({
    spec: obj({ ...commonRoute, rules: arrayOf(obj({ name: str, backendRefs: arrayOf(tcpBackendRef) }), { minItems: 1 }) }, ['rules']),
  }),
  BackendTLSPolicy: envelope({
    spec: obj({
      targetRefs: arrayOf(obj({ group: str, kind: name, name, sectionName: str }, ['kind', 'name']), { minItems: 1 }),
      validation: obj({
        caCertificateRefs: arrayOf(objectRef),
        wellKnownCACertificates: str,
        hostname: name,
        subjectAltNames: arrayOf(obj({ type: enumOf(['Hostname', 'URI']), hostname: str, uri: str }, ['type'])),
      }, ['hostname']),
      options: strMap,
    }, ['targetRefs', 'validation']),
  }, ['spec']),
  ReferenceGrant: envelope({
    spec: obj({
      from: arrayOf(obj({ group: str, kind: name, namespace: name }, ['group', 'kind', 'namespace']), { minItems: 1 }),
      to: arrayOf(obj({ group: str, kind: name, name: str }, ['group', 'kind']), { minItems: 1 }),
    }, ['from', 'to']),
  }, ['spec']),
};

/** The schema of one Gateway API kind, or undefined when tlsgate reads only its envelope. */
export function gatewayApiSchemaFor(kind: string): Schema | undefined {
  return SCHEMAS[kind];
}

/** Service, Endpoints, EndpointSlice: their bodies are read by the translator as Kubernetes has them. */
export const kubeObjectSchema: Schema = {
  type: 'object',
  properties: { apiVersion: str, kind: str, metadata: (envelope({}).properties as Record<string, Schema>).metadata, spec: { type: 'object' } },
  required: ['apiVersion', 'kind', 'metadata'],
};

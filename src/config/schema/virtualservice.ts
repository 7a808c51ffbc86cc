/** Schema for networking.istio.io VirtualService: http, tls and tcp routes. */
import {
  anyObject, arrayOf, bool, destination, duration, envelope, int, mapOf, obj, percent, portNumber,
  str, strArray, strMap, stringMatch, uint, type Schema,
} from './common.js';

const headerOperations: Schema = obj({ set: strMap, add: strMap, remove: strArray });
const headers: Schema = obj({ request: headerOperations, response: headerOperations });

const httpMatchRequest: Schema = obj({
  name: str,
  uri: stringMatch,
  scheme: stringMatch,
  method: stringMatch,
  authority: stringMatch,
  headers: mapOf(stringMatch),
  withoutHeaders: mapOf(stringMatch),
  queryParams: mapOf(stringMatch),
  ignoreUriCase: bool,
  port: portNumber,
  gateways: strArray,
  sourceLabels: strMap,
  sourceNamespace: str,
  statPrefix: str,
});

const httpRouteDestination: Schema = obj({ destination, weight: uint, headers }, ['destination']);

const httpRedirect: Schema = obj({
  uri: str,
  authority: str,
  port: portNumber,
  derivePort: { type: 'string', enum: ['FROM_PROTOCOL_DEFAULT', 'FROM_REQUEST_PORT'] },
  scheme: str,
  redirectCode: { type: 'integer', minimum: 300, maximum: 399 },
}, [], { tgExclusive: [['port', 'derivePort']] });

const httpRewrite: Schema = obj({
  uri: str,
  authority: str,
  uriRegexRewrite: obj({ match: str, rewrite: str }, ['match', 'rewrite']),
}, [], { tgExclusive: [['uri', 'uriRegexRewrite']] });

const httpRetry: Schema = obj({
  attempts: uint,
  perTryTimeout: duration,
  retryOn: str,
  retryRemoteLocalities: bool,
  retryIgnorePreviousHosts: bool,
  backoff: duration,
});

const httpDirectResponse: Schema = obj({
  status: { type: 'integer', minimum: 200, maximum: 599 },
  body: obj({ string: str, bytes: str }, [], { tgExclusive: [['string', 'bytes']] }),
}, ['status']);

const httpRoute: Schema = obj({
  name: str,
  match: arrayOf(httpMatchRequest),
  route: arrayOf(httpRouteDestination),
  redirect: httpRedirect,
  directResponse: httpDirectResponse,
  delegate: obj({ name: str, namespace: str }),
  rewrite: httpRewrite,
  timeout: duration,
  retries: httpRetry,
  fault: anyObject,
  mirror: destination,
  mirrors: arrayOf(anyObject),
  mirrorPercentage: obj({ value: percent }),
  mirrorPercent: { type: 'integer', minimum: 0, maximum: 100 },
  corsPolicy: anyObject,
  headers,
}, [], {
  tgExclusive: [
    ['route', 'redirect', 'directResponse', 'delegate'],
    ['redirect', 'rewrite'],
    ['directResponse', 'rewrite'],
    ['mirror', 'mirrors'],
    ['mirrorPercent', 'mirrorPercentage'],
  ],
});

const routeDestination: Schema = obj({ destination, weight: uint }, ['destination']);

const tlsMatchAttributes: Schema = obj({
  sniHosts: arrayOf({ type: 'string', minLength: 1 }, { minItems: 1 }),
  destinationSubnets: strArray,
  port: portNumber,
  sourceLabels: strMap,
  gateways: strArray,
  sourceNamespace: str,
}, ['sniHosts']);

const l4MatchAttributes: Schema = obj({
  destinationSubnets: strArray,
  port: portNumber,
  sourceLabels: strMap,
  gateways: strArray,
  sourceNamespace: str,
});

const tlsRoute: Schema = obj({
  match: arrayOf(tlsMatchAttributes, { minItems: 1 }),
  route: arrayOf(routeDestination),
}, ['match']);

const tcpRoute: Schema = obj({
  match: arrayOf(l4MatchAttributes),
  route: arrayOf(routeDestination),
});

export const virtualServiceSpec: Schema = obj({
  hosts: strArray,
  gateways: strArray,
  http: arrayOf(httpRoute),
  tls: arrayOf(tlsRoute),
  tcp: arrayOf(tcpRoute),
  exportTo: strArray,
});

export const virtualServiceSchema: Schema = envelope({ spec: virtualServiceSpec }, ['spec']);

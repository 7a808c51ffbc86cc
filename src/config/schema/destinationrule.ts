/** Schema for networking.istio.io DestinationRule: traffic policy, subsets, upstream TLS. */
import { CLIENT_TLS_MODES, LB_SIMPLE } from '../types/istio.js';
import {
  anyObject, arrayOf, bool, duration, enumOf, envelope, obj, portSelector, str, strArray, strMap,
  uint, type Schema,
} from './common.js';

export const clientTlsSettings: Schema = obj({
  mode: enumOf(CLIENT_TLS_MODES),
  clientCertificate: str,
  privateKey: str,
  caCertificates: str,
  caCrl: str,
  credentialName: str,
  subjectAltNames: strArray,
  sni: str,
  insecureSkipVerify: bool,
}, [], {
  tgExclusive: [['credentialName', 'clientCertificate'], ['credentialName', 'privateKey'], ['credentialName', 'caCertificates']],
});

const loadBalancer: Schema = obj({
  simple: enumOf(LB_SIMPLE),
  consistentHash: anyObject,
  localityLbSetting: anyObject,
  warmupDurationSecs: duration,
  warmup: anyObject,
}, [], { tgExclusive: [['simple', 'consistentHash']] });

const connectionPool: Schema = obj({
  tcp: obj({
    maxConnections: uint,
    connectTimeout: duration,
    tcpKeepalive: obj({ probes: uint, time: duration, interval: duration }),
    maxConnectionDuration: duration,
    idleTimeout: duration,
  }),
  http: obj({
    http1MaxPendingRequests: uint,
    http2MaxRequests: uint,
    maxRequestsPerConnection: uint,
    maxRetries: uint,
    idleTimeout: duration,
    h2UpgradePolicy: enumOf(['DEFAULT', 'DO_NOT_UPGRADE', 'UPGRADE']),
    useClientProtocol: bool,
    maxConcurrentStreams: uint,
  }),
});

const portTrafficPolicy: Schema = obj({
  port: portSelector,
  loadBalancer,
  connectionPool,
  outlierDetection: anyObject,
  tls: clientTlsSettings,
});

export const trafficPolicy: Schema = obj({
  loadBalancer,
  connectionPool,
  outlierDetection: anyObject,
  tls: clientTlsSettings,
  portLevelSettings: arrayOf(portTrafficPolicy),
  tunnel: anyObject,
  proxyProtocol: anyObject,
});

const subset: Schema = obj({
  name: { type: 'string', minLength: 1 },
  labels: strMap,
  trafficPolicy,
}, ['name']);

export const destinationRuleSpec: Schema = obj({
  host: { type: 'string', minLength: 1 },
  trafficPolicy,
  subsets: arrayOf(subset),
  exportTo: strArray,
  workloadSelector: obj({ matchLabels: strMap }),
}, ['host']);

export const destinationRuleSchema: Schema = envelope({ spec: destinationRuleSpec }, ['spec']);

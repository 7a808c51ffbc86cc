/** Schema for networking.istio.io Gateway (v1, v1beta1, v1alpha3 share it). */
import { PORT_PROTOCOLS, SERVER_TLS_MODES, TLS_PROTOCOL_VERSIONS } from '../types/istio.js';
import { arrayOf, bool, enumOf, envelope, obj, portNumber, str, strArray, strMap, type Schema } from './common.js';

export const gatewayPort: Schema = obj({
  number: portNumber,
  protocol: enumOf(PORT_PROTOCOLS),
  name: { type: 'string', minLength: 1 },
  targetPort: portNumber,
}, ['number', 'protocol', 'name']);

export const serverTlsSettings: Schema = obj({
  httpsRedirect: bool,
  mode: enumOf(SERVER_TLS_MODES),
  serverCertificate: str,
  privateKey: str,
  caCertificates: str,
  caCrl: str,
  credentialName: str,
  credentialNames: arrayOf(str, { minItems: 1, maxItems: 2 }),
  caCertCredentialName: str,
  tlsCertificates: arrayOf(obj({ serverCertificate: str, privateKey: str, caCertificates: str }), { minItems: 1, maxItems: 2 }),
  subjectAltNames: strArray,
  verifyCertificateSpki: strArray,
  verifyCertificateHash: strArray,
  minProtocolVersion: enumOf(TLS_PROTOCOL_VERSIONS),
  maxProtocolVersion: enumOf(TLS_PROTOCOL_VERSIONS),
  cipherSuites: strArray,
  ecdhCurves: strArray,
  insecureSkipVerify: bool,
}, [], {
  tgExclusive: [
    ['credentialName', 'credentialNames', 'serverCertificate', 'tlsCertificates'],
    ['credentialName', 'credentialNames', 'privateKey', 'tlsCertificates'],
  ],
});

export const server: Schema = obj({
  port: gatewayPort,
  hosts: arrayOf({ type: 'string', minLength: 1 }, { minItems: 1 }),
  tls: serverTlsSettings,
  bind: str,
  name: str,
  defaultEndpoint: str,
}, ['port', 'hosts']);

export const gatewaySpec: Schema = obj({
  selector: strMap,
  servers: arrayOf(server),
});

export const gatewaySchema: Schema = envelope({ spec: gatewaySpec }, ['spec']);

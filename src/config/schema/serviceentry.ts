/** Schema for networking.istio.io ServiceEntry. */
import { PORT_PROTOCOLS, SE_LOCATIONS, SE_RESOLUTIONS } from '../types/istio.js';
import { arrayOf, enumOf, envelope, obj, portNumber, str, strArray, strMap, type Schema } from './common.js';
import { workloadEntrySpec } from './workloadentry.js';

const servicePort: Schema = obj({
  number: portNumber,
  protocol: enumOf(PORT_PROTOCOLS),
  name: { type: 'string', minLength: 1 },
  targetPort: portNumber,
}, ['number', 'name']);

export const serviceEntrySpec: Schema = obj({
  hosts: arrayOf({ type: 'string', minLength: 1 }, { minItems: 1 }),
  addresses: strArray,
  ports: arrayOf(servicePort),
  location: enumOf(SE_LOCATIONS),
  resolution: enumOf(SE_RESOLUTIONS),
  endpoints: arrayOf(workloadEntrySpec),
  workloadSelector: obj({ labels: strMap }),
  exportTo: strArray,
  subjectAltNames: strArray,
}, ['hosts'], { tgExclusive: [['endpoints', 'workloadSelector']] });

export const serviceEntrySchema: Schema = envelope({ spec: serviceEntrySpec }, ['spec']);

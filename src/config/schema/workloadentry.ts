/** Schema for networking.istio.io WorkloadEntry (also the shape of ServiceEntry endpoints). */
import { envelope, mapOf, obj, portNumber, str, strMap, uint, type Schema } from './common.js';

export const workloadEntrySpec: Schema = obj({
  address: str,
  ports: mapOf(portNumber),
  labels: strMap,
  network: str,
  locality: str,
  weight: uint,
  serviceAccount: str,
});

export const workloadEntrySchema: Schema = envelope({ spec: workloadEntrySpec }, ['spec']);

/** Schemas for the core v1 kinds tlsgate reads (Secret, ConfigMap) and the Gateway API envelope. */
import { bool, envelope, str, strMap, type Schema } from './common.js';

export const secretSchema: Schema = envelope({ type: str, data: strMap, stringData: strMap, immutable: bool });

export const configMapSchema: Schema = envelope({ data: strMap, binaryData: strMap, immutable: bool });

/** Gateway API specs are validated by their translator; here only the envelope is checked. */
export const gatewayApiSchema: Schema = {
  type: 'object',
  properties: { apiVersion: str, kind: str, metadata: (envelope({}).properties as Record<string, Schema>).metadata, spec: { type: 'object' } },
  required: ['apiVersion', 'kind', 'metadata'],
};

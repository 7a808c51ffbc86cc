/** Schema for security.istio.io PeerAuthentication. */
import { PEER_AUTH_MODES } from '../types/istio.js';
import { enumOf, envelope, mapOf, obj, strMap, type Schema } from './common.js';

const mtls: Schema = obj({ mode: enumOf(PEER_AUTH_MODES) });

export const peerAuthenticationSpec: Schema = obj({
  selector: obj({ matchLabels: strMap }),
  mtls,
  portLevelMtls: mapOf(mtls),
});

// An empty spec is meaningful (it inherits the mode), so spec itself is optional.
export const peerAuthenticationSchema: Schema = envelope({ spec: peerAuthenticationSpec });
